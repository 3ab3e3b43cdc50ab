"""`sweep_trajectory`: tune every adjacent pair of a run's checkpoints, and optionally score
merges of every pair (i, j) for a heatmap of the whole trajectory.

Each checkpoint is read from disk and put into the object store once, although it belongs to
two pairs: pair k reuses checkpoint k+1's shards as pair k+1's earlier checkpoint. Up to
``max_concurrent_pairs`` pairs are tuned at once, sharing the cluster's trial slots (see
`ckmerge_ray.pairs`); without the heatmap at most that many + 1 checkpoints are in the store at a
time. Every check a pair's `tune_merge` would make runs before anything is stored. A sweep
stopped midway (a signal, a lost node, a full disk) continues with ``resume=True``. Example::

    from ckmerge_ray import sweep_trajectory
    result = sweep_trajectory("ckpts/", {"cpu": 1}, objective="loss:heldout.jsonl",
                              num_trials=8, output_dir="runs/sweep")
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import pyarrow as pa

from ckmerge_ray.checkpoints import CheckpointInfo
from ckmerge_ray.cluster import check_object_store, ray_session, trial_slots
from ckmerge_ray.config import CheckpointConfig, Resources, RunConfig, SearchConfig, split_options
from ckmerge_ray.errors import ConfigError, RunError, RunInterrupted, last_line
from ckmerge_ray.evaluator import score_each, start_evaluators
from ckmerge_ray.inputs import (
    Log, WindowStore, code_dir_of, discover_checkpoints, load_window, prepare_objective, printer,
)
from ckmerge_ray.interrupts import continue_with
from ckmerge_ray.model import dtypes_of
from ckmerge_ray.objectives import Objective
from ckmerge_ray.pairs import (
    PairPool, log_pairs, pair_concurrency, pair_plots, pair_run_dir, tune_pair, tune_window_at,
    window_bytes, window_run_dir,
)
from ckmerge_ray.plots import draw_plots
from ckmerge_ray.results import (
    HEATMAP_TABLE, RUN_FILE, SUMMARY_FILE, SWEEP_RECORD, SWEEP_TABLE, renamed_name, write_json_atomic, write_table_atomic, writing,
)
from ckmerge_ray.rundir import claim_series_dir, jsonable
from ckmerge_ray.storage import checkpoint_id
from ckmerge_ray.publish import check_destination
from ckmerge_ray.store import StoredCheckpoint


# What to do once a full disk has space again, or after a signal.
AGAIN = "continue the sweep: the same arguments and --resume"


@dataclass
class SweepResult:
    """Per adjacent pair: endpoints' scores, best λ, gain (also in sweep.parquet)."""

    table: pa.Table
    heatmap: Optional[pa.Table]
    mode: str
    output_dir: Path
    summary: Dict = field(default_factory=dict)


@dataclass
class _Sweep:
    """One sweep's settings and checked inputs."""

    search: SearchConfig
    run: RunConfig
    checkpoint: CheckpointConfig
    resources: Resources
    log: Log
    steps: List[int]
    infos: List[CheckpointInfo]
    objective: Objective
    tuned: Dict[str, Any]  # tune_merge's arguments for every pair (but the run directory)
    out: Path = Path()
    pairs_at_once: int = 1
    span: int = 2  # checkpoints per tuned unit: 2 (pairs, tune_merge) or a window's k
    family: Any = None  # the windows' families.Family when span > 2
    done: Dict[int, Dict] = field(default_factory=dict)  # resumed: the rows already in the table


