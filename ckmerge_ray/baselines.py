"""The merges tuned λ is compared with: checkpoint averages, soups, Fisher and RegMean.

Each baseline is a recipe over the same stored checkpoints a tuning run uses: a weight per
checkpoint (uniform soup, SMA, EMA, WMA, greedy soup), or per-tensor statistics computed on a
bounded number of tokens and then a closed-form merge (Fisher-weighted averaging, RegMean).
Everything here is plain torch on one model; `evaluator.MergeEvaluator` runs it next to the
object store and scores the result with the run's objective. Grid and random search over λ
live in `compare.py`: they are λ values, not recipes.

Checkpoints are ordered oldest first; weights are listed in that order and sum to 1.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

# --- Checkpoint averages: one weight per checkpoint --------------------------------------------


def uniform_weights(n: int) -> List[float]:
    """Uniform soup: the plain mean of all n checkpoints. Extra cost: none (one evaluation)."""
    _check_count(n)
    return [1.0 / n] * n


def sma_weights(n: int, last: Optional[int] = None) -> List[float]:
    """Simple moving average of the last `last` checkpoints (LAWA; PMA's SMA), zero before them.
    Extra cost: none (one evaluation)."""
    last = window_length(n, last)
    return [0.0] * (n - last) + [1.0 / last] * last


def ema_weights(n: int, alpha: float = 0.5, last: Optional[int] = None) -> List[float]:
    """Exponential moving average over the last `last` checkpoints, oldest first:
    EMA₁ = Θ₁, EMAᵢ = α·Θᵢ + (1-α)·EMAᵢ₋₁ (PMA's EMA), so the newest gets α and the oldest
    (1-α)^(last-1). Extra cost: none (one evaluation)."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"EMA alpha must be in (0, 1], got {alpha}")
    last = window_length(n, last)
    w = [(1 - alpha) ** (last - 1)] + [alpha * (1 - alpha) ** (last - 1 - i) for i in range(1, last)]
    return [0.0] * (n - last) + w


def wma_weights(n: int, last: Optional[int] = None) -> List[float]:
    """Weighted moving average over the last `last` checkpoints, weights 1, 2, ..., last
    normalized (PMA's WMA). Extra cost: none (one evaluation)."""
    last = window_length(n, last)
    total = last * (last + 1) / 2
    return [0.0] * (n - last) + [(i + 1) / total for i in range(last)]


def one_hot_weights(i: int, n: int) -> List[float]:
    """Checkpoint i (0-based, oldest first) alone, as weights over n checkpoints."""
    return [1.0 if j == i else 0.0 for j in range(n)]


def _check_count(n: int) -> None:
    if n < 1:
        raise ValueError(f"need at least one checkpoint, got {n}")


def window_length(n: int, last: Optional[int]) -> int:
    """`last` (default n) checked to lie in [1, n]: the newest checkpoints an average spans."""
    _check_count(n)
    last = n if last is None else last
    if not 1 <= last <= n:
        raise ValueError(f"last must be in [1, {n}] (the checkpoints given), got {last}")
    return last


# --- Greedy soup --------------------------------------------------------------------------------


def greedy_soup(
    individual_scores: Sequence[float],
    score_soup: Callable[[List[float]], float],
    mode: str,
) -> Tuple[List[int], float, int]:
    """Greedy soup (Wortsman et al., 2022): visit checkpoints from best to worst own score and
    keep each one whose addition to the uniform average does not make the score worse.

    Starts from the best single checkpoint, so the result is never worse than it.
    Extra cost: one evaluation per checkpoint alone, plus one per candidate soup (n - 1).

    Args:
        individual_scores: each checkpoint's own score, oldest first.
        score_soup: scores the merge with the given per-checkpoint weights.
        mode: "min" or "max".

    Returns:
        (members, score, soups evaluated): member indices in checkpoint order.
    """
    better = (lambda a, b: a <= b) if mode == "min" else (lambda a, b: a >= b)
    order = sorted(range(len(individual_scores)), key=lambda i: individual_scores[i],
                   reverse=(mode == "max"))
    members, best = [order[0]], float(individual_scores[order[0]])
    evaluated = 0
    for i in order[1:]:
        candidate = sorted(members + [i])
        score = float(score_soup(members_to_weights(candidate, len(individual_scores))))
        evaluated += 1
        if math.isfinite(score) and better(score, best):
            members, best = candidate, score
    return sorted(members), best, evaluated


def members_to_weights(members: Sequence[int], n: int) -> List[float]:
    """Uniform weights over `members`, zero elsewhere."""
    return [1.0 / len(members) if i in members else 0.0 for i in range(n)]


# --- Statistics on a bounded number of tokens ---------------------------------------------------


def float_parameters(model: torch.nn.Module) -> Dict[str, torch.nn.Parameter]:
    """The model's float parameters by name, each once (a tied weight under its first name)."""
    return {n: p for n, p in model.named_parameters() if p.is_floating_point()}


def diagonal_fisher(
    model: torch.nn.Module, windows: np.ndarray, device: torch.device | str = "cpu"
) -> Dict[str, torch.Tensor]:
    """Empirical diagonal Fisher of the next-token loss, E[g²], one window at a time.

    Each window is one example: its gradient is squared and averaged over windows (a batch
    gradient would square a mean and lose most of the Fisher's mass). Returned in fp32.
    Cost: one forward and one backward pass per window; memory: the gradients plus one fp32
    accumulator per parameter.
    """
    params = float_parameters(model)
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    flags = {n: p.requires_grad for n, p in params.items()}
    was_training = model.training
    model.eval()
    try:
        for p in params.values():
            p.requires_grad_(True)
        for row in windows:
            ids = torch.as_tensor(row, device=device).unsqueeze(0)
            model.zero_grad(set_to_none=True)
            logits = model(input_ids=ids).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
            loss.backward()
            for n, p in params.items():
                if p.grad is not None:
                    fisher[n].add_(p.grad.float().square())
    finally:
        model.zero_grad(set_to_none=True)
        for n, p in params.items():
            p.requires_grad_(flags[n])
        model.train(was_training)
    for f in fisher.values():
        f.div_(max(len(windows), 1))
    return fisher


def regmean_linears(model: torch.nn.Module) -> Dict[str, torch.nn.Linear]:
    """The linear layers RegMean merges, by the state-dict name of their weight. A linear whose
    weight is tied to another module (an output head sharing the embedding) is left to plain
    averaging: its Gram matrix would describe only one of its two uses."""
    counts: Dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    return {
        f"{name}.weight": m for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and counts.get(id(m.weight), 0) == 1
    }


def linear_input_grams(
    model: torch.nn.Module, windows: np.ndarray, device: torch.device | str = "cpu",
    batch_size: int = 8,
) -> Dict[str, torch.Tensor]:
    """Gram matrices XᵀX / tokens of every RegMean linear layer's inputs, in fp32.

    Cost: one forward pass over the windows; memory: an (in × in) fp32 matrix per linear layer.
    """
    linears = regmean_linears(model)
    grams = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float32, device=device)
             for n, m in linears.items()}
    tokens = {"n": 0}

    def hook_for(name):
        def hook(module, args):
            x = args[0].detach().reshape(-1, module.in_features).float()
            grams[name].addmm_(x.T, x)
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in linears.items()]
    try:
        with torch.inference_mode():
            for start in range(0, len(windows), batch_size):
                ids = torch.as_tensor(windows[start:start + batch_size], device=device)
                model(input_ids=ids)
                tokens["n"] += ids.numel()
    finally:
        for h in handles:
            h.remove()
    for g in grams.values():
        g.div_(max(tokens["n"], 1))
    return grams


