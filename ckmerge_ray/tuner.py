"""`tune_merge`: validate the pair, put its shards into the object store once, run the Tune
experiment, and write the results (trials table, summary, best model).

Example::

    from ckmerge_ray import tune_merge
    result = tune_merge(("ckpts/step900", "ckpts/step1000"), {"cpu": 1},
                        objective="loss:heldout.jsonl", num_trials=10, output_dir="runs/x")
    print(result.best_lambda, result.best_score, result.endpoint_scores)
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import pyarrow as pa
import ray
from ray import tune

from ckmerge_ray.checkpoints import (
    load_checkpoint_info,
    plan_shards,
    tokenizer_files,
    validate_pair,
)
from ckmerge_ray.errors import ConfigError, RunError
from ckmerge_ray.objectives import Objective, parse_objective
from ckmerge_ray.plots import draw_plots
from ckmerge_ray.results import (
    BEST_DIR,
    JOURNAL_DIR,
    RUN_FILE,
    SUMMARY_FILE,
    TRIALS_FILE,
    export_merged,
    read_rows,
    rows_to_table,
    write_json_atomic,
    write_table_atomic,
)
from ckmerge_ray.search import ACQUISITIONS, LAMBDA, initial_points, merge_searcher
from ckmerge_ray.search.fidelity import ScreeningScheduler
from ckmerge_ray.store import StoredCheckpoint, put_checkpoint
from ckmerge_ray.trial import (
    PlanHolder,
    TrialPlan,
    build_model,
    check_model_covers,
    merge_trainable,
)


@dataclass
class TuneMergeResult:
    """What a tuning run produced; everything here is also on disk under `output_dir`."""

    best_lambda: float
    best_score: float
    endpoint_scores: Dict[float, float]  # {0.0: score of Θ(t-1), 1.0: score of Θ(t)}
    mode: str  # "min" or "max": how scores compare
    table: pa.Table  # one row per trial, also in trials.parquet
    output_dir: Path
    best_model_path: Optional[Path]
    result_grid: Any  # ray.tune.ResultGrid
    summary: Dict = field(default_factory=dict)

    def gain_over(self, lam: float) -> float:
        """How much better the best merge is than the endpoint at λ (positive = better)."""
        diff = self.endpoint_scores[lam] - self.best_score
        return diff if self.mode == "min" else -diff


def tune_merge(
    pair: Sequence[str | os.PathLike],
    resources: Optional[Mapping[str, float]] = None,
    objective: str | Objective = "",
    alpha: float = 0.5,
    num_trials: int = 10,
    max_concurrent: Optional[int] = None,
    output_dir: str | os.PathLike = "ckmerge_runs/latest",
    seed: int = 0,
    acquisitions: Sequence[str] = ACQUISITIONS,
    eta: float = 1.0,
    kappa: float = 1.0,
    xi: float = 0.0,
    gp_noise: float = 1e-6,
    initial_lambdas: Sequence[float] = (),
    objective_options: Optional[Mapping[str, Any]] = None,
    allow_pickle: bool = False,
    max_shard_bytes: int = 1 << 30,
    export_best: bool = True,
    overwrite: bool = False,
    storage_path: Optional[str] = None,
    progress: bool = True,
    resume: bool = False,
    max_failures: int = 2,
    allow_spilling: bool = False,
    noise_aware: bool = False,
    screen_limit: Optional[float] = None,
    screen_keep: float = 0.5,
    stored: Optional[Sequence[StoredCheckpoint]] = None,
    gpu_shard_cache: bool = True,
) -> TuneMergeResult:
    """Find the λ whose merge λ·Θ(t) + (1-λ)·Θ(t-1) scores best, with concurrent Ray Tune trials.

    Args:
        pair: (earlier, later) Hugging Face model directories; λ weights the later one.
        resources: per trial, e.g. ``{"cpu": 2, "gpu": 0.5}`` (default ``{"cpu": 1}``).
        objective: an `Objective` or a string such as ``"loss:heldout.jsonl"``.
        alpha: λ is searched in [alpha, 1] (default 0.5, the paper's space).
        num_trials: distinct λ values evaluated in [alpha, 1], endpoints included (default 10).
            When alpha > 0 one more trial scores Θ(t-1) alone (λ = 0).
        max_concurrent: trials at once (default: as many as the cluster's CPUs/GPUs allow).
        output_dir: gets trials.parquet (rewritten after every trial), summary.json and best/.
        seed: makes the search deterministic given the same scores.
        acquisitions: the GP-Hedge portfolio, any non-empty subset of ("ei", "pi", "ucb")
            (default all three; one alone disables the hedge).
        eta, kappa, xi, gp_noise: hedge learning rate, UCB exploration, EI/PI margin and GP
            observation noise (see `GPHedgeSearch`).
        initial_lambdas: extra λ values to evaluate right after the endpoints.
        objective_options: passed to the objective made from a string (e.g. ``seq_len``).
        allow_pickle: accept ``pytorch_model.bin`` checkpoints (loaded with weights_only=True).
        max_shard_bytes: object-store shard size for single-file checkpoints (default 1 GiB).
        export_best: write the best merged model to ``output_dir/best``.
        overwrite: reuse an output_dir that already holds a run.
        storage_path: Ray Tune's storage path (default ``output_dir/ray``); use a shared
            filesystem or object-store URI on a multi-node cluster.
        progress: print one line per stored shard and per finished trial.
        resume: continue the run in ``output_dir`` (after a killed driver, a preempted job):
            the Tune experiment and the searcher state are restored, and no finished evaluation
            is redone, not even one that finished while the driver was down (workers record
            each evaluation in ``output_dir/evaluations`` before reporting it). The arguments
            that define the search must equal the run's (see run.json). A finished run is just
            reported.
        max_failures: retries of a trial whose worker process died (default 2). An objective
            that raises is not retried: that λ is recorded as failed.
        allow_spilling: run even when the two checkpoints do not fit in a node's object store
            (Ray spills shards to disk and trials read them back, slowly); by default such a
            run is refused before anything is stored, with the numbers.
        noise_aware: feed each trial's reported standard error (``score_stderr``, reported by
            lm-eval objectives) into the GP as that observation's noise, so the search does not
            chase noise (see `GPHedgeSearch`'s ``noise_key``), and pick the best λ by the GP's
            posterior mean among the evaluated λ rather than by the best single score. Off by
            default.
        screen_limit: multi-fidelity screening, off by default. Every trial is first scored on
            this many documents per task (lm-eval ``limit`` semantics: a count, or a fraction);
            only λ whose cheap score is in the best ``screen_keep`` fraction so far get the full
            evaluation (Ray Tune's ASHA over two fidelities; the initial points always do). The
            table's ``fidelity`` column says which stage each trial reached; the best λ is chosen
            among fully evaluated trials only. With ``noise_aware``, screened-out λ inform the
            GP as noisy observations; without it they are only excluded from later proposals.
        screen_keep: the fraction of screened λ that go on to the full evaluation (default 0.5).
        stored: the pair already in the object store (from `store.put_checkpoint` with the
            later checkpoint's shard plan), as trajectory sweeps and comparisons pass it: this
            run then reads nothing from disk, and the caller keeps the shards alive.
        gpu_shard_cache: GPU trial workers copy both checkpoints into device memory once, when
            they take at most half of its free memory, so each trial merges device to device
            instead of moving 2 × model bytes from host memory (default True; the row's
            ``shards_on_device`` says which happened).

    Returns:
        A `TuneMergeResult`.

    Raises:
        CkmergeError (one of its subclasses) for bad input, before any trial starts.
    """
    started = time.perf_counter()
    log = _printer(progress)
    resources = _normalize_resources(resources)
    _check_arguments(pair, alpha, num_trials, max_concurrent)
    _check_initial_points(alpha, num_trials, initial_lambdas)
    noise_key = "score_stderr" if noise_aware else None
    try:  # the searcher checks its own arguments; do it now, before any expensive work
        merge_searcher(alpha, "min", 1, initial_lambdas, acquisitions=acquisitions, eta=eta,
                       kappa=kappa, xi=xi, gp_noise=gp_noise, seed=seed)
        if screen_limit is not None:
            ScreeningScheduler("score", "min", screen_keep)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    out = Path(output_dir).resolve()
    run_args = _run_arguments(pair, objective, objective_options, alpha, num_trials, seed,
                              acquisitions, eta, kappa, xi, gp_noise, initial_lambdas)
    run_args.update(noise_aware=noise_aware, screen_limit=screen_limit, screen_keep=screen_keep)
    previous = _claim_output_dir(out, overwrite, resume, run_args)
    if previous and (out / SUMMARY_FILE).exists():
        log(f"{out} holds a finished run; reporting it")
        return load_result(out, log)

    # 1. Checkpoints: headers only, then the architecture check on a meta-device model.
    earlier_info = load_checkpoint_info(pair[0], allow_pickle=allow_pickle)
    later_info = load_checkpoint_info(pair[1], allow_pickle=allow_pickle)
    validate_pair(earlier_info, later_info)
    dtypes = {n: str(s.dtype).replace("torch.", "") for n, s in later_info.specs.items()}
    _check_architecture(later_info)
    if stored is not None:
        _check_stored(stored, later_info)

    # 2. Objective: read and tokenize the data now, so bad input fails before Ray starts.
    objective_arg = objective
    objective = parse_objective(objective, **dict(objective_options or {}))
    if screen_limit is not None:
        _check_screen_limit(objective, screen_limit)
    objective.prepare(later_info.path)
    log(f"objective {objective!r} ready ({objective.mode}imize)")

    t_ray = time.perf_counter()
    started_ray = _ensure_ray(log)
    ray_start_s = time.perf_counter() - t_ray
    holder = None
    try:
        q = _concurrency(resources, max_concurrent, num_trials)
        if stored is None:  # otherwise the caller checked the store for everything it holds
            _check_object_store(earlier_info.nbytes + later_info.nbytes, resources,
                                allow_spilling, log)

        # 3. Object store: each checkpoint read once, one object per shard.
        t0 = time.perf_counter()
        if stored is not None:
            earlier, later = stored
            plan = later.names
            puts = 0
        else:
            plan = plan_shards(later_info, max_shard_bytes)
            reference: Dict = {}
            earlier = put_checkpoint(earlier_info, plan, reference=reference, progress=log)
            later = put_checkpoint(later_info, plan, reference=reference, progress=log)
            puts = len(earlier.refs)
        load_s = time.perf_counter() - t0
        log(
            f"{'stored' if stored is None else 'reusing'} {len(plan)} shard(s) per checkpoint: "
            f"{earlier.total_bytes / 2**20:.1f} MiB each, {load_s:.1f}s"
        )

        # 4. Tune experiment.
        run_id = uuid.uuid4().hex[:12]
        trial_plan = TrialPlan(
            run_id, later_info.config, dtypes, earlier, later, objective,
            journal_dir=str(out / JOURNAL_DIR), screen_limit=screen_limit,
            gpu_shard_cache=gpu_shard_cache,
        )
        searcher = merge_searcher(
            alpha, objective.mode, batch_size=q, extra_initial=initial_lambdas,
            acquisitions=acquisitions, eta=eta, kappa=kappa, xi=xi, gp_noise=gp_noise, seed=seed,
            noise_key=noise_key,
        )
        scheduler = (ScreeningScheduler("score", objective.mode, screen_keep)
                     if screen_limit is not None else None)
        num_samples = num_trials + (1 if alpha > 0 else 0)
        writer = TrialTableWriter(out / TRIALS_FILE, num_samples, objective.mode, progress)
        holder_name = f"ckmerge-plan-{run_id}"
        holder = PlanHolder.options(name=holder_name).remote([ray.put(trial_plan)])
        trainable = tune.with_resources(
            tune.with_parameters(merge_trainable, holder=holder_name),
            {"cpu": resources["cpu"], "gpu": resources["gpu"]},
        )
        if previous:
            experiment = previous["experiment"]
            # The writer and stopper come back from the experiment's own state (Tune pickles its
            # RunConfig); the writer reloads the rows already on disk.
            tuner = tune.Tuner.restore(experiment, trainable=trainable, restart_errored=True)
            log(f"resuming {experiment}: {_count_rows(out)} trial(s) already recorded")
        else:
            storage = storage_path or str(out / "ray")
            experiment = _join(storage, f"ckmerge-{run_id}")
            write_json_atomic(out / RUN_FILE, {**run_args, "experiment": experiment,
                                               "resources": resources, "max_concurrent": q,
                                               "allow_pickle": allow_pickle,
                                               "allow_spilling": allow_spilling,
                                               "objective_is_spec": isinstance(objective_arg, str)})
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(
                    search_alg=searcher,
                    scheduler=scheduler,
                    num_samples=num_samples,
                    max_concurrent_trials=q,
                    reuse_actors=True,
                ),
                run_config=tune.RunConfig(
                    name=f"ckmerge-{run_id}",
                    storage_path=storage,
                    callbacks=[writer],
                    stop=StopWhenAllFail(writer, after=min(num_samples, 3)),
                    failure_config=tune.FailureConfig(max_failures=max_failures),
                    verbose=0,
                ),
            )
        log(f"tuning λ in [{alpha}, 1]: {num_samples} trials, {q} at a time, {resources}/trial")
        t_fit = time.perf_counter()
        grid = tuner.fit()
        fit_s = time.perf_counter() - t_fit
        if previous:  # the searcher that ran is the one Tune restored: read its final state
            searcher = merge_searcher(alpha, objective.mode, batch_size=q)
            searcher.restore_from_dir(experiment)

        rows = read_rows(out / TRIALS_FILE)
        # Only full evaluations compete (and give the endpoints' scores); screened-out trials
        # were scored on a subset.
        ok = [r for r in rows if r["status"] == "ok" and r.get("fidelity") != "screen"]
        if not ok:
            first = next((r["error"] for r in rows if r.get("error")), "no trial reported a result")
            raise RunError(f"every trial failed; first error: {first}")
        in_space = [r for r in ok if r[LAMBDA] >= alpha - 1e-12]
        if not in_space:
            first = next((r["error"] for r in rows if r.get("error")), "none reported a score")
            raise RunError(f"no trial with λ in [{alpha}, 1] succeeded; first error: {first}")
        pick = min if objective.mode == "min" else max
        best = best_observed = pick(in_space, key=lambda r: r["score"])
        if noise_aware and len(searcher._observations()[1]) >= 2:
            # Noisy scores: the best observation is partly a lucky draw; the GP's posterior mean
            # weighs each score by its error and its neighbours (BENCHMARKS.md: lower regret).
            mean = searcher.posterior_mean([{LAMBDA: r[LAMBDA]} for r in in_space])
            best = in_space[int(mean.argmin() if objective.mode == "min" else mean.argmax())]
        endpoint_scores = {
            lam: next((r["score"] for r in ok if abs(r[LAMBDA] - lam) < 1e-12), math.nan)
            for lam in (0.0, 1.0)
        }

        best_path = None
        if export_best:
            files = tokenizer_files(later_info.path)
            best_path = export_merged(
                earlier, later, best[LAMBDA], (later_info.path / "config.json").read_bytes(),
                files, out / BEST_DIR, progress=None,
            )
            log(f"best merged model written to {best_path}")

        summary = {
            "earlier": str(earlier_info.path),
            "later": str(later_info.path),
            "objective": repr(objective),
            "mode": objective.mode,
            "alpha": alpha,
            "best_lambda": best[LAMBDA],
            "best_score": best["score"],
            "best_by": "posterior_mean" if noise_aware else "observed",
            "best_observed_lambda": best_observed[LAMBDA],
            "endpoint_scores": {str(k): v for k, v in endpoint_scores.items()},
            "trials": len(rows),
            "trials_ok": len(ok),
            "distinct_lambdas_in_space": len({round(r[LAMBDA], 9) for r in in_space}),
            "max_concurrent": q,
            "resources_per_trial": resources,
            "object_store": {
                "shards_per_checkpoint": len(plan),
                "bytes_per_checkpoint": earlier.total_bytes,
                "puts_per_checkpoint": puts,
                "object_ids": {"earlier": earlier.object_ids, "later": later.object_ids},
            },
            "seconds": {
                "ray_start": ray_start_s,
                "load": load_s,
                "search": searcher.suggest_seconds,
                "merge_sum": sum(r.get("merge_s") or 0.0 for r in ok),
                "eval_sum": sum(r.get("eval_s") or 0.0 for r in ok),
                "tune": fit_s,
                "total": time.perf_counter() - started,
            },
            "best_model_path": str(best_path) if best_path else None,
            "resumed": bool(previous),
            "fidelity": {
                "screen_limit": screen_limit, "screen_keep": screen_keep if screen_limit else None,
                "screened_out": sum(r.get("fidelity") == "screen" for r in rows),
                "full": sum(r.get("fidelity") != "screen" for r in rows),
            },
            "search": {
                "searcher": "GPHedgeSearch", "acquisitions": list(searcher.acquisitions),
                "eta": eta, "kappa": kappa, "xi": xi, "gp_noise": gp_noise, "seed": seed,
                "noise_key": noise_key,
                "batch_size": q, "batches": searcher.batch_index + 1,
                "final_gains": searcher.gains, "final_probabilities": searcher.probabilities(),
            },
        }
        write_json_atomic(out / SUMMARY_FILE, summary)
        if draw_plots(out, log):  # landscape.png, listed in summary.json
            summary = json.loads((out / SUMMARY_FILE).read_text())
        result = TuneMergeResult(
            best_lambda=best[LAMBDA], best_score=best["score"], endpoint_scores=endpoint_scores,
            mode=objective.mode, table=rows_to_table(rows), output_dir=out,
            best_model_path=best_path, result_grid=grid, summary=summary,
        )
        log(format_result(result))
        return result
    finally:
        if holder is not None:
            ray.kill(holder)  # releases the shards (see PlanHolder)
        if started_ray:
            ray.shutdown()


class TrialTableWriter(tune.Callback):
    """Appends a row per finished or failed trial and rewrites trials.parquet atomically."""

    def __init__(self, path: Path, total: int, mode: str, progress: bool):
        self.path = Path(path)
        self.total = total
        self.mode = mode
        self.progress = progress
        self.rows: List[Dict] = []
        self._reconciled = True  # nothing from an earlier process to reconcile

    def setup(self, **info):
        # On a restored experiment this object comes back from Tune's pickled state, rows and
        # all as of the run's start: the table on disk is the record, so start from it.
        self.rows = read_rows(self.path)
        self._reconciled = not self.rows

    def on_step_begin(self, iteration: int, trials, **info):
        # After a restore, drop rows of trials that Tune's last experiment snapshot did not hold
        # (they finished after it): the restored searcher proposes them again and the journal
        # answers without recomputing, under a new trial ID. Without this they would count twice.
        if self._reconciled:
            return
        self._reconciled = True
        known = {t.trial_id for t in trials}
        kept = [r for r in self.rows if r["trial_id"] in known]
        if len(kept) != len(self.rows):
            self.rows = kept
            write_table_atomic(self.path, self.rows)

    def on_trial_complete(self, iteration: int, trials, trial, **info):
        r = dict(trial.last_result or {})
        score = r.get("score")
        ok = r.get("error") is None and isinstance(score, (int, float)) and math.isfinite(score)
        row = {
            "trial_id": trial.trial_id,
            LAMBDA: float(trial.config.get(LAMBDA, r.get(LAMBDA, math.nan))),
            **_search_info(trial.config),
            "status": "ok" if ok else "error",
            "score": score if ok else None,
        }
        for key, value in r.items():
            if key in row or key in _TUNE_BOOKKEEPING or isinstance(value, (dict, list)):
                continue
            row[key] = value
        row["duration_s"] = r.get("time_total_s")
        row["error"] = None if ok else (r.get("error") or "no finite score reported")
        self._add(row)

    def on_trial_error(self, iteration: int, trials, trial, **info):
        self._add({
            "trial_id": trial.trial_id,
            LAMBDA: float(trial.config.get(LAMBDA, math.nan)),
            **_search_info(trial.config),
            "status": "error",
            "score": None,
            "error": _trial_error(trial),
        })

    def _add(self, row: Dict) -> None:
        # A trial re-run after a restore keeps its trial_id: one row per trial, never two.
        self.rows = [r for r in self.rows if r["trial_id"] != row["trial_id"]] + [row]
        write_table_atomic(self.path, self.rows)
        if self.progress:
            if row["status"] == "ok":
                timing = f"merge {row.get('merge_s', 0):.2f}s, eval {row.get('eval_s', 0):.2f}s"
                what = f"score={row['score']:.5f} ({timing})"
            else:
                what = f"FAILED: {row['error']}"
            if row.get("fidelity") == "screen":
                what += " on the screening subset: not competitive, stopped"
            if row.get("from_journal"):
                what += " (from the run's journal, not recomputed)"
            print(
                f"[ckmerge] trial {len(self.rows)}/{self.total} λ={row[LAMBDA]:.4f} "
                f"[{row['acquisition']}] {what}",
                flush=True,
            )


class StopWhenAllFail(tune.stopper.Stopper):
    """Ends the experiment once `after` trials have ended and every one of them failed: a broken
    objective or model fails every λ alike, and the run should say so, not spin through all."""

    def __init__(self, writer: TrialTableWriter, after: int):
        self.writer = writer
        self.after = after

    def __call__(self, trial_id: str, result: Dict) -> bool:
        return False

    def stop_all(self) -> bool:
        rows = self.writer.rows
        return len(rows) >= self.after and all(r["status"] != "ok" for r in rows)


def _search_info(config: Dict) -> Dict:
    """The searcher's record of a trial: acquisition, batch index and hedge probabilities."""
    info = {"acquisition": config.get("acquisition", ""), "batch": config.get("batch")}
    info.update({k: v for k, v in config.items() if k.startswith("p_")})
    return info


_TUNE_BOOKKEEPING = {
    "timestamp", "checkpoint_dir_name", "done", "training_iteration", "trial_id", "date",
    "time_this_iter_s", "time_total_s", "pid", "hostname", "node_ip", "time_since_restore",
    "iterations_since_restore", "config", "should_checkpoint", "experiment_tag",
}


def format_result(result: TuneMergeResult) -> str:
    """The final table: every λ with its score and gain over both endpoints."""
    e0, e1 = result.endpoint_scores[0.0], result.endpoint_scores[1.0]
    sign = 1 if result.mode == "min" else -1
    lines = [
        f"{'λ':>8}  {'score':>10}  {'gain vs λ=0':>12}  {'gain vs λ=1':>12}  acquisition",
    ]
    rows = sorted(result.table.to_pylist(), key=lambda r: r[LAMBDA])
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r[LAMBDA]:8.4f}  {'failed':>10}  {'':>12}  {'':>12}  {r['acquisition']}")
            continue
        g0, g1 = sign * (e0 - r["score"]), sign * (e1 - r["score"])
        mark = "  <- best" if r[LAMBDA] == result.best_lambda else ""
        lines.append(
            f"{r[LAMBDA]:8.4f}  {r['score']:10.5f}  {g0:+12.5f}  {g1:+12.5f}  {r['acquisition']}{mark}"
        )
    lines.append(
        f"best λ={result.best_lambda:.4f} score={result.best_score:.5f}; gain over Θ(t) "
        f"{result.gain_over(1.0):+.5f}, over Θ(t-1) {result.gain_over(0.0):+.5f}"
    )
    if result.best_model_path:
        lines.append(f"best model: {result.best_model_path}")
    return "\n".join(lines)


def _printer(enabled: bool):
    def log(msg: str) -> None:
        if enabled:
            print(f"[ckmerge] {msg}", flush=True)
    return log


def _normalize_resources(resources: Optional[Mapping[str, float]]) -> Dict[str, float]:
    res = {"cpu": 1.0, "gpu": 0.0}
    for key, value in dict(resources or {}).items():
        k = key.lower()
        if k not in res:
            raise ConfigError(f"resources keys must be 'cpu' and 'gpu', got {key!r}")
        if not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"resources[{key!r}] must be a non-negative number, got {value!r}")
        res[k] = float(value)
    if res["cpu"] == 0 and res["gpu"] == 0:
        raise ConfigError("resources must ask for at least some CPU or GPU, got cpu=0, gpu=0")
    return res


def _check_arguments(pair, alpha, num_trials, max_concurrent) -> None:
    if isinstance(pair, (str, os.PathLike)) or len(pair) != 2:
        raise ConfigError(f"pair must be (earlier, later) checkpoint directories, got {pair!r}")
    if not isinstance(alpha, (int, float)) or not 0.0 <= alpha < 1.0:
        raise ConfigError(f"alpha must be in [0, 1), got {alpha!r}")
    if not isinstance(num_trials, int) or num_trials < 2:
        raise ConfigError(
            f"num_trials must be at least 2 (the initial points λ=alpha and λ=1), got {num_trials!r}"
        )
    if max_concurrent is not None and (not isinstance(max_concurrent, int) or max_concurrent < 1):
        raise ConfigError(f"max_concurrent must be a positive integer, got {max_concurrent!r}")


def _run_arguments(pair, objective, objective_options, alpha, num_trials, seed, acquisitions,
                   eta, kappa, xi, gp_noise, initial_lambdas) -> Dict:
    """What defines a run's search, as stored in run.json and compared on resume."""
    return {
        "pair": [str(Path(p).resolve()) for p in pair],
        "objective": objective if isinstance(objective, str) else repr(objective),
        "objective_options": dict(objective_options or {}),
        "alpha": alpha, "num_trials": num_trials, "seed": seed,
        "acquisitions": list(acquisitions), "eta": eta, "kappa": kappa, "xi": xi,
        "gp_noise": gp_noise, "initial_lambdas": [float(x) for x in initial_lambdas],
    }


def _check_screen_limit(objective: Objective, screen_limit: float) -> None:
    """The cheap stage must be an objective of its own kind, and cheaper than the full one."""
    objective.with_limit(screen_limit)  # raises for objectives without a subset
    if not screen_limit > 0 or (isinstance(screen_limit, float) and screen_limit > 1):
        raise ConfigError(f"screen_limit must be a positive count or a fraction in (0, 1], "
                          f"got {screen_limit}")
    full = getattr(objective, "limit", None)
    if full is not None and type(full) is type(screen_limit) and screen_limit >= full:
        raise ConfigError(f"screen_limit={screen_limit} is not smaller than the objective's own "
                          f"limit={full}: screening would cost as much as the full evaluation")


def _check_initial_points(alpha: float, num_trials: int, initial_lambdas: Sequence[float]) -> None:
    outside = [x for x in initial_lambdas if not (isinstance(x, (int, float)) and alpha <= x <= 1)]
    if outside:
        raise ConfigError(f"initial_lambdas must lie in [alpha, 1] = [{alpha}, 1], got {outside}")
    first = [p[LAMBDA] for p in initial_points(alpha, initial_lambdas) if p[LAMBDA] >= alpha]
    if num_trials < len(first):
        raise ConfigError(
            f"num_trials={num_trials} is smaller than the {len(first)} initial points in "
            f"[{alpha}, 1] (λ = {', '.join(f'{x:g}' for x in first)}); raise num_trials"
        )


def _claim_output_dir(out: Path, overwrite: bool, resume: bool, run_args: Dict) -> Optional[Dict]:
    """Refuse a directory holding another run; return the stored run when resuming it."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir is a file: {out}")
    if overwrite and resume:
        raise ConfigError("overwrite and resume exclude each other: choose one")
    holds_run = any((out / name).exists() for name in (RUN_FILE, SUMMARY_FILE, TRIALS_FILE))
    if resume:
        if not (out / RUN_FILE).exists():
            raise ConfigError(f"nothing to resume in {out}: no {RUN_FILE} (start it without resume)")
        stored = json.loads((out / RUN_FILE).read_text())
        diffs = [f"{k}={run_args[k]!r} (the run has {stored.get(k)!r})"
                 for k in run_args if _jsonable(run_args[k]) != stored.get(k)]
        if diffs:
            raise ConfigError(f"cannot resume {out} with different arguments: " + "; ".join(diffs))
        return stored
    if holds_run and not overwrite:
        raise ConfigError(
            f"output directory {out} already holds a run; pass resume=True (CLI: --resume) to "
            "continue it, overwrite=True (CLI: --overwrite) to replace it, or choose another directory"
        )
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for name in (TRIALS_FILE, SUMMARY_FILE, RUN_FILE):
            if (out / name).exists():
                (out / name).unlink()
        shutil.rmtree(out / JOURNAL_DIR, ignore_errors=True)  # another run's evaluations
    return None


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def _join(storage: str, name: str) -> str:
    return f"{storage.rstrip('/')}/{name}" if "://" in storage else str(Path(storage) / name)


def _count_rows(out: Path) -> int:
    return len(read_rows(out / TRIALS_FILE))


def resume_run(output_dir: str | os.PathLike, **overrides) -> TuneMergeResult:
    """Resume the run in `output_dir` with the arguments stored in its run.json (the CLI's
    ``--resume``); `overrides` may set what does not define the search (progress, export_best)."""
    out = Path(output_dir)
    if not (out / RUN_FILE).exists():
        raise ConfigError(f"nothing to resume in {out}: no {RUN_FILE}")
    run = json.loads((out / RUN_FILE).read_text())
    if not run.get("objective_is_spec"):
        raise ConfigError(
            f"the run in {out} was given a Python objective ({run['objective']}); resume it from "
            "Python: tune_merge(..., objective=<the same object>, resume=True)"
        )
    args = {k: run[k] for k in ("objective", "objective_options", "alpha", "num_trials", "seed",
                                "acquisitions", "eta", "kappa", "xi", "gp_noise",
                                "initial_lambdas", "max_concurrent", "allow_pickle")}
    args["allow_spilling"] = run.get("allow_spilling", False)
    for key, default in (("noise_aware", False), ("screen_limit", None), ("screen_keep", 0.5)):
        args[key] = run.get(key, default)
    return tune_merge(run["pair"], run["resources"], output_dir=out, resume=True,
                      **{**args, **overrides})


def load_result(output_dir: str | os.PathLike, log=None) -> TuneMergeResult:
    """A finished run, read back from its directory (summary.json and trials.parquet)."""
    out = Path(output_dir)
    summary = json.loads((out / SUMMARY_FILE).read_text())
    rows = read_rows(out / TRIALS_FILE)
    best = summary.get("best_model_path")
    result = TuneMergeResult(
        best_lambda=summary["best_lambda"], best_score=summary["best_score"],
        endpoint_scores={float(k): v for k, v in summary["endpoint_scores"].items()},
        mode=summary["mode"], table=rows_to_table(rows), output_dir=out,
        best_model_path=Path(best) if best else None, result_grid=None, summary=summary,
    )
    if log:
        log(format_result(result))
    return result


def _check_stored(stored: Sequence[StoredCheckpoint], later_info) -> None:
    """Stored checkpoints handed in by a caller must be this pair's tensors."""
    if len(stored) != 2:
        raise ConfigError(f"stored must hold the pair's two stored checkpoints, got {len(stored)}")
    for s in stored:
        names = {n for group in s.names for n in group}
        if names != set(later_info.specs):
            raise ConfigError(f"stored checkpoint from {s.source} does not hold the tensors of "
                              f"{later_info.path}")


def _check_architecture(info) -> None:
    """Build the model class on the meta device and check the checkpoint fits it, at no cost."""
    import torch

    dtypes = {n: str(s.dtype).replace("torch.", "") for n, s in info.specs.items()}
    with torch.device("meta"):
        model = build_model(info.config, dtypes, device="meta")
    check_model_covers(model, list(info.specs), {n: s.shape for n, s in info.specs.items()})


def _ensure_ray(log=None) -> bool:
    """Connect to Ray: the running instance, RAY_ADDRESS's cluster, or a new local one.

    With RAY_ADDRESS set (``ray job submit`` sets it for a job's driver; the CLI's ``--address``
    sets it) this joins that cluster with a bare ``ray.init()``: CPUs, GPUs and object-store
    sizes belong to the cluster's nodes, never to the driver. Token authentication needs nothing
    here: Ray itself reads RAY_AUTH_MODE and the token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
    ~/.ray/auth_token). A new local instance binds its ports to this machine and runs no
    dashboard.

    Returns whether this call started Ray (and so should shut it down).
    """
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address and address != "local":  # "local" asks Ray for a new local instance
        ray.init()  # joins the cluster; resource counts belong to the cluster, not to us
        if log:
            log(f"joined the Ray cluster at {address}: {_describe_cluster()}")
    else:
        ray.init(include_dashboard=False, logging_level="WARNING")
    return True


def _describe_cluster() -> str:
    """One line for the job's log: what the tuner found in the cluster it joined."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    cpus = sum(n.get("CPU", 0) for n in nodes)
    gpus = sum(n.get("GPU", 0) for n in nodes)
    store = min((n.get("object_store_memory", 0) for n in nodes), default=0)
    return (f"{len(nodes)} node(s), {cpus:g} CPU, {gpus:g} GPU, smallest object store "
            f"{store / 2**30:.2f} GiB")


# Share of a node's object store the two checkpoints may take before the run warns: the rest is
# headroom for Ray Tune's own objects, trial results and other jobs' objects.
STORE_BUDGET = 0.8


def _check_object_store(need: int, resources: Dict[str, float], allow_spilling: bool, log) -> None:
    """Both checkpoints live in the object store of the driver's node (the primary copies) and
    of every node that runs trials (one pulled copy per node). The smallest of those stores
    decides: if the pair does not fit, Ray spills shards to disk and every trial pays for reading
    them back, so refuse with the numbers, or (allow_spilling) warn and go on, unless even the
    spill disk is too small. A pair that fits but leaves less than 20 % headroom gets a warning:
    other objects could still push shards out to disk."""
    import shutil
    import tempfile

    me = ray.get_runtime_context().get_node_id()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    # The driver's node, and every node that can hold at least one trial.
    used = [n for n in nodes if n["NodeID"] == me or (
        n["Resources"].get("CPU", 0) >= resources["cpu"]
        and n["Resources"].get("GPU", 0) >= resources["gpu"])]
    smallest = min(used, key=lambda n: n["Resources"].get("object_store_memory", 0))
    store = int(smallest["Resources"].get("object_store_memory", 0))
    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    role = "the driver's node" if smallest["NodeID"] == me else "a node that can run trials"
    where = (f"node {smallest.get('NodeManagerAddress', '?')} ({smallest['NodeID'][:8]}, {role}, "
             f"the smallest of {len(used)} such node(s))")
    if need <= STORE_BUDGET * store:
        return
    if need <= store:
        msg = (f"the two checkpoints ({gib(need)}) take {need / store:.0%} of the object store of "
               f"{where} ({gib(store)}); less than {1 - STORE_BUDGET:.0%} headroom is left, and "
               f"other objects may push shards out to disk. Give every node at least "
               f"{gib(need / STORE_BUDGET)} (ray start --object-store-memory)")
        warnings.warn(msg, ResourceWarning, stacklevel=3)
        log(f"warning: {msg}")
        return
    if not allow_spilling:
        raise ConfigError(
            f"the two checkpoints need {gib(need)} of object store but {where} has {gib(store)}: "
            "start Ray with a larger store (ray start --object-store-memory BYTES, or "
            "ray.init(object_store_memory=...)), or pass allow_spilling=True (CLI: "
            "--allow-spilling) to let Ray spill shards to disk, slowly"
        )
    free = shutil.disk_usage(tempfile.gettempdir()).free
    if need - store > 0.9 * free:
        raise ConfigError(
            f"the two checkpoints need {gib(need)}; {where} has {gib(store)} of object store "
            f"and {gib(free)} free for spilling in {tempfile.gettempdir()}: not enough for both"
        )
    msg = (f"the two checkpoints ({gib(need)}) exceed the object store of {where} "
           f"({gib(store)}); Ray will spill {gib(need - store)} to disk and trials will read it back")
    warnings.warn(msg, ResourceWarning, stacklevel=3)
    log(f"warning: {msg}")


def _concurrency(resources: Dict[str, float], requested: Optional[int], num_trials: int) -> int:
    """Trials at once: what was asked, else what the cluster fits; refuse what no node fits."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    fits = [
        n for n in nodes
        if n.get("CPU", 0) >= resources["cpu"] and n.get("GPU", 0) >= resources["gpu"]
    ]
    if not fits:
        biggest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
        raise ConfigError(
            f"per-trial resources cpu={resources['cpu']:g}, gpu={resources['gpu']:g} fit on no "
            f"node of this Ray cluster (largest: {biggest.get('CPU', 0):g} CPU, "
            f"{biggest.get('GPU', 0):g} GPU; {len(nodes)} node(s) alive). Ask for what one node "
            "has (fractions of a GPU are allowed); on an autoscaling cluster, nodes count once "
            "they are up: start the worker group first (min_workers / minReplicas)"
        )
    if requested:
        return requested
    slots = 0
    for n in fits:  # trials per node, e.g. 2 per GPU at gpu=0.5 (1e-9: 1 / 0.1 is 9.999...)
        per_node = [math.floor(n.get("CPU", 0) / resources["cpu"] + 1e-9)] if resources["cpu"] else []
        if resources["gpu"]:
            per_node.append(math.floor(n.get("GPU", 0) / resources["gpu"] + 1e-9))
        slots += int(min(per_node))
    return max(1, min(slots, num_trials))


def _trial_error(trial) -> str:
    """The last line of a failed trial's error (Ray keeps the full traceback in error.txt)."""
    try:
        path = getattr(trial, "error_file", None)
        text = Path(path).read_text() if path and Path(path).exists() else str(trial.status)
    except Exception as e:  # the error file may live on another node's disk
        text = f"trial failed ({e})"
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "trial failed"
