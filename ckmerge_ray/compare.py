"""`compare_merges`: the tuned merge side by side with the baselines, on one window of checkpoints.

Every method merges the same stored shards (each checkpoint is put into the object store once)
and is scored by the same objective, so the table answers "better than what, and at what
cost?". Example::

    from ckmerge_ray import compare_merges
    result = compare_merges(["ckpts/step800", "ckpts/step900", "ckpts/step1000"], {"cpu": 1},
                            objective="loss:heldout.jsonl", num_trials=10, output_dir="runs/cmp")
    print(result.markdown())

The λ methods (grid, random, tuned) search the last pair of the window; the averages use the
whole window (or its last `last_n` checkpoints); tuned-window searches the weights of the whole
window (`tune_window`) with the tuned pair's evaluation budget.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
import pyarrow as pa
import ray

from ckmerge_ray import baselines
from ckmerge_ray.checkpoints import CheckpointInfo
from ckmerge_ray.cluster import check_object_store, ray_session, trial_slots
from ckmerge_ray.compare_table import AGAIN, Table, markdown_table
from ckmerge_ray.config import (
    BaselineConfig, CheckpointConfig, Resources, RunConfig, SearchConfig, split_options,
)
from ckmerge_ray.errors import ConfigError, RunError, last_line
from ckmerge_ray.evaluator import (
    greedy_method, grid_lambdas, lambda_method, one_hot, pair_weights, random_lambdas,
    start_evaluators, stats_method, weights_method,
)
from ckmerge_ray.inputs import (
    Log, WindowStore, code_dir_of, load_window, prepare_objective, printer, tokenizer_dir,
)
from ckmerge_ray.model import dtypes_of
from ckmerge_ray.objectives import HeldoutLoss, Objective
from ckmerge_ray.plots import draw_plots
from ckmerge_ray.results import (
    COMPARE_MD, COMPARE_TABLE, SUMMARY_FILE, TUNED_DIR, WINDOW_DIR, renamed_name,
    write_json_atomic, writing,
)
from ckmerge_ray.rundir import check_claimable, claim_output_dir
from ckmerge_ray.store import StoredCheckpoint

ENDPOINT = "later endpoint"

_LABELS = {
    "uniform": "uniform soup", "greedy": "greedy soup", "sma": "SMA", "ema": "EMA", "wma": "WMA",
    "fisher": "Fisher-weighted", "regmean": "RegMean", "grid": "grid search λ",
    "random": "random search λ", "tuned": "tuned λ (GP-Hedge)",
    "tuned-window": "tuned window weights (GP-Hedge)",
}


@dataclass
class CompareResult:
    """One row per method (also in compare.parquet and compare.md under `output_dir`)."""

    table: pa.Table
    mode: str
    later_score: float
    output_dir: Path
    summary: Dict = field(default_factory=dict)

    def row(self, method: str) -> Dict:
        """The row of a method by its key (e.g. "tuned") or label."""
        for r in self.table.to_pylist():
            if method in (r["key"], r["method"]):
                return r
        raise KeyError(method)

    def markdown(self) -> str:
        return markdown_table(self.table.to_pylist(), self.mode)


@dataclass
class _Compare:
    """One comparison's settings and checked inputs."""

    search: SearchConfig
    run: RunConfig
    checkpoint: CheckpointConfig
    baselines: BaselineConfig
    resources: Resources
    log: Log
    infos: List[CheckpointInfo]
    objective: Objective
    windows: Optional[np.ndarray]  # calibration tokens for Fisher / RegMean, or None
    tuned: Dict[str, Any]  # tune_merge's arguments for the tuned method
    out: Path = Path()


