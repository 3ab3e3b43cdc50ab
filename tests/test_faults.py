"""Failing objectives on a real Ray Tune run: recorded, avoided, never a hang."""

import pytest

from ckmerge_ray import tune_merge
from ckmerge_ray.errors import RunError
from tests import faulty

SEQ = {"seq_len": 64, "max_tokens": 2048}


@pytest.fixture(autouse=True)
def _ship():
    faulty.ship_by_value()


def objective(cls, ckpt):
    return cls(ckpt.parent / "heldout.jsonl", **SEQ)


def test_raising_trials_are_recorded_and_the_run_goes_on(ray_session, trajectory, tmp_path):
    pair = (trajectory[-2], trajectory[-1])
    (tmp_path / "tokens").mkdir()
    obj = faulty.FailsFirstN(pair[1].parent / "heldout.jsonl", tmp_path / "tokens", n=2, **SEQ)
    result = tune_merge(pair, {"cpu": 1}, objective=obj, num_trials=6, max_concurrent=2,
                        output_dir=tmp_path / "run", progress=False, export_best=False)
    rows = result.table.to_pylist()
    failed = [r for r in rows if r["status"] == "error"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(failed) == 2 and all("injected failure" in r["error"] for r in failed)
    assert len(rows) == 7 and len(ok) == 5
    lams = [round(r["lam"], 9) for r in rows]
    assert len(set(lams)) == len(lams), "a failed λ must not be suggested again"
    assert result.best_lambda in [r["lam"] for r in ok]


@pytest.mark.parametrize("cls,message", [
    (faulty.AlwaysRaises, "objective is broken"),
    (faulty.AlwaysNaN, "non-finite score nan"),
])
def test_every_trial_failing_stops_with_the_first_error(ray_session, trajectory, tmp_path, cls, message):
    pair = (trajectory[-2], trajectory[-1])
    with pytest.raises(RunError, match=f"every trial failed; first error: .*{message}"):
        tune_merge(pair, {"cpu": 1}, objective=objective(cls, pair[1]), num_trials=10,
                   max_concurrent=2, output_dir=tmp_path, progress=False)
    import pyarrow.parquet as pq

    rows = pq.read_table(tmp_path / "trials.parquet").to_pylist()
    assert 3 <= len(rows) < 11, "the run must stop early, not spin through every trial"


def test_a_killed_worker_is_retried_and_every_trial_is_recorded_once(ray_session, trajectory, tmp_path):
    pair = (trajectory[-2], trajectory[-1])
    (tmp_path / "tokens").mkdir()
    obj = faulty.KillsItsWorkerOnce(pair[1].parent / "heldout.jsonl", tmp_path / "tokens", **SEQ)
    result = tune_merge(pair, {"cpu": 1}, objective=obj, num_trials=5, max_concurrent=2,
                        output_dir=tmp_path / "run", progress=False, export_best=False)
    assert (tmp_path / "tokens" / "killed").exists(), "no worker was killed: the test tested nothing"
    rows = result.table.to_pylist()
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows)
    assert len({r["trial_id"] for r in rows}) == 6 and len({r["lam"] for r in rows}) == 6
    journal = sorted((tmp_path / "run" / "evaluations").glob("lam=*.json"))
    assert len(journal) == 6


EXPORT_SCRIPT = r'''
import os, signal, sys
from pathlib import Path
import ray
from ckmerge_ray.checkpoints import load_checkpoint_info, plan_shards
from ckmerge_ray.results import export_merged
from ckmerge_ray.store import put_checkpoint

earlier, later, dest, lam, kill = sys.argv[1], sys.argv[2], Path(sys.argv[3]), float(sys.argv[4]), sys.argv[5] == "kill"
ray.init(num_cpus=1, include_dashboard=False)
a, b = load_checkpoint_info(earlier), load_checkpoint_info(later)
plan = plan_shards(b, 1 << 30)
ref = {}
sa, sb = put_checkpoint(a, plan, reference=ref), put_checkpoint(b, plan, reference=ref)

def progress(msg):
    print(msg, flush=True)
    if kill:  # killed for real after the first shard is on disk
        os.kill(os.getpid(), signal.SIGKILL)

export_merged(sa, sb, lam, (b.path / "config.json").read_bytes(), [], dest, progress=progress)
print("EXPORTED", flush=True)
'''


