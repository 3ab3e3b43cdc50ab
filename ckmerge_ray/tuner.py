"""`tune_merge`: find the λ whose merge λ·Θ(t) + (1-λ)·Θ(t-1) scores best, on Ray Tune.

A run is six steps, each a function below or in `experiment.py`: check the inputs (`inputs.py`,
before Ray starts) → store the pair's shards in the object store once → build the Tune
experiment (GP-Hedge searcher, trainable of `trial.py`, the trials-table callback) → fit → pick
the best λ → write the results
(best/ export, summary.json with its plots, the final table). From the claim of the output
directory to the end, the run holds the directory's lock (`rundir.py`), and SIGINT, SIGTERM or a
file it cannot write stop it as a resumable run (`interrupts.py`). Example::

    from ckmerge_ray import tune_merge
    result = tune_merge(("ckpts/step900", "ckpts/step1000"), {"cpu": 1},
                        objective="loss:heldout.jsonl", num_trials=10, output_dir="runs/x")
    print(result.best_lambda, result.best_score, result.endpoint_scores)
"""

from __future__ import annotations

import math
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import ray
from ray import tune

from ckmerge_ray.checkpoints import CheckpointInfo
from ckmerge_ray.cluster import check_object_store, connect, disconnect, trial_slots
from ckmerge_ray.config import (
    CheckpointConfig, Resources, RunConfig, SearchConfig, launch_record, resumed_settings,
    split_options,
)
from ckmerge_ray.errors import ConfigError, RunError
from ckmerge_ray.experiment import build_tuner, fit, start_plan_holder
from ckmerge_ray.inputs import (
    Log, WindowStore, code_dir_of, load_window, prepare_objective, printer, run_tokenizer_files,
)
from ckmerge_ray.interrupts import RunGuard
from ckmerge_ray.model import dtypes_of
from ckmerge_ray.objectives import Objective
from ckmerge_ray.plots import draw_plots
from ckmerge_ray.results import (
    BEST_DIR, SUMMARY_FILE, TRIALS_FILE, TuneMergeResult, WRITE_ERRORS, export_merged,
    format_result, load_result, output_error, read_rows, rows_to_table, write_json_atomic,
)
from ckmerge_ray.rundir import (
    RUN_DEFINING, check_unlocked, claim_tune_dir, jsonable, lock_run_dir, read_run_file,
    reclaim_tune_dir,
)
from ckmerge_ray.publish import check_destination, publish_dir
from ckmerge_ray.storage import checkpoint_id
from ckmerge_ray.search import LAMBDA
from ckmerge_ray.search.fidelity import ScreeningScheduler
from ckmerge_ray.store import StoredCheckpoint
from ckmerge_ray.trial import TrialPlan


@dataclass
class _Run:
    """One tuning run, filled in step by step: its settings, checked inputs, stored pair."""

    search: SearchConfig
    run: RunConfig
    checkpoint: CheckpointConfig
    resources: Resources
    log: Log
    earlier: CheckpointInfo
    later: CheckpointInfo
    objective: Objective
    out: Path = Path()
    stored: Optional[Tuple[StoredCheckpoint, StoredCheckpoint]] = None
    puts: int = 0  # puts per checkpoint by this run (0: the caller stored them)
    q: int = 1  # trials at once
    resumed: bool = False
    trainable: Any = None  # the Tune trainable (set by experiment.build_tuner)
    started: float = field(default_factory=time.perf_counter)
    seconds: Dict[str, float] = field(default_factory=dict)


