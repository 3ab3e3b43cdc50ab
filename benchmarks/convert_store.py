"""What transformers' checkpoint conversion costs when a checkpoint is put into the object store.

A Mixtral checkpoint saved by `save_pretrained` stores every expert's w1/w2/w3 separately; the
model holds them stacked (`gate_up_proj`, `down_proj`). ckmerge-ray converts while it reads
(`ckmerge_ray/naming.py`). In one run this times putting (a) the file as transformers saved it
(read + convert + put) and (b) the same tensors saved already in the model's layout (read + put,
no conversion), alternating, and reports the median of (a)/(b); it also checks that both put the
same bytes.

    python benchmarks/convert_store.py            # ~100M-parameter bf16 Mixtral; writes BENCHMARKS.md
    python benchmarks/convert_store.py --quick    # a small one, prints, writes nothing
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import headline, machine, write_section  # noqa: E402

FULL = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=6, num_local_experts=8,
            num_attention_heads=8, num_key_value_heads=8, vocab_size=16384)
QUICK = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_local_experts=4,
             num_attention_heads=4, num_key_value_heads=4, vocab_size=2048)


def make_checkpoints(root: Path, shape: dict) -> tuple[Path, Path]:
    """The same bf16 weights twice: as save_pretrained writes them, and under the model's names."""
    from safetensors.torch import save_file
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(**shape, num_experts_per_tok=2, dtype="bfloat16"))
    model = model.to(torch.bfloat16)
    file_layout, model_layout = root / "file-layout", root / "model-layout"
    model.save_pretrained(file_layout, max_shard_size="10GB")
    model_layout.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()
               if k != "lm_head.weight" or not model.config.tie_word_embeddings},
              model_layout / "model.safetensors", metadata={"format": "pt"})
    (model_layout / "config.json").write_text((file_layout / "config.json").read_text())
    return file_layout, model_layout


def put_once(path: Path) -> tuple[float, int, int]:
    """Seconds to read (and convert) a checkpoint and put it into the store; bytes put; tensors."""
    from ckmerge_ray.config import CheckpointConfig
    from ckmerge_ray.inputs import WindowStore, load_window

    infos = load_window([path], CheckpointConfig())
    t = time.perf_counter()
    stored = WindowStore(infos, CheckpointConfig(), lambda m: None).get(0)
    seconds = time.perf_counter() - t
    nbytes, count = stored.total_bytes, len(infos[0].specs)
    del stored  # the last reference: Ray frees the shards
    return seconds, nbytes, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    import ray

    load = os.getloadavg()[0]
    ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            shape = QUICK if args.quick else FULL
            file_layout, model_layout = make_checkpoints(Path(tmp), shape)
            ratios, times = [], {"file": [], "model": []}
            # One untimed put of each first: the first put of a process pays one-time costs
            # (imports on first use, the store's first mappings) that belong to neither path.
            put_once(file_layout), put_once(model_layout)
            for _ in range(2 if args.quick else args.repeat):
                a, bytes_a, tensors_a = put_once(file_layout)
                b, bytes_b, tensors_b = put_once(model_layout)
                assert bytes_a == bytes_b and tensors_a == tensors_b, "different bytes put"
                times["file"].append(a)
                times["model"].append(b)
                ratios.append(a / b)
    finally:
        ray.shutdown()
    ratio = statistics.median(ratios)
    params = bytes_a / 2
    figures = headline(convert_ratio=ratio, file_s=statistics.median(times["file"]),
                       model_s=statistics.median(times["model"]), mparams=params / 1e6,
                       tensors=tensors_a)
    if not args.quick:
        write_section("Checkpoint conversion while storing", f"""
`python benchmarks/convert_store.py` on {machine()}: a bf16 Mixtral of {params / 1e6:.0f}M
parameters ({shape['num_local_experts']} experts × {shape['num_hidden_layers']} layers), put into
the object store (a) from the files `save_pretrained` wrote, converted while reading
(per-expert tensors stacked into the model's fused experts), and (b) from the same tensors saved
under the model's names (nothing to convert); {args.repeat} alternating pairs, median (load
average {load:.1f} when it started: other work shared the 2 cores).

| path | seconds (median) |
| --- | ---: |
| (a) file layout, converted | {statistics.median(times['file']):.3f} |
| (b) model layout | {statistics.median(times['model']):.3f} |
| (a) / (b) | {ratio:.2f} |

Both put the same {bytes_a / 2**20:.0f} MiB in {tensors_a} tensors. The conversion happens once
per checkpoint on the driver; trials never pay for it.
""")
    print(figures)


if __name__ == "__main__":
    main()
