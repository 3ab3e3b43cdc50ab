"""Checkpoint sources (issue 18): time and peak memory to put a checkpoint pair into the object
store from each place a trainer leaves it, against converting first.

One bf16 Llama pair (random weights, the later one a small step from the earlier, as
`common.make_pair` makes them) is written four ways, then each source is put into Ray's object
store by the product's own pipeline (`inputs.load_window`, then `WindowStore(...).all()`):

- (a) Hugging Face safetensors on local disk (`save_file`, config.json beside);
- (b) DCP on local disk in Trainer/Accelerate's FSDP layout, ``checkpoint-N/pytorch_model_fsdp_0/``
  with config.json in ``checkpoint-N/``, holding {"model": weights, "optimizer": AdamW state
  keyed by parameter name (exp_avg, exp_avg_sq in the weights' dtype, step), "step": N} written by
  `torch.distributed.checkpoint.save(no_dist=True)`: one ``__0_0.distcp`` of 3x the weights, two
  thirds of which the reader must skip;
- (b') DCP on local disk as Accelerate itself writes it: {"model": weights} alone in
  ``pytorch_model_fsdp_0/`` (Accelerate saves the optimizer in a separate ``optimizer_0/``, which no
  path here reads, so it is not written);
- (c) the (a) files on an S3 server (moto on loopback, `tests/s3server.py`), read through URIs;
- (d) the (b) files on the same server;
- (e) today's path: each (b') folder converted to a Hugging Face directory with Accelerate's
  `merge_fsdp_weights` (what ``accelerate merge-weights`` runs; it loads the whole DCP into a
  state dict and writes ``model.safetensors``), config.json copied beside it, then stored as (a).
  `merge_fsdp_weights` refuses (b) itself ("Key `model` is invalid, expected torch.Tensor"): with
  the optimizer in the same DCP its state dict has more than one top-level key.

Each (source, round) runs in a fresh process that starts its own Ray (`ray.init(num_cpus=2,
object_store_memory=...)`), so the peak RSS (VmHWM: see `child`) is that source's. The clock
runs from after `ray.init` to the last shard put: header reads, validation, (conversion,) reads,
conversion to the model's names, puts. Rounds run every source once, in an order rotated each
round; a ratio to (a) is the ratio of the medians over rounds. (d) runs one round by default: on
moto its time is the server's (see BENCHMARKS.md). Every source must store the same tensors: a
SHA-256 over every stored tensor (by name: dtype, shape, bytes) is compared across sources. For
(c) and (d) the bytes the process read (`storage.read_counter`), the bytes the server sent
through a counting proxy, the server's request log and its CPU time are recorded.

    python benchmarks/checkpoint_sources.py            # 134M bf16 pair, 5 rounds; writes BENCHMARKS.md
    python benchmarks/checkpoint_sources.py --quick    # a tiny pair, 1 round, all sources in this
                                                       # process (one Ray start); prints only
    python benchmarks/checkpoint_sources.py --report run.json   # the section again from --save's file
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import SIZES, headline, machine, make_pair, write_section  # noqa: E402

# A pair small enough for --quick (~0.6 M parameters), in common.make_pair's Llama family.
SIZES.setdefault("tiny", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=4, vocab_size=4096))
SOURCES = {
    "hf_local": "(a) HF safetensors, local disk",
    "dcp_local": "(b) DCP with optimizer state, local disk",
    "dcp_model_local": "(b') DCP, weights only (Accelerate's layout), local disk",
    "hf_s3": "(c) HF safetensors, S3 server",
    "dcp_s3": "(d) DCP with optimizer state, S3 server",
    "convert": "(e) merge_fsdp_weights (b') -> HF, then (a)",
}
STEPS = (100, 200)  # the pair's checkpoint-N names
BUCKET = "ckmerge-bench"


# --- the checkpoints ----------------------------------------------------------------------


def write_sources(root: Path, size: str) -> Dict[str, List[Path]]:
    """The pair as HF directories and in both DCP layouts under `root` (reused when present)."""
    import torch
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    hf = make_pair(root, size, "bfloat16")
    out: Dict[str, List[Path]] = {"hf": list(hf), "dcp": [], "dcp_model": []}
    g = torch.Generator().manual_seed(1)
    for step, src in zip(STEPS, hf):
        full, model_only = root / f"{size}-dcp" / f"checkpoint-{step}", \
            root / f"{size}-dcp-model" / f"checkpoint-{step}"
        out["dcp"].append(full)
        out["dcp_model"].append(model_only)
        if (full / "pytorch_model_fsdp_0" / ".metadata").exists() and \
                (model_only / "pytorch_model_fsdp_0" / ".metadata").exists():
            continue
        weights = load_file(src / "model.safetensors")
        # AdamW's state as torch.distributed.checkpoint.state_dict.get_optimizer_state_dict keys
        # it (by parameter name); moments in the parameters' dtype, as AdamW keeps them.
        optimizer = {
            "state": {k: {"exp_avg": (torch.randn(v.shape, generator=g) * 1e-3).to(v.dtype),
                          "exp_avg_sq": (torch.rand(v.shape, generator=g) * 1e-6).to(v.dtype),
                          "step": torch.tensor(float(step))} for k, v in weights.items()},
            "param_groups": [{"lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1,
                              "params": list(weights)}],
        }
        for folder, state in ((full, {"model": weights, "optimizer": optimizer, "step": step}),
                              (model_only, {"model": weights})):
            shutil.rmtree(folder, ignore_errors=True)
            dcp.save(state, checkpoint_id=str(folder / "pytorch_model_fsdp_0"), no_dist=True)
            shutil.copy(src / "config.json", folder / "config.json")
        del weights, optimizer
    return out


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def model_items(dcp_dir: Path) -> Tuple[int, bool]:
    """(bytes of the "model." items in a DCP folder's data files, whether they lie end to end in
    one file), from its metadata."""
    from ckmerge_ray.checkpoints.dcp import read_metadata
    from ckmerge_ray.storage import locate

    metadata = read_metadata(locate(dcp_dir))
    items = sorted((i.relative_path, i.offset, i.length) for k, i in metadata.storage_data.items()
                   if k.fqn.startswith("model."))
    contiguous = all(a[0] == b[0] and a[1] + a[2] == b[1] for a, b in zip(items, items[1:]))
    return sum(i[2] for i in items), contiguous


# --- one measurement, in a fresh process ----------------------------------------------------


class RssSampler:
    """Peak anonymous (private heap) RSS, sampled from /proc/self/status every few ms."""

    def __init__(self, period: float = 0.005):
        self.period, self.peak, self._stop = period, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def status() -> Dict[str, int]:
        """VmHWM (peak RSS), VmRSS, RssAnon, RssFile, RssShmem of this process, in bytes."""
        out = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(line.split()[1]) * 1024
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.status()["RssAnon"])
            time.sleep(self.period)

    def __enter__(self):
        self.peak = self.status()["RssAnon"]
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.status()["RssAnon"])


def stored_digest(stored) -> str:
    """SHA-256 over every stored tensor, by name: name, dtype, shape, bytes (independent of the
    order in which tensors lie in a shard's flat buffer)."""
    import ray

    h = hashlib.sha256()
    for ckpt in stored:
        tensors = {}
        for ref in ckpt.refs:
            shard = ray.get(ref)  # numpy views of the object store's memory
            for name, (dtype, offset, shape) in shard["layout"].items():
                n = 1
                for d in shape:
                    n *= d
                tensors[name] = (dtype, shape, shard["buffers"][dtype][offset:offset + n])
        for name in sorted(tensors):
            dtype, shape, flat = tensors[name]
            h.update(f"{name}|{dtype}|{tuple(shape)}|".encode())
            h.update(flat)
        h.update(b"--")
    return h.hexdigest()


def start_ray(object_store_bytes: int) -> None:
    import ray

    ray.init(address="local", num_cpus=2, object_store_memory=object_store_bytes,
             include_dashboard=False, logging_level="ERROR")


def child(spec: dict, own_ray: bool = True) -> dict:
    """Put one source's pair into the object store (of a Ray started here, unless `own_ray` is
    False); time, memory, bytes read."""
    import ray

    from ckmerge_ray.config import CheckpointConfig
    from ckmerge_ray.inputs import WindowStore, load_window
    from ckmerge_ray.storage import clear_instance_caches, read_counter

    # What any source imports on first use, imported before the clock by every source, so that
    # none is charged for a module (transformers' Llama code alone took ~6 s here) and the
    # clock measures reading, converting and storing.
    import s3fs  # noqa: F401
    import torch.distributed.checkpoint  # noqa: F401
    from accelerate.utils import merge_fsdp_weights
    from transformers import LlamaForCausalLM  # noqa: F401
    if own_ray:
        start_ray(spec["object_store_bytes"])
    clear_instance_caches()
    read_counter(reset=True)
    try:
        before = RssSampler.status()
        cpu0 = time.process_time()
        with RssSampler() as anon:
            t0 = time.perf_counter()
            paths = spec["paths"]
            if spec["convert"]:  # what a user runs today, per checkpoint
                converted = []
                for p in paths:
                    dest = Path(spec["convert"]) / Path(p).name
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    merge_fsdp_weights(str(Path(p) / "pytorch_model_fsdp_0"), str(dest))
                    shutil.copy(Path(p) / "config.json", dest / "config.json")
                    converted.append(str(dest))
                paths = converted
            convert_s = time.perf_counter() - t0
            infos = load_window(paths, CheckpointConfig())
            headers_s = time.perf_counter() - t0 - convert_s
            stored = WindowStore(infos, CheckpointConfig(), lambda m: None).all()
            seconds = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        after = RssSampler.status()
        # Peak RSS is VmHWM, this address space's high-water mark. getrusage's ru_maxrss is not
        # used: Linux carries it over exec from the parent (a child of a 2 GB parent reports
        # >= 2 GB however little it touched).
        peak = after["VmHWM"]
        counts = read_counter()
        return {
            "seconds": seconds, "convert_s": convert_s, "headers_s": headers_s,
            "store_s": seconds - convert_s - headers_s, "cpu_s": cpu, "peak_rss": peak,
            "rss_before": before["VmRSS"], "anon_before": before["RssAnon"],
            "anon_peak": anon.peak, "shmem_after": after["RssShmem"],
            "stored_bytes": sum(s.total_bytes for s in stored),
            "tensors": len(infos[-1].specs),
            "read_bytes": sum(counts.values()), "read_files": counts,
            "disk_written": sum(dir_bytes(Path(p)) for p in paths) if spec["convert"] else 0,
            "digest": stored_digest(stored) if spec["digest"] else None,
        }
    finally:
        if own_ray:
            ray.shutdown()


def run_child(spec: dict, env: Dict[str, str]) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env,
                       capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"{spec['source']} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of process `pid` (the S3 server), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- the run --------------------------------------------------------------------------------


def measure(cache: Path, size: str, rounds: int, dcp_s3_rounds: int, inline: bool = False) -> dict:
    """Every source `rounds` times ((d) `dcp_s3_rounds` times), each in a fresh process
    (`inline`: all in this process after one Ray start; peak RSS is then cumulative)."""
    from tests.s3server import running_s3_server

    sources = write_sources(cache, size)
    pair_bytes = sum(dir_bytes(p) for p in sources["hf"])
    store = max(3 * pair_bytes, 256 << 20)  # both checkpoints and slack; Ray's minimum is 75 MiB
    results: Dict[str, List[dict]] = {k: [] for k in SOURCES}
    loads: List[float] = []
    with running_s3_server() as server:
        for p in sources["hf"] + sources["dcp"]:
            kind = "hf" if p in sources["hf"] else "dcp"
            server.upload_dir(p, f"s3://{BUCKET}/{kind}/{p.name}")
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        # Through the counting proxy: what the server sent is counted outside the process
        # measured. The proxy (a thread per direction, in this process) is on the path; it
        # cost ~0.25 s of CPU per 134M pair and no measurable wall time against the server's
        # own endpoint (17.1-19.6 s both ways, 2 runs each).
        s3_env = dict(base_env, **server.proxy_env)
        if inline:
            os.environ.clear()
            os.environ.update(s3_env)
            start_ray(store)
        spec_of = {
            "hf_local": [str(p) for p in sources["hf"]],
            "dcp_local": [str(p) for p in sources["dcp"]],
            "dcp_model_local": [str(p) for p in sources["dcp_model"]],
            "hf_s3": [f"s3://{BUCKET}/hf/{p.name}" for p in sources["hf"]],
            "dcp_s3": [f"s3://{BUCKET}/dcp/{p.name}" for p in sources["dcp"]],
            "convert": [str(p) for p in sources["dcp_model"]],
        }
        order = list(SOURCES)
        try:
            for r in range(rounds):
                for source in order[r % len(order):] + order[:r % len(order)]:
                    if source == "dcp_s3" and r >= dcp_s3_rounds:
                        continue
                    convert = str(cache / "converted") if source == "convert" else None
                    spec = {"source": source, "paths": spec_of[source], "convert": convert,
                            "object_store_bytes": store, "digest": r == 0}
                    remote = source.endswith("_s3")
                    server.reset_count()
                    server_cpu = cpu_seconds(server.pid)
                    loads.append(os.getloadavg()[0])
                    if remote and r == 0:
                        server.start_recording()
                    res = child(spec, own_ray=False) if inline else \
                        run_child(spec, s3_env if remote else base_env)
                    res["server_cpu_s"] = cpu_seconds(server.pid) - server_cpu
                    res["from_server"] = server.bytes_from_server()
                    if remote and r == 0:
                        server.stop_recording()
                        methods = [q.get("method") for q in server.requests()]
                        res["requests"] = len(methods)
                        res["ranged_gets"] = sum(1 for q in server.requests()
                                                 if q.get("method") == "GET"
                                                 and "range" in {h.lower() for h in q.get("headers", {})})
                    res["round"], res["load"] = r, loads[-1]
                    results[source].append(res)
                    if convert:
                        shutil.rmtree(convert)
                    print(f"round {r} {source}: {res['seconds']:.2f} s, peak RSS "
                          f"{res['peak_rss'] / 2**20:.0f} MiB, load {loads[-1]:.1f}",
                          file=sys.stderr, flush=True)
        finally:
            if inline:
                import ray

                ray.shutdown()
    tensor_bytes = results["hf_local"][0]["stored_bytes"]
    return {"results": results, "loads": loads, "pair_bytes": pair_bytes,
            "tensor_bytes": tensor_bytes,
            "model_items": sum(model_items(p / "pytorch_model_fsdp_0")[0] for p in sources["dcp"]),
            "model_items_contiguous": all(model_items(p / "pytorch_model_fsdp_0")[1]
                                          for p in sources["dcp"]),
            "hf_file_bytes": sum((p / "model.safetensors").stat().st_size for p in sources["hf"]),
            "dcp_bytes": sum(dir_bytes(p / "pytorch_model_fsdp_0") for p in sources["dcp"]),
            "rounds": rounds, "dcp_s3_rounds": min(rounds, dcp_s3_rounds), "store": store,
            "size": size, "inline": inline}


def summarize(m: dict) -> Dict[str, dict]:
    """Per source: medians over its rounds; ratios to (a) are ratios of medians (the load on
    these shared cores changed within a round as much as between rounds)."""
    rows = {}
    for source, runs in m["results"].items():
        med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
        rows[source] = {
            "seconds": med("seconds"), "headers_s": med("headers_s"), "store_s": med("store_s"),
            "convert_s": med("convert_s"), "cpu_s": med("cpu_s"), "server_cpu_s": med("server_cpu_s"),
            "peak_mib": med("peak_rss") / 2**20, "before_mib": med("rss_before") / 2**20,
            "anon_mib": statistics.median(r["anon_peak"] - r["anon_before"] for r in runs) / 2**20,
            "all_s": [round(r["seconds"], 2) for r in runs],
            "loads": [r["load"] for r in runs],
            **{k: runs[0].get(k) for k in ("read_bytes", "read_files", "from_server", "disk_written",
                                           "digest", "stored_bytes", "tensors", "requests",
                                           "ranged_gets")},
        }
    a = rows["hf_local"]
    for r in rows.values():
        r["ratio"] = r["seconds"] / a["seconds"]
        r["store_ratio"] = r["store_s"] / a["store_s"]
        r["rss_ratio"] = r["peak_mib"] / a["peak_mib"]
    return rows


def weight_read(row: dict, suffix: str) -> int:
    """Bytes the process read from files whose names end in `suffix` (first round)."""
    return sum(n for f, n in row["read_files"].items() if f.endswith(suffix))


def figures(meta: dict, rows: Dict[str, dict]) -> str:
    digests = {r["digest"] for r in rows.values()}
    return headline(
        **{f"ratio_{k}": r["ratio"] for k, r in rows.items()},
        same_digest=int(len(digests) == 1 and None not in digests),
        same_stored=int(len({r["stored_bytes"] for r in rows.values()}) == 1),
        # bytes, exact: read from the weight files minus what they hold (HF: the whole files;
        # DCP: the model's items, not the optimizer's)
        hf_s3_weight_bytes_extra=weight_read(rows["hf_s3"], ".safetensors") - meta["hf_file_bytes"],
        dcp_s3_weight_bytes_extra=weight_read(rows["dcp_s3"], ".distcp") - meta["model_items"],
        model_items_over_dcp=meta["model_items"] / meta["dcp_bytes"],
        wire_minus_read_min=min(rows[k]["from_server"] - rows[k]["read_bytes"]
                                for k in ("hf_s3", "dcp_s3")),
        wire_extra_over_tensors_max=max(rows[k]["from_server"] - rows[k]["read_bytes"]
                                        for k in ("hf_s3", "dcp_s3")) / meta["tensor_bytes"],
        convert_disk_over_hf=rows["convert"]["disk_written"] / meta["pair_bytes"],
        tensors=rows["hf_local"]["tensors"], tensor_mib=meta["tensor_bytes"] / 2**20,
    )


def load_average() -> str:
    """`uptime`'s load averages (1, 5, 15 minutes)."""
    out = subprocess.run(["uptime"], capture_output=True, text=True).stdout
    return out.rsplit("load average:", 1)[-1].strip()


def git_head() -> str:
    """HEAD's short hash, and '+' when ckmerge_ray/ has uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                              capture_output=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "ckmerge_ray"], cwd=root,
                               text=True, capture_output=True).stdout.strip()
    except OSError:
        return "unknown"
    return head + ("+" if dirty else "")


READERS = ("ckmerge_ray/checkpoints", "ckmerge_ray/storage.py", "ckmerge_ray/store.py",
           "ckmerge_ray/inputs.py", "ckmerge_ray/model.py", "ckmerge_ray/naming.py")


def git_state(start: str, end: str) -> str:
    """The code measured, in words ('+': with uncommitted changes in ckmerge_ray/)."""
    if start == end:
        return f"commit {start}"
    root = Path(__file__).resolve().parent.parent
    changed = subprocess.run(["git", "diff", "--name-only", start.rstrip("+"), end.rstrip("+"),
                              "--", *READERS], cwd=root, text=True, capture_output=True).stdout.split()
    return (f"commit {start} when the run started and {end} when it ended (other engineers "
            "committed during the run; " + (f"to the readers: {', '.join(changed)}" if changed else
                                            "none of it to the code measured here") + ")")


def table(rows: Dict[str, dict]) -> str:
    lines = ["| source | seconds (median) | each round | ratio to (a) | of which headers, "
             "validation | read + put | its ratio to (a) | peak RSS MiB | ratio to (a) | "
             "private memory growth MiB | bytes read from the server (sent by it) | requests "
             "(ranged GETs) | moto server CPU s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
             "| ---: |"]
    for k, label in SOURCES.items():
        r = rows[k]
        remote = k.endswith("_s3")
        read = f"{r['read_bytes']:,} ({r['from_server']:,})" if remote else "–"
        reqs = f"{r['requests']} ({r['ranged_gets']})" if remote and r["requests"] else "–"
        server = f"{r['server_cpu_s']:.1f}" if remote else "–"
        each = ", ".join(f"{x:.1f}" for x in r["all_s"])
        lines.append(f"| {label} | {r['seconds']:.2f} | {each} | {r['ratio']:.2f} | "
                     f"{r['headers_s']:.2f} | {r['store_s']:.2f} | {r['store_ratio']:.2f} | "
                     f"{r['peak_mib']:.0f} | {r['rss_ratio']:.2f} | {r['anon_mib']:.0f} | {read} | "
                     f"{reqs} | {server} |")
    return "\n".join(lines)


def section(meta: dict, rows: Dict[str, dict]) -> str:
    """The BENCHMARKS.md section: set-up, table, reading."""
    a, b, b2, c, d, e = (rows[k] for k in SOURCES)
    loads = sorted(x for r in rows.values() for x in r["loads"])
    mib = meta["tensor_bytes"] / 2**20
    shape = SIZES[meta["size"]]
    same = len({r["digest"] for r in rows.values()}) == 1
    spread = (max(a["all_s"]) - min(a["all_s"])) / a["seconds"]
    dirty = (" ('+': with uncommitted changes in ckmerge_ray/, none of them in the readers)"
             if "+" in meta["git"] else "")
    contiguous = (f", although the model's {a['tensors']} items of a checkpoint lie end to end in "
                  "the .distcp, where one GET would cover them") if meta["model_items_contiguous"] else ""
    moto = ", so most of (d)'s time here is moto's" if d["server_cpu_s"] > d["seconds"] / 2 else ""
    return f"""
Command: `{meta['command']}` (rounds: {meta['rounds']}; (d): {meta['dcp_s3_rounds']}). Machine:
{meta['machine']}, no GPU. The 2 cores were shared with three other engineers' jobs: the
1-minute load average was {loads[0]:.1f}–{loads[-1]:.1f} (median {statistics.median(loads):.1f})
when the measured processes started (`uptime` load averages over 1, 5 and 15 minutes:
{meta['uptime'][0]} before the run, {meta['uptime'][1]} after it). ckmerge_ray at {meta['git']}{dirty}.

A pair of bf16 Llama checkpoints of {meta['tensor_bytes'] / 4 / 1e6:.0f}M parameters (hidden
{shape['hidden_size']}, {shape['num_hidden_layers']} layers, vocabulary {shape['vocab_size']},
untied head; random weights, the later a small step from the earlier) is put into Ray's object
store by the product's pipeline (`load_window`, then `WindowStore(...).all()`): {mib:.0f} MiB per
pair, {a['tensors']} tensors per checkpoint, one shard each. Each (source, round) runs in a fresh
process that starts its own Ray (`num_cpus=2`, object store {meta['store'] / 2**30:.1f} GiB); the
clock runs from after `ray.init` to the last put ("headers, validation": `load_window`; "read +
put": `WindowStore.all()`); the modules any source needs (transformers' Llama code, DCP, s3fs,
accelerate) are imported before it, in every process. Rounds run the
sources in a rotated order; ratios are ratios of the medians. Peak RSS is the process's VmHWM;
it includes the Ray/torch runtime (~{a['before_mib']:.0f} MiB before the load), the object-store
pages the process wrote (shared memory, {mib:.0f} MiB) and, for (a), the safetensors files' mapped
pages. (`getrusage`'s ru_maxrss is not used: Linux carries it across exec from the parent, here
the 2 GB benchmark process, and a first run read 1968 MiB for every source.) "Private memory
growth" is the peak of RssAnon, sampled every 5 ms, above its value before the load. The files
were written just before the run, so local reads come from the page cache. (c) and (d) read the
same files from a moto S3 server on loopback (`tests/s3server.py`) through its byte-counting
proxy: "bytes read" is `storage.read_counter()` (what the process asked for: headers,
config.json, .metadata and weights), "sent by it" what the proxy forwarded (HTTP overhead
included); requests are the server's own log. Every source stored the same tensors: one
SHA-256 over every stored tensor (name, dtype, shape, bytes) was
{'equal across all six sources' if same else '**not** equal across the sources'}.

{table(rows)}

(b) is the Trainer/Accelerate FSDP layout (`checkpoint-N/pytorch_model_fsdp_0/`, config.json in
`checkpoint-N/`) holding {{"model", "optimizer" (AdamW: exp_avg and exp_avg_sq in bf16, step),
"step"}} in one `__0_0.distcp` of {meta['dcp_bytes'] / 2 / 2**20:.0f} MiB per checkpoint, of
which the model's items are {meta['model_items'] / meta['dcp_bytes']:.0%}. (d) read exactly those
items from the .distcp files ({weight_read(d, '.distcp'):,} bytes = the model items'
{meta['model_items']:,}), the optimizer's never; (c) read each safetensors file exactly once
({weight_read(c, '.safetensors'):,} bytes = the files' {meta['hf_file_bytes']:,}: header and
tensors). (b') holds the weights alone, as Accelerate writes `pytorch_model_fsdp_0/` (it puts the
optimizer in `optimizer_0/`, not written here: no path reads it). (e) is what a user runs today:
Accelerate 1.15's `merge_fsdp_weights` (what `accelerate merge-weights` runs) on each (b') folder,
config.json copied beside, then (a); the conversion took {e['convert_s']:.1f} s (median) of
(e)'s {e['seconds']:.1f} s and wrote {e['disk_written'] / 2**20:.0f} MiB of extra disk, a second
copy of the pair. It refuses (b): "Key `model` is invalid, expected torch.Tensor but received
<class 'dict'>" (with the optimizer in the same DCP its state dict has more than one top-level
key), and it reads local paths only, so from S3 a user first downloads the whole DCP
({meta['dcp_bytes'] / 2**20:.0f} MiB per pair for (b)'s files, against the
{weight_read(d, '.distcp') / 2**20:.0f} MiB that (d) reads).