def tune_merge(
    pair: Sequence[str | os.PathLike],
    resources: "Resources | Mapping[str, float] | None" = None,
    objective: str | Objective = "",
    *,
    search: Optional[SearchConfig] = None,
    run: Optional[RunConfig] = None,
    checkpoint: Optional[CheckpointConfig] = None,
    objective_options: Optional[Mapping[str, Any]] = None,
    stored: Optional[Sequence[StoredCheckpoint]] = None,
    **options,
) -> TuneMergeResult:
    """Find the λ whose merge λ·Θ(t) + (1-λ)·Θ(t-1) scores best, with concurrent Ray Tune trials.

    Args:
        pair: (earlier, later) checkpoints: Hugging Face or torch.distributed.checkpoint
            directories, local or URIs (s3://...); λ weights the later one.
        resources: per trial, ``{"cpu": 2, "gpu": 0.5}`` or a `Resources` (default 1 CPU).
        objective: an `Objective` or a string such as ``"loss:heldout.jsonl"``.
        search: a `SearchConfig` (α, number of trials, GP-Hedge settings, initial λ, seed,
            noise-aware, screening); default ``SearchConfig()``.
        run: a `RunConfig` (output_dir, overwrite/resume, storage_path, progress,
            max_concurrent, max_failures, allow_spilling, export_best, export_to,
            gpu_shard_cache).
        checkpoint: a `CheckpointConfig` (allow_pickle, max_shard_bytes, trust_remote_code,
            format, name_map, model_config); run.json records it for ``resume``.
        objective_options: passed to the objective made from a string (e.g. ``seq_len``).
        stored: the pair already in the object store (with the later checkpoint's shard plan),
            as comparisons and sweeps pass it; the caller keeps it alive.
        **options: any field of the three settings values by name (``alpha=0.6``,
            ``num_trials=12``, ``output_dir="runs/x"``, ...), overriding that value's field.

    Returns:
        A `TuneMergeResult`; the same is on disk in ``output_dir`` (trials.parquet,
        summary.json, best/). With ``resume``, a run killed midway continues without redoing any
        finished evaluation; a finished run is just reported.

    Raises:
        CkmergeError (ConfigError, CheckpointError, ObjectiveError) for bad input, before Ray
        starts; RunError when every trial failed or another run holds ``output_dir``;
        RunInterrupted on SIGINT or SIGTERM (the run is saved: resume it); OutputError when a
        file of the run cannot be written (a full disk: free space, then resume). TypeError for
        an unknown keyword.
    """
    settings = split_options(options, search=search, run=run, checkpoint=checkpoint)
    run, out = settings["run"], Path(settings["run"].output_dir).resolve()
    if isinstance(pair, (str, os.PathLike)) or len(pair) != 2:
        raise ConfigError(f"pair must be (earlier, later) checkpoint directories, got {pair!r}")
    record = run_record(pair, objective, objective_options, settings["search"])
    check_unlocked(out)  # another run works there: refuse before anything else
    claim_tune_dir(out, run.overwrite, run.resume, record, prepare=False)  # refuse early
    total = settings["search"].num_samples
    with RunGuard(printer(run.progress)) as guard:
        try:
            ctx = check_inputs(pair, objective, objective_options, stored, resources, **settings)
            ctx.out = out
            with lock_run_dir(out, ctx.log):
                guard.run = (out, total)
                try:
                    return run_locked(ctx, guard, record, objective, stored)
                except KeyboardInterrupt:  # a second signal, or one outside Tune's loop
                    raise guard.interrupted(out, total, saved=False) from None
        except KeyboardInterrupt:  # while checking the inputs: nothing was started
            raise guard.interrupted(out, total, saved=False, mark=False) from None


def run_locked(ctx: _Run, guard: RunGuard, record: Dict, objective, stored) -> TuneMergeResult:
    """Steps 2 to 6, in the claimed and locked output directory."""
    previous, finished = reclaim_tune_dir(ctx.out, ctx.run.overwrite, ctx.run.resume, record,
                                          ctx.log)
    if finished:
        return load_result(ctx.out, ctx.log)
    ctx.resumed = bool(previous)

    t_ray = time.perf_counter()
    started_ray = connect(ctx.log)
    guard.take_signals()  # ray.init installs a SIGTERM handler of its own
    ctx.seconds["ray_start"] = time.perf_counter() - t_ray
    holder = None
    try:
        ctx.q = trial_slots(ctx.resources, ctx.run.max_concurrent, ctx.search.num_trials)
        store_pair(ctx, stored)
        plan = TrialPlan(
            uuid.uuid4().hex[:12], ctx.later.config, dtypes_of(ctx.later), *ctx.stored,
            ctx.objective, screen_limit=ctx.search.screen_limit,
            gpu_shard_cache=ctx.run.gpu_shard_cache,
            code_dir=code_dir_of(ctx.later, ctx.checkpoint),
        )
        holder = start_plan_holder(plan, ctx.out)
        searcher = ctx.search.searcher(ctx.objective.mode, batch_size=ctx.q)
        record.update(run_extras(objective, ctx))
        tuner, experiment = tuner_of(ctx, plan.run_id, searcher, previous, record)
        t_fit = time.perf_counter()
        grid, restored = fit(ctx, guard, tuner, experiment)
        ctx.seconds["tune"] = time.perf_counter() - t_fit
        guard.raise_if_stopped(ctx.out, ctx.search.num_samples)  # signal, or unwritable file
        if previous or restored:  # the searcher that ran is a restored one: read its final state
            searcher.restore_from_dir(experiment)
        rows = read_rows(ctx.out / TRIALS_FILE)
        best, best_observed = pick_best(rows, ctx.search, ctx.objective.mode, searcher)
        return write_results(ctx, rows, best, best_observed, searcher, grid)
    finally:
        if holder is not None:
            ray.kill(holder)  # releases the shards (see PlanHolder)
        if started_ray:
            disconnect()


