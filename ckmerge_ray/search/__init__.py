"""Choosing λ: the GP-Hedge searcher (`hedge.py`), the merge-specific search space
(`space.py`) and multi-fidelity screening (`fidelity.py`)."""

from ckmerge_ray.search.hedge import ACQUISITIONS, SEARCH_KEY, GPHedgeSearch, finite_real
from ckmerge_ray.search.space import (
    LAMBDA, initial_points, merge_searcher, posterior_from_rows, search_record,
)

__all__ = [
    "GPHedgeSearch", "ACQUISITIONS", "LAMBDA", "SEARCH_KEY", "finite_real", "initial_points",
    "merge_searcher", "posterior_from_rows", "search_record",
]
