"""Held-out λ landscapes for the sample-efficiency benchmark, from trajectories of other models.

`benchmarks/landscapes.json` holds the demo trajectory's landscapes (a small Llama pretrained on
the standard library, saved in fp32): the data the searcher's defaults were first chosen on.
This script pretrains further small trajectories that differ in architecture, corpus and saved
dtype, computes the held-out loss of the merge of every adjacent pair on a dense λ grid, and
caches each trajectory in `benchmarks/landscapes_<name>.json` (same format as landscapes.json,
plus a "trajectory" record of how it was made), so the benchmark itself runs in seconds.

    python benchmarks/make_landscapes.py                    # every trajectory below (~10 min, 2 cores)
    python benchmarks/make_landscapes.py --only gptneox-stdlib-bf16
    python benchmarks/make_landscapes.py --list

Corpora: "stdlib" is the demo's split of the standard library's source; "shakespeare" is
`../shared/data/tinyshakespeare.txt` (or --shakespeare PATH), first 90 % for training and the
rest held out; a trajectory whose corpus file is missing is skipped with a message. The corpus
itself is never copied into the repository, only the loss values.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


@dataclass(frozen=True)
class Trajectory:
    """One small pretraining run: its checkpoints' adjacent pairs give the landscapes."""

    name: str
    arch: str  # "gptneox", "gpt2" or "llama"
    corpus: str  # "stdlib" or "shakespeare"
    save_dtype: str  # dtype the checkpoints are saved in, as pretraining runs save them
    steps: int = 400
    save_every: int = 50  # 8 checkpoints, 7 adjacent pairs
    warmup: int = 40
    lr: float = 3e-3
    batch_size: int = 16
    seq_len: int = 128
    vocab_size: int = 2048
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    train_bytes: int = 2_000_000
    seed: int = 1


TRAJECTORIES = {
    t.name: t for t in (
        Trajectory("gpt2-shakespeare-fp16", "gpt2", "shakespeare", "float16", lr=2e-3),
        Trajectory("gptneox-stdlib-bf16", "gptneox", "stdlib", "bfloat16"),
        Trajectory("gptneox-shakespeare-bf16", "gptneox", "shakespeare", "bfloat16", hidden_size=96,
                   layers=3, lr=4e-3, seed=2),
    )
}


def corpus_texts(t: Trajectory, shakespeare: Path):
    """(training texts, held-out texts) of the trajectory's corpus, or None if it is missing."""
    from ckmerge_ray.demo import read_texts, split_corpus, stdlib_files

    if t.corpus == "stdlib":
        train_files, heldout_files = split_corpus(stdlib_files())
        return read_texts(train_files, t.train_bytes), read_texts(heldout_files, 2_000_000)
    if not shakespeare.exists():
        return None
    text = shakespeare.read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    train = [text[i:i + 4000] for i in range(0, min(cut, t.train_bytes), 4000)]
    heldout = [text[i:i + 4000] for i in range(cut, len(text), 4000)]
    return train, heldout


def build_model(t: Trajectory, tok):
    import transformers as tf

    common = dict(vocab_size=len(tok), eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    if t.arch == "gptneox":
        cfg = tf.GPTNeoXConfig(hidden_size=t.hidden_size, num_hidden_layers=t.layers,
                               num_attention_heads=t.heads, intermediate_size=4 * t.hidden_size,
                               max_position_embeddings=t.seq_len, rotary_pct=0.25,
                               tie_word_embeddings=False, **common)
        return tf.GPTNeoXForCausalLM(cfg)
    if t.arch == "gpt2":
        cfg = tf.GPT2Config(n_embd=t.hidden_size, n_layer=t.layers, n_head=t.heads,
                            n_positions=t.seq_len, **common)
        return tf.GPT2LMHeadModel(cfg)
    if t.arch == "llama":
        cfg = tf.LlamaConfig(hidden_size=t.hidden_size, intermediate_size=3 * t.hidden_size,
                             num_hidden_layers=t.layers, num_attention_heads=t.heads,
                             num_key_value_heads=t.heads, max_position_embeddings=t.seq_len,
                             tie_word_embeddings=True, **common)
        return tf.LlamaForCausalLM(cfg)
    raise ValueError(f"arch must be one of gptneox, gpt2, llama, got {t.arch!r}")


def pretrain(t: Trajectory, out: Path, texts, heldout, log=print) -> List[Path]:
    """Pretrain as the demo's trajectory maker does; checkpoints in `t.save_dtype`."""
    from ckmerge_ray.demo import EOS, TrajectoryConfig, save_checkpoint, train_tokenizer

    torch.manual_seed(t.seed)
    with (out / "heldout.jsonl").open("w", encoding="utf-8") as f:
        for text in heldout:
            f.write(json.dumps({"text": text}) + "\n")
    tok = train_tokenizer(texts, t.vocab_size)
    ids = torch.tensor(tok(EOS.join(texts))["input_ids"], dtype=torch.long)
    model = build_model(t, tok)
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / t.warmup))
    gen = torch.Generator().manual_seed(t.seed)
    save_cfg = TrajectoryConfig(save_dtype=t.save_dtype)
    saved, start = [], time.perf_counter()
    model.train()
    for step in range(1, t.steps + 1):
        starts = torch.randint(0, ids.numel() - t.seq_len - 1, (t.batch_size,), generator=gen)
        batch = torch.stack([ids[s:s + t.seq_len] for s in starts.tolist()])  # (B, T)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % t.save_every == 0:
            path = out / f"checkpoint-{step}"
            save_checkpoint(model, tok, path, save_cfg)
            saved.append(path)
            log(f"  {t.name} step {step}/{t.steps} loss {loss.item():.3f} "
                f"({time.perf_counter() - start:.0f}s)")
    return saved


def landscapes(trajectory_dir: Path, grid: int, seq_len: int, max_tokens: int) -> Dict:
    """Held-out loss of every adjacent pair's merge on a λ grid in [0, 1]."""
    from sample_efficiency import compute_landscapes

    return compute_landscapes(trajectory_dir, grid, seq_len=seq_len, max_tokens=max_tokens)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", default=None, help="trajectory names (default: all)")
    p.add_argument("--list", action="store_true")
    p.add_argument("--grid", type=int, default=41)
    p.add_argument("--shakespeare", type=Path, default=SHAKESPEARE)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.list:
        for t in TRAJECTORIES.values():
            print(json.dumps(asdict(t)))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.only or list(TRAJECTORIES)
    unknown = [n for n in names if n not in TRAJECTORIES]
    if unknown:
        raise SystemExit(f"unknown trajectories {unknown}; known: {list(TRAJECTORIES)}")
    for name in names:
        t = TRAJECTORIES[name]
        corpus = corpus_texts(t, args.shakespeare)
        if corpus is None:
            print(f"skipping {name}: corpus file {args.shakespeare} not found", file=sys.stderr)
            continue
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f"ckmerge-{name}-") as tmp:
            pretrain(t, Path(tmp), *corpus)
            data = landscapes(Path(tmp), args.grid, seq_len=t.seq_len, max_tokens=16384)
        data["trajectory"] = {**asdict(t), "seconds": round(time.perf_counter() - start)}
        out = HERE / f"landscapes_{name}.json"
        tmp_out = out.with_suffix(".json.tmp")
        tmp_out.write_text(json.dumps(data, indent=1) + "\n")
        tmp_out.replace(out)
        print(f"wrote {out.name} ({len(data['pairs'])} landscapes, "
              f"{time.perf_counter() - start:.0f}s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
