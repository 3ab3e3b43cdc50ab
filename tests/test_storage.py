"""storage.py against local paths and a real S3 server (moto on loopback, tests/s3server.py).

No mocks: bytes on the wire are counted by a TCP proxy in front of the server and requests are
read from the server's own log. publish_dir's `log` callback is the hook that lets a test list
the bucket between the steps of a publish.
"""

import json
import os
import pickle
import re
from urllib.parse import urlparse

import pytest

from ckmerge_ray import publish, storage
from ckmerge_ray.errors import CheckpointError
from tests.s3server import s3_env, s3_server  # noqa: F401 - pytest fixtures

STEP = re.compile(r"^(?:checkpoint-|step-?)(\d+)$")  # the lead passes inputs.CHECKPOINT_NAME
SECRET = "s3cr3t-DO-NOT-PRINT-4711"


def make_model(d, files):
    d.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    return d


OLD = {"config.json": '{"v": "old"}', "model.safetensors.index.json": '{"weight_map": {}}',
       "model-00001-of-00002.safetensors": b"old-1" * 100, "model-00002-of-00002.safetensors": b"old-2",
       "old_only.txt": "stale"}
NEW = {"config.json": '{"v": "new"}', "model.safetensors": b"new" * 1000, "tokenizer.json": "{}"}


def test_is_uri():
    assert storage.is_uri("s3://b/k") and storage.is_uri("gs://b") and storage.is_uri("simplecache::s3://b/k")
    assert not storage.is_uri("/abs/path") and not storage.is_uri("rel/path")
    assert not storage.is_uri("file:///abs/path")
    from pathlib import Path
    assert not storage.is_uri(Path("s3:/x"))


def test_local_location(tmp_path, monkeypatch):
    make_model(tmp_path / "run" / "checkpoint-100", {"config.json": "{}", "w.bin": bytes(range(256))})
    (tmp_path / "run" / "step-7").mkdir()
    monkeypatch.chdir(tmp_path)
    loc = storage.locate("run/checkpoint-100")
    assert loc.is_local and loc.uri == str(tmp_path / "run" / "checkpoint-100")
    assert loc.local_path == tmp_path / "run" / "checkpoint-100" and loc.name == "checkpoint-100"
    assert loc.parent.uri == str(tmp_path / "run") and loc.isdir() and not loc.isfile()
    assert [c.name for c in loc.listdir()] == ["config.json", "w.bin"]
    w = loc / "w.bin"
    assert w.read_range(10, 14) == bytes([10, 11, 12, 13]) and w.size() == 256
    before, dir_before = w.fingerprint(), loc.fingerprint()
    (tmp_path / "run" / "checkpoint-100" / "w.bin").write_bytes(b"x" * 256)  # same size
    assert w.fingerprint() != before and loc.fingerprint() != dir_before
    assert [(s, c.name) for s, c in storage.discover_children("run", STEP)] == [(7, "step-7"), (100, "checkpoint-100")]
    with pytest.raises(CheckpointError, match=r"checkpoint .*nope does not exist"):
        storage.locate("run/nope")
    with pytest.raises(CheckpointError, match="shorter"):
        w.read_range(250, 260)
    with pytest.raises(ValueError, match="0 <= start <= end"):
        w.read_range(5, 4)


def test_s3_location(s3_env, tmp_path):
    make_model(tmp_path / "ck", {"config.json": '{"a": 1}', "w.bin": b"0123456789" * 10})
    make_model(tmp_path / "ck" / "sub", {"x": "y"})
    s3_env.upload_dir(tmp_path / "ck", "s3://models/run/checkpoint-900")
    loc = storage.locate("s3://models/run/checkpoint-900/")
    assert storage.is_uri(loc) and not loc.is_local and loc.local_path is None
    assert loc.uri == "s3://models/run/checkpoint-900" and loc.path == "models/run/checkpoint-900"
    assert loc.name == "checkpoint-900" and loc.parent.uri == "s3://models/run"
    assert loc.exists() and loc.isdir() and not loc.isfile()
    assert [c.name for c in loc.listdir()] == ["config.json", "sub", "w.bin"]
    cfg = loc / "config.json"
    assert cfg.isfile() and json.loads(cfg.read_text()) == {"a": 1}
    assert (loc / "w.bin").size() == 100 and (loc / "w.bin").read_range(5, 12) == b"5678901"
    assert not (loc / "nothing").exists()
    storage.locate("s3://models")  # a bucket is a location too
    # pickled for Ray workers: the endpoint travels with the filesystem, credentials do not
    clone = pickle.loads(pickle.dumps(loc))
    assert clone == loc and clone.fs.storage_options["endpoint_url"] == s3_env.endpoint
    assert "testing" not in repr(clone.fs.storage_options)