# --- 1. inputs ---------------------------------------------------------------------------------


def check_inputs(pair, objective, objective_options, stored, resources, search: SearchConfig,
                 run: RunConfig, checkpoint: CheckpointConfig) -> _Run:
    """Headers of both checkpoints validated (names, shapes, dtypes, architecture) and the
    objective prepared: everything that can refuse bad input, before Ray starts."""
    log = printer(run.progress)
    resources = Resources.of(resources)
    if run.export_to is not None:
        check_destination(run.export_to)
    earlier, later = load_window(pair, checkpoint, log)
    if stored is not None:
        check_stored(stored, later)
    objective = prepare_objective(objective, objective_options, later, search, log,
                                  checkpoint)
    return _Run(search, run, checkpoint, resources, log, earlier, later, objective)


def check_stored(stored: Sequence[StoredCheckpoint], later: CheckpointInfo) -> None:
    """Stored checkpoints handed in by a caller must be this pair's tensors."""
    if len(stored) != 2:
        raise ConfigError(f"stored must hold the pair's two stored checkpoints, got {len(stored)}")
    for s in stored:
        if {n for group in s.names for n in group} != set(later.specs):
            raise ConfigError(f"stored checkpoint from {s.source} does not hold the tensors of "
                              f"{later.path}")


def run_record(pair, objective, objective_options, search: SearchConfig) -> Dict:
    """What defines a run (run.json; a resume must match it): `RUN_DEFINING` and the search."""
    values = (
        [checkpoint_id(p) for p in pair],
        objective if isinstance(objective, str) else repr(objective),
        dict(objective_options or {}),
    )
    return {**dict(zip(RUN_DEFINING, values)), **jsonable(search.to_dict())}


def run_extras(objective, ctx) -> Dict:
    """run.json's other fields: how the run was started (resume repeats them; see
    `config.launch_record`). `ctx` is a pair's or a window's run."""
    return {"resources": ctx.resources.to_dict(), "objective_is_spec": isinstance(objective, str),
            **launch_record(ctx.run, ctx.checkpoint, ctx.q)}


# --- 2. object store ---------------------------------------------------------------------------


def store_pair(ctx: _Run, stored) -> None:
    """Put each checkpoint's shards into the object store once (unless `stored` already holds
    them), after checking the pair fits the smallest store that must hold it."""
    t0 = time.perf_counter()
    if stored is not None:
        ctx.stored = tuple(stored)
    else:
        check_object_store(ctx.earlier.nbytes + ctx.later.nbytes, ctx.resources,
                           ctx.run.allow_spilling, ctx.log)
        window = WindowStore([ctx.earlier, ctx.later], ctx.checkpoint, ctx.log)
        ctx.stored, ctx.puts = tuple(window.all()), 1
    ctx.seconds["load"] = time.perf_counter() - t0
    ctx.log(f"{'stored' if ctx.puts else 'reusing'} {len(ctx.stored[0].refs)} shard(s) per "
            f"checkpoint: {ctx.stored[0].total_bytes / 2**20:.1f} MiB each, "
            f"{ctx.seconds['load']:.1f}s")


# --- 3. the Tune experiment --------------------------------------------------------------------


def tuner_of(ctx: _Run, run_id: str, searcher, previous: Optional[Dict],
             record: Dict) -> Tuple[tune.Tuner, str]:
    """The run's Tune experiment, new or restored (`experiment.build_tuner`): λ trials, with
    the screening scheduler when multi-fidelity is on."""
    search = ctx.search
    ctx.log(f"tuning λ in [{search.alpha}, 1]: {search.num_samples} trials, {ctx.q} at a time, "
            f"{ctx.resources.to_dict()}/trial")
    scheduler = (ScreeningScheduler("score", ctx.objective.mode, search.screen_keep)
                 if search.screen_limit is not None else None)
    return build_tuner(ctx, run_id, searcher, previous, record, num_samples=search.num_samples,
                       scheduler=scheduler)


