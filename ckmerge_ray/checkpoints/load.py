"""`load_checkpoint_info`: a checkpoint's config and tensor headers (never its tensors), from a
local directory or a URI (`storage.locate`), in one of the formats trainers write
(`detect_format`):

- ``hf``: a Hugging Face model directory (`hf.py`): config.json + safetensors (or opt-in pickle);
- ``dcp``: a `torch.distributed.checkpoint` directory (`dcp.py`), with the architecture's
  config.json beside it, one folder above it (Trainer/Accelerate's
  ``checkpoint-N/pytorch_model_fsdp_0/``), or named by the user; a Trainer checkpoint folder
  holding ``pytorch_model_fsdp_0/`` is found as such.

Every weight file and config.json is fingerprinted as it is read (`CheckpointInfo.check_unchanged`).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import torch

from ckmerge_ray.checkpoints import dcp, hf
from ckmerge_ray.checkpoints.info import CheckpointInfo, TensorSpec
from ckmerge_ray.errors import CheckpointError, ConfigError
from ckmerge_ray.storage import Location, locate

FORMATS = ("auto", "hf", "dcp")
# The folder Accelerate (and so HF Trainer with FSDP's sharded state dict) saves model weights in.
FSDP_MODEL_DIRS = ("pytorch_model_fsdp_0", "model")


def load_checkpoint_info(location, allow_pickle: bool = False, format: str = "auto",
                         model_config=None) -> CheckpointInfo:
    """Read a checkpoint's config and tensor headers (local path or URI), checking every file
    it names exists. `format`: "auto", "hf" or "dcp"; `model_config`: config.json (or its
    directory) for a DCP checkpoint with none beside or above it.

    Raises CheckpointError naming the missing or unreadable file.
    """
    if format not in FORMATS:
        raise ConfigError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    root = locate(location, what="checkpoint directory")
    if not root.isdir():
        raise CheckpointError(f"checkpoint must be a directory, got a file: {root}")
    kind, weights = detect_format(root, format)
    if kind == "dcp":
        return _load_dcp(root, weights, model_config)
    config, raw = hf.read_config(root)
    fmt, files, headers = hf.weight_files(root, allow_pickle)
    if fmt == "safetensors":
        specs = {}
        for name, fname in files.items():
            if name not in headers[fname]:
                raise CheckpointError(f"{root / fname} lacks tensor {name!r} named in its index")
            dtype, shape, _, _ = headers[fname][name]
            specs[name] = TensorSpec(dtype, shape)

        def read(names: List[str]) -> Dict[str, torch.Tensor]:
            return _by_file(names, files, lambda f, ns: hf.read_safetensors(root / f, ns,
                                                                            headers[f]))
        return _recorded(CheckpointInfo(root, config, fmt, specs, files, read,
                                        config_bytes=raw))
    cache: Dict[str, Dict[str, torch.Tensor]] = {}

    def load(fname: str) -> Dict[str, torch.Tensor]:
        if fname not in cache:
            cache[fname] = hf.torch_load_safe(root / fname)
        return cache[fname]

    specs = {}
    for name, fname in files.items():
        sd = load(fname)
        if name not in sd:
            raise CheckpointError(f"{root / fname} lacks tensor {name!r} named in its index")
        specs[name] = TensorSpec(sd[name].dtype, tuple(sd[name].shape))
    return _recorded(CheckpointInfo(root, config, fmt, specs, files,
                                    lambda names: _by_file(names, files, lambda f, ns: {
                                        n: load(f)[n] for n in ns}), config_bytes=raw))


def _recorded(info: CheckpointInfo) -> CheckpointInfo:
    """The info with its weight files and config.json fingerprinted."""
    info.record_files([info.path / f for f in info.shard_files] + [info.model_dir / "config.json"])
    return info


def detect_format(root: Location, format: str = "auto") -> Tuple[str, Location]:
    """("hf" or "dcp", the weights' directory) of a checkpoint folder. Raises CheckpointError
    for a DCP folder without its .metadata (unfinished, or not copied), or when `format` is
    "dcp" and the folder is not one."""
    if format == "hf":
        dcp_inside = [f for f in [root] + [root / sub for sub in FSDP_MODEL_DIRS]
                      if (f / dcp.METADATA).exists()]
        if dcp_inside and not any((root / n).exists() for n in (hf.SAFE_SINGLE, hf.SAFE_INDEX)):
            raise CheckpointError(f"{root} holds a torch.distributed.checkpoint in "
                                  f"{dcp_inside[0]}, not Hugging Face weights: use format "
                                  "'dcp' or 'auto' (CLI: --format dcp, or leave --format out)")
        return "hf", root
    candidates = [root] + [root / sub for sub in FSDP_MODEL_DIRS]
    for folder in candidates:
        if (folder / dcp.METADATA).exists():
            return "dcp", folder
    unfinished = [f for f in candidates if f.isdir() and any(
        c.name.endswith(".distcp") for c in f.listdir())]
    if format == "dcp" or unfinished:
        where = unfinished[0] if unfinished else root
        raise CheckpointError(
            f"{where} is not a torch.distributed.checkpoint directory: no {dcp.METADATA} in it"
            f"{'' if unfinished else ' or in ' + ' or '.join(FSDP_MODEL_DIRS) + '/ below it'} "
            "(DCP writes it last: the checkpoint may still be being written, or was not copied "
            "whole)")
    return "hf", root


def _load_dcp(root: Location, weights: Location, model_config) -> CheckpointInfo:
    metadata = dcp.read_metadata(weights)
    dcp.check_files(weights, metadata)
    entries = dcp.tensor_entries(metadata)
    if not entries:
        raise CheckpointError(f"{weights / dcp.METADATA} lists no tensors")
    model_dir, (config, raw) = _dcp_config(root, weights, model_config)
    specs = {n: TensorSpec(e.properties.dtype, tuple(e.size)) for n, e in entries.items()}
    files = dcp.tensor_files(metadata)
    non_tensors: Dict[str, int] = {}
    for key in metadata.state_dict_metadata:
        if key not in entries:
            group = key.split(".", 1)[0]
            non_tensors[group] = non_tensors.get(group, 0) + 1
    info = CheckpointInfo(weights, config, "dcp", specs, {n: files[n] for n in specs},
                          lambda names: dcp.load_tensors(weights, metadata, names), model_dir,
                          source=root, non_tensors=non_tensors, config_bytes=raw)
    info.record_files([weights / dcp.METADATA, model_dir / "config.json"])
    return _recorded(info)


def _dcp_config(root: Location, weights: Location, model_config
                ) -> Tuple[Location, Tuple[Dict, bytes]]:
    """The architecture's config.json for a DCP folder: named by the user, beside the folder,
    or one level above it (Trainer's checkpoint-N/ holding pytorch_model_fsdp_0/)."""
    if model_config is not None:
        where = locate(model_config, what="model config")
        directory = where if where.isdir() else where.parent
        return directory, hf.read_config(directory)
    for directory in dict.fromkeys([weights, root, weights.parent]):
        if (directory / "config.json").exists():
            return directory, hf.read_config(directory)
    raise CheckpointError(
        f"{weights} is a torch.distributed.checkpoint directory without the architecture: no "
        f"config.json in it or above it; name one with model_config= (CLI: --model-config "
        "PATH), e.g. the config.json of the Hugging Face model this run trains")


def _by_file(names: List[str], files: Dict[str, str],
             read: Callable[[str, List[str]], Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    by_file: Dict[str, List[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    out: Dict[str, torch.Tensor] = {}
    for fname, fnames in by_file.items():
        out.update(read(fname, fnames))
    return {name: out[name] for name in names}
