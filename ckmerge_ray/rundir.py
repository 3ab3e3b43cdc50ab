"""The output directory of a run: claimed before any work, never shared by two runs by accident.

A tune run's directory holds run.json (what defines the run, for resume), trials.parquet, the
worker journal, summary.json and best/. A comparison or sweep directory holds its own table and
its tune runs in subfolders. These functions refuse a directory that holds another run unless the
caller asked to overwrite or resume it, and remove only what a run of that kind writes.

While a tune run works in its directory it holds the directory's lock (`lock_run_dir`): a second
run started there (a resubmitted job, a second user) is refused with who holds it, and a lock
whose process is gone is taken over.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ckmerge_ray.errors import ConfigError, OutputError, RunError
from ckmerge_ray.results import (
    BEST_OVERALL_DIR, HEATMAP_TABLE, JOURNAL_DIR, LATEST_DIR, LOCK_FILE, PAIRS_DIR, RUN_FILE,
    SUMMARY_FILE, SWEEP_GAIN_PLOT, SWEEP_HEATMAP_PLOT, SWEEP_RECORD, SWEEP_TABLE, TRIALS_FILE,
    WATCH_FILE, WINDOWS_DIR, read_rows, write_json_atomic, writing,
)

# The fields of run.json that define a run, besides every `SearchConfig` field (run.json is
# flat: pair, objective, objective_options, alpha, num_trials, seed, ...): a resume must give
# the same values.
RUN_DEFINING = ("pair", "objective", "objective_options")


def check_not_a_file(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir is a file: {out}")


def claim_tune_dir(out: Path, overwrite: bool, resume: bool, record: Dict,
                   prepare: bool = True) -> Optional[Dict]:
    """Claim `out` for a tune run defined by `record` (`RUN_DEFINING` and the search settings).

    Returns the stored run.json when resuming (after checking `record` matches it), else None.
    Raises ConfigError for a directory holding another run without overwrite or resume, and for
    a resume whose settings differ from the run's. With ``prepare=False`` only the checks run
    (nothing is created or removed), so a caller can refuse early and claim after its other
    checks.
    """
    check_not_a_file(out)
    if resume:
        stored = read_run_file(out)
        diffs = [f"{k}={record[k]!r} (the run has {stored.get(k)!r})"
                 for k in record if jsonable(record[k]) != stored.get(k)]
        if diffs:
            raise ConfigError(f"cannot resume {out} with different arguments: " + "; ".join(diffs))
        return stored
    holds_run = any((out / name).exists() for name in (RUN_FILE, SUMMARY_FILE, TRIALS_FILE))
    if holds_run and not overwrite:
        raise ConfigError(
            f"output directory {out} already holds a run; pass resume=True (CLI: --resume) to "
            "continue it, overwrite=True (CLI: --overwrite) to replace it, or choose another directory"
        )
    if not prepare:
        return None
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for name in (TRIALS_FILE, SUMMARY_FILE, RUN_FILE):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / JOURNAL_DIR, ignore_errors=True)  # another run's evaluations
    return None


def reclaim_tune_dir(out: Path, overwrite: bool, resume: bool, record: Dict,
                     log: Callable[[str], None]) -> Tuple[Optional[Dict], bool]:
    """`claim_tune_dir` in the locked directory, saying what a resume finds: returns the stored
    run.json (None for a new run) and whether that run had finished (its summary is there: the
    caller reports it). A run that was interrupted has the interruption moved to its history."""
    previous = claim_tune_dir(out, overwrite, resume, record)
    if previous and (out / SUMMARY_FILE).exists():
        log(f"{out} holds a finished run; reporting it")
        return previous, True
    if previous and (note := take_interruption(out)):
        log(f"resuming a run interrupted by {note['signal']} at {note['at']} "
            f"({note['trials_recorded']} of {note['trials_requested']} trials recorded)")
    return previous, False


def read_run_file(out: Path) -> Dict:
    """The run.json of the run in `out`; ConfigError if there is none."""
    if not (out / RUN_FILE).exists():
        raise ConfigError(f"nothing to resume in {out}: no {RUN_FILE} (start it without resume)")
    return json.loads((out / RUN_FILE).read_text())


def claim_output_dir(out: Path, table_file: str, overwrite: bool, extra: Sequence[str] = ()) -> Path:
    """Claim `out` for a comparison or sweep: refuse it if it holds `table_file` unless
    `overwrite`, in which case that table, the summary and `extra` (files or folders) go."""
    check_not_a_file(out)
    if (out / table_file).exists():
        if not overwrite:
            raise ConfigError(f"{out} already holds {table_file}; pass overwrite=True "
                              "(CLI: --overwrite) or choose another directory")
        remove_outputs(out, (table_file, SUMMARY_FILE, *extra))
    out.mkdir(parents=True, exist_ok=True)
    return out


# The files that mark a directory as a sweep's or a watch's (neither may start in the other's),
# and what else either writes (an overwrite removes all of it, whichever kind wrote it).
SERIES_FILES = (SWEEP_RECORD, WATCH_FILE, SWEEP_TABLE)
SERIES_OUTPUTS = (SUMMARY_FILE, HEATMAP_TABLE, PAIRS_DIR, WINDOWS_DIR, SWEEP_GAIN_PLOT,
                  SWEEP_HEATMAP_PLOT, LATEST_DIR, BEST_OVERALL_DIR)


def claim_series_dir(out: Path, definition: str, record: Dict, run,
                     prepare: bool = True) -> List[Dict]:
    """Claim `out` for a sweep or watch defined by `record`, kept in the file `definition`
    (``sweep.json``, ``watch.json``); `run` is its `RunConfig` (``overwrite``, ``resume``).

    Returns the rows of ``sweep.parquet`` so far when resuming, after checking that `record`
    matches the stored one; else []. Raises ConfigError for a directory already holding a
    sweep or watch without overwrite or resume (with overwrite, what either kind writes is
    removed), for a resume with nothing to resume, and for one with different arguments,
    naming each. ``prepare=False`` only checks (an early refusal, before expensive work):
    nothing is written or removed."""
    check_not_a_file(out)
    kind = Path(definition).stem
    if run.resume:
        if not (out / definition).exists():
            raise ConfigError(_nothing_to_resume(out, definition, kind))
        stored = json.loads((out / definition).read_text())
        diffs = [f"{k}={v!r} (the {kind} has {stored.get(k)!r})" for k, v in record.items()
                 if jsonable(v) != stored.get(k)]
        if diffs:
            raise ConfigError(f"cannot resume {out} with different arguments: " + "; ".join(diffs))
        return read_rows(out / SWEEP_TABLE)
    held = [name for name in SERIES_FILES if (out / name).exists()]
    if held and not run.overwrite:
        raise ConfigError(f"{out} already holds a sweep or watch ({', '.join(held)}); pass "
                          "resume=True (CLI: --resume) to continue it, overwrite=True (CLI: "
                          "--overwrite) to replace it, or choose another directory")
    if prepare:
        if held:
            remove_outputs(out, (*SERIES_FILES, *SERIES_OUTPUTS))
        with writing(f"the {kind}'s settings {out / definition}", out, f"start the {kind} again"):
            out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(out / definition, record)
    return []


def _nothing_to_resume(out: Path, definition: str, kind: str) -> str:
    if (out / SWEEP_TABLE).exists():  # a sweep written before sweep.json was recorded
        return (f"{out} holds a {kind} without its {definition} (one started before resumes "
                "of a whole sweep existed): it cannot be resumed as a whole; pass overwrite=True "
                "(CLI: --overwrite) to start it again, or resume each unfinished pair's own "
                f"run under {out / PAIRS_DIR} (ckmerge-ray tune --resume DIR)")
    return f"nothing to resume in {out}: no {definition} (start the {kind} without resume)"


def remove_outputs(out: Path, names: Sequence[str]) -> None:
    """Remove these files or folders of an earlier run in `out` (overwrite)."""
    for name in names:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def check_claimable(out: Path, table_file: str, overwrite: bool) -> None:
    """What `claim_output_dir` would refuse, checked without changing anything."""
    check_not_a_file(out)
    if (out / table_file).exists() and not overwrite:
        raise ConfigError(f"{out} already holds {table_file}; pass overwrite=True "
                          "(CLI: --overwrite) or choose another directory")


def jsonable(value):
    """`value` as it reads back from JSON (tuples become lists, paths strings)."""
    return json.loads(json.dumps(value, default=str))


def mark_interrupted(out: Path, signal_name: str, recorded: int, requested: int) -> None:
    """Note in run.json that the run was interrupted (and when, with how many trials recorded);
    a resume moves the note to ``interruptions``. Best effort: the run is resumable without it."""
    try:
        stored = read_run_file(out)
        stored["interrupted"] = {"signal": signal_name, "at": _now(), "trials_recorded": recorded,
                                 "trials_requested": requested}
        write_json_atomic(out / RUN_FILE, stored)
    except (OSError, ValueError, ConfigError):
        pass


def take_interruption(out: Path) -> Optional[Dict]:
    """On resume: the run's last interruption, moved from ``interrupted`` to the list
    ``interruptions`` of run.json; None if it was not interrupted."""
    stored = read_run_file(out)
    note = stored.pop("interrupted", None)
    if note is not None:
        stored.setdefault("interruptions", []).append(note)
        try:
            write_json_atomic(out / RUN_FILE, stored)
        except OSError as e:
            raise OutputError(f"cannot update {out / RUN_FILE}: {e}") from e
    return note


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


# --- the lock of a run's directory ------------------------------------------------------------

# A takeover guard older than this was left by a process that died while taking a lock over
# (which takes milliseconds), and is removed.
TAKEOVER_STALE_S = 30.0


class RunLock:
    """The lock a run holds on its output directory: ``LOCK_FILE``, created with O_EXCL (only one
    process can create it), holding JSON ``{host, pid, started, process_started}``. Released at
    the end of the run (a context manager); a lock left by a process that died is taken over by
    the next run on that host (`lock_run_dir`)."""

    def __init__(self, path: Path, info: Dict):
        self.path, self.info = path, info

    def release(self) -> None:
        if read_lock(self.path, wait_s=0) == self.info:  # never another run's lock
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


def lock_run_dir(out: Path, log: Optional[Callable[[str], None]] = None,
                 timeout_s: float = 10.0) -> RunLock:
    """Take the lock of `out` for this process (creating `out` if needed).

    Raises RunError naming the holder (host, pid, since when) when a live process holds it, or
    one on another host (whose liveness cannot be checked from here); a lock whose process is
    gone from this host (its pid no longer runs, or runs a newer process) is taken over.
    OutputError when the lock cannot be written (a full or read-only disk).
    """
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": _now(),
          "process_started": _process_started(os.getpid())}
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = read_lock(path)
            if not lock_is_stale(holder):
                raise RunError(in_use_message(out, holder)) from None
            if _take_over(path, holder) and log:
                log(f"taking over the lock of {out}: its run (pid {holder['pid']} on "
                    f"{holder['host']}, since {holder['started']}) is no longer running")
            if time.monotonic() > deadline:
                raise RunError(f"could not take over the stale lock {path}; remove it if no run "
                               "uses this directory") from None
            continue
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me))
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            path.unlink(missing_ok=True)
            raise OutputError(f"cannot write the lock {path}: {e}") from e
        return RunLock(path, me)


def check_unlocked(out: Path) -> None:
    """Refuse `out` at once if a live run holds its lock (`lock_run_dir` takes it later)."""
    holder = read_lock(out / LOCK_FILE)
    if (out / LOCK_FILE).exists() and not lock_is_stale(holder):
        raise RunError(in_use_message(out, holder))


def read_lock(path: Path, wait_s: float = 1.0) -> Optional[Dict]:
    """The holder recorded in a lock file; None if there is none or it stays unreadable for
    `wait_s` (its creator writes it just after creating it)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            info = json.loads(path.read_text())
            if isinstance(info, dict) and {"host", "pid", "started"} <= set(info):
                return info
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            pass
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


