"""ckmerge-ray: tune the linear merge of adjacent pretraining checkpoints with Ray Tune.

Data flow, one module each: checkpoints (read, validate) -> store (shards in the object store)
-> model and merge (the resident model, lerp into it) -> objectives (score it) -> search
(choose λ) -> trial (the Tune trainable) -> tuner (the run's steps) -> results (tables, best
model) -> cli. A window of k checkpoints takes the same path with its own families (weightings
the search moves through), window_trial, window_run and window_plots, behind window.tune_window. Settings are values (config); the cluster (cluster), the output directory
(rundir) and a run's checked inputs (inputs) have modules of their own. Beside them: baselines
and evaluator (other merges of the same shards), compare (baselines vs the tuned merge), sweep
(every adjacent pair of a run), watch (the same while the run trains; integrations holds
the Trainer callback) and plots. See README's "How it works".

The public names below are imported on first use, so that `import ckmerge_ray.merge` (or
`checkpoints`) needs neither Ray nor transformers: a GPU box without Ray can still run the merge
benchmark.
"""

from importlib import import_module

from ckmerge_ray.errors import CheckpointError, CkmergeError, ConfigError, ObjectiveError, RunError

__version__ = "0.1.0"

_LAZY = {
    "tune_merge": "tuner", "TuneMergeResult": "results",
    "tune_window": "window", "WindowResult": "window", "Family": "families",
    "SearchConfig": "config", "RunConfig": "config", "CheckpointConfig": "config",
    "BaselineConfig": "config", "Resources": "config",
    "compare_merges": "compare", "CompareResult": "compare",
    "sweep_trajectory": "sweep", "SweepResult": "sweep", "discover_checkpoints": "inputs",
    "watch_trajectory": "watch", "WatchResult": "watch",
    "GPHedgeSearch": "search",
    "Objective": "objectives", "HeldoutLoss": "objectives", "LmEvalObjective": "objectives",
    "parse_objective": "objectives",
}

__all__ = [*_LAZY, "CkmergeError", "CheckpointError", "ConfigError", "ObjectiveError", "RunError"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(f"ckmerge_ray.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ckmerge_ray' has no attribute {name!r}")
