"""Adjacent pairs tuned at once (`ckmerge_ray.pairs`), on a simulated two-node cluster
(`ray.cluster_utils.Cluster`): a sweep runs its pairs two at a time with the right checkpoints
each, every checkpoint is put into the object store once and crosses to the worker node at most
once; a watch tunes pairs concurrently while it polls and publishes the newest pair. The speed
of concurrency is measured in benchmarks/pair_concurrency.py, not here."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file, save_file

from ckmerge_ray.errors import ConfigError
from ckmerge_ray.pairs import window_bytes
from tests.test_cluster import _run_script


def extend_trajectory(trajectory, out: Path, n: int) -> list[Path]:
    """`n` checkpoints in `out`: copies of `trajectory` (three), then extrapolations along its
    last step, Θ(t) + s·(Θ(t) - Θ(t-1)) for s = 0.5, 1, ... (not trained: enough to tune)."""
    shutil.copy(trajectory[-1].parent / "heldout.jsonl", out / "heldout.jsonl")
    paths = [Path(shutil.copytree(p, out / p.name)) for p in trajectory]
    a, b = (load_file(p / "model.safetensors") for p in trajectory[-2:])
    for i in range(len(paths), n):
        dst = Path(shutil.copytree(trajectory[-1], out / f"checkpoint-{40 * (i + 1)}"))
        s = 0.5 * (i - 2)
        save_file({k: (b[k] + s * (b[k] - a[k])).contiguous() for k in b},
                  dst / "model.safetensors", metadata={"format": "pt"})
        paths.append(dst)
    return paths


CLI = str(Path(sys.executable).with_name("ckmerge-ray"))


def test_window_bytes_is_the_largest_run_of_p_plus_one_checkpoints():
    assert window_bytes([1, 5, 2, 7], 1) == 9
    assert window_bytes([1, 5, 2, 7], 2) == 14
    assert window_bytes([1, 5, 2, 7], 9) == 15
    assert window_bytes([], 2) == 0


PAIRS = r'''
import json, sys, time
import ray
from ray._private import internal_api
from ray.cluster_utils import Cluster

from ckmerge_ray import sweep_trajectory, watch_trajectory
from ckmerge_ray.checkpoints import load_checkpoint_info

root, out = sys.argv[1:3]
MiB = 2**20
OBJ = {"seq_len": 64, "max_tokens": 1024}
# One trial slot per node: the sweep's default then runs 2 pairs of 1 trial at a time.
cluster = Cluster(initialize_head=True, head_node_args=dict(
    num_cpus=1, object_store_memory=150 * MiB, include_dashboard=False))
cluster.add_node(num_cpus=1, object_store_memory=150 * MiB)
cluster.wait_for_nodes()
report = {}
try:
    ray.init(address=cluster.address, logging_level="WARNING")
    head = ray.get_runtime_context().get_node_id()
    nodes = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
    worker = next(n for n in nodes if n != head)

    def created(node_id):
        n = nodes[node_id]
        return internal_api.node_stats(n["NodeManagerAddress"], n["NodeManagerPort"],
                                       include_memory_info=False).store_stats.cumulative_created_bytes

    before = created(worker)
    sweep = sweep_trajectory(root, {"cpu": 1}, objective=f"loss:{root}/heldout.jsonl",
                             objective_options=OBJ, num_trials=2, output_dir=out + "/sweep")
    report["sweep_worker_created"] = created(worker) - before
    report["sweep_rows"] = sweep.table.to_pylist()
    report["sweep_summary"] = sweep.summary
    report["bytes"] = {p: load_checkpoint_info(f"{root}/{p}").nbytes
                       for p in sweep.summary["object_store"]["puts_per_checkpoint"]}

    watch = watch_trajectory(root, {"cpu": 1}, f"loss:{root}/heldout.jsonl",
                             objective_options=OBJ, num_trials=2, max_concurrent=1,
                             output_dir=out + "/watch", poll_seconds=0.2, max_pairs=2,
                             idle_timeout=30)
    report["watch_rows"] = watch.table.to_pylist()
    report["watch_summary"] = watch.summary
finally:
    ray.shutdown()
    cluster.shutdown()
print("REPORT " + json.dumps(report, default=str))
'''


def _overlap(rows) -> bool:
    """Whether some two pairs ran at the same time (their start-to-finish intervals meet)."""
    return any(a["started_at"] < b["finished_at"] and b["started_at"] < a["finished_at"]
               for i, a in enumerate(rows) for b in rows[i + 1:])


@pytest.mark.timeout(300, func_only=True)
def test_sweep_and_watch_tune_pairs_concurrently_on_two_nodes(trajectory, tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    ckpts = extend_trajectory(trajectory, root, 4)
    stdout, _ = _run_script(tmp_path, "pairs.py", PAIRS, [root, tmp_path / "out"], 280,
                            "concurrent pairs")
    report = json.loads(next(ln for ln in stdout.splitlines() if ln.startswith("REPORT "))[7:])

    # The sweep: 3 pairs, 2 at a time (the default on 2 slots), 1 trial at a time each.
    rows, summary = report["sweep_rows"], report["sweep_summary"]
    assert summary["pairs_at_once"] == 2 and summary["trials_at_once_per_pair"] == 1
    assert [(r["earlier_step"], r["later_step"], r["status"]) for r in rows] == \
        [(40, 80, "ok"), (80, 120, "ok"), (120, 160, "ok")]
    assert _overlap(rows), [(r["started_at"], r["finished_at"]) for r in rows]
    # Each pair merged its own checkpoints (runs of one driver register their trainables
    # apart): the checkpoint two pairs share scored the same in both.
    for a, b in zip(rows, rows[1:]):
        assert a["later_score"] == pytest.approx(b["earlier_score"], abs=1e-6)
    assert len({r["later_score"] for r in rows}) == 3
    # Put into the store once each, and pulled by the worker node at most once each: its
    # store created at most every checkpoint's bytes, plus Tune's and the plans' small objects.
    names = [p.name for p in ckpts]
    assert summary["object_store"]["puts_per_checkpoint"] == {n: 1 for n in names}
    total = sum(report["bytes"].values())
    assert 0 < report["sweep_worker_created"] < total + min(report["bytes"].values()), \
        (report["sweep_worker_created"], report["bytes"])

    # The watch: 2 pairs at once (2 slots over max_concurrent=1), rows in pair order, the
    # newest pair published as latest/ whichever finished first.
    rows, summary = report["watch_rows"], report["watch_summary"]
    assert [(r["earlier_step"], r["later_step"], r["status"]) for r in rows] == \
        [(40, 80, "ok"), (80, 120, "ok")]
    assert _overlap(rows), [(r["started_at"], r["finished_at"]) for r in rows]
    assert summary["latest"]["pair"] == 1
    assert (tmp_path / "out" / "watch" / "latest" / "config.json").exists()
    assert all(summary["object_store"]["puts_per_checkpoint"][n] == 1 for n in names[:3])


def _journal(run: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in (run / "evaluations").glob("lam=*.json")}


def _signal_with_two_pairs_in_flight(args, out: Path, trajectory, sig) -> tuple:
    """Start the CLI `args`; once both adjacent pairs of `trajectory` have journaled an
    evaluation, send `sig`. Returns (exit code, log, the two pairs' run directories)."""
    driver = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    runs = [out / "pairs" / f"{k:02d}-{a.name}-{b.name}"
            for k, (a, b) in enumerate(zip(trajectory, trajectory[1:]))]
    try:
        deadline = time.monotonic() + 240
        while not all(_journal(r) for r in runs) and time.monotonic() < deadline:
            assert driver.poll() is None, driver.stdout.read()
            time.sleep(0.1)
        assert all(_journal(r) for r in runs), "the two pairs never both journaled"
        driver.send_signal(sig)
        log, _ = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
    return driver.returncode, log, runs


def test_ctrl_c_stops_every_pair_in_flight_and_a_sweep_resume_finishes_them(
        ray_session, trajectory, tmp_path):
    """SIGINT to `ckmerge-ray sweep` while two pairs run at once: exit 130, no row for a pair
    that did not finish. `sweep --resume` with other search arguments is refused, naming them;
    with the same ones it finishes both pairs and redoes no journaled evaluation."""
    from ckmerge_ray.sweep import sweep_trajectory

    out = tmp_path / "sweep"
    heldout = trajectory[0].parent / "heldout.jsonl"
    address = ray_session.get_runtime_context().gcs_address  # join this cluster: one Ray
    args = [CLI, "sweep", str(trajectory[0].parent), "--objective", f"loss:{heldout}",
            "--seq-len", "64", "--max-tokens", "1024", "--trials", "4", "--max-concurrent", "1",
            "--max-concurrent-pairs", "2", "--output", str(out), "--address", address]
    code, log, runs = _signal_with_two_pairs_in_flight(args, out, trajectory, signal.SIGINT)
    assert code == 130, log
    assert "interrupted by SIGINT" in log and "pairs in flight stopped" in log, log
    assert "the same arguments and --resume" in log, log
    before = {r: _journal(r) for r in runs}
    done = pq.read_table(out / "sweep.parquet").num_rows if (out / "sweep.parquet").exists() else 0
    assert done < 2  # a pair interrupted mid-run has no row

    changed = [a if a != "4" else "5" for a in args]  # --trials 5
    refused = subprocess.run(changed + ["--resume"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "cannot resume" in refused.stderr and "num_trials=5" in refused.stderr, refused.stderr
    with pytest.raises(ConfigError, match="nothing to resume in .*: no sweep.json"):
        sweep_trajectory(trajectory, objective=f"loss:{heldout}", resume=True,
                         output_dir=str(tmp_path / "empty"))
    old = tmp_path / "old"  # a sweep from before sweep.json: a table, nothing to match it to
    old.mkdir()
    (old / "sweep.parquet").touch()
    with pytest.raises(ConfigError, match="without its sweep.json .* cannot be resumed as a "
                                          "whole; pass overwrite=True"):
        sweep_trajectory(trajectory, objective=f"loss:{heldout}", resume=True, output_dir=old)

    resumed = subprocess.run(args + ["--resume"], capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming the sweep in {out}: {done} of 2 pair(s) done" in resumed.stdout
    rows = pq.read_table(out / "sweep.parquet").to_pylist()
    assert [(r["pair"], r["status"]) for r in rows] == [(0, "ok"), (1, "ok")]
    for run in runs:
        now = _journal(run)
        assert all(now[name] == mtime for name, mtime in before[run].items())  # not redone
        assert len(now) == 5  # λ = 0 and the 4 trials, each evaluated once
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["pairs"], summary["pairs_ok"], summary["pairs_resumed"]) == (2, 2, done)
    assert summary["plots"] and all((out / p).exists() for p in summary["plots"])

    tables = {r: (r / "trials.parquet").stat().st_mtime_ns for r in runs}
    again = subprocess.run(args + ["--resume"], capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resuming the sweep in {out}: 2 of 2 pair(s) done" in again.stdout, again.stdout
    assert pq.read_table(out / "sweep.parquet").to_pylist() == rows  # nothing tuned again
    assert all((r / "trials.parquet").stat().st_mtime_ns == t for r, t in tables.items())


def test_a_watch_resumes_after_the_gap_free_start_of_its_table(tmp_path):
    """Pairs run together finish out of order: a watch killed with pair 0 in flight and pair 1
    recorded resumes with pair 0 and passes over pair 1; with pairs 0 and 2 recorded, from
    pair 0's later checkpoint, numbering on at 1."""
    from ckmerge_ray.config import CheckpointConfig, Resources, SearchConfig
    from ckmerge_ray.storage import locate
    from ckmerge_ray.watch import _Watch

    def row(k, a, b):
        return {"pair": k, "earlier_step": a, "later_step": b, "status": "error",
                "run_dir": f"pairs/{k:02d}"}

    def watch(rows):
        return _Watch(locate(str(tmp_path)), tmp_path, lambda m: None, Resources.of(None),
                      CheckpointConfig(), SearchConfig(), {}, "loss:x", None, None, rows)

    w = watch([row(1, 80, 120)])
    assert (w.next_pair, w.frontier, w.resuming) == (0, None, False)
    w = watch([row(0, 40, 80), row(2, 120, 160)])
    assert (w.next_pair, w.frontier, w.resuming) == (1, 80, True)


def test_sigterm_stops_a_watch_with_pairs_in_flight_and_resume_redoes_nothing(
        ray_session, trajectory, tmp_path):
    """SIGTERM to `ckmerge-ray watch` with two pairs running at once: exit 143; `--resume`
    then finishes both pairs, reusing every journaled evaluation."""
    out = tmp_path / "watch"
    heldout = trajectory[0].parent / "heldout.jsonl"
    address = ray_session.get_runtime_context().gcs_address
    args = [CLI, "watch", str(trajectory[0].parent), "--objective", f"loss:{heldout}",
            "--seq-len", "64", "--max-tokens", "1024", "--trials", "4", "--max-concurrent", "1",
            "--max-concurrent-pairs", "2", "--poll-seconds", "0.2", "--max-pairs", "2",
            "--idle-timeout", "60", "--output", str(out), "--address", address]
    code, log, runs = _signal_with_two_pairs_in_flight(args, out, trajectory, signal.SIGTERM)
    assert code == 143, log
    assert "watch stopped by SIGTERM" in log, log
    before = {r: _journal(r) for r in runs}
    resumed = subprocess.run(args + ["--resume"], capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    rows = pq.read_table(out / "sweep.parquet").to_pylist()
    assert [(r["later_step"], r["status"]) for r in rows] == [(80, "ok"), (120, "ok")]
    for run in runs:
        now = _journal(run)
        assert all(now[name] == mtime for name, mtime in before[run].items())  # not redone
        assert len(now) == 5 == len(pq.read_table(run / "trials.parquet"))


def test_overwriting_a_watch_with_a_sweep_removes_what_the_watch_published(tmp_path):
    """`--overwrite` of a watch's directory by a sweep (or the reverse) removes what either
    kind writes: a stale best_overall/ beside fresh sweep results could be served by mistake."""
    from ckmerge_ray.config import RunConfig
    from ckmerge_ray.rundir import claim_series_dir

    out = tmp_path / "out"
    for d in ("latest", "best_overall", "pairs/00-a-b"):
        (out / d).mkdir(parents=True)
    for f in ("watch.json", "sweep.parquet", "summary.json", "sweep_gain.png"):
        (out / f).write_text("{}")
    with pytest.raises(ConfigError, match=r"already holds a sweep or watch \(watch.json, "
                                          r"sweep.parquet\)"):
        claim_series_dir(out, "sweep.json", {"k": 1}, RunConfig())
    assert claim_series_dir(out, "sweep.json", {"k": 1}, RunConfig(overwrite=True)) == []
    assert sorted(p.name for p in out.iterdir()) == ["sweep.json"]
