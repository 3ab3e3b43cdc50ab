"""End to end on real Ray Tune, real tiny Llama trajectories and real held-out text."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from ckmerge_ray import tune_merge
from ckmerge_ray.checkpoints import load_checkpoint_info
from ckmerge_ray.errors import CheckpointError, ConfigError, ObjectiveError
from ckmerge_ray.objectives import HeldoutLoss

SEQ = {"seq_len": 64, "max_tokens": 4096}


def heldout(ckpt):
    return f"loss:{ckpt.parent / 'heldout.jsonl'}"


def score_model(model, ckpt):
    obj = HeldoutLoss(ckpt.parent / "heldout.jsonl", **SEQ)
    obj.prepare(ckpt)
    return obj.evaluate(model.eval(), torch.device("cpu"))["score"]


def read_safetensors(ckpt):
    """A checkpoint's tensors, read here from its safetensors file(s), sharded or not."""
    index = ckpt / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists()
             else ["model.safetensors"])
    tensors = {}
    for f in files:
        tensors.update(load_file(str(ckpt / f)))
    return tensors


def model_at(pair, lam):
    """Independent path: no ckmerge_ray code. Both checkpoints read from their safetensors files,
    λ·b + (1-λ)·a computed here in float64 and cast once to the file's dtype, then loaded into a
    model from from_pretrained."""
    from transformers import AutoModelForCausalLM

    a, b = read_safetensors(pair[0]), read_safetensors(pair[1])
    assert set(a) == set(b)
    merged = {n: (lam * b[n].double() + (1 - lam) * a[n].double()).to(b[n].dtype)
              if b[n].is_floating_point() else b[n].clone() for n in b}
    model = AutoModelForCausalLM.from_pretrained(pair[1])
    missing, unexpected = model.load_state_dict(merged, strict=False)
    assert not unexpected, unexpected
    # only a tied weight (lm_head = embeddings, saved once) may be absent from the files
    loaded = {t.data_ptr() for n, t in model.state_dict().items() if n in merged}
    assert all(model.state_dict()[n].data_ptr() in loaded for n in missing), missing
    return model


@pytest.fixture(scope="module")
def run(ray_session, trajectory, tmp_path_factory):
    pair = (trajectory[-2], trajectory[-1])
    out = tmp_path_factory.mktemp("run")
    result = tune_merge(pair, {"cpu": 1}, objective=heldout(pair[1]), objective_options=SEQ,
                        num_trials=10, max_concurrent=2, output_dir=out, seed=0, progress=False)
    return pair, result


def test_run_evaluates_distinct_lambdas_and_reports_endpoints(run):
    pair, result = run
    rows = result.table.to_pylist()
    in_space = [r["lam"] for r in rows if r["lam"] >= 0.5]
    assert len(in_space) == 10 and len(set(np.round(in_space, 9))) == 10
    assert set(result.endpoint_scores) == {0.0, 1.0}
    assert all(np.isfinite(v) for v in result.endpoint_scores.values())
    on_disk = pq.read_table(result.output_dir / "trials.parquet")
    assert on_disk.num_rows == len(rows) == 11  # + λ = 0
    summary = json.loads((result.output_dir / "summary.json").read_text())
    assert summary["best_lambda"] == result.best_lambda
    assert summary["distinct_lambdas_in_space"] == 10
    # every run draws its λ landscape from the saved tables and lists it
    assert summary["plots"] == result.summary["plots"] == ["landscape.png"]
    assert (result.output_dir / "landscape.png").stat().st_size > 10_000


def test_best_lambda_beats_both_endpoints_when_the_landscape_allows(run):
    pair, result = run
    grid = np.linspace(0.5, 1.0, 11)
    scores = [score_model(model_at(pair, lam), pair[1]) for lam in grid]
    e0 = score_model(model_at(pair, 0.0), pair[1])
    e1 = scores[-1]
    assert result.endpoint_scores[1.0] == pytest.approx(e1, rel=1e-6)
    assert result.endpoint_scores[0.0] == pytest.approx(e0, rel=1e-6)
    assert min(scores) < min(e0, e1), "fixture trajectory should have an interior optimum"
    assert result.best_score < min(e0, e1)
    # Within 10 % of the available gain of the grid optimum.
    assert result.best_score <= min(scores) + 0.1 * (e1 - min(scores))


def test_best_model_reloads_and_reproduces_best_score(run):
    from transformers import AutoModelForCausalLM

    pair, result = run
    best = result.best_model_path
    assert (best / "model.safetensors.index.json").exists() and (best / "tokenizer.json").exists()
    model = AutoModelForCausalLM.from_pretrained(best)
    assert score_model(model, pair[1]) == pytest.approx(result.best_score, rel=1e-6)
    assert not list(result.output_dir.glob(".best-tmp-*"))


def test_checkpoints_stored_once_and_model_built_once_per_worker(run):
    _, result = run
    rows = result.table.to_pylist()
    obj = result.summary["object_store"]
    assert obj["puts_per_checkpoint"] == obj["shards_per_checkpoint"]
    # Every trial read the very same object IDs: nobody re-put or re-read a checkpoint.
    assert len({r["store_digest"] for r in rows}) == 1
    workers = {r["worker"] for r in rows}
    built = [r for r in rows if r["model_built"]]
    assert len(built) == len(workers) <= 2 < len(rows)