def compare_merges(
    checkpoints: Sequence[str | os.PathLike],
    resources: "Resources | Mapping[str, float] | None" = None,
    objective: str | Objective = "",
    *,
    search: Optional[SearchConfig] = None,
    run: Optional[RunConfig] = None,
    checkpoint: Optional[CheckpointConfig] = None,
    baselines: Optional[BaselineConfig] = None,
    objective_options: Optional[Mapping[str, Any]] = None,
    tune_options: Optional[Mapping[str, Any]] = None,
    **options,
) -> CompareResult:
    """Score the baselines and the tuned merge on a window of checkpoints (oldest first).

    Args:
        checkpoints: two or more Hugging Face model directories of one run, oldest first.
        resources, objective, search, run, checkpoint, objective_options: as in `tune_merge`
            (``run.output_dir`` defaults to ``ckmerge_runs/compare``). The grid and random
            searches get ``search.num_trials`` evaluations in [alpha, 1], the tuned run's budget
            (which spends one more on λ = 0 when alpha > 0).
        baselines: a `BaselineConfig`: which methods (default all of `METHODS`), the moving
            averages' window and EMA weight, Fisher / RegMean statistics and calibration text.
        tune_options: further `tune_merge` keywords for the tuned run (e.g. ``acquisitions``).
        **options: any field of the settings values by name (``alpha``, ``methods``, ...).

    Returns:
        A `CompareResult`. Gains are over the later checkpoint alone (positive = better). The
        table, compare.md, summary.json, compare.png and the tuned run (``tuned/``) are in
        ``output_dir``.

    Raises:
        CkmergeError for bad input, before anything is stored; RunError when the later
        checkpoint cannot be scored or every method failed.
    """
    settings = split_options(options, {"output_dir": "ckmerge_runs/compare"}, search=search,
                             run=run, checkpoint=checkpoint, baselines=baselines)
    ctx = check_compare(checkpoints, objective, objective_options, resources, tune_options,
                        **settings)
    ctx.out = claim_output_dir(ctx.out, COMPARE_TABLE, ctx.run.overwrite,
                               extra=(COMPARE_MD, TUNED_DIR, WINDOW_DIR))
    started = time.perf_counter()
    with ray_session(ctx.log):
        q = trial_slots(ctx.resources, ctx.run.max_concurrent, ctx.search.num_trials)
        check_object_store(sum(i.nbytes for i in ctx.infos), ctx.resources, False, ctx.log,
                           f"the {len(ctx.infos)} checkpoints")
        window = WindowStore(ctx.infos, ctx.checkpoint, ctx.log)
        stored = window.all()
        table = Table(ctx.out, ctx.objective.mode, [])
        score_baselines(ctx, stored, q, table)
        tuned = run_tuned(ctx, stored, table) if "tuned" in ctx.baselines.methods else None
        windowed = (run_tuned_window(ctx, stored, table)
                    if "tuned-window" in ctx.baselines.methods else None)
        summary = compare_summary(ctx, table, tuned, window, q, time.perf_counter() - started)
        result = CompareResult(table.write(), ctx.objective.mode, table.later_score, ctx.out,
                               summary)
        summary["plots"] = draw_plots(ctx.out, "compare", table.rows, summary, ctx.log,
                                      extra=[f"{d}/{p}" for d, run in ((TUNED_DIR, tuned),
                                                                        (WINDOW_DIR, windowed))
                                             for p in (run or {}).get("plots", [])])
        with writing(f"the summary {ctx.out / SUMMARY_FILE}", ctx.out, AGAIN):
            write_json_atomic(ctx.out / SUMMARY_FILE, summary)
    ctx.log("\n" + result.markdown())
    if not any(r["status"] == "ok" for r in table.rows if r["key"] in ctx.baselines.methods):
        raise RunError(f"every method failed; first error: {table.first_error()} "
                       f"(table in {ctx.out / COMPARE_TABLE})")
    return result


