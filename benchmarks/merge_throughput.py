"""Merge throughput against the machine's memory bandwidth (issue 7, benchmark 1).

For Llama-shaped checkpoint pairs of ~14 M, ~134 M and ~953 M parameters, in fp32 and bf16,
times the product's in-place merge from object-store shards into a resident model (the trial
path: `ray.get` of the shard pairs, zero-copy views, `torch.lerp(..., out=param)`), and in the
same run a plain `copy_` of one tensor as large as the model. Both are counted as bytes read plus
bytes written: a merge reads two copies and writes one (3 × model bytes), a copy reads one and
writes one (2 × model bytes). The ratio (merge bytes/s) ÷ (copy bytes/s) is the headline; the
target is ≥ 0.8 on CPU.

    python benchmarks/merge_throughput.py            # all sizes that fit; writes BENCHMARKS.md
    python benchmarks/merge_throughput.py --quick    # 14M only, prints, writes nothing
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SIZES, headline, machine, make_pair, median_time, numel, write_section  # noqa: E402


def bench_one(root: Path, size: str, dtype: str, repeat: int) -> dict:

    from ckmerge_ray.checkpoints import load_checkpoint_info, plan_shards
    from ckmerge_ray.store import put_checkpoint
    from ckmerge_ray.trial import TrialPlan, merge_into_model, new_resident

    earlier_dir, later_dir = make_pair(root, size, dtype)
    a, b = load_checkpoint_info(earlier_dir), load_checkpoint_info(later_dir)
    plan = plan_shards(b, 1 << 30)
    ref = {}
    stored = [put_checkpoint(i, plan, reference=ref) for i in (a, b)]
    dtypes = {n: str(s.dtype).replace("torch.", "") for n, s in b.specs.items()}
    trial_plan = TrialPlan("bench", b.config, dtypes, stored[0], stored[1], objective=None)
    nbytes = b.nbytes
    # The model and the shard views as a trial worker holds them (flat layout where possible).
    resident = new_resident(trial_plan, "cpu")
    tensors = resident.tensors
    n = nbytes // torch.empty((), dtype=getattr(torch, dtype)).element_size()
    src = torch.empty(n, dtype=getattr(torch, dtype)).normal_()
    dst = torch.empty_like(src)
    # Merge and copy alternate, each ratio from a back-to-back pair: a shared machine's memory
    # bandwidth drifts by tens of percent between seconds, which timing all merges and then all
    # copies turns into a ratio error of the same size.
    merges, copies, ratios = [], [], []
    for _ in range(repeat):
        m = median_time(lambda: merge_into_model(trial_plan, tensors, 0.6180339, cache=resident), 1)
        c = median_time(lambda: dst.copy_(src), 1)
        merges.append(m)
        copies.append(c)
        ratios.append((3 * nbytes / m) / (2 * nbytes / c))
    del src, dst, tensors, resident
    stored.clear()  # dropping the last references frees the objects
    merge_s, copy_s = statistics.median(merges), statistics.median(copies)
    return {
        "size": size, "dtype": dtype, "params": sum(numel(s.shape) for s in b.specs.values()),
        "model_MB": nbytes / 1e6, "shards": len(plan), "merge_ms": merge_s * 1e3,
        "copy_ms": copy_s * 1e3, "merge_GBps": 3 * nbytes / merge_s / 1e9,
        "copy_GBps": 2 * nbytes / copy_s / 1e9, "ratio": statistics.median(ratios),
        "ratio_iqr": statistics.quantiles(ratios, n=4)[::2] if len(ratios) > 1 else [ratios[0]] * 2,
    }


def bench_gpu(root: Path, size: str, repeat: int) -> dict:
    """GPU path (issue 7, benchmark 5): merge on the device from pinned host shards.

    Reports the on-device lerp against a device-to-device copy of the same bytes, and the
    host-to-device transfer a trial pays when its shards live in (pinned) host memory.
    """
    from ckmerge_ray.checkpoints import load_checkpoint_info

    earlier_dir, later_dir = make_pair(root, size, "bfloat16")
    a, b = load_checkpoint_info(earlier_dir), load_checkpoint_info(later_dir)
    names = list(b.specs)
    ha = {k: v.pin_memory() for k, v in a.read_tensors(names).items()}
    hb = {k: v.pin_memory() for k, v in b.read_tensors(names).items()}
    dev = torch.device("cuda")
    da = {k: v.to(dev) for k, v in ha.items()}
    db = {k: v.to(dev) for k, v in hb.items()}
    out = {k: torch.empty_like(v) for k, v in db.items()}

    def timed(fn):
        def run():
            fn()
            torch.cuda.synchronize()
        return median_time(run, repeat)

    lerp_s = timed(lambda: [torch.lerp(da[k], db[k], 0.618, out=out[k]) for k in names])
    copy_s = timed(lambda: [out[k].copy_(db[k]) for k in names])
    h2d_s = timed(lambda: [(da[k].copy_(ha[k], non_blocking=True), db[k].copy_(hb[k], non_blocking=True)) for k in names])
    def ulps(k):
        want = (0.618 * db[k].double() + 0.382 * da[k].double()).to(torch.bfloat16)
        return int((out[k].view(torch.int16).int() - want.view(torch.int16).int()).abs().max())

    exact = all(ulps(k) <= 1 for k in names[:8])
    nbytes = b.nbytes
    return {"size": size, "model_MB": nbytes / 1e6, "lerp_ms": lerp_s * 1e3,
            "ratio": (3 * nbytes / lerp_s) / (2 * nbytes / copy_s), "h2d_ms": h2d_s * 1e3,
            "h2d_GBps": 2 * nbytes / h2d_s / 1e9, "within_one_rounding": exact,
            "device": torch.cuda.get_device_name()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeat", type=int, default=11)
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "ckmerge-bench")
    args = p.parse_args(argv)
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
    store_bytes = ray.cluster_resources().get("object_store_memory", 0)
    sizes = ["14M"] if args.quick else list(SIZES)
    rows, skipped = [], []
    for size in sizes:
        for dtype in ("float32", "bfloat16"):
            est = _estimate_bytes(size, dtype)
            if 2 * est > 0.8 * store_bytes or 5 * est > psutil.virtual_memory().available:
                skipped.append(f"{size} {dtype} ({est / 1e9:.1f} GB per checkpoint: two do not fit "
                               f"in the {store_bytes / 1e9:.1f} GB object store or in free RAM)")
                continue
            row = bench_one(args.cache, size, dtype, args.repeat if not args.quick else 3)
            rows.append(row)
            print(f"{size:>5} {dtype:>8}: merge {row['merge_ms']:.1f} ms = {row['merge_GBps']:.1f} GB/s, "
                  f"copy {row['copy_GBps']:.1f} GB/s, ratio {row['ratio']:.2f}", flush=True)
    ray.shutdown()
    gpu_line = "GPU: skipped (no CUDA device on this machine)."
    if torch.cuda.is_available():
        g = bench_gpu(args.cache, "14M" if args.quick else "134M", args.repeat)
        gpu_line = (f"GPU ({g['device']}), {g['size']} bf16: on-device lerp {g['lerp_ms']:.2f} ms, "
                    f"ratio vs device copy {g['ratio']:.2f}; host-to-device of both checkpoints "
                    f"from pinned memory {g['h2d_ms']:.1f} ms ({g['h2d_GBps']:.1f} GB/s) per trial; "
                    f"result within one bf16 rounding of the exact formula: {g['within_one_rounding']}.")
    print(gpu_line)
    table = ["| size | dtype | params | MB | shards | merge ms | merge GB/s | copy GB/s | ratio (median of pairs) | ratio IQR |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['size']} | {r['dtype']} | {r['params'] / 1e6:.1f} M | {r['model_MB']:.0f} | "
                     f"{r['shards']} | {r['merge_ms']:.1f} | {r['merge_GBps']:.1f} | {r['copy_GBps']:.1f} | "
                     f"{r['ratio']:.2f} | {r['ratio_iqr'][0]:.2f}–{r['ratio_iqr'][1]:.2f} |")
    body = (f"Command: `python benchmarks/merge_throughput.py`. Machine: {machine()}.\n\n"
            "Merge: in-place merge from object-store shards into a resident model; bytes = 3 × "
            "model bytes. Copy: `dst.copy_(src)` of one tensor as large as the model; bytes = 2 × "
            f"model bytes. {args.repeat} merge/copy pairs, alternating; ratio = merge GB/s ÷ copy "
            "GB/s of each back-to-back pair, median and interquartile range over pairs (target "
            "≥ 0.8); times are medians.\n\n"
            + "\n".join(table) + ("\n\nSkipped: " + "; ".join(skipped) if skipped else "")
            + "\n\n" + gpu_line)
    print("\n".join(table))
    if not args.quick:
        write_section("Merge throughput vs memory bandwidth", body)
    worst = min(r["ratio"] for r in rows)
    print(headline(merge_bw_ratio_min=worst, merge_bw_ratio_bf16=_pick(rows, "bfloat16"),
                   merge_bw_ratio_fp32=_pick(rows, "float32")))
    return 0


def _pick(rows, dtype):
    vals = [r["ratio"] for r in rows if r["dtype"] == dtype]
    return vals[-1] if vals else float("nan")


def _estimate_bytes(size: str, dtype: str) -> int:
    c = SIZES[size]
    h, i, L, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    params = 2 * v * h + L * (4 * h * h + 3 * h * i + 2 * h) + h
    return params * (4 if dtype == "float32" else 2)


if __name__ == "__main__":
    sys.exit(main())
