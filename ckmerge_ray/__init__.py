"""ckmerge-ray: tune the linear merge of adjacent pretraining checkpoints with Ray Tune.

Data flow, one module each: checkpoints (read, validate) -> store (shards in the object store)
-> merge (lerp into a resident model) -> objectives (score it) -> search (choose λ) -> trial and
tuner (run on Ray Tune) -> results (tables, best model) -> cli. Beside them: baselines and
evaluator (other merges of the same shards), compare (baselines vs the tuned merge), sweep
(every adjacent pair of a run) and plots.
"""

from ckmerge_ray.compare import CompareResult, compare_merges
from ckmerge_ray.errors import CheckpointError, CkmergeError, ConfigError, ObjectiveError, RunError
from ckmerge_ray.objectives import HeldoutLoss, LmEvalObjective, Objective, parse_objective
from ckmerge_ray.search import GPHedgeSearch
from ckmerge_ray.sweep import SweepResult, discover_checkpoints, sweep_trajectory
from ckmerge_ray.tuner import TuneMergeResult, tune_merge

__version__ = "0.1.0"

__all__ = [
    "tune_merge", "TuneMergeResult", "compare_merges", "CompareResult", "sweep_trajectory",
    "SweepResult", "discover_checkpoints", "GPHedgeSearch", "Objective", "HeldoutLoss",
    "LmEvalObjective", "parse_objective",
    "CkmergeError", "CheckpointError", "ConfigError", "ObjectiveError", "RunError",
]
