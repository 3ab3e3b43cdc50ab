"""Killed drivers, for real: Tuner.restore brings the GP-Hedge state back and the run goes on with
the same sequence of λ an uninterrupted run produces; `tune_merge(resume=True)` and
`ckmerge-ray tune --resume` redo no finished evaluation."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ckmerge_ray.cli import main as cli
from ckmerge_ray.results import read_rows
from ckmerge_ray.search import GPHedgeSearch
from tests.test_search import bowl, drive

ROOT = Path(__file__).resolve().parent.parent

DRIVER = r'''
import json, os, sys, time
from pathlib import Path
from ray import tune
from ckmerge_ray import GPHedgeSearch
from ckmerge_ray.search import search_record

# Read here, in the driver: the trials run in workers of a Ray that may not share its
# environment; the objective takes these values with it.
LOG = Path(os.environ["LAM_LOG"])
HANG_AT = int(os.environ.get("HANG_AT", "0"))

def objective(config):
    lam = config["lam"]
    with open(LOG, "a") as f:
        f.write(f"{lam!r}\n")
    if len(LOG.read_text().split()) == HANG_AT:
        Path(str(LOG) + ".hang").touch()
        time.sleep(600)  # the test kills the driver while this trial runs
    tune.report({"score": (lam - 0.71) ** 2 + 3.0})

storage, mode = sys.argv[1], sys.argv[2]
if mode == "fit":
    searcher = GPHedgeSearch(metric="score", mode="min", batch_size=1, seed=11,
                             points_to_evaluate=[{"lam": 0.0}, {"lam": 0.5}, {"lam": 1.0}])
    tuner = tune.Tuner(objective, param_space={"lam": tune.uniform(0.5, 1.0)},
                       tune_config=tune.TuneConfig(search_alg=searcher, num_samples=9,
                                                   max_concurrent_trials=1),
                       run_config=tune.RunConfig(name="exp", storage_path=storage, verbose=0))
else:
    tuner = tune.Tuner.restore(os.path.join(storage, "exp"), trainable=objective)
grid = tuner.fit()
rows = sorted((search_record(r.config)["batch"], r.config["lam"])
              for r in grid if r.metrics)  # q = 1: one per batch
print("RESULT " + json.dumps({"lams": [lam for _, lam in rows], "errors": len(grid.errors)}))
'''


def run_driver(tmp_path, mode, env, **popen):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    return subprocess.Popen([sys.executable, str(script), str(tmp_path / "runs"), mode],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **popen)


def test_tuner_restore_after_driver_kill_continues_the_same_sequence(ray_session, tmp_path):
    log = tmp_path / "lams.log"
    env = {**os.environ, "LAM_LOG": str(log), "HANG_AT": "6", "TUNE_GLOBAL_CHECKPOINT_S": "0",
           "RAY_ADDRESS": _session_address(ray_session)}
    first = run_driver(tmp_path, "fit", env)
    deadline = time.time() + 240
    while not Path(str(log) + ".hang").exists():
        assert first.poll() is None, first.stdout.read()
        assert time.time() < deadline, "the driver never reached the sixth trial"
        time.sleep(0.5)
    # The driver dies as a lost head-node process would; Ray ends its job's actors, the
    # hanging trial among them.
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()

    env["HANG_AT"] = "0"
    second = run_driver(tmp_path, "restore", env)
    out, _ = second.communicate(timeout=300)
    assert second.returncode == 0, out
    result = json.loads(out.split("RESULT ", 1)[1].splitlines()[0])

    reference = [c["lam"] for c in drive(
        GPHedgeSearch(space={"lam": (0.5, 1.0)}, metric="score", mode="min", batch_size=1, seed=11,
                      points_to_evaluate=[{"lam": 0.0}, {"lam": 0.5}, {"lam": 1.0}]),
        bowl, 9)]
    assert result["errors"] == 0
    assert result["lams"] == reference
    # The sixth trial was in flight when the driver died: it ran again after the restore.
    started = [float(x) for x in log.read_text().split()]
    assert started[:5] == reference[:5] and started[5] == reference[5]


TUNE_DRIVER = r'''
import os, sys
from pathlib import Path
root, earlier, later, out, resume = sys.argv[1:6]
sys.path.insert(0, root)
from ckmerge_ray import tune_merge
from tests import faulty

faulty.ship_by_value()
objective = faulty.CountsAndHangs(
    Path(later).parent / "heldout.jsonl", os.environ["EVAL_LOG"], os.environ["HANG_AT"],
    Path(out).resolve() / "evaluations", "lam=*.json", seq_len=64, max_tokens=2048)
r = tune_merge((earlier, later), {"cpu": 1}, objective=objective, num_trials=6, max_concurrent=2,
               output_dir=out, seed=3, resume=resume == "resume", export_best=False)
print("BEST", r.best_lambda)
'''


def test_killed_driver_resumes_without_redoing_finished_evaluations(ray_session, trajectory,
                                                                    tmp_path):
    script = tmp_path / "tune_driver.py"
    script.write_text(TUNE_DRIVER)
    (tmp_path / "evals").mkdir()
    log = tmp_path / "evals" / "finished.log"
    env = {**os.environ, "EVAL_LOG": str(log), "HANG_AT": "5",
           "RAY_ADDRESS": _session_address(ray_session)}
    args = [sys.executable, str(script), str(ROOT), str(trajectory[-2]), str(trajectory[-1]),
            str(tmp_path / "run")]
    first = subprocess.Popen(args + ["fit"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 300
    while not Path(str(log) + ".hang").exists():
        assert first.poll() is None, first.stdout.read()
        assert time.time() < deadline, "the driver never reached the fifth evaluation"
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # the driver, mid-evaluation; Ray ends its workers
    first.wait()
    finished_before = log.read_text().split()
    assert len(finished_before) >= 3

    env["HANG_AT"] = "0"
    second = subprocess.run(args + ["resume"], env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    rows = pq.read_table(tmp_path / "run" / "trials.parquet").to_pylist()
    assert len(rows) == 7 and all(r["status"] == "ok" for r in rows)
    assert len({r["trial_id"] for r in rows}) == 7 and len({r["lam"] for r in rows}) == 7
    finished = log.read_text().split()
    # Every evaluation that finished in the first run was reused, never recomputed: the two
    # runs together finished exactly one evaluation per trial.
    assert len(finished) == 7, (finished_before, finished)
    assert "resuming" in second.stdout

    # Resuming a finished run reports it and evaluates nothing.
    third = subprocess.run(args + ["resume"], env=env, capture_output=True, text=True, timeout=120)
    assert third.returncode == 0 and "holds a finished run" in third.stdout, third.stdout + third.stderr
    assert len(log.read_text().split()) == 7


def test_cli_resume_of_a_finished_run_reports_it(ray_session, trajectory, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--objective", f"loss:{trajectory[-1].parent / 'heldout.jsonl'}", "--seq-len", "64",
              "--max-tokens", "2048", "--trials", "3", "--max-concurrent", "1", "--no-export"]
    assert cli(["tune", str(trajectory[-2]), str(trajectory[-1]), *common, "--output", str(out)]) == 0
    first = capsys.readouterr().out
    assert cli(["tune", "--resume", str(out)]) == 0
    again = capsys.readouterr().out
    assert "holds a finished run" in again
    assert first.strip().splitlines()[-1] in again  # the same final line: best λ and score


def test_resume_refuses_different_arguments_and_missing_runs(ray_session, trajectory, tmp_path, capsys):
    from ckmerge_ray import tune_merge
    from ckmerge_ray.errors import ConfigError

    out = tmp_path / "run"
    kw = dict(objective=f"loss:{trajectory[-1].parent / 'heldout.jsonl'}",
              objective_options={"seq_len": 64, "max_tokens": 2048}, num_trials=3,
              max_concurrent=1, export_best=False, progress=False, output_dir=out)
    tune_merge((trajectory[-2], trajectory[-1]), {"cpu": 1}, **kw)
    with pytest.raises(ConfigError, match=r"cannot resume .* different arguments: num_trials=5 \(the run has 3\)"):
        tune_merge((trajectory[-2], trajectory[-1]), {"cpu": 1}, **{**kw, "num_trials": 5}, resume=True)
    with pytest.raises(ConfigError, match="already holds a run; pass resume=True"):
        tune_merge((trajectory[-2], trajectory[-1]), {"cpu": 1}, **kw)
    with pytest.raises(ConfigError, match="nothing to resume in .*: no run.json"):
        tune_merge((trajectory[-2], trajectory[-1]), {"cpu": 1}, **{**kw, "output_dir": tmp_path / "x"},
                   resume=True)
    assert cli(["tune", "--resume", str(tmp_path / "nothing")]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    # The CLI's --resume takes the run's own arguments: one given with it is refused by name,
    # before anything runs, instead of being dropped (a newcomer's `--resume RUN --trials 8`
    # used to print the finished 3-trial run and exit 0).
    for extra, named in ((["--trials", "8"], "--trials would be ignored"),
                         ([str(trajectory[-2]), str(trajectory[-1])], "EARLIER, LATER would be"),
                         (["--objective", "loss:x.txt", "--seq-len", "32"],
                          "--objective, --seq-len would be ignored")):
        assert cli(["tune", "--resume", str(out), *extra]) == 2
        assert named in capsys.readouterr().err
    assert cli(["tune-window", "--resume", str(out), "--family", "ema"]) == 2
    assert "--family would be ignored" in capsys.readouterr().err
    assert len(pq.read_table(out / "trials.parquet")) == 4  # untouched


# ---------------------------------------------------------------------------------------------
# Interrupts: SIGINT (Ctrl-C) and SIGTERM (a job scheduler, preemption) to a real `ckmerge-ray tune`

CLI = str(Path(sys.executable).parent / "ckmerge-ray")


def _session_address(ray) -> str:
    """The session's Ray, for a `ckmerge-ray` subprocess to join (as a job joins a cluster):
    its own Ray would cost a start-up (~15 CPU-seconds) per process."""
    return ray.get_runtime_context().gcs_address


def _rows(out: Path) -> list:
    """The table as the run has it now: read while the run replaces it (see `read_rows`)."""
    return read_rows(out / "trials.parquet")


def _journal(out: Path) -> dict:
    """λ file name -> modification time (ns) of every journaled evaluation."""
    return {p.name: p.stat().st_mtime_ns for p in (out / "evaluations").glob("lam=*.json")}


def _signal_after_rows(proc: subprocess.Popen, out: Path, rows: int, send, timeout: float = 300) -> str:
    """Wait until `out`'s table holds `rows` rows while `proc` runs, call `send`, and return
    the process's output once it has exited."""
    deadline = time.time() + timeout
    while len(_rows(out)) < rows:
        assert proc.poll() is None, f"the run ended before it was interrupted:\n{proc.stdout.read()}"
        assert time.time() < deadline, "the run recorded too few trials in time"
        time.sleep(0.1)
    send()
    output, _ = proc.communicate(timeout=240)
    return output


