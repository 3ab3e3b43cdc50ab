"""`compare_merges`: the tuned merge side by side with the baselines, on one window of checkpoints.

Every method merges the same stored shards (each checkpoint is put into the object store once)
and is scored by the same objective, so the table answers "better than what, and at what
cost?". Example::

    from ckmerge_ray import compare_merges
    result = compare_merges(["ckpts/step800", "ckpts/step900", "ckpts/step1000"], {"cpu": 1},
                            objective="loss:heldout.jsonl", num_trials=10, output_dir="runs/cmp")
    print(result.markdown())

The λ methods (grid, random, tuned) search the last pair of the window; the averages use the
whole window (or its last `last_n` checkpoints).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
import pyarrow as pa
import ray

from ckmerge_ray import baselines
from ckmerge_ray.checkpoints import CheckpointInfo, load_checkpoint_info, plan_shards, validate_pair
from ckmerge_ray.errors import ConfigError
from ckmerge_ray.evaluator import start_evaluators
from ckmerge_ray.objectives import HeldoutLoss, Objective, parse_objective
from ckmerge_ray.plots import draw_plots
from ckmerge_ray.results import SUMMARY_FILE, write_bytes_atomic, write_json_atomic, write_table_atomic
from ckmerge_ray.store import StoredCheckpoint, put_checkpoint

METHODS = ("uniform", "greedy", "sma", "ema", "wma", "fisher", "regmean", "grid", "random", "tuned")
COMPARE_FILE = "compare.parquet"
COMPARE_MD = "compare.md"
TUNED_DIR = "tuned"
ENDPOINT = "later endpoint"

_LABELS = {
    "uniform": "uniform soup", "greedy": "greedy soup", "sma": "SMA", "ema": "EMA", "wma": "WMA",
    "fisher": "Fisher-weighted", "regmean": "RegMean", "grid": "grid search λ",
    "random": "random search λ", "tuned": "tuned λ (GP-Hedge)",
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


def compare_merges(
    checkpoints: Sequence[str | os.PathLike],
    resources: Optional[Mapping[str, float]] = None,
    objective: str | Objective = "",
    methods: Sequence[str] = METHODS,
    alpha: float = 0.5,
    num_trials: int = 10,
    last_n: Optional[int] = None,
    ema_alpha: float = 0.5,
    stats_tokens: int = 8192,
    calibration: Optional[str | os.PathLike] = None,
    regmean_alpha: float = 0.9,
    fisher_floor: float = 1e-6,
    max_concurrent: Optional[int] = None,
    output_dir: str | os.PathLike = "ckmerge_runs/compare",
    seed: int = 0,
    objective_options: Optional[Mapping[str, Any]] = None,
    allow_pickle: bool = False,
    max_shard_bytes: int = 1 << 30,
    overwrite: bool = False,
    progress: bool = True,
    tune_options: Optional[Mapping[str, Any]] = None,
) -> CompareResult:
    """Score the baselines and the tuned merge on a window of checkpoints (oldest first).

    Args:
        checkpoints: two or more Hugging Face model directories of one run, oldest first.
        resources, objective, alpha, num_trials, max_concurrent, seed, objective_options,
            allow_pickle, max_shard_bytes: as in `tune_merge`. The grid and random searches get
            `num_trials` evaluations in [alpha, 1], the tuned run's budget (which spends one more
            on λ = 0 when alpha > 0).
        methods: any of "uniform", "greedy", "sma", "ema", "wma", "fisher", "regmean",
            "grid", "random", "tuned" (default all).
        last_n: window of the moving averages (SMA, EMA, WMA): the last N checkpoints (default
            all given).
        ema_alpha: EMA's weight of the newest checkpoint (default 0.5).
        stats_tokens: tokens Fisher and RegMean compute their statistics on, per checkpoint
            (default 8192), taken from the held-out loss objective's text or `calibration`.
        calibration: a text file (jsonl/parquet/txt) for the Fisher and RegMean statistics;
            needed with lm-eval objectives, which hold no token stream.
        regmean_alpha: RegMean's scaling of the Grams' off-diagonal entries (default 0.9).
        fisher_floor: smallest Fisher value (default 1e-6).
        output_dir: gets compare.parquet and compare.md (rewritten after every method),
            summary.json, the tuned run under ``tuned/``, and compare.png.
        tune_options: further `tune_merge` arguments for the tuned run (e.g. ``acquisitions``).

    Returns:
        A `CompareResult`. Gains are over the later checkpoint alone (positive = better).
    """
    started = time.perf_counter()
    log = _printer(progress)
    from ckmerge_ray.tuner import _concurrency, _ensure_ray, _normalize_resources

    resources = _normalize_resources(resources)
    methods = check_methods(methods)
    paths = [Path(p) for p in checkpoints]
    _check_compare_arguments(paths, alpha, num_trials, last_n, ema_alpha, regmean_alpha,
                             stats_tokens)
    out = claim_output_dir(Path(output_dir).resolve(), COMPARE_FILE, overwrite,
                           extra=(COMPARE_MD, TUNED_DIR))

    infos = load_window(paths, allow_pickle)
    objective_arg = objective
    objective = parse_objective(objective, **dict(objective_options or {}))
    objective.prepare(infos[-1].path)
    windows = None
    if {"fisher", "regmean"} & set(methods):
        windows = calibration_windows(objective, calibration, stats_tokens, infos[-1].path)
    log(f"objective {objective!r} ready ({objective.mode}imize); {len(infos)} checkpoints, "
        f"methods: {', '.join(methods)}")

    started_ray = _ensure_ray(log)
    actors: List = []
    try:
        q = _concurrency(resources, max_concurrent, num_trials)
        stored = store_checkpoints(infos, resources, max_shard_bytes, log)
        n = len(infos)
        rows: List[Dict] = []
        table = Table(out, objective.mode, rows)
        # λ methods run their evaluations in parallel; the others are sequential.
        pool = q if {"grid", "random"} & set(methods) else 1
        actors = start_evaluators(pool, resources, infos[-1].config, _dtypes(infos[-1]), stored,
                                  objective, windows)
        actor = actors[0]
        log(f"{len(actors)} evaluator(s) ready")

        def score(weights: Sequence[float]) -> Dict:
            return ray.get(actor.score.remote(list(weights)))

        # The later checkpoint first: every gain is measured against it.
        singles = [n - 1] + (list(range(n - 1)) if "greedy" in methods else [])
        single_scores: Dict[int, float] = {}
        for i in singles:
            t0 = time.perf_counter()
            m = score(_one_hot(i, n))
            single_scores[i] = m["score"]
            if i == n - 1:
                table.later_score = m["score"]
            key = "endpoint" if i == n - 1 else f"checkpoint:{i}"
            label = ENDPOINT if i == n - 1 else f"checkpoint {infos[i].path.name}"
            table.add(key, label, m["score"], 1, time.perf_counter() - t0, _one_hot(i, n),
                      "none", checkpoint=infos[i].path.name)
            log(f"{label} ({infos[i].path.name}): score={m['score']:.5f}")

        recipes: Dict[str, Callable[[], Dict]] = {
            "uniform": lambda: _weights_method(score, baselines.uniform_weights(n)),
            "sma": lambda: _weights_method(score, baselines.sma_weights(n, last_n)),
            "ema": lambda: _weights_method(score, baselines.ema_weights(n, ema_alpha, last_n)),
            "wma": lambda: _weights_method(score, baselines.wma_weights(n, last_n)),
            "greedy": lambda: _greedy(score, [single_scores[i] for i in range(n)], objective.mode),
            "fisher": lambda: _stats_method(
                actor.fisher, baselines.uniform_weights(n), fisher_floor, windows,
                "fwd+bwd"),
            "regmean": lambda: _stats_method(
                actor.regmean, baselines.uniform_weights(n), regmean_alpha, windows, "fwd"),
            "grid": lambda: _lambda_method(actors, n, _grid(alpha, num_trials), objective.mode),
            "random": lambda: _lambda_method(
                actors, n, _random(alpha, num_trials, seed), objective.mode),
        }
        for method in [m for m in methods if m != "tuned"]:
            t0 = time.perf_counter()
            try:
                r = recipes[method]()
            except Exception as e:  # noqa: BLE001 - one failing baseline must not stop the rest
                table.add(method, _LABELS[method], None, 0, time.perf_counter() - t0, None, "",
                          error=f"{type(e).__name__}: {e}")
                log(f"{_LABELS[method]}: FAILED: {type(e).__name__}: {e}")
                continue
            table.add(method, _LABELS[method], r["score"], r["evaluations"],
                      time.perf_counter() - t0, r.get("weights"), r["extra_cost"],
                      lam=r.get("lam"))
            log(f"{_LABELS[method]}: score={r['score']:.5f} ({r['evaluations']} evaluation(s))")
        for a in actors:  # free their CPUs/GPUs for the tuned run's trials
            ray.kill(a)
        actors = []

        tuned_summary = None
        if "tuned" in methods:
            from ckmerge_ray.tuner import tune_merge

            t0 = time.perf_counter()
            try:
                result = tune_merge(
                    (infos[-2].path, infos[-1].path), resources, objective=objective_arg,
                    objective_options=objective_options, alpha=alpha, num_trials=num_trials,
                    max_concurrent=max_concurrent, output_dir=out / TUNED_DIR, seed=seed,
                    allow_pickle=allow_pickle, overwrite=True, progress=progress,
                    stored=stored[-2:], **{"export_best": False, **dict(tune_options or {})},
                )
            except Exception as e:  # noqa: BLE001
                table.add("tuned", _LABELS["tuned"], None, 0, time.perf_counter() - t0, None, "",
                          error=f"{type(e).__name__}: {e}")
                log(f"tuned: FAILED: {e}")
            else:
                tuned_summary = result.summary
                lam = result.best_lambda
                table.add("tuned", _LABELS["tuned"], result.best_score, result.table.num_rows,
                          time.perf_counter() - t0, _pair_weights(n, lam),
                          "Ray Tune start-up and a model build per trial worker", lam=lam)

        summary = {
            "kind": "compare",
            "checkpoints": [str(i.path) for i in infos],
            "objective": repr(objective),
            "mode": objective.mode,
            "later_score": table.later_score,
            "methods": list(methods),
            "settings": {"alpha": alpha, "num_trials": num_trials, "last_n": last_n,
                         "ema_alpha": ema_alpha, "stats_tokens": stats_tokens,
                         "stats_windows": None if windows is None else int(len(windows)),
                         "calibration": str(calibration) if calibration else None,
                         "regmean_alpha": regmean_alpha, "fisher_floor": fisher_floor,
                         "seed": seed, "max_concurrent": q, "resources_per_trial": resources},
            "best_method": table.best_key(),
            "tuned_endpoint_scores": (tuned_summary or {}).get("endpoint_scores"),
            "object_store": {"puts_per_checkpoint": 1,
                             "object_ids": {i.path.name: s.object_ids
                                            for i, s in zip(infos, stored)}},
            "seconds": time.perf_counter() - started,
        }
        write_json_atomic(out / SUMMARY_FILE, summary)
        draw_plots(out, log)
        result = CompareResult(table.write(), objective.mode, table.later_score, out,
                               json.loads((out / SUMMARY_FILE).read_text()))
        log("\n" + result.markdown())
        return result
    finally:
        for a in actors:
            ray.kill(a)
        if started_ray:
            ray.shutdown()


# --- the methods ---------------------------------------------------------------------------------


def _weights_method(score, weights: List[float]) -> Dict:
    m = score(weights)
    return {"score": m["score"], "evaluations": 1, "weights": weights, "extra_cost": "none"}


def _greedy(score, singles: List[float], mode: str) -> Dict:
    members, best, soups = baselines.greedy_soup(singles, lambda w: score(w)["score"], mode)
    return {"score": best, "evaluations": len(singles) + soups,
            "weights": baselines.members_to_weights(members, len(singles)),
            "extra_cost": f"{len(singles)} single-checkpoint + {soups} soup evaluations"}


def _stats_method(method, weights: List[float], param: float, windows: np.ndarray,
                  passes: str) -> Dict:
    m = ray.get(method.remote(weights, param))
    tokens = int(windows.size)
    return {"score": m["score"], "evaluations": 1, "weights": weights,
            "extra_cost": f"{passes} on {tokens} tokens per checkpoint "
                          f"({m['stats_s']:.1f}s of statistics)"}


def _lambda_method(actors: List, n: int, lams: List[float], mode: str) -> Dict:
    """Score λ·Θ(t) + (1-λ)·Θ(t-1) (the window's last pair) at each λ, spread over the actors."""
    from ray.util import ActorPool

    pool = ActorPool(actors)
    results = list(pool.map(lambda a, lam: a.score.remote(_pair_weights(n, lam)), lams))
    scores = [r["score"] for r in results]
    best = int(np.argmin(scores) if mode == "min" else np.argmax(scores))
    return {"score": scores[best], "evaluations": len(lams), "lam": lams[best],
            "weights": _pair_weights(n, lams[best]), "extra_cost": "none"}


def _grid(alpha: float, count: int) -> List[float]:
    """`count` evenly spaced λ in [alpha, 1], both ends included."""
    return [float(x) for x in np.linspace(alpha, 1.0, count)]


def _random(alpha: float, count: int, seed: int) -> List[float]:
    """`count` λ drawn uniformly from [alpha, 1]."""
    return [float(x) for x in np.random.default_rng(seed).uniform(alpha, 1.0, count)]


def _pair_weights(n: int, lam: float) -> List[float]:
    return [0.0] * (n - 2) + [1.0 - lam, lam]


def _one_hot(i: int, n: int) -> List[float]:
    return [1.0 if j == i else 0.0 for j in range(n)]


# --- the table -----------------------------------------------------------------------------------


class Table:
    """compare.parquet and compare.md, rewritten after every method so nothing is lost."""

    def __init__(self, out: Path, mode: str, rows: List[Dict]):
        self.out, self.mode, self.rows = out, mode, rows
        self.later_score = math.nan

    def add(self, key: str, label: str, score: Optional[float], evaluations: int, wall_s: float,
            weights: Optional[List[float]], extra_cost: str, lam: Optional[float] = None,
            error: Optional[str] = None, checkpoint: Optional[str] = None) -> None:
        sign = 1.0 if self.mode == "min" else -1.0
        ok = score is not None and math.isfinite(score)
        self.rows.append({
            "method": label, "key": key, "status": "ok" if ok else "error",
            "score": float(score) if ok else None,
            "gain": sign * (self.later_score - score) if ok and key != "endpoint" else (
                0.0 if ok else None),
            "evaluations": int(evaluations), "wall_s": float(wall_s),
            "lam": lam, "weights": json.dumps([round(w, 6) for w in weights]) if weights else None,
            "extra_cost": extra_cost, "checkpoint": checkpoint, "error": error,
        })
        self.write()

    def best_key(self) -> Optional[str]:
        ok = [r for r in self.rows if r["status"] == "ok"]
        if not ok:
            return None
        pick = min if self.mode == "min" else max
        return pick(ok, key=lambda r: r["score"])["key"]

    def write(self) -> pa.Table:
        table = write_table_atomic(self.out / COMPARE_FILE, self.rows)
        write_bytes_atomic(self.out / COMPARE_MD, (markdown_table(self.rows, self.mode) + "\n").encode())
        return table


def markdown_table(rows: List[Dict], mode: str) -> str:
    """The comparison as a Markdown table; gains are over the later checkpoint alone."""
    better = "lower" if mode == "min" else "higher"
    lines = [f"| method | score ({better} is better) | gain over later checkpoint | evaluations "
             "| wall time (s) | weights / λ |",
             "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['method']} | failed: {r['error']} | | {r['evaluations']} "
                         f"| {r['wall_s']:.1f} | |")
            continue
        what = f"λ={r['lam']:.4f}" if r.get("lam") is not None else (r.get("weights") or "")
        lines.append(f"| {r['method']} | {r['score']:.5f} | {r['gain']:+.5f} | "
                     f"{r['evaluations']} | {r['wall_s']:.1f} | {what} |")
    return "\n".join(lines)


# --- shared with the trajectory sweep ----------------------------------------------------------


def check_methods(methods: Sequence[str]) -> List[str]:
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ConfigError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    return list(dict.fromkeys(methods))


def _check_compare_arguments(paths, alpha, num_trials, last_n, ema_alpha, regmean_alpha,
                             stats_tokens) -> None:
    if len(paths) < 2:
        raise ConfigError(f"compare needs at least two checkpoints (oldest first), got {len(paths)}")
    if not 0.0 <= alpha < 1.0:
        raise ConfigError(f"alpha must be in [0, 1), got {alpha}")
    if not isinstance(num_trials, int) or num_trials < 2:
        raise ConfigError(f"num_trials must be at least 2, got {num_trials!r}")
    if last_n is not None and not 1 <= last_n <= len(paths):
        raise ConfigError(f"last_n must be in [1, {len(paths)}] (the checkpoints given), "
                          f"got {last_n}")
    if not 0.0 < ema_alpha <= 1.0:
        raise ConfigError(f"ema_alpha must be in (0, 1], got {ema_alpha}")
    if not 0.0 <= regmean_alpha <= 1.0:
        raise ConfigError(f"regmean_alpha must be in [0, 1], got {regmean_alpha}")
    if stats_tokens < 2:
        raise ConfigError(f"stats_tokens must be at least 2, got {stats_tokens}")


def claim_output_dir(out: Path, table_file: str, overwrite: bool, extra: Sequence[str] = ()) -> Path:
    """Refuse a directory that holds a table of this kind unless `overwrite`."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir is a file: {out}")
    if (out / table_file).exists():
        if not overwrite:
            raise ConfigError(f"{out} already holds {table_file}; pass overwrite=True "
                              "(CLI: --overwrite) or choose another directory")
        for name in (table_file, SUMMARY_FILE, *extra):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def load_window(paths: Sequence[Path], allow_pickle: bool) -> List[CheckpointInfo]:
    """Read and validate every checkpoint's headers against the newest, before any tensor."""
    from ckmerge_ray.tuner import _check_architecture

    if len(set(p.resolve() for p in paths)) != len(paths):
        raise ConfigError("the same checkpoint is listed twice")
    infos = [load_checkpoint_info(p, allow_pickle=allow_pickle) for p in paths]
    for info in infos[:-1]:
        validate_pair(info, infos[-1])
    _check_architecture(infos[-1])
    return infos


def store_checkpoints(infos: Sequence[CheckpointInfo], resources: Dict[str, float],
                      max_shard_bytes: int, log) -> List[StoredCheckpoint]:
    """Put every checkpoint into the object store once, all with the newest one's shard plan."""
    from ckmerge_ray.tuner import _check_object_store

    _check_object_store(sum(i.nbytes for i in infos), resources, False, log)
    plan = plan_shards(infos[-1], max_shard_bytes)
    reference: Dict = {}
    return [put_checkpoint(info, plan, reference=reference, progress=log) for info in infos]


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


def _dtypes(info: CheckpointInfo) -> Dict[str, str]:
    return {n: str(s.dtype).replace("torch.", "") for n, s in info.specs.items()}


def _printer(enabled: bool):
    def log(msg: str) -> None:
        if enabled:
            print(f"[ckmerge] {msg}", flush=True)
    return log
