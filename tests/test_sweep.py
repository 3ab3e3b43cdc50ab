"""Trajectory sweeps: checkpoint discovery, one store put per checkpoint, heatmap, plots."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from ckmerge_ray import ConfigError, discover_checkpoints, sweep_trajectory
from ckmerge_ray.cli import main as cli_main


def _dirs(root: Path, names):
    for name in names:
        (root / name).mkdir(parents=True)
    return root


def test_discovery_sorts_steps_numerically(tmp_path):
    root = _dirs(tmp_path / "hf", ["checkpoint-1000", "checkpoint-900", "checkpoint-50", "runs",
                                   "checkpoint-final"])
    found = discover_checkpoints(root)
    assert [s for s, _ in found] == [50, 900, 1000]  # not "1000" < "50" < "900"
    assert found[0][1] == root / "checkpoint-50"
    root = _dirs(tmp_path / "meg", ["iter_0002000", "iter_0000500", "step3000", "step_100"])
    assert [s for s, _ in discover_checkpoints(root)] == [100, 500, 2000, 3000]


def test_an_explicit_list_keeps_its_order(tmp_path):
    a, b = tmp_path / "final", tmp_path / "step7"
    assert discover_checkpoints([a, b]) == [(0, a), (7, b)]


def test_discovery_refuses_what_it_cannot_sweep(tmp_path):
    root = _dirs(tmp_path / "one", ["checkpoint-10", "logs"])
    with pytest.raises(ConfigError, match="found 1 checkpoint"):
        discover_checkpoints(root)
    root = _dirs(tmp_path / "dup", ["step10", "step_10"])
    with pytest.raises(ConfigError, match="same step"):
        discover_checkpoints(root)
    with pytest.raises(ConfigError, match="does not exist"):
        discover_checkpoints(tmp_path / "missing")


def test_cli_sweep_reports_bad_input_in_one_line(tmp_path, capsys):
    assert cli_main(["sweep", str(tmp_path), "--objective", "loss:x.jsonl", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ckmerge-ray: error: found 0 checkpoint") and err.count("\n") == 1


@pytest.fixture(scope="module")
def sweep(ray_session, trajectory, tmp_path_factory):
    heldout = trajectory[0].parent / "heldout.jsonl"
    out = tmp_path_factory.mktemp("sweep")
    result = sweep_trajectory(
        trajectory[0].parent, {"cpu": 1}, objective=f"loss:{heldout}",
        objective_options={"seq_len": 64, "max_tokens": 1024}, num_trials=2, heatmap=True,
        max_concurrent=2, output_dir=out, progress=False,
    )
    return result, trajectory


def test_every_checkpoint_is_put_into_the_store_once(sweep):
    result, trajectory = sweep
    store = result.summary["object_store"]
    names = [p.name for p in trajectory]
    assert store["puts_per_checkpoint"] == {n: 1 for n in names}
    ids = store["object_ids"]
    assert len({i for n in names for i in ids[n]}) == sum(len(ids[n]) for n in names)  # distinct
    rows = result.table.to_pylist()
    assert [(r["earlier_step"], r["later_step"]) for r in rows] == [(40, 80), (80, 120)]
    for r in rows:
        run = result.output_dir / r["run_dir"]
        pair = json.loads((run / "summary.json").read_text())["object_store"]
        earlier, later = Path(r["earlier"]).name, Path(r["later"]).name
        # the pair's run used the sweep's objects (checkpoint-80's twice), putting nothing itself
        assert pair["object_ids"] == {"earlier": ids[earlier], "later": ids[later]}
        assert pair["puts_per_checkpoint"] == 0
        # and every trial read exactly those objects (its reported digest of the object IDs)
        digest = hashlib.sha1(",".join(ids[earlier] + ids[later]).encode()).hexdigest()[:16]
        trials = pq.read_table(run / "trials.parquet").to_pylist()
        assert {t["store_digest"] for t in trials} == {digest}


def test_pair_table_holds_endpoints_best_lambda_and_gain(sweep):
    result, _ = sweep
    rows = result.table.to_pylist()
    assert all(r["status"] == "ok" for r in rows)
    # adjacent pairs share a checkpoint: its score is the same in both runs
    assert rows[0]["later_score"] == pytest.approx(rows[1]["earlier_score"], abs=1e-6)
    for r in rows:
        assert r["gain"] == pytest.approx(r["later_score"] - r["best_score"])
        assert r["gain"] >= 0  # λ = 1 is always evaluated
        assert 0.5 <= r["best_lambda"] <= 1.0 and r["evaluations"] == 3


def test_heatmap_agrees_with_the_pair_runs(sweep):
    result, trajectory = sweep
    heat = {(r["i"], r["j"]): r for r in result.heatmap.to_pylist()}
    assert set(heat) == {(i, j) for i in range(3) for j in range(i, 3)}
    rows = result.table.to_pylist()
    # diagonal: each checkpoint alone, as the pair runs scored their endpoints
    assert heat[(0, 0)]["score"] == pytest.approx(rows[0]["earlier_score"], abs=1e-6)
    assert heat[(2, 2)]["score"] == pytest.approx(rows[1]["later_score"], abs=1e-6)
    # adjacent cells at λ = 0.5: the pair runs evaluated λ = alpha = 0.5 as an initial point
    for k, r in enumerate(rows):
        trials = pq.read_table(result.output_dir / r["run_dir"] / "trials.parquet").to_pylist()
        at_half = next(t["score"] for t in trials if t["lam"] == 0.5)
        assert heat[(k, k + 1)]["score"] == pytest.approx(at_half, abs=1e-6)
    assert heat[(0, 2)]["lam"] == 0.5 and np.isfinite(heat[(0, 2)]["score"])


def test_sweep_plots_are_drawn_and_listed(sweep):
    import matplotlib.image as mpimg

    result, _ = sweep
    plots = result.summary["plots"]
    assert {"sweep_gain.png", "sweep_heatmap.png"} <= set(plots)
    assert sum(p.endswith("landscape.png") for p in plots) == 2
    for p in plots:
        image = mpimg.imread(result.output_dir / p)
        assert image.shape[0] > 100 and image.shape[1] > 100
        assert float(image[..., :3].std()) > 0.01  # not a blank canvas


# --- a diverged checkpoint in the middle of the trajectory ------------------------------------

@pytest.fixture(scope="module")
def diverged(trajectory, tmp_path_factory):
    """checkpoint-40, -80, -120 with checkpoint-40 diverged: its norm weights at 3e38, finite
    (the store refuses NaN and inf) but overflowing the forward pass of any merge it enters."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("diverged")
    copies = [Path(shutil.copytree(c, root / c.name)) for c in trajectory]
    shutil.copy(trajectory[0].parent / "heldout.jsonl", root / "heldout.jsonl")
    f = copies[0] / "model.safetensors"
    tensors = load_file(str(f))
    for name, t in tensors.items():
        if name.endswith("norm.weight"):
            tensors[name] = torch.full_like(t, 3e38)
    save_file(tensors, str(f), metadata={"format": "pt"})
    return copies