Reading. **Time**: (a)'s own rounds spread over {min(a['all_s']):.1f}–{max(a['all_s']):.1f} s
({spread:.0%} of its median) as the load moved, so on this machine ratios within about
±{spread / 2:.0%} of 1 are not resolved. By the medians, reading DCP directly from local disk took {b2['ratio']:.2f}×
(b') and {b['ratio']:.2f}× (b) the safetensors time, safetensors from S3 {c['ratio']:.2f}×, and
the conversion path {e['ratio']:.2f}× (a), so reading (b') directly took {b2['seconds'] / e['seconds']:.2f}×
the conversion path's time, and it writes nothing to disk. The optimizer state in (b) is skipped by
the metadata, never read (its cost is one larger `.metadata`). **Memory**, which the load does not
blur: private memory grows {a['anon_mib']:.0f} MiB for (a) (the shard buffers: safetensors is
memory-mapped, each tensor copied once into its shard's flat buffer),
{min(b['anon_mib'], b2['anon_mib']):.0f}–{max(b['anon_mib'], b2['anon_mib']):.0f} MiB for DCP: torch's `FileSystemReader` reads each
item's bytes, `torch.load`s them (a second copy) and `copy_`s the result into the target tensor
(a third), and `pack_shard` copies once more; profiled on one 134M checkpoint outside this run
(cProfile): read_range 0.36 s, torch.load 0.49 s, copy_ 1.22 s of 2.19 s, the copies into fresh
memory paying a page fault per 4 KiB. (c) grows {c['anon_mib']:.0f} MiB: the weights arrive as
one ranged GET per file and are copied into a `bytearray` (0.48 s of a 2.5 s read of one
checkpoint in the same profile) before `torch.frombuffer`. Peak RSS differs less
({min(r['rss_ratio'] for r in rows.values()):.2f}–{max(r['rss_ratio'] for r in rows.values()):.2f}× (a)) because
the runtime and the stored pair's pages are common to all. **Requests**: (c) made {c['requests']}
requests for the pair, {c['ranged_gets']} of them ranged GETs (the 8-byte length, the header, the
tensors); the rest are format detection's HEAD and LIST probes (`.metadata` in the folder, in
`pytorch_model_fsdp_0/` and `model/`, and listings for unfinished DCP folders) and repeated HEADs
of config.json and model.safetensors. (d) made {d['requests']}, {d['ranged_gets']} of them ranged
GETs: the DCP reader asks for every item separately{contiguous}. moto answers each range by
reading the whole object ({meta['dcp_bytes'] / 2 / 2**20:.0f} MiB here) and slicing it
(`_handle_range_header` in `moto/s3/responses.py`): (d) took {d['seconds']:.0f} s
({d['ratio']:.1f}× (a)), the server used {d['server_cpu_s']:.0f} s of CPU and the process
{d['cpu_s']:.0f} s (against (b)'s {b['cpu_s']:.0f} s){moto}. A real object store serves a range
without reading the whole object, but each GET still costs a round trip.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a tiny pair, 1 round, all sources in this process; writes nothing")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dcp-s3-rounds", type=int, default=1,
                        help="rounds of (d), whose time on moto is the server's (default 1)")
    parser.add_argument("--size", default=None, help="common.SIZES key (default 134M; --quick tiny)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="where the checkpoints are written (default: a temporary directory)")
    parser.add_argument("--save", type=Path, default=None, help="write the summary here (JSON)")
    parser.add_argument("--report", type=Path, default=None,
                        help="write the BENCHMARKS.md section from a --save file; measure nothing")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if args.report:
        saved = json.loads(args.report.read_text())
        if "heads" in saved["meta"]:
            saved["meta"]["git"] = git_state(*saved["meta"]["heads"])
        write_section("Checkpoint sources (issue 18)", section(saved["meta"], saved["rows"]))
        print(figures(saved["meta"], saved["rows"]))
        return
    size = args.size or ("tiny" if args.quick else "134M")
    rounds = 1 if args.quick else args.rounds
    tmp = None
    if args.cache is None:
        tmp = tempfile.TemporaryDirectory(prefix="ckmerge-sources-")
        args.cache = Path(tmp.name)
    args.cache.mkdir(parents=True, exist_ok=True)
    uptime_before, head_before = load_average(), git_head()
    try:
        m = measure(args.cache, size, rounds, args.dcp_s3_rounds, inline=args.quick)
    finally:
        if tmp is not None:
            tmp.cleanup()
    rows = summarize(m)
    meta = {k: v for k, v in m.items() if k != "results"}
    heads = [head_before, git_head()]
    meta.update(machine=machine(), heads=heads, git=git_state(*heads),
                uptime=[uptime_before, load_average()],
        command="python benchmarks/checkpoint_sources.py" + "".join(
            f" {flag} {value}" for flag, value, default in (
                ("--rounds", rounds, 5), ("--dcp-s3-rounds", args.dcp_s3_rounds, 1),
                ("--size", size, "134M")) if value != default))
    if args.save:
        args.save.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(table(rows), file=sys.stderr)
    if not args.quick:
        write_section("Checkpoint sources (issue 18)", section(meta, rows))
    print(figures(meta, rows))


if __name__ == "__main__":
    main()
