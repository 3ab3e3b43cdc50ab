"""Clusters: the ready configurations in cluster/, a simulated two-node cluster, and a real
`ray start --head` + `ray job submit` with token authentication. Real Ray throughout, no mocks.

The Ray-heavy tests run in subprocesses with hard timeouts: the session's in-process Ray (the
`ray_session` fixture) keeps running beside them, so each uses its own ports and temp dir, and
each stops only the processes it started (by process group, never `ray stop`, which would stop
every Ray process on the machine, the session's own included).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"


# ---------------------------------------------------------------------------------------------
# The configurations (no Ray cluster needed: a second or two)

def _ray_start_args(command: str) -> list[str]:
    """The arguments of the `ray start` in a launcher start command."""
    words = shlex.split(command.split(";")[-1])
    return words[words.index("start") + 1:]


def _check_ray_start_options(args: list[str]) -> None:
    """Parse with the installed Ray's own `ray start` command: unknown options fail."""
    from ray.scripts.scripts import start

    start.make_context("start", list(args), resilient_parsing=False)


def _launcher():
    return yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())


def _rayjob():
    return yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())


def _gb(text: str) -> float:
    """'48g' / '48Gi' / '40000000000' in GB."""
    text = str(text).strip()
    for suffix, scale in (("Gi", 2**30), ("G", 1e9), ("g", 1e9)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * scale / 1e9
    return float(text) / 1e9


def test_cluster_launcher_config_is_valid_for_rays_launcher():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _launcher()
    config = prepare_config(raw)  # what `ray up` does: fill in the AWS defaults...
    validate_config(config)  # ...and check against Ray's launcher schema (ray-schema.json)
    assert config["provider"]["type"] == "aws"
    head, workers = raw["available_node_types"]["head"], raw["available_node_types"]["gpu_workers"]
    assert raw["head_node_type"] == "head"
    assert workers["min_workers"] == workers["max_workers"] >= 1  # all workers up at start
    assert workers["node_config"]["InstanceType"].startswith(("g", "p"))  # a GPU instance family
    assert head["resources"] == {"CPU": 0}  # trials on the GPU workers only
    # Both start commands: token auth, the object store sized, spilling on the NVMe mount, and
    # every option one that the installed `ray start` knows.
    run_options = " ".join(raw["docker"]["run_options"])
    assert "-v /opt/dlami/nvme:/opt/dlami/nvme" in run_options
    shm = _gb(run_options.split("--shm-size=")[1].split()[0])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        command = raw[key][-1]
        assert "RAY_AUTH_MODE=token ray start" in command
        args = _ray_start_args(command)
        _check_ray_start_options(args)
        store = _gb(next(a for a in args if a.startswith("--object-store-memory=")).split("=")[1])
        assert 0 < store <= shm, "the object store must fit in the container's /dev/shm"
        assert "--object-spilling-directory=/opt/dlami/nvme/ray-spill" in args
    head_args = _ray_start_args(raw["head_start_ray_commands"][-1])
    assert "--dashboard-host=127.0.0.1" in head_args  # never 0.0.0.0 on a cloud VM
    assert raw["file_mounts"] == {"/home/ray/.ray/auth_token": "~/.ray/auth_token"}
    text = (CLUSTER / "aws-gpu.yaml").read_text()
    for setting in ("cluster_name", "image:", "region:", "InstanceType: r6id", "ImageId:",
                    "min_workers", "--shm-size", "file_mounts"):
        line = next(ln for ln in text.splitlines() if setting in ln and not ln.lstrip().startswith("#"))
        index = text.splitlines().index(line)
        window = "\n".join(text.splitlines()[max(0, index - 6): index + 1])
        assert "CHANGE" in window, f"no CHANGE comment near {setting!r}"


def test_kuberay_rayjob_runs_ckmerge_with_the_launchers_image():
    from ray.runtime_env import RuntimeEnv

    from ckmerge_ray.cli import build_parser

    job = _rayjob()
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    for key in ("entrypoint", "rayClusterSpec", "shutdownAfterJobFinishes", "runtimeEnvYAML"):
        assert key in spec, key
    # The entrypoint is a valid `ckmerge-ray tune` command line for this package's own parser.
    words = shlex.split(spec["entrypoint"])
    assert words[:2] == ["ckmerge-ray", "tune"]
    args = build_parser().parse_args(words[1:])
    assert args.gpus_per_trial == 0.5 and args.output.startswith("/data/")
    assert args.storage_path.startswith("/data/")  # results on the shared volume
    RuntimeEnv(**yaml.safe_load(spec["runtimeEnvYAML"]))
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token"}
    head = cluster["headGroupSpec"]
    groups = [head] + cluster["workerGroupSpecs"]
    images = {c["image"] for g in groups for c in g["template"]["spec"]["containers"]}
    assert images == {_launcher()["docker"]["image"]}, "KubeRay and the launcher run one image"
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    version = cluster["rayVersion"]
    assert f"FROM rayproject/ray:{version}-" in dockerfile and f"ray{version}" in images.pop()
    for group in groups:
        params = group["rayStartParams"]
        assert all(isinstance(v, str) for v in params.values()), "KubeRay wants strings"
        _check_ray_start_options([f"--{k}={v}" for k, v in params.items()])
        pod = group["template"]["spec"]
        shm = next(v for v in pod["volumes"] if v["name"] == "shm")
        assert shm["emptyDir"]["medium"] == "Memory"
        assert _gb(shm["emptyDir"]["sizeLimit"]) >= _gb(params["object-store-memory"])
        mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        assert {"/dev/shm", "/data", params["object-spilling-directory"]} <= mounts
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] == group["replicas"] == group["maxReplicas"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1
    assert head["rayStartParams"]["num-cpus"] == "0"


def test_runtime_env_example_is_a_valid_runtime_env():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)
    assert {".git", ".venv"} <= set(env["excludes"])
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1"