def test_bf16_sharded_pair_exports_exact_merge(ray_session, trajectory_bf16, tmp_path):
    pair = (trajectory_bf16[-2], trajectory_bf16[-1])
    result = tune_merge(pair, {"cpu": 1}, objective=heldout(pair[1]), objective_options=SEQ,
                        alpha=0.0, num_trials=4, max_concurrent=2, output_dir=tmp_path, progress=False)
    assert result.summary["object_store"]["shards_per_checkpoint"] == len(load_checkpoint_info(pair[1]).shard_files)
    lam = result.best_lambda
    ta, tb = read_safetensors(pair[0]), read_safetensors(pair[1])  # not the package's reader
    exported = {}
    for f in result.best_model_path.glob("*.safetensors"):
        exported.update(load_file(f))
    assert set(exported) == set(tb)
    for name, t in exported.items():
        assert t.dtype == torch.bfloat16
        exact = (lam * tb[name].double() + (1 - lam) * ta[name].double()).to(torch.bfloat16)
        diff = (t.view(torch.int16).int() - exact.view(torch.int16).int()).abs()
        assert int(diff.max()) <= 1, name


@pytest.mark.parametrize("kwargs,error,message", [
    ({"alpha": 1.0}, ConfigError, r"alpha must be in \[0, 1\), got 1.0"),
    ({"alpha": -0.1}, ConfigError, r"alpha must be in \[0, 1\), got -0.1"),
    ({"num_trials": 1}, ConfigError, "num_trials must be at least 2"),
    ({"alpha": 0.0}, ConfigError, r"num_trials=2 is smaller than the 3 initial points in \[0.0, 1\] \(λ = 0, 1, 0.5\)"),
    ({"initial_lambdas": [0.7]}, ConfigError, r"num_trials=2 is smaller than the 3 initial points .*λ = 0.5, 1, 0.7"),
    ({"initial_lambdas": [0.2]}, ConfigError, r"initial_lambdas must lie in \[alpha, 1\] = \[0.5, 1\], got \[0.2\]"),
    ({"allow_spilling": False, "resume": True}, ConfigError, "nothing to resume in .*: no run.json"),
    ({"resources": {"cpu": 64}}, ConfigError, "per-trial resources cpu=64, gpu=0 fit on no node"),
    ({"resources": {"tpu": 1}}, ConfigError, "resources keys must be 'cpu' and 'gpu'"),
    ({"objective": "loss:/nonexistent/x.jsonl"}, ObjectiveError, "held-out file does not exist"),
    ({"objective_options": {"text_field": "body"}}, ObjectiveError, "has no text field 'body'"),
    ({"objective": "lmeval:ckmerge_no_such_task", "objective_options": {}}, ObjectiveError,
     r"unknown lm-eval task\(s\) \['ckmerge_no_such_task'\]"),
])
def test_bad_input_fails_before_any_trial(ray_session, trajectory, tmp_path, kwargs, error, message):
    pair = (trajectory[-2], trajectory[-1])
    args = {"resources": {"cpu": 1}, "objective": heldout(pair[1]), "output_dir": tmp_path / "o",
            "progress": False, "num_trials": 2, **kwargs}
    with pytest.raises(error, match=message):
        tune_merge(pair, **args)
    assert not (tmp_path / "o" / "trials.parquet").exists()


def test_output_dir_with_another_run_is_refused(run, trajectory):
    pair, result = run
    with pytest.raises(ConfigError, match="already holds a run; pass resume=True .* overwrite=True"):
        tune_merge(pair, {"cpu": 1}, objective=heldout(pair[1]), output_dir=result.output_dir,
                   progress=False)


def test_mismatched_pair_fails_before_any_trial(trajectory, tiny_pair, tmp_path):
    with pytest.raises(CheckpointError, match="config field"):
        tune_merge((tiny_pair[0], trajectory[-1]), {"cpu": 1}, objective=heldout(trajectory[-1]),
                   output_dir=tmp_path, progress=False)


def object_store_bytes_used() -> int:
    """Bytes in this node's object store (Ray's internal memory-info call; no public API)."""
    import ray
    from ray._private import internal_api

    addr = ray.get_runtime_context().gcs_address
    return internal_api.get_memory_info_reply(internal_api.get_state_from_address(addr)).store_stats.object_store_bytes_used


def test_shards_are_released_when_the_run_ends(ray_session, trajectory, tmp_path):
    import gc
    import time

    pair = (trajectory[-2], trajectory[-1])
    before = object_store_bytes_used()
    result = tune_merge(pair, {"cpu": 1}, objective=heldout(pair[1]), objective_options=SEQ,
                        num_trials=2, max_concurrent=2, output_dir=tmp_path, progress=False,
                        export_best=False)
    checkpoint_bytes = result.summary["object_store"]["bytes_per_checkpoint"]
    gc.collect()
    deadline = time.time() + 20
    while object_store_bytes_used() - before >= checkpoint_bytes and time.time() < deadline:
        time.sleep(0.5)  # frees are asynchronous
    assert object_store_bytes_used() - before < checkpoint_bytes, "checkpoint shards still pinned"


def test_every_row_and_the_summary_account_for_the_evaluation(run):
    _, result = run
    rows = [r for r in result.table.to_pylist() if r["status"] == "ok"]
    for r in rows:
        assert r["eval_tokens"] == r["tokens"] > 0 and r["eval_seconds"] > 0
        assert r["eval_tokens_per_s"] == pytest.approx(r["eval_tokens"] / r["eval_seconds"],
                                                       rel=1e-6)
    totals = result.summary["evaluation"]
    assert totals["evaluations"] == len(rows)
    assert totals["eval_tokens"] == sum(r["eval_tokens"] for r in rows)
    assert totals["eval_seconds"] == pytest.approx(sum(r["eval_seconds"] for r in rows))
    assert totals["batch_sizes"] == sorted({r["eval_batch_size"] for r in rows})
    assert totals["peak_mem_mb_max"] == max(r["eval_peak_mem_mb"] for r in rows)
