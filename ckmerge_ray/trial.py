"""The Ray Tune trainable: merge the stored shards into a resident model, then evaluate it.

A worker builds its model once per run (from the config, without random init) and keeps it in
`_RESIDENT`; with Tune's `reuse_actors=True` the next trial on that worker only re-fills the
weights in place. Trials receive object references, never file paths.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import ray
import torch

from ckmerge_ray.merge import merge_buffers_into_, merge_shard_into_
from ckmerge_ray.model import (
    adopt_flat_layout,
    build_model,
    import_model_code,
    release_freed_memory,
    tensor_map,
    trial_device,
    worker_memory_mb,
)
from ckmerge_ray.objectives.base import Objective
from ckmerge_ray.results import write_json_atomic
from ckmerge_ray.search import search_record
from ckmerge_ray.store import ShardView, StoredCheckpoint, pair_digest, shard_view


@dataclass
class TrialPlan:
    """Everything a trial needs; workers fetch it once per run from the run's `PlanHolder`."""

    run_id: str
    model_config: Dict  # config.json of the later checkpoint
    dtypes: Dict[str, str]  # tensor name -> dtype in the checkpoints
    earlier: StoredCheckpoint
    later: StoredCheckpoint
    objective: Objective
    screen_limit: Optional[float] = None  # multi-fidelity: documents per task of the cheap stage
    gpu_shard_cache: bool = True  # GPU workers copy both checkpoints to the device when they fit
    code_dir: Optional[str] = None  # the checkpoint whose own modeling code runs (opted in)


@dataclass
class Resident:
    """What a worker keeps between trials of one run."""

    model: torch.nn.Module
    tensors: Dict[str, torch.Tensor]  # state-dict name -> the model's own tensor
    uss_before_build_mb: float  # private memory before the model existed, to measure its cost
    # Zero-copy views of the shard pairs, fetched on the first trial. Keeping them mapped costs
    # no private memory (they are the object store's pages) and spares every later trial the
    # deserialization and the page faults of mapping ~2x the model's bytes again.
    shards: Optional[List[Tuple[ShardView, ShardView]]] = None
    shards_on_device: bool = False  # the shards above are copies in GPU memory
    # Per shard, per dtype: the model's own flat buffer, laid out as the stored shard is (the
    # model's tensors are views into it), so a merge is one lerp per buffer. None: per tensor.
    flat: Optional[List[Dict[str, torch.Tensor]]] = None


# run_id -> Resident; lives as long as the worker process.
_RESIDENT: Dict[str, Resident] = {}


def resident_model(plan: TrialPlan, device: torch.device) -> Tuple[Resident, bool]:
    """The worker's model for this run: built on first use, reused by later trials."""
    built = False
    if plan.run_id not in _RESIDENT:
        _RESIDENT.clear()  # a model of an earlier run is no longer needed
        import_model_code(plan.model_config, plan.code_dir)  # ~100 MB of code, the same for any model size
        _RESIDENT[plan.run_id] = new_resident(plan, device)
        built = True
    return _RESIDENT[plan.run_id], built


def new_resident(plan: TrialPlan, device: torch.device | str) -> Resident:
    """Build the model, map both checkpoints' shards, and move the model's tensors into the
    shards' flat layout where it can (`adopt_flat_layout`)."""
    before = worker_memory_mb()["uss_mb"]
    model = build_model(plan.model_config, plan.dtypes, device, code_dir=plan.code_dir)
    resident = Resident(model, tensor_map(model), before)
    resident.shards = list(iter_shard_pairs(plan))
    resident.flat = adopt_flat_layout(resident.tensors, [l.layout for _, l in resident.shards])
    return resident


def iter_shard_pairs(plan: TrialPlan, cache: Optional[Resident] = None):
    """(earlier, later) tensor views per shard, fetched from the object store on first use."""
    if cache is not None and cache.shards is not None:
        yield from cache.shards
        return
    fetched = []
    for e_ref, l_ref in zip(plan.earlier.refs, plan.later.refs):
        # One ray.get for both, so a remote node pulls them in parallel.
        pair = tuple(shard_view(s) for s in ray.get([e_ref, l_ref]))
        fetched.append(pair)
        yield pair
    if cache is not None:
        cache.shards = fetched


