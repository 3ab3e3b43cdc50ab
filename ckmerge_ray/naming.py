"""From a checkpoint's tensor names and layouts on disk to the model's, with transformers' own
conversion, and back.

Since transformers 5, `from_pretrained` converts what a file holds into the model class's
tensors (renames such as GPT-NeoX's ``embed_out`` → ``lm_head``, legacy LayerNorm
``gamma``/``beta``, mixture-of-experts weights stored per expert and stacked into fused
``gate_up_proj``/``down_proj``), and `save_pretrained` reverts it. The mapping lives in
`transformers.conversion_mapping` (`get_model_conversion_mapping`, per architecture and
submodule) and is applied by `transformers.core_model_loading` (`rename_source_key`, the
`WeightConverter` operations, `revert_weight_conversion`). This module uses that machinery as it
is: no table of our own.

Where: the driver converts each checkpoint while it reads it into the object store, unit by unit
(a unit is every file tensor one model tensor is built from, e.g. all experts of one layer), so
the stored shards, the resident model and the merge all use the model's names, and the export
reverts to the file's names. Why not merge in the file's naming and convert on the worker: the
conversion operations are index operations (rename, stack, concatenate, split, transpose), linear
in the weights, so both orders give the same merge (tests/test_architectures.py checks it); done
on the driver it costs one pass per checkpoint, on the worker it would cost one per trial, and
the worker's model could no longer share the stored shards' flat layout.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

Shape = Tuple[int, ...]


@dataclass
class Conversion:
    """How one checkpoint's file tensors become the model's tensors, and back.

    Units are keyed by their first model tensor; `units[k]` lists the model tensors a unit makes
    (more than one when a file tensor is split), `sources[k]` the file tensors it reads.
    """

    model: torch.nn.Module  # the model class on the meta device (its conversion, names, shapes)
    targets: Dict[str, Tuple[Shape, torch.dtype]]  # model tensor -> shape, dtype (of its sources)
    units: Dict[str, List[str]]
    sources: Dict[str, List[str]]
    ignored: List[str]  # file tensors transformers drops on load (old buffers)
    unexpected: List[str]  # file tensors the model does not know, even after conversion
    _recipes: Dict[str, Tuple[object, List[Tuple[str, str]]]] = field(repr=False,
                                                                     default_factory=dict)
    _used: List = field(repr=False, default_factory=list)

    @property
    def identity(self) -> bool:
        """True when every model tensor is one file tensor of the same name, unchanged."""
        return all(t is None and len(src) == 1 and src[0][0] == k
                   for k, (t, src) in self._recipes.items())

    def unit_of(self) -> Dict[str, str]:
        """Model tensor -> the key of the unit that makes it."""
        return {name: key for key, names in self.units.items() for name in names}

    def convert(self, unit_keys: List[str], read: Callable[[List[str]], Dict[str, torch.Tensor]]
                ) -> Dict[str, torch.Tensor]:
        """The model tensors of the given units, from the file tensors `read` returns."""
        files = read([f for k in unit_keys for f in self.sources[k]])
        out: Dict[str, torch.Tensor] = {}
        for key in unit_keys:
            out.update(self._run(key, lambda f: files[f]))
        return out

    def revert(self, tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Model-named tensors (whole units) back to the names and layout of the file, as
        `save_pretrained` writes them (`transformers.core_model_loading.revert_weight_conversion`)."""
        if self.identity:
            return dict(tensors)
        from transformers.core_model_loading import revert_weight_conversion

        self.model._weight_conversions = self._used  # what from_pretrained records on its model
        return revert_weight_conversion(self.model, dict(tensors))

    def _run(self, key: str, tensor_of: Callable[[str], torch.Tensor]) -> Dict[str, torch.Tensor]:
        from transformers.core_model_loading import WeightRenaming

        template, sources = self._recipes[key]
        transform = copy.deepcopy(template) if template is not None else WeightRenaming(
            sources[0][0], key)
        for file_key, pattern in sources:
            transform.add_tensor(key, file_key, pattern, tensor_of(file_key))
        out = transform.convert(key, model=self.model, config=self.model.config)
        return {k: (v[0] if isinstance(v, list) else v) for k, v in out.items()}