def check_compare(checkpoints, objective, objective_options, resources, tune_options,
                  search: SearchConfig, run: RunConfig, checkpoint: CheckpointConfig,
                  baselines: BaselineConfig) -> _Compare:
    """Every check `tune_merge` makes, and the baselines', before anything is stored."""
    log, resources = printer(run.progress), Resources.of(resources)
    if isinstance(checkpoints, (str, os.PathLike)) or len(checkpoints) < 2:
        raise ConfigError(f"compare needs at least two checkpoints (oldest first), got "
                          f"{checkpoints!r}")
    if baselines.last_n is not None and baselines.last_n > len(checkpoints):
        raise ConfigError(f"last_n must be in [1, {len(checkpoints)}] (the checkpoints given), "
                          f"got {baselines.last_n}")
    out = Path(run.output_dir).resolve()
    check_claimable(out, COMPARE_TABLE, run.overwrite)
    tuned = split_options(dict(tune_options or {}), search=search,
                          run=RunConfig(output_dir=str(out / TUNED_DIR), overwrite=True,
                                        progress=run.progress, export_best=False,
                                        max_concurrent=run.max_concurrent),
                          checkpoint=checkpoint)
    infos = load_window(checkpoints, checkpoint, log)
    objective_arg = objective
    objective = prepare_objective(objective, objective_options, infos[-1], search, log,
                                  checkpoint)
    windows = None
    if {"fisher", "regmean"} & set(baselines.methods):
        windows = calibration_windows(objective, baselines.calibration, baselines.stats_tokens,
                                      tokenizer_dir(infos[-1], checkpoint.tokenizer))
    log(f"{len(infos)} checkpoints, methods: {', '.join(baselines.methods)}")
    tuned.update(objective=objective_arg, objective_options=objective_options)
    return _Compare(search, run, checkpoint, baselines, resources, log, infos, objective,
                    windows, tuned, out)


def score_baselines(ctx: _Compare, stored: List[StoredCheckpoint], q: int, table: Table) -> None:
    """The later checkpoint alone (every gain is over it), then each baseline method, on
    evaluator actors (λ methods spread over `q` of them). A method that fails is recorded with
    its error; the later checkpoint failing ends the comparison (RunError)."""
    methods, n = ctx.baselines.methods, len(ctx.infos)
    pool = q if {"grid", "random"} & set(methods) else 1
    actors = start_evaluators(pool, ctx.resources.to_dict(), ctx.infos[-1].config,
                              dtypes_of(ctx.infos[-1]), stored, ctx.objective, ctx.windows,
                              code_dir_of(ctx.infos[-1], ctx.checkpoint))
    try:
        ctx.log(f"{len(actors)} evaluator(s) ready")
        score = lambda weights: ray.get(actors[0].score.remote(list(weights)))  # noqa: E731
        singles = score_singles(ctx, score, table, [n - 1] + (
            list(range(n - 1)) if "greedy" in methods else []))
        recipes = method_recipes(ctx, score, actors, singles)
        for method in [m for m in methods if m not in ("tuned", "tuned-window")]:
            t0 = time.perf_counter()
            try:
                r = recipes[method]()
            except Exception as e:  # noqa: BLE001 - one failing baseline must not stop the rest
                table.add_error(method, _LABELS[method], time.perf_counter() - t0, e)
                ctx.log(f"{_LABELS[method]}: FAILED: {type(e).__name__}: {e}")
                continue
            table.add(method, _LABELS[method], r["score"], r["evaluations"],
                      time.perf_counter() - t0, r.get("weights"), r["extra_cost"],
                      lam=r.get("lam"))
            ctx.log(f"{_LABELS[method]}: score={r['score']:.5f} ({r['evaluations']} evaluation(s))")
    finally:
        for a in actors:  # free their CPUs/GPUs for the tuned run's trials
            ray.kill(a)