def sweep_trajectory(
    checkpoints: str | os.PathLike | Sequence[str | os.PathLike],
    resources: "Resources | Mapping[str, float] | None" = None,
    objective: str | Objective = "",
    *,
    search: Optional[SearchConfig] = None,
    run: Optional[RunConfig] = None,
    checkpoint: Optional[CheckpointConfig] = None,
    heatmap: bool = False,
    heatmap_lambda: float = 0.5,
    include_final: bool = False,
    window: int = 2,
    family: str = "simplex",
    objective_options: Optional[Mapping[str, Any]] = None,
    tune_options: Optional[Mapping[str, Any]] = None,
    **options,
) -> SweepResult:
    """Tune λ for every adjacent pair of checkpoints and tabulate the gains along the run.

    Args:
        checkpoints: a directory of checkpoints (see `discover_checkpoints`) or a list of
            checkpoint directories, oldest first.
        resources, objective, search, run, checkpoint, objective_options: as in `tune_merge`,
            for every pair (``search.num_trials`` defaults to 8 here, ``run.output_dir`` to
            ``ckmerge_runs/sweep``). A sweep's pairs write no ``best/`` unless
            ``run.export_to`` (a path or URI prefix) is given: then each pair writes its
            ``best/`` in its run directory and publishes it to
            ``<export_to>/<pair run directory name>/best`` (see `pair_export_to`).
            ``run.resume=True`` continues a sweep stopped midway in ``output_dir`` (the same
            checkpoints, objective, search settings and window, kept in sweep.json; a
            difference is refused, named): no pair in its table is tuned again, and a pair
            that was running resumes its own run (no finished evaluation is redone).
        heatmap: also score heatmap_lambda·Θ(j) + (1-heatmap_lambda)·Θ(i) for every pair
            i < j, and every checkpoint alone (n(n+1)/2 evaluations; all checkpoints are then
            held in the object store together).
        include_final: also the model saved at the top of a Trainer output directory, as
            the last point (see `discover_checkpoints`).
        window: checkpoints per tuned unit (default 2: adjacent pairs, `tune_merge`); k > 2
            slides a window of k along the trajectory and tunes each with `tune_window`
            (`family`, default ``"simplex"``), each run under ``windows/``; its row has
            ``best_weights`` and the gain over the window's newest checkpoint where the
            family's design scored it alone (``simplex``, ``ema``), else NaN.
        tune_options: further `tune_merge` keywords for every pair (e.g. ``acquisitions``).
        **options: any field of the settings values by name (``alpha``, ``num_trials``, ...);
            ``max_concurrent_pairs`` pairs are tuned at once (default: what the trial slots and
            the object store fit, see `pairs.pair_concurrency`).

    Returns:
        A `SweepResult`; gains are over each pair's later checkpoint (positive = better).
        sweep.parquet (rewritten after every pair), heatmap.parquet, each pair's run under
        ``pairs/``, summary.json and the plots are in ``output_dir``.

    Raises:
        CkmergeError for bad input, before anything is stored (also when it would only show in
        a pair's run); RunError when every pair failed; RunInterrupted on SIGINT/SIGTERM (the
        table holds every finished pair: resume the sweep with ``resume=True``).
    """
    settings = split_options(options, {"num_trials": 8, "output_dir": "ckmerge_runs/sweep"},
                             search=search, run=run, checkpoint=checkpoint)
    ctx = check_sweep(checkpoints, objective, objective_options, resources, tune_options,
                      heatmap_lambda, include_final=include_final, **settings)
    set_window(ctx, window, family)
    claim_series_dir(ctx.out, SWEEP_RECORD, sweep_record(ctx), ctx.run, prepare=False)
    started = time.perf_counter()
    with ray_session(ctx.log), continue_with(f"{AGAIN} ({ctx.out})"):
        sizes = [i.nbytes for i in ctx.infos]
        ctx.pairs_at_once = set_pair_concurrency(ctx, sizes)
        need = sum(sizes) if heatmap else window_bytes(sizes, ctx.pairs_at_once, ctx.span)
        check_object_store(need, ctx.resources, False, ctx.log,
                           "the checkpoints held at once" if not heatmap else
                           f"the {len(ctx.infos)} checkpoints")
        claim_sweep_dir(ctx)  # after every check: a refused sweep leaves no sweep.json
        store = WindowStore(ctx.infos, ctx.checkpoint, ctx.log)
        rows, plots = tune_pairs(ctx, store, keep=heatmap)
        heat = (score_heatmap(ctx, store.all(), heatmap_lambda) if heatmap else None)
    summary = sweep_summary(ctx, rows, store, heatmap, heatmap_lambda,
                            time.perf_counter() - started)
    summary["plots"] = draw_plots(ctx.out, "sweep", rows, summary, ctx.log,
                                  heat=heat.to_pylist() if heat is not None else (), extra=plots)
    with sweep_writing(ctx, f"the summary {ctx.out / SUMMARY_FILE}"):
        write_json_atomic(ctx.out / SUMMARY_FILE, summary)
    log_pairs(rows, ctx.log)
    if not any(r["status"] == "ok" for r in rows):
        raise RunError(f"every pair failed; first error: {rows[0]['error']} "
                       f"(table in {ctx.out / SWEEP_TABLE})")
    with sweep_writing(ctx, f"the sweep's table {ctx.out / SWEEP_TABLE}"):
        table = write_table_atomic(ctx.out / SWEEP_TABLE, rows)
    return SweepResult(table, heat, ctx.objective.mode, ctx.out, summary)


