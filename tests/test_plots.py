"""Plots of a real tune run (drawn by the run, redrawn from its saved tables), and of sweep
and compare tables around it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ckmerge_ray.errors import ConfigError
from ckmerge_ray.plots import plot_run
from ckmerge_ray.results import read_rows, write_table_atomic
from ckmerge_ray.search import posterior_from_rows

PAIR_DIR = "pairs/01-step80-step120"


TRIALS = 5  # λ = 0, 0.5, 1 (the initial points), then two GP-Hedge choices: num_trials=4


@pytest.fixture(scope="module")
def tune_run(ray_session, trajectory, tmp_path_factory) -> Path:
    """A real, finished tune run (checkpoint-80 → checkpoint-120): its plots were drawn by the
    run itself from the rows and summary it had in memory."""
    from ckmerge_ray import tune_merge

    out = tmp_path_factory.mktemp("plots_run")
    tune_merge((trajectory[1], trajectory[2]), {"cpu": 1},
               f"loss:{trajectory[0].parent / 'heldout.jsonl'}",
               objective_options={"seq_len": 64, "max_tokens": 2048}, num_trials=TRIALS - 1,
               max_concurrent=2, output_dir=out, export_best=False, progress=False)
    return out


def test_the_run_drew_its_landscape_and_listed_it_once(tune_run):
    summary = read_summary(tune_run)
    assert summary["plots"] == ["landscape.png"]
    assert_drawn_png(tune_run / "landscape.png")
    assert len(read_rows(tune_run / "trials.parquet")) == TRIALS


def copy_run(run: Path, dest: Path) -> Path:
    """The run's tables only, so that each test writes its plots into its own folder."""
    dest.mkdir(parents=True)
    for name in ("trials.parquet", "summary.json"):
        shutil.copy(run / name, dest / name)
    return dest


def write_table(path: Path, rows: list[dict]) -> None:
    pq.write_table(pa.Table.from_pylist(rows), path)


def write_summary(path: Path, summary: dict) -> None:
    (path / "summary.json").write_text(json.dumps(summary))


def read_summary(path: Path) -> dict:
    return json.loads((path / "summary.json").read_text())


def assert_drawn_png(path: Path) -> None:
    """A PNG file that decodes to a picture with content, not a blank canvas."""
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels.std() > 0.01
    colours = np.unique(pixels.reshape(-1, pixels.shape[-1]).round(2), axis=0)
    assert len(colours) > 10, f"{path.name}: only {len(colours)} distinct colours"


def test_landscape_is_redrawn_from_the_saved_tables(tune_run, tmp_path):
    run = copy_run(tune_run, tmp_path / "run")
    before = read_summary(run)

    paths = plot_run(run)

    assert paths == [run / "landscape.png"]
    assert_drawn_png(run / "landscape.png")
    assert read_summary(run) == before  # the same plots listed, every other key kept


def test_gp_refit_interpolates_the_observed_scores(tune_run):
    rows = read_rows(tune_run / "trials.parquet")
    summary = read_summary(tune_run)
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) >= 4 and summary["search"]["gp_noise"] == 1e-6
    lams = np.array([r["lam"] for r in ok])
    scores = np.array([r["score"] for r in ok])

    mean, std = posterior_from_rows(rows, summary, lams)

    # Noise 1e-6 on the normalized scale: the mean passes through every observation, in the
    # metric's own sign (a loss, mode "min"), not the searcher's internal maximized one.
    spread = scores.max() - scores.min()
    np.testing.assert_allclose(mean, scores, atol=1e-3 * spread)
    inside = np.sort(lams[lams >= summary["alpha"]])
    _, std_between = posterior_from_rows(rows, summary, (inside[:-1] + inside[1:]) / 2)
    assert std.max() < 0.1 * std_between.max()


def test_gp_refit_needs_two_observations():
    summary = {"alpha": 0.5, "mode": "min", "search": {"gp_noise": 1e-6, "seed": 0}}
    rows = [{"lam": 1.0, "score": 2.0, "status": "ok"},
            {"lam": 0.5, "score": None, "status": "error"}]
    assert posterior_from_rows(rows, summary, [0.5, 1.0]) is None


