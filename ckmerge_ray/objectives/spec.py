"""Objective specs: the short strings (``loss:PATH``, ``lmeval:TASKS``) and YAML files users
write, turned into `Objective` instances."""

from __future__ import annotations

import difflib
import inspect
from pathlib import Path
from typing import Mapping

from ckmerge_ray.errors import ObjectiveError
from ckmerge_ray.objectives.base import Objective
from ckmerge_ray.objectives.heldout import HeldoutLoss
from ckmerge_ray.objectives.lmeval import LmEvalObjective, parse_tasks


def parse_objective(spec: "str | Objective", **options) -> Objective:
    """Turn a short string such as ``"loss:heldout.jsonl"`` into an objective.

    Objects pass through unchanged. `options` go to the objective's constructor (for example
    ``text_field``, ``seq_len``, ``max_tokens`` for ``loss:``; ``metrics``, ``limit``,
    ``include_path`` for ``lmeval:task1,task2``). A path to a ``.yaml`` file holding one
    mapping, ``{lmeval: {tasks: [...], metrics: ..., ...}}`` or ``{loss: {path: ..., ...}}``,
    works too; `options` then override the file's.
    """
    if isinstance(spec, Objective):
        return spec
    if isinstance(spec, str) and spec.endswith((".yaml", ".yml")) and ":" not in spec:
        return objective_from_yaml(Path(spec), options)
    if not isinstance(spec, str) or ":" not in spec:
        hint = (f" (did you mean 'loss:{spec}'?)" if isinstance(spec, str)
                and spec.endswith((".jsonl", ".parquet", ".txt")) else "")
        raise ObjectiveError(
            f"objective must be an Objective or a string like 'loss:path/to/heldout.jsonl', got "
            f"{spec!r}{hint}")
    kind, _, arg = spec.partition(":")
    if kind == "loss":
        return build(HeldoutLoss, kind, options, arg)
    if kind == "lmeval":
        return build(LmEvalObjective, kind, options, parse_tasks(arg))
    raise ObjectiveError(f"unknown objective kind {kind!r} in {spec!r}; known kinds: 'loss', 'lmeval'")


def build(cls: type, kind: str, options: Mapping, first, where: str = "") -> Objective:
    """``cls(first, **options)``, its options checked first (`check_options`); a TypeError of
    the constructor (a value of the wrong type) becomes ObjectiveError."""
    check_options(cls, kind, options, where)
    try:
        return cls(first, **options)
    except TypeError as e:
        raise ObjectiveError(f"bad options for the {kind!r} objective{where} "
                             f"{dict(options)}: {e}") from e


def check_options(cls: type, kind: str, options: Mapping, where: str = "") -> None:
    """Raise ObjectiveError naming the options `cls` does not take, with those it does."""
    takes = [n for n in inspect.signature(cls).parameters if n not in ("path", "tasks")]
    unknown = sorted(set(options) - set(takes))
    if unknown:
        close = [m for u in unknown for m in difflib.get_close_matches(u, takes, 1)]
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        raise ObjectiveError(f"unknown option(s) {unknown} for the {kind!r} objective{where}"
                             f"{hint}; it takes {takes}")


def objective_from_yaml(path: Path, overrides) -> Objective:
    import yaml

    if not path.is_file():
        raise ObjectiveError(f"objective file does not exist: {path}")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ObjectiveError(f"objective file {path} is not valid YAML: {e}") from e
    if not (isinstance(doc, dict) and len(doc) == 1 and next(iter(doc)) in ("lmeval", "loss")
            and isinstance(next(iter(doc.values())), dict)):
        raise ObjectiveError(f"objective file {path} must hold one mapping, 'lmeval: {{tasks: "
                             "[...], ...}' or 'loss: {path: ..., ...}'")
    kind, opts = next(iter(doc.items()))
    opts = {**opts, **overrides}
    if kind == "lmeval":
        tasks = opts.pop("tasks", None)
        tasks = parse_tasks(tasks) if isinstance(tasks, str) else list(tasks or [])
        return build(LmEvalObjective, kind, opts, tasks, f" in {path}")
    return build(HeldoutLoss, kind, opts, opts.pop("path", ""), f" in {path}")
