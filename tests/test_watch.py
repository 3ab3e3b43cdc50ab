"""Following a run as it trains: a writer process lays checkpoints down slowly while
`watch_trajectory` tunes each new pair; a killed watch resumes without redoing work; a real
Trainer run marks its checkpoints complete (CkmergeCallback) and lays out the folder discovery
reads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from ckmerge_ray import discover_checkpoints, watch_trajectory
from ckmerge_ray.config import CheckpointConfig
from ckmerge_ray.errors import ConfigError
from ckmerge_ray.objectives import HeldoutLoss
from ckmerge_ray.watch_outputs import BEST_OVERALL_DIR, LATEST_DIR
from ckmerge_ray.watch_poll import checkpoint_state
from tests.test_tune import model_at

OBJ = {"seq_len": 64, "max_tokens": 1024}
SWEEP_COLUMNS = {"pair", "earlier", "later", "earlier_step", "later_step", "run_dir",
                 "store_digest", "status", "error", "earlier_score", "later_score", "best_lambda",
                 "best_score", "gain", "gain_over_earlier", "evaluations", "wall_s"}
CLI = str(Path(sys.executable).with_name("ckmerge-ray"))

# Copies checkpoints into the watched folder as save_pretrained does (config, weights, then
# tokenizer files), with a pause before each checkpoint; CHUNKED waits for WAIT_FOR (the first
# pair's row: the watch polls again), then its weights are written in five pieces 1 s apart
# (longer than the watch's poll), so they sit truncated but unchanged across polls. Every finished file is noted with its time.
WRITER = r"""
import json, sys, time
from pathlib import Path
srcs, dest, log, chunked = [Path(p) for p in json.loads(sys.argv[1])], Path(sys.argv[2]), \
    open(sys.argv[3], "a"), sys.argv[4]
wait_for = Path(sys.argv[5])
while not (wait_for.parent / "watch.json").exists():  # the watch started before the run
    time.sleep(0.05)
def note(**kw):
    log.write(json.dumps({**kw, "t": time.time()}) + "\n"); log.flush()
