"""TEMPORARY local-only stand-in for ckmerge_ray.storage while it is being written."""
from __future__ import annotations
import os
from dataclasses import dataclass
from pathlib import Path
from ckmerge_ray.errors import CheckpointError


@dataclass(frozen=True)
class Location:
    p: Path
    name = property(lambda self: self.p.name)
    parent = property(lambda self: Location(self.p.parent))
    is_local = True
    local_path = property(lambda self: self.p)
    uri = property(lambda self: str(self.p))

    def __truediv__(self, other):
        return Location(self.p / str(other))

    def __str__(self):
        return str(self.p)

    def exists(self): return self.p.exists()
    def isdir(self): return self.p.is_dir()
    def isfile(self): return self.p.is_file()
    def read_bytes(self): return self.p.read_bytes()
    def size(self): return self.p.stat().st_size

    def read_range(self, start, end):
        with open(self.p, "rb") as f:
            f.seek(start)
            return f.read(end - start)


def locate(location, must_exist=True, what="checkpoint"):
    if isinstance(location, Location):
        return location
    p = Path(os.fspath(location))
    if must_exist and not p.exists():
        raise CheckpointError(f"{what} does not exist: {p}")
    return Location(p)
