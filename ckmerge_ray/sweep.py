"""`sweep_trajectory`: tune every adjacent pair of a run's checkpoints, and optionally score
merges of every pair (i, j) for a heatmap of the whole trajectory.

Each checkpoint is read from disk and put into the object store once, although it belongs to
two pairs: pair k reuses checkpoint k+1's shards as pair k+1's earlier checkpoint. Pairs run one
after another, each with the whole cluster's trial concurrency; without the heatmap at most two
checkpoints are in the store at a time. Example::

    from ckmerge_ray import sweep_trajectory
    result = sweep_trajectory("ckpts/", {"cpu": 1}, objective="loss:heldout.jsonl",
                              num_trials=8, output_dir="runs/sweep")
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import pyarrow as pa
import ray

from ckmerge_ray.checkpoints import plan_shards
from ckmerge_ray.compare import _dtypes, _printer, claim_output_dir, load_window
from ckmerge_ray.errors import ConfigError
from ckmerge_ray.evaluator import start_evaluators
from ckmerge_ray.objectives import Objective, parse_objective
from ckmerge_ray.plots import draw_plots
from ckmerge_ray.results import SUMMARY_FILE, write_json_atomic, write_table_atomic
from ckmerge_ray.store import StoredCheckpoint, put_checkpoint

SWEEP_FILE = "sweep.parquet"
HEATMAP_FILE = "heatmap.parquet"
PAIRS_DIR = "pairs"

# HF Trainer's checkpoint-<step>, and step<N> / step_<N> / iter_<N> / global_step<N> layouts.
CHECKPOINT_NAME = re.compile(r"^(?:checkpoint-|step_?|iter_|global_step)(\d+)$")


@dataclass
class SweepResult:
    """Per adjacent pair: endpoints' scores, best λ, gain (also in sweep.parquet)."""

    table: pa.Table
    heatmap: Optional[pa.Table]
    mode: str
    output_dir: Path
    summary: Dict = field(default_factory=dict)


def discover_checkpoints(source: str | os.PathLike | Sequence[str | os.PathLike]
                         ) -> List[Tuple[int, Path]]:
    """(step, directory) of each checkpoint, oldest first.

    A single directory that is not itself a checkpoint is searched for subdirectories named
    ``checkpoint-<step>``, ``step<N>``, ``step_<N>``, ``iter_<N>`` or ``global_step<N>``,
    sorted by the number (so step 900 comes before step 1000). A list of checkpoint directories
    is taken in the order given; their step is read from the name when it has one, else it is
    the position in the list.
    """
    if isinstance(source, (str, os.PathLike)):
        source = [source]
    paths = [Path(p) for p in source]
    if len(paths) == 1 and not (paths[0] / "config.json").exists():
        root = paths[0]
        if not root.is_dir():
            raise ConfigError(f"checkpoint directory does not exist: {root}")
        found = [(int(m.group(1)), p) for p in root.iterdir()
                 if p.is_dir() and (m := CHECKPOINT_NAME.match(p.name))]
        if len(found) < 2:
            seen = sorted(p.name for p in root.iterdir())[:8]
            raise ConfigError(
                f"found {len(found)} checkpoint(s) in {root}; a sweep needs at least two "
                f"subdirectories named checkpoint-<step>, step<N> or iter_<N> (saw: {seen}), or "
                "a list of checkpoint directories"
            )
        steps = [s for s, _ in found]
        if len(set(steps)) != len(steps):
            raise ConfigError(f"two checkpoints in {root} have the same step: {sorted(found)}")
        return sorted(found)
    out = []
    for i, p in enumerate(paths):
        m = CHECKPOINT_NAME.match(p.name)
        out.append((int(m.group(1)) if m else i, p))
    return out


