"""Helpers shared by the benchmarks: synthetic checkpoint pairs of a given size, machine facts,
BENCHMARKS.md sections, timing."""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Callable, Dict

import torch

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"

# Llama shapes by name; parameter counts are for untied embeddings.
SIZES: Dict[str, Dict] = {
    "14M": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
                num_key_value_heads=6, vocab_size=8192),
    "134M": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=12, vocab_size=32000),
    "953M": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                 num_key_value_heads=16, vocab_size=32000),
}


def make_pair(root: Path, size: str, dtype: str, seed: int = 0) -> tuple[Path, Path]:
    """Two Llama checkpoints of `size` in `dtype`; the later is the earlier plus a small step,
    as adjacent pretraining checkpoints are. Reused when already on disk."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    earlier, later = root / f"{size}-{dtype}-a", root / f"{size}-{dtype}-b"
    if (later / "model.safetensors").exists():
        return earlier, later
    cfg = LlamaConfig(**SIZES[size], max_position_embeddings=2048, tie_word_embeddings=False,
                      dtype=dtype)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    a = {k: (torch.randn(s, generator=g) * 0.02).to(getattr(torch, dtype)) for k, s in shapes.items()}
    for path, tensors in ((earlier, a), (later, None)):
        path.mkdir(parents=True, exist_ok=True)
        if tensors is None:  # the later checkpoint: one small "training step" away
            tensors = {k: (v.float() + torch.randn(v.shape, generator=g) * 5e-4).to(v.dtype)
                       for k, v in a.items()}
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        (path / "config.json").write_text(cfg.to_json_string())
        del tensors
    return earlier, later


def numel(shape) -> int:
    """Elements of a tensor of this shape."""
    n = 1
    for d in shape:
        n *= d
    return n


def median_time(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, torch {torch.__version__}, {torch.get_num_threads()} threads"


def write_section(title: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace (or append) the section `## title` of BENCHMARKS.md."""
    text = path.read_text() if path.exists() else (
        "# Benchmarks\n\nEvery figure here was made by the command shown beside it, on the machine named there.\n"
    )
    section = f"## {title}\n\n{body.strip()}\n"
    pattern = re.compile(rf"## {re.escape(title)}\n.*?(?=\n## |\Z)", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda m: section.rstrip("\n"), text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    text = re.sub(r"([^\n])\n## ", r"\1\n\n## ", text)  # a blank line before every section
    path.write_text(text if text.endswith("\n") else text + "\n")


def headline(**pairs) -> str:
    """The last line every benchmark prints: key=value pairs."""
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in pairs.items())


def dump(obj) -> str:
    return json.dumps(obj, indent=1, default=str)
