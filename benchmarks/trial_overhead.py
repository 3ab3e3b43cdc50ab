"""Per-trial overhead, worker memory and object-store use (issue 7, benchmarks 2 and 3).

Overhead, same model in one run: (a) this product's trial path without evaluation (`ray.get` of
the shard references, lerp into the resident model), (b) a naive path (`from_pretrained` both
checkpoints, merge the state dicts, `load_state_dict`), (c) mergekit's linear merge where it is
installed. The first trial on a worker, which builds the model, is reported separately. Targets:
(a) ≤ 0.05 × (b), and (a) within 3 × the merge arithmetic alone (torch.lerp of in-memory tensors).

Memory: real `tune_merge` runs with 1, 2 and 4 concurrent trials on one node; peak object-store
bytes are sampled on the driver during the run, worker memory is what each trial reports (USS:
private memory after the merge; peak RSS, which also counts the shared object-store pages a
worker has read). Target: object-store bytes do not grow with concurrency; USS ≤ 1.3 × model.

    python benchmarks/trial_overhead.py             # 134M bf16 Llama; writes BENCHMARKS.md
    python benchmarks/trial_overhead.py --quick     # 14M, prints only
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import headline, machine, make_pair, median_time, write_section  # noqa: E402

from ckmerge_ray.objectives import Objective  # noqa: E402


class RandomTokensLoss(Objective):
    """Loss on a fixed batch of random tokens: a cheap objective that needs no tokenizer."""

    mode, name = "min", "random-tokens"

    def __init__(self, vocab: int, tokens: int = 256):
        self.ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))

    def prepare(self, tokenizer_dir) -> None:
        pass

    def evaluate(self, model, device) -> Dict[str, float]:
        with torch.inference_mode():
            ids = self.ids.to(device)
            loss = model(input_ids=ids, labels=ids).loss
        return {"score": float(loss)}


def overhead(pair, repeat: int) -> Dict[str, float]:
    import ray
    from transformers import AutoModelForCausalLM

    from ckmerge_ray.checkpoints import load_checkpoint_info, plan_shards
    from ckmerge_ray.merge import merge_state_dicts
    from ckmerge_ray.store import put_checkpoint, shard_tensors
    from ckmerge_ray.trial import TrialPlan, merge_into_model, new_resident

    a, b = (load_checkpoint_info(p) for p in pair)
    plan = plan_shards(b, 1 << 30)
    ref = {}
    t = time.perf_counter()
    stored = [put_checkpoint(i, plan, reference=ref) for i in (a, b)]
    load_s = time.perf_counter() - t
    dtypes = {n: str(s.dtype).replace("torch.", "") for n, s in b.specs.items()}
    tp = TrialPlan("bench", b.config, dtypes, stored[0], stored[1], objective=None)

    t = time.perf_counter()  # first trial on a worker: build the model, then merge
    resident = new_resident(tp, "cpu")
    tensors = resident.tensors
    merge_into_model(tp, tensors, 0.5, cache=resident)
    first_s = time.perf_counter() - t
    product_s = median_time(lambda: merge_into_model(tp, tensors, 0.6180339, cache=resident), repeat)
    del resident

    e = {k: v for r in stored[0].refs for k, v in shard_tensors(ray.get(r)).items()}
    l = {k: v for r in stored[1].refs for k, v in shard_tensors(ray.get(r)).items()}
    arithmetic_s = median_time(
        lambda: [torch.lerp(e[k], l[k], 0.6180339, out=tensors[k]) for k in l], repeat)
    del e, l

    def naive():
        ma = AutoModelForCausalLM.from_pretrained(pair[0], dtype="auto")
        mb = AutoModelForCausalLM.from_pretrained(pair[1], dtype="auto")
        mb.load_state_dict(merge_state_dicts(ma.state_dict(), mb.state_dict(), 0.6180339))
        return mb

    naive_s = median_time(naive, max(1, repeat // 2), warmup=1)
    mergekit_s = float("nan")
    if importlib.util.find_spec("mergekit") is not None:  # pragma: no cover - not installed here
        mergekit_s = _mergekit(pair)
    stored.clear()  # dropping the last references frees the objects
    return {"model_MB": b.nbytes / 1e6, "load_s": load_s, "first_trial_s": first_s,
            "product_s": product_s, "arithmetic_s": arithmetic_s, "naive_s": naive_s,
            "mergekit_s": mergekit_s}


def _mergekit(pair) -> float:
    import subprocess

    out = Path(tempfile.mkdtemp())
    (out / "cfg.yml").write_text(
        f"merge_method: linear\nmodels:\n  - model: {pair[0]}\n    parameters: {{weight: 0.382}}\n"
        f"  - model: {pair[1]}\n    parameters: {{weight: 0.618}}\ndtype: bfloat16\n")
    t = time.perf_counter()
    subprocess.run(["mergekit-yaml", str(out / "cfg.yml"), str(out / "m")], check=True)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "m")
    return time.perf_counter() - t


BASELINE: Dict[str, int] = {}  # object-store bytes used before the first run


def memory(pair, concurrency, vocab: int) -> Dict:
    import ray
    from ray._private import internal_api  # internal: the only way to read plasma bytes used

    from ckmerge_ray import tune_merge

    def used() -> int:
        addr = ray.get_runtime_context().gcs_address
        reply = internal_api.get_memory_info_reply(internal_api.get_state_from_address(addr))
        return reply.store_stats.object_store_bytes_used

    # The previous run's shards are freed asynchronously (its workers exit, its plan holder is
    # killed): wait for the store to drain to the session's baseline, at most 30 s, so that each
    # row is one run's own peak. If it does not drain, the row shows the leftovers.
    import gc

    gc.collect()
    deadline = time.time() + 30
    while used() > BASELINE.get("bytes", 0) + 2**20 and time.time() < deadline:
        time.sleep(0.5)
    drain_s = 30 - max(0.0, deadline - time.time())
    peak = {"bytes": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            try:
                peak["bytes"] = max(peak["bytes"], used())
            except Exception:
                pass
            time.sleep(0.2)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t = time.perf_counter()
    result = tune_merge(pair, {"cpu": 2 / concurrency}, objective=RandomTokensLoss(vocab),
                        num_trials=max(4, 2 * concurrency), max_concurrent=concurrency,
                        output_dir=tempfile.mkdtemp(), export_best=False, progress=False)
    wall = time.perf_counter() - t
    stop.set()
    thread.join()
    rows = [r for r in result.table.to_pylist() if r["status"] == "ok"]
    return {"q": concurrency, "store_peak_MB": (peak["bytes"] - BASELINE.get("bytes", 0)) / 1e6,
            "drain_s": drain_s,
            "uss_MB": max(r["uss_mb"] for r in rows) * 2**20 / 1e6,
            "model_uss_MB": max(r["model_uss_mb"] for r in rows) * 2**20 / 1e6,
            "model_uss_first_MB": max(r["model_uss_mb"] for r in rows if r["model_built"]) * 2**20 / 1e6,
            "rss_peak_MB": max(r["rss_peak_mb"] for r in rows) * 2**20 / 1e6,
            "wall_s": wall, "trials": len(rows)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--size", default=None)
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "ckmerge-bench")
    args = p.parse_args(argv)
    size = args.size or ("14M" if args.quick else "134M")
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
    pair = make_pair(args.cache, size, "bfloat16")
    o = overhead(pair, repeat=3 if args.quick else 7)
    print({k: round(v, 4) for k, v in o.items()}, flush=True)
    vocab = __import__("json").loads((pair[1] / "config.json").read_text())["vocab_size"]
    import gc

    from ray._private import internal_api

    from ckmerge_ray import trial

    trial._RESIDENT.clear()  # overhead() ran the trial path in this process: drop its shard views
    gc.collect()
    time.sleep(2)  # frees are asynchronous
    reply = internal_api.get_memory_info_reply(
        internal_api.get_state_from_address(ray.get_runtime_context().gcs_address))
    BASELINE["bytes"] = reply.store_stats.object_store_bytes_used
    mem = [memory(pair, q, vocab) for q in ((1, 2) if args.quick else (1, 2, 4))]
    ray.shutdown()
    for m in mem:
        print(m, flush=True)
    model_mb = o["model_MB"]
    ratio = o["product_s"] / o["naive_s"]
    vs_arith = o["product_s"] / o["arithmetic_s"]
    mergekit = "not installed" if o["mergekit_s"] != o["mergekit_s"] else f"{o['mergekit_s']:.3f}"
    table = [
        f"Model: Llama {size} bf16, {model_mb:.0f} MB.\n",
        "| path | seconds |", "|---|---|",
        f"| (a) product trial path, excluding evaluation (median) | {o['product_s']:.4f} |",
        f"| merge arithmetic alone: torch.lerp over in-memory tensors | {o['arithmetic_s']:.4f} |",
        f"| first trial on a worker: build the model + merge | {o['first_trial_s']:.3f} |",
        f"| (b) naive: from_pretrained ×2, merge state dicts, load_state_dict | {o['naive_s']:.3f} |",
        f"| (c) mergekit linear merge + load | {mergekit} |",
        f"| once per run: read both checkpoints into the object store | {o['load_s']:.3f} |",
        "",
        f"(a)/(b) = {ratio:.4f} (target ≤ 0.05); (a)/arithmetic = {vs_arith:.2f} (target ≤ 3).",
        "",
        "| concurrent trials | object-store peak MB | worker USS MB (max) | USS added by the model, first trial | that / model | same, max over all trials | that / model | worker peak RSS MB | wall s | wait for the previous run's frees, s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in mem:
        table.append(f"| {m['q']} | {m['store_peak_MB']:.0f} | {m['uss_MB']:.0f} | "
                     f"{m['model_uss_first_MB']:.0f} | {m['model_uss_first_MB'] / model_mb:.2f} | "
                     f"{m['model_uss_MB']:.0f} | "
                     f"{m['model_uss_MB'] / model_mb:.2f} | {m['rss_peak_MB']:.0f} | {m['wall_s']:.1f} | "
                     f"{m['drain_s']:.1f} |")
    body = (f"Command: `python benchmarks/trial_overhead.py`. Machine: {machine()}.\n\n" + "\n".join(table)
            + "\n\nUSS is a worker's private memory after a merge (the Python/torch/transformers "
              "runtime plus the resident model); 'USS added by the model' is USS after the merge "
              "minus USS just before the model was built, after its modeling code was imported "
              "(~100 MB for Llama, the same for any size; target ≤ 1.3 × model). 'First trial' is "
              "measured before any evaluation ran in the worker; the max over all trials also "
              "counts memory the allocator keeps after evaluations. Peak RSS also "
              "counts the object-store pages a worker mapped, which are shared, not copies. "
              "Object-store peak is sampled on the driver during each run, minus the store's use "
              "before the first run; runs are sequential in one Ray session, each started once the "
              "previous run's shards were freed (last column), so growth across rows would mean a "
              "leak. The object-store pages a worker reads are mapped shared (smaps "
              "Shared_Dirty), not copied: zero-copy.")
    print(body)
    if not args.quick:
        write_section("Per-trial overhead and memory", body)
    store = [m["store_peak_MB"] for m in mem]
    print(headline(overhead_ratio=ratio, vs_arithmetic=vs_arith, first_trial_s=o["first_trial_s"],
                   store_growth=max(store) / min(store),
                   model_uss_first_over_model=max(m["model_uss_first_MB"] for m in mem) / model_mb,
                   model_uss_over_model_max=max(m["model_uss_MB"] for m in mem) / model_mb))
    return 0


if __name__ == "__main__":
    sys.exit(main())
