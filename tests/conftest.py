"""Shared fixtures: one local Ray instance per session, tiny real trajectories made offline."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from ckmerge_ray.demo import TrajectoryConfig, make_trajectory  # noqa: E402

# Small enough to train in seconds on 2 cores, big enough to have a real λ landscape.
TINY = TrajectoryConfig(
    steps=120, save_every=40, warmup=10, lr=3e-3, batch_size=8, seq_len=64, vocab_size=512,
    hidden_size=48, layers=2, heads=4, train_bytes=400_000, seed=0,
)


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        # address="local": a fresh instance even if a `ray start` cluster runs on this machine
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def trajectory(tmp_path_factory) -> list[Path]:
    """fp32, single-file checkpoints: checkpoint-40, -80, -120, plus heldout.jsonl beside them."""
    out = tmp_path_factory.mktemp("traj_fp32")
    return make_trajectory(out, TINY, log=lambda m: None)


@pytest.fixture(scope="session")
def trajectory_bf16(trajectory, tmp_path_factory) -> list[Path]:
    """bf16 checkpoints saved as sharded safetensors (index + several files).

    The same training run as `trajectory` (TINY), so instead of training it again each fp32
    checkpoint is saved again by make_trajectory's own writer with save_dtype bfloat16 and
    max_shard_size 60KB: the files are byte for byte those a bf16 make_trajectory writes
    (compared file by file when this was written; training on the CPU is deterministic)."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from ckmerge_ray.demo import save_checkpoint

    class TokenizerFiles:  # the trained tokenizer's files as saved (a reload would add fields)
        def __init__(self, ckpt):
            self.files = [f for f in ckpt.iterdir() if f.name.startswith(("tokenizer", "special_tokens"))]

        def save_pretrained(self, path):
            for f in self.files:
                shutil.copy(f, Path(path) / f.name)

    out = tmp_path_factory.mktemp("traj_bf16")
    cfg = TrajectoryConfig(**{**TINY.__dict__, "save_dtype": "bfloat16", "max_shard_size": "60KB"})
    shutil.copy(trajectory[-1].parent / "heldout.jsonl", out / "heldout.jsonl")
    saved = []
    for ckpt in trajectory:
        # built as make_trajectory builds it (from_pretrained would order the parameters, and
        # so the shards, differently), then given the checkpoint's weights
        model = LlamaForCausalLM(LlamaConfig.from_pretrained(ckpt))
        missing, unexpected = model.load_state_dict(load_file(ckpt / "model.safetensors"), strict=False)
        assert missing == ["lm_head.weight"] and not unexpected  # tied to the embedding
        save_checkpoint(model, TokenizerFiles(ckpt), out / ckpt.name, cfg)
        saved.append(out / ckpt.name)
    return saved


def tiny_llama(seed: int = 0, **overrides):
    """A randomly initialized tiny Llama, for checkpoint-format tests that need no training."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
               num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
               tie_word_embeddings=False)
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg))


@pytest.fixture
def tiny_pair(tmp_path) -> tuple[Path, Path]:
    """Two tiny random checkpoints with the same architecture (single safetensors file)."""
    a, b = tmp_path / "a", tmp_path / "b"
    tiny_llama(0).save_pretrained(a)
    tiny_llama(1).save_pretrained(b)
    return a, b