for src in srcs:
    while src.name == chunked and not wait_for.exists():  # the watch is polling again
        time.sleep(0.1)
    time.sleep(1.0)
    d = dest / src.name
    d.mkdir(parents=True)
    first = [f for f in ("config.json", "generation_config.json", "model.safetensors")
             if (src / f).exists()]
    for name in first + sorted(p.name for p in src.iterdir() if p.name not in first):
        data = (src / name).read_bytes()
        with open(d / name, "wb") as f:
            if name == "model.safetensors" and src.name == chunked:
                for i in range(5):
                    f.write(data[i * len(data) // 5:(i + 1) * len(data) // 5])
                    f.flush()
                    note(ckpt=src.name, piece=i)
                    time.sleep(1.0)
            else:
                f.write(data)
        note(ckpt=src.name, file=name)
        time.sleep(0.05)
    note(ckpt=src.name, done=True)
"""


def _score(model_dir: Path, ckpt: Path) -> float:
    from transformers import AutoModelForCausalLM

    obj = HeldoutLoss(ckpt.parent / "heldout.jsonl", **OBJ)
    obj.prepare(ckpt)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return obj.evaluate(model.eval(), torch.device("cpu"))["score"]


def _journal(run: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in (run / "evaluations").glob("lam=*.json")}


def test_watch_refuses_a_file_or_a_path_that_cannot_become_a_run_directory(tmp_path):
    """Before anything starts: a file as the run directory, and a path whose parent is
    missing (a typo, which would otherwise poll all night); the run directory itself may be
    missing (the watch started before the trainer: the next test)."""
    heldout = tmp_path / "heldout.txt"
    heldout.write_text("text")
    for source, message in ((heldout, "is a file, not a directory"),
                            (tmp_path / "no" / "run", "does not exist, nor does its parent")):
        with pytest.raises(ConfigError, match=message):
            watch_trajectory(source, {"cpu": 1}, f"loss:{heldout}", output_dir=tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_watch_tunes_each_pair_once_as_checkpoints_land(ray_session, trajectory, tmp_path, capsys):
    watched, out, notes = tmp_path / "run", tmp_path / "watch", tmp_path / "writer.jsonl"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    writer = subprocess.Popen([sys.executable, str(script), json.dumps([str(p) for p in trajectory]),
                               str(watched), str(notes), trajectory[2].name,
                               str(out / "sweep.parquet")])
    try:
        result = watch_trajectory(
            watched, {"cpu": 1}, f"loss:{trajectory[0].parent / 'heldout.jsonl'}",
            objective_options=OBJ, num_trials=2, max_concurrent=2, output_dir=out,
            poll_seconds=0.3, max_pairs=2, idle_timeout=120, export_to=tmp_path / "exported")
    finally:
        writer.wait(timeout=60)  # it has finished: the watch saw its last checkpoint whole
        if writer.poll() is None:
            os.kill(writer.pid, signal.SIGKILL)
    log = capsys.readouterr().out
    assert f"{watched} does not exist yet: waiting for the trainer to create it" in log, log
    rows = result.table.to_pylist()
    assert [(r["earlier_step"], r["later_step"], r["status"]) for r in rows] == \
        [(40, 80, "ok"), (80, 120, "ok")]
    assert SWEEP_COLUMNS <= set(result.table.column_names)
    assert pq.read_table(out / "sweep.parquet").num_rows == 2
    # each pair tuned once: 3 evaluations (λ = 0, 1 and one more), each computed once
    for r in rows:
        run = out / r["run_dir"]
        trials = pq.read_table(run / "trials.parquet").to_pylist()
        assert len(trials) == 3 and not any(t.get("from_journal") for t in trials)
        assert len(_journal(run)) == 3 == r["evaluations"]
        # and its best/ published under export_to, named by its run directory
        exported = tmp_path / "exported" / run.name / "best"
        assert sorted(p.name for p in exported.iterdir()) == \
            sorted(p.name for p in (run / "best").iterdir())
        assert all((exported / p.name).read_bytes() == p.read_bytes()
                   for p in (run / "best").iterdir())
    assert result.summary["object_store"]["puts_per_checkpoint"] == \
        {p.name: 1 for p in trajectory}
    # never read while being written: declared complete only after the writer's last byte,
    # and checkpoint-120 was seen truncated in between (its header against its size)
    written = {}
    for line in notes.read_text().splitlines():
        n = json.loads(line)
        if n.get("done"):
            written[n["ckpt"]] = n["t"]
    completed = result.summary["checkpoints"]
    assert set(completed) == {p.name for p in trajectory}
    for name, t in written.items():
        assert completed[name]["complete_at"] > t, name
    assert "checkpoint-120 not complete yet: cannot read" in log and "truncated" in log, \
        [line for line in log.splitlines() if "checkpoint-120" in line]
    # latest/ is the newest pair's best merge of the final bytes, and scores as reported
    latest = out / LATEST_DIR
    best = rows[-1]
    assert _score(latest, trajectory[2]) == pytest.approx(best["best_score"], rel=1e-6)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(latest, dtype=torch.float32)
    expected = model_at((trajectory[1], trajectory[2]), best["best_lambda"]).state_dict()
    for name, t in model.state_dict().items():
        torch.testing.assert_close(t, expected[name], rtol=0, atol=1e-6)
    # best_overall/ is the pair with the lowest loss
    leader = min(rows, key=lambda r: r["best_score"])
    assert result.summary["best_overall"]["pair"] == leader["pair"]
    assert _score(out / BEST_OVERALL_DIR, trajectory[2]) == pytest.approx(
        leader["best_score"], rel=1e-6)
    assert (out / "sweep_gain.png").exists()
    for lat in result.summary["latency"]:
        print(f"LATENCY {lat['later']}: written->published "
              f"{lat['published_at'] - written[lat['later']]:.2f}s (detect "
              f"{lat['complete_at'] - written[lat['later']]:.2f}s, store {lat['store_s']:.2f}s, "
              f"tune {lat['tune_s']:.2f}s of tune_merge {lat['tune_merge_total_s']:.2f}s, "
              f"publish {lat['publish_s']:.3f}s)", file=sys.__stdout__)


def test_killed_watch_resumes_without_redoing_a_pair_or_an_evaluation(ray_session, trajectory,
                                                                      tmp_path):
    """SIGKILL the `ckmerge-ray watch` driver once the second pair has journaled an evaluation;
    a resumed watch finishes it, reusing every journaled evaluation and the first pair."""
    out = tmp_path / "watch"
    heldout = trajectory[0].parent / "heldout.jsonl"
    args = [str(trajectory[0].parent), "--objective", f"loss:{heldout}", "--seq-len", "64",
            "--max-tokens", str(OBJ["max_tokens"]), "--trials", "2", "--max-concurrent", "1",
            "--poll-seconds", "0.2", "--max-pairs", "2", "--output", str(out), "--quiet",
            "--max-concurrent-pairs", "1"]  # the second pair starts once the first is recorded
    address = ray_session.get_runtime_context().gcs_address  # join this cluster: one Ray
    driver = subprocess.Popen([CLI, "watch", *args, "--address", address],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    second = out / "pairs" / f"01-{trajectory[1].name}-{trajectory[2].name}"
    try:
        deadline = time.monotonic() + 240
        while not _journal(second) and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert driver.poll() is None, driver.stdout.read()
        assert _journal(second), "the second pair never journaled an evaluation"
    finally:
        if driver.poll() is None:
            os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    first = out / "pairs" / f"00-{trajectory[0].name}-{trajectory[1].name}"
    rows = pq.read_table(out / "sweep.parquet").to_pylist()
    assert [r["later_step"] for r in rows] == [80]  # the first pair was recorded, not the second
    before = {first: _journal(first), second: _journal(second)}
    first_summary = (first / "summary.json").stat().st_mtime_ns
    result = watch_trajectory(trajectory[0].parent, {"cpu": 1}, f"loss:{heldout}",
                              objective_options={"text_field": "text", **OBJ},  # as the CLI
                              num_trials=2, max_concurrent=1, max_concurrent_pairs=1,
                              output_dir=out, resume=True,
                              poll_seconds=0.2, max_pairs=2, idle_timeout=60, progress=False)
    rows = result.table.to_pylist()
    assert [(r["later_step"], r["status"]) for r in rows] == [(80, "ok"), (120, "ok")]
    assert (first / "summary.json").stat().st_mtime_ns == first_summary  # pair 1 not redone
    for run, journaled in before.items():
        now = _journal(run)
        assert all(now[name] == mtime for name, mtime in journaled.items())  # never recomputed
        assert len(now) == 3
    trials = pq.read_table(second / "trials.parquet").to_pylist()
    assert len(trials) == 3
    assert (out / LATEST_DIR / "config.json").exists()


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=64, seq=16, vocab=64):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_trainer_callback_marks_complete_saves_and_discovery_reads_the_layout(tmp_path):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from ckmerge_ray.integrations import MARKER, CkmergeCallback
    from tests.conftest import tiny_llama

    seen = []

    class Check(TrainerCallback):  # runs after CkmergeCallback in the same on_save
        def on_save(self, args, state, control, **kw):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            marker = folder / MARKER
            others = [p for p in folder.iterdir() if p.name != MARKER]
            seen.append((state.global_step, marker.exists(),
                         all(p.stat().st_mtime_ns <= marker.stat().st_mtime_ns for p in others),
                         (folder / "trainer_state.json").exists()))

    run = tmp_path / "run"
    args = TrainingArguments(output_dir=str(run), max_steps=40, save_steps=10,
                             per_device_train_batch_size=4, learning_rate=1e-3, report_to=[],
                             use_cpu=True, logging_steps=100, disable_tqdm=True, seed=0)
    trainer = Trainer(model=tiny_llama(0), args=args, train_dataset=_Tokens(),
                      callbacks=[CkmergeCallback(), Check()])
    trainer.train()
    assert seen == [(s, True, True, True) for s in (10, 20, 30, 40)]
    for s in (10, 20, 30, 40):
        marker = json.loads((run / f"checkpoint-{s}" / MARKER).read_text())
        assert marker["step"] == s
        fp, why = checkpoint_state(Location_of(run / f"checkpoint-{s}"), MARKER,
                                   CheckpointConfig())
        assert fp is not None, why
    trainer.save_model()  # the final model at the top of the run folder
    lines = []
    found = discover_checkpoints(run, log=lines.append)
    assert [s for s, _ in found] == [10, 20, 30, 40]
    assert any("model of its own" in line and "not part of" in line for line in lines)
    # transformers saved the last step as checkpoint-40 too: the top model is that, not a point
    found = discover_checkpoints(run, include_final=True, log=lines.append)
    assert [s for s, _ in found] == [10, 20, 30, 40]
    assert "the same weight files as checkpoint-40: not a new point" in lines[-1], lines
    with torch.no_grad():  # a final model of its own (say, trained on after the last save)
        next(trainer.model.parameters()).add_(1e-3)
    trainer.save_model()
    found = discover_checkpoints(run, include_final=True, log=lines.append)
    assert [s for s, _ in found] == [10, 20, 30, 40, 41] and found[-1][1] == run


def Location_of(path: Path):
    from ckmerge_ray.storage import locate

    return locate(path)
