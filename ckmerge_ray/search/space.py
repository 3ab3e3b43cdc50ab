"""The merge-specific search space over λ: the initial design, the searcher `tune_merge` uses,
the searcher's per-trial record, and the GP of a finished run refitted from its table."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ckmerge_ray.search.hedge import GPHedgeSearch, finite_real
from ckmerge_ray.search.record import LAMBDA, search_record  # noqa: F401 (re-exported)


def initial_points(alpha: float, extra: Sequence[float] = ()) -> List[Dict[str, float]]:
    """λ = 0 (Θ(t-1) alone), the paper's λ = α and λ = 1, then `extra`, each once.

    When alpha = 0 the first two coincide, and λ = 0.5 takes the third place: the GP sees three
    points, and so a curvature, before its first choice in every search space. A repeated
    `extra` value (or one equal to a point above) is merged; one outside [alpha, 1] or not a
    finite number is refused with ValueError, so a run of `num_trials` evaluates that many
    distinct λ in [alpha, 1].
    """
    lams = [0.0, float(alpha), 1.0] if alpha > 0 else [0.0, 1.0, 0.5]
    bad = [x for x in extra if finite_real(x) is None or not alpha <= float(x) <= 1.0]
    if bad:
        raise ValueError(f"initial λ values must be numbers in [alpha, 1] = [{alpha}, 1], "
                         f"got {bad}")
    for x in extra:
        if all(abs(float(x) - y) > 1e-12 for y in lams):
            lams.append(float(x))
    return [{LAMBDA: lam} for lam in lams]


# Defaults of `merge_searcher`, chosen on the fit split of the sample-efficiency benchmark by
# `benchmarks/tune_defaults.py` (issue 16) and reported on the held-out split in BENCHMARKS.md.
LENGTH_SCALE_FLOOR = 0.2  # the GP's smallest length scale, in λ units
INITIAL_GAINS = {"pi": -1.0}  # the hedge starts PI at ≈ 16 % instead of 1/3


def merge_searcher(
    alpha: float, mode: str, batch_size: int, extra_initial: Sequence[float] = (), **kwargs
) -> GPHedgeSearch:
    """The searcher `tune_merge` uses: GP-Hedge over λ ∈ [α, 1], endpoints first.

    Two defaults differ from `GPHedgeSearch`'s (an argument passed explicitly wins):

    - ``min_length_scale``: the GP's length scale is kept at least ``LENGTH_SCALE_FLOOR`` = 0.2
      in λ units (0.4 of the range on [0.5, 1], 0.2 on [0, 1]). λ landscapes of adjacent
      checkpoints are smooth bowls, and with three points a free length scale collapses. In λ
      units because the GP's inputs are λ and it sees the same initial points (0, 0.5, 1) on
      [0, 1] as on [0.5, 1]: the same data give the same posterior on both spaces. (Until
      issue 16 the floor was 0.4 of the range, 0.4 λ on [0, 1]: too smooth there. On the fit
      split, EI's first nominee on [0, 1] reached 1 % of the gain on 6 of 9 landscapes with
      the λ floor, 3 of 9 with the old one; floors 0.1 and 0.3 λ: 1 and 5 of 9.)
    - ``initial_gains``: ``INITIAL_GAINS`` = {"pi": -1}: the hedge's first draws pick PI with
      probability ≈ 16 % instead of 1/3. PI (ξ = 0) nominates the point next to the incumbent
      first (λ = 0.505 beside 0.5, or 0.995 beside 1): on the fit split its first nominee was
      within 1 % of the gain on 0 of 9 landscapes, EI's and UCB's on 6. PI stays in the
      portfolio (Liu et al.'s GP-Hedge), and the hedge still moves to it if its nominees earn it.

    Chosen together on the fit split (Llama/stdlib/fp32 and GPT-2/tinyshakespeare/fp16) by
    ``benchmarks/tune_defaults.py``: median trials to within 1 % of the gain, q = 1 on
    [0.5, 1] / [0, 1], 4 / 5 → 3 / 4, and q = 4, 4 / 5 → 3 / 4. The held-out figures are in
    BENCHMARKS.md ("held-out landscapes").
    """
    kwargs.setdefault("min_length_scale", LENGTH_SCALE_FLOOR / (1.0 - float(alpha)))
    kwargs.setdefault("initial_gains", dict(INITIAL_GAINS))
    return GPHedgeSearch(
        space={LAMBDA: (float(alpha), 1.0)}, metric="score", mode=mode,
        points_to_evaluate=initial_points(alpha, extra_initial), batch_size=batch_size, **kwargs,
    )


# The GP settings a run's summary.json records under "search" that `merge_searcher` accepts.
_SEARCH_SETTINGS = ("acquisitions", "eta", "kappa", "xi", "gp_noise", "seed", "noise_key")


def posterior_from_rows(
    rows: Sequence[Dict], summary: Dict, lams: Sequence[float]
) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """The GP a finished run ended with, refitted from its trials table: (mean, std) at `lams`.

    Rebuilds `merge_searcher` with the settings in ``summary["search"]`` and records every row
    as the searcher did when the trial finished (so λ = 0 counts, screened rows only with a
    stderr under ``noise_key``, a repeated λ once). Mean and std are in the metric's own units
    and sign. Returns None when fewer than two observations are usable: no GP to draw.
    Why from the table: plots must be redrawable from saved files, without the Tune experiment.
    """
    search = summary.get("search") or {}
    settings = {k: search[k] for k in _SEARCH_SETTINGS if search.get(k) is not None}
    searcher = merge_searcher(float(summary["alpha"]), summary["mode"], batch_size=1, **settings)
    for row in rows:
        searcher.record_result({LAMBDA: float(row[LAMBDA])}, row, error=row.get("status") != "ok")
    if len(searcher.optimizer.space) < 2:  # bayes_opt TargetSpace: registered points
        return None
    return searcher.posterior([{LAMBDA: float(x)} for x in lams])