# Share of a GPU's free memory (after the model is built) that the two checkpoints may take when a
# worker keeps them on the device; the rest is left to evaluation.
DEVICE_CACHE_SHARE = 0.5


def cache_shards_on_device(resident: Resident, plan: TrialPlan, device: torch.device) -> bool:
    """On a GPU worker, copy both checkpoints' shards to the device once, if they take at most
    DEVICE_CACHE_SHARE of its free memory; later trials then merge device to device.

    Why: from the object store (shared memory, not pinned) the merge must move 2 × model bytes
    to the GPU in every trial. H200, 6.7B bf16 (benchmarks/gpu_merge.py): 3.7 s per trial from
    host memory, 10 ms on the device.
    """
    if device.type != "cuda" or not plan.gpu_shard_cache or resident.shards_on_device:
        return resident.shards_on_device
    if resident.shards is None:
        resident.shards = list(iter_shard_pairs(plan))
    need = plan.earlier.total_bytes + plan.later.total_bytes
    free, _ = torch.cuda.mem_get_info(device)
    if need <= DEVICE_CACHE_SHARE * free:
        resident.shards = shards_to_device(resident.shards, device)
        resident.shards_on_device = True
    return resident.shards_on_device


def shards_to_device(pairs, device: torch.device | str):
    """Copies of (earlier, later) shard pairs on `device`."""
    return [tuple(shard.to(device) for shard in pair) for pair in pairs]


def merge_into_model(
    plan: TrialPlan, tensors: Dict[str, torch.Tensor], lam: float, cache: Optional[Resident] = None
) -> int:
    """Lerp the shard pairs into the model's tensors, shard by shard; returns bytes written.

    With the model in the shards' flat layout (`adopt_flat_layout`), one lerp per buffer."""
    written, done = 0, set()
    flat = cache.flat if cache is not None else None
    for i, (earlier, later) in enumerate(iter_shard_pairs(plan, cache)):
        if flat is not None:
            written += merge_buffers_into_(flat[i], earlier.buffers, later.buffers, lam)
        else:
            written += merge_shard_into_(tensors, earlier.tensors, later.tensors, lam, done)
    if tensors and next(iter(tensors.values())).is_cuda:
        torch.cuda.synchronize()
    return written


def store_digest(plan: TrialPlan) -> str:
    """A short digest of the object IDs a trial read: equal digests mean the same stored objects."""
    return pair_digest(plan.earlier, plan.later)


def evaluate_lambda(plan: TrialPlan, lam: float, objective: Optional[Objective] = None) -> Dict:
    """Merge at λ into the resident model, score it (with `objective`, default the plan's),
    and return the trial's metrics."""
    start = time.perf_counter()
    device = trial_device()
    resident, built = resident_model(plan, device)
    on_device = cache_shards_on_device(resident, plan, device)
    t_merge = time.perf_counter()
    merge_into_model(plan, resident.tensors, lam, cache=resident)
    t_eval = time.perf_counter()
    memory = worker_memory_mb()  # after the merge, before evaluation allocates activations
    memory["model_uss_mb"] = memory["uss_mb"] - resident.uss_before_build_mb
    metrics = (objective or plan.objective).evaluate(resident.model, device)
    release_freed_memory()
    end = time.perf_counter()
    score = float(metrics["score"])
    if not math.isfinite(score):
        raise FloatingPointError(f"objective returned a non-finite score {score} at λ={lam}")
    return {
        **metrics,
        "lam": float(lam),
        "build_s": t_merge - start,
        "merge_s": t_eval - t_merge,
        "eval_s": end - t_eval,
        "model_built": built,
        **memory,
        "worker": f"{socket.gethostname()}:{os.getpid()}",
        "device": str(device),
        "shards_on_device": on_device,
        "store_digest": store_digest(plan),
    }


