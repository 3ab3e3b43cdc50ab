"""The merge arithmetic, pure torch: Θ̃(λ) = λ·Θ(t) + (1-λ)·Θ(t-1), written in place.

`torch.lerp(earlier, later, λ)` on two bf16/fp16 tensors computes in fp32 and rounds once to the
tensors' dtype, at about memory-copy speed (measured on CPU; CUDA's lerp kernel also computes in
fp32 "opmath"). Separate bf16 multiply-adds (`λ*b + (1-λ)*a`) round three times and differ from
the exact result on 10-20 % of elements of checkpoint-like data, so they are never used here.
"""

from __future__ import annotations

from typing import Dict, Mapping, Sequence

import torch


def lerp_into_(
    dst: torch.Tensor, earlier: torch.Tensor, later: torch.Tensor, lam: float
) -> torch.Tensor:
    """Write λ·later + (1-λ)·earlier into `dst` with one rounding to `dst.dtype`.

    Non-float tensors (integer buffers) are copied from `later`; the store checked that both
    checkpoints hold the same values. Inputs on another device are moved to `dst.device` first.
    """
    with torch.no_grad():
        if not dst.is_floating_point():
            dst.copy_(later)
            return dst
        if earlier.device != dst.device:
            earlier = earlier.to(dst.device, non_blocking=True)
            later = later.to(dst.device, non_blocking=True)
        if earlier.dtype == later.dtype == dst.dtype:
            # Fused: fp32 arithmetic inside the kernel, one rounding on the store to dst.
            torch.lerp(earlier, later, float(lam), out=dst)
        elif earlier.dtype == later.dtype:
            # A model tensor in another dtype than the checkpoints' (transformers casts e.g. the
            # fp32 norms of a bf16 checkpoint to bf16 on load): the merge as the checkpoint's
            # dtype holds it (what an export writes), then cast as from_pretrained casts it.
            dst.copy_(torch.lerp(earlier, later, float(lam)))
        else:
            # Inputs of two dtypes: compute in fp32, round once on the copy into dst.
            dst.copy_(torch.lerp(earlier.float(), later.float(), float(lam)))
    return dst


def merged(earlier: torch.Tensor, later: torch.Tensor, lam: float) -> torch.Tensor:
    """A new tensor holding the merge of two same-shape tensors, in their dtype."""
    out = torch.empty_like(later)
    return lerp_into_(out, earlier, later, lam)


def merge_shard_into_(
    params: Mapping[str, torch.Tensor],
    earlier: Mapping[str, torch.Tensor],
    later: Mapping[str, torch.Tensor],
    lam: float,
    done: set | None = None,
) -> int:
    """Merge one shard's tensors into the model tensors of the same names; returns bytes written.

    `done` collects the storage pointers already written, so a tied weight (one tensor under two
    names) is merged once. The common case (same dtype and device) calls the fused lerp directly:
    the per-tensor Python overhead of `lerp_into_` (its checks and a `no_grad` per call, ~15 µs)
    was 15 % of a 14M-parameter merge on CPU and most of a 134M one on a GPU.
    """
    written = 0
    lam = float(lam)
    with torch.no_grad():
        for name, b in later.items():
            dst = params[name]
            if done is not None:
                key = dst.data_ptr()
                if key in done:
                    continue
                done.add(key)
            a = earlier[name]
            if a.dtype == b.dtype == dst.dtype and dst.is_floating_point() and a.device == dst.device:
                torch.lerp(a, b, lam, out=dst)
            else:
                lerp_into_(dst, a, b, lam)
            written += dst.numel() * dst.element_size()
    return written


def merge_buffers_into_(
    dst: Mapping[str, torch.Tensor],
    earlier: Mapping[str, torch.Tensor],
    later: Mapping[str, torch.Tensor],
    lam: float,
) -> int:
    """Merge flat buffers (one per dtype, the same layout on all three sides) with one lerp per
    buffer; returns bytes written. Integer buffers are copied from `later`."""
    written = 0
    for dtype, d in dst.items():
        if d.shape != later[dtype].shape:
            raise ValueError(f"{dtype} buffer of {d.numel()} elements, stored shard has "
                             f"{later[dtype].numel()}: layouts differ")
        lerp_into_(d, earlier[dtype], later[dtype], lam)
        written += d.numel() * d.element_size()
    return written


def merge_state_dicts(
    earlier: Mapping[str, torch.Tensor], later: Mapping[str, torch.Tensor], lam: float
) -> Dict[str, torch.Tensor]:
    """Merged copies of two whole state dicts (for export and reference checks, not for trials)."""
    return {name: merged(earlier[name], later[name], lam) for name in later}


def weighted_sum_into_(
    dst: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float]
) -> torch.Tensor:
    """Write Σ wᵢ·tensorsᵢ into `dst` with one rounding to `dst.dtype` (merges of N checkpoints).

    Two tensors whose weights sum to 1 take the fused lerp above (as a pair's trials do, so a
    pair scores the same wherever it is merged). Otherwise the sum is taken in fp64 (one
    temporaries the size of this tensor) and rounded once on the copy into `dst`: the result is
    the fp64 formula rounded once, for fp32 as for bf16 checkpoints (an fp32 sum would round at
    every term: off by an ulp on ~0.15 % of bf16 elements, more for fp32). The merge of a window
    is not a trial's hot path (the pair's lerp is), so the wider temporary costs little.
    Non-float tensors are copied from the last tensor (the store checked they are all equal).
    """
    if len(tensors) != len(weights) or not tensors:
        raise ValueError(f"need one weight per tensor, got {len(weights)} for {len(tensors)}")
    with torch.no_grad():
        if not dst.is_floating_point():
            dst.copy_(tensors[-1])
            return dst
        if len(tensors) == 2 and abs(weights[0] + weights[1] - 1.0) < 1e-12:
            return lerp_into_(dst, tensors[0], tensors[1], weights[1])
        acc = None
        for t, w in zip(tensors, weights):
            if w == 0.0:
                continue
            term = t.to(dst.device, torch.float64, non_blocking=True) * float(w)
            # Product, then sum, in checkpoint order (no fused multiply-add): bit for bit the
            # fp64 formula Σ wᵢ·θᵢ as written, also where terms cancel.
            acc = term if acc is None else acc.add_(term)
        if acc is None:
            dst.zero_()
        else:
            dst.copy_(acc)
    return dst


def weighted_state_dict(
    shards: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> Dict[str, torch.Tensor]:
    """Merged copies Σ wᵢ·shardsᵢ of whole state dicts, in their dtype (for export)."""
    used = [(s, w) for s, w in zip(shards, weights) if w != 0.0]
    return {name: weighted_sum_into_(torch.empty_like(t), [s[name] for s, _ in used],
                                     [w for _, w in used])
            for name, t in shards[-1].items()}


def weighted_merge_shard_into_(
    params: Mapping[str, torch.Tensor],
    shards: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    done: set | None = None,
) -> int:
    """`merge_shard_into_` for N checkpoints: Σ wᵢ·shardᵢ into the model tensors of the same
    names; returns bytes written. `done` skips tied weights already written."""
    written = 0
    for name in shards[-1]:
        dst = params[name]
        key = dst.data_ptr()
        if done is not None:
            if key in done:
                continue
            done.add(key)
        weighted_sum_into_(dst, [s[name] for s in shards], weights)
        written += dst.numel() * dst.element_size()
    return written
