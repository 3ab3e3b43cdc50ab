"""A real pretraining trajectory made offline, and the demo that tunes its last pair.

The corpus is the Python standard library's own source, which every machine with Python has:
files are split deterministically into training and held-out sets. A byte-level BPE tokenizer is
trained on the training text, a small Llama-style model is pretrained with a constant learning
rate after warmup, and a checkpoint (`checkpoint-<step>/`, Hugging Face layout) is saved every
`save_every` steps.

    ckmerge-ray demo                       # about 2-3 minutes on 2 CPU cores
    python examples/make_trajectory.py --help
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch

EOS = "<|endoftext|>"


def stdlib_files() -> List[Path]:
    """The standard library's .py files (excluding tests and site-packages), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        p for p in root.rglob("*.py")
        if "site-packages" not in p.parts and "test" not in p.parts and "tests" not in p.parts
        and "idlelib" not in p.parts
    ]
    return sorted(files)


def split_corpus(files: List[Path]) -> Tuple[List[Path], List[Path]]:
    """Deterministic split by path hash: ~1 file in 10 is held out."""
    train, heldout = [], []
    for p in files:
        h = int(hashlib.sha1(p.name.encode() + str(p.parent.name).encode()).hexdigest(), 16)
        (heldout if h % 10 == 0 else train).append(p)
    return train, heldout


def read_texts(files: List[Path], max_bytes: int) -> List[str]:
    """File contents up to `max_bytes` in total, skipping files that are not UTF-8."""
    texts, total = [], 0
    for p in files:
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(text)
        total += len(text)
        if total >= max_bytes:
            break
    return texts


