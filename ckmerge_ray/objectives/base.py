"""What an objective is: prepared once on the driver, evaluated on each trial's merged model."""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Dict

import torch

from ckmerge_ray.errors import ObjectiveError


class Objective(abc.ABC):
    """Scores a model held in memory. Subclasses set `mode` and implement prepare/evaluate.

    `prepare` runs once on the driver before any trial (read and check the data, tokenize) so
    bad input fails before the cluster does any work; the prepared object is then shipped to the
    workers, where `evaluate` runs once per trial.
    """

    #: "min" when lower scores are better (losses), "max" when higher are (accuracies).
    mode: str = "min"
    #: Short name for tables and messages.
    name: str = "objective"
    #: Load a tokenizer whose class ships with the checkpoint (tokenizer_config.json auto_map).
    #: Set by the tuner from ``CheckpointConfig.trust_remote_code``; off by default.
    trust_remote_code: bool = False

    @abc.abstractmethod
    def prepare(self, tokenizer_dir: Path) -> None:
        """Read and check the data; raise ObjectiveError with a specific message on bad input."""

    @abc.abstractmethod
    def evaluate(self, model: torch.nn.Module, device: torch.device) -> Dict[str, float]:
        """Score the model; the result holds "score" (the tuned metric) and any extra metrics."""

    def with_limit(self, limit: float) -> "Objective":
        """The same objective on a subset of its data: the cheap stage of multi-fidelity
        screening. Objectives without a natural subset refuse."""
        raise ObjectiveError(
            f"the {self.name!r} objective has no cheaper subset for multi-fidelity screening; "
            "use an lm-eval objective (its documents are subset with `limit`)"
        )