def score_singles(ctx: _Compare, score, table: Table, which: List[int]) -> Dict[int, float]:
    """Each listed checkpoint alone, the later one first: its failure ends the comparison
    (RunError); an earlier one's is recorded as its row's error, and greedy, which needs it,
    fails for it."""
    n, scores = len(ctx.infos), {}
    for i in which:
        t0 = time.perf_counter()
        try:
            m = score(one_hot(i, n))
        except Exception as e:  # noqa: BLE001 - recorded, or the comparison's end
            if i == n - 1:
                raise RunError(f"the later checkpoint {ctx.infos[i].path} could not be scored, "
                               f"so no gain can be measured: {last_line(e)}") from e
            label = f"checkpoint {ctx.infos[i].name}"
            table.add_error(f"checkpoint:{i}", label, time.perf_counter() - t0, e)
            ctx.log(f"{label}: FAILED: {last_line(e)}")
            continue
        scores[i] = m["score"]
        if i == n - 1:
            table.later_score = m["score"]
        key = "endpoint" if i == n - 1 else f"checkpoint:{i}"
        label = ENDPOINT if i == n - 1 else f"checkpoint {ctx.infos[i].name}"
        table.add(key, label, m["score"], 1, time.perf_counter() - t0, one_hot(i, n), "none",
                  checkpoint=ctx.infos[i].name)
        ctx.log(f"{label} ({ctx.infos[i].name}): score={m['score']:.5f}")
    return scores


def method_recipes(ctx: _Compare, score, actors: List, singles: Dict[int, float]
                   ) -> Dict[str, Callable[[], Dict]]:
    """Each baseline as a call that returns its score, evaluations, weights and extra cost."""
    b, n, mode, actor = ctx.baselines, len(ctx.infos), ctx.objective.mode, actors[0]
    alpha, count = ctx.search.alpha, ctx.search.num_trials
    return {
        "uniform": lambda: weights_method(score, baselines.uniform_weights(n)),
        "sma": lambda: weights_method(score, baselines.sma_weights(n, b.last_n)),
        "ema": lambda: weights_method(score, baselines.ema_weights(n, b.ema_alpha, b.last_n)),
        "wma": lambda: weights_method(score, baselines.wma_weights(n, b.last_n)),
        "greedy": lambda: greedy_method(score, singles_of_all(ctx, singles), mode),
        "fisher": lambda: stats_method(actor.fisher, baselines.uniform_weights(n),
                                        b.fisher_floor, ctx.windows, "fwd+bwd"),
        "regmean": lambda: stats_method(actor.regmean, baselines.uniform_weights(n),
                                         b.regmean_alpha, ctx.windows, "fwd"),
        "grid": lambda: lambda_method(actors, n, grid_lambdas(alpha, count), mode),
        "random": lambda: lambda_method(actors, n, random_lambdas(alpha, count, ctx.search.seed), mode),
    }


def singles_of_all(ctx: _Compare, singles: Dict[int, float]) -> List[float]:
    """Every checkpoint's own score, oldest first, as greedy needs them; RunError naming the
    checkpoints that could not be scored."""
    missing = [ctx.infos[i].name for i in range(len(ctx.infos)) if i not in singles]
    if missing:
        raise RunError(f"greedy needs every checkpoint's own score; {', '.join(missing)} "
                       "could not be scored (see its row)")
    return [singles[i] for i in range(len(ctx.infos))]


def run_tuned(ctx: _Compare, stored: List[StoredCheckpoint], table: Table) -> Optional[Dict]:
    """`tune_merge` on the last pair, on the shards already stored; returns its summary.
    A failed run is a failed method; bad input (any other CkmergeError) propagates."""
    from ckmerge_ray.tuner import tune_merge

    t0 = time.perf_counter()
    pair = (ctx.infos[-2].source, ctx.infos[-1].source)
    try:
        result = tune_merge(pair, ctx.resources, stored=stored[-2:], **ctx.tuned)
    except RunError as e:
        table.add_error("tuned", _LABELS["tuned"], time.perf_counter() - t0, e)
        ctx.log(f"tuned: FAILED: {e}")
        return None
    lam, n = result.best_lambda, len(ctx.infos)
    table.add("tuned", _LABELS["tuned"], result.best_score, result.table.num_rows,
              time.perf_counter() - t0, pair_weights(n, lam),
              "Ray Tune start-up and a model build per trial worker", lam=lam)
    return result.summary