def sweep_trajectory(
    checkpoints: str | os.PathLike | Sequence[str | os.PathLike],
    resources: Optional[Mapping[str, float]] = None,
    objective: str | Objective = "",
    num_trials: int = 8,
    alpha: float = 0.5,
    heatmap: bool = False,
    heatmap_lambda: float = 0.5,
    max_concurrent: Optional[int] = None,
    output_dir: str | os.PathLike = "ckmerge_runs/sweep",
    seed: int = 0,
    objective_options: Optional[Mapping[str, Any]] = None,
    allow_pickle: bool = False,
    max_shard_bytes: int = 1 << 30,
    overwrite: bool = False,
    progress: bool = True,
    tune_options: Optional[Mapping[str, Any]] = None,
) -> SweepResult:
    """Tune λ for every adjacent pair of checkpoints and tabulate the gains along the run.

    Args:
        checkpoints: a directory of checkpoints (see `discover_checkpoints`) or a list of
            checkpoint directories, oldest first.
        resources, objective, num_trials, alpha, max_concurrent, seed, objective_options,
            allow_pickle, max_shard_bytes: as in `tune_merge`, for every pair.
        heatmap: also score heatmap_lambda·Θ(j) + (1-heatmap_lambda)·Θ(i) for every pair
            i < j, and every checkpoint alone (n(n+1)/2 evaluations; all checkpoints are then
            held in the object store together).
        output_dir: gets sweep.parquet (rewritten after every pair), heatmap.parquet, each
            pair's tuning run under ``pairs/``, summary.json and the plots.
        tune_options: further `tune_merge` arguments for every pair (e.g. ``acquisitions``).

    Returns:
        A `SweepResult`; gains are over each pair's later checkpoint (positive = better).
    """
    started = time.perf_counter()
    log = _printer(progress)
    from ckmerge_ray.tuner import _ensure_ray, _normalize_resources, tune_merge

    resources = _normalize_resources(resources)
    found = discover_checkpoints(checkpoints)
    if len(found) < 2:
        raise ConfigError(f"a sweep needs at least two checkpoints, got {len(found)}")
    if not 0.0 < heatmap_lambda < 1.0:
        raise ConfigError(f"heatmap_lambda must be in (0, 1), got {heatmap_lambda}")
    out = claim_output_dir(Path(output_dir).resolve(), SWEEP_FILE, overwrite,
                           extra=(HEATMAP_FILE, PAIRS_DIR))
    steps = [s for s, _ in found]
    infos = load_window([p for _, p in found], allow_pickle)
    objective_arg = objective
    objective = parse_objective(objective, **dict(objective_options or {}))
    objective.prepare(infos[-1].path)  # refuse bad data before anything is stored
    names = [i.path.name for i in infos]
    log(f"sweep of {len(infos)} checkpoints ({', '.join(names)}), {len(infos) - 1} adjacent "
        f"pair(s); objective {objective!r}")

    started_ray = _ensure_ray(log)
    try:
        from ckmerge_ray.tuner import _check_object_store

        sizes = [i.nbytes for i in infos]
        need = sum(sizes) if heatmap else max(a + b for a, b in zip(sizes, sizes[1:]))
        _check_object_store(need, resources, False, log)
        plan = plan_shards(infos[-1], max_shard_bytes)
        reference: Dict = {}
        stored: Dict[int, StoredCheckpoint] = {}
        puts = {name: 0 for name in names}
        object_ids: Dict[str, List[str]] = {}

        def ensure_stored(k: int) -> StoredCheckpoint:
            if k not in stored:
                stored[k] = put_checkpoint(infos[k], plan, reference=reference, progress=log)
                puts[names[k]] += 1
                object_ids[names[k]] = stored[k].object_ids
            return stored[k]

        rows: List[Dict] = []
        for k in range(len(infos) - 1):
            pair = (ensure_stored(k), ensure_stored(k + 1))
            run_dir = Path(PAIRS_DIR) / f"{k:02d}-{names[k]}-{names[k + 1]}"
            log(f"pair {k + 1}/{len(infos) - 1}: {names[k]} -> {names[k + 1]}")
            t0 = time.perf_counter()
            row = {"pair": k, "earlier": str(infos[k].path), "later": str(infos[k + 1].path),
                   "earlier_step": steps[k], "later_step": steps[k + 1],
                   "run_dir": str(run_dir), "store_digest": _digest(pair)}
            try:
                result = tune_merge(
                    (infos[k].path, infos[k + 1].path), resources, objective=objective_arg,
                    objective_options=objective_options, alpha=alpha, num_trials=num_trials,
                    max_concurrent=max_concurrent, output_dir=out / run_dir, seed=seed,
                    allow_pickle=allow_pickle, progress=progress, stored=pair,
                    **{"export_best": False, **dict(tune_options or {})},
                )
            except Exception as e:  # noqa: BLE001 - a failed pair must not lose the others
                row.update(status="error", error=f"{type(e).__name__}: {e}")
                log(f"pair {names[k]} -> {names[k + 1]} FAILED: {row['error']}")
            else:
                row.update(
                    status="ok", error=None,
                    earlier_score=result.endpoint_scores[0.0],
                    later_score=result.endpoint_scores[1.0],
                    best_lambda=result.best_lambda, best_score=result.best_score,
                    gain=result.gain_over(1.0), gain_over_earlier=result.gain_over(0.0),
                    evaluations=result.table.num_rows,
                )
            row["wall_s"] = time.perf_counter() - t0
            rows.append(row)
            write_table_atomic(out / SWEEP_FILE, rows)
            if not heatmap:
                stored.pop(k)  # pair k+1 needs only checkpoint k+1 again: let Ray free k

        heat_table = None
        if heatmap:
            heat_table = _heatmap(infos, steps, [ensure_stored(k) for k in range(len(infos))],
                                  objective, resources, max_concurrent, heatmap_lambda, out, log)

        summary = {
            "kind": "sweep",
            "checkpoints": [str(i.path) for i in infos],
            "steps": steps,
            "objective": repr(objective),
            "mode": objective.mode,
            "alpha": alpha, "num_trials": num_trials, "seed": seed,
            "heatmap": {"enabled": heatmap, "lambda": heatmap_lambda},
            "pairs_ok": sum(r["status"] == "ok" for r in rows),
            "object_store": {"puts_per_checkpoint": puts, "object_ids": object_ids},
            "seconds": time.perf_counter() - started,
        }
        write_json_atomic(out / SUMMARY_FILE, summary)
        draw_plots(out, log)
        for r in rows:
            if r["status"] == "ok":
                log(f"{Path(r['earlier']).name} -> {Path(r['later']).name}: best λ="
                    f"{r['best_lambda']:.4f}, gain over the later checkpoint {r['gain']:+.5f}")
        return SweepResult(write_table_atomic(out / SWEEP_FILE, rows), heat_table, objective.mode,
                           out, json.loads((out / SUMMARY_FILE).read_text()))
    finally:
        if started_ray:
            ray.shutdown()