def sweep_record(ctx: _Sweep) -> Dict[str, Any]:
    """What defines a sweep (sweep.json; a resume must match it): its checkpoints, objective,
    search settings and windows."""
    objective = ctx.tuned["objective"]
    return {"checkpoints": [checkpoint_id(i.source) for i in ctx.infos],
            "objective": objective if isinstance(objective, str) else repr(objective),
            "objective_options": jsonable(dict(ctx.tuned["objective_options"] or {})),
            **jsonable(ctx.search.to_dict()), "window": ctx.span,
            "family": ctx.family.label if ctx.family is not None else None}


def claim_sweep_dir(ctx: _Sweep) -> None:
    """Claim the output directory (`rundir.claim_series_dir`); on resume, the rows of the
    pairs (or windows) already done go into ``ctx.done``: they are not tuned again."""
    rows = claim_series_dir(ctx.out, SWEEP_RECORD, sweep_record(ctx), ctx.run)
    ctx.done = {r["pair"]: r for r in rows}
    if ctx.run.resume:
        unit = "pair" if ctx.span == 2 else "window"
        ctx.log(f"resuming the sweep in {ctx.out}: {len(rows)} of "
                f"{len(ctx.infos) - ctx.span + 1} {unit}(s) done")


def sweep_writing(ctx: _Sweep, what: str):
    """Around a write of the sweep's own files: a full disk is an `OutputError` that says what
    to do (every finished pair's run is complete on disk)."""
    return writing(what, ctx.out, AGAIN)


def check_sweep(checkpoints, objective, objective_options, resources, tune_options,
                heatmap_lambda: float, search: SearchConfig, run: RunConfig,
                checkpoint: CheckpointConfig, include_final: bool = False) -> _Sweep:
    """Every check a pair's `tune_merge` makes, and the sweep's own, before anything is stored."""
    log, resources = printer(run.progress), Resources.of(resources)
    if not 0.0 < heatmap_lambda < 1.0:
        raise ConfigError(f"heatmap_lambda must be in (0, 1), got {heatmap_lambda}")
    found = discover_checkpoints(checkpoints, include_final, log)
    if len(found) < 2:
        raise ConfigError(f"a sweep needs at least two checkpoints, got {len(found)}")
    out = Path(run.output_dir).resolve()
    claim_series_dir(out, SWEEP_RECORD, {}, run, prepare=False)  # refused before any work
    if run.export_to is not None:
        check_destination(run.export_to)
    # export_to here is the sweep's prefix; `tune_pair` gives each pair its own destination
    tuned = split_options(dict(tune_options or {}), search=search,
                          run=RunConfig(progress=run.progress,
                                        export_best=run.export_to is not None,
                                        export_to=run.export_to,
                                        max_concurrent=run.max_concurrent),
                          checkpoint=checkpoint)
    infos = load_window([p for _, p in found], checkpoint, log)
    objective_arg = objective
    objective = prepare_objective(objective, objective_options, infos[-1], search, log,
                                  checkpoint)
    log(f"sweep of {len(infos)} checkpoints ({', '.join(i.name for i in infos)}), "
        f"{len(infos) - 1} adjacent pair(s)")
    tuned.update(objective=objective_arg, objective_options=objective_options)
    return _Sweep(search, run, checkpoint, resources, log, [s for s, _ in found], infos,
                  objective, tuned, out)


