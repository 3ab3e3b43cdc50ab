"""Evaluation throughput (issue 17): held-out loss's peak memory and tokens/s against vocabulary
size, for three ways of scoring the same windows:

- chunked: what `HeldoutLoss` does now: the model body once, then the output head and a
  running log-sum-exp over slices of the vocabulary (`ckmerge_ray.objectives.chunked`);
- full logits: what it did before (`model(ids).logits.float()`, then the cross-entropy over the
  whole (batch, seq_len, vocab) block);
- plain loop: ``model(input_ids=ids, labels=ids).loss``, transformers' own loss.

The model is a Llama built from a config (random weights: speed and memory do not depend on the
values), at vocabularies of 32k, 128k and 256k and otherwise the same shape. Each (path,
vocabulary) runs in a fresh process, so one run's freed heap does not hide the next one's peak.
Peak memory is the evaluation's growth above the memory in use when it began
(`ckmerge_ray.objectives.batching.PeakMemory`: resident set on CPU, max_memory_allocated on
CUDA). A second table sweeps the chunked path's batch size (the CPU default's evidence).

On a GPU it also reports each row's share of the device's peak dense bf16 FLOP rate
(2 × the parameters that multiply × tokens/s ÷ peak: the input embedding is a lookup and is left
out, attention's score products are not counted, so the share is a lower bound), and, at the
largest vocabulary, the largest batch of windows each path fits (doubling until out of memory,
then bisecting to within 1/8) beside the batch `HeldoutLoss` picks itself (`fit_batch`).

It needs torch and transformers only (no Ray), so it also runs on a GPU machine:

    python benchmarks/eval_throughput.py                 # CPU, fp32; writes BENCHMARKS.md
    python benchmarks/eval_throughput.py --device cuda   # bf16, 1B-class shape; prints the section
    python benchmarks/eval_throughput.py --quick         # chunked vs full, 128k and 256k, and
                                                         # the largest batch under a 1 GiB cap
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import headline, machine, write_section  # noqa: E402

from ckmerge_ray.objectives.batching import GPU_MEMORY_SHARE as GPU_SHARE  # noqa: E402

PATHS = ("chunked", "full", "plain")

#: Peak dense bf16 tensor-core rate, TFLOP/s, by a substring of torch's device name (vendor
#: datasheets, without sparsity; the first match wins). Any other device: --peak-tflops.
PEAK_BF16_TFLOPS = (("H200 NVL", 835.5), ("H200", 989.4), ("H100 NVL", 835.5),
                    ("H100 PCIe", 756.5), ("H100", 989.4), ("A100", 312.0), ("L40S", 362.05),
                    ("L4", 121.0), ("B200", 2250.0), ("MI300X", 1307.4))


def peak_tflops(device_name: str) -> float | None:
    """The device's peak dense bf16 TFLOP/s from PEAK_BF16_TFLOPS, or None if it is not listed."""
    return next((t for key, t in PEAK_BF16_TFLOPS if key in device_name), None)


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters a forward pass multiplies by: all of them (a tied head counted once) less an
    untied input embedding, which is a lookup."""
    n = sum(p.numel() for p in model.parameters())
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return n - emb.numel() if emb is not head else n


def largest_batch(run, start: int, cap: int, device: torch.device) -> tuple[int, int | None]:
    """(the largest batch found to fit, the smallest found not to, or None if `cap` fits):
    `run(b)` at start, 2·start, ... up to `cap` until one runs out of memory, then bisection
    until the two are within 1/8 of each other. Each size is tried once; errors other than
    out-of-memory propagate."""
    from ckmerge_ray.objectives.batching import free_cached, is_oom

    def fits(b: int) -> bool:
        try:
            run(b)
            return True
        except Exception as e:  # noqa: BLE001 - filtered just below
            if not is_oom(e):
                raise
        free_cached(device)  # outside the except block: the failed pass's frames are gone
        return False

    good, bad, b = 0, None, start
    while b <= cap and fits(b):
        good, b = b, b * 2
    if b <= cap:
        bad = b
    while bad is not None and bad - good > max(1, good // 8):
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good, bad


def build(spec: dict):
    """The spec's Llama (random weights) and a function scoring a (B, T) batch of ids by the
    spec's path: the sum of next-token NLLs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ckmerge_ray.objectives.chunked import chunk_bytes, chunked_nll, full_logits_nll, split_model

    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    torch.manual_seed(0)
    h = spec["hidden"]
    cfg = LlamaConfig(vocab_size=spec["vocab"], hidden_size=h, intermediate_size=4 * h,
                      num_hidden_layers=spec["layers"], num_attention_heads=max(1, h // 64),
                      max_position_embeddings=spec["seq_len"], tie_word_embeddings=False)
    with device:
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    path = spec["path"]
    if path == "chunked":
        with torch.inference_mode():
            split, why = split_model(model, torch.zeros(1, 8, dtype=torch.long, device=device))
        assert split is not None, why
        chunk = chunk_bytes(device.type)
        return model, lambda ids: chunked_nll(split, ids, chunk)
    if path == "full":
        return model, lambda ids: full_logits_nll(model, ids)
    return model, lambda ids: model(input_ids=ids, labels=ids).loss * ids[:, 1:].numel()


def child(spec: dict) -> dict:
    """One (path, vocabulary) measurement, in this process: peak memory of the first evaluation,
    then the median tokens/s of `repeat` more; with ``spec["mode"] == "largest"``, the largest
    batch instead (`largest`)."""
    from ckmerge_ray.objectives.batching import PeakMemory, Stopwatch

    device = torch.device(spec["device"])
    model, score = build(spec)
    if spec.get("mode") == "largest":
        return largest(spec, model, score)
    gen = torch.Generator().manual_seed(1)
    windows = torch.randint(0, spec["vocab"], (spec["windows"], spec["seq_len"]), generator=gen)
    batch = spec["batch"]

    def evaluate() -> float:
        total = 0.0
        with torch.inference_mode():
            for start in range(0, len(windows), batch):
                total += float(score(windows[start:start + batch].to(device)))
        return total / (windows.shape[0] * (windows.shape[1] - 1))

    with PeakMemory(device) as peak:
        loss = evaluate()
    times, cpu = [], []
    for _ in range(spec["repeat"]):
        c0 = time.process_time()
        with Stopwatch(device) as clock:
            evaluate()
        times.append(clock.seconds)
        cpu.append(time.process_time() - c0)
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    return {**spec, "loss": loss, "peak_mb": peak.mb, "seconds": statistics.median(times),
            "tokens_per_s": tokens / statistics.median(times),
            "tokens_per_cpu_s": tokens / statistics.median(cpu),
            "matmul_params": matmul_params(model), "device_name": device_name(device)}


def largest(spec: dict, model, score) -> dict:
    """The largest batch of fresh random windows one pass of `score` fits (`largest_batch`,
    from spec["batch"] up to spec["cap"]), and on CUDA the batch `fit_batch` picks; with
    spec["as_limit_mb"] (CPU, for --quick), the process's address space is first capped at that
    much above what it maps now, so that the search meets a real allocation failure."""
    import resource

    from ckmerge_ray.objectives.batching import fit_batch

    device = torch.device(spec["device"])

    def one_pass(b: int) -> None:
        ids = torch.randint(0, spec["vocab"], (b, spec["seq_len"]), device=device)
        with torch.inference_mode():
            float(score(ids))

    one_pass(1)  # warm-up: lazily made buffers are not counted against the first size
    limit = resource.getrlimit(resource.RLIMIT_AS)
    if spec.get("as_limit_mb"):
        with open("/proc/self/statm") as f:
            mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (mapped + spec["as_limit_mb"] * 2**20, limit[1]))
    try:
        good, bad = largest_batch(one_pass, spec["batch"], spec["cap"], device)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, limit)
    picked = fit_batch(one_pass, device, spec["cap"]) if device.type == "cuda" else None
    return {**spec, "largest": good, "first_failing": bad, "fit_batch": picked}


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def run_child(spec: dict) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                       capture_output=True, text=True, timeout=1200)
    if r.returncode != 0:
        raise RuntimeError(f"{spec} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="vocabularies 128k and 256k, a tiny model")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--vocabs", default=None, help="comma-separated (default 32000,128000,256000)")
    p.add_argument("--repeat", type=int, default=2, help="timed evaluations after the first")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's peak dense bf16 TFLOP/s (default: PEAK_BF16_TFLOPS by name)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print(headline(gpu="skipped"))
        return
    if args.quick:
        # both vocabularies past the point where a batch's logits exceed one chunk
        shape = dict(hidden=64, layers=1, seq_len=64, windows=4, batch=4, repeat=1)
        vocabs = [128000, 256000]
    elif cuda:  # a 1B-class body, bf16; 16 windows of 4096 tokens, 8 per pass
        shape = dict(hidden=2048, layers=16, seq_len=4096, windows=16, batch=8, repeat=args.repeat)
        vocabs = [32000, 128000, 256000]
    else:
        shape = dict(hidden=128, layers=4, seq_len=512, windows=8, batch=4, repeat=args.repeat)
        vocabs = [32000, 128000, 256000]
    if args.vocabs:
        vocabs = [int(v) for v in args.vocabs.split(",")]
    base = dict(shape, device=args.device, dtype="bfloat16" if cuda else "float32")
    t0 = time.perf_counter()
    paths = PATHS[:2] if args.quick else PATHS  # quick: the memory relation only
    # quick: in this process (one import of transformers instead of four); the peak then rests
    # on PeakMemory's polling, as in a worker, rather than on a fresh high-water mark
    measure = child if args.quick else run_child
    rows = [measure(dict(base, path=path, vocab=v)) for v in vocabs for path in paths]
    sweep, fits = [], []
    if not args.quick and not cuda:  # the CPU default: tokens/s against windows per pass
        for b in (1, 2, 4, 8, 16):
            sweep.append(run_child(dict(base, path="chunked", vocab=32000, windows=16, batch=b,
                                        repeat=1)))
    if cuda:  # the largest batch each path fits at the largest vocabulary, in fresh processes
        fits = [run_child(dict(base, path=path, vocab=vocabs[-1], mode="largest", batch=1,
                               cap=1024)) for path in paths]
    elif args.quick:  # the same search on CPU, under a 1 GiB address-space cap (a real failure)
        fits = [child(dict(base, path=path, vocab=vocabs[-1], mode="largest", batch=1, cap=64,
                           as_limit_mb=1024)) for path in paths]
    by = {(r["path"], r["vocab"]): r for r in rows}
    lo, hi = vocabs[0], vocabs[-1]
    figures = {f"{p}_mem_ratio": by[p, hi]["peak_mb"] / by[p, lo]["peak_mb"] for p in paths}
    if "plain" in paths:
        # on CPU per CPU-second: the suite's 2 cores are shared, so wall time swings with others'
        # jobs while the work each path does stays what it is; on a GPU, wall time
        rate = "tokens_per_s" if cuda else "tokens_per_cpu_s"
        figures["tps_vs_plain_min"] = min(by["chunked", v][rate] / by["plain", v][rate]
                                          for v in vocabs)
    figures["loss_rel_diff_max"] = max(abs(by["chunked", v]["loss"] - by[p, v]["loss"])
                                       / by[p, v]["loss"] for v in vocabs for p in paths[1:])
    for f in fits:
        figures[f"largest_{f['path']}"] = f["largest"]
    peak = args.peak_tflops or peak_tflops(rows[0]["device_name"])
    for r in rows:  # share of the peak dense bf16 rate (GPU only)
        r["peak_share"] = 2 * r["matmul_params"] * r["tokens_per_s"] / (peak * 1e12) if cuda and peak else None
    if cuda and peak:
        figures["peak_share_chunked_max"] = max(r["peak_share"] for r in rows if r["path"] == "chunked")
    table = ["| vocabulary | path | peak MiB | tokens/s | tokens per CPU-second | loss |"
             + (" share of peak bf16 |" if cuda else ""),
             "| --- | --- | --- | --- | --- | --- |" + (" --- |" if cuda else "")]
    for r in rows:
        share = "" if not cuda else (f" {r['peak_share']:.1%} |" if r["peak_share"] else " (unknown peak) |")
        table.append(f"| {r['vocab'] // 1000}k | {r['path']} | {r['peak_mb']:.0f} | "
                     f"{r['tokens_per_s']:.0f} | {r['tokens_per_cpu_s']:.0f} | {r['loss']:.6f} |"
                     + share)
    sweep_table = ["| windows per pass | tokens/s | tokens per CPU-second | peak MiB |",
                   "| --- | --- | --- | --- |"]
    for r in sweep:
        sweep_table.append(f"| {r['batch']} | {r['tokens_per_s']:.0f} | "
                           f"{r['tokens_per_cpu_s']:.0f} | {r['peak_mb']:.0f} |")
    fit_table = ["| path | largest batch that fits | first size that did not | `fit_batch` picks |",
                 "| --- | --- | --- | --- |"]
    for f in fits:
        failed = f["first_failing"] or f"none up to {f['cap']}"
        picked = "-" if f["fit_batch"] is None else f["fit_batch"]
        fit_table.append(f"| {f['path']} | {f['largest']} | {failed} | {picked} |")
    print("\n".join(table))
    if sweep:
        print("\n".join(sweep_table))
    if fits:
        print("\n".join(fit_table))
    print(f"({time.perf_counter() - t0:.0f} s)")
    if not args.quick and not cuda:
        write_section("Evaluation throughput", body(base, table, sweep_table, figures, rows))
    if cuda:  # the GPU section, printed to be pasted into BENCHMARKS.md
        print(gpu_body(base, table, fit_table, peak, rows, fits[0]["cap"]))
    print(headline(**figures))


