"""Read and validate Hugging Face checkpoint directories (headers first, tensors on demand).

A checkpoint is `config.json` plus `model.safetensors`, a sharded `model.safetensors.index.json`,
or (only with `allow_pickle=True`) `pytorch_model.bin[.index.json]` loaded with
`torch.load(weights_only=True)`. Validation reads only headers, so a bad pair is refused before
any tensor is loaded. Once `apply_conversion` is called with transformers' conversion for the
model class (`naming.py`), the checkpoint's names, shapes and reads are the model's.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from safetensors import safe_open

from ckmerge_ray.errors import CheckpointError, ConfigError
from ckmerge_ray.naming import Conversion, first_names

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"

# Config fields that never change a weight's shape; everything else that is an int, a bool or a
# list of ints is compared between the two checkpoints of a pair.
_NON_SHAPE_CONFIG_KEYS = {
    "_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "bos_token_id", "eos_token_id", "pad_token_id", "output_attentions", "output_hidden_states",
    "return_dict", "max_length", "min_length", "num_beams", "num_return_sequences", "top_k",
    "do_sample", "initializer_range", "rms_norm_eps", "layer_norm_eps", "rope_theta",
    "attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop",
    "pretraining_tp", "max_position_embeddings", "sliding_window", "use_sliding_window",
}


@dataclass(frozen=True)
class TensorSpec:
    """Dtype and shape of one stored tensor, read from a header."""

    dtype: torch.dtype
    shape: Tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class CheckpointInfo:
    """What a checkpoint directory holds: its config and, per tensor, the file and spec.

    `specs` and `files` name the tensors as the rest of the package sees them: the file's names
    until `apply_conversion`, the model's after it (`files` then gives the file of a model
    tensor's first source, which decides its shard).
    """

    path: Path
    config: Dict
    format: str  # "safetensors" or "pickle"
    specs: Dict[str, TensorSpec]  # tensor name -> spec, in file order
    files: Dict[str, str]  # tensor name -> file name inside `path`
    _pickle_cache: Dict[str, Dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    conversion: Optional[Conversion] = None
    file_specs: Dict[str, TensorSpec] = field(default_factory=dict, repr=False)
    file_map: Dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.specs.values())

    @property
    def shard_files(self) -> List[str]:
        """Weight files in first-use order."""
        return list(dict.fromkeys(self.files.values()))

    def apply_conversion(self, conversion: Conversion) -> None:
        """From now on, name, shape and read tensors as the model does (see `naming.py`); file
        tensors transformers ignores on load are dropped. Raises CheckpointError for file
        tensors the model does not know even after the conversion."""
        if conversion.unexpected:
            raise CheckpointError(
                f"checkpoint tensors unknown to {type(conversion.model).__name__} (after "
                f"transformers' checkpoint conversion) in {self.path}: "
                f"{first_names(conversion.unexpected)}"
            )
        self.file_specs, self.file_map = self.specs, self.files
        if conversion.identity:  # same names: read the files directly, dropping ignored ones
            self.specs = {n: s for n, s in self.specs.items() if n not in conversion.ignored}
            self.files = {n: f for n, f in self.files.items() if n in self.specs}
            return
        self.conversion = conversion
        self.specs, self.files = {}, {}
        for key, names in conversion.units.items():
            for name in names:
                shape, dtype = conversion.targets[name]
                self.specs[name] = TensorSpec(dtype, shape)
                self.files[name] = self.file_map[conversion.sources[key][0]]

    def units(self) -> List[List[str]]:
        """Groups of tensor names that are read together (one conversion unit each)."""
        if self.conversion is None:
            return [[n] for n in self.specs]
        return list(self.conversion.units.values())

    def read_tensors(self, names: List[str]) -> Dict[str, torch.Tensor]:
        """Load the named tensors from disk (each file opened once per call), converted to the
        model's names and layout after `apply_conversion` (whole units are read)."""
        if self.conversion is None:
            return self._read_files(names)
        unit_of = self.conversion.unit_of()
        keys = list(dict.fromkeys(unit_of[n] for n in names))
        out = self.conversion.convert(keys, self._read_files)
        return {name: out[name] for name in names}

    def revert_names(self, tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Model-named tensors back to the file's names and layout (what save_pretrained writes)."""
        return tensors if self.conversion is None else self.conversion.revert(tensors)

    def _read_files(self, names: List[str]) -> Dict[str, torch.Tensor]:
        files = self.file_map or self.files
        by_file: Dict[str, List[str]] = {}
        for name in names:
            by_file.setdefault(files[name], []).append(name)
        out: Dict[str, torch.Tensor] = {}
        for fname, fnames in by_file.items():
            fpath = self.path / fname
            if self.format == "safetensors":
                try:
                    with safe_open(str(fpath), framework="pt") as f:
                        for name in fnames:
                            out[name] = f.get_tensor(name)
                except Exception as e:  # safetensors raises its own error types
                    raise CheckpointError(f"cannot read {fpath}: {e}") from e
            else:
                sd = self._load_pickle(fname)
                for name in fnames:
                    out[name] = sd[name]
        return {name: out[name] for name in names}

    def _load_pickle(self, fname: str) -> Dict[str, torch.Tensor]:
        if fname not in self._pickle_cache:
            self._pickle_cache[fname] = _torch_load_safe(self.path / fname)
        return self._pickle_cache[fname]


def load_checkpoint_info(path: os.PathLike | str, allow_pickle: bool = False) -> CheckpointInfo:
    """Read a checkpoint directory's config and tensor headers, checking every file exists.

    Raises CheckpointError naming the missing or unreadable file.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint directory does not exist: {path}")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint must be a directory, got a file: {path}")
    config = _read_config(path)
    if (path / SAFE_INDEX).exists():
        files = _read_index(path, SAFE_INDEX)
        specs = _safetensors_specs(path, files)
        return CheckpointInfo(path, config, "safetensors", specs, files)
    if (path / SAFE_SINGLE).exists():
        names = _safetensors_names(path / SAFE_SINGLE)
        files = {n: SAFE_SINGLE for n in names}
        specs = _safetensors_specs(path, files)
        return CheckpointInfo(path, config, "safetensors", specs, files)
    pickle_file = PICKLE_INDEX if (path / PICKLE_INDEX).exists() else PICKLE_SINGLE
    if (path / pickle_file).exists():
        if not allow_pickle:
            raise CheckpointError(
                f"{path} holds only a pickle checkpoint ({pickle_file}); pickle can run code, so "
                "it is loaded only on request: pass allow_pickle=True (CLI: --allow-pickle) to load "
                "it with torch.load(weights_only=True), or convert it to safetensors"
            )
        info = CheckpointInfo(path, config, "pickle", {}, {})
        if pickle_file == PICKLE_INDEX:
            info.files = _read_index(path, PICKLE_INDEX)
        else:
            sd = info._load_pickle(PICKLE_SINGLE)
            info.files = {n: PICKLE_SINGLE for n in sd}
        for fname in info.shard_files:
            sd = info._load_pickle(fname)
            for name in [n for n, f in info.files.items() if f == fname]:
                if name not in sd:
                    raise CheckpointError(f"{path / fname} lacks tensor {name!r} named in its index")
                info.specs[name] = TensorSpec(sd[name].dtype, tuple(sd[name].shape))
        return info
    raise CheckpointError(
        f"no weights in {path}: expected {SAFE_SINGLE}, {SAFE_INDEX}, or (with allow_pickle) "
        f"{PICKLE_SINGLE}"
    )


def validate_pair(earlier: CheckpointInfo, later: CheckpointInfo) -> None:
    """Refuse a pair that cannot be merged: different architecture, config shape or tensors.

    Raises CheckpointError naming the first offending config field or tensor.
    """
    for key in ("model_type", "architectures"):
        if earlier.config.get(key) != later.config.get(key):
            raise CheckpointError(
                f"checkpoints have different {key}: {earlier.config.get(key)!r} in {earlier.path} "
                f"vs {later.config.get(key)!r} in {later.path}"
            )
    for key in sorted(set(earlier.config) | set(later.config)):
        a, b = earlier.config.get(key), later.config.get(key)
        if a != b and _shapes_weights(key, a, b):
            raise CheckpointError(
                f"config field {key!r} differs: {a!r} in {earlier.path} vs {b!r} in {later.path}"
            )
    missing = [n for n in earlier.specs if n not in later.specs]
    extra = [n for n in later.specs if n not in earlier.specs]
    if missing or extra:
        raise CheckpointError(
            f"tensor names differ: {len(missing)} only in {earlier.path} {missing[:3]}, "
            f"{len(extra)} only in {later.path} {extra[:3]}"
        )
    for name, a in earlier.specs.items():
        b = later.specs[name]
        if a.shape != b.shape:
            raise CheckpointError(
                f"tensor {name!r} has shape {list(a.shape)} in {earlier.path} but {list(b.shape)} "
                f"in {later.path}"
            )
        if a.dtype != b.dtype:
            raise CheckpointError(
                f"tensor {name!r} has dtype {_dtype_name(a.dtype)} in {earlier.path} but "
                f"{_dtype_name(b.dtype)} in {later.path}"
            )


def plan_shards(info: CheckpointInfo, max_shard_bytes: int) -> List[List[str]]:
    """Group tensor names into object-store shards: one per weight file, split to `max_shard_bytes`.

    Both checkpoints of a pair use the plan of the later one, so shard i of each holds the same
    tensors and a trial merges them pairwise.
    """
    if not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
        raise ConfigError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
    groups: List[List[str]] = []
    units = info.units()  # a unit (e.g. the experts of one layer) never spans two shards
    for fname in info.shard_files:
        current: List[str] = []
        size = 0
        for unit in [u for u in units if info.files[u[0]] == fname]:
            nbytes = sum(info.specs[n].nbytes for n in unit)
            if current and size + nbytes > max_shard_bytes:
                groups.append(current)
                current, size = [], 0
            current.extend(unit)
            size += nbytes
        if current:
            groups.append(current)
    return groups


def iter_plan(info: CheckpointInfo, plan: List[List[str]]) -> Iterator[Dict[str, torch.Tensor]]:
    """Yield the tensors of each shard group in turn; memory is bounded by one group."""
    for names in plan:
        yield info.read_tensors(names)


def _shapes_weights(key: str, a, b) -> bool:
    """Whether a config field can change weight shapes: ints, bools and int lists can."""
    if key in _NON_SHAPE_CONFIG_KEYS or key.startswith("_"):
        return False

    def shape_like(v) -> bool:
        return v is None or isinstance(v, (int, bool)) or (
            isinstance(v, list) and all(isinstance(x, int) for x in v)
        )

    return shape_like(a) and shape_like(b)


def _read_config(path: Path) -> Dict:
    cfg = path / "config.json"
    if not cfg.exists():
        raise CheckpointError(f"no config.json in {path}")
    try:
        config = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot parse {cfg}: {e}") from e
    if not isinstance(config, dict) or "model_type" not in config:
        raise CheckpointError(f"{cfg} has no 'model_type'; is this a Hugging Face model directory?")
    return config


def _read_index(path: Path, index_name: str) -> Dict[str, str]:
    index = path / index_name
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot parse {index}: {e!r}") from e
    for fname in dict.fromkeys(weight_map.values()):
        if not (path / fname).exists():
            raise CheckpointError(f"shard {fname} named in {index} is missing from {path}")
    return dict(weight_map)


def _safetensors_names(fpath: Path) -> List[str]:
    try:
        with safe_open(str(fpath), framework="pt") as f:
            return list(f.keys())
    except Exception as e:
        raise CheckpointError(f"cannot read {fpath} (truncated or corrupt safetensors?): {e}") from e


def _safetensors_specs(path: Path, files: Dict[str, str]) -> Dict[str, TensorSpec]:
    specs: Dict[str, TensorSpec] = {}
    for fname in dict.fromkeys(files.values()):
        fpath = path / fname
        wanted = [n for n, f in files.items() if f == fname]
        try:
            with safe_open(str(fpath), framework="pt") as f:
                present = set(f.keys())
                for name in wanted:
                    if name not in present:
                        raise CheckpointError(f"{fpath} lacks tensor {name!r} named in its index")
                    sl = f.get_slice(name)
                    specs[name] = TensorSpec(_parse_dtype(sl.get_dtype()), tuple(sl.get_shape()))
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(
                f"cannot read {fpath} (truncated or corrupt safetensors?): {e}"
            ) from e
    return specs


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


def _parse_dtype(name: str) -> torch.dtype:
    if name not in _SAFETENSORS_DTYPES:
        raise CheckpointError(f"unsupported safetensors dtype {name}")
    return _SAFETENSORS_DTYPES[name]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _torch_load_safe(fpath: Path) -> Dict[str, torch.Tensor]:
    """Load a pickle state dict with weights_only=True: tensors and containers only, never code."""
    try:
        sd = torch.load(str(fpath), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(f"cannot load {fpath} with torch.load(weights_only=True): {e}") from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{fpath} is not a flat state dict of tensors")
    return sd


def remote_code(info: CheckpointInfo) -> Dict[str, str]:
    """The classes a checkpoint's config.json maps to its own code (``auto_map``), as
    {auto class: "module.Class"}; {} for an architecture transformers has built in."""
    auto_map = info.config.get("auto_map") or {}
    return {k: v if isinstance(v, str) else str(v) for k, v in auto_map.items()}


def check_remote_code(info: CheckpointInfo, trust_remote_code: bool) -> Optional[str]:
    """The directory whose modeling code may run, or None for a built-in architecture.
    Raises CheckpointError for a checkpoint with its own code unless `trust_remote_code`."""
    classes = remote_code(info)
    if not classes:
        return None
    if not trust_remote_code:
        files = sorted({info.path / (ref.split("--")[-1].rsplit(".", 1)[0] + ".py")
                        for ref in classes.values() if isinstance(ref, str) and "." in ref})
        raise CheckpointError(
            f"{info.path / 'config.json'} names classes in the checkpoint's own code (auto_map: "
            f"{', '.join(f'{k} -> {v}' for k, v in classes.items())}; files: "
            f"{', '.join(map(str, files)) or 'none found'}). ckmerge-ray runs no code from a "
            "checkpoint unless asked: pass trust_remote_code=True (CLI: --trust-remote-code) "
            "to import it on the driver and on every trial worker"
        )
    return str(info.path.resolve())


def tokenizer_files(path: Path) -> List[Path]:
    """Tokenizer and generation files to copy next to an exported merged model."""
    names = [
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
        "merges.txt", "tokenizer.model", "added_tokens.json", "generation_config.json",
        "chat_template.jinja",
    ]
    return [path / n for n in names if (path / n).exists()]
