"""Adjacent pairs tuned at once, for `sweep` and `watch`: how many, and the pool that runs them.

Each pair in flight is its own `tune_merge` run, in a thread of the driver: its own Tune
experiment, directory, journal, results and resume, exactly as a pair tuned alone. The cluster's
trial slots are shared by Ray's scheduler, which every pair's trials ask for the same per-trial
resources. Why not one Tune experiment over several searchers: a pair would no longer be a run
that can be inspected, resumed or compared on its own, and GP-Hedge's batches would mix pairs.
Ray Tune supports its loop outside the main thread (``ray/tune/tune.py``: it then installs no
signal handler); `interrupts` passes Ctrl-C and SIGTERM on to every pair, and the trainable of
each run is registered under its own name (`experiment.register_run_trainable`).

The main thread reads each checkpoint and puts it into the object store once, then hands the
shards to the pairs that need them; its own reference goes as soon as no pair still to be
submitted needs it, so Ray frees a checkpoint once the pairs in flight that hold it are done.
"""

from __future__ import annotations

import concurrent.futures as cf
import math
from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence, Tuple

from ckmerge_ray.cluster import STORE_BUDGET, smallest_store, trial_slots
from ckmerge_ray.config import Resources
from ckmerge_ray.interrupts import RunGuard, stop_all_runs

Log = Callable[[str], None]


def pair_concurrency(pairs_at_once: Optional[int], per_pair: Optional[int], resources: Resources,
                     num_trials: int, num_pairs: int, sizes: Sequence[int],
                     span: int = 2) -> Tuple[int, int]:
    """(pairs at once p, trials at once per pair q) on the connected cluster.

    Given `pairs_at_once` and `per_pair` (`max_concurrent`), those. Without `pairs_at_once`:
    as many pairs as the trial slots hold `per_pair` trials each, and as the object store of the
    smallest node that runs trials holds p + span - 1 checkpoints of `sizes` (bytes, oldest
    first; `span` 2 for pairs, k for a sweep's windows of k) within `STORE_BUDGET`; at most `num_pairs`, at least 1. Without `per_pair`: the slots shared
    evenly among the p pairs (so 4 slots and 4 pairs give 4 pairs of one trial at a time, which
    is also GP-Hedge's most sample-efficient batch size; see BENCHMARKS.md).
    """
    slots = trial_slots(resources, None, num_trials * max(num_pairs, 1))
    if pairs_at_once is None:
        fit = max(1, slots // (per_pair or 1))
        store = int(smallest_store(resources)[0]["Resources"].get("object_store_memory", 0))
        while fit > 1 and window_bytes(sizes, fit, span) > STORE_BUDGET * store:
            fit -= 1
        pairs_at_once = max(1, min(fit, num_pairs))
    if per_pair is None:
        per_pair = max(1, min(num_trials, math.ceil(slots / pairs_at_once)))
    return pairs_at_once, per_pair


def window_bytes(sizes: Sequence[int], pairs_at_once: int, span: int = 2) -> int:
    """Bytes of the most checkpoints in the object store at once when `pairs_at_once` adjacent
    pairs (windows of `span` checkpoints) run together: the largest run of p + span - 1
    consecutive checkpoints."""
    n = min(len(sizes), pairs_at_once + span - 1)
    return max(sum(sizes[i:i + n]) for i in range(len(sizes) - n + 1)) if sizes else 0


class PairPool:
    """Runs up to `workers` pairs at once (a context manager); with one worker, each in the
    calling thread when submitted, as a sequential sweep did.

    While it is open, the first SIGINT or SIGTERM is passed to every pair, whose Tune loop stops
    at its next step (the pair then raises `RunInterrupted`; it resumes like any run), and
    `stop_requested` tells the caller to submit no more; a second signal stops at once. An
    exception leaving the pool stops the pairs still running, and the pool waits for them.
    """

    def __init__(self, workers: int, log: Log):
        self.workers, self.log = workers, log
        self._pending: Dict[cf.Future, Hashable] = {}
        self._executor: Optional[cf.ThreadPoolExecutor] = None
        self._guard: Optional[RunGuard] = None

    def __enter__(self) -> "PairPool":
        if self.workers > 1:
            self._guard = RunGuard(self.log).__enter__()
            self._guard.in_tune_loop = True  # a first signal is recorded (and passed on) only
            self._executor = cf.ThreadPoolExecutor(self.workers, thread_name_prefix="pair")
        return self

    def __exit__(self, kind, error, tb) -> bool:
        try:
            if error is not None and self._pending:
                stop_all_runs(error)
            if self._executor is not None:
                self._executor.shutdown(wait=True)
        finally:
            if self._guard is not None:
                self._guard.__exit__(kind, error, tb)
        return False

    @property
    def full(self) -> bool:
        return len(self._pending) >= self.workers

    @property
    def stop_requested(self) -> bool:
        return self._guard is not None and self._guard.stop_requested

    @property
    def signum(self) -> Optional[int]:
        return self._guard.signum if self._guard is not None else None

    def submit(self, key: Hashable, fn: Callable[..., Any], *args, **kwargs) -> None:
        """Run ``fn(*args, **kwargs)`` as pair `key` (now, in this thread, with one worker)."""
        if self._executor is None:
            future: cf.Future = cf.Future()
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as e:  # noqa: BLE001 - handed to the caller by finished()
                future.set_exception(e)
        else:
            future = self._executor.submit(fn, *args, **kwargs)
        self._pending[future] = key

    def finished(self, timeout: Optional[float] = None) -> List[Tuple[Hashable, cf.Future]]:
        """Pairs that are done, in submission order: waits up to `timeout` seconds (None: until
        one is) when none is. Their futures' ``result()`` gives the value or raises."""
        if not self._pending:
            return []
        done, _ = cf.wait(list(self._pending), timeout=timeout,
                          return_when=cf.FIRST_COMPLETED)
        ordered = [f for f in self._pending if f in done]
        return [(self._pending.pop(f), f) for f in ordered]

    def wait_for_room(self) -> List[Tuple[Hashable, cf.Future]]:
        """The pairs that finished while the pool was full (none when it was not)."""
        out: List[Tuple[Hashable, cf.Future]] = []
        while self.full:
            out += self.finished(timeout=1.0)
        return out

    def drain(self) -> List[Tuple[Hashable, cf.Future]]:
        """Every pair still running, as each finishes."""
        out: List[Tuple[Hashable, cf.Future]] = []
        while self._pending:
            out += self.finished(timeout=1.0)
        return out
