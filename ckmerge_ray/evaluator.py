"""A Ray actor that scores arbitrary merges of N stored checkpoints: baselines and sweep cells.

Tuning runs its trials on Ray Tune (`trial.py`); comparisons and trajectory sweeps need other
merges of the same stored shards (weighted averages of several checkpoints, Fisher and RegMean
merges, fixed-λ pairs). A `MergeEvaluator` builds its model once, maps the shards of every
checkpoint from the object store once (zero-copy, like a trial), and writes each requested
merge into that model before scoring it with the run's objective. The functions at the end run
the comparison's baseline methods on such actors.
"""

from __future__ import annotations

import math
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import ray
import torch

from ckmerge_ray import baselines
from ckmerge_ray.merge import weighted_merge_shard_into_
from ckmerge_ray.model import (
    build_model,
    release_freed_memory,
    tensor_map,
    trial_device,
    worker_memory_mb,
)
from ckmerge_ray.objectives.base import Objective
from ckmerge_ray.store import StoredCheckpoint, shard_tensors


class MergeEvaluator:
    """Holds one model and the window's stored checkpoints (oldest first); scores merges.

    Create it as a Ray actor with `start_evaluators`; every method returns the objective's
    metrics plus timings (``merge_s``, ``stats_s``, ``eval_s``).
    """

    def __init__(self, model_config: Dict, dtypes: Dict[str, str],
                 checkpoints: List[StoredCheckpoint], data: Tuple[Objective, Optional[np.ndarray]],
                 code_dir: Optional[str] = None):
        self.checkpoints = checkpoints
        # The objective, and token windows for Fisher / RegMean statistics (or None).
        self.objective, self.calibration = data
        self.device = trial_device()
        self.model = build_model(model_config, dtypes, self.device, code_dir=code_dir)
        self.tensors = tensor_map(self.model)
        self._shards: Optional[List[List[Dict[str, torch.Tensor]]]] = None

    def ready(self) -> Dict:
        """Map every checkpoint's shards now, so later timings hold merges and evaluations only."""
        start = time.perf_counter()
        self._shard_sets()
        return {"fetch_s": time.perf_counter() - start, **worker_memory_mb()}

    def score(self, weights: Sequence[float]) -> Dict:
        """Score Σ wᵢ·Θᵢ (weights per checkpoint, oldest first)."""
        t0 = time.perf_counter()
        self._merge(weights)
        return self._evaluate({"merge_s": time.perf_counter() - t0, "stats_s": 0.0})

    def fisher(self, weights: Sequence[float], floor: float = 1e-6) -> Dict:
        """Score the Fisher-weighted average of the checkpoints with nonzero weight
        (see `baselines.diagonal_fisher` and `baselines.fisher_merge`)."""
        t0 = time.perf_counter()
        members = [i for i, w in enumerate(weights) if w > 0]
        params, fishers = [], []
        for i in members:
            self._merge(one_hot(i, len(self.checkpoints)))
            fishers.append(baselines.diagonal_fisher(self.model, self._windows(), self.device))
            params.append({n: p.detach().float().clone()
                           for n, p in baselines.float_parameters(self.model).items()})
        merged = baselines.fisher_merge(params, fishers, [weights[i] for i in members], floor)
        del params, fishers
        t1 = time.perf_counter()
        self._merge(weights)  # buffers and anything without a gradient: the weighted average
        self._write_parameters(merged)
        return self._evaluate({"stats_s": t1 - t0, "merge_s": time.perf_counter() - t1})

    def regmean(self, weights: Sequence[float], alpha: float = 0.9) -> Dict:
        """Score the RegMean merge: linear layers from their input Gram matrices, every other
        tensor the weighted average (see `baselines.regmean_merge`)."""
        t0 = time.perf_counter()
        members = [i for i, w in enumerate(weights) if w > 0]
        linears = baselines.regmean_linears(self.model)
        layer_weights: Dict[str, List[torch.Tensor]] = {n: [] for n in linears}
        grams: Dict[str, List[torch.Tensor]] = {n: [] for n in linears}
        for i in members:
            self._merge(one_hot(i, len(self.checkpoints)))
            for name, g in baselines.linear_input_grams(self.model, self._windows(),
                                                        self.device).items():
                grams[name].append(g)
                layer_weights[name].append(linears[name].weight.detach().float().clone())
        coeffs = [weights[i] for i in members]
        merged = {n: baselines.regmean_merge(layer_weights[n], grams[n], coeffs, alpha)
                  for n in linears}
        del layer_weights, grams
        t1 = time.perf_counter()
        self._merge(weights)
        with torch.no_grad():
            for name, m in linears.items():
                m.weight.copy_(merged[name])
        return self._evaluate({"stats_s": t1 - t0, "merge_s": time.perf_counter() - t1})

    # --- internals ------------------------------------------------------------------------------

    def _shard_sets(self) -> List[List[Dict[str, torch.Tensor]]]:
        """Per shard index, the tensors of that shard in every checkpoint (zero-copy views)."""
        if self._shards is None:
            self._shards = []
            for refs in zip(*(c.refs for c in self.checkpoints)):
                self._shards.append([shard_tensors(s) for s in ray.get(list(refs))])
        return self._shards

    def _merge(self, weights: Sequence[float]) -> None:
        if len(weights) != len(self.checkpoints):
            raise ValueError(f"need {len(self.checkpoints)} weights, got {len(weights)}")
        done: set = set()
        for shards in self._shard_sets():
            used = [(s, w) for s, w in zip(shards, weights) if w != 0.0]
            weighted_merge_shard_into_(self.tensors, [s for s, _ in used],
                                       [w for _, w in used], done)

    def _write_parameters(self, values: Dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, p in baselines.float_parameters(self.model).items():
                p.copy_(values[name])

    def _windows(self) -> np.ndarray:
        if self.calibration is None:
            raise ValueError("Fisher and RegMean need calibration token windows")
        return self.calibration

    def _evaluate(self, timings: Dict) -> Dict:
        t0 = time.perf_counter()
        metrics = self.objective.evaluate(self.model, self.device)
        release_freed_memory()
        score = float(metrics["score"])
        if not math.isfinite(score):
            raise FloatingPointError(f"objective returned a non-finite score {score}")
        return {**metrics, **timings, "eval_s": time.perf_counter() - t0}


def start_evaluators(count: int, resources: Dict[str, float], model_config: Dict,
                     dtypes: Dict[str, str], checkpoints: List[StoredCheckpoint],
                     objective: Objective, calibration: Optional[np.ndarray] = None,
                     code_dir: Optional[str] = None) -> List:
    """`count` MergeEvaluator actors with a trial's resources, each with its shards mapped.

    The objective and calibration windows go into the object store once and are shared.
    """
    actor = ray.remote(MergeEvaluator).options(num_cpus=resources["cpu"],
                                               num_gpus=resources["gpu"])
    data = ray.put((objective, calibration))  # a top-level ref argument: Ray passes its value
    actors = [actor.remote(model_config, dtypes, checkpoints, data, code_dir)
              for _ in range(count)]
    ray.get([a.ready.remote() for a in actors])
    return actors


# --- baseline methods on evaluator actors (used by compare) ---------------------------------------------------------------------------------


def weights_method(score, weights: List[float]) -> Dict:
    m = score(weights)
    return {"score": m["score"], "evaluations": 1, "weights": weights, "extra_cost": "none"}


def greedy_method(score, singles: List[float], mode: str) -> Dict:
    members, best, soups = baselines.greedy_soup(singles, lambda w: score(w)["score"], mode)
    return {"score": best, "evaluations": len(singles) + soups,
            "weights": baselines.members_to_weights(members, len(singles)),
            "extra_cost": f"{len(singles)} single-checkpoint + {soups} soup evaluations"}


def stats_method(method, weights: List[float], param: float, windows: np.ndarray,
                  passes: str) -> Dict:
    m = ray.get(method.remote(weights, param))
    tokens = int(windows.size)
    return {"score": m["score"], "evaluations": 1, "weights": weights,
            "extra_cost": f"{passes} on {tokens} tokens per checkpoint "
                          f"({m['stats_s']:.1f}s of statistics)"}


def score_each(actors: List, weights: Sequence[Sequence[float]]) -> List:
    """Score each weighting (one weight per checkpoint) on the actors, spread over them; in
    order, each the evaluation's metrics or, where it failed (a non-finite score, a lost
    actor), its error: one merge that cannot be scored does not lose the others."""
    from ray.util import ActorPool

    pool = ActorPool(actors)
    for w in weights:
        pool.submit(lambda a, w: a.score.remote(list(w)), w)
    out = []
    for _ in weights:  # get_next: in submission order, each result or its error
        try:
            out.append(pool.get_next())
        except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as e:
            out.append(e)
    return out


def lambda_method(actors: List, n: int, lams: List[float], mode: str) -> Dict:
    """Score λ·Θ(t) + (1-λ)·Θ(t-1) (the window's last pair) at each λ, spread over the actors;
    the best of the λ that could be scored (the first error, if none could)."""
    results = score_each(actors, [pair_weights(n, lam) for lam in lams])
    ok = [(lam, r["score"]) for lam, r in zip(lams, results) if not isinstance(r, BaseException)]
    if not ok:
        raise next(r for r in results if isinstance(r, BaseException))
    lam, score = (min if mode == "min" else max)(ok, key=lambda x: x[1])
    failed = len(lams) - len(ok)
    return {"score": score, "evaluations": len(lams), "lam": lam,
            "weights": pair_weights(n, lam),
            "extra_cost": f"{failed} of the λ could not be scored" if failed else "none"}


def grid_lambdas(alpha: float, count: int) -> List[float]:
    """`count` evenly spaced λ in [alpha, 1], both ends included."""
    return [float(x) for x in np.linspace(alpha, 1.0, count)]


def random_lambdas(alpha: float, count: int, seed: int) -> List[float]:
    """`count` λ drawn uniformly from [alpha, 1]."""
    return [float(x) for x in np.random.default_rng(seed).uniform(alpha, 1.0, count)]


def pair_weights(n: int, lam: float) -> List[float]:
    return [0.0] * (n - 2) + [1.0 - lam, lam]


one_hot = baselines.one_hot_weights