def set_window(ctx: _Sweep, window: int, family: str) -> None:
    """Windows of `window` checkpoints (> 2: `tune_window` with `family`), checked up front."""
    from ckmerge_ray.families import family_of

    if not isinstance(window, int) or not 2 <= window <= len(ctx.infos):
        raise ConfigError(f"window must be an integer in [2, {len(ctx.infos)}] (the checkpoints "
                          f"found), got {window!r}")
    ctx.span = window
    if window > 2:
        ctx.family = family_of(family, window)
        if ctx.search.num_trials < len(ctx.family.initial_points()):
            raise ConfigError(f"num_trials={ctx.search.num_trials} is smaller than the "
                              f"{len(ctx.family.initial_points())} initial points of family "
                              f"{ctx.family.label!r}; raise it")
        ctx.log(f"windows of {window} checkpoints ({ctx.family.label}): "
                f"{len(ctx.infos) - window + 1} window(s)")


def set_pair_concurrency(ctx: _Sweep, sizes: List[int]) -> int:
    """Pairs at once (`pair_concurrency`); each pair's trials at once go into ``ctx.tuned``."""
    import dataclasses

    run = ctx.tuned["run"]
    p, q = pair_concurrency(ctx.run.max_concurrent_pairs, run.max_concurrent, ctx.resources,
                            ctx.search.num_trials, len(sizes) - ctx.span + 1, sizes, ctx.span)
    ctx.tuned["run"] = dataclasses.replace(run, max_concurrent=q)
    ctx.log(f"{p} pair(s) at once, {q} trial(s) at a time each")
    return p


def tune_pairs(ctx: _Sweep, store: WindowStore, keep: bool) -> Tuple[List[Dict], List[str]]:
    """Tune every adjacent pair on the window's stored checkpoints, ``ctx.pairs_at_once`` at a
    time; sweep.parquet is rewritten as each finishes. Returns the rows (in pair order) and the
    pairs' plots (relative to the sweep). Without `keep`, the sweep drops checkpoint k once pair
    k is submitted: the pairs in flight hold what they use, and Ray frees it after them.
    Raises `RunInterrupted` after SIGINT/SIGTERM, once the pairs in flight have stopped."""
    rows: Dict[int, Dict] = dict(ctx.done)
    plots: Dict[int, List[str]] = {k: pair_plots(ctx.out, [r]) for k, r in ctx.done.items()}
    n, w = len(ctx.infos) - ctx.span + 1, ctx.span

    def record(done) -> None:
        for k, future in done:
            try:
                rows[k], plots[k], _ = future.result()
            except RunInterrupted as e:
                if not pool.stop_requested:  # one pair at a time: it had the signal itself
                    raise sweep_interrupted(ctx, e.signum, len(rows), n) from None
                continue  # stopped by the signal the pool passed on: no row
            with sweep_writing(ctx, f"the sweep's table {ctx.out / SWEEP_TABLE}"):
                write_table_atomic(ctx.out / SWEEP_TABLE, [rows[j] for j in sorted(rows)])

    with PairPool(ctx.pairs_at_once, ctx.log) as pool:
        for k in range(n):
            if k in ctx.done:  # a resumed sweep's finished pair
                if not keep:
                    store.release(k)  # stored for an earlier pair: no later one needs it
                continue
            record(pool.wait_for_room())
            if pool.stop_requested:
                break
            infos = ctx.infos[k:k + w]
            run_dir = pair_run_dir(k, *infos) if w == 2 else window_run_dir(k, infos)
            resume = (ctx.out / run_dir / RUN_FILE).exists()  # it was running when stopped
            ctx.log(f"{'pair' if w == 2 else 'window'} {k + 1}/{n}: {infos[0].name} -> "
                    f"{infos[-1].name}" + (" (resuming its run)" if resume else ""))
            stored = [store.get(j) for j in range(k, k + w)]
            steps = (ctx.steps[k], ctx.steps[k + w - 1])
            if w == 2:
                pool.submit(k, tune_pair, k, tuple(infos), steps, tuple(stored), ctx.out,
                            ctx.tuned, ctx.resources, ctx.log, resume=resume)
            else:
                pool.submit(k, tune_window_at, k, infos, steps, stored, ctx.out,
                            {**ctx.tuned, "family": ctx.family}, ctx.resources, ctx.log,
                            resume=resume)
            if not keep:
                store.release(k)  # later pairs or windows need only checkpoints after k
        record(pool.drain())
        if pool.stop_requested:
            raise sweep_interrupted(ctx, pool.signum, len(rows), n)
    return [rows[k] for k in sorted(rows)], [p for k in sorted(plots) for p in plots[k]]


