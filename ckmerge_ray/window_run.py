"""The steps of a window run (`window.tune_window`), the pair's (tuner.py) for k checkpoints:
check the inputs → store every checkpoint once → the Tune experiment (GP-Hedge over the family's
box, `window_trial.window_trainable`, the trials table with a column per weight) → fit (with the
pair's re-run of trials lost with their node) → the best weights → best/, summary.json, plots.
The output directory's lock, signals and unwritable files are handled as for a pair."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import ray
from ray import tune

from ckmerge_ray.checkpoints import CheckpointInfo
from ckmerge_ray.cluster import check_object_store, connect, disconnect, trial_slots
from ckmerge_ray.config import CheckpointConfig, Resources, RunConfig, SearchConfig
from ckmerge_ray.errors import ConfigError, RunError
from ckmerge_ray.experiment import build_tuner, fit, start_plan_holder
from ckmerge_ray.families import Family, WeightsOf
from ckmerge_ray.inputs import (
    Log, WindowStore, code_dir_of, load_window, prepare_objective, printer, run_tokenizer_files,
)
from ckmerge_ray.interrupts import RunGuard
from ckmerge_ray.model import dtypes_of
from ckmerge_ray.results import (
    BEST_DIR, SUMMARY_FILE, TRIALS_FILE, WRITE_ERRORS, export_weighted, output_error,
    read_rows, rows_to_table, write_json_atomic,
)
from ckmerge_ray.rundir import (
    check_unlocked, claim_tune_dir, jsonable, lock_run_dir, reclaim_tune_dir,
)
from ckmerge_ray.publish import check_destination, publish_dir
from ckmerge_ray.storage import checkpoint_id
from ckmerge_ray.tuner import evaluation_totals, run_extras
from ckmerge_ray.window import WindowResult, load_window_result
from ckmerge_ray.window_trial import WindowPlan, window_trainable


@dataclass
class _WindowRun:
    """One window run, filled in step by step (the attributes `experiment.fit` reads included)."""

    search: SearchConfig
    run: RunConfig
    checkpoint: CheckpointConfig
    resources: Resources
    family: Family
    log: Log
    infos: List[CheckpointInfo]
    objective: Any
    out: Path = Path()
    stored: List = field(default_factory=list)
    window: Optional[WindowStore] = None
    q: int = 1
    resumed: bool = False
    trainable: Any = None
    started: float = field(default_factory=time.perf_counter)
    seconds: Dict[str, float] = field(default_factory=dict)


def run_window(paths: List[str], resources, objective, objective_options, stored,
               family: Family, search: SearchConfig, run: RunConfig,
               checkpoint: CheckpointConfig) -> WindowResult:
    """`tune_window` for the families other than ``pair``: claim, check, lock, run."""
    out = Path(run.output_dir).resolve()
    record = run_record(paths, family, objective, objective_options, search)
    check_unlocked(out)
    claim_tune_dir(out, run.overwrite, run.resume, record, prepare=False)
    with RunGuard(printer(run.progress)) as guard:
        try:
            log = printer(run.progress)
            if run.export_to is not None:
                check_destination(run.export_to)
            infos = load_window(paths, checkpoint, log)
            objective_ = prepare_objective(objective, objective_options, infos[-1], search, log,
                                           checkpoint)
            ctx = _WindowRun(search, run, checkpoint, Resources.of(resources), family, log,
                             infos, objective_, out)
            with lock_run_dir(out, log):
                guard.run = (out, search.num_trials)
                try:
                    return run_locked(ctx, guard, record, objective, stored)
                except KeyboardInterrupt:
                    raise guard.interrupted(out, search.num_trials, saved=False) from None
        except KeyboardInterrupt:
            raise guard.interrupted(out, search.num_trials, saved=False, mark=False) from None


def run_record(paths, family: Family, objective, objective_options, search: SearchConfig) -> Dict:
    """What defines a window run (run.json; a resume must match it)."""
    return {"window": [checkpoint_id(p) for p in paths], "family": family.to_dict(),
            "objective": objective if isinstance(objective, str) else repr(objective),
            "objective_options": dict(objective_options or {}), **jsonable(search.to_dict())}


def run_locked(ctx: _WindowRun, guard: RunGuard, record: Dict, objective, stored) -> WindowResult:
    previous, finished = reclaim_tune_dir(ctx.out, ctx.run.overwrite, ctx.run.resume, record,
                                          ctx.log)
    if finished:
        return load_window_result(ctx.out, ctx.log)
    ctx.resumed = bool(previous)
    started_ray = connect(ctx.log)
    guard.take_signals()
    holder = None
    try:
        ctx.q = trial_slots(ctx.resources, ctx.run.max_concurrent, ctx.search.num_trials)
        store_window(ctx, stored)
        later = ctx.infos[-1]
        plan = WindowPlan(uuid.uuid4().hex[:12], later.config, dtypes_of(later), ctx.stored,
                          ctx.family, ctx.objective, code_dir_of(later, ctx.checkpoint))
        holder = start_plan_holder(plan, ctx.out)
        searcher = window_searcher(ctx.family, ctx.search, ctx.objective.mode, ctx.q)
        record.update(run_extras(objective, ctx))
        tuner, experiment = tuner_of(ctx, plan.run_id, searcher, previous, record)
        t_fit = time.perf_counter()
        grid, restored = fit(ctx, guard, tuner, experiment)
        ctx.seconds["tune"] = time.perf_counter() - t_fit
        guard.raise_if_stopped(ctx.out, ctx.search.num_trials)
        if previous or restored:
            searcher.restore_from_dir(experiment)
        rows = read_rows(ctx.out / TRIALS_FILE)
        return write_results(ctx, rows, pick_best(rows, ctx.objective.mode), searcher)
    finally:
        if holder is not None:
            ray.kill(holder)
        if started_ray:
            disconnect()


def store_window(ctx: _WindowRun, stored) -> None:
    """Every checkpoint of the window into the object store once, after checking they fit."""
    t0 = time.perf_counter()
    if stored is not None:
        if len(stored) != len(ctx.infos):
            raise ConfigError(f"stored holds {len(stored)} checkpoints, the window {len(ctx.infos)}")
        ctx.stored = list(stored)
    else:
        check_object_store(sum(i.nbytes for i in ctx.infos), ctx.resources,
                           ctx.run.allow_spilling, ctx.log, f"the {len(ctx.infos)} checkpoints")
        ctx.window = WindowStore(ctx.infos, ctx.checkpoint, ctx.log)
        ctx.stored = ctx.window.all()
    ctx.seconds["load"] = time.perf_counter() - t0
    ctx.log(f"stored {len(ctx.stored)} checkpoints of {len(ctx.stored[0].refs)} shard(s), "
            f"{ctx.stored[0].total_bytes / 2**20:.1f} MiB each, {ctx.seconds['load']:.1f}s")


def window_searcher(family: Family, search: SearchConfig, mode: str, batch_size: int):
    """GP-Hedge over the family's box, its initial design first, with `merge_searcher`'s
    length-scale floor (per dimension, as a fraction of its range) and hedge start, and the
    spacing of points measured in merge weights (`families.WeightsOf`)."""
    from ckmerge_ray.search import GPHedgeSearch
    from ckmerge_ray.search.space import INITIAL_GAINS, LENGTH_SCALE_FLOOR

    return GPHedgeSearch(
        space=family.space(), metric="score", mode=mode,
        points_to_evaluate=family.initial_points(), batch_size=batch_size,
        acquisitions=search.acquisitions, eta=search.eta, kappa=search.kappa, xi=search.xi,
        gp_noise=search.gp_noise, seed=search.seed, noise_key=search.noise_key,
        min_length_scale=LENGTH_SCALE_FLOOR, initial_gains=dict(INITIAL_GAINS),
        embed=WeightsOf(family),
    )


def tuner_of(ctx: _WindowRun, run_id: str, searcher, previous: Optional[Dict],
             record: Dict) -> Tuple[tune.Tuner, str]:
    """The run's Tune experiment, new or restored (`experiment.build_tuner`): trials of
    `window_trainable` over the family's parameters."""
    ctx.log(f"tuning the weights of {len(ctx.infos)} checkpoints ({ctx.family.label}: "
            f"{', '.join(ctx.family.space())}): {ctx.search.num_trials} trials, {ctx.q} at a "
            f"time, {ctx.resources.to_dict()}/trial")
    return build_tuner(ctx, run_id, searcher, previous, record,
                       num_samples=ctx.search.num_trials, function=window_trainable,
                       params=tuple(ctx.family.space()))