def body(base: dict, table, sweep_table, figures, rows) -> str:
    s = base
    by = {(r["path"], r["vocab"]): r for r in rows}
    ratios = ", ".join(f"{v // 1000}k {by['chunked', v]['tokens_per_cpu_s'] / r['tokens_per_cpu_s']:.2f}"
                       for (p, v), r in by.items() if p == "plain")
    return f"""
`python benchmarks/eval_throughput.py` on {machine()}. Held-out loss of {s['windows']} windows of
{s['seq_len']} tokens, {s['batch']} windows per forward pass, on a Llama built from a config
(hidden {s['hidden']}, {s['layers']} layers, untied head, random weights, {s['dtype']}); only
the vocabulary changes. Each row runs in a fresh process: peak memory is the first evaluation's
growth above the memory in use when it began (the model excluded), tokens/s the median of
{s['repeat']} more. *chunked* is what `HeldoutLoss` does now (body once, then head and a running
log-sum-exp over slices of the vocabulary, 64 MiB of fp32 logits at a time on CPU); *full* is
what it did before (full logits, then an fp32 cross-entropy); *plain* is
`model(input_ids, labels=...).loss`.

{chr(10).join(table)}

Peak memory from the smallest to the largest vocabulary: chunked ×{figures['chunked_mem_ratio']:.2f},
full logits ×{figures['full_mem_ratio']:.2f}, plain loop ×{figures['plain_mem_ratio']:.2f}. Chunked
tokens per CPU-second ÷ plain loop's, by vocabulary: {ratios} (CPU
time, because the 2 cores were shared with other jobs: wall-clock tokens/s swung by up to 2x
between identical runs, the work done did not). Largest relative
difference of the chunked loss from the other two: {figures['loss_rel_diff_max']:.1e}.

Windows per pass for the chunked path at the 32k vocabulary (16 windows), the evidence for the
CPU default (`CPU_TOKENS_PER_PASS` = 4096 tokens, 8 windows of 512):

{chr(10).join(sweep_table)}

*GPU row: not measured.* No GPU was lent to the sessions that wrote this section. On a CUDA
machine, `python benchmarks/eval_throughput.py --device cuda` runs the same comparison in bf16
at a 1B-class shape (hidden 2048, 16 layers, 16 windows of 4096 tokens, 8 per pass), without Ray,
with each row's share of the device's peak bf16 FLOP rate and the largest batch each path fits
at 256k beside the batch `HeldoutLoss` picks; it prints that section, to be pasted here.
"""


