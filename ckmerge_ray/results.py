"""Results on disk: the trials table, the summary, and the atomic export of the best model.

Every write goes to a temporary name in the target folder and is renamed into place, so a crash
never leaves a half-written table or a partial model under its final name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from safetensors.torch import save_file

from ckmerge_ray.merge import merge_state_dicts
from ckmerge_ray.store import StoredCheckpoint, shard_tensors

TRIALS_FILE = "trials.parquet"
SUMMARY_FILE = "summary.json"
BEST_DIR = "best"
RUN_FILE = "run.json"  # the run's arguments and Tune experiment path, for resume
JOURNAL_DIR = "evaluations"  # one JSON per finished evaluation, written by the worker


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file, fsync and rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json_atomic(path: Path, obj: Dict) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def rows_to_table(rows: List[Dict]) -> pa.Table:
    """A pyarrow table of trial rows; columns are the union of the rows' keys, in first-seen order."""
    columns: List[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    return pa.Table.from_pylist([{c: row.get(c) for c in columns} for row in rows])


def read_rows(path: Path) -> List[Dict]:
    """The rows of a trials table on disk, or [] when there is none yet."""
    path = Path(path)
    return pq.read_table(path).to_pylist() if path.exists() else []


def write_table_atomic(path: Path, rows: List[Dict]) -> pa.Table:
    table = rows_to_table(rows)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_bytes_atomic(path, sink.getvalue().to_pybytes())
    return table


def export_merged(
    earlier: StoredCheckpoint,
    later: StoredCheckpoint,
    lam: float,
    config_json: bytes,
    extra_files: List[Path],
    dest: Path,
    progress: Optional[Callable[[str], None]] = None,
) -> Path:
    """Write the merge at λ as a Hugging Face model directory (sharded safetensors + index).

    Shards come from the object store one pair at a time, so memory stays bounded by a shard.
    The directory is built under a temporary name beside `dest` and renamed into place; an
    existing `dest` is replaced only after the new one is complete. Leftovers of an export that
    was killed (temporary directories beside `dest`) are removed first.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    for stale in [*dest.parent.glob(f".{dest.name}-tmp-*"), *dest.parent.glob(f".{dest.name}-old-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-tmp-"))
    try:
        n = len(later.refs)
        weight_map, total = {}, 0
        for i, (e_ref, l_ref) in enumerate(zip(earlier.refs, later.refs)):
            e, l = (shard_tensors(s) for s in ray.get([e_ref, l_ref]))
            merged = merge_state_dicts(e, l, lam)
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            save_file(merged, str(tmp / fname), metadata={"format": "pt"})
            _fsync_file(tmp / fname)
            for name, t in merged.items():
                weight_map[name] = fname
                total += t.numel() * t.element_size()
            del e, l, merged
            if progress:
                progress(f"exported shard {i + 1}/{n} of the merged model")
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_bytes(config_json)
        for f in extra_files:
            shutil.copy2(f, tmp / f.name)
        _replace_dir(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _replace_dir(new: Path, dest: Path) -> None:
    """Move `new` to `dest`; an old `dest` is moved aside first and removed after."""
    old = None
    if dest.exists():
        old = dest.parent / f".{dest.name}-old-{int(time.time() * 1e6)}"
        os.replace(dest, old)
    os.replace(new, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
