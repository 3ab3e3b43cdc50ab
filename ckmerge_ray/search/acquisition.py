"""Where GP-Hedge looks: candidate points in a box, the argmax of an acquisition away from taken
points, space filling, and the kriging believer for pending points; plus what counts as a score.

Written here because bayes_opt's `acq_max` cannot exclude neighbourhoods of pending points, and
has no kriging believer. `GPHedgeSearch` (hedge.py) calls these on its GP and its bounds.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np


def finite_real(value) -> Optional[float]:
    """`value` as a float if it is a finite real number of any Python or numpy type, else None.

    A score is valid whatever its type: ``np.float32`` (a float32 model's loss), ``np.int64``
    (a count), a 0-d array or ``Repeater``'s mean. Booleans and complex numbers are not scores.
    """
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iuf":
        value = value.item()
    if not isinstance(value, numbers.Real):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


@dataclass
class Box:
    """The search box: `bounds` (d, 2), the smallest distance to a taken point as a fraction of
    each dimension's range, and how many random candidates a maximization draws."""

    bounds: np.ndarray
    min_spacing: float
    n_candidates: int
    # Optional map of points (n, d) to what they mean (n, m), e.g. a window's merge weights:
    # distances are then measured there (max norm, unscaled), so two parameter points that
    # mean the same thing (an edge of the cube that maps to one corner of the simplex) are one.
    embed: Optional[Callable[[np.ndarray], np.ndarray]] = None

    def maximize(self, kind: str, kappa: float, xi: float, gp, y_max: float, taken,
                 rng) -> np.ndarray:
        """Argmax of bayes_opt's acquisition `kind` ("ei", "poi", "ucb") over points at least
        `min_spacing` from every taken point: random candidates (plus a grid in 1-D), then
        L-BFGS-B from the best few. With no such candidate, the farthest point."""
        from bayes_opt import UtilityFunction
        from scipy.optimize import minimize

        util = UtilityFunction(kind=kind, kappa=kappa, xi=xi)
        cands = self.candidates(rng)
        ok = self.far_enough(cands, taken)
        if not ok.any():
            return self.farthest(taken, rng)
        cands = cands[ok]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            values = util.utility(cands, gp=gp, y_max=y_max)
            best = cands[int(np.argmax(values))]
            best_value = float(values.max())
            for start in cands[np.argsort(values)[-3:]]:
                res = minimize(lambda x: -float(util.utility(x.reshape(1, -1), gp=gp, y_max=y_max)[0]),
                               start, bounds=self.bounds, method="L-BFGS-B")
                x = np.clip(res.x, self.bounds[:, 0], self.bounds[:, 1])
                if res.success and -res.fun > best_value and self.far_enough(x[None], taken)[0]:
                    best, best_value = x, float(-res.fun)
        return best

    def candidates(self, rng) -> np.ndarray:
        """`n_candidates`·d uniform points (n, d) (the cover thins with d: scale it), plus a
        1001-point grid in one dimension."""
        lo, hi = self.bounds[:, 0], self.bounds[:, 1]
        cands = lo + (hi - lo) * rng.random((self.n_candidates * len(lo), len(lo)))
        if len(lo) == 1:
            cands = np.vstack([cands, np.linspace(lo, hi, 1001)])
        return cands

    def far_enough(self, cands: np.ndarray, taken) -> np.ndarray:
        """Which candidates lie at least `min_spacing` (per-dimension range fraction, max norm)
        from every taken point."""
        if not len(taken) or self.min_spacing == 0:
            return np.ones(len(cands), dtype=bool)
        return self._distance(cands, taken) >= self.min_spacing

    def farthest(self, taken, rng) -> np.ndarray:
        """The candidate farthest from every taken point (space filling)."""
        cands = self.candidates(rng)
        if not len(taken):
            return cands[0]
        return cands[int(np.argmax(self._distance(cands, taken)))]

    def _distance(self, cands: np.ndarray, taken) -> np.ndarray:
        taken = np.asarray(taken, dtype=float).reshape(-1, cands.shape[1])
        if self.embed is not None:
            cands, taken, scale = self.embed(cands), self.embed(taken), 1.0
        else:
            scale = self.bounds[:, 1] - self.bounds[:, 0]
        d = np.abs(cands[:, None, :] - taken[None, :, :]) / scale  # (n, t, dim)
        return d.max(axis=2).min(axis=1)


def result_value(result, key):
    """`result[key]` or None, for a dict, a pandas row (register_analysis) or None."""
    if result is None:
        return None
    try:
        return result.get(key)
    except AttributeError:
        return None


def kriging_believer(gp, X: np.ndarray, y: np.ndarray, pending: np.ndarray, noise: float):
    """The GP conditioned on pending points as if they returned their posterior mean.

    Kernel hyperparameters stay those fitted on real data (fantasies must not reshape them);
    the real points keep their noise, the fantasies get `noise`.
    """
    from sklearn.base import clone

    alpha = np.concatenate([np.broadcast_to(gp.alpha, (len(X),)), np.full(len(pending), noise)])
    fantasy = clone(gp).set_params(kernel=gp.kernel_, optimizer=None, alpha=alpha)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fantasy.fit(np.vstack([X, pending]), np.concatenate([y, gp.predict(pending)]))
    return fantasy