# --- Closed-form merges from the statistics -----------------------------------------------------


def fisher_merge(
    params: Sequence[Mapping[str, torch.Tensor]],
    fishers: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    floor: float = 1e-6,
) -> Dict[str, torch.Tensor]:
    """Fisher-weighted averaging (Matena & Raffel, 2022): per element
    Θ* = Σ wᵢ Fᵢ Θᵢ / Σ wᵢ Fᵢ, with Fᵢ floored at `floor` so that elements no token touched
    fall back to the weighted average. Returned in fp32 (the caller rounds once)."""
    out = {}
    for name in params[0]:
        num = torch.zeros_like(fishers[0][name])
        den = torch.zeros_like(fishers[0][name])
        for p, f, w in zip(params, fishers, weights):
            fw = f[name].clamp_min(floor).mul(w)
            num.add_(fw * p[name].float())
            den.add_(fw)
        out[name] = num.div_(den)
    return out


def regmean_merge(
    weights_list: Sequence[torch.Tensor],
    grams: Sequence[torch.Tensor],
    coeffs: Sequence[float],
    alpha: float = 0.9,
    ridge: float = 1e-6,
) -> torch.Tensor:
    """RegMean (Jin et al., 2023) for one linear layer y = x Wᵀ: the W minimizing
    Σ cᵢ‖Xᵢ Wᵀ - Xᵢ Wᵢᵀ‖², i.e. W* = (Σ cᵢ Wᵢ Gᵢ)(Σ cᵢ Gᵢ)⁻¹ with Gᵢ = XᵢᵀXᵢ.

    The off-diagonal entries of each Gram are scaled by `alpha` (the paper's regularization;
    alpha = 1 is the exact least-squares merge, alpha = 0 a per-input-channel weighted mean),
    and a ridge of `ridge` × the mean diagonal keeps the solve well posed when some input
    directions carry no signal. Returned in fp32.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"RegMean alpha must be in [0, 1], got {alpha}")
    num, den = None, None
    for w, g, c in zip(weights_list, grams, coeffs):
        g = g.float()
        g = alpha * g + (1 - alpha) * torch.diag_embed(torch.diagonal(g))
        term_num, term_den = c * (w.float() @ g), c * g
        num = term_num if num is None else num.add_(term_num)
        den = term_den if den is None else den.add_(term_den)
    scale = float(torch.diagonal(den).mean()) or 1.0
    den.diagonal().add_(ridge * scale)
    # W* den = num  <=>  den W*ᵀ = numᵀ (den is symmetric)
    return torch.linalg.solve(den, num.T).T
