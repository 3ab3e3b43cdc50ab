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
