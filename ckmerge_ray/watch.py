"""`watch_trajectory`: follow a pretraining run while it trains, and tune each new adjacent pair
as soon as its later checkpoint is complete.

The watch polls a run directory (local or a URI) for ``checkpoint-<step>/``-style folders and
reads each once it is complete: its marker file is there, or its files are all there, whole, and
unchanged between two polls (`ckmerge_ray.watch_poll`).

Pairs are tuned with `tune_merge` in ``pairs/`` as `sweep_trajectory` does (each checkpoint put
into the object store once; the earlier checkpoint of the next pair stays there), up to
``max_concurrent_pairs`` at once (`ckmerge_ray.pairs`; default: the trial slots over
``max_concurrent``, so one pair at a time unless ``max_concurrent`` leaves room), and the watch
goes on polling while they run (one at a time, while the pair runs). As each pair finishes: a row of ``sweep.parquet``, the plots,
``latest/`` (the newest pair's best merged model) and ``best_overall/`` (the best merged model so
far by the objective), each replaced atomically. Example::

    from ckmerge_ray import watch_trajectory
    watch_trajectory("runs/pretrain", {"cpu": 1}, objective="loss:heldout.jsonl",
                     num_trials=8, output_dir="runs/watch", marker="trainer_state.json")
"""

from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional

import pyarrow as pa

from ckmerge_ray.checkpoints import CheckpointInfo, plan_shards, tokenizer_files
from ckmerge_ray.cluster import ray_session, trial_slots
from ckmerge_ray.config import CheckpointConfig, Resources, RunConfig, SearchConfig, split_options
from ckmerge_ray.errors import CheckpointError, ConfigError, RunError, RunInterrupted
from ckmerge_ray.inputs import CHECKPOINT_NAME, Log, load_window, prepare_objective, printer
from ckmerge_ray.interrupts import continue_with, start_watching
from ckmerge_ray.pairs import PairPool, log_pairs, pair_run_dir, tune_pair
from ckmerge_ray.results import (
    BEST_OVERALL_DIR, LATEST_DIR, PAIRS_DIR, RUN_FILE, SWEEP_TABLE, write_table_atomic, writing,
)
from ckmerge_ray.publish import check_destination
from ckmerge_ray.rundir import jsonable
from ckmerge_ray.storage import Location, checkpoint_id, locate
from ckmerge_ray.store import StoredCheckpoint, put_checkpoint
from ckmerge_ray.watch_outputs import AGAIN, WatchOutputs, claim_watch_dir
from ckmerge_ray.watch_poll import Poller, SeenCheckpoint

@dataclass
class WatchResult:
    """What the watch did: one row per pair (also in sweep.parquet), where the models are."""

    table: pa.Table
    mode: str
    output_dir: Path
    latest: Optional[Path]
    best_overall: Optional[Path]
    summary: Dict = field(default_factory=dict)