def weights_of(row: Dict) -> List[float]:
    """The merge weights w1..wk of a trials-table row."""
    return [row[f"w{i}"] for i in range(1, 1 + sum(1 for k in row if k[:1] == "w"
                                                   and k[1:].isdigit()))]


def pick_best(rows: List[Dict], mode: str) -> Dict:
    """The best successful trial; RunError when none succeeded."""
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        first = next((r["error"] for r in rows if r.get("error")), None)
        raise RunError(f"every trial failed; first error: {first or 'none reported a result'}")
    return (min if mode == "min" else max)(ok, key=lambda r: r["score"])


def single_scores(ctx: _WindowRun, rows: List[Dict]) -> Dict[str, float]:
    """Scores of the checkpoints the search evaluated alone (a weight of 1), by name."""
    out = {}
    for r in rows:
        if r["status"] == "ok":
            w = weights_of(r)
            if max(w) > 1.0 - 1e-9:
                out[ctx.infos[int(np.argmax(w))].name] = r["score"]
    return out


def write_results(ctx: _WindowRun, rows: List[Dict], best: Dict, searcher) -> WindowResult:
    """Export best/, write summary.json once (with its plots), print the table."""
    weights, best_path = weights_of(best), None
    if ctx.run.export_best:
        later = ctx.infos[-1]
        try:
            best_path = export_weighted(ctx.stored, weights, later.config_bytes,
                                        run_tokenizer_files(later, ctx.checkpoint),
                                        ctx.out / BEST_DIR,
                                        revert=later.revert_names)
        except WRITE_ERRORS as e:
            raise output_error(e, f"the best model {ctx.out / BEST_DIR}", ctx.out) from e
        ctx.log(f"best merged model written to {best_path}")
        if ctx.run.export_to is not None:
            ctx.log(f"best merged model published to {publish_dir(best_path, ctx.run.export_to)}")
    ctx.seconds["total"] = time.perf_counter() - ctx.started
    params = {p: best[p] for p in ctx.family.space()}
    summary = {
        "kind": "window", "family": ctx.family.to_dict(),
        "checkpoints": [str(i.path) for i in ctx.infos], "objective": repr(ctx.objective),
        "mode": ctx.objective.mode, "space": ctx.family.space(),
        "best_weights": weights, "best_params": params, "best_score": best["score"],
        "single_scores": single_scores(ctx, rows),
        "trials": len(rows), "trials_ok": sum(r["status"] == "ok" for r in rows),
        "max_concurrent": ctx.q, "resources_per_trial": ctx.resources.to_dict(),
        "object_store": ctx.window.summary() if ctx.window else None,
        "seconds": ctx.seconds, "evaluation": evaluation_totals(rows),
        "best_model_path": str(best_path) if best_path else None, "resumed": ctx.resumed,
        "search": {"searcher": "GPHedgeSearch", "acquisitions": list(searcher.acquisitions),
                   "seed": ctx.search.seed, "batch_size": ctx.q,
                   "final_gains": searcher.gains,
                   "final_probabilities": searcher.probabilities()},
    }
    from ckmerge_ray.window_plots import draw_window_plots

    summary["plots"] = draw_window_plots(ctx.out, rows, summary, ctx.log)
    try:
        write_json_atomic(ctx.out / SUMMARY_FILE, summary)
    except OSError as e:
        raise output_error(e, f"the summary {ctx.out / SUMMARY_FILE}", ctx.out) from e
    result = WindowResult(ctx.family, summary["checkpoints"], weights, params, best["score"],
                          summary["single_scores"], ctx.objective.mode, rows_to_table(rows),
                          ctx.out, best_path, summary)
    ctx.log(result.format())
    return result
