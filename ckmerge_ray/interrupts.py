"""Stopping a tuning run without losing it: SIGINT, SIGTERM, and a file the run cannot write.

Ctrl-C (SIGINT), the SIGTERM a job scheduler or a preempted node sends, and a table or journal
that cannot be written (a full disk) all end a run the way Ray Tune ends one on Ctrl-C: Tune's
loop stops, Tune saves the experiment a last time (trials in flight are queued again when it is
restored), and `tune_merge` then raises `RunInterrupted` or `OutputError` instead of writing
results as if the run had finished. `ckmerge-ray tune --resume RUN_DIR` continues it.

Why not leave SIGINT to Tune: `Tuner.fit` returns normally after it, so a caller cannot tell an
interrupted run from a finished one (ckmerge-ray used to export best/ from the trials done so
far and write summary.json, and a resume then reported the run as finished); Tune ignores
SIGTERM; and an exception raised in a Tune callback only fails the trial at hand. So for the
duration of a run `RunGuard` takes SIGINT and SIGTERM (main thread only), turns Tune's own
SIGINT handler off while its loop runs (``TUNE_DISABLE_SIGINT_HANDLER``, a documented switch),
and `StopForwarder`, a Tune callback, passes a stop request to the loop at its next step by
raising SIGUSR1, on which Tune always stops gracefully (``ray/tune/tune.py``,
``_setup_signal_catching``). A second signal, or one outside Tune's loop (storing the shards,
writing the results), stops at once: the run is then as a killed driver leaves it (Tune's last
periodic snapshot, the journal, the table), which a resume also continues.

A signal sent to the whole process group or cgroup (Slurm's ``scancel``, systemd's stop) also
ends the local Ray instance the driver started; Tune can then save nothing, and Ray's driver
would wait 60 s for its GCS and exit 1. `watch_local_ray`, started by the first signal, sees
those processes end: it notes the interruption in each run's run.json, prints how to resume,
and exits with 128 + the signal at once (the journal and Tune's last snapshot are on disk).

Runs in other threads (the pairs a sweep or watch tunes concurrently) have guards too, one per
thread. Python delivers signals to the main thread only: its guard passes a signal on to every
guard of the process, and `StopForwarder` ends a loop in another thread (where Tune has no
signal handler) by raising `LoopStopped` in it; Tune then stops the trials in flight, and the
run is left as a killed driver leaves it.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

from ray import tune

from ckmerge_ray.cluster import local_ray_alive
from ckmerge_ray.errors import CkmergeError, RunInterrupted
from ckmerge_ray.results import RUN_FILE, TRIALS_FILE, read_rows, resume_hint
from ckmerge_ray.rundir import mark_interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)
TUNE_SIGINT_SWITCH = "TUNE_DISABLE_SIGINT_HANDLER"
# Ray Tune's console output that a run replaces with its own: the experiment box and paths that
# Tune's new output engine prints even at verbose=0 (the legacy engine, RAY_AIR_NEW_OUTPUT=0,
# honours verbose=0); "Resume experiment with: Tuner.restore(...)" after an interrupt (the run
# prints its own `--resume` command); "Failed to fetch metrics" for a trial an interrupt cut
# short before its first result (the run's trials.parquet, not Tune's files, is the record).
TUNE_OUTPUT_SWITCH = "RAY_AIR_NEW_OUTPUT"
TUNE_NOISE = {"ray.tune.tune": "Resume experiment with",
              "ray.tune.analysis.experiment_analysis": "Failed to fetch metrics"}


class _Drop(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


_QUIET = {"depth": 0, "saved": None}  # quiet_tune's nesting (runs of a sweep overlap in threads)
_QUIET_LOCK = threading.Lock()


@contextmanager
def quiet_tune() -> Iterator[None]:
    """Around Tune's fit and restore: none of TUNE_NOISE's output; as it was once the last of
    the overlapping blocks (a sweep's pairs run in threads) has ended."""
    with _QUIET_LOCK:
        if _QUIET["depth"] == 0:
            _QUIET["saved"] = os.environ.get(TUNE_OUTPUT_SWITCH)
            os.environ[TUNE_OUTPUT_SWITCH] = "0"
        _QUIET["depth"] += 1
    filters = [(logging.getLogger(name), _Drop(text)) for name, text in TUNE_NOISE.items()]
    for logger, f in filters:
        logger.addFilter(f)
    try:
        yield
    finally:
        for logger, f in filters:
            logger.removeFilter(f)
        with _QUIET_LOCK:
            _QUIET["depth"] -= 1
            if _QUIET["depth"] == 0:
                if _QUIET["saved"] is None:
                    os.environ.pop(TUNE_OUTPUT_SWITCH, None)
                else:
                    os.environ[TUNE_OUTPUT_SWITCH] = _QUIET["saved"]

# The guard of the run in progress in each thread (none outside tune_merge), read by the Tune
# callbacks, which run in the thread of their Tune loop and which Tune pickles with the
# experiment (so they cannot hold it themselves); and every guard of the process, which a
# signal reaches through the main thread's.
_LOCAL = threading.local()
_ALL: List["RunGuard"] = []
_ALL_LOCK = threading.Lock()


def active_guard() -> Optional["RunGuard"]:
    """The guard of the run in progress in this thread, or None."""
    return getattr(_LOCAL, "guard", None)


class LoopStopped(CkmergeError):
    """Raised by `StopForwarder` in a Tune loop that runs outside the main thread, to end it."""


class RunGuard:
    """SIGINT and SIGTERM of one run, and the reason it must stop, if any (a context manager).

    Attributes:
        signum: the first signal received, or None.
        error: an `OutputError` (or other `CkmergeError`) that stops the run, or None.
    """

    def __init__(self, log: Callable[[str], None]):
        self.log = log
        self.signum: Optional[int] = None
        self.error: Optional[CkmergeError] = None
        self.in_tune_loop = False
        self.forwarded = False
        self.run: Optional[tuple] = None  # (run directory, trials requested) once it is locked
        self._previous: Dict[int, Any] = {}  # handlers to put back at the end
        self._outer: Optional[RunGuard] = None

    # --- the signals ---------------------------------------------------------------------------

    def __enter__(self) -> "RunGuard":
        self._outer, _LOCAL.guard = active_guard(), self
        with _ALL_LOCK:
            _ALL.append(self)
        self.take_signals()
        return self

    def __exit__(self, *exc) -> bool:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        with _ALL_LOCK:
            _ALL.remove(self)
        _LOCAL.guard = self._outer
        return False

    def take_signals(self) -> None:
        """Handle SIGINT and SIGTERM here. Called again once Ray is connected: `ray.init`
        installs its own SIGTERM handler (``sys.exit``), which would skip the saving."""
        if threading.current_thread() is not threading.main_thread():
            return  # Python lets only the main thread set handlers; Tune then keeps SIGINT
        for sig in SIGNALS:
            current = signal.getsignal(sig)
            if current != self._handle:
                self._previous.setdefault(sig, current)
                signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        # Records only: printing here could re-enter a print the main thread was in.
        with _ALL_LOCK:
            others = [g for g in _ALL if g is not self]
        start_watching(signum)
        for guard in others:  # the runs of other threads stop at their loop's next step
            guard.signum = guard.signum or signum
        if self.signum is not None or not self.in_tune_loop:
            self.signum = self.signum or signum
            raise KeyboardInterrupt(signal.Signals(signum).name)  # again, or outside Tune: now
        self.signum = signum

    @contextmanager
    def tune_loop(self) -> Iterator[None]:
        """Around `Tuner.fit`: Tune's SIGINT handler off, so that ours sees the signal, and the
        SIGUSR1 handler Tune leaves behind put back afterwards; Tune's own output quiet."""
        ours = bool(self._previous)
        saved_env = os.environ.get(TUNE_SIGINT_SWITCH)
        saved_usr1 = signal.getsignal(signal.SIGUSR1) if ours else None
        if ours:
            os.environ[TUNE_SIGINT_SWITCH] = "1"
        self.in_tune_loop = True
        try:
            with quiet_tune():
                yield
        finally:
            self.in_tune_loop = False
            if ours:
                if saved_env is None:
                    os.environ.pop(TUNE_SIGINT_SWITCH, None)
                else:
                    os.environ[TUNE_SIGINT_SWITCH] = saved_env
                signal.signal(signal.SIGUSR1, saved_usr1)

    # --- stop requests -------------------------------------------------------------------------

    def stop(self, error: CkmergeError) -> None:
        """Ask the run to stop because of `error` (the first one is kept and raised)."""
        if self.error is None:
            self.error = error
            self.log(f"stopping the run: {error}")

    @property
    def stop_requested(self) -> bool:
        return self.signum is not None or self.error is not None

    def raise_if_stopped(self, out: Path, requested: int) -> None:
        """After Tune's loop: raise what stopped it (the error first, then the signal)."""
        if self.error is not None:
            raise self.error
        if self.signum is not None:
            raise self.interrupted(out, requested, saved=True)

    def interrupted(self, out: Path, requested: int, saved: bool,
                    mark: bool = True) -> RunInterrupted:
        """The `RunInterrupted` of the run in `out` (of `requested` trials), noted in its
        run.json when `mark`. `saved`: Ray Tune saved the experiment after the signal; else
        its last periodic snapshot and the journal are what a resume starts from. A
        KeyboardInterrupt without a signal of ours counts as SIGINT."""
        signum = self.signum or signal.SIGINT
        name = signal.Signals(signum).name
        if not (out / RUN_FILE).exists():
            return RunInterrupted(f"interrupted by {name} before the run started; nothing to "
                                  f"resume in {out}: start it again", signum)
        recorded = len(read_rows(out / TRIALS_FILE))
        if mark:
            mark_interrupted(out, name, recorded, requested)
        how = ("Ray Tune saved the experiment" if saved else
               "stopped at once (the journal and Ray Tune's last snapshot are kept)")
        return RunInterrupted(
            f"interrupted by {name}: {recorded} of {requested} trials recorded, {how}; no best "
            f"model or summary was written. Continue with: {resume_hint(out, python=True)}; "
            "finished evaluations are not redone", signum)


_WATCHING = threading.Event()  # a signal started `watch_local_ray`
_CONTINUE: List[str] = []  # what continues the sweep or watch in progress (`continue_with`)


@contextmanager
def continue_with(hint: str) -> Iterator[None]:
    """While a sweep or watch runs: `hint` says how to continue it, for `watch_local_ray`."""
    _CONTINUE.append(hint)
    try:
        yield
    finally:
        _CONTINUE.remove(hint)


def start_watching(signum: int) -> None:
    """On the process's first signal: `watch_local_ray` in a thread of its own."""
    if not _WATCHING.is_set():
        _WATCHING.set()
        threading.Thread(target=watch_local_ray, args=(signum,), daemon=True,
                         name="ckmerge-ray-watch").start()


def watch_local_ray(signum: int, poll: float = 0.2) -> None:
    """After a signal: if the local Ray this process started ends too (the signal went to
    the whole process group), note the interruption of every run in progress, print how to
    continue, and exit with 128 + `signum`. Returns when Ray was joined, not started, or when
    it is shut down by this process."""
    while (alive := local_ray_alive()) is not False:
        if alive is None:
            _WATCHING.clear()  # a later run of this process watches again on its signal
            return
        time.sleep(poll)
    if local_ray_alive() is None:  # shut down by `disconnect` while we looked: not a fault
        _WATCHING.clear()
        return
    with _ALL_LOCK:
        runs = [g for g in _ALL if g.run is not None]
    name = signal.Signals(signum).name
    lines = [f"{name} reached Ray's local processes too: Ray Tune could not save the experiment"]
    for guard in runs:
        guard.signum = guard.signum or signum
        try:
            lines.append(str(guard.interrupted(*guard.run, saved=False)))
        except Exception as e:  # noqa: BLE001 - the exit below must happen
            lines.append(f"{guard.run[0]}: {e}")
    lines += list(_CONTINUE)
    try:
        print("\n".join(f"ckmerge-ray: {line}" for line in lines), file=sys.stderr, flush=True)
    finally:
        os._exit(128 + signum)


def request_stop(error: CkmergeError, log: Optional[Callable[[str], None]] = None) -> bool:
    """Ask the run in progress to stop with `error` (from a Tune callback). False when no run
    is guarded in this process; the caller then reports the error itself."""
    guard = active_guard()
    if guard is None:
        if log:
            log(f"error: {error}")
        return False
    guard.stop(error)
    return True


def stop_all_runs(error: BaseException) -> None:
    """Ask every guarded run of the process to stop because of `error` (a sweep or watch that
    is ending while pairs run): a signal or interruption stops them as that signal would."""
    with _ALL_LOCK:
        guards = list(_ALL)
    for guard in guards:
        if isinstance(error, (KeyboardInterrupt, RunInterrupted)):
            guard.signum = guard.signum or getattr(error, "signum", None) or signal.SIGINT
        elif isinstance(error, CkmergeError):
            guard.stop(error)
        else:
            guard.stop(CkmergeError(f"stopped: {type(error).__name__}: {error}"))


class StopForwarder(tune.Callback):
    """Passes a stop request of the run's `RunGuard` to Tune's loop, at the loop's next step.
    In the main thread it raises SIGUSR1, Tune's graceful stop (the experiment saved, trials in
    flight re-queued on restore); in another thread, where Tune has no signal handler, it raises
    `LoopStopped`, on which Tune stops the trials in flight (``ray/tune/tune.py``: the loop's
    ``except Exception``) and saves nothing more: a resume starts from Tune's last periodic
    snapshot and the journal."""

    def on_step_begin(self, iteration: int, trials, **info):
        guard = active_guard()
        if guard is None or guard.forwarded or not guard.stop_requested:
            return
        guard.forwarded = True
        main = threading.current_thread() is threading.main_thread()
        if guard.error is None:
            name = signal.Signals(guard.signum).name
            guard.log(f"{name} received: stopping once Ray Tune has saved the experiment (trials "
                      f"in flight run again on resume); send {name} again to stop at once"
                      if main else f"{name} received: stopping this run's trials")
        if not main:
            raise LoopStopped("stop requested")
        if callable(signal.getsignal(signal.SIGUSR1)):
            signal.raise_signal(signal.SIGUSR1)
