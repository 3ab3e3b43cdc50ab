"""Held-out loss: token-weighted mean negative log-likelihood of local text (lower is better).

The text is tokenized once on the driver with Θ(t)'s tokenizer and cut into fixed windows, so
every trial scores exactly the same tokens: same weights, same score.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from ckmerge_ray.errors import ObjectiveError
from ckmerge_ray.storage import is_uri
from ckmerge_ray.objectives.base import Objective, load_tokenizer
from ckmerge_ray.objectives.batching import (PeakMemory, Stopwatch, cpu_batch, fit_batch,
                                             free_cached, halving, is_oom)
from ckmerge_ray.objectives.chunked import (SplitModel, chunk_bytes, chunked_nll,
                                            full_logits_nll, split_model)

log = logging.getLogger(__name__)


def read_texts(path: Path | str, text_field: str = "text") -> List[str]:
    """Documents from a .jsonl (one object per line), .parquet (a column) or .txt (one
    document), on local disk or at a URI (`ckmerge_ray.storage`: s3://, gs://, ...)."""
    from ckmerge_ray.errors import CheckpointError
    from ckmerge_ray.storage import is_uri, locate

    try:
        location = locate(path, must_exist=False, what="held-out file")
        exists, is_file = location.exists(), location.isfile()
    except CheckpointError as e:  # an unreachable store, missing credentials, ...
        raise ObjectiveError(str(e)) from e
    if not exists:
        raise ObjectiveError(f"held-out file does not exist: {path}")
    if not is_file:
        raise ObjectiveError(f"held-out path is not a file: {path}")
    suffix = Path(location.name).suffix.lower()
    if suffix not in (".jsonl", ".parquet", ".txt"):
        raise ObjectiveError(f"held-out file must be .jsonl, .parquet or .txt, got {location.name}")
    data = location.read_bytes() if is_uri(path) else None
    try:
        if suffix == ".jsonl":
            text = data.decode("utf-8") if data is not None else \
                Path(path).read_text(encoding="utf-8")
            texts = _read_jsonl(text.splitlines(), path, text_field)
        elif suffix == ".parquet":
            texts = _read_parquet(path if data is None else _buffer(data), path, text_field)
        else:
            texts = [data.decode("utf-8") if data is not None else
                     Path(path).read_text(encoding="utf-8")]
    except UnicodeDecodeError as e:
        raise ObjectiveError(f"held-out file {path} is not UTF-8 text: {e}") from e
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ObjectiveError(f"held-out file {path} holds no text")
    return texts


def _buffer(data: bytes):
    import pyarrow as pa

    return pa.BufferReader(data)


def _read_jsonl(lines: List[str], path, text_field: str) -> List[str]:
    texts = []
    for lineno, line in enumerate(lines, 1):
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


def _read_parquet(source, path, text_field: str) -> List[str]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(source)
        names = parquet.schema_arrow.names
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for corrupt files
        raise ObjectiveError(f"cannot read parquet file {path}: {e}") from e
    if text_field not in names:
        raise ObjectiveError(
            f"{path} has no column {text_field!r} (columns: {names}); "
            "set text_field / --text-field"
        )
    column = parquet.read(columns=[text_field]).column(text_field)
    return [t for t in column.to_pylist() if t is not None]


class HeldoutLoss(Objective):
    """Mean next-token NLL (nats per token) of the model on held-out text; also reports perplexity.

    Memory does not grow with the vocabulary: the model body runs once per batch, then the output
    head and a running log-sum-exp run over slices of the vocabulary, 64 MiB of fp32 logits at a
    time on CPU, 1 GiB on a GPU (`ckmerge_ray.objectives.chunked`, which says which architectures
    split and which fall back to the full logits). The score is the same as through the full
    logits, to fp32 round-off.

    Args:
        path: a .jsonl, .parquet or .txt file.
        text_field: the JSON field or parquet column holding the text (default "text").
        seq_len: tokens per window (default 512); windows do not overlap and do not see each
            other, so the first token of each window is not scored.
        max_tokens: about this many tokens are scored (default 65536; whole windows of
            seq_len - 1 scored tokens, rounded up), taken from the start of the file, so that
            each trial costs the same. Less than one window is refused.
        batch_size: windows per forward pass. Default None: on a GPU, as many as the free memory
            holds, measured on the worker's first trial and kept for the run; on CPU,
            4096 tokens' worth (8 windows of 512). Either way, a pass that runs out of memory
            halves the batch and starts the evaluation over (each size once), and later trials
            on the worker keep the size that worked.
        full_logits: score through the model's full (batch, seq_len, vocab) logits, as before
            the chunked path existed (default False; models that do not split use it anyway).

    Each result also holds the evaluation's cost: ``eval_tokens``, ``eval_seconds``,
    ``eval_tokens_per_s``, ``eval_peak_mem_mb`` (memory above what was in use when the
    evaluation began; `ckmerge_ray.objectives.batching.PeakMemory`), ``eval_batch_size`` and
    ``eval_path`` ("chunked" or "full").
    """

    mode = "min"
    name = "loss"

    def __init__(
        self,
        path: str | Path,
        text_field: str = "text",
        seq_len: int = 512,
        max_tokens: int = 65536,
        batch_size: Optional[int] = None,
        full_logits: bool = False,
    ):
        if seq_len < 2:
            raise ObjectiveError(f"seq_len must be at least 2, got {seq_len}")
        if max_tokens < 2:
            raise ObjectiveError(f"max_tokens must be at least 2, got {max_tokens}")
        if batch_size is not None and batch_size < 1:
            raise ObjectiveError(f"batch_size must be positive, got {batch_size}")
        self.path = path if is_uri(path) else Path(path)
        self.text_field = text_field
        self.seq_len = seq_len
        self.max_tokens = max_tokens
        self.batch_size = batch_size
        self.full_logits = bool(full_logits)
        self.windows: Optional[np.ndarray] = None  # (n_windows, seq_len) token ids, set by prepare
        self._reset_worker_state()

    def _reset_worker_state(self) -> None:
        # Set on the worker by the first evaluate and kept for its later trials (not pickled).
        # (model id, class, config) -> the post-head step its split was checked with, or None
        # for the full-logits path. Names only: holding the model's modules would keep it alive.
        self._splits: Dict[Tuple[int, str, str], Optional[str]] = {}
        self._batch: Optional[int] = self.batch_size  # the size that worked last

    def __getstate__(self) -> Dict:
        state = dict(self.__dict__)
        state.update(_splits={}, _batch=self.batch_size)
        return state

    def __repr__(self) -> str:
        return f"HeldoutLoss({str(self.path)!r}, seq_len={self.seq_len}, max_tokens={self.max_tokens})"

    def prepare(self, tokenizer_dir: Path) -> None:
        """Tokenize the text with the checkpoint's tokenizer and cut it into windows."""
        texts = read_texts(self.path, self.text_field)
        tok = load_tokenizer(tokenizer_dir, self.trust_remote_code, "held-out loss")
        self.windows = make_windows(texts, tok, self.seq_len, self.max_tokens)

    def evaluate(self, model: torch.nn.Module, device: torch.device) -> Dict[str, float]:
        if self.windows is None:
            raise ObjectiveError("HeldoutLoss.evaluate called before prepare")
        device = torch.device(device)
        windows = self.windows
        with Stopwatch(device) as clock, PeakMemory(device) as peak, torch.inference_mode():
            split = self._split_for(model, device)
            budget = chunk_bytes(device.type)

            def nll_of(n_start: int, n_end: int) -> torch.Tensor:
                ids = torch.from_numpy(windows[n_start:n_end]).to(device)  # (B, T)
                return chunked_nll(split, ids, budget) if split else full_logits_nll(model, ids)

            def run(batch: int) -> float:
                total = torch.zeros((), dtype=torch.float64, device=device)
                for start in range(0, len(windows), batch):
                    total += nll_of(start, start + batch)
                return float(total)

            if self._batch is None:
                self._batch = self._first_batch(lambda n: nll_of(0, n), device)
            nll, self._batch = halving(run, self._batch, device, "held-out loss")
        count = int(windows.shape[0] * (windows.shape[1] - 1))
        mean = nll / count
        return {"score": mean, "loss": mean, "perplexity": math.exp(mean), "tokens": count,
                "eval_tokens": count, "eval_seconds": clock.seconds,
                "eval_tokens_per_s": count / max(clock.seconds, 1e-9),
                "eval_peak_mem_mb": peak.mb, "eval_batch_size": self._batch,
                "eval_path": "chunked" if split else "full"}

    def _split_for(self, model: torch.nn.Module, device: torch.device) -> Optional[SplitModel]:
        """The model split for the chunked loss, checked once per model on this worker; None
        (the full-logits path) when it does not split or `full_logits` is set."""
        if self.full_logits:
            return None
        config = getattr(model, "config", None)
        key = (id(model), type(model).__name__, config.to_json_string() if config else "")
        if key in self._splits:
            post = self._splits[key]
            return split_model(model, None, post_name=post)[0] if post is not None else None
        split, why = split_model(model, torch.from_numpy(self.windows[:1]).to(device))
        if split is None:
            log.warning("held-out loss through the full logits: %s", why)
        self._splits = {key: split.post_name if split else None}  # one model per worker
        return split

    def _first_batch(self, run: Callable[[int], object], device: torch.device) -> int:
        n = len(self.windows)
        if device.type != "cuda":
            return min(n, cpu_batch(self.seq_len))
        if n < 2:
            return 1
        try:
            return fit_batch(run, device, limit=n)
        except Exception as e:  # noqa: BLE001 - out of memory at 1-2 windows: let halving say so
            if not is_oom(e):
                raise
        free_cached(device)
        return 1


def make_windows(texts: List[str], tokenizer, seq_len: int, max_tokens: int) -> np.ndarray:
    """Token ids of the documents, joined by EOS, cut into (n, seq_len) windows; deterministic.
    n covers `max_tokens` scored tokens, rounded up to whole windows."""
    if max_tokens < seq_len - 1:
        raise ObjectiveError(
            f"max_tokens={max_tokens} is less than one window of seq_len={seq_len} "
            f"({seq_len - 1} scored tokens): raise max_tokens to at least {seq_len - 1}, or "
            f"lower seq_len to at most {max_tokens + 1}")
    eos = tokenizer.eos_token_id
    stream: List[int] = []
    # +1 per window because the first token of a window is context, not scored.
    needed = max_tokens + max_tokens // max(seq_len - 1, 1) + seq_len
    chars = text_tokens = 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        chars, text_tokens = chars + len(text), text_tokens + len(ids)
        stream.extend(ids)
        if eos is not None:
            stream.append(eos)
        if len(stream) >= needed:
            break
    if chars and not text_tokens:
        raise ObjectiveError(
            f"the tokenizer ({type(tokenizer).__name__}, {len(tokenizer)} entries) turned "
            f"{chars} characters of held-out text into no tokens: is it the training run's "
            "tokenizer?")
    n_windows = min(len(stream) // seq_len, math.ceil(max_tokens / (seq_len - 1)))
    if n_windows == 0:
        raise ObjectiveError(
            f"held-out text has {len(stream)} tokens, fewer than one window of seq_len={seq_len}; "
            "use more text or a smaller seq_len"
        )
    return np.asarray(stream[: n_windows * seq_len], dtype=np.int64).reshape(n_windows, seq_len)
