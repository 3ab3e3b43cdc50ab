"""Put checkpoint shards into the Ray object store once; read them back zero-copy.

Each shard is one object: ``{"tensors": {name: np.ndarray}, "dtypes": {name: str}}``. We store
numpy arrays, not torch tensors, because Ray deserializes numpy arrays as read-only views of the
node's shared memory (zero-copy), while torch tensors are pickled and copied on every `ray.get`.
Numpy has no bfloat16, so bf16 tensors are stored as their int16 bit pattern and reinterpreted
with `Tensor.view(torch.bfloat16)` on read: no conversion, no copy.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np
import ray
import torch

from ckmerge_ray.checkpoints import CheckpointInfo, iter_plan
from ckmerge_ray.errors import CheckpointError

# torch dtypes numpy lacks, stored as an integer view of the same width.
_BIT_VIEWS = {torch.bfloat16: torch.int16}


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
    """
    refs, nbytes = [], []
    start = time.perf_counter()
    total = sum(info.specs[n].nbytes for names in plan for n in names)
    done = 0
    for i, tensors in enumerate(iter_plan(info, plan)):
        for name, t in tensors.items():
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
        shard = {
            "tensors": {name: tensor_to_numpy(t) for name, t in tensors.items()},
            "dtypes": {name: str(t.dtype).replace("torch.", "") for name, t in tensors.items()},
        }
        refs.append(ray.put(shard))
        size = sum(a.nbytes for a in shard["tensors"].values())
        nbytes.append(size)
        done += size
        if progress:
            elapsed = time.perf_counter() - start
            eta = elapsed / done * (total - done) if done else 0.0
            progress(
                f"stored shard {i + 1}/{len(plan)} of {info.path.name}: {done / 2**20:.1f}/"
                f"{total / 2**20:.1f} MiB, {elapsed:.1f}s elapsed, ETA {eta:.1f}s"
            )
    return StoredCheckpoint(str(info.path), refs, [list(n) for n in plan], nbytes)


def get_shard(ref: ray.ObjectRef) -> Dict[str, torch.Tensor]:
    """Fetch one shard as torch tensors viewing the object store's memory (zero-copy on a node)."""
    return shard_tensors(ray.get(ref))


def shard_tensors(shard: Dict) -> Dict[str, torch.Tensor]:
    """Torch views of a fetched shard's arrays."""
    return {
        name: numpy_to_tensor(a, shard["dtypes"][name]) for name, a in shard["tensors"].items()
    }
