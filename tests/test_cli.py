"""The CLI driven for real: in a subprocess (the end-to-end run joins the session's Ray with
--address, as a job joins a cluster, which spares a Ray start-up), or (for input errors refused
before Ray starts) through `main()` in this process, which spares a fresh interpreter importing
lm-eval (about 10 s each on 2 cores)."""

import json
import subprocess
import sys

from ckmerge_ray.cli import main as cli_main


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "ckmerge_ray.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def test_help():
    r = cli("tune", "--help")
    assert r.returncode == 0
    for flag in ("--objective", "--alpha", "--trials", "--cpus-per-trial", "--gpus-per-trial", "--output"):
        assert flag in r.stdout


def test_missing_checkpoint_is_one_line_and_nonzero(tmp_path, capsys):
    code, err = in_process(capsys, "tune", tmp_path / "a", tmp_path / "b", "--objective", "loss:x.jsonl",
                           "--output", tmp_path / "o")
    assert code == 2
    assert err.strip().splitlines() == [f"ckmerge-ray: error: checkpoint directory {tmp_path / 'a'} does not exist"]


def test_bad_alpha_is_refused_before_reading_checkpoints(trajectory, tmp_path, capsys):
    code, err = in_process(capsys, "tune", trajectory[-2], trajectory[-1], "--objective", "loss:x.jsonl",
                           "--alpha", "1.5", "--output", tmp_path / "o")
    assert code == 2
    assert "alpha must be in [0, 1), got 1.5" in err


def test_tune_end_to_end(ray_session, trajectory, tmp_path, capsys):
    out = tmp_path / "run"
    address = ray_session.get_runtime_context().gcs_address
    r = cli("tune", trajectory[-2], trajectory[-1], "--objective", f"loss:{trajectory[-1].parent / 'heldout.jsonl'}",
            "--seq-len", 64, "--max-tokens", 2048, "--trials", 4, "--cpus-per-trial", 1,
            "--gpus-per-trial", 0, "--max-concurrent", 2, "--output", out, "--address", address)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"joined the Ray cluster at {address}" in r.stdout  # --address reached the run
    summary = json.loads((out / "summary.json").read_text())
    assert f"best λ={summary['best_lambda']:.4f}" in r.stdout
    assert "gain vs λ=0" in r.stdout and "best model: " in r.stdout
    assert r.stdout.count("[ckmerge] trial ") == 5  # progress line per trial (4 + λ=0)
    # refused before Ray is touched, so main() in this process serves
    code, err = in_process(capsys, "tune", trajectory[-2], trajectory[-1], "--objective", "loss:x.jsonl",
                           "--output", out)
    assert code == 2 and "already holds a run" in err


def in_process(capsys, *args):
    """(exit code, stderr) of the CLI's main() run here."""
    code = cli_main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_unknown_lmeval_task_is_one_line_exit_2(trajectory, tmp_path, capsys):
    code, err = in_process(capsys, "tune", trajectory[-2], trajectory[-1], "--objective",
                           "lmeval:ckmerge_no_such_task", "--include-path", tmp_path,
                           "--output", tmp_path / "run")
    assert code == 2
    assert err.strip().startswith("ckmerge-ray: error: unknown lm-eval task(s) ['ckmerge_no_such_task']")
    assert not (tmp_path / "run" / "trials.parquet").exists()


def test_demo_with_too_few_steps_for_two_checkpoints_is_refused(tmp_path):
    import pytest

    from ckmerge_ray.demo import TrajectoryConfig, run_demo
    from ckmerge_ray.errors import ConfigError

    with pytest.raises(ConfigError, match=r"steps \(100\) must be at least 2 × save_every \(100\)"):
        run_demo(tmp_path, cfg=TrajectoryConfig(steps=100, save_every=100))
    assert not list(tmp_path.iterdir())  # refused before any training


def test_objective_file_and_screening_flags_reach_the_checks(trajectory, tmp_path, capsys):
    from ckmerge_ray.demo import make_lmeval_tasks

    tasks = make_lmeval_tasks(trajectory[-1].parent / "heldout.jsonl", tmp_path / "tasks", docs=8)
    spec = tmp_path / "objective.yaml"
    spec.write_text(f"lmeval:\n  tasks: [ckmerge_stdlib_mc]\n  metrics: word_perplexity\n"
                    f"  include_path: {tasks}\n")
    code, err = in_process(capsys, "tune", trajectory[-2], trajectory[-1], "--objective", spec,
                           "--output", tmp_path / "a")
    assert code == 2  # the file's options arrived: its metric is checked against the task
    assert err.strip().splitlines()[-1] == ("ckmerge-ray: error: task 'ckmerge_stdlib_mc' does not produce metric "
                                            "'word_perplexity'; it produces ['acc']")
    code, err = in_process(capsys, "tune", trajectory[-2], trajectory[-1], "--objective",
                           f"loss:{trajectory[-1].parent / 'heldout.jsonl'}", "--screen-limit", 10,
                           "--output", tmp_path / "b")
    assert code == 2 and "no cheaper subset for multi-fidelity screening" in err
