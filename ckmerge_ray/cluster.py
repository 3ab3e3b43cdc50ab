"""The Ray cluster a run uses: connect, size the trial slots, and check the object-store budget.

Everything here asks Ray about live nodes; nothing reads checkpoints or runs trials. Used by
`tune_merge`, `compare_merges` and `sweep_trajectory` before anything is put into the store.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Tuple

import ray

from ckmerge_ray.config import Resources
from ckmerge_ray.errors import ConfigError


@contextmanager
def ray_session(log=None) -> Iterator[bool]:
    """`connect`, and shut Ray down at the end if this call started it. Yields whether it did."""
    started = connect(log)
    try:
        yield started
    finally:
        if started:
            disconnect()


def connect(log=None) -> bool:
    """Connect to Ray: the running instance, RAY_ADDRESS's cluster, or a new local one.

    With RAY_ADDRESS set (``ray job submit`` sets it for a job's driver; the CLI's ``--address``
    sets it) this joins that cluster with a bare ``ray.init()``: CPUs, GPUs and object-store
    sizes belong to the cluster's nodes, never to the driver. Token authentication needs nothing
    here: Ray itself reads RAY_AUTH_MODE and the token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
    ~/.ray/auth_token). Without RAY_ADDRESS a new local instance is started (never another
    session's cluster found in /tmp/ray); it binds its ports to this machine and runs no
    dashboard.

    Returns whether this call started Ray (and so should shut it down).
    """
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address and address != "local":  # "local" asks Ray for a new local instance
        ray.init()  # joins the cluster; resource counts belong to the cluster, not to us
        if log:
            log(f"joined the Ray cluster at {address}: {describe_cluster()}")
    else:  # "local": a bare ray.init() would join whatever cluster this machine last started
        ray.init(address="local", include_dashboard=False, logging_level="WARNING")
        _LOCAL["started"] = True
    return True


def disconnect() -> None:
    """Shut down the Ray that `connect` started (its processes then end by our hand, not a
    fault: `local_ray_alive` answers None from before the first one is stopped)."""
    _LOCAL["started"] = False
    ray.shutdown()


_LOCAL = {"started": False}  # whether this process started a local Ray instance (`connect`)


def local_ray_alive() -> Optional[bool]:
    """Whether the local Ray instance this process started still runs (its GCS server and
    raylet processes); None when it started none (it joined a cluster) or cannot tell.

    Ray has no public call for the processes of its own local instance: this reads its node's
    process table (``ray._private.worker._global_node.all_processes``), defensively."""
    if not _LOCAL["started"]:
        return None
    from ray._private import ray_constants, worker

    table = getattr(getattr(worker, "_global_node", None), "all_processes", None)
    kinds = (ray_constants.PROCESS_TYPE_GCS_SERVER, ray_constants.PROCESS_TYPE_RAYLET)
    try:
        heads = [info.process for kind in kinds for info in (table or {}).get(kind, [])]
        return all(p.poll() is None for p in heads) if heads else None
    except (AttributeError, TypeError):
        return None


def describe_cluster() -> str:
    """One line for the job's log: what the tuner found in the cluster it joined."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    cpus = sum(n.get("CPU", 0) for n in nodes)
    gpus = sum(n.get("GPU", 0) for n in nodes)
    store = min((n.get("object_store_memory", 0) for n in nodes), default=0)
    return (f"{len(nodes)} node(s), {cpus:g} CPU, {gpus:g} GPU, smallest object store "
            f"{store / 2**30:.2f} GiB")


# Share of a node's object store the checkpoints may take before the run warns: the rest is
# headroom for Ray Tune's own objects, trial results and other jobs' objects.
STORE_BUDGET = 0.8


def smallest_store(resources: Resources) -> Tuple[Dict, List[Dict]]:
    """The node with the smallest object store among the driver's node and every node that can
    hold a trial at `resources`, and all those nodes (entries of ``ray.nodes()``)."""
    me = ray.get_runtime_context().get_node_id()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    used = [n for n in nodes if n["NodeID"] == me or (
        n["Resources"].get("CPU", 0) >= resources.cpu
        and n["Resources"].get("GPU", 0) >= resources.gpu)]
    return min(used, key=lambda n: n["Resources"].get("object_store_memory", 0)), used


def check_object_store(need: int, resources: Resources, allow_spilling: bool, log,
                       what: str = "the two checkpoints") -> None:
    """`what` (`need` bytes; default a pair) live in the object store of the driver's node (the primary copies) and
    of every node that runs trials (one pulled copy per node). The smallest of those stores
    decides: if the pair does not fit, Ray spills shards to disk and every trial pays for reading
    them back, so refuse with the numbers, or (allow_spilling) warn and go on, unless even the
    spill disk is too small. A pair that fits but leaves less than 20 % headroom gets a warning:
    other objects could still push shards out to disk."""
    me = ray.get_runtime_context().get_node_id()
    smallest, used = smallest_store(resources)
    store = int(smallest["Resources"].get("object_store_memory", 0))
    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    role = "the driver's node" if smallest["NodeID"] == me else "a node that can run trials"
    where = (f"node {smallest.get('NodeManagerAddress', '?')} ({smallest['NodeID'][:8]}, {role}, "
             f"the smallest of {len(used)} such node(s))")
    if need <= STORE_BUDGET * store:
        return
    if need <= store:
        msg = (f"{what} ({gib(need)}) take {need / store:.0%} of the object store of "
               f"{where} ({gib(store)}); less than {1 - STORE_BUDGET:.0%} headroom is left, and "
               f"other objects may push shards out to disk. Give every node at least "
               f"{gib(need / STORE_BUDGET)} (ray start --object-store-memory)")
        warnings.warn(msg, ResourceWarning, stacklevel=3)
        log(f"warning: {msg}")
        return
    if not allow_spilling:
        raise ConfigError(
            f"{what} need {gib(need)} of object store but {where} has {gib(store)}: "
            "start Ray with a larger store (ray start --object-store-memory BYTES, or "
            "ray.init(object_store_memory=...)), or pass allow_spilling=True (CLI: "
            "--allow-spilling) to let Ray spill shards to disk, slowly"
        )
    free = shutil.disk_usage(tempfile.gettempdir()).free
    if need - store > 0.9 * free:
        raise ConfigError(
            f"{what} need {gib(need)}; {where} has {gib(store)} of object store "
            f"and {gib(free)} free for spilling in {tempfile.gettempdir()}: not enough for both"
        )
    msg = (f"{what} ({gib(need)}) exceed the object store of {where} "
           f"({gib(store)}); Ray will spill {gib(need - store)} to disk and trials will read it back")
    warnings.warn(msg, ResourceWarning, stacklevel=3)
    log(f"warning: {msg}")


def trial_slots(resources: Resources, requested: Optional[int], num_trials: int) -> int:
    """Trials at once: what was asked, else what the cluster fits; refuse what no node fits."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    fits = [
        n for n in nodes
        if n.get("CPU", 0) >= resources.cpu and n.get("GPU", 0) >= resources.gpu
    ]
    if not fits:
        biggest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
        raise ConfigError(
            f"per-trial resources cpu={resources.cpu:g}, gpu={resources.gpu:g} fit on no "
            f"node of this Ray cluster (largest: {biggest.get('CPU', 0):g} CPU, "
            f"{biggest.get('GPU', 0):g} GPU; {len(nodes)} node(s) alive). Ask for what one node "
            "has (fractions of a GPU are allowed); on an autoscaling cluster, nodes count once "
            "they are up: start the worker group first (min_workers / minReplicas)"
        )
    if requested:
        return requested
    slots = 0
    for n in fits:  # trials per node, e.g. 2 per GPU at gpu=0.5 (1e-9: 1 / 0.1 is 9.999...)
        per_node = [math.floor(n.get("CPU", 0) / resources.cpu + 1e-9)] if resources.cpu else []
        if resources.gpu:
            per_node.append(math.floor(n.get("GPU", 0) / resources.gpu + 1e-9))
        slots += int(min(per_node))
    return max(1, min(slots, num_trials))