def lock_is_stale(holder: Optional[Dict]) -> bool:
    """Whether the process that holds a lock is gone. Only a holder on this host can be
    checked; an unreadable lock or one of another host counts as held."""
    import psutil

    if holder is None or holder.get("host") != socket.gethostname():
        return False
    try:
        process = psutil.Process(int(holder["pid"]))
        if process.status() == psutil.STATUS_ZOMBIE:
            return True  # dead, not yet reaped by its parent
        started = process.create_time()
    except psutil.NoSuchProcess:
        return True
    except psutil.AccessDenied:
        return False  # it runs; whether it is the same process is not ours to read
    recorded = holder.get("process_started")
    return recorded is not None and abs(started - recorded) > 1.0  # the pid was reused


def in_use_message(out: Path, holder: Optional[Dict]) -> str:
    path = out / LOCK_FILE
    if holder is None:
        return (f"output directory {out} is locked by {path}, which is unreadable; remove it if no "
                "run uses this directory")
    return (f"output directory {out} is in use by another run: pid {holder['pid']} on host "
            f"{holder['host']}, since {holder['started']}. Wait for it to finish or choose another "
            f"directory; if that run is gone (its machine was lost), remove {path}")


def _take_over(path: Path, stale: Dict) -> bool:
    """Remove the stale lock `stale` from `path`, one process at a time (through an O_EXCL
    guard file), and only if it is still the lock there. Returns whether it was removed."""
    guard = path.with_name(path.name + ".takeover")
    try:
        fd = os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        try:
            if time.time() - guard.stat().st_mtime > TAKEOVER_STALE_S:
                guard.unlink(missing_ok=True)
        except FileNotFoundError:
            pass
        time.sleep(0.05)
        return False
    try:
        if read_lock(path, wait_s=0) == stale:
            path.unlink(missing_ok=True)
            return True
        return False
    finally:
        os.close(fd)
        guard.unlink(missing_ok=True)


def _process_started(pid: int) -> Optional[float]:
    """When process `pid` started (seconds since the epoch), None if that cannot be read."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
