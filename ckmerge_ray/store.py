"""Put checkpoint shards into the Ray object store once; read them back zero-copy.

Each shard is one object: ``{"buffers": {dtype: np.ndarray}, "layout": {name: (dtype, offset,
shape)}}``: the shard's tensors of one dtype lie end to end in one flat buffer, each at a
64-byte-aligned offset. We store numpy arrays, not torch tensors, because Ray deserializes numpy
arrays as read-only views of the node's shared memory (zero-copy), while torch tensors are
pickled and copied on every `ray.get`. Numpy has no bfloat16, so bf16 tensors are stored as their
int16 bit pattern and reinterpreted with `Tensor.view(torch.bfloat16)` on read: no conversion, no
copy. Flat buffers let a worker whose model tensors share the same layout merge a whole shard
with one `torch.lerp` per dtype instead of one per tensor (see `trial.adopt_flat_layout`).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import ray
import torch

from ckmerge_ray.checkpoints import CheckpointInfo, iter_plan
from ckmerge_ray.errors import CheckpointError

# torch dtypes numpy lacks, stored as an integer view of the same width.
_BIT_VIEWS = {torch.bfloat16: torch.int16}

# Offsets of tensors in a flat buffer are multiples of this many bytes (vector loads stay aligned).
ALIGN_BYTES = 64

Layout = Dict[str, Tuple[str, int, Tuple[int, ...]]]  # name -> (dtype, offset in elements, shape)


@dataclass
class StoredCheckpoint:
    """Object-store references to one checkpoint's shards; what trials receive instead of paths."""

    source: str  # the directory it was read from, for messages only
    refs: List[ray.ObjectRef]
    names: List[List[str]]  # tensor names per shard, same order as refs
    nbytes: List[int]  # bytes per shard

    @property
    def total_bytes(self) -> int:
        return sum(self.nbytes)

    @property
    def object_ids(self) -> List[str]:
        return [ref.hex() for ref in self.refs]


def pair_digest(earlier: StoredCheckpoint, later: StoredCheckpoint) -> str:
    """A short digest of a pair's object IDs: equal digests mean the same stored objects (what
    each trial reports as ``store_digest``)."""
    import hashlib

    ids = ",".join(earlier.object_ids + later.object_ids)
    return hashlib.sha1(ids.encode()).hexdigest()[:16]


def tensor_to_numpy(t: torch.Tensor) -> np.ndarray:
    """A numpy array sharing the tensor's bytes (bf16 as its int16 bit pattern)."""
    t = t.detach().cpu().contiguous()
    if t.dtype in _BIT_VIEWS:
        t = t.view(_BIT_VIEWS[t.dtype])
    return t.numpy()


def numpy_to_tensor(a: np.ndarray, dtype: str) -> torch.Tensor:
    """A torch view of an object-store array (read-only memory: never write through it)."""
    with warnings.catch_warnings():
        # Ray hands out read-only views of shared memory; torch warns that it cannot protect
        # them. We only ever read these tensors.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        t = torch.from_numpy(a)
    target = getattr(torch, dtype)
    return t.view(target) if t.dtype != target else t


