"""Baseline recipes against independent computations of their formulas (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ckmerge_ray import baselines
from ckmerge_ray.merge import weighted_sum_into_
from tests.conftest import tiny_llama


def test_moving_average_weights_follow_their_definitions():
    assert baselines.uniform_weights(4) == pytest.approx([0.25] * 4)
    assert baselines.sma_weights(5, last=2) == pytest.approx([0, 0, 0, 0.5, 0.5])
    # EMA by its recursion, oldest first: e = Θ₁; e = α·Θᵢ + (1-α)·e
    alpha, n = 0.3, 4
    e = np.eye(n)[0]
    for i in range(1, n):
        e = alpha * np.eye(n)[i] + (1 - alpha) * e
    assert baselines.ema_weights(n, alpha) == pytest.approx(e.tolist())
    assert baselines.ema_weights(5, 0.5, last=3) == pytest.approx([0, 0, 0.25, 0.25, 0.5])
    assert baselines.wma_weights(4, last=3) == pytest.approx([0, 1 / 6, 2 / 6, 3 / 6])
    for w in (baselines.ema_weights(6, 0.2), baselines.wma_weights(6), baselines.sma_weights(6)):
        assert sum(w) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="last must be in"):
        baselines.sma_weights(3, last=4)
    with pytest.raises(ValueError, match="alpha"):
        baselines.ema_weights(3, 0.0)


@pytest.mark.parametrize("mode", ["min", "max"])
def test_greedy_soup_is_never_worse_than_its_best_member(mode):
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(2, 6))
        singles = rng.normal(size=n).tolist()
        soups = {}

        def score(weights):  # any landscape, even one where every soup is worse
            key = tuple(weights)
            soups.setdefault(key, float(rng.normal(scale=2.0)))
            return soups[key]

        members, best, evaluated = baselines.greedy_soup(singles, score, mode)
        best_single = min(singles) if mode == "min" else max(singles)
        assert (best <= best_single) if mode == "min" else (best >= best_single)
        assert evaluated == n - 1
        if len(members) == 1:
            assert best == best_single
        else:
            assert best == soups[tuple(baselines.members_to_weights(members, n))]


def test_greedy_soup_keeps_a_helpful_checkpoint_and_drops_a_harmful_one():
    # scores of soups: adding checkpoint 1 to 0 helps, adding 2 hurts.
    table = {(0.5, 0.5, 0.0): 0.5, (0.333333, 0.333333, 0.333333): 2.0}
    members, best, _ = baselines.greedy_soup(
        [1.0, 1.5, 3.0], lambda w: table[tuple(round(x, 6) for x in w)], "min")
    assert members == [0, 1] and best == 0.5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_weighted_sum_rounds_once_like_the_fp64_formula(dtype):
    torch.manual_seed(0)
    ts = [torch.randn(100_000).to(dtype) for _ in range(3)]
    w = [0.2, 0.3, 0.5]
    out = torch.empty(100_000, dtype=dtype)
    weighted_sum_into_(out, ts, w)
    exact = sum(wi * t.double() for wi, t in zip(w, ts)).to(dtype)  # one rounding
    assert torch.equal(out, exact)
    naive = ts[0] * w[0] + ts[1] * w[1] + ts[2] * w[2]  # a rounding per operation
    assert (naive != exact).float().mean() > (0.1 if dtype == torch.bfloat16 else 0.01)
    pair = torch.empty(100_000, dtype=dtype)
    weighted_sum_into_(pair, ts[:2], [0.25, 0.75])  # the fused lerp path (fp32 inside)
    want = (0.25 * ts[0].double() + 0.75 * ts[1].double()).to(dtype)
    if dtype == torch.bfloat16:  # fp32 inside, one rounding to bf16: off only at near-ties
        assert (pair != want).float().mean() < 0.005
    else:  # fp32 lerp rounds inside: within a few fp32 ulps of its terms (cancellation)
        terms = 0.25 * ts[0].double().abs() + 0.75 * ts[1].double().abs()
        assert bool(((pair.double() - want.double()).abs() <= 4 * 2.0 ** -24 * terms).all())


def test_fisher_merge_matches_the_elementwise_formula():
    rng = np.random.default_rng(1)
    params = [{"w": torch.tensor(rng.normal(size=(4, 3)), dtype=torch.float32)} for _ in range(3)]
    fishers = [{"w": torch.tensor(rng.random(size=(4, 3)) ** 4, dtype=torch.float32)}
               for _ in range(3)]
    fishers[0]["w"][0, 0] = fishers[1]["w"][0, 0] = fishers[2]["w"][0, 0] = 0.0  # untouched
    c = [0.2, 0.3, 0.5]
    got = baselines.fisher_merge(params, fishers, c, floor=1e-6)["w"].numpy()
    F = [np.maximum(f["w"].numpy().astype(np.float64), 1e-6) for f in fishers]
    P = [p["w"].numpy().astype(np.float64) for p in params]
    want = sum(ci * f * p for ci, f, p in zip(c, F, P)) / sum(ci * f for ci, f in zip(c, F))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # where no checkpoint has Fisher mass the merge is the weighted average
    assert got[0, 0] == pytest.approx(sum(ci * p[0, 0] for ci, p in zip(c, P)), rel=1e-5)


def test_regmean_solves_the_least_squares_merge():
    rng = np.random.default_rng(2)
    X = [rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6)) for _ in range(2)]
    W = [rng.normal(size=(5, 6)) for _ in range(2)]  # torch layout (out, in)
    grams = [torch.tensor(x.T @ x, dtype=torch.float32) for x in X]
    got = baselines.regmean_merge([torch.tensor(w, dtype=torch.float32) for w in W], grams,
                                  [0.5, 0.5], alpha=1.0, ridge=0.0).numpy()
    # independent: least squares over the stacked inputs, min_W Σ‖Xᵢ Wᵀ - Xᵢ Wᵢᵀ‖²
    A = np.vstack(X)
    B = np.vstack([x @ w.T for x, w in zip(X, W)])
    want = np.linalg.lstsq(A, B, rcond=None)[0].T
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
    # alpha = 0 keeps only the Gram diagonals: a per-input-channel weighted mean
    d = [np.diag(x.T @ x) for x in X]
    diag = baselines.regmean_merge([torch.tensor(w, dtype=torch.float32) for w in W], grams,
                                   [0.5, 0.5], alpha=0.0, ridge=0.0).numpy()
    np.testing.assert_allclose(diag, (W[0] * d[0] + W[1] * d[1]) / (d[0] + d[1]), rtol=1e-4)


def test_statistics_skip_a_tied_output_head_and_scale_with_tokens():
    model = tiny_llama(0, tie_word_embeddings=True).eval().requires_grad_(False)
    names = baselines.regmean_linears(model)
    assert "lm_head.weight" not in names and "model.layers.0.mlp.down_proj.weight" in names
    untied = baselines.regmean_linears(tiny_llama(0, tie_word_embeddings=False))
    assert "lm_head.weight" in untied
    windows = np.random.default_rng(0).integers(0, 64, size=(3, 16))
    grams = baselines.linear_input_grams(model, windows, batch_size=2)
    # the Gram of the first layer's q_proj input equals XᵀX / tokens from a hook of our own
    seen = []
    h = model.model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda m, a, o: seen.append(a[0].reshape(-1, 16).double()))
    with torch.no_grad():
        model(input_ids=torch.as_tensor(windows))
    h.remove()
    x = torch.cat(seen)
    torch.testing.assert_close(grams["model.layers.0.self_attn.q_proj.weight"].double(),
                               x.T @ x / x.shape[0], rtol=1e-4, atol=1e-6)
    fisher = baselines.diagonal_fisher(model, windows)
    assert all(not p.requires_grad for p in model.parameters())  # flags restored
    assert all(bool((f >= 0).all()) for f in fisher.values())
    assert float(fisher["model.embed_tokens.weight"].sum()) > 0
