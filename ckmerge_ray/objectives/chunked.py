"""Next-token NLL without the full logits: the model body once, then the output head and the
cross-entropy over chunks of positions, so memory does not grow with the vocabulary.

A causal LM's forward is ``logits = post(head(body(ids).last_hidden_state))``. Materialized at
once, the logits of a batch are (B, T, V) in the model's dtype plus an fp32 copy: at 8 x 4096
tokens and a 128k vocabulary that is 17 GB of fp32 alone. Here the head and the loss see at most
`chunk` positions at a time, a (chunk, V) block sized from a byte budget, and the NLL sum
accumulates in fp64 across chunks (each chunk's cross-entropy sums in fp32, as before).

How the model is split (`split_model`):

- head: ``model.get_output_embeddings()`` (GPT-2's tied head included);
- body: ``model.base_model`` (``model.model``, ``model.transformer``, ``model.gpt_neox``, ...),
  called with ``use_cache=False``; its ``last_hidden_state`` is what the head reads;
- post: the elementwise step some architectures apply after the head, taken from the model:
  ``config.final_logit_softcapping`` (Gemma 2/3/4: ``tanh(x / c) * c``), a ``logit_scale``
  attribute or config field (Cohere: ``x * s``), ``config.logits_scaling`` (Granite divides,
  HyperCLOVA X multiplies: both are tried), ``model.model.lm_head_multiplier`` (Falcon-H1:
  ``x * m``); applied in the model's dtype, in the same order as its forward.

The split is checked once per model against the model's own forward on a short prefix of real
tokens: the candidate post steps are tried, the ones the config names first, and the first whose
logits agree with ``model(ids).logits`` (to round-off of the model's dtype) is used. When none
agrees, or the model has no separable head or body (no ``get_output_embeddings``, no base model,
a body that does not return ``last_hidden_state``, a forward that does anything else between body
and head), the caller falls back to the full-logits path (`full_logits_nll`), which is exact for
any model and as memory-hungry as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F

#: Bytes of fp32 logits one head chunk may hold, per device type (the head's own output and the
#: cross-entropy's log-softmax add about two more blocks of this size). Each chunk reads the whole
#: head matrix (vocab x hidden), so a chunk must be long enough for the matmul to be compute-bound:
#: on a GPU, 1 GiB is 2048 positions at 128k (about 1000 FLOP per byte of a bf16 head); on CPU,
#: 64 MiB is 512 positions at 32k, 128 at 128k. The peak is bounded by the budget, not by the
#: vocabulary or the batch.
HEAD_CHUNK_BYTES = {"cuda": 2**30, "cpu": 64 * 2**20}
PROBE_TOKENS = 64  # tokens of the first window the split is checked on


@dataclass
class SplitModel:
    """A causal LM cut into body -> head -> post, checked against its own forward."""

    body: torch.nn.Module
    head: torch.nn.Module
    post: Callable[[torch.Tensor], torch.Tensor]
    post_name: str  # "none", "softcap(30.0)", "scale(0.0625)", ... for logs and the row
    vocab: int


def chunk_positions(vocab: int, device_type: str = "cpu", budget_bytes: Optional[int] = None) -> int:
    """Positions per head chunk: the most whose fp32 logits fit in `budget_bytes` (default
    HEAD_CHUNK_BYTES for the device type; the CPU's for other devices)."""
    if budget_bytes is None:
        budget_bytes = HEAD_CHUNK_BYTES.get(device_type, HEAD_CHUNK_BYTES["cpu"])
    return max(1, budget_bytes // (4 * vocab))


def full_logits_nll(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Sum of next-token NLLs over a (B, T) batch through the model's full (B, T, V) logits: the
    path every model supports, kept as the fallback (and what ckmerge-ray did before)."""
    logits = model(input_ids=ids, use_cache=False).logits.float()  # (B, T, V)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1),
                           reduction="sum").double()


def chunked_nll(split: SplitModel, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """Sum of next-token NLLs over a (B, T) batch, the head applied `chunk` positions at a time."""
    hidden = split.body(input_ids=ids, use_cache=False).last_hidden_state  # (B, T, H)
    h = hidden[:, :-1].reshape(-1, hidden.size(-1))  # (B*(T-1), H): a copy, H/V of one logit row
    del hidden
    targets = ids[:, 1:].reshape(-1)  # (B*(T-1),)
    total = torch.zeros((), dtype=torch.float64, device=ids.device)
    for start in range(0, h.size(0), chunk):
        logits = split.post(split.head(h[start:start + chunk]))  # (chunk, V), model dtype
        total += F.cross_entropy(logits.float(), targets[start:start + chunk], reduction="sum")
        del logits
    return total


def _post_candidates(model: torch.nn.Module) -> List[Tuple[str, Callable]]:
    """Post-head steps this model's config or attributes suggest, most specific first; the
    identity last."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "get_text_config", lambda: cfg)() if cfg is not None else None
    out: List[Tuple[str, Callable]] = []
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap:
        cap = float(cap)
        out.append((f"softcap({cap:g})", lambda x: torch.tanh(x / cap) * cap))
    for source in (model, cfg):
        scale = getattr(source, "logit_scale", None)
        if isinstance(scale, (int, float)) and not isinstance(scale, bool):
            s = float(scale)
            out.append((f"scale({s:g})", lambda x: x * s))
            break
    scaling = getattr(cfg, "logits_scaling", None)
    if isinstance(scaling, (int, float)) and not isinstance(scaling, bool) and scaling:
        s = float(scaling)
        out.append((f"divide({s:g})", lambda x: x / s))
        out.append((f"scale({s:g})", lambda x: x * s))
    multiplier = getattr(getattr(model, "base_model", None), "lm_head_multiplier", None)
    if isinstance(multiplier, (int, float)) and not isinstance(multiplier, bool):
        m = float(multiplier)
        out.append((f"scale({m:g})", lambda x: x * m))
    out.append(("none", lambda x: x))
    return out


def split_model(model: torch.nn.Module, probe_ids: torch.Tensor) -> Tuple[Optional[SplitModel], str]:
    """The model cut into body, head and post step, checked on `probe_ids` (1, t) against
    ``model(probe_ids).logits``; or (None, why not) when it cannot be split faithfully."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        return None, f"{type(model).__name__} exposes no output head (get_output_embeddings)"
    body = getattr(model, "base_model", model)
    if body is model:
        return None, f"{type(model).__name__} has no base model separate from its head"
    probe_ids = probe_ids[:, :PROBE_TOKENS]
    try:
        reference = model(input_ids=probe_ids, use_cache=False).logits  # (1, t, V)
        hidden = body(input_ids=probe_ids, use_cache=False).last_hidden_state  # (1, t, H)
        raw = head(hidden)
    except Exception as e:  # noqa: BLE001 - any failure means: this model does not split so
        return None, f"{type(model).__name__} does not split into body and head ({e!r:.200})"
    if raw.shape != reference.shape:
        return None, f"head output {tuple(raw.shape)} differs from the logits {tuple(reference.shape)}"
    ref = reference.float()
    # Agreement to the round-off of the model's dtype: the same kernels on the same rows, only
    # the head's matmul may block differently.
    tol = (1e-5 if ref.dtype == reference.dtype else 2e-2) * (1.0 + float(ref.abs().max()))
    tried = []
    for name, post in _post_candidates(model):
        err = float((post(raw).float() - ref).abs().max())
        if err <= tol:
            return SplitModel(body, head, post, name, int(reference.size(-1))), "ok"
        tried.append(f"{name}: {err:.3g}")
    return None, (f"{type(model).__name__}'s logits match no known post-head step "
                  f"(max abs error {', '.join(tried)}; tolerance {tol:.3g})")
