"""Objective specs: the short strings (``loss:PATH``, ``lmeval:TASKS``) and YAML files users
write, turned into `Objective` instances."""

from __future__ import annotations

from pathlib import Path

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
    try:
        if kind == "lmeval":
            tasks = opts.pop("tasks", None)
            tasks = parse_tasks(tasks) if isinstance(tasks, str) else list(tasks or [])
            return LmEvalObjective(tasks, **opts)
        return HeldoutLoss(opts.pop("path", ""), **opts)
    except TypeError as e:  # an option this kind does not take
        raise ObjectiveError(f"bad options in {path} for the {kind!r} objective {sorted(opts)}: {e}") from e