@ray.remote(num_cpus=0)
class PlanHolder:
    """Holds the object reference of a run's TrialPlan (and so its shards) while the run lasts,
    and keeps the run's journal of finished evaluations.

    Trials get the plan through this named actor rather than through `tune.with_parameters`,
    which keeps its parameters in Tune's registry until the driver process exits: several runs in
    one process would pile up their checkpoints in the object store. Killing the holder at the
    end of the run drops the last borrower, and Ray frees the plan and the shards. The plan is
    one object in the store (put by the driver), so a node pulls it, with the objective's data,
    once however many trial processes it runs.

    The holder runs on the driver's node (`tune_merge` pins it there) and writes the journal
    (`journal_dir`, the run's ``evaluations/``) there: whatever node a trial ran on, its finished
    evaluation is on the driver's disk before Tune hears of it, so a worker node that is lost
    takes none with it, and a resume finds them all, with or without a filesystem shared by the
    nodes.
    """

    def __init__(self, plan_ref: List[ray.ObjectRef], journal_dir: Optional[str] = None):
        self._plan_ref = plan_ref  # in a list: Ray passes the reference, not the plan
        self._journal_dir = journal_dir

    def plan_ref(self) -> List[ray.ObjectRef]:
        return self._plan_ref

    def lookup(self, lam: float, stage: str) -> Optional[Dict]:
        """The journaled result at λ and fidelity `stage`, or None."""
        return read_journal(self._journal_dir, lam, stage)

    def record(self, lam: float, stage: str, result: Dict) -> None:
        """Journal a finished evaluation (atomically)."""
        write_journal(self._journal_dir, lam, result, stage)

    def lookup_weights(self, weights: List[float]) -> Optional[Dict]:
        """A window run's journaled result for these merge weights, or None."""
        return read_weights_journal(self._journal_dir, weights)

    def record_weights(self, weights: List[float], result: Dict) -> None:
        write_weights_journal(self._journal_dir, weights, result)


# The fidelities a trial reports (the `fidelity` column): the cheap stage of multi-fidelity
# screening, and the full evaluation.
SCREEN, FULL = "screen", "full"

# holder actor name -> (plan, holder), fetched once per worker process and run.
_PLANS: Dict[str, Tuple[TrialPlan, "ray.actor.ActorHandle"]] = {}


def fetch_plan(holder: str) -> Tuple[TrialPlan, "ray.actor.ActorHandle"]:
    """The run's plan and its holder (which keeps the journal), fetched once per worker."""
    if holder not in _PLANS:
        _PLANS.clear()  # an earlier run's plan (and its shard references) is no longer needed
        actor = ray.get_actor(holder)
        [plan_ref] = ray.get(actor.plan_ref.remote())
        _PLANS[holder] = (ray.get(plan_ref), actor)
    return _PLANS[holder]


def merge_trainable(config: Dict, holder: str) -> None:
    """Ray Tune function trainable: merge-and-evaluate at λ, recorded in the journal, reported.

    With multi-fidelity screening on (`plan.screen_limit`), the trial first reports a cheap
    score on the first `screen_limit` documents (`fidelity="screen"`, training iteration 1);
    the scheduler then stops it or lets it go on to the full evaluation (`fidelity="full"`).

    An evaluation already in the run's journal (it finished while the driver was down, on a
    node that was lost, or before a restore re-queued its trial) is reported again, not
    recomputed. An objective that fails at this λ is an answer about λ, not a worker fault: it
    is reported as a result with score NaN and the error, so Tune keeps the worker and does not
    retry it (FailureConfig retries are for dead worker processes).
    """
    from ray import tune

    plan, journal = fetch_plan(holder)
    lam = float(config["lam"])
    if plan.screen_limit is not None:
        screen = evaluate_stage(plan, lam, config, SCREEN, journal)
        tune.report(screen)  # the scheduler may stop the trial here (it then never resumes)
        if screen.get("error"):
            return
    tune.report(evaluate_stage(plan, lam, config, FULL, journal))


def evaluate_stage(plan: TrialPlan, lam: float, config: Dict, stage: str, journal=None) -> Dict:
    """The result of one fidelity at λ: from the journal (the run's `PlanHolder`) if it is
    there, else evaluated and journaled before it is returned. A journal that cannot be written
    (the driver's disk is full) leaves ``journal_error`` in the result: the driver then stops
    the run, which a resume continues."""
    done = ray.get(journal.lookup.remote(lam, stage)) if journal is not None else None
    if done is not None:
        return {**done, "from_journal": True}
    objective = plan.objective.with_limit(plan.screen_limit) if stage == SCREEN else None
    try:
        result = evaluate_lambda(plan, lam, objective)
    except Exception as e:  # noqa: BLE001 - any failure of the merge or objective at this λ
        result = {"score": math.nan, "lam": lam, "error": f"{type(e).__name__}: {e}"}
    result["acquisition"] = search_record(config)["acquisition"]
    result["fidelity"] = stage
    if journal is not None:
        try:
            ray.get(journal.record.remote(lam, stage, result))
        except ray.exceptions.RayTaskError as e:  # raised by the holder: OSError, ...
            cause = getattr(e, "cause", None) or e
            result["journal_error"] = f"{type(cause).__name__}: {cause}"
    return result


