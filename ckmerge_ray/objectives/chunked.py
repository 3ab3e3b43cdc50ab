"""Next-token NLL without the full logits: the model body once, then the output head and the
loss over bounded blocks of logits, so memory does not grow with the vocabulary.

A causal LM's forward is ``logits = post(head(body(ids).last_hidden_state))``. Materialized at
once, the logits of a batch are (B, T, V) in the model's dtype plus an fp32 copy: at 8 x 4096
tokens and a 128k vocabulary that is 17 GB of fp32 alone. Here the head and the loss see at most
a fixed number of bytes of logits at a time (`HEAD_CHUNK_BYTES`): for a plain ``nn.Linear`` head
(every architecture above), all positions against a slice of the vocabulary, with a running
log-sum-exp in fp32, so the head's weight is read once per batch; for any other head module
(a quantized linear layer, say), a few positions against the whole vocabulary through
`cross_entropy`. The NLL sum is returned in fp64.

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

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F

#: Bytes of fp32 logits one chunk may hold, per device type (a bf16 model's head output adds half
#: a block, the positions path's log-softmax one more). On a GPU, 1 GiB is 8k vocabulary columns
#: for 32k positions (8 windows of 4096), or 2048 positions at 128k; on CPU, 64 MiB. The peak is
#: bounded by the budget, not by the vocabulary.
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


def chunk_bytes(device_type: str = "cpu") -> int:
    """HEAD_CHUNK_BYTES for the device type (the CPU's for other devices)."""
    return HEAD_CHUNK_BYTES.get(device_type, HEAD_CHUNK_BYTES["cpu"])


def full_logits_nll(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Sum of next-token NLLs over a (B, T) batch through the model's full (B, T, V) logits: the
    path every model supports, kept as the fallback (and what ckmerge-ray did before)."""
    logits = model(input_ids=ids, use_cache=False).logits.float()  # (B, T, V)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1),
                           reduction="sum").double()


def chunked_nll(split: SplitModel, ids: torch.Tensor, budget_bytes: int,
                by: Optional[str] = None) -> torch.Tensor:
    """Sum of next-token NLLs over a (B, T) batch, never more than `budget_bytes` of fp32 logits
    at a time.

    `by` "vocab" (the default for a linear head): every position against one slice of the
    vocabulary at a time, with a running log-sum-exp, so the head's weight is read once per
    batch. "positions" (the default for other heads): the whole vocabulary for a few positions
    at a time; each chunk reads the whole head, which costs up to 1.4x the plain loop's time on
    CPU at a 256k vocabulary (BENCHMARKS.md, "Evaluation throughput").
    """
    hidden = split.body(input_ids=ids, use_cache=False).last_hidden_state  # (B, T, H)
    h = hidden[:, :-1].reshape(-1, hidden.size(-1))  # (N, H), N = B*(T-1): a copy, H/V of a row
    del hidden
    targets = ids[:, 1:].reshape(-1)  # (N,)
    if by is None:
        # exactly nn.Linear: a subclass (quantized layers are) may not compute F.linear
        by = "vocab" if type(split.head) is torch.nn.Linear else "positions"
    if by == "vocab":
        return _nll_by_vocab(split, h, targets, max(1, budget_bytes // (4 * h.size(0))))
    chunk = max(1, budget_bytes // (4 * split.vocab))
    total = torch.zeros((), dtype=torch.float64, device=ids.device)
    for start in range(0, h.size(0), chunk):
        logits = split.post(split.head(h[start:start + chunk]))  # (chunk, V), model dtype
        total += F.cross_entropy(logits.float(), targets[start:start + chunk], reduction="sum")
        del logits
    return total


def _nll_by_vocab(split: SplitModel, h: torch.Tensor, targets: torch.Tensor,
                  cols: int) -> torch.Tensor:
    """NLL sum of all N positions, `cols` vocabulary entries at a time (a linear head):
    log-sum-exp kept as a running (max, sum of exp) per position, in fp32."""
    weight, bias = split.head.weight, split.head.bias  # (V, H), (V,) or None
    n = h.size(0)
    run_max = torch.full((n,), -math.inf, dtype=torch.float32, device=h.device)
    run_sum = torch.zeros(n, dtype=torch.float32, device=h.device)
    picked = torch.zeros(n, dtype=torch.float32, device=h.device)  # the target's logit
    rows = torch.arange(n, device=h.device)
    for v0 in range(0, weight.size(0), cols):
        z = F.linear(h, weight[v0:v0 + cols], None if bias is None else bias[v0:v0 + cols])
        z = split.post(z).float()  # (N, cols); post in the model's dtype, as its forward does
        inside = (targets >= v0) & (targets < v0 + z.size(1))
        picked[inside] = z[rows[inside], targets[inside] - v0]
        new_max = torch.maximum(run_max, z.amax(dim=1))
        run_sum = run_sum * torch.exp(run_max - new_max) + z.sub_(new_max[:, None]).exp_().sum(1)
        run_max = new_max
        del z
    return (run_max + run_sum.log() - picked).sum(dtype=torch.float64)


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


def split_model(model: torch.nn.Module, probe_ids: torch.Tensor,
                post_name: Optional[str] = None) -> Tuple[Optional[SplitModel], str]:
    """The model cut into body, head and post step, checked on `probe_ids` (1, t) against
    ``model(probe_ids).logits``; or (None, why not) when it cannot be split faithfully.

    With `post_name` (a `SplitModel.post_name` an earlier call found for this model), the
    parts are looked up again without the check: callers cache the name, not the modules, so
    that no cache keeps a model alive.
    """
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        return None, f"{type(model).__name__} exposes no output head (get_output_embeddings)"
    body = getattr(model, "base_model", model)
    if body is model:
        return None, f"{type(model).__name__} has no base model separate from its head"
    if post_name is not None:
        post = dict(_post_candidates(model)).get(post_name)
        if post is None:
            return None, f"{type(model).__name__} has no post-head step {post_name!r}"
        return SplitModel(body, head, post, post_name, int(head.weight.shape[0])), "ok"
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
