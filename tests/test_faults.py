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


def export_pair(earlier, later, dest, lam, progress=None):
    """Store the pair and export its merge at λ to `dest` (the export step of a run). The killed
    export runs this in a subprocess (EXPORT_SCRIPT); the others run it here, on the session's
    Ray, which spares two interpreters importing torch and Ray and two Ray start-ups."""
    from pathlib import Path

    from ckmerge_ray.checkpoints import load_checkpoint_info, plan_shards
    from ckmerge_ray.results import export_merged
    from ckmerge_ray.store import put_checkpoint

    a, b = load_checkpoint_info(earlier), load_checkpoint_info(later)
    plan = plan_shards(b, 1 << 30)
    ref = {}
    sa, sb = put_checkpoint(a, plan, reference=ref), put_checkpoint(b, plan, reference=ref)
    export_merged(sa, sb, lam, (b.path / "config.json").read_bytes(), [], Path(dest),
                  progress=progress)


EXPORT_SCRIPT = r'''
import os, signal, sys
root, earlier, later, dest, lam = sys.argv[1:6]
sys.path.insert(0, root)
import ray
from tests.test_faults import export_pair

ray.init()  # joins the session's Ray (RAY_ADDRESS), as a job joins a cluster

def progress(msg):  # killed for real after the first shard is on disk
    print(msg, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

export_pair(earlier, later, dest, float(lam), progress=progress)
print("EXPORTED", flush=True)
'''