def _heatmap(infos, steps, stored, objective, resources, max_concurrent, lam, out, log) -> pa.Table:
    """Score lam·Θ(j) + (1-lam)·Θ(i) for all i < j, and each Θ(i) alone, on evaluator actors."""
    from ray.util import ActorPool

    from ckmerge_ray.tuner import _concurrency

    n = len(infos)
    cells = [(i, j) for i in range(n) for j in range(i, n)]
    q = _concurrency(resources, max_concurrent, len(cells))
    actors = start_evaluators(q, resources, infos[-1].config, _dtypes(infos[-1]), stored, objective)
    try:
        def weights(cell):
            i, j = cell
            w = [0.0] * n
            if i == j:
                w[i] = 1.0
            else:
                w[i], w[j] = 1.0 - lam, lam
            return w

        log(f"heatmap: {len(cells)} merges on {q} evaluator(s)")
        results = list(ActorPool(actors).map(lambda a, c: a.score.remote(weights(c)), cells))
    finally:
        for a in actors:
            ray.kill(a)
    rows = [{"i": i, "j": j, "step_i": steps[i], "step_j": steps[j],
             "lam": 1.0 if i == j else lam, "score": float(r["score"])}
            for (i, j), r in zip(cells, results) if math.isfinite(r["score"])]
    return write_table_atomic(out / HEATMAP_FILE, rows)


def _digest(pair: Sequence[StoredCheckpoint]) -> str:
    """The store digest the pair's trials report (see `trial.store_digest`)."""
    ids = ",".join(pair[0].object_ids + pair[1].object_ids)
    return hashlib.sha1(ids.encode()).hexdigest()[:16]
