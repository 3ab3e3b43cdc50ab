"""GPU path (issue 7, benchmark 5): the product's merge on a CUDA device, without Ray.

For Llama shapes from 134M to 6.7B parameters (bf16; sizes that do not fit are skipped), times
`merge.merge_shard_into_` writing into model tensors on the GPU:

- on-device: both checkpoints already on the GPU; ratio against a device-to-device copy of one
  tensor as large as the model (merge moves 3 × model bytes, the copy 2 ×); per tensor
  (`merge_shard_into_`) and in the flat layout trials use (`merge_buffers_into_`: the shard's
  tensors end to end in one buffer, one lerp; see `store.pack_shard`, `model.adopt_flat_layout`);
- from pinned host memory, and from pageable host memory (what a trial reads from Ray's object
  store: shared memory, not pinned): the merge then includes the host-to-device transfer of both
  checkpoints, which is what a GPU trial pays per λ today;
- exactness: the result against the fp64 formula rounded once to bf16.

It needs only torch (and transformers for the shapes), so it runs on a GPU machine without Ray.
Weights are random (the merge's speed does not depend on the values), made on the GPU.

    python benchmarks/gpu_merge.py              # prints a table and key=value figures
    python benchmarks/gpu_merge.py --quick      # 134M only; skips cleanly without CUDA
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import SIZES, headline, machine, numel  # noqa: E402

SHAPES = {**SIZES, "6.7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)}


def llama_shapes(size: str) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[size], tie_word_embeddings=False)
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in LlamaForCausalLM(cfg).state_dict().items()}


def cuda_time(fn, repeat: int) -> float:
    """Median seconds of fn() over `repeat` runs, after one warm-up, timed with CUDA events."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def bench(size: str, repeat: int) -> dict:
    from ckmerge_ray.merge import merge_buffers_into_, merge_shard_into_

    shapes = llama_shapes(size)
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    da = {k: (torch.randn(s, device=dev, generator=g) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    db = {k: (v.float() + torch.randn(v.shape, device=dev, generator=g) * 5e-4).to(torch.bfloat16)
          for k, v in da.items()}
    dst = {k: torch.empty_like(v) for k, v in db.items()}
    nbytes = sum(v.numel() * v.element_size() for v in db.values())
    lam = 0.6180339

    on_device = cuda_time(lambda: merge_shard_into_(dst, da, db, lam), repeat)
    # The flat layout (one buffer per shard; here one shard), built on the device directly: the
    # store's packing code imports Ray, which this machine may lack.
    flat_a = {"bfloat16": torch.cat([v.reshape(-1) for v in da.values()])}
    flat_b = {"bfloat16": torch.cat([v.reshape(-1) for v in db.values()])}
    flat_dst = {"bfloat16": torch.empty_like(flat_b["bfloat16"])}
    flat = cuda_time(lambda: merge_buffers_into_(flat_dst, flat_a, flat_b, lam), repeat)
    flat_a = flat_b = flat_dst = None
    flat_src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=dev)
    flat_dst = torch.empty_like(flat_src)
    copy = cuda_time(lambda: flat_dst.copy_(flat_src), repeat)
    flat_src = flat_dst = None

    exact_ok = True
    for k in list(shapes)[:12]:
        want = (lam * db[k].double() + (1 - lam) * da[k].double()).to(torch.bfloat16)
        diff = (dst[k].view(torch.int16).int() - want.view(torch.int16).int()).abs().max()
        exact_ok &= int(diff) <= 1

    pinned_a = {k: v.cpu().pin_memory() for k, v in da.items()}
    pinned_b = {k: v.cpu().pin_memory() for k, v in db.items()}
    from_pinned = cuda_time(lambda: merge_shard_into_(dst, pinned_a, pinned_b, lam), max(3, repeat // 2))
    pinned_a = pinned_b = None  # free the pinned copies (not `del`: the lambdas above close over them)
    pageable_a = {k: v.cpu() for k, v in da.items()}
    pageable_b = {k: v.cpu() for k, v in db.items()}
    da = db = None  # free the device copies
    torch.cuda.empty_cache()
    from_pageable = cuda_time(lambda: merge_shard_into_(dst, pageable_a, pageable_b, lam), max(3, repeat // 2))
    return {
        "size": size, "params": sum(numel(s) for s in shapes.values()), "model_GB": nbytes / 1e9,
        "on_device_ms": on_device * 1e3, "copy_ms": copy * 1e3,
        "ratio": (3 * nbytes / on_device) / (2 * nbytes / copy),
        "flat_ms": flat * 1e3, "flat_ratio": (3 * nbytes / flat) / (2 * nbytes / copy),
        "merge_GBps": 3 * nbytes / on_device / 1e9, "copy_GBps": 2 * nbytes / copy / 1e9,
        "from_pinned_ms": from_pinned * 1e3, "pinned_h2d_GBps": 2 * nbytes / from_pinned / 1e9,
        "from_pageable_ms": from_pageable * 1e3,
        "pageable_h2d_GBps": 2 * nbytes / from_pageable / 1e9,
        "within_one_rounding": bool(exact_ok),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeat", type=int, default=11)
    p.add_argument("--sizes", default=None, help="comma list from " + ",".join(SHAPES))
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("GPU: skipped (no CUDA device on this machine).")
        print(headline(gpu="skipped"))
        return 0
    sizes = args.sizes.split(",") if args.sizes else (["134M"] if args.quick else list(SHAPES))
    free, _ = torch.cuda.mem_get_info()
    rows, skipped = [], []
    for size in sizes:
        need = 4.2 * 2 * sum(numel(s) for s in llama_shapes(size).values())  # a, b, dst, flat, copy
        if need > 0.9 * free:
            skipped.append(f"{size} (needs about {need / 1e9:.0f} GB of GPU memory)")
            continue
        rows.append(bench(size, 3 if args.quick else args.repeat))
        print(json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache()
    name = torch.cuda.get_device_name()
    table = ["| size | GB (bf16) | on-device merge ms, per tensor | merge GB/s | D2D copy GB/s | ratio | "
             "flat layout ms | flat ratio | from pinned host ms (GB/s H2D) | "
             "from pageable host ms (GB/s H2D) | within one rounding |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['size']} | {r['model_GB']:.2f} | {r['on_device_ms']:.2f} | "
                     f"{r['merge_GBps']:.0f} | {r['copy_GBps']:.0f} | {r['ratio']:.2f} | "
                     f"{r['flat_ms']:.2f} | {r['flat_ratio']:.2f} | "
                     f"{r['from_pinned_ms']:.1f} ({r['pinned_h2d_GBps']:.1f}) | "
                     f"{r['from_pageable_ms']:.1f} ({r['pageable_h2d_GBps']:.1f}) | "
                     f"{r['within_one_rounding']} |")
    print(f"Command: `python benchmarks/gpu_merge.py`. GPU: {name}; host: {machine()}; "
          f"torch {torch.__version__}.")
    print("\n".join(table) + ("\n\nSkipped: " + "; ".join(skipped) if skipped else ""))
    if args.json:
        args.json.write_text(json.dumps({"device": name, "torch": torch.__version__, "rows": rows,
                                         "skipped": skipped}, indent=1))
    print(headline(gpu_merge_bw_ratio_min=min(r["ratio"] for r in rows),
                   gpu_flat_ratio_min=min(r["flat_ratio"] for r in rows),
                   gpu_from_pageable_ms_max=max(r["from_pageable_ms"] for r in rows),
                   within_one_rounding_all=int(all(r["within_one_rounding"] for r in rows))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