def put_checkpoint(
    info: CheckpointInfo,
    plan: List[List[str]],
    check_finite: bool = True,
    reference: Optional[Dict[str, torch.Tensor]] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> StoredCheckpoint:
    """Read a checkpoint shard by shard (once) and put each shard into the object store.

    Args:
        info: the checkpoint, already validated.
        plan: tensor names per shard (see `checkpoints.plan_shards`).
        check_finite: refuse a checkpoint with NaN or inf in a float tensor.
        reference: non-float tensors of the other checkpoint; each must be equal here, because
            integer buffers cannot be interpolated. Filled in when given empty.
        progress: called with one line per shard.

    Raises CheckpointError when a float tensor holds NaN/inf, a non-float tensor differs from
    `reference`, or a file of the checkpoint changed since it was validated (checked before the
    first read and after the last, so no stored checkpoint mixes old and new bytes).
    """
    info.check_unchanged("before it was stored")
    tied = {n: g[0] for g in info.tied for n in g}
    first_of: Dict[str, tuple] = {}  # group -> (name, tensor) first seen
    refs, nbytes = [], []
    start = time.perf_counter()
    total = sum(info.specs[n].nbytes for names in plan for n in names)
    done = 0
    for i, tensors in enumerate(iter_plan(info, plan)):
        for name, t in tensors.items():
            if name in tied:
                check_tied(info, name, t, tied[name], first_of)
            if t.is_floating_point():
                if check_finite and not bool(torch.isfinite(t).all()):
                    raise CheckpointError(f"tensor {name!r} in {info.path} contains NaN or inf")
            elif reference is not None:
                if name not in reference:
                    reference[name] = t.clone()
                elif not torch.equal(reference[name], t):
                    raise CheckpointError(
                        f"non-float tensor {name!r} differs between the checkpoints; only float "
                        "tensors can be merged"
                    )
        refs.append(ray.put(pack_shard(tensors)))
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        nbytes.append(size)
        done += size
        if progress:
            elapsed = time.perf_counter() - start
            eta = elapsed / done * (total - done) if done else 0.0
            progress(
                f"stored shard {i + 1}/{len(plan)} of {info.name}: {done / 2**20:.1f}/"
                f"{total / 2**20:.1f} MiB, {elapsed:.1f}s elapsed, ETA {eta:.1f}s"
            )
    info.check_unchanged("while it was being stored")  # else shards could mix old and new bytes
    return StoredCheckpoint(str(info.path), refs, [list(n) for n in plan], nbytes)


def check_tied(info: CheckpointInfo, name: str, t: torch.Tensor, group: str,
               first_of: Dict[str, tuple]) -> None:
    """Tensors the model ties (one parameter under two names) must be equal in the checkpoint.
    Raises CheckpointError naming both and the config field to change."""
    if group not in first_of:
        first_of[group] = (name, t.clone())
        return
    other, first = first_of[group]
    if not torch.equal(first, t):
        raise CheckpointError(
            f"{other!r} and {name!r} in {info.path} differ, but {info.model_dir / 'config.json'} "
            "ties them (tie_word_embeddings or the architecture's tied weights), so the model "
            "would keep only one: use a config.json with tie_word_embeddings: false for a "
            "separately trained output head")


def pack_shard(tensors: Dict[str, torch.Tensor]) -> Dict:
    """The object-store form of a shard: one flat buffer per dtype, and where each tensor lies.

    Costs one copy of the shard while it is put (the put copies it into the store anyway).
    Alignment padding is zero-filled.
    """
    layout: Layout = {}
    sizes: Dict[str, int] = {}
    for name, t in tensors.items():
        dtype = _dtype_name(t.dtype)
        align = max(1, ALIGN_BYTES // t.element_size())
        offset = -(-sizes.get(dtype, 0) // align) * align
        layout[name] = (dtype, offset, tuple(t.shape))
        sizes[dtype] = offset + t.numel()
    flats = {dtype: torch.zeros(n, dtype=getattr(torch, dtype)) for dtype, n in sizes.items()}
    for name, t in tensors.items():
        dtype, offset, _ = layout[name]
        flats[dtype][offset:offset + t.numel()].copy_(t.reshape(-1))
    return {"buffers": {d: tensor_to_numpy(f) for d, f in flats.items()}, "layout": layout}


@dataclass
class ShardView:
    """A fetched shard as torch tensors: the flat buffer per dtype, and a view per tensor into
    it (both read-only views of the object store's memory on the node, or device copies)."""

    buffers: Dict[str, torch.Tensor]
    layout: Layout

    def __post_init__(self):
        self.tensors: Dict[str, torch.Tensor] = {
            name: self.buffers[dtype][offset:offset + _numel(shape)].view(shape)
            for name, (dtype, offset, shape) in self.layout.items()
        }

    def to(self, device: torch.device | str) -> "ShardView":
        """A copy on `device` (one copy per buffer)."""
        return ShardView({d: b.to(device) for d, b in self.buffers.items()}, self.layout)


def shard_view(shard: Dict) -> ShardView:
    """Torch views of a fetched shard (zero-copy)."""
    return ShardView({d: numpy_to_tensor(a, d) for d, a in shard["buffers"].items()},
                     shard["layout"])


def get_shard(ref: ray.ObjectRef) -> Dict[str, torch.Tensor]:
    """Fetch one shard as torch tensors viewing the object store's memory (zero-copy on a node)."""
    return shard_tensors(ray.get(ref))


def shard_tensors(shard: Dict) -> Dict[str, torch.Tensor]:
    """Torch views of a fetched shard's tensors, by name."""
    return shard_view(shard).tensors


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _numel(shape: Tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