def test_sigterm_to_the_process_group_ends_local_ray_too_and_the_run_still_resumes(
        ray_session, trajectory, tmp_path, capsys):
    """SIGTERM to the whole process group of a `ckmerge-ray tune` that started its own local Ray
    (as Slurm's scancel or systemd's stop send it): Ray's processes end with the signal, so Ray
    Tune can save nothing. The driver still exits 143 at once, having noted the interruption in
    run.json and printed the resume command; before, it waited 60 s for Ray's GCS and exited 1
    with neither. The resume then finishes the run, redoing no journaled evaluation."""
    from tests.test_cluster import _group_alive, _stop_group

    out = tmp_path / "run"
    heldout = trajectory[-1].parent / "heldout.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray
    first = subprocess.Popen(
        [CLI, "tune", str(trajectory[-2]), str(trajectory[-1]), "--objective", f"loss:{heldout}",
         "--seq-len", "64", "--max-tokens", "4096", "--trials", "7", "--max-concurrent", "1",
         "--output", str(out)], env={**env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        sent = []
        log = _signal_after_rows(first, out, 2, lambda: sent.append(time.monotonic()) or
                                 os.killpg(first.pid, signal.SIGTERM), timeout=180)
        waited = time.monotonic() - sent[0]
        assert first.returncode == 143, log
        assert waited < 45, f"the driver waited {waited:.0f}s for the Ray it had lost:\n{log}"
        assert "SIGTERM reached Ray's local processes too" in log, log
        assert f"ckmerge-ray tune --resume {out}" in log, log
        assert json.loads((out / "run.json").read_text())["interrupted"]["signal"] == "SIGTERM"
        deadline = time.monotonic() + 30
        while _group_alive(first.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _group_alive(first.pid), "a process of the stopped run outlived it"
    finally:
        _stop_group(first)
    rows1, journal1 = _rows(out), _journal(out)
    assert 2 <= len(rows1) < 8
    assert cli(["tune", "--resume", str(out)]) == 0  # the lock of the dead driver is taken over
    assert "resuming a run interrupted by SIGTERM" in capsys.readouterr().out
    rows = _rows(out)
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows), rows
    journal = _journal(out)
    assert all(journal[name] == mtime for name, mtime in journal1.items())  # not redone


def test_sigint_and_sigterm_leave_a_resumable_run_that_resume_finishes(ray_session, trajectory,
                                                                      tmp_path, capsys):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) and then SIGTERM (to the
    process, as Kubernetes or a preempted node's scheduler sends it) to a real `ckmerge-ray tune`:
    each exit is 130 / 143 with the run saved, no summary.json or best/ as if it had finished,
    and run.json saying it was interrupted; `--resume` (the last one in this process) goes on to
    the requested number of trials, and every evaluation journaled before an interrupt is
    reused, never computed again (its journal file is never rewritten). Before issue 21 the
    SIGINT run exported best/ from the trials done, wrote summary.json and exited 0, and its
    resume reported it finished. The resume that finishes also publishes best/ to the first
    command's --export-to, which resumes used to drop."""
    out = tmp_path / "run"
    heldout = trajectory[-1].parent / "heldout.jsonl"
    env = {**os.environ, "RAY_ADDRESS": _session_address(ray_session), "PYTHONUNBUFFERED": "1"}
    popen = dict(env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                 start_new_session=True)
    first = subprocess.Popen(
        [CLI, "tune", str(trajectory[-2]), str(trajectory[-1]), "--objective", f"loss:{heldout}",
         "--seq-len", "64", "--max-tokens", "4096", "--trials", "7", "--max-concurrent", "2",
         "--output", str(out), "--export-to", str(tmp_path / "published")], **popen)
    log1 = _signal_after_rows(first, out, 2, lambda: os.killpg(first.pid, signal.SIGINT))
    assert first.returncode == 130, log1
    assert "interrupted by SIGINT" in log1 and f"ckmerge-ray tune --resume {out}" in log1, log1
    # Tune's own console output stays out of the run's: not its experiment box (printed at
    # verbose=0 by its new output engine), nor its `Tuner.restore(...)` advice on an interrupt,
    # which would contradict the command just printed.
    assert "Configuration for experiment" not in log1 and "Tuner.restore" not in log1, log1
    assert not (out / "summary.json").exists() and not (out / "best").exists(), log1
    assert json.loads((out / "run.json").read_text())["interrupted"]["signal"] == "SIGINT"
    assert not (out / "run.lock").exists(), "the interrupted run kept its lock"
    rows1, journal1 = _rows(out), _journal(out)
    assert 2 <= len(rows1) < 8

    second = subprocess.Popen([CLI, "tune", "--resume", str(out)], **popen)
    log2 = _signal_after_rows(second, out, len(rows1) + 2,
                              lambda: os.kill(second.pid, signal.SIGTERM))
    assert second.returncode == 143, log2
    assert "resuming a run interrupted by SIGINT" in log2 and "interrupted by SIGTERM" in log2, log2
    assert not (out / "summary.json").exists() and not (out / "best").exists(), log2
    rows2, journal2 = _rows(out), _journal(out)
    assert len(rows2) < 8, "the SIGTERM came after the last trial: the test tested nothing"

    assert cli(["tune", "--resume", str(out)]) == 0  # here, on the session's Ray
    assert "resuming a run interrupted by SIGTERM" in capsys.readouterr().out
    rows = _rows(out)
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows), rows
    assert len({r["lam"] for r in rows}) == 8 and len({r["trial_id"] for r in rows}) == 8
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed"] and (out / "best" / "config.json").exists()
    # published where the first command said, by the resume that finished it
    assert (tmp_path / "published" / "config.json").exists()
    run = json.loads((out / "run.json").read_text())
    assert [i["signal"] for i in run["interruptions"]] == ["SIGINT", "SIGTERM"]
    assert "interrupted" not in run
    # Every evaluation journaled before an interrupt kept its journal file (never recomputed),
    # and those that had no row yet were reported from the journal.
    journal = _journal(out)
    for before, recorded in ((journal1, rows1), (journal2, rows2)):
        assert all(journal[name] == mtime for name, mtime in before.items())
        recorded_lams = {r["lam"] for r in recorded}
        for r in rows:
            if f"lam={r['lam']!r}.json" in before and r["lam"] not in recorded_lams:
                assert r.get("from_journal"), r
    assert len(journal) == 8


# ---------------------------------------------------------------------------------------------
# Two runs into one output directory

def test_a_second_run_in_a_busy_directory_is_refused_and_a_dead_runs_lock_taken_over(
        ray_session, trajectory, tmp_path, capsys):
    """Two `ckmerge-ray tune` processes on one output directory (a resubmitted job): the second
    exits 2 naming who holds the directory (host, pid, since when) and touches nothing. The
    first is then killed (SIGKILL, as a lost machine or an OOM kill would), leaving its lock: the
    next run on this host finds that pid gone, takes the lock over and runs. A lock held on
    another host cannot be checked from here and is refused with how to clear it. Before issue
    21 nothing stopped a second run: `--resume` on the busy directory drove the same Tune
    experiment from a second process."""
    import socket

    from ckmerge_ray import tune_merge
    from ckmerge_ray.errors import RunError

    out = tmp_path / "run"
    heldout = trajectory[-1].parent / "heldout.jsonl"
    # 40 trials: the first run must still hold its lock when it is killed after the two
    # refusals (with 2 it could finish meanwhile: its lock goes before its process ends).
    args = ["tune", str(trajectory[-2]), str(trajectory[-1]), "--objective", f"loss:{heldout}",
            "--seq-len", "64", "--max-tokens", "1024", "--trials", "40", "--max-concurrent", "1",
            "--no-export", "--output", str(out)]
    env = {**os.environ, "RAY_ADDRESS": _session_address(ray_session)}
    first = subprocess.Popen([CLI, *args], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (out / "run.json").exists():  # locked, and resumable as far as run.json goes
            assert first.poll() is None, first.stdout.read()
            assert time.time() < deadline, "the first run never wrote run.json"
            time.sleep(0.1)
        holder = json.loads((out / "run.lock").read_text())
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()

        # The same command again, and the resubmitted job's usual `--resume`: both refused.
        for again in (args, ["tune", "--resume", str(out)]):
            second = subprocess.run([CLI, *again], env=env, capture_output=True, text=True,
                                    timeout=120)
            assert first.poll() is None, "the first run ended before the second started"
            assert second.returncode == 2, second.stdout + second.stderr
            assert (f"is in use by another run: pid {first.pid} on host {holder['host']}, since "
                    f"{holder['started']}") in second.stderr
            assert "[ckmerge]" not in second.stdout  # refused before any work
        assert (out / "run.lock").exists() and not (out / "summary.json").exists(), \
            "the first run finished before it could be killed"
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the driver (Ray ends its job's workers)
        first.wait()
    assert json.loads((out / "run.lock").read_text()) == holder  # left behind by the dead run

    quick = [("2" if a == "40" else a) for a in args]  # the take-over need not run 40 trials
    assert cli([*quick, "--overwrite"]) == 0
    log = capsys.readouterr().out
    assert f"taking over the lock of {out}: its run (pid {first.pid} on {holder['host']}" in log
    assert not (out / "run.lock").exists() and (out / "summary.json").exists()

    (out / "run.lock").write_text(json.dumps(
        {"host": "gpu-node-7", "pid": 4242, "started": "2026-01-02T03:04:05+00:00"}))
    with pytest.raises(RunError, match=r"in use by another run: pid 4242 on host gpu-node-7, since "
                                       r"2026-01-02T03:04:05\+00:00.*remove .*run\.lock"):
        tune_merge((trajectory[-2], trajectory[-1]), {"cpu": 1}, objective=f"loss:{heldout}",
                   output_dir=out, overwrite=True)


def test_the_journal_answers_a_lambda_re_proposed_up_to_the_optimizers_tolerance(tmp_path):
    # What a restored searcher did in CI: the trial at 0.8314909490626584 finished after Tune's
    # last snapshot, and the restored GP proposed 0.8314909237243263 for it.
    from ckmerge_ray.trial import LAM_MATCH, SCREEN, read_journal, write_journal

    journal = str(tmp_path / "evaluations")
    assert read_journal(journal, 0.5) is None  # no journal yet
    write_journal(journal, 0.8314909490626584, {"score": 4.76, "lam": 0.8314909490626584})
    write_journal(journal, 0.8314910, {"score": 9.0, "lam": 0.8314910}, SCREEN)
    hit = read_journal(journal, 0.8314909237243263)
    assert hit == {"score": 4.76, "lam": 0.8314909490626584}  # the λ that was merged
    assert read_journal(journal, 0.8314909490626584 + 2 * LAM_MATCH) is None
    assert read_journal(journal, 0.8314909237243263, SCREEN)["score"] == 9.0
    assert read_journal(journal, 0.5, SCREEN) is None