def run_tuned_window(ctx: _Compare, stored: List[StoredCheckpoint], table: Table
                     ) -> Optional[Dict]:
    """`tune_window` on the whole window, on the shards already stored, with the tuned pair's
    evaluation budget (``num_trials``, + 1 when the pair also scores λ = 0); returns its
    summary. A failed run, or a budget below the family's initial design, is a failed method
    (None)."""
    import dataclasses

    from ckmerge_ray.window import tune_window

    t0, n = time.perf_counter(), len(ctx.infos)
    family = ctx.baselines.window_family or ("simplex" if n <= 4 else "decay+length")
    search = ctx.tuned["search"]
    budget = search.num_trials + (1 if search.alpha > 0 else 0)
    options = {**ctx.tuned, "search": dataclasses.replace(search, num_trials=budget),
               "run": dataclasses.replace(ctx.tuned["run"], output_dir=str(ctx.out / WINDOW_DIR))}
    try:
        result = tune_window([i.source for i in ctx.infos], ctx.resources, family=family,
                             stored=stored, **options)
    except (RunError, ConfigError) as e:
        table.add_error("tuned-window", _LABELS["tuned-window"], time.perf_counter() - t0, e)
        ctx.log(f"tuned-window: FAILED: {e}")
        return None
    table.add("tuned-window", f"{_LABELS['tuned-window']}, {result.family.label}",
              result.best_score, result.table.num_rows, time.perf_counter() - t0,
              result.best_weights, "Ray Tune start-up and a model build per trial worker")
    return result.summary


def compare_summary(ctx: _Compare, table: Table, tuned: Optional[Dict], window: WindowStore,
                    q: int, seconds: float) -> Dict:
    """summary.json of a comparison (``plots`` is added when they are drawn)."""
    b = ctx.baselines
    return {
        "kind": "compare",
        "checkpoints": [str(i.source) for i in ctx.infos],
        "objective": repr(ctx.objective),
        "mode": ctx.objective.mode,
        "later_score": table.later_score,
        "methods": list(b.methods),
        "settings": {"alpha": ctx.search.alpha, "num_trials": ctx.search.num_trials,
                     "last_n": b.last_n, "ema_alpha": b.ema_alpha,
                     "stats_tokens": b.stats_tokens,
                     "stats_windows": None if ctx.windows is None else int(len(ctx.windows)),
                     "calibration": b.calibration, "regmean_alpha": b.regmean_alpha,
                     "fisher_floor": b.fisher_floor, "seed": ctx.search.seed,
                     "max_concurrent": q, "resources_per_trial": ctx.resources.to_dict()},
        "best_method": table.best_key(),
        "tuned_endpoint_scores": (tuned or {}).get("endpoint_scores"),
        "object_store": {"puts_per_checkpoint": 1, "object_ids": window.object_ids},
        "seconds": seconds,
    }


# --- calibration tokens for Fisher and RegMean -------------------------------------------


def calibration_windows(objective: Objective, calibration: Optional[str | os.PathLike],
                        tokens: int, tokenizer_dir: Path) -> np.ndarray:
    """Token windows for Fisher and RegMean: from `calibration` if given, else the held-out loss
    objective's own windows, cut to about `tokens` tokens."""
    if calibration is not None:
        seq_len = getattr(objective, "seq_len", 512)
        data = HeldoutLoss(calibration, seq_len=seq_len, max_tokens=tokens)
        data.prepare(tokenizer_dir)
        return data.windows
    if isinstance(objective, HeldoutLoss):
        per_window = objective.seq_len - 1
        return objective.windows[: max(1, math.ceil(tokens / per_window))]
    raise ConfigError(
        "fisher and regmean compute statistics on tokens, and this objective holds none: pass "
        "calibration=PATH (CLI: --calibration) with text in jsonl/parquet/txt, or leave out "
        "fisher and regmean"
    )


# Names of earlier versions, kept working: every output file is now named once, in results.py.
_RENAMED = {'COMPARE_FILE': 'COMPARE_TABLE'}


def __getattr__(name: str):
    return renamed_name(__name__, _RENAMED, name)