def plan_conversion(model: torch.nn.Module, specs: Dict[str, Tuple[Shape, torch.dtype]]
                    ) -> Conversion:
    """Plan the conversion of a checkpoint with file tensors `specs` (name -> shape, dtype, from
    the headers) into `model` (built on the meta device), reading no tensor data.

    Mirrors the planning loop of `transformers.core_model_loading.convert_and_load_state_dict_
    in_model` (5.x): renamings first, then at most one converter per file tensor; a file tensor
    whose converted name the model lacks is unexpected, or ignored when transformers ignores it
    on load. Shapes of the model tensors come from running each unit on meta tensors.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        WeightConverter, WeightRenaming, dot_natural_key, rename_source_key,
    )

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    known, prefix = model.state_dict(), model.base_model_prefix
    recipes: Dict[str, Tuple[object, List[Tuple[str, str]]]] = {}
    leftover: List[str] = []
    for name in sorted(specs, key=dot_natural_key):  # expert 2 before expert 10, as on load
        new, pattern = rename_source_key(name, renamings, converters, prefix, known)
        if new not in known and name in known:
            new, pattern = rename_source_key(name, [], [], base_model_prefix=prefix,
                                             meta_state_dict=known)
        if new not in known:
            leftover.append(name)
            continue
        template = by_pattern[pattern] if pattern is not None else None
        recipes.setdefault(new, (template, []))[1].append(
            (name, pattern if pattern is not None else name))
    conversion = Conversion(model, {}, {}, {}, [], [], recipes,
                            [t for t in transforms if t.was_used()])
    ignore = ignored_on_load(model)
    conversion.ignored = [n for n in leftover if any(p.search(n) for p in ignore)]
    conversion.unexpected = [n for n in leftover if n not in conversion.ignored]
    for key, (_, sources) in recipes.items():
        dtype = specs[sources[0][0]][1]
        made = conversion._run(key, lambda f: torch.empty(specs[f][0], dtype=specs[f][1],
                                                          device="meta"))
        conversion.units[key] = list(made)
        conversion.sources[key] = [f for f, _ in sources]
        conversion.targets.update({k: (tuple(t.shape), dtype) for k, t in made.items()})
    return conversion


def known_count(model: torch.nn.Module, names: List[str]) -> Tuple[int, int]:
    """(how many file tensor names transformers would load into `model`, renamed or converted
    onto one of its tensors; how many are its own names exactly), from the names alone: what
    decides which wrapper prefixes of a trainer's checkpoint to strip (`checkpoints/names.py`)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        WeightConverter, WeightRenaming, rename_source_key,
    )

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    known, prefix = model.state_dict(), model.base_model_prefix
    count = exact = 0
    for name in names:
        new, _ = rename_source_key(name, renamings, converters, prefix, known)
        count += new in known or name in known
        exact += name in known
    return count, exact


def ignored_on_load(model: torch.nn.Module) -> List[re.Pattern]:
    """The file tensors `from_pretrained` ignores rather than reports as unexpected: the class's
    ``_keys_to_ignore_on_load_unexpected`` (e.g. GPT-NeoX's ``attention.bias``/``masked_bias``),
    and rotary ``inv_freq`` / ``position_ids`` buffers that old checkpoints saved but the model
    recomputes (`PreTrainedModel._adjust_missing_and_unexpected_keys` in transformers 5)."""
    patterns = list(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])
    buffers = [n for n, _ in model.named_buffers()]
    if any(n.endswith("inv_freq") for n in buffers):
        patterns.append(r"rotary_emb\.inv_freq")
    if any(n.endswith("position_ids") for n in buffers):
        patterns.append(r"(^|\.)position_ids$")
    return [re.compile(p) for p in patterns]


def first_names(names: List[str], count: int = 3) -> str:
    """The first `count` names and how many more, for error messages."""
    more = f" and {len(names) - count} more" if len(names) > count else ""
    return f"{names[:count]}{more}"


def describe(conversion: Optional[Conversion]) -> str:
    """One line for the log: what the conversion does, or '' when it does nothing."""
    if conversion is None or (conversion.identity and not conversion.ignored):
        return ""
    made = sum(len(v) for v in conversion.units.values())
    read = sum(len(v) for v in conversion.sources.values())
    text = (f"transformers' checkpoint conversion for {type(conversion.model).__name__}: "
            f"{read} file tensors -> {made} model tensors")
    if conversion.ignored:
        text += f"; ignored as transformers does on load: {first_names(conversion.ignored)}"
    return text
