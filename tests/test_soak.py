"""Soak (issue 21, item 7): a 40-trial run at 2 concurrent whose worker processes are killed at
seeded random moments (in a merge, in an evaluation, between the journal and the report) and
whose driver is killed in the middle of exporting best/; a resume finishes it. The kills are
real SIGKILLs; the worker ones are placed by hooks that `tests.faulty.KillsWorkersAtRandom`
installs in each worker (on the merge and on `tune.report`), the driver's by wrapping the
export's safetensors writer in the driver script. One acquisition (UCB) instead of the hedge's
three: the search is not under test here, and it costs a third of the suggestions' time. The driver joins the session's Ray, as a job
joins a cluster (its own Ray would cost a start-up)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parent.parent

DRIVER = r'''
import os, signal, sys
root, earlier, later, heldout, out, tokens, seed = sys.argv[1:8]
sys.path.insert(0, root)
import ckmerge_ray.results as results
from ckmerge_ray import tune_merge
from tests import faulty

faulty.ship_by_value()
real_save = results.save_file

def save_then_die(*args, **kwargs):  # the driver dies once the export's first shard is written
    real_save(*args, **kwargs)
    if faulty.take_token(tokens, "killed-export"):
        print("KILLED MID-EXPORT", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

results.save_file = save_then_die
objective = faulty.KillsWorkersAtRandom(heldout, tokens, seed=int(seed), seq_len=64, max_tokens=1024)
tune_merge((earlier, later), {"cpu": 1}, objective=objective, num_trials=39, max_concurrent=2,
           output_dir=out, seed=int(seed), max_failures=3, acquisitions=("ucb",))
print("NOT KILLED", flush=True)
'''


@pytest.mark.slow
@pytest.mark.timeout(600, func_only=True)
def test_soak_forty_trials_with_workers_and_the_driver_killed(ray_session, trajectory_bf16, tmp_path):
    """Every λ distinct, one row per trial, the journal and the table agree, best/ complete."""
    from safetensors.torch import load_file

    from ckmerge_ray import tune_merge
    from ckmerge_ray.objectives import HeldoutLoss

    earlier, later = trajectory_bf16[-2], trajectory_bf16[-1]
    heldout = later.parent / "heldout.jsonl"
    out, tokens, seed = tmp_path / "run", tmp_path / "tokens", 7
    tokens.mkdir()
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    driver = subprocess.run(
        [sys.executable, str(script), str(ROOT), str(earlier), str(later), str(heldout), str(out),
         str(tokens), str(seed)], capture_output=True, text=True, timeout=480,
        env={**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address},
        start_new_session=True)
    assert driver.returncode == -signal.SIGKILL and "KILLED MID-EXPORT" in driver.stdout, \
        driver.stdout[-3000:] + driver.stderr[-3000:]
    kills = sorted(p.name for p in tokens.glob("killed-*"))
    for phase in ("merge", "evaluate", "report", "export"):
        assert any(k.startswith(f"killed-{phase}") for k in kills), (phase, kills)
    assert list(out.glob(".best-tmp-*")), "the driver died before the export began"
    assert not (out / "summary.json").exists()

    # The resume (here, on the session's Ray) finds every trial done and exports best/.
    result = tune_merge((earlier, later), {"cpu": 1}, objective=HeldoutLoss(heldout, seq_len=64,
                        max_tokens=1024), num_trials=39, max_concurrent=2, output_dir=out,
                        seed=seed, acquisitions=("ucb",), resume=True, progress=False)
    rows = pq.read_table(out / "trials.parquet").to_pylist()
    assert len(rows) == 40 and all(r["status"] == "ok" for r in rows), \
        [r for r in rows if r["status"] != "ok"]
    assert len({r["trial_id"] for r in rows}) == 40, "a trial has two rows"
    assert len({r["lam"] for r in rows}) == 40, "a λ was evaluated twice"
    journal = {}
    for path in (out / "evaluations").glob("lam=*.json"):
        entry = json.loads(path.read_text())
        journal[entry["lam"]] = entry["score"]
    assert journal == {r["lam"]: r["score"] for r in rows}, "the journal and the table disagree"
    # Kills after the journal was written cost no evaluation: at most one per trial plus one
    # per kill in a merge or an evaluation was started.
    started = len(list(tokens.glob("attempt-*")))
    assert started <= 40 + sum(not k.startswith(("killed-report", "killed-export")) for k in kills)

    best = out / "best"
    assert result.best_model_path == best and not list(out.glob(".best-*"))
    index = json.loads((best / "model.safetensors.index.json").read_text())
    names = set()
    for fname in set(index["weight_map"].values()):
        names |= set(load_file(best / fname))  # every shard complete and readable
    assert names == set(index["weight_map"]) and (best / "config.json").exists()
