"""The Ray Tune trainable of a window run (`tune_window`): merge Σ wᵢ·Θᵢ of the window's stored
checkpoints into a resident model, score it, journal it.

As a pair's trial (`trial.py`), a worker builds its model once per run and maps every
checkpoint's shards from the object store once (zero-copy); the next trial on that worker only
re-writes the weights. The weights come from the run's `Family` at the trial's point; the merge
is `merge.weighted_sum_into_` (fp64 sum, one rounding), through a `MergeEvaluator` held in the
worker rather than as an actor of its own.
"""

from __future__ import annotations

import math
import os
import socket
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import ray

from ckmerge_ray.evaluator import MergeEvaluator
from ckmerge_ray.families import Family, check_weights
from ckmerge_ray.model import import_model_code, trial_device, worker_memory_mb
from ckmerge_ray.objectives.base import Objective
from ckmerge_ray.search import search_record
from ckmerge_ray.store import StoredCheckpoint
from ckmerge_ray.trial import FULL, fetch_plan


@dataclass
class WindowPlan:
    """Everything a window trial needs; workers fetch it once per run from the `PlanHolder`."""

    run_id: str
    model_config: Dict  # config.json of the newest checkpoint
    dtypes: Dict[str, str]  # tensor name -> dtype in the checkpoints
    checkpoints: List[StoredCheckpoint]  # the window, oldest first
    family: Family  # point of the search space -> merge weights
    objective: Objective
    code_dir: Optional[str] = None  # the checkpoint whose own modeling code runs (opted in)


# run_id -> the worker's evaluator (model + mapped shards); lives as long as the worker process.
_EVALUATORS: Dict[str, MergeEvaluator] = {}


def resident_evaluator(plan: WindowPlan) -> Tuple[MergeEvaluator, bool]:
    """The worker's evaluator for this run: built (model, shards mapped) on first use."""
    if plan.run_id in _EVALUATORS:
        return _EVALUATORS[plan.run_id], False
    _EVALUATORS.clear()  # a model of an earlier run is no longer needed
    import_model_code(plan.model_config, plan.code_dir)
    evaluator = MergeEvaluator(plan.model_config, plan.dtypes, plan.checkpoints,
                               (plan.objective, None), plan.code_dir)
    evaluator.ready()
    _EVALUATORS[plan.run_id] = evaluator
    return evaluator, True


def weight_columns(weights: List[float]) -> Dict[str, float]:
    """The table's columns of a weight vector: w1 (oldest) .. wk (newest)."""
    return {f"w{i}": float(w) for i, w in enumerate(weights, start=1)}


def evaluate_weights(plan: WindowPlan, weights: List[float]) -> Dict:
    """Merge Σ wᵢ·Θᵢ into the resident model, score it, and return the trial's metrics."""
    start = time.perf_counter()
    weights = check_weights(weights, len(plan.checkpoints))
    evaluator, built = resident_evaluator(plan)
    metrics = evaluator.score(weights)
    score = float(metrics["score"])
    if not math.isfinite(score):
        raise FloatingPointError(f"objective returned a non-finite score {score} at {weights}")
    return {**metrics, "build_s": time.perf_counter() - start - metrics["merge_s"]
            - metrics["eval_s"], "model_built": built, **worker_memory_mb(),
            "worker": f"{socket.gethostname()}:{os.getpid()}", "device": str(trial_device())}


def window_trainable(config: Dict, holder: str) -> None:
    """Ray Tune function trainable of a window run: the point's weights, merged and scored.

    As `trial.merge_trainable`: an evaluation already in the run's journal (same weights within
    `trial.LAM_MATCH`) is reported again, not recomputed; an objective that fails at these
    weights is reported as a result with score NaN and the error, not raised.
    """
    from ray import tune

    plan, journal = fetch_plan(holder)
    tune.report(evaluate_point(plan, config, journal))


def evaluate_point(plan: WindowPlan, config: Dict, journal=None) -> Dict:
    """The result at the point `config`: journaled, or evaluated and journaled first."""
    weights = plan.family.weights(config)
    done = ray.get(journal.lookup_weights.remote(weights)) if journal is not None else None
    if done is not None:
        return {**done, "from_journal": True}
    try:
        result = evaluate_weights(plan, weights)
    except Exception as e:  # noqa: BLE001 - any failure of the merge or objective here
        result = {"score": math.nan, "error": f"{type(e).__name__}: {e}"}
    result.update(weight_columns(weights), weights=weights, fidelity=FULL,
                  acquisition=search_record(config)["acquisition"],
                  window_length=plan.family.length(config))
    if journal is not None:
        try:
            ray.get(journal.record_weights.remote(weights, result))
        except ray.exceptions.RayTaskError as e:  # raised by the holder: OSError, ...
            cause = getattr(e, "cause", None) or e
            result["journal_error"] = f"{type(cause).__name__}: {cause}"
    return result