def test_gp_refit_uses_screened_rows_only_with_their_stderr():
    full = [{"lam": lam, "score": (lam - 0.7) ** 2, "status": "ok", "fidelity": "full",
             "score_stderr": 0.001} for lam in (0.0, 0.5, 1.0)]
    screened = {"lam": 0.75, "score": 5.0, "status": "ok", "fidelity": "screen",
                "score_stderr": 0.001}
    summary = {"alpha": 0.5, "mode": "min", "search": {"gp_noise": 1e-6, "seed": 0}}
    noisy = {**summary, "search": {**summary["search"], "noise_key": "score_stderr"}}

    without_key, _ = posterior_from_rows(full + [screened], summary, [0.75])
    with_key, _ = posterior_from_rows(full + [screened], noisy, [0.75])
    baseline, _ = posterior_from_rows(full, noisy, [0.75])

    assert without_key[0] == pytest.approx(posterior_from_rows(full, summary, [0.75])[0][0])
    assert with_key[0] > baseline[0] + 1.0  # the screened score of 5 pulled the mean up


def test_sweep_plots_gain_heatmap_and_pair_landscapes(tune_run, tmp_path):
    sweep = tmp_path / "sweep"
    copy_run(tune_run, sweep / PAIR_DIR)
    # Hand-made sweep tables: these formats are inputs to the plotting code (written by `sweep`).
    ckpts = ["checkpoint-40", "checkpoint-80", "checkpoint-120"]
    write_table(sweep / "sweep.parquet", [
        {"pair": 0, "earlier": ckpts[0], "later": ckpts[1], "earlier_step": 40, "later_step": 80,
         "earlier_score": 5.1, "later_score": 4.6, "best_lambda": 0.9, "best_score": 4.62,
         "gain": -0.02, "run_dir": "pairs/00-step40-step80"},  # its tables are absent: skipped
        {"pair": 1, "earlier": ckpts[1], "later": ckpts[2], "earlier_step": 80,
         "later_step": 120, "earlier_score": 4.6, "later_score": 4.4, "best_lambda": 0.7,
         "best_score": 4.3, "gain": 0.1, "run_dir": PAIR_DIR},
    ])
    steps = [40, 80, 120]
    write_table(sweep / "heatmap.parquet", [
        {"i": i, "j": j, "step_i": steps[i], "step_j": steps[j], "lam": 1.0 if i == j else lam,
         "score": 5.0 - 0.3 * j + 0.1 * i - 0.05 * (i != j)}
        for i in range(3) for j in range(i, 3) for lam in ((0.6, 0.8) if i != j else (1.0,))
    ])
    write_summary(sweep, {"kind": "sweep", "mode": "min", "objective": "loss:heldout.jsonl",
                          "steps": steps, "checkpoints": ckpts})

    paths = plot_run(sweep)

    expected = ["sweep_gain.png", "sweep_heatmap.png", f"{PAIR_DIR}/landscape.png"]
    assert [p.relative_to(sweep).as_posix() for p in paths] == expected
    for p in paths:
        assert_drawn_png(p)
    summary = read_summary(sweep)
    assert summary["plots"] == expected and summary["kind"] == "sweep"


def test_compare_plot_and_tuned_landscape(tune_run, tmp_path):
    compare = tmp_path / "compare"
    copy_run(tune_run, compare / "tuned")
    # Hand-made compare table: an input to the plotting code (written by `compare`).
    methods = [("later endpoint", 4.40, 1), ("uniform soup", 4.45, 1), ("ema", 4.38, 1),
               ("fisher", None, 0), ("grid", 4.33, 9), ("tuned (GP-Hedge)", 4.31, 5)]
    write_table(compare / "compare.parquet", [
        {"method": m, "score": s, "gain": None if s is None else 4.40 - s, "evaluations": n,
         "wall_s": 1.5 * n, "note": ""} for m, s, n in methods
    ])
    write_summary(compare, {"kind": "compare", "mode": "min"})

    paths = plot_run(compare)

    assert [p.relative_to(compare).as_posix() for p in paths] == [
        "compare.png", "tuned/landscape.png"]
    for p in paths:
        assert_drawn_png(p)
    assert read_summary(compare)["plots"] == ["compare.png", "tuned/landscape.png"]


def test_plot_run_refuses_missing_and_empty_dirs(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        plot_run(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="holds none of sweep.parquet, compare.parquet"):
        plot_run(tmp_path)
