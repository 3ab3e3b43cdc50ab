"""From a trainer's tensor names to a Hugging Face architecture's: wrapper prefixes and name maps.

Trainers save their model's state dict as they hold it: wrapped by `torch.compile`
(``_orig_mod.``), DDP (``module.``), FSDP (``_fsdp_wrapped_module.``), activation checkpointing
(``_checkpoint_wrapped_module.``), nested under a ``model`` key beside the optimizer (the
`torch.distributed.checkpoint` layout of Accelerate and torchtitan), or in the trainer's own
naming (torchtitan's ``layers.0.attention.wq.weight``). This module renames such a checkpoint's
tensors to names `transformers` loads, before transformers' own conversion (`naming.py`) runs:

1. training state (optimizer, scheduler, RNG, dataloader, step counters) is skipped, and said so;
2. wrapper tokens are removed wherever they occur; leading ``module.`` / ``model.`` are stripped
   while that makes more names known to the architecture (HF names start with ``model.`` too);
3. a user's `NameMap` (regex rules, from a YAML file or built in Python) renames what is left,
   with optional linear per-tensor transforms (rotary row permutation, fused-QKV split), so the
   merge and the evaluation see the architecture's names. Both transforms only move or cut rows,
   so merging before or after them gives the same weights.

Name-map file (YAML)::

    rules:                       # first matching rule wins; unmatched names are kept
      - match: '^tok_embeddings\\.weight$'
        to: model.embed_tokens.weight
      - match: '^layers\\.(\\d+)\\.attention\\.wq\\.weight$'
        to: 'model.layers.\\1.self_attn.q_proj.weight'
        rotary: num_attention_heads          # interleaved -> half-split rotary rows
      - match: '^layers\\.(\\d+)\\.attention\\.wqkv\\.weight$'
        to: ['model.layers.\\1.self_attn.q_proj.weight', 'model.layers.\\1.self_attn.k_proj.weight',
             'model.layers.\\1.self_attn.v_proj.weight']
        split: [hidden_size, num_key_value_heads * head_dim, num_key_value_heads * head_dim]
    skip: ['^freqs_cis$']        # tensors that are not weights

Sizes are integers or arithmetic (+ - * //) over config.json's integer fields; ``head_dim``
defaults to hidden_size // num_attention_heads. A worked map: examples/torchtitan_llama.yaml.
"""

from __future__ import annotations

import ast
import operator
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ckmerge_ray.errors import CheckpointError, ConfigError

