"""Held-out loss: token-weighted mean negative log-likelihood of local text (lower is better).

The text is tokenized once on the driver with Θ(t)'s tokenizer and cut into fixed windows, so
every trial scores exactly the same tokens: same weights, same score.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from ckmerge_ray.errors import ObjectiveError
from ckmerge_ray.objectives.base import Objective


def read_texts(path: Path, text_field: str = "text") -> List[str]:
    """Documents from a .jsonl (one object per line), .parquet (a column) or .txt (one document)."""
    if not path.exists():
        raise ObjectiveError(f"held-out file does not exist: {path}")
    if not path.is_file():
        raise ObjectiveError(f"held-out path is not a file: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            texts = _read_jsonl(path, text_field)
        elif suffix == ".parquet":
            texts = _read_parquet(path, text_field)
        elif suffix == ".txt":
            texts = [path.read_text(encoding="utf-8")]
        else:
            raise ObjectiveError(
                f"held-out file must be .jsonl, .parquet or .txt, got {path.name}"
            )
    except UnicodeDecodeError as e:
        raise ObjectiveError(f"held-out file {path} is not UTF-8 text: {e}") from e
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ObjectiveError(f"held-out file {path} holds no text")
    return texts


def _read_jsonl(path: Path, text_field: str) -> List[str]:
    texts = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ObjectiveError(f"{path}:{lineno} is not valid JSON: {e}") from e
            if not isinstance(row, dict) or text_field not in row:
                keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise ObjectiveError(
                    f"{path}:{lineno} has no text field {text_field!r} (fields: {keys}); "
                    "set text_field / --text-field"
                )
            texts.append(str(row[text_field]))
    return texts


def _read_parquet(path: Path, text_field: str) -> List[str]:
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for corrupt files
        raise ObjectiveError(f"cannot read parquet file {path}: {e}") from e
    if text_field not in schema.names:
        raise ObjectiveError(
            f"{path} has no column {text_field!r} (columns: {schema.names}); "
            "set text_field / --text-field"
        )
    column = pq.read_table(path, columns=[text_field]).column(text_field)
    return [t for t in column.to_pylist() if t is not None]


class HeldoutLoss(Objective):
    """Mean next-token NLL (nats per token) of the model on held-out text; also reports perplexity.

    Args:
        path: a .jsonl, .parquet or .txt file.
        text_field: the JSON field or parquet column holding the text (default "text").
        seq_len: tokens per window (default 512); windows do not overlap and do not see each
            other, so the first token of each window is not scored.
        max_tokens: at most this many tokens are scored (default 65536), taken from the start of
            the file, so that each trial costs the same.
        batch_size: windows per forward pass (default 8).
    """

    mode = "min"
    name = "loss"

    def __init__(
        self,
        path: str | Path,
        text_field: str = "text",
        seq_len: int = 512,
        max_tokens: int = 65536,
        batch_size: int = 8,
    ):
        if seq_len < 2:
            raise ObjectiveError(f"seq_len must be at least 2, got {seq_len}")
        if max_tokens < 2:
            raise ObjectiveError(f"max_tokens must be at least 2, got {max_tokens}")
        if batch_size < 1:
            raise ObjectiveError(f"batch_size must be positive, got {batch_size}")
        self.path = Path(path)
        self.text_field = text_field
        self.seq_len = seq_len
        self.max_tokens = max_tokens
        self.batch_size = batch_size
        self.windows: Optional[np.ndarray] = None  # (n_windows, seq_len) token ids, set by prepare

    def __repr__(self) -> str:
        return f"HeldoutLoss({str(self.path)!r}, seq_len={self.seq_len}, max_tokens={self.max_tokens})"

    def prepare(self, tokenizer_dir: Path) -> None:
        """Tokenize the text with the checkpoint's tokenizer and cut it into windows."""
        from transformers import AutoTokenizer

        texts = read_texts(self.path, self.text_field)
        try:
            tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), trust_remote_code=False)
        except Exception as e:
            raise ObjectiveError(f"cannot load a tokenizer from {tokenizer_dir}: {e}") from e
        self.windows = make_windows(texts, tok, self.seq_len, self.max_tokens)

    def evaluate(self, model: torch.nn.Module, device: torch.device) -> Dict[str, float]:
        if self.windows is None:
            raise ObjectiveError("HeldoutLoss.evaluate called before prepare")
        nll, count = 0.0, 0
        with torch.inference_mode():
            for start in range(0, len(self.windows), self.batch_size):
                ids = torch.from_numpy(self.windows[start : start + self.batch_size]).to(device)
                logits = model(input_ids=ids).logits.float()  # (B, T, V)
                loss = torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.size(-1)),
                    ids[:, 1:].reshape(-1),
                    reduction="sum",
                )
                nll += float(loss)
                count += ids[:, 1:].numel()
        mean = nll / count
        return {"score": mean, "loss": mean, "perplexity": math.exp(mean), "tokens": count}


def make_windows(texts: List[str], tokenizer, seq_len: int, max_tokens: int) -> np.ndarray:
    """Token ids of the documents, joined by EOS, cut into (n, seq_len) windows; deterministic."""
    eos = tokenizer.eos_token_id
    stream: List[int] = []
    # +1 per window because the first token of a window is context, not scored.
    needed = max_tokens + max_tokens // max(seq_len - 1, 1) + seq_len
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
        if len(stream) >= needed:
            break
    n_windows = min(len(stream) // seq_len, math.ceil(max_tokens / (seq_len - 1)))
    if n_windows == 0:
        raise ObjectiveError(
            f"held-out text has {len(stream)} tokens, fewer than one window of seq_len={seq_len}; "
            "use more text or a smaller seq_len"
        )
    return np.asarray(stream[: n_windows * seq_len], dtype=np.int64).reshape(n_windows, seq_len)
