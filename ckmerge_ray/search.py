"""Bayesian optimization of λ on Ray Tune: `BayesOptSearch` made safe for merge tuning.

Stock `BayesOptSearch` proposes the same point to concurrent trials, skips repeats and ends the
run after `patience` repeats, and hangs when a trial of its random phase fails. `MergeSearch`
keeps Ray's searcher (space conversion, GP, save/restore) and changes only that:

- the endpoints go first: λ = α and λ = 1 (the paper's initial points), and λ = 0 (Θ(t-1)
  alone) when α > 0, so the gain over both checkpoints is always known; all of them inform the GP;
- a suggestion closer than `min_spacing` to an evaluated, pending or failed λ is replaced by the
  middle of the widest unexplored gap of [α, 1], so a run always reaches its trial count with
  distinct λ values;
- a failed trial is remembered and never re-suggested, and does not stall the initial phase.
"""

from __future__ import annotations

import warnings
from typing import Dict, List, Optional

from ray.tune.search.bayesopt import BayesOptSearch

LAMBDA = "lam"


class MergeSearch(BayesOptSearch):
    """BayesOptSearch over λ ∈ [α, 1] with endpoints first and no repeated or abandoned points.

    Args:
        alpha: lower bound of λ (default 0.5, the paper's space); λ weights the later checkpoint.
        metric: result key to optimize (default "score").
        mode: "min" or "max" (default "min").
        acquisition: "ucb", "ei" or "pi" (default "ucb", as Ray's BayesOptSearch).
        kappa: UCB exploration weight (default 2.576). xi: EI/PI margin (default 0.0).
        gp_noise: the GP's `alpha`, the observation noise variance on the normalized scale
            (default 1e-6: held-out loss is deterministic).
        min_spacing: two λ values closer than this count as the same point (default 1e-3 of the
            range).
        seed: random state of the GP's acquisition optimizer.
    """

    def __init__(
        self,
        alpha: float = 0.5,
        metric: str = "score",
        mode: str = "min",
        acquisition: str = "ucb",
        kappa: float = 2.576,
        xi: float = 0.0,
        gp_noise: float = 1e-6,
        min_spacing: Optional[float] = None,
        seed: int = 0,
    ):
        kinds = {"ucb": "ucb", "ei": "ei", "pi": "poi"}
        if acquisition not in kinds:
            raise ValueError(f"acquisition must be one of {sorted(kinds)}, got {acquisition!r}")
        self.alpha = float(alpha)
        self.acquisition = acquisition
        self.gp_noise = gp_noise
        self.min_spacing = min_spacing if min_spacing is not None else 1e-3 * (1.0 - self.alpha)
        initial = initial_points(self.alpha)
        self._sources: Dict[str, str] = {}
        self._failed: List[float] = []
        super().__init__(
            space={LAMBDA: (self.alpha, 1.0)},
            metric=metric,
            mode=mode,
            points_to_evaluate=[dict(p) for p in initial],
            utility_kwargs={"kind": kinds[acquisition], "kappa": kappa, "xi": xi},
            random_state=seed,
            random_search_steps=len(initial),
            patience=10**9,  # repeats are replaced, never counted toward an early stop
            skip_duplicate=False,
        )

    def _setup_optimizer(self):
        super()._setup_optimizer()
        self.optimizer.set_gp_params(alpha=self.gp_noise)

    def suggest(self, trial_id: str) -> Optional[Dict]:
        from_initial = bool(self._points_to_evaluate)
        config = super().suggest(trial_id)
        if not config:
            return config
        lam = float(config[LAMBDA])
        source = "initial" if from_initial else self.acquisition
        taken = self._taken_lambdas(exclude=trial_id)
        if not from_initial and any(abs(lam - t) < self.min_spacing for t in taken):
            lam = widest_gap_midpoint(taken, self.alpha, 1.0)
            source = "gap"
            self._live_trial_mapping[trial_id] = {LAMBDA: lam}
        self._sources[trial_id] = source
        return {LAMBDA: lam, "acquisition": source}

    def on_trial_complete(
        self, trial_id: str, result: Optional[Dict] = None, error: bool = False
    ) -> None:
        params = self._live_trial_mapping.get(trial_id)
        if params is not None and (error or result is None):
            self._failed.append(float(params[LAMBDA]))
            self._live_trial_mapping.pop(trial_id)
            if len(self._buffered_trial_results) < self.random_search_trials:
                # One fewer initial result will ever arrive: without this the searcher would wait
                # for it forever (a silent hang in stock BayesOptSearch).
                self.random_search_trials -= 1
                if len(self._buffered_trial_results) == self.random_search_trials:
                    for p, r in self._buffered_trial_results:
                        self._register_result(p, r)
            return
        super().on_trial_complete(trial_id, result=result, error=error)

    def _register_result(self, params, result):
        with warnings.catch_warnings():
            # λ = 0 lies outside [α, 1] by design: it informs the GP about the earlier endpoint.
            warnings.filterwarnings("ignore", message="(?s).*outside the bounds")
            super()._register_result({LAMBDA: params[LAMBDA]}, result)

    def _taken_lambdas(self, exclude: str) -> List[float]:
        taken = [float(x[0]) for x in self.optimizer.space.params] if self.optimizer else []
        taken += [float(p[LAMBDA]) for p, _ in self._buffered_trial_results]
        taken += [float(p[LAMBDA]) for t, p in self._live_trial_mapping.items() if t != exclude]
        return taken + self._failed

    def source_of(self, trial_id: str) -> str:
        """How a trial's λ was chosen: "initial", the acquisition's name, or "gap"."""
        return self._sources.get(trial_id, "unknown")


def initial_points(alpha: float) -> List[Dict[str, float]]:
    """The paper's initial points λ = α and λ = 1, preceded by λ = 0 when α > 0."""
    points = [{LAMBDA: float(alpha)}, {LAMBDA: 1.0}]
    if alpha > 0:
        points.insert(0, {LAMBDA: 0.0})
    return points


def widest_gap_midpoint(taken: List[float], low: float, high: float) -> float:
    """The middle of the largest interval of [low, high] that holds no taken point."""
    inside = sorted({min(max(t, low), high) for t in taken} | {low, high})
    gaps = [(b - a, (a + b) / 2) for a, b in zip(inside, inside[1:])]
    return max(gaps)[1]