# Removed wherever they occur: they never appear in a Hugging Face name.
WRAPPER_TOKENS = ("_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
# Stripped from the front only while that makes more names known to the architecture.
LEADING_WRAPPERS = ("module.", "model.")
# Top-level keys of training state that trainers save beside the model's weights.
TRAINING_STATE = re.compile(
    r"^(optimizer|optim|optimizers|lr_scheduler|lr_schedulers|scheduler|rng|rng_state|"
    r"dataloader|data_loader|train_state|trainer_state|step|epoch|global_step|args)(\.|$)")

Transform = Callable[[torch.Tensor], List[torch.Tensor]]


@dataclass(frozen=True)
class NameRule:
    """One rule: `match` (a regex on the checkpoint's name) to `to` (one name, or one per part
    of a `split`); `rotary` (heads) permutes rows from interleaved to half-split rotary pairs
    (Meta/torchtitan → Hugging Face Llama); `split` cuts dim 0 into parts of these sizes."""

    match: str
    to: Union[str, Tuple[str, ...]]
    rotary: Union[int, str, None] = None
    split: Optional[Tuple[Union[int, str], ...]] = None

    def __post_init__(self):
        try:
            object.__setattr__(self, "_regex", re.compile(self.match))
        except re.error as e:
            raise ConfigError(f"name-map rule {self.match!r} is not a valid regex: {e}") from e
        to = (self.to,) if isinstance(self.to, str) else tuple(self.to)
        object.__setattr__(self, "to", to)
        if self.split is not None:
            object.__setattr__(self, "split", tuple(self.split))
            if len(self.split) != len(to):
                raise ConfigError(f"name-map rule {self.match!r}: split has {len(self.split)} "
                                  f"sizes but 'to' names {len(to)} tensors")
        elif len(to) != 1:
            raise ConfigError(f"name-map rule {self.match!r} names {len(to)} targets without "
                              "a split: give 'split' sizes, one per target")

    def apply(self, name: str, config: Mapping) -> Optional[Tuple[List[str], Optional[Transform]]]:
        """The target names and transform for `name`, or None if the rule does not match."""
        m = self._regex.search(name)
        if m is None:
            return None
        targets = [m.expand(t) for t in self.to]
        if self.split is not None:
            sizes = [size_of(s, config, self.match) for s in self.split]
            return targets, lambda t: list(torch.split(t, sizes, dim=0))
        if self.rotary is not None:
            heads = size_of(self.rotary, config, self.match)
            return targets, lambda t: [rotary_half_split(t, heads)]
        return targets, None


@dataclass(frozen=True)
class NameMap:
    """Rules from a trainer's names to a Hugging Face architecture's (see module docstring), or
    `rename`: any Python callable name -> new name (None drops the tensor)."""

    rules: Tuple[NameRule, ...] = ()
    skip: Tuple[str, ...] = ()
    rename: Optional[Callable[[str], Optional[str]]] = None
    source: str = "<api>"  # where it came from, for messages

    @classmethod
    def from_file(cls, path: str | Path) -> "NameMap":
        """Parse a YAML name-map file. Raises ConfigError naming the file and the bad entry."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"name-map file does not exist: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"cannot parse name-map file {path}: {e}") from e
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data, source: str = "<dict>") -> "NameMap":
        """A name map from a file's content, ``{"rules": [...], "skip": [...]}``, or `to_dict`'s
        (run.json keeps it so). Raises ConfigError naming `source` and the bad entry."""
        if isinstance(data, Mapping):
            source = str(data.get("source", source))
            data = {k: v for k, v in data.items() if k != "source"}
            if "callable" in data:
                raise ConfigError(f"the name map was a Python callable ({data['callable']}), "
                                  "which cannot be stored: pass the same callable as name_map")
        if not isinstance(data, Mapping) or set(data) - {"rules", "skip"}:
            raise ConfigError(f"name-map {source} must hold 'rules' and/or 'skip', got "
                              f"{sorted(data) if isinstance(data, Mapping) else type(data).__name__}")
        rules = []
        for i, rule in enumerate(data.get("rules") or []):
            if not isinstance(rule, Mapping) or not {"match", "to"} <= set(rule) or \
                    set(rule) - {"match", "to", "rotary", "split"}:
                raise ConfigError(f"name-map {source}: rule {i} must have 'match' and 'to' (and "
                                  f"optionally 'rotary' or 'split'), got {rule!r}")
            rules.append(NameRule(**rule))
        return cls(tuple(rules), tuple(data.get("skip") or ()), source=source)

    def to_dict(self) -> Dict:
        """JSON-ready: the rules and skips with their source, or ``{"callable": name}`` for a
        `rename` callable (which `from_dict` refuses: code is not stored)."""
        if self.rename is not None:
            return {"callable": self.source}
        rules = [{k: v for k, v in (("match", r.match), ("to", list(r.to)), ("rotary", r.rotary),
                                    ("split", None if r.split is None else list(r.split)))
                  if v is not None} for r in self.rules]
        return {"rules": rules, "skip": list(self.skip), "source": self.source}

    @classmethod
    def of(cls, value: "NameMap | str | Path | Mapping | Callable | None") -> Optional["NameMap"]:
        """A NameMap from a NameMap, a YAML file path, a file's content as a mapping
        (`from_dict`), a callable, or None."""
        if value is None or isinstance(value, NameMap):
            return value
        if isinstance(value, (str, Path)):
            return cls.from_file(value)
        if isinstance(value, Mapping):
            return cls.from_dict(value)
        if callable(value):
            return cls(rename=value, source=getattr(value, "__name__", "<callable>"))
        raise ConfigError(f"name_map must be a YAML file, a NameMap, a mapping or a callable, "
                          f"got {type(value).__name__}")

    def apply(self, name: str, config: Mapping) -> Optional[Tuple[List[str], Optional[Transform]]]:
        """Targets and transform for `name`; None when the map drops it."""
        if any(re.search(p, name) for p in self.skip):
            return None
        if self.rename is not None:
            new = self.rename(name)
            return None if new is None else ([new], None)
        for rule in self.rules:
            hit = rule.apply(name, config)
            if hit is not None:
                return hit
        return [name], None


def rotary_half_split(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q/k projection from interleaved rotary pairs (x0, x1), (x2, x3), ... per head
    to Hugging Face's half-split layout, as transformers' convert_llama_weights_to_hf `permute`."""
    rows = w.shape[0]
    if rows % (2 * heads):
        raise CheckpointError(f"rotary permutation: {rows} rows do not split into {heads} heads "
                              "of pairs")
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.FloorDiv: operator.floordiv}


