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

It needs torch and transformers only (no Ray), so it also runs on a GPU machine:

    python benchmarks/eval_throughput.py                 # CPU, fp32; writes BENCHMARKS.md
    python benchmarks/eval_throughput.py --device cuda   # bf16, larger shape; prints only
    python benchmarks/eval_throughput.py --quick         # chunked vs full, 128k and 256k; prints
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

PATHS = ("chunked", "full", "plain")


def child(spec: dict) -> dict:
    """One (path, vocabulary) measurement, in this process: peak memory of the first evaluation,
    then the median tokens/s of `repeat` more."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ckmerge_ray.objectives.batching import PeakMemory, Stopwatch
    from ckmerge_ray.objectives.chunked import chunk_bytes, chunked_nll, full_logits_nll, split_model

    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    torch.manual_seed(0)
    h = spec["hidden"]
    cfg = LlamaConfig(vocab_size=spec["vocab"], hidden_size=h, intermediate_size=4 * h,
                      num_hidden_layers=spec["layers"], num_attention_heads=max(1, h // 64),
                      max_position_embeddings=spec["seq_len"], tie_word_embeddings=False)
    with device:
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    gen = torch.Generator().manual_seed(1)
    windows = torch.randint(0, spec["vocab"], (spec["windows"], spec["seq_len"]), generator=gen)
    batch, path = spec["batch"], spec["path"]
    split = chunk = None
    if path == "chunked":
        with torch.inference_mode():
            split, why = split_model(model, windows[:1].to(device))
        assert split is not None, why
        chunk = chunk_bytes(device.type)

    def evaluate() -> float:
        total = 0.0
        with torch.inference_mode():
            for start in range(0, len(windows), batch):
                ids = windows[start:start + batch].to(device)
                if path == "chunked":
                    total += float(chunked_nll(split, ids, chunk))
                elif path == "full":
                    total += float(full_logits_nll(model, ids))
                else:
                    total += float(model(input_ids=ids, labels=ids).loss) * ids[:, 1:].numel()
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
            "tokens_per_cpu_s": tokens / statistics.median(cpu)}


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
    sweep = []
    if not args.quick and not cuda:  # the CPU default: tokens/s against windows per pass
        for b in (1, 2, 4, 8, 16):
            sweep.append(run_child(dict(base, path="chunked", vocab=32000, windows=16, batch=b,
                                        repeat=1)))
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
    table = ["| vocabulary | path | peak MiB | tokens/s | tokens per CPU-second | loss |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        table.append(f"| {r['vocab'] // 1000}k | {r['path']} | {r['peak_mb']:.0f} | "
                     f"{r['tokens_per_s']:.0f} | {r['tokens_per_cpu_s']:.0f} | {r['loss']:.6f} |")
    sweep_table = ["| windows per pass | tokens/s | tokens per CPU-second | peak MiB |",
                   "| --- | --- | --- | --- |"]
    for r in sweep:
        sweep_table.append(f"| {r['batch']} | {r['tokens_per_s']:.0f} | "
                           f"{r['tokens_per_cpu_s']:.0f} | {r['peak_mb']:.0f} |")
    print("\n".join(table))
    if sweep:
        print("\n".join(sweep_table))
    print(f"({time.perf_counter() - t0:.0f} s)")
    if not args.quick and not cuda:
        write_section("Evaluation throughput", body(base, table, sweep_table, figures, rows))
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

*GPU row: not measured.* No GPU was lent to the session that wrote this section. On a CUDA
machine, `python benchmarks/eval_throughput.py --device cuda` runs the same comparison in bf16
at a 1B-class shape (hidden 2048, 16 layers, 16 windows of 4096 tokens, 8 per pass), without Ray,
and prints the table; paste it here.
"""


if __name__ == "__main__":
    main()
