"""The modes of what a run writes: those a plain open() / mkdir() gives under the process umask
(files 0o666 & ~umask, folders 0o777 & ~umask), although every output is written under a
temporary name (tempfile: 0o600 / 0o700, safetensors' own temporary file: 0o600) and renamed
into place. A run on a shared cluster must leave its model readable by a server running as
another user, and a run under umask 077 must leave it owner-only."""

from __future__ import annotations

import os
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path

import pytest

from ckmerge_ray.publish import process_umask, publish_dir
from ckmerge_ray.results import write_json_atomic

FILE, DIR = 0o666, 0o777


@contextmanager
def umask(mask: int):
    """The process umask set to `mask` (and the package's cached copy of it), restored after."""
    old = os.umask(mask)
    process_umask.cache_clear()
    try:
        yield
    finally:
        os.umask(old)
        process_umask.cache_clear()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def assert_modes(root: Path, mask: int) -> None:
    """`root` and everything under it have the default modes under `mask`."""
    for p in [root, *root.rglob("*")]:
        assert mode(p) == ((DIR if p.is_dir() else FILE) & ~mask), (p, oct(mode(p)))


@pytest.fixture(scope="module")
def run(ray_session, trajectory, tmp_path_factory) -> Path:
    """A real tune run with its best model exported, made under umask 022."""
    from ckmerge_ray import tune_merge

    out = tmp_path_factory.mktemp("outputs") / "run"
    with umask(0o022):
        tune_merge((trajectory[1], trajectory[2]), {"cpu": 1},
                   f"loss:{trajectory[0].parent / 'heldout.jsonl'}",
                   objective_options={"seq_len": 64, "max_tokens": 1024}, num_trials=2,
                   max_concurrent=2, output_dir=out, progress=False)
    return out


def worker_umask(ray) -> int:
    """The umask of Ray's worker processes (where the run's journal is written): they inherit
    the one of the process that started Ray, not the one this test sets."""
    def read():  # nested: sent to the worker by value
        from ckmerge_ray.publish import process_umask

        return process_umask()

    return ray.get(ray.remote(read).remote())


def export_pair(earlier: Path, later: Path, dest: Path) -> None:
    """Store the pair in the object store and export its merge at λ = 0.5 (a run's export)."""
    from ckmerge_ray.checkpoints import load_checkpoint_info, plan_shards
    from ckmerge_ray.results import export_merged
    from ckmerge_ray.store import put_checkpoint

    a, b = load_checkpoint_info(earlier), load_checkpoint_info(later)
    plan, ref = plan_shards(b, 1 << 30), {}
    export_merged(put_checkpoint(a, plan, reference=ref), put_checkpoint(b, plan, reference=ref),
                  0.5, (b.path / "config.json").read_bytes(), [], dest)


def test_a_run_under_umask_022_is_readable_by_everyone(run, ray_session):
    for name in ("trials.parquet", "summary.json", "run.json", "landscape.png"):
        assert mode(run / name) == 0o644, name
    journal = sorted((run / "evaluations").glob("*.json"))
    assert journal
    assert mode(journal[0]) == FILE & ~worker_umask(ray_session)  # 0o644 under the usual 022
    best = run / "best"
    assert mode(best) == 0o755
    shards = sorted(best.glob("model-*.safetensors"))
    assert shards and (best / "config.json").exists()
    assert_modes(best, 0o022)  # the shards too: safetensors itself writes them 0o600
    assert not [*run.glob(".best-*"), *run.glob(".*.tmp")]  # no temporary name left


def test_published_copies_get_the_modes_of_the_umask_not_the_sources(run, tmp_path):
    private = tmp_path / "private"
    with umask(0o077):
        publish_dir(run / "best", private)  # from a 0o755 / 0o644 source
    assert_modes(private, 0o077)
    with umask(0o022):
        publish_dir(private, tmp_path / "latest")  # from a 0o700 / 0o600 source
        publish_dir(private, tmp_path / "latest")  # and over an existing copy
    assert_modes(tmp_path / "latest", 0o022)
    assert mode(tmp_path / "latest") == 0o755
    assert mode(next((tmp_path / "latest").glob("model-*.safetensors"))) == 0o644


def test_under_umask_077_what_the_run_writes_stays_owner_only(run, ray_session, trajectory,
                                                              tmp_path):
    from ckmerge_ray.plots import plot_run

    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("trials.parquet", "summary.json"):
        shutil.copy(run / name, copy / name)
    with umask(0o077):
        write_json_atomic(tmp_path / "run.json", {"a": 1})
        paths = plot_run(copy)  # redraws landscape.png, rewrites summary.json
        export_pair(trajectory[1], trajectory[2], tmp_path / "best")
    assert mode(tmp_path / "run.json") == 0o600
    assert [p.name for p in paths] == ["landscape.png"]
    assert mode(copy / "landscape.png") == mode(copy / "summary.json") == 0o600
    assert mode(tmp_path / "best") == 0o700
    assert mode(next((tmp_path / "best").glob("model-*.safetensors"))) == 0o600
    assert_modes(tmp_path / "best", 0o077)