def test_a_diverged_checkpoint_fails_its_heatmap_cells_and_greedy_not_the_run(
        ray_session, diverged, tmp_path):
    """The heatmap records each cell that cannot be scored with its error and scores the rest
    (before, the first such cell ended the sweep with a raw RayTaskError after every pair was
    tuned, writing no summary); a comparison records the checkpoint that cannot be scored
    alone, fails greedy (which needs its score) by name, and goes on (before, it ended), and
    its grid search keeps the λ it could score (before, one failed λ failed the method)."""
    from ckmerge_ray import compare_merges

    heldout, options = diverged[0].parent / "heldout.jsonl", {"seq_len": 64, "max_tokens": 1024}
    result = sweep_trajectory(diverged, {"cpu": 1}, objective=f"loss:{heldout}",
                              objective_options=options, num_trials=2, heatmap=True,
                              max_concurrent=2, output_dir=tmp_path / "sweep", progress=False)
    cells = {(r["i"], r["j"]): r for r in result.heatmap.to_pylist()}
    assert len(cells) == 6
    for (i, j), r in cells.items():
        if i == 0:  # every cell with checkpoint-40 in it
            assert r["score"] is None and "non-finite score" in r["error"], r
        else:
            assert np.isfinite(r["score"]) and r["error"] is None, r
    assert (tmp_path / "sweep" / "summary.json").exists()
    assert "sweep_heatmap.png" in result.summary["plots"]

    # the diverged checkpoint and the next: the grid's λ = 0.5 cannot be scored, λ = 1 can
    compared = compare_merges(diverged[:2], {"cpu": 1}, objective=f"loss:{heldout}",
                              objective_options=options, methods=("greedy", "grid"),
                              num_trials=2, output_dir=tmp_path / "compare", progress=False)
    rows = {r["key"]: r for r in compared.table.to_pylist()}
    assert rows["checkpoint:0"]["status"] != "ok" and "non-finite" in rows["checkpoint:0"]["error"]
    assert rows["endpoint"]["status"] == "ok"
    assert "greedy needs every checkpoint's own score; checkpoint-40" in rows["greedy"]["error"]
    assert rows["grid"]["status"] == "ok" and rows["grid"]["lam"] == 1.0, rows["grid"]
    assert rows["grid"]["extra_cost"] == "1 of the λ could not be scored"
