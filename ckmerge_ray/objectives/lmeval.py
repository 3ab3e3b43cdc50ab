"""lm-evaluation-harness tasks as an objective, run on the trial's in-memory merged model.

`lm_eval.simple_evaluate` gets an `HFLM` that wraps the model the worker already holds (never a
path, so nothing is reloaded from disk) and Θ(t)'s tokenizer. Tasks are any registered lm-eval
task or group, or local task YAMLs from `include_path`. Task names and the direction of each
metric are checked on the driver before any trial starts.

Built so far: task selection and validation, one metric per task combined with weights, fixed
subsets (`limit`), per-task metrics in the trial row. Not yet (issue 4): request caching across
trials, noise-aware GP input from standard errors, multi-fidelity.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ckmerge_ray.errors import ObjectiveError
from ckmerge_ray.objectives.base import Objective

# (include_path, include_defaults) -> TaskManager; indexing the built-in tasks costs seconds, so
# each process (driver, worker) builds it once.
_TASK_MANAGERS: Dict[Tuple[Optional[str], bool], object] = {}


def task_manager(include_path: Optional[str], include_defaults: bool):
    from lm_eval.tasks import TaskManager

    key = (include_path, include_defaults)
    if key not in _TASK_MANAGERS:
        _TASK_MANAGERS[key] = TaskManager(include_path=include_path,
                                          include_defaults=include_defaults)
    return _TASK_MANAGERS[key]


class LmEvalObjective(Objective):
    """Weighted mean of one lm-eval metric per task; higher or lower is better as lm-eval says.

    Args:
        tasks: lm-eval task or group names, e.g. ``["mmlu", "gsm8k"]`` or local task names.
        metrics: the metric per task, one name for all (default ``"acc"``) or ``{task: metric}``
            (``acc_norm``, ``exact_match``, ``word_perplexity``, ...).
        weights: ``{task: weight}`` (default equal weights).
        include_path: a directory of task YAMLs. When every task is found there, the built-in
            tasks are not indexed (``include_defaults=False``).
        limit: documents per task (count, or fraction), the same documents in every trial.
        num_fewshot, batch_size, max_length, apply_chat_template: passed to lm-eval.
    """

    name = "lmeval"

    def __init__(
        self,
        tasks: Sequence[str],
        metrics: str | Mapping[str, str] = "acc",
        weights: Optional[Mapping[str, float]] = None,
        include_path: Optional[str | Path] = None,
        limit: Optional[int | float] = None,
        num_fewshot: Optional[int] = None,
        batch_size: int = 8,
        max_length: Optional[int] = None,
        apply_chat_template: bool = False,
    ):
        self.tasks = [t.strip() for t in tasks if t and t.strip()]
        if not self.tasks:
            raise ObjectiveError("lmeval objective needs at least one task, e.g. 'lmeval:mmlu'")
        if isinstance(metrics, str):
            metrics = {t: metrics for t in self.tasks}
        self.metrics = {t: metrics.get(t, "acc") for t in self.tasks}
        self.weights = {t: float((weights or {}).get(t, 1.0)) for t in self.tasks}
        unknown = set(metrics) - set(self.tasks) | set(weights or {}) - set(self.tasks)
        if unknown:
            raise ObjectiveError(f"metrics/weights name tasks not in the objective: {sorted(unknown)}")
        if any(w < 0 for w in self.weights.values()) or sum(self.weights.values()) <= 0:
            raise ObjectiveError(f"task weights must be non-negative, not all zero: {self.weights}")
        self.include_path = str(include_path) if include_path else None
        self.include_defaults = True
        self.limit, self.num_fewshot = limit, num_fewshot
        self.batch_size, self.max_length = batch_size, max_length
        self.apply_chat_template = apply_chat_template
        self.tokenizer = None

    def __repr__(self) -> str:
        return (f"LmEvalObjective({self.tasks!r}, metrics={self.metrics!r}, limit={self.limit!r}, "
                f"include_path={self.include_path!r})")

    def prepare(self, tokenizer_dir: Path) -> None:
        """Check the tasks exist and every metric has one known direction; load the tokenizer."""
        from lm_eval.api.registry import is_higher_better
        from transformers import AutoTokenizer

        self.include_defaults = not (self.include_path and self._all_found(include_defaults=False))
        manager = task_manager(self.include_path, self.include_defaults)
        missing = [t for t in self.tasks if t not in manager.all_tasks]
        if missing:
            hints = {t: difflib.get_close_matches(t, manager.all_tasks, n=3) for t in missing}
            where = f" (looked in {self.include_path} and lm-eval's tasks)" if self.include_path else ""
            raise ObjectiveError(
                f"unknown lm-eval task(s) {missing}{where}; close names: "
                + "; ".join(f"{t}: {h or 'none'}" for t, h in hints.items())
            )
        directions = {}
        for task, metric in self.metrics.items():
            higher = is_higher_better(metric)
            if higher is None:
                raise ObjectiveError(
                    f"lm-eval does not know whether higher {metric!r} (task {task!r}) is better; "
                    "choose a registered metric such as acc, acc_norm, exact_match, word_perplexity"
                )
            directions[task] = bool(higher)
        if len(set(directions.values())) > 1:
            raise ObjectiveError(
                f"metrics point in different directions (higher is better: {directions}); "
                "combine metrics that all improve the same way"
            )
        self.mode = "max" if next(iter(directions.values())) else "min"
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        except Exception as e:  # noqa: BLE001 - any failure means: no usable tokenizer
            raise ObjectiveError(f"lm-eval objectives need Θ(t)'s tokenizer in {tokenizer_dir}: {e}") from e

    def evaluate(self, model: torch.nn.Module, device: torch.device) -> Dict[str, float]:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=model, tokenizer=self.tokenizer, batch_size=self.batch_size,
                  max_length=self.max_length, device=str(device))
        out = simple_evaluate(
            model=lm, tasks=list(self.tasks), task_manager=task_manager(self.include_path,
                                                                        self.include_defaults),
            limit=self.limit, num_fewshot=self.num_fewshot, bootstrap_iters=0, log_samples=False,
            apply_chat_template=self.apply_chat_template, verbosity="ERROR",
        )
        row: Dict[str, float] = {}
        for task in self.tasks:
            for key, value in out["results"].get(task, {}).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    row[f"{task}/{key.replace(',none', '')}"] = float(value)
        total = sum(self.weights.values())
        score = 0.0
        for task, metric in self.metrics.items():
            key = f"{task}/{metric}"
            if key not in row:
                produced = sorted(k.split("/", 1)[1] for k in row if k.startswith(f"{task}/"))
                raise ObjectiveError(f"task {task!r} did not produce metric {metric!r} (it produced {produced})")
            self._check_direction(out, task, metric)
            score += self.weights[task] / total * row[key]
        return {"score": score, **row}

    def _check_direction(self, out: Dict, task: str, metric: str) -> None:
        higher = out.get("higher_is_better", {}).get(task, {}).get(metric)
        if higher is not None and bool(higher) != (self.mode == "max"):
            raise ObjectiveError(
                f"lm-eval reports higher_is_better={higher} for {task}/{metric}, but the objective "
                f"was set up to {self.mode}imize it"
            )

    def _all_found(self, include_defaults: bool) -> bool:
        manager = task_manager(self.include_path, include_defaults)
        return all(t in manager.all_tasks for t in self.tasks)


def parse_tasks(arg: str) -> List[str]:
    return [t.strip() for t in arg.split(",") if t.strip()]
