"""Checkpoints as trainers write them, read headers first: `load.py` (format detection),
`hf.py` (Hugging Face directories), `dcp.py` (torch.distributed.checkpoint), `names.py`
(trainer names to the architecture's), `info.py` (the common view, validation, shard plan)."""

from ckmerge_ray.checkpoints.hf import tokenizer_files
from ckmerge_ray.checkpoints.info import (
    CheckpointInfo, TensorSpec, check_remote_code, iter_plan, plan_shards, remote_code,
    validate_pair,
)
from ckmerge_ray.checkpoints.load import FORMATS, detect_format, load_checkpoint_info
from ckmerge_ray.checkpoints.names import NameMap, NameRule

__all__ = [
    "FORMATS", "CheckpointInfo", "NameMap", "NameRule", "TensorSpec", "check_remote_code",
    "detect_format", "iter_plan", "load_checkpoint_info", "plan_shards", "remote_code",
    "tokenizer_files", "validate_pair",
]