def size_of(expr: Union[int, str], config: Mapping, rule: str) -> int:
    """An integer, or arithmetic (+ - * //) over config.json's integer fields, evaluated
    without `eval`. Raises ConfigError naming the rule and the unknown field."""
    if isinstance(expr, int):
        return expr
    fields = {k: v for k, v in config.items() if isinstance(v, int) and not isinstance(v, bool)}
    if "head_dim" not in fields and {"hidden_size", "num_attention_heads"} <= set(fields):
        fields["head_dim"] = fields["hidden_size"] // fields["num_attention_heads"]

    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in fields:
                raise ConfigError(f"name-map rule {rule!r}: {node.id!r} is not an integer field "
                                  "of config.json")
            return fields[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.left), value(node.right))
        raise ConfigError(f"name-map rule {rule!r}: {expr!r} is not integer arithmetic "
                          "(+ - * //) over config fields")

    try:
        return int(value(ast.parse(str(expr), mode="eval").body))
    except SyntaxError as e:
        raise ConfigError(f"name-map rule {rule!r}: cannot parse size {expr!r}") from e


@dataclass
class Renaming:
    """How a checkpoint's stored names become the architecture's file names.

    `targets[new] = (source, transform, index)`: tensor `new` is part `index` of `transform`
    applied to stored tensor `source` (no transform: the tensor itself).
    """

    targets: Dict[str, Tuple[str, Optional[Transform], int]]
    skipped: Dict[str, int] = field(default_factory=dict)  # training-state group -> tensors
    stripped: List[str] = field(default_factory=list)  # wrapper prefixes found
    name_map: Optional[str] = None

    @property
    def identity(self) -> bool:
        return all(src == new and fn is None for new, (src, fn, _) in self.targets.items())

    def groups(self) -> List[List[str]]:
        """New names made from one stored tensor (they must be read together)."""
        by_source: Dict[str, List[str]] = {}
        for new, (src, _, _) in self.targets.items():
            by_source.setdefault(src, []).append(new)
        return list(by_source.values())

    def read(self, names: Sequence[str], read_stored: Callable[[List[str]], Dict[str, torch.Tensor]]
             ) -> Dict[str, torch.Tensor]:
        """The named tensors, each stored tensor read and transformed once."""
        sources = list(dict.fromkeys(self.targets[n][0] for n in names))
        stored = read_stored(sources)
        parts: Dict[str, List[torch.Tensor]] = {}
        out = {}
        for name in names:
            src, fn, index = self.targets[name]
            if fn is None:
                out[name] = stored[src]
                continue
            if src not in parts:
                parts[src] = [p.contiguous() for p in fn(stored[src])]
            out[name] = parts[src][index]
        return out

    def describe(self) -> str:
        """One log line, or '' when nothing was renamed or skipped."""
        bits = []
        if self.skipped:
            bits.append("skipped training state (not weights): " + ", ".join(
                f"{g} ({n} entries)" for g, n in self.skipped.items()))
        if self.stripped:
            bits.append("stripped wrapper prefixes " + ", ".join(repr(p) for p in self.stripped))
        if self.name_map:
            bits.append(f"renamed with name map {self.name_map}")
        return "; ".join(bits)


