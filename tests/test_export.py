"""Publishing best/ never leaves the only complete copy under a temporary name.

`results.publish_dir` moves the old best/ aside, renames the new one in, then removes the old
copy. Each test kills a real process (os._exit, no clean-up runs) at one of those steps, then
checks that `recover_published` (which every export runs first) leaves exactly one complete
best/, old or new, and nothing else beside it.
"""

import subprocess
import sys
from pathlib import Path

import pytest

from ckmerge_ray.results import publish_dir, recover_published

# The child publishes NEW over DEST, dying at the k-th filesystem step: os.replace calls
# (1: old moved aside, 2: new renamed in) or inside the removal of the old copy (3).
CHILD = r"""
import os, shutil, sys
from pathlib import Path
from ckmerge_ray import results

new, dest, kill_at = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
step = {"n": 0}
real_replace, real_rmtree = os.replace, shutil.rmtree

def tick():
    step["n"] += 1
    if step["n"] == kill_at:
        os._exit(9)

def replace(a, b):
    tick()
    real_replace(a, b)

def rmtree(path, *args, **kwargs):
    first = sorted(Path(path).iterdir())[0]
    first.unlink()  # the removal has begun: the old copy is now incomplete
    tick()
    real_rmtree(path, *args, **kwargs)

results.os.replace = replace
results.shutil.rmtree = rmtree
results.publish_dir(new, dest)
"""


def model_dir(path: Path, tag: str) -> Path:
    path.mkdir(parents=True)
    for name in ("config.json", "model-00001-of-00002.safetensors",
                 "model-00002-of-00002.safetensors"):
        (path / name).write_text(f"{tag}:{name}")
    return path


def complete_copy_of(path: Path) -> str:
    """Which model `path` holds ("old" or "new"), asserting every file is there and whole."""
    texts = sorted(p.read_text() for p in path.iterdir())
    tags = {t.split(":")[0] for t in texts}
    assert len(texts) == 3 and len(tags) == 1, texts
    return tags.pop()


@pytest.mark.parametrize("kill_at,expected", [(1, "old"), (2, "old"), (3, "new")])
def test_killed_publish_leaves_one_complete_best(tmp_path, kill_at, expected):
    dest = model_dir(tmp_path / "best", "old")
    new = model_dir(tmp_path / ".best-tmp-x", "new")
    r = subprocess.run([sys.executable, "-c", CHILD, str(new), str(dest), str(kill_at)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 9, r.stderr  # it really died at that step
    if kill_at == 2:  # between the two renames: best/ is gone, the old copy is aside
        assert not dest.exists() and len(list(tmp_path.glob(".best-old-*"))) == 1

    recover_published(dest)

    assert complete_copy_of(dest) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]  # no leftovers


def test_publish_replaces_and_cleans_up(tmp_path):
    dest = model_dir(tmp_path / "best", "old")
    publish_dir(model_dir(tmp_path / ".best-tmp-y", "new"), dest)
    assert complete_copy_of(dest) == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_publish_into_an_empty_place(tmp_path):
    publish_dir(model_dir(tmp_path / ".best-tmp-z", "new"), tmp_path / "best")
    assert complete_copy_of(tmp_path / "best") == "new"
