"""The CLI's exit-code promise for tune, sweep and compare: 2 and a one-line reason, both for a
bad argument (refused before anything is stored) and for a run that fails whole (every trial,
every pair, every method). Driven through `main()` in this process, on the session's Ray."""

import shutil

import pytest
from safetensors.torch import load_file, save_file

from ckmerge_ray.cli import main as cli_main

SEQ = ("--seq-len", 64, "--max-tokens", 1024)


@pytest.fixture(scope="module")
def broken_pair(trajectory, tmp_path_factory):
    """Two real checkpoints whose final norm weight is 3e38: finite, so they are stored, but the
    normalized hidden states overflow to inf and every merge scores NaN. An objective that fails
    at every λ, for real."""
    out = tmp_path_factory.mktemp("broken")
    for src in trajectory[-2:]:
        shutil.copytree(src, out / src.name)
        path = out / src.name / "model.safetensors"
        tensors = load_file(path)
        tensors["model.norm.weight"].fill_(3e38)
        save_file(tensors, path, metadata={"format": "pt"})
    shutil.copy(trajectory[-1].parent / "heldout.jsonl", out / "heldout.jsonl")
    return [out / p.name for p in trajectory[-2:]], out / "heldout.jsonl"


def run_cli(capsys, *args):
    """(exit code, the last line of stderr) of the CLI's main() run here."""
    code = cli_main([str(a) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


@pytest.fixture
def no_store(monkeypatch):
    """Records every checkpoint put into the object store (a spy: the real put still runs)."""
    import ckmerge_ray.inputs

    puts = []
    real = ckmerge_ray.inputs.put_checkpoint
    monkeypatch.setattr(ckmerge_ray.inputs, "put_checkpoint",
                        lambda info, *a, **k: puts.append(info.path) or real(info, *a, **k))
    return puts


@pytest.mark.parametrize("command,flag,value,message", [
    ("tune", "--alpha", 1.5, "alpha must be in [0, 1), got 1.5"),
    ("sweep", "--alpha", 1.5, "alpha must be in [0, 1), got 1.5"),
    ("compare", "--alpha", 1.5, "alpha must be in [0, 1), got 1.5"),
    ("sweep", "--trials", 1, "num_trials must be at least 2"),
    ("compare", "--ema-alpha", 2.0, "ema_alpha must be in (0, 1], got 2.0"),
])
def test_bad_argument_exits_2_before_anything_is_stored(trajectory, tmp_path, capsys, no_store,
                                                       command, flag, value, message):
    heldout = trajectory[-1].parent / "heldout.jsonl"
    ckpts = trajectory[-2:] if command != "sweep" else [trajectory[-1].parent]
    code, err = run_cli(capsys, command, *ckpts, "--objective", f"loss:{heldout}", *SEQ,
                        flag, value, "--output", tmp_path / "out")
    assert code == 2
    assert err.startswith("ckmerge-ray: error: ") and message in err
    assert no_store == []
    assert not (tmp_path / "out").exists()


def test_tune_with_every_trial_failing_exits_2(ray_session, broken_pair, tmp_path, capsys):
    (earlier, later), heldout = broken_pair
    code, err = run_cli(capsys, "tune", earlier, later, "--objective", f"loss:{heldout}", *SEQ,
                        "--trials", 2, "--max-concurrent", 1, "--output", tmp_path / "t")
    assert code == 2
    assert err.startswith("ckmerge-ray: error: every trial failed; first error: ")
    assert "non-finite score" in err


def test_sweep_with_every_pair_failing_exits_2(ray_session, broken_pair, tmp_path, capsys):
    (earlier, later), heldout = broken_pair
    code, err = run_cli(capsys, "sweep", earlier, later, "--objective", f"loss:{heldout}", *SEQ,
                        "--trials", 2, "--max-concurrent", 1, "--output", tmp_path / "s")
    assert code == 2
    assert err.startswith("ckmerge-ray: error: every pair failed; first error: RunError: "
                          "every trial failed")
    assert (tmp_path / "s" / "sweep.parquet").exists()  # the failed pair is on record


def test_compare_with_every_method_failing_exits_2(ray_session, broken_pair, tmp_path, capsys):
    (earlier, later), heldout = broken_pair
    code, err = run_cli(capsys, "compare", earlier, later, "--objective", f"loss:{heldout}", *SEQ,
                        "--methods", "uniform,ema", "--max-concurrent", 1,
                        "--output", tmp_path / "c")
    assert code == 2
    assert err.startswith("ckmerge-ray: error: the later checkpoint ")
    assert "non-finite score" in err