def plan_renaming(names: Sequence[str], config: Mapping, name_map: Optional[NameMap],
                  known: Callable[[List[str]], Tuple[int, int]]) -> Renaming:
    """Plan the renaming of stored tensors `names` (see module docstring). `known(names)` scores
    names against the architecture (accepted, then exactly its own: `naming.known_count`); a
    leading wrapper is stripped when that raises the score."""
    skipped: Dict[str, int] = {}
    kept = []
    for name in names:
        if TRAINING_STATE.match(name):
            group = name.split(".", 1)[0]
            skipped[group] = skipped.get(group, 0) + 1
        else:
            kept.append(name)
    stripped = [t for t in WRAPPER_TOKENS if any(t in n for n in kept)]
    current = {n: _remove_tokens(n) for n in kept}

    def mapped(names_now: Dict[str, str]) -> Dict[str, Tuple[str, Optional[Transform], int]]:
        return map_names(names_now, config, name_map)

    best = known(list(mapped(current)))
    while True:
        for prefix in LEADING_WRAPPERS:
            if current and all(n.startswith(prefix) for n in current.values()):
                trial = {k: n[len(prefix):] for k, n in current.items()}
                score = known(list(mapped(trial)))
                if score > best:
                    current, best = trial, score
                    stripped.append(prefix)
                    break
        else:
            break
    return Renaming(mapped(current), skipped, stripped, name_map.source if name_map else None)


def map_names(current: Dict[str, str], config: Mapping, name_map: Optional[NameMap]
              ) -> Dict[str, Tuple[str, Optional[Transform], int]]:
    """New name -> (stored name, transform, part) after the name map; raises CheckpointError
    when two stored tensors map to one name."""
    targets: Dict[str, Tuple[str, Optional[Transform], int]] = {}
    for stored, name in current.items():
        hit = name_map.apply(name, config) if name_map is not None else ([name], None)
        if hit is None:
            continue
        for i, new in enumerate(hit[0]):
            if new in targets:
                raise CheckpointError(f"name map sends both {targets[new][0]!r} and {stored!r} "
                                      f"to {new!r}")
            targets[new] = (stored, hit[1], i)
    return targets


def _remove_tokens(name: str) -> str:
    for token in WRAPPER_TOKENS:
        name = name.replace(token, "")
    return name


def suggest_rule(unexpected: Sequence[str], missing: Sequence[str]) -> Optional[str]:
    """The name-map rule (prefix to prefix, no layer numbers in it) that turns at least half of
    the unexpected names into missing ones, as YAML text; None when there is none."""
    missing_set = set(missing)
    votes: Dict[Tuple[str, str], int] = {}
    for name in unexpected:
        parts = name.split(".")
        for i in range(len(parts)):
            suffix = ".".join(parts[i:])
            for m in missing_set:
                if m == suffix or m.endswith("." + suffix):
                    key = (".".join(parts[:i]) + "." if i else "", m[:len(m) - len(suffix)])
                    votes[key] = votes.get(key, 0) + 1
                    break
            else:
                continue
            break
    votes = {k: v for k, v in votes.items() if not re.search(r"\d", k[0] + k[1])}
    if not votes:
        return None
    (old, new), count = max(votes.items(), key=lambda kv: kv[1])
    if count < len(unexpected) / 2:  # a prefix rename explains few of them: no guess
        return None
    return f"  - match: '^{re.escape(old)}(.*)$'\n    to: '{new}\\1'"


# Names torchtitan's Llama uses (its Llama3StateDictAdapter maps them to Hugging Face's).
TORCHTITAN = re.compile(r"(^|\.)(tok_embeddings|attention\.w[qkvo]|feed_forward\.w[123]|"
                        r"attention_norm|ffn_norm)(\.|$)")
