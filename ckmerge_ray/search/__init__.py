"""Choosing λ: the GP-Hedge searcher (`hedge.py`), the merge-specific search space
(`space.py`), multi-fidelity screening (`fidelity.py`) and the names a trial needs (`record.py`).

The searcher's names are imported on first use: a trial worker needs only `record`, and
`hedge` brings bayes_opt, scikit-learn and SciPy."""

from importlib import import_module

from ckmerge_ray.search.record import ACQUISITIONS, LAMBDA, SEARCH_KEY, search_record

_LAZY = {"GPHedgeSearch": "hedge", "finite_real": "hedge", "initial_points": "space",
         "merge_searcher": "space", "posterior_from_rows": "space"}

__all__ = ["GPHedgeSearch", "ACQUISITIONS", "LAMBDA", "SEARCH_KEY", "finite_real",
           "initial_points", "merge_searcher", "posterior_from_rows", "search_record"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(f"ckmerge_ray.search.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ckmerge_ray.search' has no attribute {name!r}")
