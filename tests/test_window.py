"""Windows of k checkpoints (`tune_window`) on real Ray Tune and real tiny Llama trajectories: the
families' weights against their definitions, merges against the fp64 formula computed here from
the safetensors files, the pair family against `tune_merge`, a k = 3 run through the CLI with
best/ reloaded, and a k = 4 run whose driver is killed and resumed."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from ckmerge_ray import baselines, tune_merge
from ckmerge_ray.cli import main as cli
from ckmerge_ray.errors import ConfigError
from ckmerge_ray.families import (
    Family, check_weights, cube_to_simplex, decay_weights, family_of, simplex_to_cube,
)
from ckmerge_ray.objectives import HeldoutLoss
from tests.test_tune import read_safetensors

ROOT = Path(__file__).resolve().parent.parent

SEQ = {"seq_len": 64, "max_tokens": 2048}


def score_model(model, ckpt):
    """The held-out loss the runs below use (SEQ), computed here on a reloaded model."""
    objective = HeldoutLoss(ckpt.parent / "heldout.jsonl", **SEQ)
    objective.prepare(ckpt)
    return objective.evaluate(model.eval(), torch.device("cpu"))["score"]


# --- families (no Ray) ---------------------------------------------------------------------------

@pytest.mark.parametrize("k", [2, 3, 5])
def test_the_cube_maps_onto_the_simplex_evenly_and_back(k):
    rng = np.random.default_rng(k)
    u = rng.random((20000, k - 1))
    w = np.array([cube_to_simplex(x) for x in u])
    assert np.all(w >= 0) and np.allclose(w.sum(axis=1), 1.0, atol=1e-12)
    # A flat Dirichlet has mean 1/k and variance (k-1)/(k²(k+1)) in every coordinate.
    assert np.allclose(w.mean(axis=0), 1 / k, atol=0.01)
    assert np.allclose(w.var(axis=0), (k - 1) / (k * k * (k + 1)), rtol=0.05)
    back = np.array([simplex_to_cube(x) for x in w[:200]])
    assert np.allclose(back, u[:200], atol=1e-9)


def test_each_family_gives_convex_weights_and_its_design_holds_the_fixed_averages():
    k, rng = 4, np.random.default_rng(0)
    for fam in (Family("simplex", k), Family("ema", k), Family("decay", k),
                Family("ema", k, search_length=True), Family("decay", k, search_length=True)):
        box = fam.space()
        for _ in range(50):
            point = {n: lo + (hi - lo) * rng.random() for n, (lo, hi) in box.items()}
            check_weights(fam.weights(point), k)  # raises if not convex
        design = fam.initial_points()
        assert all(lo <= p[n] <= hi for p in design for n, (lo, hi) in box.items())
        weights = [fam.weights(p) for p in design]
        assert len({tuple(np.round(w, 9)) for w in weights}) == len(weights)  # distinct merges
    simplex = [Family("simplex", k).weights(p) for p in Family("simplex", k).initial_points()]
    for want in (baselines.one_hot_weights(3, k), baselines.one_hot_weights(2, k),
                 baselines.uniform_weights(k), baselines.ema_weights(k, 0.5)):
        assert any(np.allclose(w, want, atol=1e-12) for w in simplex), want
    # EMA is PMA's; decay p = 1 (linear LR decay) is the uniform average; p = 2 follows
    # c_j = (j/L)^2 - ((j-1)/L)^2 over the newest L; length rounds to the nearest integer.
    assert Family("ema", k).weights({"rate": 0.3}) == baselines.ema_weights(k, 0.3)
    assert np.allclose(Family("decay", k).weights({"log2_power": 0.0}), [0.25] * 4)
    assert np.allclose(decay_weights(4, 2.0, last=3), [0, 1 / 9, 3 / 9, 5 / 9])
    fam = Family("decay", k, search_length=True)
    assert fam.weights({"log2_power": 1.0, "length": 2.4}) == decay_weights(4, 2.0, last=2)
    assert fam.length({"log2_power": 0.0, "length": 0.5}) == 1


def test_bad_families_weights_and_budgets_are_refused(trajectory, tmp_path):
    with pytest.raises(ConfigError, match="family 'pair' merges 2 checkpoints, the window has 3"):
        Family("pair", 3)
    with pytest.raises(ConfigError, match="search_length applies to 'ema' and 'decay'"):
        family_of("simplex+length", 3)
    with pytest.raises(ConfigError, match="family must be one of"):
        family_of("cosine", 3)
    with pytest.raises(ConfigError, match="must sum to 1"):
        check_weights([0.2, 0.2, 0.2], 3)
    with pytest.raises(ConfigError, match="finite and non-negative"):
        check_weights([1.2, -0.2, 0.0], 3)
    with pytest.raises(ConfigError, match="need 3 merge weights"):
        check_weights([0.5, 0.5], 3)
    from ckmerge_ray.window import tune_window

    with pytest.raises(ConfigError, match="num_trials=3 is smaller than the 4 initial points"):
        tune_window(trajectory, {"cpu": 1}, "loss:x.jsonl", family="simplex", num_trials=3,
                    output_dir=tmp_path)  # refused before the objective or Ray is touched


# --- GP-Hedge over a window's weights (no Ray: the searcher driven as Tune drives it) -------------

def _drive(searcher, f, n, concurrent):
    """Up to `concurrent` pending, oldest finishes first; returns the configs in finish order."""
    done, pending, i = [], [], 0
    while len(done) < n:
        while len(pending) < concurrent and len(done) + len(pending) < n:
            cfg = searcher.suggest(f"t{i}")
            if cfg is None:
                assert pending, "None with nothing running would stall the run"
                break
            pending.append((f"t{i}", cfg))
            i += 1
        tid, cfg = pending.pop(0)
        searcher.on_trial_complete(tid, f(cfg))
        done.append(cfg)
    return done


@pytest.mark.parametrize("noise_aware", [False, True])
def test_window_searcher_finds_an_interior_optimum_in_batches_without_repeating_a_merge(
        noise_aware):
    from ckmerge_ray.config import SearchConfig
    from ckmerge_ray.families import WeightsOf
    from ckmerge_ray.search import search_record
    from ckmerge_ray.window_run import window_searcher

    fam, target = Family("simplex", 3), np.array([0.45, 0.15, 0.40])
    searcher = window_searcher(fam, SearchConfig(seed=3, noise_aware=noise_aware), "min", 2)
    score = lambda cfg: {"score": float(((np.array(fam.weights(cfg)) - target) ** 2).sum()),  # noqa: E731
                         "score_stderr": 1e-3}
    configs = _drive(searcher, score, 14, concurrent=2)
    weights = WeightsOf(fam)([[c[n] for n in ("u1", "u2")] for c in configs], ("u1", "u2"))
    gaps = np.abs(weights[:, None] - weights[None]).max(axis=2)[np.triu_indices(14, 1)]
    assert gaps.min() >= 0.01  # pending-aware, spacing in weights: never one merge twice
    best = weights[np.argmin([score(c)["score"] for c in configs])]
    assert np.abs(best - target).max() < 0.1, best  # the design's best is 0.2 away
    assert {search_record(c)["acquisition"] for c in configs[4:]} <= {"ei", "pi", "ucb"}
    kernel = searcher._fit_gp(*searcher._observations()).kernel_
    assert np.shape(kernel.length_scale) == (2,)  # one length scale per dimension
    assert all(low == pytest.approx(0.2) for low, _ in kernel.length_scale_bounds)


# --- merges against the fp64 formula -------------------------------------------------------------

@pytest.mark.parametrize("which", ["trajectory", "trajectory_bf16"])
def test_window_merges_equal_the_fp64_formula_rounded_once(request, ray_session, which, tmp_path):
    """The export and a trial's in-place merge, against Σ wᵢ·θᵢ computed here in float64 from
    the files and rounded once; weights that leave the simplex are refused before writing."""
    from ckmerge_ray.config import CheckpointConfig
    from ckmerge_ray.evaluator import MergeEvaluator
    from ckmerge_ray.inputs import WindowStore, load_window
    from ckmerge_ray.model import dtypes_of
    from ckmerge_ray.results import export_weighted

    ckpts = request.getfixturevalue(which)
    infos = load_window(ckpts, CheckpointConfig())
    stored = WindowStore(infos, CheckpointConfig(), lambda m: None).all()
    files = [read_safetensors(c) for c in ckpts]  # not the package's reader
    evaluator = MergeEvaluator(infos[-1].config, dtypes_of(infos[-1]), stored, (None, None))
    weights = [0.2, 0.3, 0.5]
    export_weighted(stored, weights, infos[-1].config_bytes, [], tmp_path / "best")
    exported = read_safetensors(tmp_path / "best")
    evaluator._merge(weights)
    assert set(exported) == set(files[-1])
    for name, t in exported.items():
        exact = sum(w * f[name].double() for w, f in zip(weights, files)).to(files[-1][name].dtype)
        assert torch.equal(t, exact), name
        assert torch.equal(evaluator.tensors[name], exact), name
    for bad in ([0.5, 0.5, 0.5], [1.5, -0.5, 0.0]):
        with pytest.raises(ConfigError):
            export_weighted(stored, bad, infos[-1].config_bytes, [], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


# --- the pair family is tune_merge ---------------------------------------------------------------

def test_the_pair_family_reproduces_tune_merge(ray_session, trajectory, tmp_path):
    from ckmerge_ray.window import tune_window

    pair = trajectory[-2:]
    kw = dict(objective_options=SEQ, num_trials=4, max_concurrent=1, seed=5, progress=False,
              export_best=False)
    objective = f"loss:{pair[1].parent / 'heldout.jsonl'}"
    direct = tune_merge(pair, {"cpu": 1}, objective, output_dir=tmp_path / "a", **kw)
    window = tune_window(pair, {"cpu": 1}, objective, family="pair", output_dir=tmp_path / "b", **kw)
    a, b = direct.table.to_pylist(), window.table.to_pylist()
    assert [r["lam"] for r in a] == [r["lam"] for r in b]
    assert [r["score"] for r in a] == [r["score"] for r in b]
    assert all(r["w1"] == 1 - r["lam"] and r["w2"] == r["lam"] for r in b)
    assert window.best_weights == [1 - direct.best_lambda, direct.best_lambda]
    assert window.best_score == direct.best_score


# --- k = 3 through the CLI -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def simplex_run(ray_session, trajectory, tmp_path_factory):
    out = tmp_path_factory.mktemp("window3")
    heldout = trajectory[-1].parent / "heldout.jsonl"
    code = cli(["tune-window", *map(str, trajectory), "--family", "simplex", "--objective",
                f"loss:{heldout}", "--seq-len", "64", "--max-tokens", "2048", "--trials", "8",
                "--max-concurrent", "2", "--seed", "1", "--output", str(out), "--quiet"])
    assert code == 0
    return out


def test_k3_simplex_run_evaluates_distinct_weightings_design_first(simplex_run):
    rows = pq.read_table(simplex_run / "trials.parquet").to_pylist()
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows)
    weights = np.array([[r["w1"], r["w2"], r["w3"]] for r in rows])
    assert np.allclose(weights.sum(axis=1), 1.0, atol=1e-12) and (weights >= 0).all()
    gaps = np.abs(weights[:, None, :] - weights[None, :, :]).max(axis=2)
    assert gaps[np.triu_indices(8, 1)].min() >= 0.01  # never the same merge twice
    design = {tuple(np.round(w, 6)) for w in ([0, 0, 1], [0, 1, 0], [1 / 3] * 3, [.25, .25, .5])}
    firsts = [r for r in rows if r["acquisition"] == "initial"]
    assert {tuple(np.round([r["w1"], r["w2"], r["w3"]], 6)) for r in firsts} == design
    assert len(firsts) == 4  # and only then the GP's choices:
    assert max(r["batch"] for r in firsts) < min(r["batch"] for r in rows if r not in firsts)
    assert not any(r.get("from_journal") for r in rows)


def test_k3_best_model_reloads_and_reproduces_its_score(simplex_run, trajectory):
    from transformers import AutoModelForCausalLM

    summary = json.loads((simplex_run / "summary.json").read_text())
    rows = pq.read_table(simplex_run / "trials.parquet").to_pylist()
    best = min((r for r in rows if r["status"] == "ok"), key=lambda r: r["score"])
    assert summary["best_score"] == best["score"]
    assert summary["best_weights"] == [best["w1"], best["w2"], best["w3"]]
    assert summary["best_score"] <= min(summary["single_scores"].values())
    assert summary["object_store"]["puts_per_checkpoint"] == {c.name: 1 for c in trajectory}
    model = AutoModelForCausalLM.from_pretrained(simplex_run / "best")
    assert score_model(model, trajectory[-1]) == pytest.approx(best["score"], abs=1e-5)
    assert (simplex_run / "window.png").stat().st_size > 0 and summary["plots"] == ["window.png"]
    # `ckmerge-ray plot` redraws it from the saved table
    (simplex_run / "window.png").unlink()
    assert cli(["plot", str(simplex_run)]) == 0 and (simplex_run / "window.png").exists()


def test_k3_cli_resume_of_the_finished_run_reports_it(simplex_run, capsys):
    capsys.readouterr()
    assert cli(["tune-window", "--resume", str(simplex_run)]) == 0
    out = capsys.readouterr().out
    assert "holds a finished run" in out and "best weights" in out
    assert cli(["tune", "--resume", str(simplex_run)]) == 2  # a window's run, not a pair's
    assert "resume it with ckmerge-ray tune-window --resume" in capsys.readouterr().err
    # what a full disk or a signal tells the user to run is the window's command
    from ckmerge_ray.results import output_error, resume_hint

    assert resume_hint(simplex_run) == f"ckmerge-ray tune-window --resume {simplex_run}"
    err = output_error(OSError(28, "No space left on device"), "the summary", simplex_run)
    assert f"(ckmerge-ray tune-window --resume {simplex_run})" in str(err)
    assert resume_hint(simplex_run.parent / "none") == f"ckmerge-ray tune --resume " \
        f"{simplex_run.parent / 'none'}"  # no run.json: a pair's command, the common case


# --- k = 4, a killed driver ----------------------------------------------------------------------

WINDOW_DRIVER = r'''
import os, sys
from pathlib import Path
root, out, resume, *ckpts = sys.argv[1:]
sys.path.insert(0, root)
from ckmerge_ray.window import tune_window
from tests import faulty

faulty.ship_by_value()
objective = faulty.CountsAndHangs(
    Path(ckpts[-1]).parent / "heldout.jsonl", os.environ["EVAL_LOG"], os.environ["HANG_AT"],
    Path(out).resolve() / "evaluations", "w=*.json", seq_len=64, max_tokens=2048)
r = tune_window(ckpts, {"cpu": 1}, objective, family="ema+length", num_trials=7,
                max_concurrent=2, output_dir=out, seed=2, resume=resume == "resume")
print("BEST", r.best_weights, r.best_score)
'''


@pytest.fixture(scope="module")
def trajectory4(tmp_path_factory):
    """The conftest trajectory's training run (TINY) saved every 30 steps: 4 checkpoints."""
    from ckmerge_ray.demo import TrajectoryConfig, make_trajectory
    from tests.conftest import TINY

    cfg = TrajectoryConfig(**{**TINY.__dict__, "save_every": 30})
    return make_trajectory(tmp_path_factory.mktemp("traj4"), cfg, log=lambda m: None)