# --- 4. fit: experiment.fit --------------------------------------------------------------------


# --- 5. the best λ -----------------------------------------------------------------------------


def pick_best(rows: List[Dict], search: SearchConfig, mode: str, searcher) -> Tuple[Dict, Dict]:
    """(best, best observed) among fully evaluated trials with λ in [α, 1]. With noise_aware,
    the best is the evaluated λ with the best GP posterior mean: a noisy best score is partly a
    lucky draw (BENCHMARKS.md: lower regret). Raises RunError when no such trial succeeded."""
    ok = full_ok(rows)
    first = next((r["error"] for r in rows if r.get("error")), None)
    if not ok:
        raise RunError(f"every trial failed; first error: {first or 'no trial reported a result'}")
    in_space = [r for r in ok if r[LAMBDA] >= search.alpha - 1e-12]
    if not in_space:
        raise RunError(f"no trial with λ in [{search.alpha}, 1] succeeded; first error: "
                       f"{first or 'none reported a score'}")
    pick = min if mode == "min" else max
    best = best_observed = pick(in_space, key=lambda r: r["score"])
    if search.noise_aware and len(searcher.optimizer.space) >= 2:
        mean = searcher.posterior_mean([{LAMBDA: r[LAMBDA]} for r in in_space])
        best = in_space[int(mean.argmin() if mode == "min" else mean.argmax())]
    return best, best_observed


def full_ok(rows: List[Dict]) -> List[Dict]:
    """Successful full evaluations: only these compete (screened-out trials saw a subset)."""
    return [r for r in rows if r["status"] == "ok" and r.get("fidelity") != "screen"]


def endpoint_scores(rows: List[Dict]) -> Dict[float, float]:
    """Scores of Θ(t-1) (λ = 0) and Θ(t) (λ = 1), NaN where missing."""
    return {lam: next((r["score"] for r in full_ok(rows) if abs(r[LAMBDA] - lam) < 1e-12),
                      math.nan) for lam in (0.0, 1.0)}


# --- 6. results --------------------------------------------------------------------------------


def write_results(ctx: _Run, rows: List[Dict], best: Dict, best_observed: Dict, searcher,
                  grid) -> TuneMergeResult:
    """Export best/, then write summary.json once (with its plots), and print the table."""
    best_path = None
    if ctx.run.export_best:
        try:
            best_path = export_merged(
                *ctx.stored, best[LAMBDA], ctx.later.config_bytes,
                run_tokenizer_files(ctx.later, ctx.checkpoint), ctx.out / BEST_DIR,
                progress=None,
                revert=ctx.later.revert_names,
            )
        except WRITE_ERRORS as e:  # the previous best/, if any, is intact (see export_merged)
            raise output_error(e, f"the best model {ctx.out / BEST_DIR}", ctx.out) from e
        ctx.log(f"best merged model written to {best_path}")
        if ctx.run.export_to is not None:
            published = publish_dir(best_path, ctx.run.export_to)
            ctx.log(f"best merged model published to {published}")
    ctx.seconds.update(search=searcher.suggest_seconds,
                       merge_sum=sum(r.get("merge_s") or 0.0 for r in full_ok(rows)),
                       eval_sum=sum(r.get("eval_s") or 0.0 for r in full_ok(rows)),
                       total=time.perf_counter() - ctx.started)
    summary = run_summary(ctx, rows, best, best_observed, searcher, best_path)
    summary["plots"] = draw_plots(ctx.out, "tune", rows, summary, ctx.log)
    try:
        write_json_atomic(ctx.out / SUMMARY_FILE, summary)
    except OSError as e:
        raise output_error(e, f"the summary {ctx.out / SUMMARY_FILE}", ctx.out) from e
    result = TuneMergeResult(
        best_lambda=best[LAMBDA], best_score=best["score"], endpoint_scores=endpoint_scores(rows),
        mode=ctx.objective.mode, table=rows_to_table(rows), output_dir=ctx.out,
        best_model_path=best_path, result_grid=grid, summary=summary,
    )
    ctx.log(format_result(result))
    return result


