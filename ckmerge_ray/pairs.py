"""Adjacent pairs tuned at once, for `sweep` and `watch`: how many, the pool that runs them, and
each pair's (or a sweep's window's) own run (`tune_pair`, `tune_window_at`) with its table row.

Each pair in flight is its own `tune_merge` run, in a thread of the driver: its own Tune
experiment, directory, journal, results and resume, exactly as a pair tuned alone. The cluster's
trial slots are shared by Ray's scheduler, which every pair's trials ask for the same per-trial
resources. Why not one Tune experiment over several searchers: a pair would no longer be a run
that can be inspected, resumed or compared on its own, and GP-Hedge's batches would mix pairs.
Ray Tune supports its loop outside the main thread (``ray/tune/tune.py``: it then installs no
signal handler); `interrupts` passes Ctrl-C and SIGTERM on to every pair, and the trainable of
each run is registered under its own name (`experiment.register_run_trainable`).

The main thread reads each checkpoint and puts it into the object store once, then hands the
shards to the pairs that need them; its own reference goes as soon as no pair still to be
submitted needs it, so Ray frees a checkpoint once the pairs in flight that hold it are done.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence, Tuple

from ckmerge_ray.checkpoints import CheckpointInfo
from ckmerge_ray.cluster import STORE_BUDGET, smallest_store, trial_slots
from ckmerge_ray.config import Resources
from ckmerge_ray.errors import RunError
from ckmerge_ray.interrupts import RunGuard, stop_all_runs
from ckmerge_ray.results import PAIRS_DIR, SUMMARY_FILE, WINDOWS_DIR
from ckmerge_ray.store import StoredCheckpoint, pair_digest

Log = Callable[[str], None]


def pair_concurrency(pairs_at_once: Optional[int], per_pair: Optional[int], resources: Resources,
                     num_trials: int, num_pairs: int, sizes: Sequence[int],
                     span: int = 2) -> Tuple[int, int]:
    """(pairs at once p, trials at once per pair q) on the connected cluster.

    Given `pairs_at_once` and `per_pair` (`max_concurrent`), those. Without `pairs_at_once`:
    as many pairs as the trial slots hold `per_pair` trials each, and as the object store of the
    smallest node that runs trials holds p + span - 1 checkpoints of `sizes` (bytes, oldest
    first; `span` 2 for pairs, k for a sweep's windows of k) within `STORE_BUDGET`; at most `num_pairs`, at least 1. Without `per_pair`: the slots shared
    evenly among the p pairs (so 4 slots and 4 pairs give 4 pairs of one trial at a time, which
    is also GP-Hedge's most sample-efficient batch size; see BENCHMARKS.md).
    """
    slots = trial_slots(resources, None, num_trials * max(num_pairs, 1))
    if pairs_at_once is None:
        fit = max(1, slots // (per_pair or 1))
        store = int(smallest_store(resources)[0]["Resources"].get("object_store_memory", 0))
        while fit > 1 and window_bytes(sizes, fit, span) > STORE_BUDGET * store:
            fit -= 1
        pairs_at_once = max(1, min(fit, num_pairs))
    if per_pair is None:
        per_pair = max(1, min(num_trials, math.ceil(slots / pairs_at_once)))
    return pairs_at_once, per_pair


def window_bytes(sizes: Sequence[int], pairs_at_once: int, span: int = 2) -> int:
    """Bytes of the most checkpoints in the object store at once when `pairs_at_once` adjacent
    pairs (windows of `span` checkpoints) run together: the largest run of p + span - 1
    consecutive checkpoints."""
    n = min(len(sizes), pairs_at_once + span - 1)
    return max(sum(sizes[i:i + n]) for i in range(len(sizes) - n + 1)) if sizes else 0


class PairPool:
    """Runs up to `workers` pairs at once (a context manager); with one worker, each in the
    calling thread when submitted, as a sequential sweep did.

    While it is open, the first SIGINT or SIGTERM is passed to every pair, whose Tune loop stops
    at its next step (the pair then raises `RunInterrupted`; it resumes like any run), and
    `stop_requested` tells the caller to submit no more; a second signal stops at once. An
    exception leaving the pool stops the pairs still running, and the pool waits for them.
    """

    def __init__(self, workers: int, log: Log):
        self.workers, self.log = workers, log
        self._pending: Dict[cf.Future, Hashable] = {}
        self._executor: Optional[cf.ThreadPoolExecutor] = None
        self._guard: Optional[RunGuard] = None

    def __enter__(self) -> "PairPool":
        if self.workers > 1:
            self._guard = RunGuard(self.log).__enter__()
            self._guard.in_tune_loop = True  # a first signal is recorded (and passed on) only
            self._executor = cf.ThreadPoolExecutor(self.workers, thread_name_prefix="pair")
        return self

    def __exit__(self, kind, error, tb) -> bool:
        try:
            if error is not None and self._pending:
                stop_all_runs(error)
            if self._executor is not None:
                self._executor.shutdown(wait=True)
        finally:
            if self._guard is not None:
                self._guard.__exit__(kind, error, tb)
        return False

    @property
    def full(self) -> bool:
        return len(self._pending) >= self.workers

    @property
    def stop_requested(self) -> bool:
        return self._guard is not None and self._guard.stop_requested

    @property
    def signum(self) -> Optional[int]:
        return self._guard.signum if self._guard is not None else None

    def submit(self, key: Hashable, fn: Callable[..., Any], *args, **kwargs) -> None:
        """Run ``fn(*args, **kwargs)`` as pair `key` (now, in this thread, with one worker)."""
        if self._executor is None:
            future: cf.Future = cf.Future()
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as e:  # noqa: BLE001 - handed to the caller by finished()
                future.set_exception(e)
        else:
            future = self._executor.submit(fn, *args, **kwargs)
        self._pending[future] = key

    def finished(self, timeout: Optional[float] = None) -> List[Tuple[Hashable, cf.Future]]:
        """Pairs that are done, in submission order: waits up to `timeout` seconds (None: until
        one is) when none is. Their futures' ``result()`` gives the value or raises."""
        if not self._pending:
            return []
        done, _ = cf.wait(list(self._pending), timeout=timeout,
                          return_when=cf.FIRST_COMPLETED)
        ordered = [f for f in self._pending if f in done]
        return [(self._pending.pop(f), f) for f in ordered]

    def wait_for_room(self) -> List[Tuple[Hashable, cf.Future]]:
        """The pairs that finished while the pool was full (none when it was not)."""
        out: List[Tuple[Hashable, cf.Future]] = []
        while self.full:
            out += self.finished(timeout=1.0)
        return out

    def drain(self) -> List[Tuple[Hashable, cf.Future]]:
        """Every pair still running, as each finishes."""
        out: List[Tuple[Hashable, cf.Future]] = []
        while self._pending:
            out += self.finished(timeout=1.0)
        return out


# --- one pair's (or window's) own run, as a sweep or a watch starts it ---------------------------


def pair_run_dir(k: int, earlier: CheckpointInfo, later: CheckpointInfo) -> Path:
    """Pair k's tune run, relative to the sweep (or watch) directory."""
    return Path(PAIRS_DIR) / f"{k:02d}-{earlier.name}-{later.name}"


def window_run_dir(k: int, infos: Sequence[CheckpointInfo]) -> Path:
    """Window k's tune_window run, relative to the sweep directory."""
    return Path(WINDOWS_DIR) / f"{k:02d}-{infos[0].name}-{infos[-1].name}"


def pair_plots(out: Path, rows: Sequence[Dict]) -> List[str]:
    """The plots of the finished pairs (or windows) in `rows`, relative to `out`, as their
    runs' summary.json list them (a resumed sweep or watch draws them again)."""
    plots = []
    for r in rows:
        if r["status"] == "ok":
            try:
                summary = json.loads((out / r["run_dir"] / SUMMARY_FILE).read_text())
            except (OSError, ValueError):
                continue
            plots += [(Path(r["run_dir"]) / p).as_posix() for p in summary.get("plots", [])]
    return plots


def pair_export_to(export_to: Optional[str], run_dir: Path) -> Optional[str]:
    """Where the pair whose run is `run_dir` publishes its best/, given a sweep's (or watch's)
    ``export_to`` prefix (a path or URI): ``<export_to>/<run_dir's name>/best``; None without."""
    if export_to is None:
        return None
    return f"{export_to.rstrip('/')}/{run_dir.name}/best"


def tune_pair(k: int, infos: Tuple[CheckpointInfo, CheckpointInfo], steps: Tuple[int, int],
              stored: Tuple[StoredCheckpoint, StoredCheckpoint], out: Path, tuned: Dict[str, Any],
              resources: Resources, log: Log, resume: bool = False,
              failures: Tuple[type, ...] = (RunError,)) -> Tuple[Dict, List[str], Any]:
    """Tune pair k (earlier, later) from its stored shards in ``out/pairs/<k>-<names>``: the
    row of sweep.parquet, the pair run's plots (relative to `out`) and its `TuneMergeResult`
    (None when it failed). `tuned`: tune_merge's keywords but the run directory; its run's
    ``export_to``, if set, is the sweep's prefix (the pair publishes to `pair_export_to`);
    `resume` continues the pair's own run (no finished evaluation is redone). An error of a
    kind in `failures` is recorded in the row (status "error") instead of raised: the other
    pairs may still succeed."""
    from ckmerge_ray.tuner import tune_merge

    earlier, later = infos
    run_dir = pair_run_dir(k, earlier, later)
    t0 = time.perf_counter()
    row = {"pair": k, "earlier": str(earlier.source), "later": str(later.source),
           "earlier_step": steps[0], "later_step": steps[1],
           "run_dir": str(run_dir), "store_digest": pair_digest(*stored),
           "started_at": time.time()}
    run = dataclasses.replace(tuned["run"], output_dir=str(out / run_dir), resume=resume,
                              export_to=pair_export_to(tuned["run"].export_to, run_dir))
    result, plots = None, []
    try:
        result = tune_merge((earlier.source, later.source), resources, stored=stored,
                            **{**tuned, "run": run})
    except failures as e:  # every trial of this pair failed: the others may not
        row.update(status="error", error=f"{type(e).__name__}: {e}")
        log(f"pair {earlier.name} -> {later.name} FAILED: {row['error']}")
    else:
        row.update(pair_row(result))
        plots = [(run_dir / p).as_posix() for p in result.summary.get("plots", [])]
    row["wall_s"] = time.perf_counter() - t0
    row["finished_at"] = time.time()
    return row, plots, result


def tune_window_at(k: int, infos: Sequence[CheckpointInfo], steps: Tuple[int, int],
                   stored: Sequence[StoredCheckpoint], out: Path, tuned: Dict[str, Any],
                   resources: Resources, log: Log, resume: bool = False
                   ) -> Tuple[Dict, List[str], Any]:
    """`tune_pair` for window k of a sweep (`tune_window` over `infos`, ``windows/<k>-<first>-
    <last>``): its row of sweep.parquet, its plots (relative to `out`) and its result."""
    from ckmerge_ray.window import tune_window

    run_dir = window_run_dir(k, infos)
    t0 = time.perf_counter()
    row = {"pair": k, "earlier": str(infos[0].source), "later": str(infos[-1].source),
           "earlier_step": steps[0], "later_step": steps[1], "window": len(infos),
           "family": tuned["family"].label, "run_dir": str(run_dir), "started_at": time.time()}
    run = dataclasses.replace(tuned["run"], output_dir=str(out / run_dir), resume=resume,
                              export_to=pair_export_to(tuned["run"].export_to, run_dir))
    result, plots = None, []
    try:
        result = tune_window([i.source for i in infos], resources, stored=stored,
                             **{**tuned, "run": run})
    except RunError as e:
        row.update(status="error", error=f"{type(e).__name__}: {e}")
        log(f"window {infos[0].name} -> {infos[-1].name} FAILED: {row['error']}")
    else:
        later = result.single_scores.get(infos[-1].name, math.nan)
        sign = 1.0 if result.mode == "min" else -1.0
        row.update(status="ok", error=None, later_score=later, best_score=result.best_score,
                   best_weights=json.dumps([round(x, 6) for x in result.best_weights]),
                   gain=sign * (later - result.best_score), evaluations=result.table.num_rows)
        plots = [(run_dir / p).as_posix() for p in result.summary.get("plots", [])]
    row["wall_s"] = time.perf_counter() - t0
    row["finished_at"] = time.time()
    return row, plots, result


def log_pairs(rows: Sequence[Dict], log: Log) -> None:
    """One line per successful pair: best λ and gain over the later checkpoint."""
    for r in rows:
        if r["status"] == "ok":
            best = (f"best λ={r['best_lambda']:.4f}" if "best_lambda" in r
                    else f"best weights {r['best_weights']}")
            log(f"{r['earlier'].rstrip('/').rsplit('/', 1)[-1]} -> "
                f"{r['later'].rstrip('/').rsplit('/', 1)[-1]}: {best}, gain over the later "
                f"checkpoint {r['gain']:+.5f}")


def pair_row(result) -> Dict:
    """A pair's columns of sweep.parquet, from its `TuneMergeResult`."""
    return dict(status="ok", error=None,
                earlier_score=result.endpoint_scores[0.0], later_score=result.endpoint_scores[1.0],
                best_lambda=result.best_lambda, best_score=result.best_score,
                gain=result.gain_over(1.0), gain_over_earlier=result.gain_over(0.0),
                evaluations=result.table.num_rows)
