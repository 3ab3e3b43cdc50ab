"""A real S3-compatible server on loopback for tests: moto in server mode, behind a byte counter.

    from tests.s3server import s3_server, s3_env   # pytest fixtures (import them into the test module)

    def test_reads(s3_env):                         # s3_env: the server, its env set, fsspec caches cleared
        s3_env.upload_dir(tmp_path / "ckpt", "s3://bucket/run/checkpoint-100")
        loc = storage.locate("s3://bucket/run/checkpoint-100")

`s3_server` (module scope) starts ``python -m moto.server`` on 127.0.0.1 on a free port, waits
until it answers, and stops it by its process id at the end; if moto is missing or does not come
up, the test is skipped with the reason. `running_s3_server()` is the same as a context manager.

The server object has `.endpoint` (the server), `.proxy_endpoint` (a TCP proxy in front of it
that counts the bytes it forwards: `.bytes_from_server()`, `.bytes_to_server()`, `.reset_count()`)
and `.env`: AWS_ACCESS_KEY_ID/SECRET=testing, AWS_ENDPOINT_URL, region, no instance metadata and no
shared credential files. Set `.env` (or `.proxy_env`, the same through the proxy) before anything
builds a filesystem; Ray workers inherit the driver's environment only if it is set before
`ray.init`. `.requests()` is the server's own log of requests (moto's recorder) between
`.start_recording()` and `.stop_recording()`; `.auth_enforced()` makes the server check
credentials (unknown keys get 403) inside a with-block. `.fs` is an s3fs filesystem of its own
(explicit key and endpoint, not from the environment) for setting up and inspecting buckets.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

KEY, SECRET, REGION = "testing", "testing", "us-east-1"


class CountingProxy:
    """TCP proxy on 127.0.0.1 to `upstream_port`; counts bytes in each direction (a thread per
    direction per connection), counting before forwarding so a finished read is counted."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._down = self._up = 0
        self._socks: List[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="s3-proxy").start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:  # the server is gone: the client sees the connection close
                client.close()
                continue
            with self._lock:
                self._socks += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_server: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                with self._lock:
                    if from_server:
                        self._down += len(data)
                    else:
                        self._up += len(data)
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def bytes_from_server(self) -> int:
        with self._lock:
            return self._down

    def bytes_to_server(self) -> int:
        with self._lock:
            return self._up

    def reset_count(self) -> None:
        with self._lock:
            self._down = self._up = 0

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        with self._lock:
            for s in self._socks:
                try:
                    s.close()
                except OSError:
                    pass


class S3Server:
    """A running moto server (see the module docstring)."""

    def __init__(self, proc: subprocess.Popen, port: int, workdir: Path):
        self.proc, self.pid, self.port, self.workdir = proc, proc.pid, port, workdir
        self.endpoint = f"http://127.0.0.1:{port}"
        self.proxy = CountingProxy(port)
        self.proxy_endpoint = f"http://127.0.0.1:{self.proxy.port}"
        self.env = self._env(self.endpoint)
        self.proxy_env = self._env(self.proxy_endpoint)
        import s3fs
        self.fs = s3fs.S3FileSystem(key=KEY, secret=SECRET, endpoint_url=self.endpoint,
                                    use_listings_cache=False, skip_instance_cache=True)

    def _env(self, endpoint: str) -> Dict[str, str]:
        nowhere = str(self.workdir / "no-such-aws-file")
        return {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET,
                "AWS_DEFAULT_REGION": REGION, "AWS_ENDPOINT_URL": endpoint,
                "AWS_EC2_METADATA_DISABLED": "true",
                "AWS_SHARED_CREDENTIALS_FILE": nowhere, "AWS_CONFIG_FILE": nowhere}

    def bytes_from_server(self) -> int:
        """Bytes the proxy forwarded from the server to clients since the last reset."""
        return self.proxy.bytes_from_server()

    def bytes_to_server(self) -> int:
        return self.proxy.bytes_to_server()

    def reset_count(self) -> None:
        self.proxy.reset_count()

    def make_bucket(self, bucket: str) -> None:
        if not self.fs.exists(bucket):
            self.fs.mkdir(bucket)

    def upload_dir(self, local_dir, uri: str) -> None:
        """Upload every file under `local_dir` to ``s3://bucket/prefix`` (bucket made if needed)."""
        path = uri.split("://", 1)[1].rstrip("/")
        self.make_bucket(path.split("/", 1)[0])
        local_dir = Path(local_dir)
        for p in sorted(local_dir.rglob("*")):
            if p.is_file():
                self.fs.put_file(str(p), f"{path}/{p.relative_to(local_dir).as_posix()}")

    def _api(self, route: str, data: bytes = b"") -> bytes:
        req = urllib.request.Request(f"{self.endpoint}/moto-api/{route}", data=data, method="POST",
                                     headers={"Content-Type": "text/plain"})  # else Flask eats the body as a form
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.read()

    def start_recording(self) -> None:
        self._api("recorder/reset-recording")
        self._api("recorder/start-recording")

    def stop_recording(self) -> None:
        self._api("recorder/stop-recording")

    def requests(self) -> List[dict]:
        """The server's log since `start_recording`: dicts with method, url, headers."""
        lines = self._api("recorder/download-recording").decode().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    @contextmanager
    def auth_enforced(self) -> Iterator[None]:
        """Inside: the server checks access keys against its IAM, so the test key gets 403."""
        self._api("reset-auth", b"0")
        try:
            yield
        finally:
            self._api("reset-auth", b"inf")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_moto(workdir: Path, timeout: float):
    """(process, port) of a moto server that answers; pytest.skip with the reason otherwise."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MOTO_"))}
    env["MOTO_RECORDER_FILEPATH"] = str(workdir / "requests.jsonl")
    for attempt in range(3):  # another process may take the free port before moto binds it
        port, log = _free_port(), workdir / f"moto-{attempt}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                    env=dict(env, MOTO_PORT=str(port)), stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/data.json", timeout=2).close()
                return proc, port
            except OSError:
                if time.monotonic() > deadline:
                    _stop(proc)
                    pytest.skip(f"moto server did not answer on 127.0.0.1:{port} within {timeout:.0f} s")
                time.sleep(0.1)
        tail = log.read_text(errors="replace")[-400:]
        if "Address already in use" not in tail:
            break
    pytest.skip(f"moto server exited with status {proc.returncode}: {tail}")


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server by its process id: SIGTERM, then SIGKILL after 10 s."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


@contextmanager
def running_s3_server(timeout: float = 60.0) -> Iterator[S3Server]:
    """Start moto's server in a subprocess on loopback; skip the test if it cannot start."""
    try:
        import moto.server  # noqa: F401
        import s3fs  # noqa: F401
    except ImportError as e:
        pytest.skip(f"no S3 test server: {e} (pip install -e '.[test]')")
    with tempfile.TemporaryDirectory(prefix="ckmerge-s3-") as workdir:
        proc, port = _start_moto(Path(workdir), timeout)
        server = None
        try:
            server = S3Server(proc, port, Path(workdir))
            yield server
        finally:
            if server is not None:
                server.proxy.close()
            _stop(proc)


@pytest.fixture(scope="module")
def s3_server() -> Iterator[S3Server]:
    with running_s3_server() as server:
        yield server


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch) -> Iterator[S3Server]:
    """The module's server with its env set (and no other AWS_* variables), fsspec caches cleared."""
    from ckmerge_ray.storage import clear_instance_caches

    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    clear_instance_caches()
    yield s3_server
    clear_instance_caches()