# ---------------------------------------------------------------------------------------------
# Helpers for the Ray processes these tests start

def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _stop_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop a process this test started in its own session, and everything in that session:
    SIGTERM, then SIGKILL after `grace` seconds."""
    pgid = proc.pid
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if not _group_alive(pgid):
            break
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.time() + wait
        while time.time() < deadline and _group_alive(pgid):
            time.sleep(0.2)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _stop_strays(marker: str) -> None:
    """Kill, by pid, processes whose command line holds this test's own temp dir (Ray workers
    that a raylet started in their own process group)."""
    import psutil

    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.pid != os.getpid() and marker in " ".join(p.info["cmdline"] or []):
                p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


def _run_script(tmp_path, name: str, text: str, args, timeout: float, what: str):
    """Run `text` as a script in its own session (its Ray cluster's processes die with it);
    returns (stdout, stderr) and fails the test on a timeout or a non-zero exit."""
    script = tmp_path / name
    script.write_text(text)
    proc = subprocess.Popen(
        [sys.executable, str(script), *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_clean_env(),
        start_new_session=True, cwd=tmp_path)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop_group(proc, grace=2)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{what} timed out:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    finally:
        _stop_group(proc, grace=2)  # the cluster's processes, if the script died early
    assert proc.returncode == 0, stdout[-3000:] + stderr[-5000:]
    return stdout, stderr


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RAY_") or k in ("RAY_USAGE_STATS_ENABLED",)}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1", **extra)
    return env


# ---------------------------------------------------------------------------------------------
# A simulated two-node cluster (ray.cluster_utils.Cluster) in a subprocess

TWO_NODE = r'''
import json, sys, threading, time, warnings
import ray
from ray._private import internal_api
from ray.cluster_utils import Cluster

from ckmerge_ray import tune_merge
from ckmerge_ray.errors import ConfigError
from ckmerge_ray.cluster import check_object_store, trial_slots
from ckmerge_ray.config import Resources

earlier, later, heldout, out = sys.argv[1:5]
MiB = 2**20
# Head: the driver's node, 1 CPU + 1 (logical) GPU; worker: 2 CPUs + 1 GPU and a smaller store.
cluster = Cluster(initialize_head=True, head_node_args=dict(
    num_cpus=1, num_gpus=1, object_store_memory=150 * MiB, include_dashboard=False))
cluster.add_node(num_cpus=2, num_gpus=1, object_store_memory=100 * MiB)
cluster.wait_for_nodes()
report = {}
try:
    ray.init(address=cluster.address, logging_level="WARNING")
    head = ray.get_runtime_context().get_node_id()
    nodes = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
    worker = next(n for n in nodes if n != head)
    report.update(head=head, worker=worker)

    def stats(node_id):
        n = nodes[node_id]
        return internal_api.node_stats(n["NodeManagerAddress"], n["NodeManagerPort"],
                                       include_memory_info=False)

    # 1. A request no node can hold is refused at once, before anything is stored.
    t = time.perf_counter()
    try:
        tune_merge((earlier, later), {"cpu": 1, "gpu": 2}, objective=f"loss:{heldout}",
                   objective_options={"seq_len": 64, "max_tokens": 1024}, num_trials=2,
                   output_dir=out + "/refused", progress=False)
        report["refused"] = None
    except ConfigError as e:
        report["refused"] = str(e)
    report["refused_s"] = time.perf_counter() - t

    # 2. Slots from fractional GPUs: head 1 (1 CPU), worker 2 (2 CPUs, 2 x 0.5 GPU). The
    #    object-store check uses the smallest store among the driver's node and the nodes that
    #    can run a trial (here the worker's 100 MiB).
    res = Resources(cpu=1.0, gpu=0.5)
    report["slots"] = trial_slots(res, None, 10)
    try:
        check_object_store(120 * MiB, res, False, print)
        report["store_refused"] = None
    except ConfigError as e:
        report["store_refused"] = str(e)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_object_store(90 * MiB, res, False, print)   # fits, but < 20 % headroom
        check_object_store(40 * MiB, res, False, print)   # fits comfortably
    report["store_warnings"] = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]

    # 3. The run. A watcher records, while it runs: the object locations of every shard (the
    #    plan holder actor has the references) and which worker process runs on which node.
    before = {n: stats(n).store_stats.cumulative_created_bytes for n in nodes}
    seen = {"locations": {}, "pids": {}, "shard_bytes": {}}
    done = threading.Event()

    def watch():
        refs = None
        while not done.is_set():
            try:
                for n in nodes:
                    for w in stats(n).core_workers_stats:
                        seen["pids"][w.pid] = n
                if refs is None:
                    names = [a for a in ray.util.list_named_actors() if a.startswith("ckmerge-plan-")]
                    if names:
                        [plan_ref] = ray.get(ray.get_actor(names[0]).plan_ref.remote())
                        plan = ray.get(plan_ref)
                        refs = plan.earlier.refs + plan.later.refs
                        seen["shard_bytes"] = dict(zip([r.hex() for r in refs],
                                                       plan.earlier.nbytes + plan.later.nbytes))
                if refs:
                    for ref, loc in ray.experimental.get_object_locations(refs).items():
                        seen["locations"].setdefault(ref.hex(), set()).update(loc["node_ids"])
            except Exception as e:  # the holder goes away at the end of the run
                seen["last_error"] = repr(e)
            time.sleep(0.2)
        refs = None

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t = time.perf_counter()
    result = tune_merge((earlier, later), res, objective=f"loss:{heldout}",
                        objective_options={"seq_len": 64, "max_tokens": 1024}, num_trials=2,
                        max_concurrent=3, output_dir=out + "/run", storage_path=f"file://{out}/shared",
                        max_shard_bytes=128 * 1024, export_best=False, progress=False)
    report["tune_s"] = time.perf_counter() - t
    done.set()
    watcher.join(10)
    after = {n: stats(n).store_stats.cumulative_created_bytes for n in nodes}
    rows = result.table.to_pylist()
    report.update(
        created_bytes={n: after[n] - before[n] for n in nodes},
        locations={k: sorted(v) for k, v in seen["locations"].items()},
        shard_bytes=seen["shard_bytes"],
        row_nodes=[seen["pids"].get(int(r["worker"].rsplit(":", 1)[1])) for r in rows],
        row_workers=[r["worker"] for r in rows],
        statuses=[r["status"] for r in rows],
        summary=result.summary,
        experiment=json.load(open(out + "/run/run.json"))["experiment"],
        watch_error=seen.get("last_error"),
    )
finally:
    ray.shutdown()
    cluster.shutdown()
print("REPORT " + json.dumps(report))
'''


@pytest.mark.timeout(180, func_only=True)  # func_only: not the shared trajectory fixture
def test_two_node_cluster_pulls_each_shard_once_per_node(trajectory, tmp_path):
    """Trials on both nodes of a simulated two-node cluster, placed by fractional GPUs; each
    checkpoint shard reaches the worker node exactly once although two trial processes there
    read it; impossible requests and a too-small store are refused before any trial."""
    pair = trajectory[-2], trajectory[-1]
    stdout, stderr = _run_script(tmp_path, "two_node.py", TWO_NODE,
                                 [pair[0], pair[1], pair[1].parent / "heldout.jsonl", tmp_path],
                                 150, "two-node run")
    report = json.loads(next(ln for ln in stdout.splitlines() if ln.startswith("REPORT "))[7:])
    head, worker = report["head"], report["worker"]

    # Refusals: clear, immediate, with the numbers.
    assert "per-trial resources cpu=1, gpu=2 fit on no node" in report["refused"]
    assert "2 node(s) alive" in report["refused"] and report["refused_s"] < 15
    assert f"({worker[:8]}, a node that can run trials" in report["store_refused"]
    assert "has 0.10 GiB" in report["store_refused"]
    assert len(report["store_warnings"]) == 1 and "headroom" in report["store_warnings"][0]

    # The run: 3 trials (λ = 0.5, 1, 0) at once, 1 on the head (1 CPU) + 2 on the worker
    # (2 CPUs, 2 x 0.5 GPU): the slots the tuner computes from the nodes, and where Ray put them.
    summary = report["summary"]
    assert report["slots"] == 3
    assert report["statuses"] == ["ok"] * 3
    assert set(report["row_nodes"]) == {head, worker}, report
    on_worker = {w for w, n in zip(report["row_workers"], report["row_nodes"]) if n == worker}
    assert len(on_worker) >= 2, "two trial processes on the worker node share its copy"
    # Every shard reached both nodes (object locations, from the shards' owner)...
    shard_bytes = report["shard_bytes"]
    assert summary["object_store"]["shards_per_checkpoint"] >= 2
    assert len(shard_bytes) == 2 * summary["object_store"]["shards_per_checkpoint"]
    assert set(report["locations"]) == set(shard_bytes)
    assert all(set(nodes) == {head, worker} for nodes in report["locations"].values())
    # ...and exactly once: the worker's store created the shards' bytes once (a second pull of
    # any shard would add its size again; other objects it created are a few KB).
    pair_bytes = sum(shard_bytes.values())
    assert pair_bytes == 2 * summary["object_store"]["bytes_per_checkpoint"]
    assert pair_bytes <= report["created_bytes"][worker] < pair_bytes + min(shard_bytes.values())
    # Tune's experiment went to the storage URI.
    assert report["experiment"].startswith(f"file://{tmp_path}/shared/ckmerge-")
    assert Path(report["experiment"][len("file://"):]).is_dir()


# ---------------------------------------------------------------------------------------------
# A worker node lost mid-run, and its replacement joining (ray.cluster_utils.Cluster)

NODE_CHURN = r"""
import json, sys, threading, time
from pathlib import Path
import ray
from ray._private import internal_api
from ray.cluster_utils import Cluster

root, earlier, later, heldout, out = sys.argv[1:6]
sys.path.insert(0, root)
from ckmerge_ray import tune_merge
from tests import faulty

faulty.ship_by_value()
MiB = 2**20
tokens = Path(out) / "tokens"
tokens.mkdir()
# Head: the driver's node, no CPUs for trials (as on clusters whose head runs no work). A worker
# node of 2 CPUs that is lost (preempted) while its trials run; a replacement of 2 CPUs joins
# right after, as an autoscaler would bring one. With a CPU on the head, a warm worker there
# could run every remaining trial while the new node still started its workers (seen under load).
cluster = Cluster(initialize_head=True, head_node_args=dict(
    num_cpus=0, object_store_memory=100 * MiB, include_dashboard=False))
doomed = cluster.add_node(num_cpus=2, object_store_memory=100 * MiB)
cluster.wait_for_nodes()
report, seen = {}, {"locations": {}, "shard_bytes": {}, "holder_nodes": []}
done = threading.Event()
try:
    ray.init(address=cluster.address, logging_level="WARNING")
    head = ray.get_runtime_context().get_node_id()
    report.update(head=head, doomed=doomed.node_id)
    (tokens / "doomed").write_text(doomed.node_id)

    def tune():  # in a thread: Cluster adds nodes from the main thread only
        try:
            t0 = time.perf_counter()
            objective = faulty.HangsOnNode(heldout, tokens, seq_len=64, max_tokens=1024)
            result = tune_merge((earlier, later), {"cpu": 1}, objective=objective, num_trials=8,
                                max_concurrent=3, output_dir=out + "/run", export_best=False,
                                max_shard_bytes=128 * 1024, progress=True)
            report["tune_s"] = time.perf_counter() - t0
            report["rows"] = [{k: r.get(k) for k in ("trial_id", "lam", "status", "node_id",
                                                     "from_journal", "error")}
                              for r in result.table.to_pylist()]
            report["summary_store"] = result.summary["object_store"]
            # The searcher's final state, as Tune saved it: what its GP observed, what failed.
            from ckmerge_ray.search import GPHedgeSearch
            final = GPHedgeSearch()
            run_file = json.loads(Path(out, "run", "run.json").read_text())
            final.restore_from_dir(run_file["experiment"])
            report["observed"] = [float(x[0]) for x in final.optimizer.space.params]
            report["failed"] = final._failed
        except BaseException as e:
            report["tune_error"] = repr(e)
        finally:
            done.set()

    def watch():  # while the run lasts: the plan holder's node, where each shard has copies
        refs = None
        while not done.is_set():
            try:
                if refs is None:
                    names = [a for a in ray.util.list_named_actors() if a.startswith("ckmerge-plan-")]
                    if names:
                        holder = ray.get_actor(names[0])
                        info = ray._private.state.actors(holder._actor_id.hex())
                        seen["holder_nodes"].append(info["Address"]["NodeID"])
                        [plan_ref] = ray.get(holder.plan_ref.remote())
                        plan = ray.get(plan_ref)
                        refs = plan.earlier.refs + plan.later.refs
                        seen["shard_bytes"] = dict(zip([r.hex() for r in refs],
                                                       plan.earlier.nbytes + plan.later.nbytes))
                if refs:
                    for ref, loc in ray.experimental.get_object_locations(refs).items():
                        seen["locations"][ref.hex()] = sorted(loc["node_ids"])
            except Exception as e:  # the holder goes away at the end of the run
                seen["last_error"] = repr(e)
            time.sleep(0.25)

    threads = [threading.Thread(target=f, daemon=True) for f in (tune, watch)]
    for t in threads:
        t.start()
    while not (tokens / "hanging").exists() and not done.is_set():
        time.sleep(0.1)
    if not done.is_set():
        report["started_before_loss"] = sorted(p.name[8:] for p in tokens.glob("started-*"))
        report["finished_before_loss"] = sorted(p.name[9:] for p in tokens.glob("finished-*"))
        cluster.remove_node(doomed, allow_graceful=False)  # no goodbye, as on preemption
        joined = cluster.add_node(num_cpus=2, object_store_memory=100 * MiB)
        report["joined"] = joined.node_id
    for t in threads:
        t.join(240)
    nodes = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
    joined = nodes.get(report.get("joined"))
    if joined:
        stats = internal_api.node_stats(joined["NodeManagerAddress"], joined["NodeManagerPort"],
                                        include_memory_info=False)
        report["joined_created_bytes"] = stats.store_stats.cumulative_created_bytes
    report.update(
        journal=len(list(Path(out, "run", "evaluations").glob("lam=*.json"))),
        started=sorted(p.name[8:] for p in tokens.glob("started-*")),
        finished=sorted(p.name[9:] for p in tokens.glob("finished-*")), **seen)
finally:
    done.set()
    ray.shutdown()
    cluster.shutdown()
print("REPORT " + json.dumps(report))
"""


@pytest.mark.timeout(300, func_only=True)
def test_a_lost_worker_node_and_a_joining_one_mid_run(trajectory, tmp_path):
    """Issue 21, items 1 and 2, on a simulated cluster: a worker node is removed for real (its
    processes killed, no graceful shutdown) while its trials run, after at least one
    evaluation finished on it; a new node joins right after. The lost trials are retried on the
    nodes that remain or join, fetching the shards again from the copies that still exist (the
    driver's store holds the primaries); the run ends with the requested number of distinct
    evaluations; the evaluations that finished on the lost node count and none is computed
    twice; the run's plan holder, and so its journal, was on the driver's node; the trials
    after the loss run on the new node (the head has no CPUs for trials), which pulled each
    checkpoint once."""
    pair = trajectory[-2], trajectory[-1]
    stdout, stderr = _run_script(tmp_path, "churn.py", NODE_CHURN,
                                 [ROOT, pair[0], pair[1], pair[1].parent / "heldout.jsonl",
                                  tmp_path], 270, "the node-churn run")
    report = json.loads(next(ln for ln in stdout.splitlines() if ln.startswith("REPORT "))[7:])
    assert "tune_error" not in report, report["tune_error"]
    head, doomed, joined = report["head"], report["doomed"], report.get("joined")
    assert joined, f"the worker node was never lost: {report}"

    # The fault happened as intended: evaluations had finished on the doomed node, and at
    # least one more had started there and was in flight when it went.
    on = lambda names, node: [n for n in names if n.startswith(node)]  # noqa: E731
    assert on(report["finished_before_loss"], doomed), report
    finished_there = on(report["finished"], doomed)
    assert len(on(report["started"], doomed)) > len(finished_there), report

    # The run finished with the requested number of distinct evaluations, each computed once.
    rows = report["rows"]
    assert len(rows) == 9 and all(r["status"] == "ok" for r in rows), rows
    assert len({r["lam"] for r in rows}) == 9 and len({r["trial_id"] for r in rows}) == 9
    assert len(report["finished"]) == 9 == report["journal"], report
    assert len([r for r in rows if r["node_id"] == doomed]) == len(finished_there), rows
    assert any(r["node_id"] == joined for r in rows), f"no trial ran on the new node: {rows}"
    assert report["holder_nodes"] and set(report["holder_nodes"]) == {head}, report
    # The searcher observed every evaluation, also one whose trial Tune re-ran under a new id
    # after the loss (Tuner.restore(restart_errored=True)), and holds none as failed.
    rerun = "running them again" in stdout
    assert sorted(round(x, 9) for x in report["observed"]) == \
        sorted(round(r["lam"], 9) for r in rows), (rerun, report["observed"], rows)
    assert report["failed"] == [], (rerun, report["failed"])

    # Shards: copies on the driver's node and the new one, none on the lost one; the new node
    # pulled each shard exactly once (a second pull of any shard would add its size again).
    shard_bytes = report["shard_bytes"]
    assert len(shard_bytes) == 2 * report["summary_store"]["shards_per_checkpoint"] >= 4
    for ref, nodes in report["locations"].items():
        assert head in nodes and doomed not in nodes and joined in nodes, (ref, nodes)
    pair_bytes = sum(shard_bytes.values())
    assert pair_bytes <= report["joined_created_bytes"] < pair_bytes + min(shard_bytes.values())


# ---------------------------------------------------------------------------------------------
# `ray start --head` on loopback + `ray job submit` with token authentication

@pytest.mark.timeout(240, func_only=True)
def test_ray_job_submit_to_a_local_head_with_token_auth(trajectory, tmp_path):
    """A real head node on 127.0.0.1 with RAY_AUTH_MODE=token: a submission without the token is
    refused; `ray job submit` with it runs `ckmerge-ray tune` (cluster/runtime_env.yaml, this
    checkout as working dir), which joins the cluster given by --address; `ray job logs` shows
    the final table and the best model's path."""
    import secrets

    from ray.job_submission import JobStatus, JobSubmissionClient

    token = secrets.token_hex(32)
    temp = tempfile.mkdtemp(prefix="ckr", dir="/tmp")  # short: Ray's socket paths are limited
    gcs, dash, client, agent, agent_grpc, metrics, renv, nm, om = _free_ports(9)
    head_env = _clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, HF_HUB_OFFLINE="1",
                          TOKENIZERS_PARALLELISM="false")
    log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
         "--node-ip-address=127.0.0.1", f"--port={gcs}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={renv}",
         f"--node-manager-port={nm}", f"--object-manager-port={om}",
         "--min-worker-port=0", "--max-worker-port=0", "--num-cpus=2",
         "--object-store-memory=200000000", f"--temp-dir={temp}", "--disable-usage-stats"],
        stdout=log, stderr=subprocess.STDOUT, env=head_env, start_new_session=True)
    log.close()
    address = f"http://127.0.0.1:{dash}"
    out = tmp_path / "run"
    try:
        deadline = time.time() + 60
        while True:  # the job API answers (401 without the token) once the dashboard is up
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                assert head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
                assert time.time() < deadline, "the head node did not come up in 60 s"
                time.sleep(0.5)

        # Without the token, or with a wrong one: refused (401 / 403) by the job API itself.
        # (`ray job submit` without RAY_AUTH_MODE=token sends no token and gets the 401.)
        for headers, status in (({}, 401), ({"Authorization": "Bearer not-the-token"}, 403)):
            request = urllib.request.Request(
                f"{address}/api/jobs/", method="POST", data=b'{"entrypoint": "echo no"}',
                headers={"Content-Type": "application/json", **headers})
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=10)
            assert refused.value.code == status

        # With it: the real job.
        heldout = trajectory[-1].parent / "heldout.jsonl"
        sub_id = f"ckmerge-test-{secrets.token_hex(4)}"
        submit = subprocess.run(
            [sys.executable, "-m", "ray.scripts.scripts", "job", "submit", f"--address={address}",
             f"--submission-id={sub_id}", f"--runtime-env={CLUSTER / 'runtime_env.yaml'}",
             f"--working-dir={ROOT}", "--",
             "ckmerge-ray", "tune", str(trajectory[-2]), str(trajectory[-1]),
             "--objective", f"loss:{heldout}", "--seq-len", "64", "--max-tokens", "1024",
             "--trials", "2", "--max-concurrent", "1", "--cpus-per-trial", "1",
             f"--address=127.0.0.1:{gcs}",  # instead of the RAY_ADDRESS Ray gives the job
             "--output", str(out)],
            capture_output=True, text=True, timeout=180, cwd=ROOT,
            env=_clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token))
        assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-4000:]

        # `ray job logs` (the same API, in-process, with the token as a bearer header).
        jobs = JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})
        assert jobs.get_job_status(sub_id) == JobStatus.SUCCEEDED
        logs = jobs.get_job_logs(sub_id)
        summary = json.loads((out / "summary.json").read_text())
        assert f"[ckmerge] joined the Ray cluster at 127.0.0.1:{gcs}: 1 node(s), 2 CPU, 0 GPU" in logs, logs[-3000:]
        assert "gain vs λ=0" in logs and f"best λ={summary['best_lambda']:.4f}" in logs
        assert f"best model: {out / 'best'}" in logs
        assert f"[ckmerge] results: {out}" in logs
        assert (out / "best" / "config.json").exists()
        # The job ran with the example runtime_env: this checkout, uploaded as a package.
        runtime_env = jobs.get_job_info(sub_id).runtime_env
        assert runtime_env["working_dir"].startswith("gcs://_ray_pkg_")
        assert runtime_env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    finally:
        _stop_group(head, grace=3)
        _stop_strays(temp)
        for _ in range(5):  # a dying process may still write a log file into it
            shutil.rmtree(temp, ignore_errors=True)
            if not os.path.exists(temp):
                break
            time.sleep(1)
