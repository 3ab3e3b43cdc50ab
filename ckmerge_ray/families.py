"""Weightings of a window of k checkpoints that a search can move through: the parametrizations
of `tune_window`.

A family maps a point of a box (what the GP searches) to merge weights w₁..w_k over the
window's checkpoints Θ₁..Θ_k, oldest first, with wᵢ ≥ 0 and Σ wᵢ = 1 (a convex combination: the
merge stays on the hull of the trajectory, as every average of PMA, LAWA and WSM does).

================  ==========================================  =====================================
family            searched parameters (box)                   weights
================  ==========================================  =====================================
``pair``          ``lam`` ∈ [α, 1]  (k = 2 only)               (1-λ, λ): `tune_merge`'s λ
``simplex``       ``u1..u{k-1}`` ∈ [0, 1]                      every convex combination (below)
``ema``           ``rate`` ∈ [0.05, 1]                         PMA's EMA: newest `rate`, then ×(1-rate)
``decay``         ``log2_power`` ∈ [-2, 2]                     WSM: the merge that equals a decay
                                                              1 - x^p of the LR over the window
+ ``length``      ``length`` ∈ [0.5, k + 0.5], rounded         the same over the last L checkpoints
================  ==========================================  =====================================

Why these: ``simplex`` is every weighting, but a GP needs roughly 2-3 trials per dimension, so it
suits k ≤ 4; ``ema`` and ``decay`` have one shape parameter whatever k (PMA, Li et al. 2025;
WSM, Tian et al. 2025), and ``length`` adds the window length, which WSM found mattered most.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Sequence, Tuple

import numpy as np

from ckmerge_ray import baselines
from ckmerge_ray.errors import ConfigError

FAMILIES = ("pair", "simplex", "ema", "decay")
EMA_RATES = (0.05, 1.0)  # PMA's α; below 0.05 the oldest checkpoint takes almost everything
LOG2_POWERS = (-2.0, 2.0)  # decay 1 - x^p for p in [1/4, 4]; p = 1 is the uniform average
WEIGHT_TOLERANCE = 1e-9  # weights must sum to 1 within this, and be ≥ -this


@dataclass(frozen=True)
class Family:
    """A parametrization of the weights of a window of `k` checkpoints (see the module table).

    Args:
        name: one of ``FAMILIES``.
        k: checkpoints in the window, ≥ 2 (``pair``: exactly 2).
        alpha: ``pair`` only: λ ∈ [alpha, 1] (default 0.5, as `tune_merge`).
        search_length: ``ema`` and ``decay``: also search the window length L ∈ 1..k
            (the merge then spans the newest L checkpoints).

    Raises:
        ConfigError: an unknown name, k < 2, ``pair`` with k ≠ 2, or ``search_length`` on a
            family that has no length.
    """

    name: str
    k: int
    alpha: float = 0.5
    search_length: bool = False

    def __post_init__(self):
        if self.name not in FAMILIES:
            raise ConfigError(f"family must be one of {FAMILIES}, got {self.name!r}")
        if not isinstance(self.k, int) or self.k < 2:
            raise ConfigError(f"a window needs at least 2 checkpoints, got {self.k!r}")
        if self.name == "pair" and self.k != 2:
            raise ConfigError(f"family 'pair' merges 2 checkpoints, the window has {self.k}; "
                              "use 'simplex', 'ema' or 'decay'")
        if self.search_length and self.name not in ("ema", "decay"):
            raise ConfigError(f"search_length applies to 'ema' and 'decay', not {self.name!r}")
        if not 0.0 <= self.alpha < 1.0:
            raise ConfigError(f"alpha must be in [0, 1), got {self.alpha!r}")

    @property
    def label(self) -> str:
        return self.name + ("+length" if self.search_length else "")

    def space(self) -> Dict[str, Tuple[float, float]]:
        """The box the GP searches: parameter name -> (low, high)."""
        if self.name == "pair":
            return {"lam": (self.alpha, 1.0)}
        if self.name == "simplex":
            return {f"u{j}": (0.0, 1.0) for j in range(1, self.k)}
        shape = {"ema": {"rate": EMA_RATES}, "decay": {"log2_power": LOG2_POWERS}}[self.name]
        return {**shape, "length": (0.5, self.k + 0.5)} if self.search_length else shape

    def weights(self, params: Mapping[str, float]) -> List[float]:
        """Merge weights w₁..w_k (oldest first) of the point `params` of `space()`."""
        if self.name == "pair":
            lam = float(params["lam"])
            return [1.0 - lam, lam]
        if self.name == "simplex":
            return cube_to_simplex([float(params[f"u{j}"]) for j in range(1, self.k)])
        last = self.length(params)
        if self.name == "ema":
            return baselines.ema_weights(self.k, float(params["rate"]), last=last)
        return decay_weights(self.k, 2.0 ** float(params["log2_power"]), last=last)

    def length(self, params: Mapping[str, float]) -> int:
        """The window length L a point uses (k unless ``search_length``)."""
        if not self.search_length:
            return self.k
        return min(self.k, max(1, int(math.floor(float(params["length"]) + 0.5))))

    def initial_points(self) -> List[Dict[str, float]]:
        """The design evaluated first: the fixed-formula averages and the pair's endpoints.

        ``simplex``: Θ_k alone, Θ_{k-1} alone, the uniform average (SMA) and PMA's EMA at 0.5
        (for k = 2 the last two coincide: 3 points); ``ema``: rate 1 (Θ_k alone), 0.5 and 0.05;
        ``decay``: p = 1 (uniform), 4 and 1/4; with ``length``, each over the whole window and
        the middle one over the last 2 as well. ``pair``: `search.initial_points`.
        """
        if self.name == "pair":
            from ckmerge_ray.search import initial_points

            return initial_points(self.alpha)
        if self.name == "simplex":
            k = self.k
            designs = [baselines.one_hot_weights(k - 1, k), baselines.one_hot_weights(k - 2, k),
                       baselines.uniform_weights(k), baselines.ema_weights(k, 0.5)]
            points = [dict(zip(self.space(), simplex_to_cube(w))) for w in designs]
        else:
            key = "rate" if self.name == "ema" else "log2_power"
            values = (1.0, 0.5, EMA_RATES[0]) if self.name == "ema" else (0.0, 2.0, -2.0)
            points = [{key: v} for v in values]
            if self.search_length:
                points = [{**p, "length": float(self.k)} for p in points]
                points.append({key: 0.5 if self.name == "ema" else 0.0, "length": 2.0})
        return unique_points(points)

    def to_dict(self) -> Dict:
        return {"name": self.name, "k": self.k, "alpha": self.alpha,
                "search_length": self.search_length}


def family_of(value: "Family | str | Mapping", k: int, alpha: float = 0.5) -> Family:
    """A `Family` from itself, a name (``"ema"``, ``"decay+length"``) or its `to_dict`."""
    if isinstance(value, Family):
        if value.k != k:
            raise ConfigError(f"the family is for {value.k} checkpoints, the window has {k}")
        return value
    if isinstance(value, Mapping):
        return Family(**{**value, "k": k})
    name, _, extra = str(value).partition("+")
    if extra not in ("", "length"):
        raise ConfigError(f"family {value!r}: the only suffix is '+length'")
    return Family(name, k, alpha=alpha, search_length=extra == "length")


def check_weights(weights: Sequence[float], k: int) -> List[float]:
    """`weights` as floats if they are k finite numbers ≥ 0 summing to 1, else ConfigError."""
    w = [float(x) for x in weights]
    if len(w) != k:
        raise ConfigError(f"need {k} merge weights (one per checkpoint), got {len(w)}")
    if not all(math.isfinite(x) for x in w) or min(w) < -WEIGHT_TOLERANCE:
        raise ConfigError(f"merge weights must be finite and non-negative, got {w}")
    if abs(sum(w) - 1.0) > WEIGHT_TOLERANCE:
        raise ConfigError(f"merge weights must sum to 1, got {w} (sum {sum(w)!r})")
    return w


def decay_weights(k: int, power: float, last: int | None = None) -> List[float]:
    """WSM's merge weights for the LR decay 1 - x^p over the last `last` checkpoints.

    Checkpoints Θ₁..Θ_L of a constant-LR phase differ by the updates g_s = Θ_{s+1} - Θ_s. A merge
    Σ cⱼΘⱼ equals Θ₁ + Σ_s m_s g_s with m_s = Σ_{j>s} cⱼ: the updates scaled by a decaying
    learning rate (Tian et al. 2025, "WSM", Thm. 3.1). Taking m_s = 1 - (s/L)^p gives
    cⱼ = (j/L)^p - ((j-1)/L)^p: p = 1 (linear decay) is the uniform average, p > 1 leans to the
    newest checkpoints, p < 1 (e.g. 1/2, "1-sqrt") to the oldest.
    """
    if not power > 0:
        raise ConfigError(f"decay power must be positive, got {power}")
    last = baselines.window_length(k, last)
    c = [(j / last) ** power - ((j - 1) / last) ** power for j in range(1, last + 1)]
    return [0.0] * (k - last) + c


def cube_to_simplex(u: Sequence[float]) -> List[float]:
    """The point of the unit cube [0, 1]^(k-1) as weights w₁..w_k (oldest first).

    Stick-breaking from the newest: v_j = 1 - (1 - u_j)^(1/(k-j)) is the share of what is left
    that Θ_{k-j+1} takes. A bijection between the open cube and the open simplex that maps the
    uniform distribution to the uniform one (v_j ~ Beta(1, k-j)), so the GP's box covers every
    weighting evenly. Source: the inverse-CDF stick-breaking of a flat Dirichlet (Devroye 1986).
    """
    k = len(u) + 1
    left, w_newest_first = 1.0, []
    for j, uj in enumerate(u, start=1):
        if not 0.0 <= uj <= 1.0:
            raise ConfigError(f"simplex coordinates must lie in [0, 1], got {list(u)}")
        v = 1.0 - (1.0 - uj) ** (1.0 / (k - j))
        w_newest_first.append(left * v)
        left -= left * v
    w_newest_first.append(max(left, 0.0))
    return w_newest_first[::-1]


def simplex_to_cube(weights: Sequence[float]) -> List[float]:
    """The inverse of `cube_to_simplex` (coordinates of a vanished remainder are 0)."""
    k = len(weights)
    w = check_weights(weights, k)[::-1]
    left, u = 1.0, []
    for j in range(1, k):
        v = min(1.0, w[j - 1] / left) if left > WEIGHT_TOLERANCE else 0.0
        u.append(1.0 - (1.0 - v) ** (k - j))
        left -= w[j - 1]
    return u


class WeightsOf:
    """Points of a family's box (n, d) with columns `names` -> their merge weights (n, k): what
    `GPHedgeSearch` measures spacing in (``embed``), so points that merge alike count once."""

    def __init__(self, family: Family):
        self.family = family

    def __call__(self, points: np.ndarray, names: Sequence[str]) -> np.ndarray:
        points = np.asarray(points, dtype=float).reshape(-1, len(names))
        return np.array([self.family.weights(dict(zip(names, p))) for p in points])


def unique_points(points: List[Dict[str, float]]) -> List[Dict[str, float]]:
    out: List[Dict[str, float]] = []
    for p in points:
        if all(max(abs(p[n] - q[n]) for n in p) > 1e-9 for q in out):
            out.append(p)
    return out
