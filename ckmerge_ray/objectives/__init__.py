"""Objectives: what a merged model is scored on (held-out loss, lm-eval tasks), and the specs
users write for them."""

from ckmerge_ray.objectives.base import Objective
from ckmerge_ray.objectives.heldout import HeldoutLoss
from ckmerge_ray.objectives.lmeval import LmEvalObjective
from ckmerge_ray.objectives.spec import parse_objective

__all__ = ["Objective", "HeldoutLoss", "LmEvalObjective", "parse_objective"]
