"""`torch.distributed.checkpoint` (DCP) directories, read with PyTorch's own reader.

A DCP directory holds a ``.metadata`` file (every tensor's name, shape, dtype and where its
chunks lie) and ``__<rank>_<n>.distcp`` data files; FSDP, torchtitan and Accelerate (Trainer's
``checkpoint-N/pytorch_model_fsdp_0/``) write it. We read the metadata first, so a pair is
validated and its object-store budget checked before any tensor; then tensors are loaded a
shard group at a time with `torch.distributed.checkpoint.load(no_dist=True)` (no process
group), which reassembles chunks saved by many ranks into whole tensors.

Two things are our own, and why:
- ``.metadata`` is a pickle. `pickle.load` (what torch's reader does) can run code, so we
  unpickle it with an allowlist of DCP's metadata classes and torch's dtypes (the "restricting
  globals" recipe of Python's pickle docs); torch's weights-only unpickler cannot read it
  (pickle protocol 4 frames). Tensor data is still loaded by torch with ``weights_only=True``.
- Bytes come through a `storage.Location`, one ranged read per stored item, so a DCP on object
  storage streams without local staging and without reading anything twice.
"""

from __future__ import annotations

import io
import pickle
from contextlib import contextmanager
from typing import Dict, List

import torch

from ckmerge_ray.errors import CheckpointError

METADATA = ".metadata"

_ALLOWED_MODULES = {
    "torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
    "torch.distributed.checkpoint.planner",
}
_ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
            ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("builtins", "set"),
            ("builtins", "frozenset"), ("torch", "device")}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata: only DCP's metadata classes, torch dtypes and plain containers."""

    def find_class(self, module: str, name: str):
        if module in _ALLOWED_MODULES and not name.startswith("__"):
            return super().find_class(module, name)
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                          torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in DCP metadata")


def read_metadata(root) -> "torch.distributed.checkpoint.Metadata":
    """The parsed ``.metadata`` of DCP directory `root` (a `storage.Location`).
    Raises CheckpointError when it is missing or holds anything but DCP metadata."""
    meta = root / METADATA
    if not meta.exists():
        raise CheckpointError(f"{root} is not a torch.distributed.checkpoint directory: no "
                              f"{METADATA} file (the checkpoint may still be being written)")
    try:
        return _MetadataUnpickler(io.BytesIO(meta.read_bytes())).load()
    except Exception as e:  # unpickling raises many kinds
        raise CheckpointError(f"cannot read {meta} as DCP metadata: {e}") from e


def tensor_entries(metadata) -> Dict[str, "object"]:
    """Stored name -> TensorStorageMetadata of every tensor (bytes entries are not weights)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    return {k: v for k, v in metadata.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)}


def tensor_files(metadata) -> Dict[str, str]:
    """Stored name -> the data file of its first chunk (what shard planning groups by)."""
    files: Dict[str, str] = {}
    for index, info in metadata.storage_data.items():
        files.setdefault(index.fqn, info.relative_path)
    return files


def check_files(root, metadata) -> None:
    """Every data file the metadata names must exist. Raises CheckpointError naming the first."""
    for fname in sorted({i.relative_path for i in metadata.storage_data.values()}):
        if not (root / fname).exists():
            raise CheckpointError(f"data file {fname} named in {root / METADATA} is missing "
                                  f"from {root}")


class _RangeFile:
    """What the reader's `create_stream` yields: a file known by its Location."""

    def __init__(self, location):
        self.location = location


def make_reader(root, metadata):
    """A `FileSystemReader` that reads `root` through its Location, one ranged read per item."""
    from torch.distributed.checkpoint import FileSystemReader

    class LocationFS:  # the three calls FileSystemReader makes on its filesystem
        def init_path(self, path, **kwargs):
            return path

        def concat_path(self, path, suffix):
            return suffix

        @contextmanager
        def create_stream(self, path, mode):
            yield _RangeFile(root / str(path))

    class Reader(FileSystemReader):
        def __init__(self):
            super().__init__(str(root))
            self.fs = LocationFS()
            self.path = str(root)

        def read_metadata(self, *args, **kwargs):
            return metadata

        def _slice_file(self, file, sinfo):
            return io.BytesIO(file.location.read_range(sinfo.offset, sinfo.offset + sinfo.length))

    return Reader()


def load_tensors(root, metadata, names: List[str]) -> Dict[str, torch.Tensor]:
    """Load whole tensors `names` (stored names) from DCP directory `root`.
    Raises CheckpointError when the files cannot be read."""
    import torch.distributed.checkpoint as dcp

    entries = tensor_entries(metadata)
    out = {n: torch.empty(tuple(entries[n].size), dtype=entries[n].properties.dtype)
           for n in names}
    try:
        dcp.load(out, storage_reader=make_reader(root, metadata), no_dist=True)
    except Exception as e:  # DCP wraps reader errors in its own CheckpointException
        raise CheckpointError(f"cannot read tensors {names[:3]} from {root}: {e}") from e
    return out