def test_export_killed_midway_leaves_no_partial_model(trajectory_bf16, tmp_path):
    import subprocess
    import sys

    from safetensors.torch import load_file

    script = tmp_path / "export.py"
    script.write_text(EXPORT_SCRIPT)
    dest = tmp_path / "best"
    run = lambda lam, mode: subprocess.run(  # noqa: E731
        [sys.executable, str(script), str(trajectory_bf16[-2]), str(trajectory_bf16[-1]), str(dest),
         str(lam), mode], capture_output=True, text=True, timeout=180,
        env={**__import__("os").environ, "RAY_ADDRESS": "local"})
    first = run(0.6, "ok")
    assert "EXPORTED" in first.stdout, first.stdout + first.stderr
    before = {f.name: f.read_bytes() for f in dest.iterdir()}
    assert sum(name.endswith(".safetensors") for name in before) > 1  # several shards

    killed = run(0.9, "kill")
    assert killed.returncode == -9 and "exported shard 1/" in killed.stdout, killed.stdout + killed.stderr
    assert {f.name: f.read_bytes() for f in dest.iterdir()} == before, "the old best/ was touched"
    leftovers = list(tmp_path.glob(".best-tmp-*"))
    assert leftovers, "the kill came before the export started: the test tested nothing"

    again = run(0.9, "ok")
    assert "EXPORTED" in again.stdout, again.stdout + again.stderr
    assert not list(tmp_path.glob(".best-*")), "leftovers of the killed export remain"
    index = __import__("json").loads((dest / "model.safetensors.index.json").read_text())
    for fname in set(index["weight_map"].values()):
        load_file(dest / fname)  # every shard complete and readable


STORE_SCRIPT = r'''
import sys, warnings
import ray
from ckmerge_ray import tune_merge
from ckmerge_ray.errors import ConfigError

earlier, later, heldout, out = sys.argv[1:5]
ray.init(num_cpus=1, include_dashboard=False, object_store_memory=80 * 2**20)  # Ray's minimum is 75 MiB
kw = dict(objective=f"loss:{heldout}", objective_options={"seq_len": 32, "max_tokens": 256},
          num_trials=2, max_concurrent=1, export_best=False, progress=False)
try:
    tune_merge((earlier, later), {"cpu": 1}, output_dir=out + "/a", **kw)
    print("NOT REFUSED")
except ConfigError as e:
    print("REFUSED", e)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    r = tune_merge((earlier, later), {"cpu": 1}, output_dir=out + "/b", allow_spilling=True, **kw)
print("SPILLED", len(r.table), sum(row["status"] == "ok" for row in r.table.to_pylist()))
print("WARNED", [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)])
'''


def test_checkpoints_larger_than_the_object_store(trajectory, tmp_path):
    """Two ~52 MB checkpoints against an 80 MiB object store: refused up front with the numbers,
    or, with allow_spilling, run to completion through Ray's spilling with a warning."""
    import os
    import shutil
    import subprocess
    import sys

    from tests.conftest import tiny_llama

    pair = []
    for seed in (0, 1):
        d = tmp_path / f"big{seed}"
        tiny_llama(seed, vocab_size=16384, hidden_size=384, intermediate_size=64).save_pretrained(d)
        for f in trajectory[-1].iterdir():
            if "token" in f.name or f.name == "vocab.json" or f.name == "merges.txt":
                shutil.copy(f, d / f.name)
        pair.append(d)
    script = tmp_path / "store.py"
    script.write_text(STORE_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), *map(str, pair), str(trajectory[-1].parent / "heldout.jsonl"),
         str(tmp_path / "runs")], capture_output=True, text=True, timeout=400,
        env={**os.environ, "RAY_ADDRESS": "local"})
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "REFUSED the two checkpoints need 0.10 GiB of object store but node" in out, out
    assert "has 0.08 GiB" in out and "--allow-spilling" in out
    assert "SPILLED 3 3" in out, out + proc.stderr[-3000:]
    assert "exceed the object store" in out.split("WARNED", 1)[1]
