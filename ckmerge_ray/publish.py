"""Publishing a finished model directory, so that a reader never loads half of it: at a local
path (`swap_in`: renamed into place; `recover_published` puts right a swap that was killed) or
at a URI (`publish_dir`: uploaded beside it, then copied in with config.json last), and the
check, before any work, that a destination can be written (`check_destination`).

What is renamed into place locally gets the modes a plain open() / mkdir() would have given it
under the process umask (`give_default_modes`), as the Trainer's own files have: tempfile
creates 0o600 / 0o700, so without it other users (or a server running as another user) could
not read a model or table the run published.
"""

from __future__ import annotations

import functools
import os
import posixpath
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable, Optional, Tuple, Union

from ckmerge_ray.errors import CheckpointError
from ckmerge_ray.storage import Location, redact, translated_errors, locate

# Files a loader opens first (DCP's .metadata, HF's index and config.json): published last,
# removed first. Higher rank = later; config.json is the very last file a reader can see.
_LOAD_ORDER = {"config.json": 3, ".metadata": 2}


@functools.lru_cache(maxsize=None)
def process_umask() -> int:
    """The process umask. `os.umask` reads it only by setting it, and the umask is process-wide:
    a file another thread created between the set and the restore would get the value set. So
    it is read once, at import (below), and cached; the value set for that instant is 0o077,
    never 0, so such a file would be owner-only, not world-writable. A program that changes its
    umask later calls ``process_umask.cache_clear()``."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


process_umask()


def give_default_modes(path: Union[str, os.PathLike]) -> None:
    """Give `path`, and everything under it when it is a directory, the mode a plain open() or
    mkdir() would have given it: files 0o666 & ~umask, directories 0o777 & ~umask. For what
    was written under a temporary name by tempfile.mkstemp / mkdtemp (0o600 / 0o700; also
    safetensors >= 0.8's save_file, which writes through its own 0o600 temporary file), before
    it is renamed into place. Symbolic links are left alone."""
    path, mask = Path(path), process_umask()
    for p in [path, *(path.rglob("*") if path.is_dir() and not path.is_symlink() else ())]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def check_destination(dest: Union[str, Location]) -> Location:
    """Refuse, before any work, an export destination that cannot be written: a remote one
    whose bucket does not exist (or is not visible with these credentials), a local one
    whose parent is a file. Returns its Location. Raises CheckpointError."""
    loc = locate(dest, must_exist=False, what="export destination")
    if loc.is_local:
        parent = Path(loc.path).parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise CheckpointError(f"export destination {loc.path}: {parent} is a file")
        return loc
    bucket = Location(loc.fs, loc.path.split("/", 1)[0])
    if bucket == loc:
        raise CheckpointError(f"export destination {redact(loc.uri)} must be a prefix inside a "
                              "bucket")
    with translated_errors(bucket, "export destination"):
        bucket.fs.info(bucket.path)
    return loc


def publish_dir(local_dir: Path, dest: Union[str, Location], log: Optional[Callable[[str], None]] = None
                ) -> Location:
    """Put the finished local directory `local_dir` (copied, not moved) at `dest`, a path or a
    URI, so that a reader never loads a mix of the old and the new model. Returns `dest`.

    Local `dest`: a copy is made beside it (``.NAME-tmp-*``) and fsynced, the old `dest` renamed
    aside (``.NAME-old-<µs>``, as `recover_published` expects), the copy renamed in, the
    old one removed: a reader sees the old directory, then for a moment none, then the new one.

    Remote `dest` (object stores cannot rename a directory):
      1. every file is uploaded under the temporary sibling prefix ``.NAME-tmp-<hex>/``;
      2. the old config.json is deleted, then the old .metadata and ``*.index.json``, then every
         other old object under `dest`;
      3. the new files are copied into `dest` on the server: shards (concurrently), then
         ``*.index.json``, .metadata and config.json, one by one in that order;
      4. the temporary prefix is deleted (best effort also when a step failed).
    A reader that starts from config.json (or DCP's .metadata) sees the whole old model, "no
    model" (steps 2-3), or the whole new one; never config.json beside a mixed set. A reader
    already streaming shards when step 2 starts may find them gone or replaced: compare
    config.json's `fingerprint()` before and after reading. Killed in steps 2-3, `dest` has no
    config.json and the temporary prefix stays; publishing again repairs `dest`. `log` gets one
    line after each step (a test hook too). Raises CheckpointError.
    """
    src = Path(local_dir)
    if not src.is_dir():
        raise CheckpointError(f"cannot publish {src}: not a directory")
    files = sorted((p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()), key=_load_rank)
    if not files:
        raise CheckpointError(f"cannot publish {src}: it holds no files")
    dest = locate(dest, must_exist=False, what="export destination")
    say = log or (lambda line: None)
    if dest.is_local:
        _publish_local(src, Path(dest.path))
        say(f"published {dest.uri} ({len(files)} files)")
        return dest
    bucket = Location(dest.fs, dest.path.split("/", 1)[0])
    if bucket == dest:
        raise CheckpointError(f"export destination {redact(dest.uri)} must be a prefix inside a bucket")
    with translated_errors(bucket, "export destination"):
        bucket.fs.info(bucket.path)  # the bucket must exist; prefixes need not
    fs, tmp = dest.fs, dest.parent / f".{dest.name}-tmp-{uuid.uuid4().hex[:12]}"
    shards, loader_files = [r for r in files if _load_rank(r)[0] == 0], [r for r in files if _load_rank(r)[0]]
    try:
        with translated_errors(dest, "export destination"):
            fs.put([str(src / r) for r in files], [tmp.joinpath(r).path for r in files])  # concurrent
            say(f"uploaded {len(files)} files to {tmp.uri}")
            old = sorted((posixpath.relpath(p, dest.path) for p in fs.find(dest.path)), key=_load_rank)
            old_loader_files = [r for r in old if _load_rank(r)[0]]
            for rel in reversed(old_loader_files):  # config.json first: from now on, no model
                fs.rm_file(dest.joinpath(rel).path)
            if old_loader_files:
                say(f"removed the old {', '.join(reversed(old_loader_files))} from {dest.uri}")
            if len(old) > len(old_loader_files):
                fs.rm([dest.joinpath(r).path for r in old if not _load_rank(r)[0]])
                say(f"removed the old model's other {len(old) - len(old_loader_files)} files")
            if shards:
                fs.copy([tmp.joinpath(r).path for r in shards], [dest.joinpath(r).path for r in shards])
                say(f"copied {len(shards)} files into {dest.uri}, its loader's files next")
            for rel in loader_files:  # one by one, in order: config.json last
                fs.cp_file(tmp.joinpath(rel).path, dest.joinpath(rel).path)
            say(f"published {dest.uri} ({len(files)} files, {files[-1]} last)")
    finally:
        try:
            fs.rm(tmp.path, recursive=True)
            say(f"removed {tmp.uri}")
        except Exception:  # nothing uploaded yet, or the store is unreachable: leave it
            pass
    return dest


def _load_rank(rel: str) -> Tuple[int, str]:
    name = posixpath.basename(rel)
    return (_LOAD_ORDER.get(name, 1 if name.endswith(".index.json") else 0), rel)


def swap_in(new: Path, dest: Path) -> None:
    """Put the complete local directory `new` at `dest`: an old `dest` is moved aside
    (``.NAME-old-<µs>``), `new` renamed in, and only then the old copy removed. Killed at any
    point, one complete copy exists: `dest`, or the old one under its aside name (which
    `recover_published` moves back)."""
    old = None
    if dest.exists():
        old = dest.parent / f".{dest.name}-old-{time.time_ns() // 1000:017d}"
        os.replace(dest, old)
    os.replace(new, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _publish_local(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-tmp-"))
    try:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        give_default_modes(tmp)  # a new copy: mkdtemp's 0o700, copytree kept the source's modes
        swap_in(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def recover_published(dest: Path) -> None:
    """Put right what a killed `export_merged` left beside `dest`: unfinished temporary
    directories are removed; if `dest` is missing (killed between the two renames of
    `swap_in`) the newest old copy is moved back; old copies beside a complete `dest` are
    removed."""
    dest = Path(dest)
    for tmp in dest.parent.glob(f".{dest.name}-tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    olds = sorted(dest.parent.glob(f".{dest.name}-old-*"))
    if olds and not dest.exists():
        os.replace(olds.pop(), dest)
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)
