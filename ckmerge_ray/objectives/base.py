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


#: Files that define a tokenizer (any one will do). config.json alone does not: from it
#: transformers builds an empty tokenizer of the model's class, which turns text into no tokens.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt",
                   "tokenizer.model", "spiece.model")


def load_tokenizer(tokenizer_dir: Path, trust_remote_code: bool = False,
                   purpose: str = "the objective"):
    """Θ(t)'s tokenizer from `tokenizer_dir` (``AutoTokenizer.from_pretrained``; its own code
    only with `trust_remote_code`). Raises ObjectiveError when the directory holds none of
    TOKENIZER_FILES or the tokenizer does not load; `purpose` says what needs it."""
    from transformers import AutoTokenizer

    d = Path(tokenizer_dir)
    if not any((d / name).exists() for name in TOKENIZER_FILES):
        raise ObjectiveError(
            f"{purpose} needs the later checkpoint's tokenizer, but {d} holds no "
            f"tokenizer files (none of {', '.join(TOKENIZER_FILES)}); give the training run's "
            "tokenizer with tokenizer=DIR (CLI: --tokenizer DIR), a folder "
            "tokenizer.save_pretrained wrote, or save it beside the checkpoint")
    try:
        return AutoTokenizer.from_pretrained(str(d), trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - any failure means: no usable tokenizer
        raise ObjectiveError(f"cannot load a tokenizer for {purpose} from {d}: {e}") from e