def gpu_body(base: dict, table, fit_table, peak, rows, cap: int) -> str:
    s, name = base, rows[0]["device_name"]
    params = rows[0]["matmul_params"]
    return f"""
`python benchmarks/eval_throughput.py --device cuda` on one {name} (peak dense bf16
{peak or 'unknown'} TFLOP/s). Held-out loss of {s['windows']} windows of {s['seq_len']} tokens,
{s['batch']} windows per forward pass, on a Llama built from a config (hidden {s['hidden']},
{s['layers']} layers, untied head, random weights, bf16; {params / 1e9:.2f} B parameters that
multiply at the smallest vocabulary, head included); only the vocabulary changes. Peak memory is the first
evaluation's growth in `torch.cuda.max_memory_allocated`; tokens/s the median of {s['repeat']}
more; share of peak = 2 × those parameters × tokens/s ÷ the peak (attention's score products
not counted: a lower bound).

{chr(10).join(table)}

Largest batch of {s['seq_len']}-token windows one forward pass fits at the largest vocabulary
(doubling from 1 up to {cap}, then bisecting to within 1/8; each in a fresh process), beside the
batch `HeldoutLoss` picks from two measured passes (`fit_batch`, {GPU_SHARE:.0%} of free memory):

{chr(10).join(fit_table)}
"""


if __name__ == "__main__":
    main()