def test_s3_fingerprint_changes_after_overwrite(s3_env, tmp_path):
    s3_env.upload_dir(make_model(tmp_path / "a", {"w.bin": b"a" * 64}), "s3://fprint/ck")
    f, d = storage.locate("s3://fprint/ck/w.bin"), storage.locate("s3://fprint/ck")
    before, dir_before = f.fingerprint(), d.fingerprint()
    assert before == f.fingerprint() and before[0] == 64
    s3_env.fs.pipe_file("fprint/ck/w.bin", b"b" * 64)  # same size, new content
    assert f.fingerprint() != before and d.fingerprint() != dir_before


def test_read_range_is_one_get_of_exactly_the_range(s3_env, monkeypatch, tmp_path):
    s3_server = s3_env
    for name, value in s3_server.proxy_env.items():  # everything through the byte counter
        monkeypatch.setenv(name, value)
    blob = os.urandom(1 << 20)
    s3_server.upload_dir(make_model(tmp_path / "big", {"shard.bin": blob}), "s3://bytes/ck")
    loc = storage.locate("s3://bytes/ck/shard.bin")
    storage.read_counter(reset=True)
    s3_server.start_recording()
    s3_server.reset_count()
    assert loc.read_range(1000, 1000 + 4096) == blob[1000:5096]
    down = s3_server.bytes_from_server()
    s3_server.stop_recording()
    gets = [r for r in s3_server.requests() if r["method"] == "GET"]
    assert len(gets) == 1 and gets[0]["headers"]["Range"] == "bytes=1000-5095"
    assert [r["method"] for r in s3_server.requests()] == ["GET"]  # no HEAD, no listing
    assert 4096 < down < 4096 + 2000, down  # the range plus one response's headers
    assert storage.read_counter() == {"s3://bytes/ck/shard.bin": 4096}
    # a stream opened for reading fetches what is read, not a read-ahead block
    with loc.open() as f:
        s3_server.reset_count()
        f.seek(500_000)
        assert f.read(10_000) == blob[500_000:510_000]
        assert s3_server.bytes_from_server() < 10_000 + 2000
    with pytest.raises(CheckpointError, match=r"bytes \[1048000, 1049000\) but the file is shorter \(got 576 bytes\)"):
        loc.read_range(1048000, 1049000)
    with pytest.raises(CheckpointError, match="shorter"):
        loc.read_range(2 << 20, (2 << 20) + 10)


def test_discover_children_s3(s3_env, tmp_path):
    for name in ("checkpoint-200", "checkpoint-20", "step-5", "other"):
        s3_env.upload_dir(make_model(tmp_path / name, {"config.json": "{}"}), f"s3://runs/r/{name}")
    s3_env.fs.pipe_file("runs/r/checkpoint-7", b"a file, not a checkpoint")
    found = storage.discover_children("s3://runs/r", STEP)
    assert [(s, c.uri) for s, c in found] == [(5, "s3://runs/r/step-5"), (20, "s3://runs/r/checkpoint-20"),
                                              (200, "s3://runs/r/checkpoint-200")]


def test_publish_dir_s3_never_shows_config_with_a_mixed_set(s3_env, tmp_path):
    fs = s3_env.fs
    s3_env.upload_dir(make_model(tmp_path / "old", OLD), "s3://out/run/best")
    fs.pipe_file("out/run/trials.parquet", b"keep me")
    new_dir = make_model(tmp_path / "new", NEW)
    snapshots = []

    def snapshot(line):  # publish_dir calls log after each step: list the bucket then
        files = {p[len("out/run/best/"):]: fs.cat_file(p) for p in fs.find("out/run/best")}
        snapshots.append((line, files))

    s3_env.start_recording()
    dest = publish.publish_dir(new_dir, "s3://out/run/best", log=snapshot)
    s3_env.stop_recording()
    assert dest.uri == "s3://out/run/best"
    assert sorted(fs.find("out/run")) == sorted(["out/run/trials.parquet"] + [f"out/run/best/{n}" for n in NEW])
    assert {n: fs.cat_file(f"out/run/best/{n}") for n in NEW} == {n: v.encode() if isinstance(v, str) else v
                                                                   for n, v in NEW.items()}
    assert not [p for p in fs.ls("out/run") if "tmp" in p]  # the temporary prefix is gone
    old = {n: v.encode() if isinstance(v, str) else v for n, v in OLD.items()}
    new = {n: v.encode() if isinstance(v, str) else v for n, v in NEW.items()}
    assert snapshots[0][1] == old and snapshots[-1][1] == new and len(snapshots) >= 5
    for line, files in snapshots:
        if "config.json" in files:
            assert files in (old, new), (line, sorted(files))
    # the server's own log: old config.json deleted first, then the rest; config.json copied in last
    ops = []
    for r in s3_env.requests():
        url, headers = urlparse(r["url"]), {k.lower() for k in r["headers"]}
        if r["method"] == "DELETE" or "delete" in url.query:
            ops.append(("delete", url.path))
        elif r["method"] == "PUT" and "x-amz-copy-source" in headers:
            ops.append(("copy", url.path))
    assert ops[:3] == [("delete", "/out/run/best/config.json"),
                       ("delete", "/out/run/best/model.safetensors.index.json"), ("delete", "/out")]
    assert sorted(ops[3:5]) == [("copy", "/out/run/best/model.safetensors"), ("copy", "/out/run/best/tokenizer.json")]
    assert ops[5] == ("copy", "/out/run/best/config.json")  # shards are copied concurrently, config.json after
    assert {op for op, _ in ops[6:]} == {"delete"}  # the temporary prefix
    # a first publish, under a prefix that does not exist yet
    publish.publish_dir(new_dir, "s3://out/elsewhere/run/best")
    assert sorted(fs.find("out/elsewhere")) == [f"out/elsewhere/run/best/{n}" for n in sorted(NEW)]


