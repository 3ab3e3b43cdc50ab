"""ckmerge-ray: tune the linear merge of adjacent pretraining checkpoints with Ray Tune.

Data flow, one module each: checkpoints (read, validate) -> store (shards in the object store)
-> merge (lerp into a resident model) -> objectives (score it) -> search (choose λ) -> trial and
tuner (run on Ray Tune) -> results (tables, best model) -> cli.
"""

from ckmerge_ray.errors import CheckpointError, CkmergeError, ConfigError, ObjectiveError, RunError
from ckmerge_ray.objectives import HeldoutLoss, LmEvalObjective, Objective, parse_objective
from ckmerge_ray.search import GPHedgeSearch
from ckmerge_ray.tuner import TuneMergeResult, tune_merge

__version__ = "0.1.0"

__all__ = [
    "tune_merge", "TuneMergeResult", "GPHedgeSearch", "Objective", "HeldoutLoss", "LmEvalObjective", "parse_objective",
    "CkmergeError", "CheckpointError", "ConfigError", "ObjectiveError", "RunError",
]