def test_export_killed_midway_leaves_no_partial_model(ray_session, trajectory_bf16, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    root = Path(__file__).resolve().parent.parent
    script = tmp_path / "export.py"
    script.write_text(EXPORT_SCRIPT)
    earlier, later = trajectory_bf16[-2], trajectory_bf16[-1]
    dest = tmp_path / "best"
    export_pair(earlier, later, dest, 0.6)
    before = {f.name: f.read_bytes() for f in dest.iterdir()}
    assert sum(name.endswith(".safetensors") for name in before) > 1  # several shards

    killed = subprocess.run(
        [sys.executable, str(script), str(root), str(earlier), str(later), str(dest), "0.9"],
        capture_output=True, text=True, timeout=180,
        env={**__import__("os").environ,
             "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address})
    assert killed.returncode == -9 and "exported shard 1/" in killed.stdout, killed.stdout + killed.stderr
    assert "EXPORTED" not in killed.stdout
    assert {f.name: f.read_bytes() for f in dest.iterdir()} == before, "the old best/ was touched"
    leftovers = list(tmp_path.glob(".best-tmp-*"))
    assert leftovers, "the kill came before the export started: the test tested nothing"

    export_pair(earlier, later, dest, 0.9)  # the next export puts right what the kill left
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


# ---------------------------------------------------------------------------------------------
# A disk that fills

@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs mounted for this test (root only: skipped, with the reason, elsewhere)."""
    import os
    import subprocess

    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip(f"mounting a size-limited tmpfs needs root (id -u is {os.geteuid()})")
    try:
        mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)],
                               capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        pytest.skip("no mount command to mount a size-limited tmpfs")
    if mount.returncode:
        pytest.skip(f"cannot mount a tmpfs at {mnt}: {mount.stderr.strip() or mount.returncode}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def test_a_full_disk_stops_the_run_intact_and_a_resume_finishes_it(ray_session, trajectory,
                                                                    small_disk, tmp_path):
    """The run's directory on a 16 MiB tmpfs that fills for real (a ballast file grown during an
    evaluation, as another process on a shared disk would) while the run writes, in turn, the
    journal, the table and best/. Each time the run stops with an OutputError naming what it
    could not write; the table, the journal and the previous best/ stay complete and readable,
    they agree, and no half-written file is left; after the space is freed a resume goes on,
    never recomputing a journaled evaluation, and finishes. (Ray Tune's own experiment is kept
    off the small disk with storage_path, so that the disk fills where the test says.) Before
    issue 21 the journal's ENOSPC failed the trial and Tune retried it, and the table's and the
    export's surfaced as raw OSError / SafetensorError."""
    import json
    import shutil

    import pyarrow.parquet as pq

    from ckmerge_ray.errors import OutputError

    pair = (trajectory[-2], trajectory[-1])
    out, ballast, tokens = small_disk / "run", small_disk / "ballast", tmp_path / "tokens"
    tokens.mkdir()
    shutil.copytree(pair[1], out / "best")  # an earlier run's best/ (any complete model serves)
    previous = {f.name: f.read_bytes() for f in (out / "best").iterdir()}
    obj = faulty.FillsTheDisk(pair[1].parent / "heldout.jsonl", tokens, ballast, **SEQ)
    kw = dict(objective=obj, num_trials=5, max_concurrent=1, output_dir=out, seed=0,
              storage_path=str(tmp_path / "ray"), progress=False)
    journals = []  # each stop's journal: file name -> modification time

    def arm(**plan) -> None:
        (tokens / "fill.json").write_text(json.dumps(plan))

    def intact(rows: int) -> None:
        table = pq.read_table(out / "trials.parquet").to_pylist()
        assert len(table) == rows and all(r["status"] == "ok" for r in table), table
        journal = {json.loads(p.read_text())["lam"]: json.loads(p.read_text())["score"]
                   for p in (out / "evaluations").glob("lam=*.json")}
        assert all(journal[r["lam"]] == r["score"] for r in table)  # every row journaled
        journals.append({p.name: p.stat().st_mtime_ns for p in (out / "evaluations").iterdir()})
        assert {f.name: f.read_bytes() for f in (out / "best").iterdir()} == previous
        assert not (out / "summary.json").exists()
        assert not [p.name for p in out.rglob(".*")], "a half-written file was left"
        ballast.unlink()  # the space is freed
        (tokens / "fill.json").unlink(missing_ok=True)

    arm(leave=0, skip=2)  # the third evaluation's journal finds no space
    with pytest.raises(OutputError, match=r"cannot record the evaluation at λ=.* in the run's "
                                          r"journal .*No space left on device"):
        tune_merge(pair, {"cpu": 1}, **kw)
    intact(rows=2)
    arm(leave=8192)  # one page: the next evaluation's journal fits, the table does not
    with pytest.raises(OutputError, match=r"cannot write the trials table .*trials\.parquet "
                                          r"\(No space left on device"):
        tune_merge(pair, {"cpu": 1}, **kw, resume=True)
    intact(rows=3)  # + the third trial's row, from Tune's record of it
    arm(leave=128 * 1024, repeat=True)  # journal and table fit, the 300 KB model does not
    with pytest.raises(OutputError, match=r"cannot write the best model .*best \(.*No space "
                                          r"left on device"):
        tune_merge(pair, {"cpu": 1}, **kw, resume=True)
    intact(rows=6)

    result = tune_merge(pair, {"cpu": 1}, **kw, resume=True)
    rows = result.table.to_pylist()
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows)
    assert len({r["lam"] for r in rows}) == 6 and len({r["trial_id"] for r in rows}) == 6
    journal = {json.loads(p.read_text())["lam"]: json.loads(p.read_text())["score"]
               for p in (out / "evaluations").glob("lam=*.json")}
    assert journal == {r["lam"]: r["score"] for r in rows}  # the journal and the table agree
    final = {p.name: p.stat().st_mtime_ns for p in (out / "evaluations").iterdir()}
    for before in journals:  # no journaled evaluation was computed again
        assert all(final[name] == mtime for name, mtime in before.items())
    assert (out / "summary.json").exists() and (out / "best" / "config.json").exists()
    assert {f.name: f.read_bytes() for f in (out / "best").iterdir()} != previous


def test_the_trials_table_reads_whole_while_the_run_replaces_it(tmp_path):
    """A reader following a run (resume, watch, a user's notebook) while the run replaces
    trials.parquet after each trial: `read_rows` always gets a whole table. Real threads, real
    files; `pq.read_table(path)` failed about one read in three here ("Page was smaller than
    expected": it opens the path twice, and a rename in between mixes two files)."""
    import threading
    import time

    from ckmerge_ray.results import read_rows, write_table_atomic

    path = tmp_path / "trials.parquet"
    stop = threading.Event()

    def writer():
        n = 0
        while not stop.is_set():
            n += 1
            write_table_atomic(path, [{"lam": i / 7, "score": float(i), "status": "ok"}
                                      for i in range(n % 40 + 1)])

    write_table_atomic(path, [{"lam": 0.0, "score": 0.0, "status": "ok"}])
    thread = threading.Thread(target=writer)
    thread.start()
    sizes, deadline = [], time.monotonic() + 1.5
    try:
        while time.monotonic() < deadline:
            rows = read_rows(path)
            assert [r["score"] for r in rows] == [float(i) for i in range(len(rows))]
            sizes.append(len(rows))
    finally:
        stop.set()
        thread.join()
    assert len(set(sizes)) > 5, "the writer hardly ran: the race was not exercised"
    assert read_rows(tmp_path / "none.parquet") == []


def test_a_full_disk_under_a_comparison_or_a_watch_is_one_error_that_says_what_to_do(small_disk):
    """compare's table (rewritten after every method) and a watch's settings on a disk that is
    full for real: an OutputError naming the file, the cause and what to do once there is space
    (the CLI's exit 2 with one line), not a raw OSError traceback as before."""
    from ckmerge_ray.compare_table import Table
    from ckmerge_ray.errors import OutputError
    from ckmerge_ray.config import RunConfig
    from ckmerge_ray.watch_outputs import claim_watch_dir

    (small_disk / "compare").mkdir()
    faulty.fill(small_disk / "ballast", 0)
    table = Table(small_disk / "compare", "min", [])
    with pytest.raises(OutputError, match=r"cannot write the comparison's table .*compare\.parquet"
                                          r" \(No space left on device.* run the comparison "
                                          r"again with --overwrite"):
        table.add("endpoint", "later checkpoint", 3.5, 1, 0.1, [0.0, 1.0], "none")
    assert not [p.name for p in (small_disk / "compare").iterdir()], "a partial file was left"
    with pytest.raises(OutputError, match=r"cannot write the watch's settings .*watch\.json .*"
                                          r"No space left on device.*start the watch again"):
        claim_watch_dir(small_disk / "watch", {"source": "x"}, RunConfig())
