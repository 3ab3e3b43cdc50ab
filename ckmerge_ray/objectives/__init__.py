"""Objectives: what a merged model is scored on."""

from __future__ import annotations

from ckmerge_ray.errors import ObjectiveError
from ckmerge_ray.objectives.base import Objective
from ckmerge_ray.objectives.heldout import HeldoutLoss
from ckmerge_ray.objectives.lmeval import LmEvalObjective, parse_tasks

__all__ = ["Objective", "HeldoutLoss", "LmEvalObjective", "parse_objective"]


def parse_objective(spec: "str | Objective", **options) -> Objective:
    """Turn a short string such as ``"loss:heldout.jsonl"`` into an objective.

    Objects pass through unchanged. `options` go to the objective's constructor (for example
    ``text_field``, ``seq_len``, ``max_tokens`` for ``loss:``; ``metrics``, ``limit``,
    ``include_path`` for ``lmeval:task1,task2``).
    """
    if isinstance(spec, Objective):
        return spec
    if not isinstance(spec, str) or ":" not in spec:
        raise ObjectiveError(
            f"objective must be an Objective or a string like 'loss:path/to/heldout.jsonl', got {spec!r}"
        )
    kind, _, arg = spec.partition(":")
    kinds = {"loss": lambda: HeldoutLoss(arg, **options),
             "lmeval": lambda: LmEvalObjective(parse_tasks(arg), **options)}
    if kind in kinds:
        try:
            return kinds[kind]()
        except TypeError as e:  # an option this kind does not take
            raise ObjectiveError(f"bad options for the {kind!r} objective {sorted(options)}: {e}") from e
    raise ObjectiveError(f"unknown objective kind {kind!r} in {spec!r}; known kinds: 'loss', 'lmeval'")
