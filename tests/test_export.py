"""Publishing best/ never leaves the only complete copy under a temporary name.

`publish.swap_in` moves the old best/ aside, renames the new one in, then removes the old
copy. Each test kills a real process (os._exit, no clean-up runs) at one of those steps, then
checks that `recover_published` (which every export runs first) leaves exactly one complete
best/, old or new, and nothing else beside it.
"""

from pathlib import Path

import pytest

from ckmerge_ray.publish import recover_published, swap_in

def publish_and_die(new: Path, dest: Path, kill_at: int) -> None:
    """In a forked child: publish NEW over DEST, dying at the k-th filesystem step: os.replace
    calls (1: old moved aside, 2: new renamed in) or inside the removal of the old copy (3).
    A fork of this process, which has imported the package already, spares a fresh interpreter
    importing torch and Ray (seconds each on 2 cores); the child's patches stay in the child."""
    import os
    import shutil

    from ckmerge_ray import publish

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

    publish.os.replace = replace
    publish.shutil.rmtree = rmtree
    publish.swap_in(new, dest)


def run_in_child(fn, *args) -> int:
    """Exit code of `fn(*args)` run in a forked child process (0 if it returns, 1 if it raises)."""
    import os
    import traceback
    import warnings

    with warnings.catch_warnings():  # Python >= 3.12 warns about fork() in a threaded process
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: no pytest or atexit clean-up runs, whatever happens
        code = 0
        try:
            fn(*args)
        except BaseException:
            traceback.print_exc()
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


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
    assert run_in_child(publish_and_die, new, dest, kill_at) == 9  # it really died at that step
    if kill_at == 2:  # between the two renames: best/ is gone, the old copy is aside
        assert not dest.exists() and len(list(tmp_path.glob(".best-old-*"))) == 1

    recover_published(dest)

    assert complete_copy_of(dest) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]  # no leftovers


def test_publish_replaces_and_cleans_up(tmp_path):
    dest = model_dir(tmp_path / "best", "old")
    swap_in(model_dir(tmp_path / ".best-tmp-y", "new"), dest)
    assert complete_copy_of(dest) == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_publish_into_an_empty_place(tmp_path):
    swap_in(model_dir(tmp_path / ".best-tmp-z", "new"), tmp_path / "best")
    assert complete_copy_of(tmp_path / "best") == "new"