def test_publish_dir_local(tmp_path):
    dest = make_model(tmp_path / "out" / "best", OLD)
    publish.publish_dir(make_model(tmp_path / "new", NEW), dest)
    assert sorted(p.name for p in dest.iterdir()) == sorted(NEW)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["best"]  # no tmp or old copy
    assert (tmp_path / "new" / "config.json").exists()  # the source is copied, not moved


def test_missing_bucket(s3_env, tmp_path):
    with pytest.raises(CheckpointError) as e:
        storage.locate("s3://no-such-bucket/run/checkpoint-1")
    assert str(e.value) == (f"checkpoint s3://no-such-bucket/run/checkpoint-1: bucket 'no-such-bucket' "
                            f"does not exist (or is not visible with these credentials) at endpoint "
                            f"{s3_env.endpoint}")
    with pytest.raises(CheckpointError, match="bucket 'no-such-bucket' does not exist"):
        publish.publish_dir(make_model(tmp_path / "m", NEW), "s3://no-such-bucket/best")


def test_missing_prefix(s3_env, tmp_path):
    s3_env.upload_dir(make_model(tmp_path / "c", {"config.json": "{}"}), "s3://have/run/checkpoint-100")
    with pytest.raises(CheckpointError) as e:
        storage.locate("s3://have/run/checkpoint-1000", what="earlier checkpoint")
    assert str(e.value) == ("earlier checkpoint s3://have/run/checkpoint-1000 does not exist: bucket 'have' "
                            "has no object or prefix 'run/checkpoint-1000'; s3://have/run/ holds: checkpoint-100")
    assert storage.locate("s3://have/run/nothing-yet", must_exist=False).name == "nothing-yet"


@pytest.mark.parametrize("env", [{"AWS_SECRET_ACCESS_KEY": SECRET},
                                 {"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SESSION_TOKEN": SECRET}])
def test_missing_credentials(s3_env, monkeypatch, env):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(CheckpointError) as e:
        storage.locate("s3://models/run/checkpoint-900")
    msg = str(e.value)
    assert msg.startswith("no usable credentials for checkpoint s3://models/run/checkpoint-900: botocore")
    for name in ("AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE",
                 "~/.aws/credentials", "AWS_CONFIG_FILE", "instance metadata"):
        assert name in msg
    set_now = msg.split("Set now: ")[1]
    assert all(name in set_now for name in env)
    assert SECRET not in msg and "\n" not in msg and e.value.__cause__ is None


def test_permission_denied(s3_env, monkeypatch, tmp_path):
    s3_env.upload_dir(make_model(tmp_path / "c", {"config.json": "{}"}), "s3://locked/ck")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    with s3_env.auth_enforced():
        with pytest.raises(CheckpointError) as e:
            storage.locate("s3://locked/ck")
    assert str(e.value).startswith(f"permission denied for checkpoint s3://locked/ck at endpoint {s3_env.endpoint}")
    assert SECRET not in str(e.value)


def test_unreachable_endpoint(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: refused
    no_retries = {"config_kwargs": {"retries": {"max_attempts": 1}}}
    with pytest.raises(CheckpointError, match=r"^cannot reach endpoint http://127.0.0.1:9 for checkpoint s3://b/x: "):
        storage.locate("s3://b/x", storage_options=no_retries)


def test_unknown_protocol_and_missing_package():
    with pytest.raises(CheckpointError, match=r"unknown protocol 's4://' \(did you mean s3"):
        storage.locate("s4://bucket/x")
    pytest.importorskip("s3fs")
    try:
        import adlfs  # noqa: F401
    except ImportError:
        with pytest.raises(CheckpointError, match=r"^az:// needs the adlfs package: pip install 'adlfs'$"):
            storage.locate("az://container/x")
