"""compare_merges on a real tiny trajectory: every baseline's score equals the score of a merge
computed here independently from the checkpoint files, with the formula written out again."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ckmerge_ray import ConfigError, HeldoutLoss, compare_merges
from ckmerge_ray.cli import main as cli_main
from ckmerge_ray.plots import plot_run

OPTIONS = {"seq_len": 64, "max_tokens": 2048}
STATS_TOKENS = 512


@pytest.fixture(scope="module")
def comparison(ray_session, trajectory, tmp_path_factory):
    heldout = trajectory[0].parent / "heldout.jsonl"
    out = tmp_path_factory.mktemp("compare")
    result = compare_merges(
        trajectory, {"cpu": 1}, objective=f"loss:{heldout}", objective_options=OPTIONS,
        num_trials=3, last_n=2, ema_alpha=0.3, stats_tokens=STATS_TOKENS, max_concurrent=2,
        output_dir=out, progress=False,
    )
    return result, trajectory, heldout


def _objective(heldout, later):
    obj = HeldoutLoss(heldout, **OPTIONS)
    obj.prepare(later)
    return obj


def _model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _state(path):
    return load_file(str(path / "model.safetensors"))


def _score_state(state, later, heldout):
    model = _model(later)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    model.tie_weights()
    return _objective(heldout, later).evaluate(model, torch.device("cpu"))["score"]


def _weighted(states, weights):
    return {k: sum(w * s[k].double() for w, s in zip(weights, states)).float()
            for k in states[-1]}


def test_table_lists_every_method_with_gain_over_the_later_checkpoint(comparison):
    result, trajectory, _ = comparison
    rows = {r["key"]: r for r in result.table.to_pylist()}
    assert {"endpoint", "uniform", "greedy", "sma", "ema", "wma", "fisher", "regmean", "grid",
            "random", "tuned", "tuned-window"} <= set(rows)
    assert all(r["status"] == "ok" for r in rows.values()), [r["error"] for r in rows.values()]
    later = rows["endpoint"]["score"]
    for r in rows.values():
        assert r["gain"] == pytest.approx(later - r["score"])  # loss: lower is better
        assert r["evaluations"] >= 1 and r["wall_s"] >= 0
    assert rows["grid"]["evaluations"] == rows["random"]["evaluations"] == 3
    assert rows["tuned"]["evaluations"] == 4  # λ = 0.5, 1, one proposal, and λ = 0
    md = (result.output_dir / "compare.md").read_text()
    assert md.count("\n") >= len(rows) + 1 and "tuned λ (GP-Hedge)" in md
    summary = json.loads((result.output_dir / "summary.json").read_text())
    assert summary["kind"] == "compare" and "compare.png" in summary["plots"]
    assert (result.output_dir / "compare.png").stat().st_size > 0
    # the tuned run read the very objects compare stored, and scored Θ(t) exactly as compare did
    ids = summary["object_store"]["object_ids"]
    tuned = json.loads((result.output_dir / "tuned" / "summary.json").read_text())
    assert tuned["object_store"]["object_ids"] == {
        "earlier": ids[trajectory[1].name], "later": ids[trajectory[2].name]}
    assert tuned["object_store"]["puts_per_checkpoint"] == 0
    assert tuned["endpoint_scores"]["1.0"] == pytest.approx(later, abs=1e-6)
    # tuned-window: the whole window's weights (simplex, k = 3) on the pair's budget, from the
    # same stored objects; its design holds Θ(t) alone, which it scored as compare did
    window = rows["tuned-window"]
    assert window["evaluations"] == rows["tuned"]["evaluations"] == 4
    assert sum(json.loads(window["weights"])) == pytest.approx(1.0, abs=1e-5)
    assert window["score"] <= later
    w = json.loads((result.output_dir / "tuned_window" / "summary.json").read_text())
    assert w["family"]["name"] == "simplex" and w["object_store"] is None  # nothing stored again
    assert w["single_scores"][trajectory[2].name] == pytest.approx(later, abs=1e-6)
    # `ckmerge-ray plot` on the comparison redraws both tuned runs' plots too
    (result.output_dir / "tuned_window" / "window.png").unlink()
    paths = [p.relative_to(result.output_dir).as_posix() for p in plot_run(result.output_dir)]
    assert paths == ["compare.png", "tuned/landscape.png", "tuned_window/window.png"]
    assert (result.output_dir / "tuned_window" / "window.png").stat().st_size > 0


def test_checkpoint_averages_equal_independent_merges(comparison):
    result, trajectory, heldout = comparison
    rows = {r["key"]: r for r in result.table.to_pylist()}
    expected = {  # written out from the definitions, n = 3, last_n = 2, EMA alpha = 0.3
        "uniform": [1 / 3, 1 / 3, 1 / 3],
        "sma": [0, 0.5, 0.5],
        "ema": [0, 0.7, 0.3],
        "wma": [0, 1 / 3, 2 / 3],
        "endpoint": [0, 0, 1],
    }
    states = [_state(p) for p in trajectory]
    for key, weights in expected.items():
        assert json.loads(rows[key]["weights"]) == pytest.approx(weights, abs=1e-6), key
        got = _score_state(_weighted(states, weights), trajectory[-1], heldout)
        assert rows[key]["score"] == pytest.approx(got, abs=2e-5), key


def test_greedy_soup_is_no_worse_than_its_best_member(comparison):
    result, trajectory, heldout = comparison
    rows = {r["key"]: r for r in result.table.to_pylist()}
    singles = [r["score"] for r in result.table.to_pylist() if r["key"].startswith("checkpoint:")]
    singles.append(rows["endpoint"]["score"])
    assert len(singles) == 3
    assert rows["greedy"]["score"] <= min(singles) + 1e-12
    assert rows["greedy"]["evaluations"] == 3 + 2
    weights = json.loads(rows["greedy"]["weights"])
    got = _score_state(_weighted([_state(p) for p in trajectory], weights), trajectory[-1], heldout)
    assert rows["greedy"]["score"] == pytest.approx(got, abs=2e-5)


def test_lambda_searches_report_their_best_lambda(comparison):
    result, trajectory, heldout = comparison
    rows = {r["key"]: r for r in result.table.to_pylist()}
    assert min(abs(rows["grid"]["lam"] - x) for x in (0.5, 0.75, 1.0)) < 1e-12
    lam = rows["random"]["lam"]
    assert 0.5 <= lam <= 1.0
    states = [_state(p) for p in trajectory[1:]]
    got = _score_state(_weighted(states, [1 - lam, lam]), trajectory[-1], heldout)
    assert rows["random"]["score"] == pytest.approx(got, abs=2e-5)


def test_fisher_merge_equals_an_independent_fisher_average(comparison):
    result, trajectory, heldout = comparison
    windows = _objective(heldout, trajectory[-1]).windows[: -(-STATS_TOKENS // 63)]
    params, fishers = [], []
    for path in trajectory:
        model = _model(path)
        named = dict(model.named_parameters())
        fisher = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in named.items()}
        for row in windows:  # per-example gradients with torch.autograd.grad
            ids = torch.as_tensor(row)[None]
            logits = model(input_ids=ids).logits[0]
            loss = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:])
            for (n, _), g in zip(named.items(), torch.autograd.grad(loss, list(named.values()))):
                fisher[n] += g.double() ** 2
        fishers.append({n: f / len(windows) for n, f in fisher.items()})
        params.append({n: p.detach().double() for n, p in named.items()})
    merged = {}
    for n in params[0]:
        f = [fi[n].clamp_min(1e-6) for fi in fishers]
        merged[n] = (sum(fi * p[n] for fi, p in zip(f, params)) / sum(f)).float()
    got = _score_state(merged, trajectory[-1], heldout)
    row = next(r for r in result.table.to_pylist() if r["key"] == "fisher")
    assert row["score"] == pytest.approx(got, abs=1e-4)
    assert "fwd+bwd" in row["extra_cost"]


def test_regmean_equals_an_independent_least_squares_merge(comparison):
    result, trajectory, heldout = comparison
    windows = _objective(heldout, trajectory[-1]).windows[: -(-STATS_TOKENS // 63)]
    states = [_state(p) for p in trajectory]
    merged = _weighted(states, [1 / 3] * 3)
    grams, weights = {}, {}
    for path in trajectory:
        model = _model(path)
        inputs = {}
        hooks = [m.register_forward_hook(
            lambda m, a, o, name=name: inputs.setdefault(name, []).append(
                a[0].reshape(-1, m.in_features).double()))
            for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name != "lm_head"]  # lm_head is tied
        with torch.no_grad():
            model(input_ids=torch.as_tensor(windows))
        for h in hooks:
            h.remove()
        for name, xs in inputs.items():
            x = torch.cat(xs)
            g = x.T @ x / x.shape[0]
            g = 0.9 * g + 0.1 * torch.diag(torch.diag(g))  # RegMean's alpha on off-diagonals
            grams.setdefault(name, []).append(g)
            weights.setdefault(name, []).append(
                dict(model.named_modules())[name].weight.detach().double())
    assert len(grams) == 2 * 7  # 2 layers × (q, k, v, o, gate, up, down)
    for name in grams:
        num = sum(w @ g for w, g in zip(weights[name], grams[name]))
        den = sum(grams[name])
        den = den + 1e-6 * den.diagonal().mean() * torch.eye(den.shape[0], dtype=den.dtype)
        merged[f"{name}.weight"] = torch.linalg.solve(den, num.T).T.float()
    got = _score_state(merged, trajectory[-1], heldout)
    row = next(r for r in result.table.to_pylist() if r["key"] == "regmean")
    assert row["score"] == pytest.approx(got, abs=1e-4)


def test_bad_input_is_refused_before_any_work(trajectory, tmp_path):
    heldout = trajectory[0].parent / "heldout.jsonl"
    with pytest.raises(ConfigError, match="unknown methods"):
        compare_merges(trajectory, objective=f"loss:{heldout}", methods=["soup"],
                       output_dir=tmp_path / "a")
    with pytest.raises(ConfigError, match="at least two checkpoints"):
        compare_merges(trajectory[:1], objective=f"loss:{heldout}", output_dir=tmp_path / "b")
    with pytest.raises(ConfigError, match="last_n"):
        compare_merges(trajectory, objective=f"loss:{heldout}", last_n=4, output_dir=tmp_path / "c")
    assert not (tmp_path / "a").exists()


def test_cli_compare_writes_the_table(ray_session, trajectory, tmp_path, capsys):
    heldout = trajectory[0].parent / "heldout.jsonl"
    code = cli_main(["compare", *map(str, trajectory[1:]), "--objective", f"loss:{heldout}",
                     "--seq-len", "64", "--max-tokens", "1024", "--methods", "uniform,grid",
                     "--trials", "2", "--output", str(tmp_path / "cmp"), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    assert "| uniform soup |" in out and "| grid search λ |" in out
    assert (tmp_path / "cmp" / "compare.parquet").exists()
    # the same directory again is refused without --overwrite
    assert cli_main(["compare", *map(str, trajectory[1:]), "--objective", f"loss:{heldout}",
                     "--methods", "uniform", "--output", str(tmp_path / "cmp"), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli_main(["plot", str(tmp_path / "cmp")]) == 0
    assert "compare.png" in capsys.readouterr().out
    np.testing.assert_equal((tmp_path / "cmp" / "compare.png").stat().st_size > 0, True)
