"""The Ray Tune experiment of one run, a pair's (`tuner.py`) or a window's (`window_run.py`): the
run's trainable registered under its own name, its plan holder, the new or restored `Tuner`, and
the fit, with the trials whose worker or node was lost run again.

Both runs pass a context with the fields read here: ``out``, ``run`` (`RunConfig`), ``resources``,
``q`` (trials at once), ``log``, ``objective`` (its ``mode``) and ``trainable`` (set here).
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import ray
from ray import tune
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ckmerge_ray.callbacks import StopWhenAllFail, TrialTableWriter
from ckmerge_ray.config import Resources
from ckmerge_ray.interrupts import LoopStopped, RunGuard, StopForwarder, quiet_tune
from ckmerge_ray.results import JOURNAL_DIR, RUN_FILE, TRIALS_FILE, output_error, read_rows, write_json_atomic
from ckmerge_ray.search import LAMBDA
from ckmerge_ray.trial import PlanHolder, merge_trainable


def build_tuner(ctx, run_id: str, searcher, previous: Optional[Dict], record: Dict, *,
                num_samples: int, function=merge_trainable, params: Sequence[str] = (LAMBDA,),
                scheduler=None) -> Tuple[tune.Tuner, str]:
    """A new Tune experiment of `num_samples` trials of `function` (run.json written first,
    with the experiment's path), or, with `previous` (the run.json of the run to resume), the
    restored one. `params`: the trials table's parameter columns. Returns the tuner and the
    experiment's path. Raises OutputError when run.json cannot be written."""
    experiment_id = previous["experiment"].rstrip("/").rsplit("/", 1)[-1] if previous else None
    ctx.trainable = register_run_trainable(
        f"ckmerge-plan-{run_id}", experiment_id or f"ckmerge-{run_id}", ctx.resources, function)
    if previous:
        # The writer and stopper come back from the experiment's own state (Tune pickles its
        # RunConfig); the writer reloads the rows already on disk.
        experiment = previous["experiment"]
        ctx.log(f"resuming {experiment}: {len(read_rows(ctx.out / TRIALS_FILE))} trial(s) "
                "already recorded")
        with quiet_tune():
            return (tune.Tuner.restore(experiment, trainable=ctx.trainable, restart_errored=True),
                    experiment)
    storage = ctx.run.storage_path or str(ctx.out / "ray")
    experiment = experiment_path(storage, f"ckmerge-{run_id}")
    try:
        write_json_atomic(ctx.out / RUN_FILE, {**record, "experiment": experiment})
    except OSError as e:
        raise output_error(e, f"the run's settings {ctx.out / RUN_FILE}", ctx.out) from e
    writer = TrialTableWriter(ctx.out / TRIALS_FILE, num_samples, ctx.objective.mode,
                              ctx.run.progress, params=tuple(params))
    tuner = tune.Tuner(
        ctx.trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                    num_samples=num_samples, max_concurrent_trials=ctx.q,
                                    reuse_actors=True),
        run_config=tune.RunConfig(
            name=f"ckmerge-{run_id}", storage_path=storage, callbacks=[writer, StopForwarder()],
            stop=StopWhenAllFail(writer, after=min(num_samples, 3)),
            failure_config=tune.FailureConfig(max_failures=ctx.run.max_failures), verbose=0,
        ),
    )
    return tuner, experiment


def start_plan_holder(plan, out: Path):
    """The run's `PlanHolder` (named after the plan's run id), on the driver's node, whose disk
    holds the journal: a lost worker node cannot take the holder (and the run's plan and
    journal) with it."""
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return PlanHolder.options(name=f"ckmerge-plan-{plan.run_id}", scheduling_strategy=here
                              ).remote([ray.put(plan)], str(out / JOURNAL_DIR))


# Ray Tune's registry of trainables is a process-wide dict that registering iterates over:
# runs in several threads (`sweep` and `watch` with pairs at once) register one at a time.
_REGISTRY_LOCK = threading.Lock()


def register_run_trainable(holder: str, experiment_id: str, resources: Resources,
                           function=merge_trainable) -> str:
    """Register `function` (default `merge_trainable`; a window run's is
    `window_trial.window_trainable`), bound to the run's plan holder, under a name of its own (the
    experiment's, so that `Tuner.restore` finds the name it saved); returns the name, which the
    Tuner takes in place of the function.

    Tune registers a trainable under its name for the whole cluster, and
    `tune.with_parameters` keys its parameters by the function's ``str``: runs of one driver
    tuning pairs concurrently would each take whichever run registered last, and merge another
    pair's checkpoints."""
    name = experiment_id.replace("ckmerge-", "merge-", 1)

    def trainable(config: Dict) -> None:
        function(config, holder)

    trainable.__name__ = trainable.__qualname__ = name
    with _REGISTRY_LOCK:
        tune.register_trainable(name, tune.with_resources(trainable, resources.to_dict()))
    return name


def experiment_path(storage: str, name: str) -> str:
    """The experiment `name` under Tune's `storage` (a folder or a URI)."""
    return f"{storage.rstrip('/')}/{name}" if "://" in storage else str(Path(storage) / name)


# Errors of a trial whose worker process or node died, rather than of its merge or objective.
LOST_WORKER_ERRORS = (ray.exceptions.RayActorError, ray.exceptions.NodeDiedError,
                      ray.exceptions.WorkerCrashedError, ray.exceptions.LocalRayletDiedError,
                      ray.exceptions.ObjectLostError)
# Times the trials that failed that way are run again after Tune gave up on them.
LOST_TRIAL_ROUNDS = 2


def fit(ctx, guard: RunGuard, tuner: tune.Tuner, experiment: str) -> Tuple[Any, bool]:
    """Run Tune's loop; then run again, from the experiment Tune saved, the trials that failed
    because their worker or node died. Returns the result grid and whether it was restored.

    Tune retries such a trial `max_failures` times, but a lost node can use those retries up in
    a second: Tune hands the retry to the idle actors it cached on that node (reuse_actors),
    which fail at once until Ray has declared the node dead. Run again once Tune's loop is over,
    the trial gets a new actor on a node that is alive; an evaluation it finished before its
    node went is answered from the journal.
    """
    restored = False
    for again in range(LOST_TRIAL_ROUNDS + 1):
        with guard.tune_loop():
            try:
                grid = tuner.fit()
            except OSError as e:  # Tune's own files (storage_path) on a full disk
                raise output_error(e, f"Ray Tune's experiment {experiment}", ctx.out) from e
            except LoopStopped:  # a stop request in a run outside the main thread
                if guard.error is not None:
                    raise guard.error from None
                raise KeyboardInterrupt(signal.Signals(guard.signum).name) from None
        lost = [r.error for r in grid if r.error is not None and lost_worker(r.error)]
        if not lost or guard.stop_requested or again == LOST_TRIAL_ROUNDS:
            return grid, restored
        ctx.log(f"{len(lost)} trial(s) failed because a worker or node was lost "
                f"({type(lost[0]).__name__}) after Ray Tune's retries: running them again")
        with quiet_tune():
            tuner = tune.Tuner.restore(experiment, trainable=ctx.trainable, restart_errored=True)
        restored = True
    return grid, restored


def lost_worker(error: BaseException) -> bool:
    """Whether a trial's error says its worker process or node died (not its merge or
    objective, whose failures are reported as results)."""
    return any(isinstance(e, LOST_WORKER_ERRORS)
               for e in (error, getattr(error, "cause", None), error.__cause__))
