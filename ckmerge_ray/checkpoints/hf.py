"""Hugging Face model directories: config.json plus safetensors (or opt-in pickle) weights.

A directory holds `model.safetensors`, a sharded `model.safetensors.index.json`, or (only with
`allow_pickle=True`) `pytorch_model.bin[.index.json]` loaded with
`torch.load(weights_only=True)`. Headers are read first; tensors on demand. Local files are read
with `safetensors.safe_open` (memory-mapped). Remote ones (a `storage.Location` on object
storage) are read with ranged requests: the 8-byte header length, the JSON header, then each
shard group's byte ranges, coalesced where they touch; the header format is the documented
safetensors one (https://github.com/huggingface/safetensors#format), and safetensors itself
offers no ranged reader, hence the few lines below.
"""

from __future__ import annotations

import json
import struct
from typing import Dict, List, Tuple

import torch
from safetensors import safe_open

from ckmerge_ray.errors import CheckpointError

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on a header

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}

Header = Dict[str, Tuple[torch.dtype, Tuple[int, ...], int, int]]  # name -> dtype, shape, begin, end


def read_config(directory) -> Tuple[Dict, bytes]:
    """config.json of a model directory (a Location), parsed and as its bytes (what an export
    writes, so that it is the config that was validated). Raises CheckpointError."""
    cfg = directory / "config.json"
    if not cfg.exists():
        raise CheckpointError(f"no config.json in {directory}{_holds_checkpoints(directory)}")
    raw = cfg.read_bytes()
    try:
        config = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot parse {cfg}: {e}") from e
    if not isinstance(config, dict) or "model_type" not in config:
        raise CheckpointError(f"{cfg} has no 'model_type'; is this a Hugging Face model directory?")
    return config, raw


def weight_files(directory, allow_pickle: bool) -> Tuple[str, Dict[str, str], Dict[str, Header]]:
    """(format, {tensor name: file}, {file: header} of every safetensors file) of a model
    directory, from its index or single file; each header is read once.
    Raises CheckpointError for missing shards, pickle without opt-in, or no weights."""
    if (directory / SAFE_INDEX).exists():
        files = read_index(directory, SAFE_INDEX)
        return "safetensors", files, {f: safetensors_header(directory / f)
                                      for f in dict.fromkeys(files.values())}
    if (directory / SAFE_SINGLE).exists():
        header = safetensors_header(directory / SAFE_SINGLE)
        return "safetensors", {n: SAFE_SINGLE for n in header}, {SAFE_SINGLE: header}
    pickle_file = PICKLE_INDEX if (directory / PICKLE_INDEX).exists() else PICKLE_SINGLE
    if (directory / pickle_file).exists():
        if not allow_pickle:
            raise CheckpointError(
                f"{directory} holds only a pickle checkpoint ({pickle_file}); pickle can run code, "
                "so it is loaded only on request: pass allow_pickle=True (CLI: --allow-pickle) to "
                "load it with torch.load(weights_only=True), or convert it to safetensors")
        if pickle_file == PICKLE_INDEX:
            return "pickle", read_index(directory, PICKLE_INDEX), {}
        return "pickle", {n: PICKLE_SINGLE for n in torch_load_safe(directory / PICKLE_SINGLE)}, {}
    raise CheckpointError(
        f"no weights in {directory}: expected {SAFE_SINGLE}, {SAFE_INDEX}, or (with allow_pickle) "
        f"{PICKLE_SINGLE}")


def read_index(directory, index_name: str) -> Dict[str, str]:
    index = directory / index_name
    try:
        weight_map = json.loads(index.read_bytes())["weight_map"]
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot parse {index}: {e!r}") from e
    for fname in dict.fromkeys(weight_map.values()):
        if not (directory / fname).exists():
            raise CheckpointError(f"shard {fname} named in {index} is missing from {directory}")
    return dict(weight_map)