def train_tokenizer(texts: List[str], vocab_size: int):
    """A byte-level BPE tokenizer trained offline, wrapped for transformers."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS], show_progress=False
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, eos_token=EOS, bos_token=EOS, unk_token=EOS
    )


@dataclass
class TrajectoryConfig:
    """Settings of the trajectory maker; the defaults take about a minute on 2 CPU cores."""

    steps: int = 400  # optimizer steps
    save_every: int = 100  # a checkpoint every this many steps
    warmup: int = 40  # linear warmup steps, then a constant learning rate
    lr: float = 3e-3
    batch_size: int = 16
    seq_len: int = 128
    vocab_size: int = 2048
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    train_bytes: int = 4_000_000  # characters of training text
    save_dtype: str = "float32"  # dtype of the saved checkpoints ("bfloat16" is typical of LLMs)
    max_shard_size: Optional[str] = None  # e.g. "200KB" to save sharded safetensors
    seed: int = 0


def make_trajectory(
    out_dir: str | Path,
    cfg: TrajectoryConfig = TrajectoryConfig(),
    log: Callable[[str], None] = print,
) -> List[Path]:
    """Pretrain a small Llama on stdlib source and save `checkpoint-<step>/` directories.

    Also writes `heldout.jsonl` (held-out stdlib files, field "text"). Returns the checkpoint
    directories in step order.
    """
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one line per checkpoint is ours; no per-save bars
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    train_files, heldout_files = split_corpus(stdlib_files())
    texts = read_texts(train_files, cfg.train_bytes)
    log(f"corpus: {len(texts)} stdlib files for training, {len(heldout_files)} held out")
    write_heldout(out / "heldout.jsonl", heldout_files)

    tok = train_tokenizer(texts, cfg.vocab_size)
    ids = torch.tensor(tok(EOS.join(texts))["input_ids"], dtype=torch.long)
    log(f"tokenizer: {len(tok)} tokens; training stream {ids.numel():,} tokens")

    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=cfg.hidden_size, intermediate_size=cfg.hidden_size * 3,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads, max_position_embeddings=cfg.seq_len,
        tie_word_embeddings=True, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
    ))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup))
    gen = torch.Generator().manual_seed(cfg.seed)
    saved, start = [], time.perf_counter()
    model.train()
    for step in range(1, cfg.steps + 1):
        starts = torch.randint(0, ids.numel() - cfg.seq_len - 1, (cfg.batch_size,), generator=gen)
        batch = torch.stack([ids[s : s + cfg.seq_len] for s in starts.tolist()])  # (B, T)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % cfg.save_every == 0 or step == cfg.steps:
            path = out / f"checkpoint-{step}"
            save_checkpoint(model, tok, path, cfg)
            saved.append(path)
            elapsed = time.perf_counter() - start
            eta = elapsed / step * (cfg.steps - step)
            log(f"step {step}/{cfg.steps} loss {loss.item():.3f}, saved {path.name} "
                f"({elapsed:.0f}s elapsed, ETA {eta:.0f}s)")
    return saved


def save_checkpoint(model, tokenizer, path: Path, cfg: TrajectoryConfig) -> None:
    """Save in Hugging Face layout, in `cfg.save_dtype`, sharded if `cfg.max_shard_size`."""
    dtype = getattr(torch, cfg.save_dtype)
    kwargs = {"max_shard_size": cfg.max_shard_size} if cfg.max_shard_size else {}
    to_save = model if dtype == torch.float32 else _copy_in_dtype(model, dtype)
    to_save.save_pretrained(path, **kwargs)
    tokenizer.save_pretrained(path)


def _copy_in_dtype(model, dtype):
    import copy

    return copy.deepcopy(model).to(dtype)


def write_heldout(path: Path, files: List[Path], max_bytes: int = 2_000_000) -> Path:
    """Held-out stdlib files as jsonl with a "text" field."""
    with path.open("w", encoding="utf-8") as f:
        for text in read_texts(files, max_bytes):
            f.write(json.dumps({"text": text}) + "\n")
    return path


def run_demo(
    workdir: str | Path = "ckmerge_demo",
    trials: int = 8,
    max_concurrent: int = 2,
    cfg: TrajectoryConfig = TrajectoryConfig(),
    log: Callable[[str], None] = print,
):
    """Make (or reuse) the demo trajectory, then tune its last adjacent pair."""
    from ckmerge_ray.tuner import tune_merge

    if cfg.steps < 2 * cfg.save_every:
        from ckmerge_ray.errors import ConfigError

        raise ConfigError(f"the demo needs two checkpoints: steps ({cfg.steps}) must be at least "
                          f"2 × save_every ({cfg.save_every})")
    work = Path(workdir)
    start = time.perf_counter()
    ckpts = sorted(work.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    if len(ckpts) < 2 or not (work / "heldout.jsonl").exists():
        log(f"[demo] making a trajectory in {work} ...")
        ckpts = make_trajectory(work, cfg, log=lambda m: log(f"[demo] {m}"))
    else:
        log(f"[demo] reusing trajectory in {work}")
    earlier, later = ckpts[-2], ckpts[-1]
    log(f"[demo] tuning the merge of {earlier.name} and {later.name}")
    result = tune_merge(
        (earlier, later), {"cpu": 1}, objective=f"loss:{work / 'heldout.jsonl'}",
        objective_options={"seq_len": cfg.seq_len, "max_tokens": 16384},
        num_trials=trials, max_concurrent=max_concurrent, output_dir=work / "run", overwrite=True,
    )
    log(f"[demo] finished in {time.perf_counter() - start:.0f}s; results in {work / 'run'}")
    return result




def make_lmeval_tasks(heldout_jsonl: str | Path, out_dir: str | Path, docs: int = 200,
                      prefix: str = "ckmerge_stdlib") -> Path:
    """Write two local lm-eval tasks built from held-out text; returns the task directory.

    - `<prefix>_mc` (multiple choice, metric acc): which of four 30-character continuations
      follows a 200-character passage; the distractors are continuations of other passages.
    - `<prefix>_ppl` (loglikelihood_rolling, word/byte perplexity, bits per byte): each held-out
      document scored whole, like lm-eval's wikitext task.
    Pass the directory as `include_path` of an `LmEvalObjective`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    texts = [json.loads(line)["text"] for line in Path(heldout_jsonl).open(encoding="utf-8")]
    text = " ".join(texts)
    n = min(docs, len(text) // 400)
    rows = []
    for i in range(n):
        start = 400 * i
        context, follow = text[start:start + 200], text[start + 200:start + 230]
        others = [text[400 * ((i + k) % n) + 200:400 * ((i + k) % n) + 230] for k in (5, 11, 17)]
        label = i % 4
        rows.append({"context": context, "choices": others[:label] + [follow] + others[label:],
                     "label": label})
    (out / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    pages = [{"page": t[:4000]} for t in texts[:max(1, docs // 10)]]
    (out / "ppl.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pages), encoding="utf-8")
    common = "test_split: test\ndataset_path: json\n"
    (out / f"{prefix}_mc.yaml").write_text(
        f"task: {prefix}_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {out / 'mc.jsonl'}\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n",
        encoding="utf-8")
    (out / f"{prefix}_ppl.yaml").write_text(
        f"task: {prefix}_ppl\n{common}dataset_kwargs:\n  data_files:\n    test: {out / 'ppl.jsonl'}\n"
        'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{page}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
        "  - metric: bits_per_byte\n", encoding="utf-8")
    return out