# λs closer than this are one evaluation: the merged weights differ by at most
# 1e-6·|Θ(t) - Θ(t-1)| per element, at the rounding of fp32 weights for any pair of adjacent
# checkpoints. A restored searcher re-proposes the λ of a trial that finished after Tune's last
# snapshot only up to its optimizer's tolerance (2.5e-8 apart, seen in a test), and the journal
# must still answer it.
LAM_MATCH = 1e-6


def journal_file(journal_dir: str, lam: float, stage: str = FULL) -> Path:
    """One file per evaluated λ and fidelity, named by the exact float."""
    suffix = "" if stage == FULL else f".{stage}"
    return Path(journal_dir) / f"lam={float(lam)!r}{suffix}.json"


def journaled(journal_dir: str, lam: float, stage: str = FULL) -> Optional[Path]:
    """The journal file of λ, or of the journaled λ nearest to it within `LAM_MATCH`, or None."""
    exact = journal_file(journal_dir, lam, stage)
    if exact.exists():
        return exact
    suffix = ".json" if stage == FULL else f".{stage}.json"
    near = []
    for path in Path(journal_dir).glob("lam=*.json"):
        value = path.name[len("lam="):-len(suffix)] if path.name.endswith(suffix) else ""
        try:
            near.append((abs(float(value) - lam), path))
        except ValueError:  # another fidelity's file (lam=0.5.screen.json for FULL)
            continue
    near = [c for c in near if c[0] <= LAM_MATCH]
    return min(near)[1] if near else None


def write_journal(journal_dir: Optional[str], lam: float, result: Dict, stage: str = FULL) -> None:
    """Record a finished evaluation (the run's `PlanHolder` does, before Tune hears of it)."""
    if journal_dir:
        write_json_atomic(journal_file(journal_dir, lam, stage), result)


def read_journal(journal_dir: Optional[str], lam: float, stage: str = FULL) -> Optional[Dict]:
    """The journaled result at λ (within `LAM_MATCH`) and fidelity `stage`, or None; its
    ``lam`` is the λ that was merged."""
    path = journaled(journal_dir, lam, stage) if journal_dir else None
    if path is None:
        return None
    result = json.loads(path.read_text())
    result["score"] = float(result["score"])  # NaN of a failed evaluation round-trips as NaN
    return result


# A window run (`tune_window`) journals by the merge weights: two points of its search space that
# give the same weights (a searched window length rounds) are one evaluation.


def weights_journal_file(journal_dir: str, weights: List[float]) -> Path:
    """One file per evaluated weight vector, named by a digest of the exact floats (a name
    with k floats would outgrow a file name for long windows); the weights are inside."""
    digest = hashlib.sha1(json.dumps([float(w) for w in weights]).encode()).hexdigest()[:16]
    return Path(journal_dir) / f"w={digest}.json"


def read_weights_journal(journal_dir: Optional[str], weights: List[float]) -> Optional[Dict]:
    """The journaled result whose weights are within `LAM_MATCH` of `weights` (each), or None."""
    if not journal_dir:
        return None
    exact = weights_journal_file(journal_dir, weights)
    for path in [exact] if exact.exists() else sorted(Path(journal_dir).glob("w=*.json")):
        result = json.loads(path.read_text())
        theirs = result.get("weights") or []
        if len(theirs) == len(weights) and max(abs(a - b) for a, b in zip(theirs, weights)) \
                <= LAM_MATCH:
            result["score"] = float(result["score"])
            return result
    return None


def write_weights_journal(journal_dir: Optional[str], weights: List[float], result: Dict) -> None:
    if journal_dir:
        write_json_atomic(weights_journal_file(journal_dir, weights),
                          {**result, "weights": [float(w) for w in weights]})