def test_k4_window_resumes_after_a_killed_driver_without_redoing_evaluations(
        ray_session, trajectory4, tmp_path):
    from transformers import AutoModelForCausalLM

    ckpts = trajectory4
    script = tmp_path / "window_driver.py"
    script.write_text(WINDOW_DRIVER)
    (tmp_path / "evals").mkdir()
    log = tmp_path / "evals" / "finished.log"
    env = {**os.environ, "EVAL_LOG": str(log), "HANG_AT": "5",
           "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    args = [sys.executable, str(script), str(ROOT), str(tmp_path / "run")]
    first = subprocess.Popen(args + ["fit", *map(str, ckpts)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 300
    while not Path(str(log) + ".hang").exists():
        assert first.poll() is None, first.stdout.read()
        assert time.time() < deadline, "the driver never reached the fifth evaluation"
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # the driver, mid-evaluation; its workers go with it
    first.wait()
    finished_before = log.read_text().split()
    assert len(finished_before) >= 3

    env["HANG_AT"] = "0"
    second = subprocess.run(args + ["resume", *map(str, ckpts)], env=env, capture_output=True,
                            text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resuming" in second.stdout
    rows = pq.read_table(tmp_path / "run" / "trials.parquet").to_pylist()
    assert len(rows) == 7 and all(r["status"] == "ok" for r in rows)
    weights = {tuple(round(r[f"w{i}"], 9) for i in range(1, 5)) for r in rows}
    assert len(weights) == 7
    # Each evaluation that finished before the kill was reused: one evaluation per trial.
    assert len(log.read_text().split()) == 7, (finished_before, log.read_text().split())
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "best")
    assert score_model(model, ckpts[-1]) == pytest.approx(summary["best_score"], abs=1e-5)


# --- a sweep that slides a window ---------------------------------------------------------------

def test_sweep_slides_a_window_of_three_along_four_checkpoints(ray_session, trajectory4, tmp_path):
    """Windows of 3 along 4 checkpoints; then `--resume` of the sweep as if it had been killed
    while window 1's run was ending."""
    out = tmp_path / "sweep"
    args = ["sweep", *map(str, trajectory4), "--window", "3", "--family", "ema",
            "--objective", f"loss:{trajectory4[-1].parent / 'heldout.jsonl'}", "--seq-len",
            "64", "--max-tokens", "2048", "--trials", "3", "--output", str(out), "--quiet",
            "--export-to", str(tmp_path / "exported")]
    code = cli(args)
    assert code == 0
    rows = pq.read_table(out / "sweep.parquet").to_pylist()
    assert [(r["earlier_step"], r["later_step"], r["window"]) for r in rows] == [
        (30, 90, 3), (60, 120, 3)]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["window"] == 3 and summary["family"] == "ema"
    assert summary["object_store"]["puts_per_checkpoint"] == {c.name: 1 for c in trajectory4}
    for r in rows:
        assert r["status"] == "ok" and r["evaluations"] == 3
        run = json.loads((out / r["run_dir"] / "summary.json").read_text())
        assert run["kind"] == "window" and [Path(c).name for c in run["checkpoints"]] == [
            c.name for c in trajectory4[r["pair"]:r["pair"] + 3]]
        weights = json.loads(r["best_weights"])
        assert sum(weights) == pytest.approx(1.0, abs=1e-5)
        # the EMA design scores the newest alone (rate 1): the gain is over it
        assert r["later_score"] == run["single_scores"][Path(r["later"]).name]
        assert r["gain"] == pytest.approx(r["later_score"] - r["best_score"]) and r["gain"] >= 0
        # --export-to: each window's best/ published under the prefix, named by its run dir
        published = read_safetensors(tmp_path / "exported" / Path(r["run_dir"]).name / "best")
        assert published.keys() == read_safetensors(out / r["run_dir"] / "best").keys()

    # A sweep killed as window 1's run was ending (its trials done, no summary or row yet):
    # --resume keeps window 0's row and resumes window 1's own run, redoing no evaluation.
    pq.write_table(pq.read_table(out / "sweep.parquet").slice(0, 1), out / "sweep.parquet")
    (out / rows[1]["run_dir"] / "summary.json").unlink()
    journal = out / rows[1]["run_dir"] / "evaluations"
    before = {p.name: p.stat().st_mtime_ns for p in journal.iterdir()}
    assert cli(args + ["--resume"]) == 0
    again = pq.read_table(out / "sweep.parquet").to_pylist()
    assert again[0] == rows[0] and len(again) == 2
    assert {k: again[1][k] for k in ("status", "best_weights", "best_score", "evaluations")} == {
        k: rows[1][k] for k in ("status", "best_weights", "best_score", "evaluations")}
    assert {p.name: p.stat().st_mtime_ns for p in journal.iterdir()} == before
    assert json.loads((out / rows[1]["run_dir"] / "summary.json").read_text())["resumed"]
