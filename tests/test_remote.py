"""Checkpoints on object storage: a real S3-compatible server (moto) on loopback, in front of it a
TCP proxy that counts the bytes this process downloads (tests/s3server.py). `tune` and `sweep`
read Hugging Face and DCP checkpoints from it and publish best/ to it; each stored tensor is
read once, and nothing of a checkpoint is staged on local disk."""

import os
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckmerge_ray import sweep_trajectory, tune_merge
from ckmerge_ray.checkpoints.dcp import read_metadata
from ckmerge_ray.errors import CheckpointError
from ckmerge_ray.storage import clear_instance_caches, locate, read_counter
from tests.s3server import s3_server  # noqa: F401,F811 - pytest fixture
from tests.test_dcp import save_fsdp_layout

SEQ = {"seq_len": 64, "max_tokens": 2048}
ARGS = dict(objective_options=SEQ, num_trials=3, max_concurrent=1, seed=0, progress=False)


@pytest.fixture(scope="module")
def s3(s3_server, tmp_path_factory):  # noqa: F811
    """The server's credentials and endpoint (through the counting proxy) in the environment,
    no other AWS_* settings, and a fresh temporary directory for anything staged locally."""
    staged = tmp_path_factory.mktemp("staged")
    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            if name.startswith("AWS_"):
                mp.delenv(name)
        for name, value in s3_server.proxy_env.items():
            mp.setenv(name, value)
        mp.setattr(tempfile, "tempdir", str(staged))
        clear_instance_caches()
        s3_server.staged = staged
        yield s3_server
    clear_instance_caches()


@pytest.fixture(scope="module")
def uploaded(s3_server, trajectory, tmp_path_factory):  # noqa: F811
    """The last two checkpoints as HF directories and in the Trainer FSDP (DCP) layout, and the
    held-out text, in bucket `ckpts`."""
    dcp_dir = tmp_path_factory.mktemp("dcp_upload")
    for c in trajectory[-2:]:
        s3_server.upload_dir(c, f"s3://ckpts/hf/{c.name}")
        s3_server.upload_dir(save_fsdp_layout(c, dcp_dir / c.name), f"s3://ckpts/dcp/{c.name}")
    s3_server.fs.put_file(str(trajectory[-1].parent / "heldout.jsonl"), "ckpts/data/heldout.jsonl")
    return trajectory[-2:]


def weight_bytes(counts, prefix, suffix):
    return sum(n for uri, n in counts.items() if uri.startswith(prefix) and uri.endswith(suffix))


def local_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def hf_run(ray_session, s3, uploaded, tmp_path_factory):
    """tune from the HF pair on S3, best/ published to S3; bytes read counted."""
    read_counter(reset=True)
    s3.reset_count()
    result = tune_merge(("s3://ckpts/hf/checkpoint-80", "s3://ckpts/hf/checkpoint-120"),
                        {"cpu": 1}, "loss:s3://ckpts/data/heldout.jsonl",
                        output_dir=tmp_path_factory.mktemp("hf_run"),
                        export_to="s3://ckpts/out/best", **ARGS)
    return result, read_counter(), s3.bytes_from_server()


def test_tune_reads_s3_once_and_publishes_best_there(s3, uploaded, hf_run):
    result, counts, downloaded = hf_run
    size = (uploaded[0] / "model.safetensors").stat().st_size
    for c in uploaded:  # the header (8 bytes + JSON) and every tensor, each once
        f = c / "model.safetensors"
        assert weight_bytes(counts, f"s3://ckpts/hf/{c.name}/", ".safetensors") == f.stat().st_size
    # The proxy counts everything the server sent (HTTP headers, listings, small files): at
    # least what our reads asked for, and less than a second copy of one checkpoint more.
    assert sum(counts.values()) <= downloaded < sum(counts.values()) + size
    # Nothing of the checkpoints was staged locally: the temporary directory holds at most the
    # tokenizer's small files.
    assert local_bytes(s3.staged) < size / 4
    remote = locate("s3://ckpts/out/best")  # best/ on S3 is the local best/, file for file
    names = sorted(c.name for c in remote.listdir())
    assert names == sorted(p.name for p in result.best_model_path.iterdir())
    for name in names:
        assert (remote / name).read_bytes() == (result.best_model_path / name).read_bytes()
    rows = result.table.to_pylist()  # λ = 0 and three in [0.5, 1]
    assert len(rows) == 4 and {r["status"] for r in rows} == {"ok"}


