"""A checkpoint as the rest of the package sees it: config, tensor headers, reads on demand.

`CheckpointInfo` is what `load.py` returns for every format. Names pass two layers, both
planned from headers before any tensor is read: the trainer's names to the architecture's file
names (`names.py`: wrapper prefixes, training state, name maps; `apply_renaming`), and file names
to the model's (transformers' own conversion, `naming.py`; `apply_conversion`). After both,
`specs`, `files` and `read_tensors` speak the model's names and layouts. Also here: the pair's
validation, the shard plan, and the check that files did not change since validation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from ckmerge_ray.checkpoints.names import Renaming
from ckmerge_ray.errors import CheckpointError, ConfigError
from ckmerge_ray.naming import Conversion, first_names
from ckmerge_ray.storage import Location

Reader = Callable[[List[str]], Dict[str, torch.Tensor]]


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
    """What a checkpoint holds: its config and, per tensor, the spec and the file it is in.

    `specs` and `files` name the tensors as the rest of the package sees them: the stored names
    until `apply_renaming`/`apply_conversion`, the model's after them (`files` then gives the
    file of a model tensor's first source, which decides its shard).
    """

    path: Location  # the weights' directory (the DCP folder for dcp)
    config: Dict
    format: str  # "safetensors", "pickle" or "dcp"
    specs: Dict[str, TensorSpec]  # tensor name -> spec, in file order
    files: Dict[str, str]  # tensor name -> file name inside `path`
    reader: Reader = field(repr=False, default=None)  # stored names -> tensors
    model_dir: Optional[Location] = None  # where config.json and the tokenizer are
    source: Optional[Location] = None  # the folder the user named (a Trainer checkpoint-N/)
    non_tensors: Dict[str, int] = field(default_factory=dict)  # DCP: other entries per group
    # file (a Location) -> its fingerprint when validated (`check_unchanged`)
    fingerprints: Dict[Location, tuple] = field(default_factory=dict, repr=False)
    config_bytes: bytes = field(default=b"", repr=False)  # config.json as validated
    tied: List[List[str]] = field(default_factory=list)  # names the model holds as one tensor
    renaming: Optional[Renaming] = None
    conversion: Optional[Conversion] = None
    stored_specs: Dict[str, TensorSpec] = field(default_factory=dict, repr=False)
    file_specs: Dict[str, TensorSpec] = field(default_factory=dict, repr=False)
    file_map: Dict[str, str] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.model_dir is None:
            self.model_dir = self.path
        if self.source is None:
            self.source = self.path

    @property
    def name(self) -> str:
        """The checkpoint's name for tables and logs: the folder the user named (for
        Trainer's FSDP save, checkpoint-N rather than its pytorch_model_fsdp_0/)."""
        return self.source.name

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.specs.values())

    @property
    def shard_files(self) -> List[str]:
        """Weight files in first-use order."""
        return list(dict.fromkeys(self.files.values()))

    def record_files(self, files: List[Location]) -> None:
        """Fingerprint these files (weights, index, metadata, config) as they are now."""
        self.fingerprints.update({f: fingerprint(f) for f in files})

    def check_unchanged(self, when: str) -> None:
        """Raise CheckpointError naming the first file that changed (or vanished) since it was
        validated: the trainer rewrote or deleted it, or a sync was still running."""
        for f, before in self.fingerprints.items():
            try:
                now = fingerprint(f)
            except CheckpointError:
                now = None
            if now != before:
                what = "was deleted" if now is None else "changed (size, modification time or "\
                    "content)"
                raise CheckpointError(
                    f"checkpoint file {f} {what} after the checkpoint was validated, {when}: the "
                    "trainer rewrote or deleted it, or a copy or sync was still running. Nothing "
                    "read from it is used; run again once the checkpoint is complete")

    def apply_renaming(self, renaming: Renaming) -> None:
        """From now on, name tensors as `renaming` does (trainer names -> architecture's file
        names, `names.py`); stored tensors it drops (training state) are never read."""
        self.renaming = renaming
        if renaming.identity and len(renaming.targets) == len(self.specs):
            return
        self.stored_specs, stored_files = self.specs, self.files
        self.specs, self.files = {}, {}
        for group in renaming.groups():
            src, fn, _ = renaming.targets[group[0]]
            spec = self.stored_specs[src]
            meta = torch.empty(spec.shape, dtype=spec.dtype, device="meta")
            parts = fn(meta) if fn is not None else [meta]
            for name in group:
                shape = tuple(parts[renaming.targets[name][2]].shape)
                self.specs[name] = TensorSpec(spec.dtype, shape)
                self.files[name] = stored_files[src]

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
        """Groups of tensor names that are read together: one conversion unit (e.g. all experts
        of a layer), joined with every unit cut from the same stored tensor by a name map, so
        that no stored tensor is read twice."""
        if self.conversion is None:
            units = {n: [n] for n in self.specs}
            sources = {n: [n] for n in self.specs}
        else:
            units, sources = self.conversion.units, self.conversion.sources
        if self.renaming is None or all(len(g) == 1 for g in self.renaming.groups()):
            return list(units.values())
        merged: Dict[str, List[str]] = {}  # first stored source -> model names
        for key, names in units.items():
            first = sources[key][0]
            stored = self.renaming.targets[first][0] if first in self.renaming.targets else first
            merged.setdefault(stored, []).extend(names)
        return list(merged.values())

    def read_tensors(self, names: List[str]) -> Dict[str, torch.Tensor]:
        """Load the named tensors, converted to the model's names and layout after
        `apply_conversion` (whole units are read)."""
        if self.conversion is None:
            return self._read_file_names(names)
        unit_of = self.conversion.unit_of()
        keys = list(dict.fromkeys(unit_of[n] for n in names))
        out = self.conversion.convert(keys, self._read_file_names)
        return {name: out[name] for name in names}

    def revert_names(self, tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Model-named tensors back to the architecture's file names and layout (what
        save_pretrained writes); a name map is not reverted: exports are Hugging Face models."""
        return tensors if self.conversion is None else self.conversion.revert(tensors)

    def _read_file_names(self, names: List[str]) -> Dict[str, torch.Tensor]:
        if self.renaming is None or not self.stored_specs:
            return self.reader(names)
        return self.renaming.read(names, self.reader)


def fingerprint(f: Location) -> tuple:
    """What `check_unchanged` compares: size and version (local: mtime and inode; object
    stores: ETag), plus for a local file a CRC of its first and last 4 KiB (a cheap content
    check that needs no second read of a remote file: there the ETag is one)."""
    import zlib

    fp = f.fingerprint()
    if f.is_local:
        size = fp[0]
        with open(f.local_path, "rb") as fh:
            head = fh.read(4096)
            fh.seek(max(0, size - 4096))
            fp = fp + (zlib.crc32(head), zlib.crc32(fh.read(4096)))
    return fp


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
        files = sorted({str(info.model_dir / (ref.split("--")[-1].rsplit(".", 1)[0] + ".py"))
                        for ref in classes.values() if isinstance(ref, str) and "." in ref})
        raise CheckpointError(
            f"{info.model_dir / 'config.json'} names classes in the checkpoint's own code "
            f"(auto_map: {', '.join(f'{k} -> {v}' for k, v in classes.items())}; files: "
            f"{', '.join(files) or 'none found'}). ckmerge-ray runs no code from a "
            "checkpoint unless asked: pass trust_remote_code=True (CLI: --trust-remote-code) "
            "to import it on the driver and on every trial worker"
        )
    if not info.model_dir.is_local:
        raise CheckpointError(f"{info.model_dir} ships its own modeling code, which is imported "
                              "from a local or shared filesystem only: copy the checkpoint's "
                              "config and code there, or name one with model_config=")
    return str(info.model_dir.local_path.resolve())


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
