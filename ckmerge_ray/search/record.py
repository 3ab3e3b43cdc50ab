"""The names every part of a run shares about the search, without the searcher itself: trial
workers import this, not `hedge` (bayes_opt, scikit-learn and SciPy cost a worker ~1-2 s of
start-up it has no use for)."""

from __future__ import annotations

from typing import Dict

LAMBDA = "lam"  # the name of λ in every config and table
ACQUISITIONS = ("ei", "pi", "ucb")

# The one config key the searcher writes besides the user's parameters: its per-trial
# bookkeeping, {"acquisition", "batch", "p_<name>"...}. Read it with `search_record`.
SEARCH_KEY = "_ckmerge_search"


def search_record(config: Dict) -> Dict:
    """What the searcher recorded about a trial in its config: the acquisition that proposed it
    (``"initial"``, ``"explore"``, ``"ei"``, ...; ``""`` when the config holds no record), the
    batch index (None then), and the hedge probabilities ``p_<name>``.

    The record lives under the one key ``SEARCH_KEY`` ("_ckmerge_search"), so it never collides
    with a user's parameters (a ``batch`` in ``param_space`` stays the user's). Consumers (the
    trial table, the journal) read it only through this function.
    """
    record = config.get(SEARCH_KEY) if isinstance(config, dict) else None
    record = record if isinstance(record, dict) else {}
    info = {"acquisition": record.get("acquisition", "") or "", "batch": record.get("batch")}
    info.update({k: v for k, v in record.items() if k.startswith("p_")})
    return info