def test_sweep_discovers_dcp_checkpoints_under_a_uri(ray_session, s3, uploaded, tmp_path):
    read_counter(reset=True)
    result = sweep_trajectory("s3://ckpts/dcp", {"cpu": 1}, "loss:s3://ckpts/data/heldout.jsonl",
                              output_dir=tmp_path / "sweep", export_to="s3://ckpts/sweep", **ARGS)
    rows = result.table.to_pylist()
    assert [(r["earlier_step"], r["later_step"], r["status"]) for r in rows] == [(80, 120, "ok")]
    # each pair's best/ is published under export_to, named by its run directory, file for file
    local = result.output_dir / rows[0]["run_dir"] / "best"
    remote = locate(f"s3://ckpts/sweep/{Path(rows[0]['run_dir']).name}/best")
    names = sorted(c.name for c in remote.listdir())
    assert names == sorted(p.name for p in local.iterdir())
    for name in names:
        assert (remote / name).read_bytes() == (local / name).read_bytes()
    # nothing of the checkpoints was staged locally (as for tune)
    assert local_bytes(s3.staged) < (uploaded[0] / "model.safetensors").stat().st_size / 4
    counts = read_counter()
    for c in uploaded:  # the model's items of the .distcp, each once; the optimizer's never
        weights = locate(f"s3://ckpts/dcp/{c.name}/pytorch_model_fsdp_0")
        metadata = read_metadata(weights)
        model_items = sum(i.length for k, i in metadata.storage_data.items()
                          if k.fqn.startswith("model."))
        assert weight_bytes(counts, weights.uri + "/", ".distcp") == model_items
        everything = sum(i.length for i in metadata.storage_data.values())
        assert model_items < everything / 2  # AdamW's two moments stayed on the server


def test_dcp_on_s3_tunes_like_hf_on_s3(s3, uploaded, hf_run, tmp_path):
    hf = hf_run[0]
    dcp = tune_merge(("s3://ckpts/dcp/checkpoint-80", "s3://ckpts/dcp/checkpoint-120"),
                     {"cpu": 1}, "loss:s3://ckpts/data/heldout.jsonl",
                     output_dir=tmp_path / "remote", **ARGS)
    key = lambda r: r["lam"]  # noqa: E731
    assert [(r["lam"], r["score"]) for r in sorted(hf.table.to_pylist(), key=key)] == \
        [(r["lam"], r["score"]) for r in sorted(dcp.table.to_pylist(), key=key)]
    a, b = (load_file(r.best_model_path / "model-00001-of-00001.safetensors") for r in (hf, dcp))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("pair, export_to, message", [
    (("s3://nobucket/a", "s3://nobucket/b"), None, "bucket 'nobucket' does not exist"),
    (("s3://ckpts/hf/checkpoint-80", "s3://ckpts/hf/checkpoint-999"), None,
     "has no object or prefix 'hf/checkpoint-999'"),
    (("s3://ckpts/hf/checkpoint-80", "s3://ckpts/hf/checkpoint-120"), "s3://nobucket/best",
     "bucket 'nobucket' does not exist"),
])
def test_bad_uris_are_refused_before_any_trial(s3, uploaded, tmp_path, pair, export_to,
                                              message):
    with pytest.raises(CheckpointError, match=message):
        tune_merge(pair, {"cpu": 1}, "loss:s3://ckpts/data/heldout.jsonl",
                   output_dir=tmp_path / "run", export_to=export_to, **ARGS)
    assert not (tmp_path / "run" / "trials.parquet").exists()


def test_sweep_refuses_a_missing_export_bucket_before_any_pair(s3, uploaded, tmp_path):
    with pytest.raises(CheckpointError, match="bucket 'nobucket' does not exist"):
        sweep_trajectory("s3://ckpts/dcp", {"cpu": 1}, "loss:s3://ckpts/data/heldout.jsonl",
                         output_dir=tmp_path / "sweep", export_to="s3://nobucket/sweep", **ARGS)
    assert not (tmp_path / "sweep").exists()


def test_missing_credentials_name_where_they_were_looked_for(s3, uploaded, tmp_path,
                                                             monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    clear_instance_caches()
    with pytest.raises(CheckpointError) as err:
        tune_merge(("s3://ckpts/hf/checkpoint-80", "s3://ckpts/hf/checkpoint-120"), {"cpu": 1},
                   "loss:x.jsonl", output_dir=tmp_path / "run", **ARGS)
    assert "AWS_ACCESS_KEY_ID" in str(err.value) and "Traceback" not in str(err.value)