def safetensors_header(location) -> Header:
    """Every tensor's dtype, shape and byte range in a safetensors file, from its header only
    (two ranged reads when remote). Raises CheckpointError for a truncated or corrupt file."""
    if location.is_local:
        return _local_header(location)
    try:
        size = location.size()
        (n,) = struct.unpack("<Q", location.read_range(0, 8))
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise ValueError(f"header length {n} exceeds the file ({size} bytes)")
        raw = json.loads(location.read_range(8, 8 + n))
        header = {}
        for name, entry in raw.items():
            if name == "__metadata__":
                continue
            begin, end = entry["data_offsets"]
            header[name] = (parse_dtype(entry["dtype"]), tuple(entry["shape"]), 8 + n + begin,
                            8 + n + end)
            if 8 + n + end > size:
                raise ValueError(f"tensor {name!r} lies beyond the end of the file")
        return header
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"cannot read {location} (truncated or corrupt safetensors?): "
                              f"{e}") from e


def _local_header(location) -> Header:
    try:
        with safe_open(str(location.local_path), framework="pt") as f:
            return {name: (parse_dtype(f.get_slice(name).get_dtype()),
                           tuple(f.get_slice(name).get_shape()), -1, -1) for name in f.keys()}
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"cannot read {location} (truncated or corrupt safetensors?): "
                              f"{e}") from e


def read_safetensors(location, names: List[str], header: Header) -> Dict[str, torch.Tensor]:
    """The named tensors of one safetensors file: memory-mapped when local; remote, one ranged
    read per run of adjacent tensors (each stored byte read once)."""
    out: Dict[str, torch.Tensor] = {}
    if location.is_local:
        try:
            with safe_open(str(location.local_path), framework="pt") as f:
                for name in names:
                    out[name] = f.get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"cannot read {location}: {e}") from e
        return out
    spans: List[List[str]] = []
    for name in sorted(names, key=lambda n: header[n][2]):
        if spans and header[spans[-1][-1]][3] == header[name][2]:
            spans[-1].append(name)
        else:
            spans.append([name])
    for span in spans:
        begin, end = header[span[0]][2], header[span[-1]][3]
        data = bytearray(location.read_range(begin, end))
        if len(data) != end - begin:
            raise CheckpointError(f"{location}: short read of bytes {begin}-{end} (file changed?)")
        for name in span:
            dtype, shape, b, e = header[name]
            t = torch.frombuffer(data, dtype=dtype, offset=b - begin, count=_numel(shape)) \
                if e > b else torch.empty(0, dtype=dtype)
            out[name] = t.view(shape)
    return out


def torch_load_safe(location) -> Dict[str, torch.Tensor]:
    """A pickle state dict loaded with weights_only=True: tensors and containers only."""
    try:
        if location.is_local:
            sd = torch.load(str(location.local_path), map_location="cpu", weights_only=True,
                            mmap=True)
        else:
            import io

            sd = torch.load(io.BytesIO(location.read_bytes()), map_location="cpu",
                            weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot load {location} with torch.load(weights_only=True): "
                              f"{e}") from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{location} is not a flat state dict of tensors")
    return sd


def parse_dtype(name: str) -> torch.dtype:
    if name not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"unsupported safetensors dtype {name}")
    return SAFETENSORS_DTYPES[name]


def _holds_checkpoints(directory) -> str:
    """A hint when a local `directory` is a run's folder of checkpoints rather than one."""
    local = directory.local_path if directory.is_local else None
    if local is None or not local.is_dir():
        return ""
    subs = sorted(p.name for p in local.iterdir() if (p / "config.json").is_file())
    if not subs:
        return ""
    listed = ", ".join(subs[:3]) + (", ..." if len(subs) > 3 else "")
    return (f"; it holds checkpoint folders ({listed}): pass one of them, or the whole folder "
            "to `ckmerge-ray sweep`")


def tokenizer_files(directory) -> List:
    """Tokenizer and generation files of a model directory (Locations), to copy next to an
    exported merged model or to stage locally for the objective's tokenizer."""
    names = [
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
        "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "added_tokens.json",
        "generation_config.json", "chat_template.jinja",
    ]
    return [directory / n for n in names if (directory / n).exists()]


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