def watch_trajectory(
    source: str | os.PathLike,
    resources: "Resources | Mapping[str, float] | None" = None,
    objective: str = "",
    *,
    search: Optional[SearchConfig] = None,
    run: Optional[RunConfig] = None,
    checkpoint: Optional[CheckpointConfig] = None,
    marker: Optional[str] = None,
    until: Optional[int] = None,
    max_pairs: Optional[int] = None,
    poll_seconds: float = 30.0,
    idle_timeout: Optional[float] = None,
    objective_options: Optional[Mapping[str, Any]] = None,
    tune_options: Optional[Mapping[str, Any]] = None,
    **options,
) -> WatchResult:
    """Follow the run in `source` and tune every new adjacent pair as its later checkpoint
    becomes complete, keeping sweep.parquet, the plots, ``latest/`` and ``best_overall/``
    current. Runs until `until`, `max_pairs` or `idle_timeout` ends it (or a signal).

    Args:
        source: the run directory or URI prefix the trainer saves ``checkpoint-<step>/`` (or
            ``step-<N>/``, ``iter_<N>/``, ...) folders into. A model saved at its top is not
            followed.
        resources, objective, search, run, checkpoint, objective_options, tune_options: as in
            `sweep_trajectory` (``num_trials`` defaults to 8, ``output_dir`` to
            ``ckmerge_runs/watch``); with ``export_to`` (a path or URI prefix) each pair's
            ``best/`` is also published to ``<export_to>/<pair run directory name>/best``.
            ``resume=True`` continues a watch in ``output_dir``: no pair in its table is tuned
            again, and the pair that was running resumes its own run (no finished evaluation
            is redone). The objective must be a string (a spec or
            an objective YAML) so that every pair scores the same way.
        marker: a file name; a checkpoint is complete once it exists in its folder (default:
            complete when its files are all there and unchanged between two polls).
        until: stop after the pair whose later checkpoint's step is at least this.
        max_pairs: stop once the table holds this many pairs (resumed ones included).
        poll_seconds: time between two looks at `source` (default 30).
        idle_timeout: stop when no checkpoint became complete for this many seconds (default:
            wait forever).

    Returns:
        A `WatchResult`. A pair whose checkpoint is unreadable, or changed or vanished after
        it was stored, or whose every trial failed, is a row with status "error"; the watch
        goes on from the last good checkpoint.

    Raises:
        ConfigError, ObjectiveError for bad settings (before the first pair, as soon as the
        first checkpoint is complete); RunInterrupted on SIGINT/SIGTERM (the table holds every
        finished pair: resume it).
    """
    settings = split_options(options, {"num_trials": 8, "output_dir": "ckmerge_runs/watch"},
                             search=search, run=run, checkpoint=checkpoint)
    search, run, checkpoint = settings["search"], settings["run"], settings["checkpoint"]
    _check_settings(objective, marker, until, max_pairs, poll_seconds, idle_timeout)
    log = printer(run.progress)
    root = _run_directory(source, log)
    if run.export_to is not None:
        check_destination(run.export_to)
    out = Path(run.output_dir).resolve()
    record = {"source": checkpoint_id(source), "objective": objective,
              "objective_options": jsonable(dict(objective_options or {})),
              **jsonable(search.to_dict())}
    rows = claim_watch_dir(out, record, run)
    tuned = split_options(dict(tune_options or {}), search=search,
                          run=RunConfig(progress=run.progress, export_best=True,
                                        export_to=run.export_to,  # a prefix: see tune_pair
                                        max_concurrent=run.max_concurrent),
                          checkpoint=checkpoint)
    tuned.update(objective=objective, objective_options=objective_options)
    w = _Watch(root, out, log, Resources.of(resources), checkpoint, search, tuned, objective,
               objective_options, marker, rows)
    with ray_session(log), _signals(), continue_with(f"{AGAIN} ({out})"):
        try:
            w.pairs_at_once = watch_concurrency(run, w.resources, search.num_trials)
            w.follow(until, max_pairs, poll_seconds, idle_timeout)
        except (KeyboardInterrupt, RunInterrupted) as e:  # the latter: a pair run alone had it
            signum = getattr(e, "signum", None) or (
                signal.SIGTERM if str(e) == "SIGTERM" else signal.SIGINT)
            raise RunInterrupted(f"watch stopped by {signal.Signals(signum).name}; "
                                 + (f"{len(w.rows)} pair(s) in {out / SWEEP_TABLE}" if w.rows
                                    else "no pair had finished") + f": {AGAIN} "
                                 "(Python: resume=True)", signum) from None
    log_pairs(w.rows, log)
    with writing(f"the pairs' table {out / SWEEP_TABLE}", out, AGAIN):
        table = write_table_atomic(out / SWEEP_TABLE, w.rows)
    return WatchResult(table, w.outputs.mode, out, _if_dir(out / LATEST_DIR),
                       _if_dir(out / BEST_OVERALL_DIR), w.outputs.summary(w.header()))