def evaluation_totals(rows: List[Dict]) -> Dict:
    """The run's evaluation cost, from the objective's per-row accounting (``eval_*`` columns):
    tokens or requests scored and seconds summed over evaluations that ran (not read back from
    the journal), the largest peak memory, and the batch sizes used."""
    ran = [r for r in rows if r["status"] == "ok" and not r.get("from_journal")]
    total = {k: sum(r.get(k) or 0 for r in ran)
             for k in ("eval_tokens", "eval_requests", "eval_seconds")}
    peaks = [r["eval_peak_mem_mb"] for r in ran if isinstance(r.get("eval_peak_mem_mb"), float)]
    sizes = {r["eval_batch_size"] for r in ran if isinstance(r.get("eval_batch_size"), int)}
    return {**total, "evaluations": len(ran), "peak_mem_mb_max": max(peaks, default=None),
            "batch_sizes": sorted(sizes)}


def run_summary(ctx: _Run, rows: List[Dict], best: Dict, best_observed: Dict, searcher,
                best_path: Optional[Path]) -> Dict:
    """summary.json of a tune run (its keys are what plots and `load_result` read)."""
    search, (earlier, later) = ctx.search, ctx.stored
    ok = full_ok(rows)
    in_space = [r for r in ok if r[LAMBDA] >= search.alpha - 1e-12]
    screened = sum(r.get("fidelity") == "screen" for r in rows)
    return {
        "earlier": str(ctx.earlier.path), "later": str(ctx.later.path),
        "objective": repr(ctx.objective), "mode": ctx.objective.mode,
        "alpha": search.alpha, "best_lambda": best[LAMBDA], "best_score": best["score"],
        "best_by": "posterior_mean" if search.noise_aware else "observed",
        "best_observed_lambda": best_observed[LAMBDA],
        "endpoint_scores": {str(k): v for k, v in endpoint_scores(rows).items()},
        "trials": len(rows), "trials_ok": len(ok),
        "distinct_lambdas_in_space": len({round(r[LAMBDA], 9) for r in in_space}),
        "max_concurrent": ctx.q, "resources_per_trial": ctx.resources.to_dict(),
        "object_store": {
            "shards_per_checkpoint": len(later.refs), "bytes_per_checkpoint": earlier.total_bytes,
            "puts_per_checkpoint": ctx.puts,
            "object_ids": {"earlier": earlier.object_ids, "later": later.object_ids},
        },
        "seconds": ctx.seconds,
        "evaluation": evaluation_totals(rows),
        "best_model_path": str(best_path) if best_path else None,
        "resumed": ctx.resumed,
        "fidelity": {"screen_limit": search.screen_limit,
                     "screen_keep": search.screen_keep if search.screen_limit else None,
                     "screened_out": screened, "full": len(rows) - screened},
        "search": {
            "searcher": "GPHedgeSearch", "acquisitions": list(searcher.acquisitions),
            "eta": search.eta, "kappa": search.kappa, "xi": search.xi,
            "gp_noise": search.gp_noise, "seed": search.seed, "noise_key": search.noise_key,
            "batch_size": ctx.q, "batches": searcher.batch_index + 1,
            "final_gains": searcher.gains, "final_probabilities": searcher.probabilities(),
        },
    }


# --- resume and reload -------------------------------------------------------------------------


def resume_run(output_dir: str | os.PathLike, **overrides) -> TuneMergeResult:
    """Resume the run in `output_dir` with the settings in its run.json (the CLI's
    ``--resume``); `overrides` may set `RunConfig` fields that do not define the search
    (``progress``, ``export_best``, ...)."""
    out = Path(output_dir)
    stored = read_run_file(out)
    if "window" in stored:
        raise ConfigError(f"{out} holds a window's run, not a pair's: resume it with "
                          f"ckmerge-ray tune-window --resume {out}")
    if not stored.get("objective_is_spec"):
        raise ConfigError(
            f"the run in {out} was given a Python objective ({stored['objective']}); resume it "
            "from Python: tune_merge(..., objective=<the same object>, resume=True)"
        )
    search = SearchConfig(**{k: stored[k] for k in SearchConfig.__dataclass_fields__
                             if k in stored})
    run, checkpoint = resumed_settings(stored, str(out), **overrides)
    return tune_merge(stored["pair"], stored["resources"], stored["objective"], search=search,
                      run=run, checkpoint=checkpoint, objective_options=stored["objective_options"])