def sweep_interrupted(ctx: _Sweep, signum: Optional[int], done: int, n: int) -> RunInterrupted:
    name = signal.Signals(signum or signal.SIGINT).name
    unit = "pair" if ctx.span == 2 else "window"
    return RunInterrupted(
        f"interrupted by {name}: {done} of {n} {unit}s finished and in "
        f"{ctx.out / SWEEP_TABLE}; the {unit}s in flight stopped: {AGAIN} (Python: "
        "resume=True) tunes the rest, and redoes no finished evaluation", signum or signal.SIGINT)


def sweep_summary(ctx: _Sweep, rows: List[Dict], store: WindowStore, heatmap: bool,
                  heatmap_lambda: float, seconds: float) -> Dict:
    """summary.json of a sweep (``plots`` is added when they are drawn)."""
    return {
        "kind": "sweep",
        "checkpoints": [str(i.source) for i in ctx.infos],
        "steps": ctx.steps,
        "objective": repr(ctx.objective),
        "mode": ctx.objective.mode,
        "alpha": ctx.search.alpha, "num_trials": ctx.search.num_trials, "seed": ctx.search.seed,
        "heatmap": {"enabled": heatmap, "lambda": heatmap_lambda},
        "window": ctx.span, "family": ctx.family.label if ctx.family else "pair",
        "pairs": len(rows), "pairs_ok": sum(r["status"] == "ok" for r in rows),
        "pairs_resumed": len(ctx.done),  # in the table already when a resume started
        "pairs_at_once": ctx.pairs_at_once,
        "trials_at_once_per_pair": ctx.tuned["run"].max_concurrent,
        "object_store": {"puts_per_checkpoint": store.puts, "object_ids": store.object_ids},
        "seconds": seconds,
    }


def score_heatmap(ctx: _Sweep, stored: List[StoredCheckpoint], lam: float) -> pa.Table:
    """Score lam·Θ(j) + (1-lam)·Θ(i) for all i < j, and each Θ(i) alone, on evaluator actors.
    A cell whose evaluation fails (a non-finite score, an out-of-memory) is a row with its
    error and no score; the other cells go on."""
    import ray

    n = len(ctx.infos)
    cells = [(i, j) for i in range(n) for j in range(i, n)]
    q = trial_slots(ctx.resources, ctx.run.max_concurrent, len(cells))
    actors = start_evaluators(q, ctx.resources.to_dict(), ctx.infos[-1].config,
                              dtypes_of(ctx.infos[-1]), stored, ctx.objective,
                              code_dir=code_dir_of(ctx.infos[-1], ctx.checkpoint))
    ctx.log(f"heatmap: {len(cells)} merges on {q} evaluator(s)")
    try:
        results = score_each(actors, [heatmap_weights(n, *cell, lam) for cell in cells])
    finally:
        for a in actors:
            ray.kill(a)
    rows = []
    for (i, j), r in zip(cells, results):
        failed = isinstance(r, BaseException)
        rows.append({"i": i, "j": j, "step_i": ctx.steps[i], "step_j": ctx.steps[j],
                     "lam": 1.0 if i == j else lam, "score": None if failed else float(r["score"]),
                     "error": last_line(r) if failed else None})
        if failed:
            ctx.log(f"heatmap cell ({ctx.steps[i]}, {ctx.steps[j]}) failed: {rows[-1]['error']}")
    with sweep_writing(ctx, f"the heatmap {ctx.out / HEATMAP_TABLE}"):
        return write_table_atomic(ctx.out / HEATMAP_TABLE, rows)


def heatmap_weights(n: int, i: int, j: int, lam: float) -> List[float]:
    """One weight per checkpoint: Θ(i) alone when i == j, else lam·Θ(j) + (1-lam)·Θ(i)."""
    w = [0.0] * n
    if i == j:
        w[i] = 1.0
    else:
        w[i], w[j] = 1.0 - lam, lam
    return w


# Names of earlier versions, kept working: every output file is now named once, in results.py.
_RENAMED = {'SWEEP_FILE': 'SWEEP_TABLE', 'HEATMAP_FILE': 'HEATMAP_TABLE'}



def __getattr__(name: str):
    return renamed_name(__name__, _RENAMED, name)