def watch_concurrency(run: RunConfig, resources: Resources, num_trials: int) -> int:
    """Pairs at once: `max_concurrent_pairs`, else the cluster's trial slots over the trials a
    pair runs at once (``max_concurrent``; by default every slot, so one pair at a time)."""
    if run.max_concurrent_pairs is not None:
        return run.max_concurrent_pairs
    slots = trial_slots(resources, None, 1 << 30)
    return max(1, slots // (run.max_concurrent or slots))


def _run_directory(source, log: Log) -> Location:
    """The run directory to follow. A local one may not exist yet (the watch is started
    before the trainer): its parent must (a typo then fails now, not after a night of
    polling). Raises ConfigError for a file, a missing parent, or a URI that cannot be read."""
    try:
        root = locate(source, what="run directory", must_exist=False)
        if not root.is_local:
            return locate(root, what="run directory")
    except CheckpointError as e:
        raise ConfigError(str(e)) from e
    path = root.local_path
    if path.exists() and not path.is_dir():
        raise ConfigError(f"run directory {path} is a file, not a directory")
    if not path.exists():
        if not path.parent.is_dir():
            raise ConfigError(f"run directory {path} does not exist, nor does its parent "
                              f"{path.parent}: check the path")
        log(f"{path} does not exist yet: waiting for the trainer to create it")
    return root


def _check_settings(objective, marker, until, max_pairs, poll_seconds, idle_timeout) -> None:
    if not isinstance(objective, str) or not objective:
        raise ConfigError("watch needs the objective as a string (a spec such as "
                          "'loss:heldout.jsonl', or an objective YAML), the same for every pair")
    if marker is not None and (not marker or "/" in marker or marker in (".", "..")):
        raise ConfigError(f"marker must be a file name inside each checkpoint folder, got "
                          f"{marker!r}")
    if max_pairs is not None and (not isinstance(max_pairs, int) or max_pairs < 1):
        raise ConfigError(f"max_pairs must be a positive integer, got {max_pairs!r}")
    if until is not None and not isinstance(until, int):
        raise ConfigError(f"until must be a step (an integer), got {until!r}")
    if not poll_seconds > 0:
        raise ConfigError(f"poll_seconds must be positive, got {poll_seconds}")
    if idle_timeout is not None and not idle_timeout > 0:
        raise ConfigError(f"idle_timeout must be positive, got {idle_timeout}")


class _Watch:
    """The watch's state between polls: checkpoints seen, the pair rows, the models published."""

    def __init__(self, root: Location, out: Path, log: Log, resources: Resources,
                 checkpoint: CheckpointConfig, search: SearchConfig, tuned: Dict,
                 objective: str, objective_options, marker: Optional[str], rows: List[Dict]):
        self.root, self.out, self.log, self.resources = root, out, log, resources
        self.checkpoint, self.search, self.tuned = checkpoint, search, tuned
        self.objective_spec, self.objective_options = objective, objective_options
        self.outputs = WatchOutputs(out, rows, log)  # sweep.parquet, latest/, best_overall/
        self.marker, self.rows = marker, self.outputs.rows
        self.prev: Optional[SeenCheckpoint] = None
        # Pairs run together may finish out of order: a killed watch resumes after the last
        # pair of the table's gap-free start, and passes over the pairs recorded after it.
        done = {r["pair"] for r in rows}
        self.next_pair = next(k for k in range(len(rows) + 1) if k not in done)
        self.resumed_from = next((r for r in rows if r["pair"] == self.next_pair - 1), None)
        self.frontier = self.resumed_from["later_step"] if self.resumed_from else None
        self.reference: Dict = {}  # non-float tensors, equal along the run (store.put_checkpoint)
        self.puts: Dict[str, int] = {}
        self.poller = Poller(root, CHECKPOINT_NAME, marker, checkpoint, log,
                             self.outputs.previous.get("checkpoints", {}))
        self.resuming = self.resumed_from is not None  # the next pair's earlier end: the table's
        self.pairs_at_once = 1
        self.pool: Optional[PairPool] = None
        self.inflight: Dict[int, Dict] = {}  # pair -> its checkpoints and times, while it runs
        self.interrupted: Optional[BaseException] = None  # a pair's RunInterrupted
        if rows:
            self.log(f"resuming the watch in {out}: {len(rows)} pair(s) done, up to step "
                     f"{self.frontier}")

    # --- polling -------------------------------------------------------------------------------

    def follow(self, until: Optional[int], max_pairs: Optional[int], poll_seconds: float,
               idle_timeout: Optional[float]) -> None:
        """Poll, tune each pair as it becomes complete (up to `pairs_at_once` at a time, polling
        on while they run), until a stop condition holds; then wait for the pairs in flight."""
        last_progress = time.monotonic()
        self.log(f"watching {self.root} every {poll_seconds:g}s for checkpoints "
                 + self.poller.rule()
                 + (f", {self.pairs_at_once} pair(s) at once" if self.pairs_at_once > 1 else ""))
        with PairPool(self.pairs_at_once, self.log) as self.pool:
            reason = None
            while reason is None:
                self.collect(self.pool.finished(timeout=0))
                reason = self._finished(until, max_pairs)
                for c in self.poller.ready(self.frontier) if reason is None else ():
                    last_progress = time.monotonic()
                    if self.prev is None:
                        self.start_from(c)
                    else:
                        self.tune_next(c)
                    reason = self._finished(until, max_pairs)
                    if reason is not None:
                        break
                if reason is None and idle_timeout is not None and not self.inflight and (
                        time.monotonic() - last_progress > idle_timeout):
                    reason = f"no checkpoint became complete for {idle_timeout:g}s"
                if reason is None:
                    if self.inflight:  # wake up early when a pair finishes
                        self.collect(self.pool.finished(timeout=poll_seconds))
                    else:
                        time.sleep(poll_seconds)
            if not self.pool.stop_requested and self.interrupted is None:
                self.log(f"{reason}: stopping" + (f" once {len(self.inflight)} pair(s) in flight "
                                                  "finish" if self.inflight else ""))
            self.collect(self.pool.drain())
            if self.pool.stop_requested:  # the watch's signal: watch_trajectory says so
                raise KeyboardInterrupt(signal.Signals(self.pool.signum or signal.SIGINT).name)
            if self.interrupted is not None:  # a pair run alone had the signal itself
                raise self.interrupted

    def _finished(self, until, max_pairs) -> Optional[str]:
        """Why no further pair may start, or None."""
        if self.pool.stop_requested or self.interrupted is not None:
            return "interrupted"
        started = len(self.rows) + len(self.inflight)
        if max_pairs is not None and started >= max_pairs:
            return f"{started} pair(s) started (max_pairs={max_pairs})"
        if until is not None and self.frontier is not None and self.frontier >= until:
            return f"reached step {self.frontier} (until={until})"
        return None

    # --- pairs ---------------------------------------------------------------------------------

    def start_from(self, c: SeenCheckpoint) -> None:
        """The first complete checkpoint (or, on resume, the next one): the objective is
        checked on it, and it becomes the earlier end of the next pair."""
        try:
            (c.info,) = load_window([c.location.uri], self.checkpoint, self.log)
        except CheckpointError as e:
            self.log(f"{c.location.name} cannot be read ({e}); waiting for the next checkpoint")
            self.frontier = c.step
            return
        self.poller.required = self._required(c)
        if self.outputs.mode is None:
            objective = prepare_objective(self.objective_spec, self.objective_options, c.info,
                                          self.search, self.log, self.checkpoint)
            self.outputs.mode, self.outputs.objective_repr = objective.mode, repr(objective)
        if self.resuming:  # c is the first checkpoint after the table's last pair
            self.resuming = False
            self.prev = self._resume_earlier()
            if self.prev is not None:
                return self.tune_next(c)
        self.prev, self.frontier = c, c.step

    def _required(self, c: SeenCheckpoint) -> List[str]:
        """The tokenizer files a later checkpoint must hold, as `c` does (none when the run's
        tokenizer is given apart, ``CheckpointConfig.tokenizer``)."""
        if self.checkpoint.tokenizer is not None:
            return []
        return [f.name for f in tokenizer_files(c.location)]

    def _resume_earlier(self) -> Optional[SeenCheckpoint]:
        """The earlier end of the first pair after a resume: the table's last later checkpoint
        (or, if it cannot be read now, that pair's earlier one)."""
        last = self.resumed_from
        for key in ("later", "earlier"):
            try:
                loc = locate(last[key], what="checkpoint directory")
                c = SeenCheckpoint(last[f"{key}_step"], loc, complete=True)
                (c.info,) = load_window([loc.uri], self.checkpoint, self.log)
                return c
            except CheckpointError as e:
                self.log(f"{last[key]} cannot be read now ({e})")
        return None

    def tune_next(self, c: SeenCheckpoint) -> None:
        """Store the pair (previous good checkpoint, c) and start tuning it; `finish` records
        it. The next pair starts from c, unless c turns out unusable before it does."""
        self.collect(self.pool.wait_for_room())  # the store holds the pairs in flight only
        prev, k = self.prev, self.next_pair
        self.next_pair += 1
        if any(r["pair"] == k and r["later_step"] == c.step for r in self.rows):
            self.log(f"pair {k + 1}: {prev.location.name} -> {c.location.name} is in the table "
                     "already (it finished before the watch was stopped)")
            prev.stored, self.prev, self.frontier = None, c, c.step  # pairs in flight hold theirs
            return
        self.log(f"pair {k + 1}: {prev.location.name} -> {c.location.name}")
        t_detect = time.time()
        self.frontier = c.step
        try:
            infos, stored, store_s = self.store_pair(prev, c)
        except CheckpointError as e:
            self.record(self._failed_row(k, prev, c, e), None, c, t_detect, 0.0)
            if not prev.intact():  # neither is usable: start again from the next checkpoint
                prev.stored, self.prev = None, None
            c.stored = None  # else the next pair starts from prev again
            return
        self.inflight[k] = {"prev": prev, "c": c, "infos": infos, "t_detect": t_detect,
                            "store_s": store_s}
        self.prev = c
        self.pool.submit(k, tune_pair, k, tuple(infos), (prev.step, c.step), stored, self.out,
                         self.tuned, self.resources, self.log,
                         resume=(self.out / pair_run_dir(k, *infos) / RUN_FILE).exists(),
                         failures=(RunError, CheckpointError))
        self.collect(self.pool.finished(timeout=0))  # done already when pairs run one by one

    def collect(self, done) -> None:
        """Record the pairs that finished (a pair's `RunInterrupted` is kept, for `follow`)."""
        for k, future in done:
            try:
                self.finish(k, *future.result())
            except RunInterrupted as e:  # raised by follow once the pairs in flight are done
                self.inflight.pop(k, None)
                self.interrupted = self.interrupted or e

    def finish(self, k: int, row: Dict, plots: List[str], result) -> None:
        """Pair k is done: check its checkpoints, publish, record; drop shards no pair needs."""
        f = self.inflight.pop(k)
        prev, c = f["prev"], f["c"]
        if result is not None:
            try:  # a checkpoint that changed while its pair ran: the pair fails
                for info in f["infos"]:
                    info.check_unchanged("while its pair was tuned")
            except CheckpointError as e:
                row.update(status="error", error=f"CheckpointError: {e}")
                self.log(f"pair {prev.location.name} -> {c.location.name} FAILED: {e}")
                result = None
            else:
                self.outputs.pair_plots += plots
        self.record(row, result, c, f["t_detect"], f["store_s"])
        if self.prev is c and not c.intact():  # no pair started from c yet: fall back
            c.stored = None
            self.prev = prev if prev.intact() else None
        if self.prev is not prev:
            prev.stored = None  # Ray frees its shards once no pair holds them

    def record(self, row: Dict, result, c: SeenCheckpoint, t_detect: float, store_s: float) -> None:
        """A pair's row in sweep.parquet (in pair order), its latency, the published models."""
        t_tuned = time.time()
        publish_s = self.outputs.add(row, result)
        if result is not None:
            seconds = result.summary.get("seconds", {})
            self.outputs.latency.append({
                "pair": row["pair"], "later": c.location.name, "first_whole_at": c.first_whole,
                "complete_at": c.complete_at, "pair_started_at": t_detect,
                "detect_s": (c.complete_at or t_detect) - (c.first_whole or t_detect),
                "store_s": store_s, "tune_s": seconds.get("tune"),
                "tune_merge_total_s": seconds.get("total"),
                "publish_s": publish_s, "published_at": time.time(),
                "complete_to_published_s": time.time() - (c.first_whole or t_detect),
                "tuned_s": t_tuned - t_detect})
        self.outputs.write_summary(self.header())

    def store_pair(self, prev: SeenCheckpoint, c: SeenCheckpoint):
        """Both checkpoints validated together and in the object store (prev usually is
        already, with the same shard plan). Raises CheckpointError, also for a prev that
        changed or vanished since it was stored."""
        t0 = time.perf_counter()
        if prev.info is not None and prev.stored is not None:
            prev.info.check_unchanged("after it was stored")
        infos = load_window([prev.location.uri, c.location.uri], self.checkpoint, self.log)
        plan = plan_shards(infos[1], self.checkpoint.max_shard_bytes)
        if prev.stored is None or prev.plan != plan:
            prev.stored, prev.plan = self._put(infos[0], plan), plan
            prev.info = infos[0]
        c.stored, c.plan, c.info = self._put(infos[1], plan), plan, infos[1]
        self.poller.required = self._required(c)
        return [prev.info, c.info], (prev.stored, c.stored), time.perf_counter() - t0

    def _put(self, info: CheckpointInfo, plan) -> StoredCheckpoint:
        stored = put_checkpoint(info, plan, reference=self.reference, progress=self.log)
        self.puts[info.name] = self.puts.get(info.name, 0) + 1
        return stored

    def _failed_row(self, k: int, prev: SeenCheckpoint, c: SeenCheckpoint, e: Exception) -> Dict:
        self.log(f"pair {prev.location.name} -> {c.location.name} FAILED: {e}")
        return {"pair": k, "earlier": prev.location.uri, "later": c.location.uri,
                "earlier_step": prev.step, "later_step": c.step,
                "run_dir": str(Path(PAIRS_DIR) / f"{k:02d}-{prev.location.name}-"
                               f"{c.location.name}"),
                "store_digest": None, "status": "error",
                "error": f"{type(e).__name__}: {e}", "wall_s": 0.0,
                "started_at": time.time(), "finished_at": time.time()}

    # --- output --------------------------------------------------------------------------------

    def header(self) -> Dict:
        """summary.json's description of the watch (`WatchOutputs.summary`)."""
        return {"source": self.root.uri, "marker": self.marker, "alpha": self.search.alpha,
                "num_trials": self.search.num_trials, "seed": self.search.seed,
                "object_store": {"puts_per_checkpoint": self.puts},
                "checkpoints": self.poller.completed}


def _if_dir(p: Path) -> Optional[Path]:
    return p if p.is_dir() else None


@contextmanager
def _signals() -> Iterator[None]:
    """SIGTERM stops the watch as Ctrl-C does (KeyboardInterrupt), between pairs and while
    polling; a pair's own `tune_merge` handles both signals itself while it runs (it raises
    RunInterrupted)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        start_watching(signum)  # a signal to the process group ends the local Ray too
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, stop)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
