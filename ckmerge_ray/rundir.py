"""The output directory of a run: claimed before any work, never shared by two runs by accident.

A tune run's directory holds run.json (what defines the run, for resume), trials.parquet, the
worker journal, summary.json and best/. A comparison or sweep directory holds its own table and
its tune runs in subfolders. These functions refuse a directory that holds another run unless the
caller asked to overwrite or resume it, and remove only what a run of that kind writes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict, Optional, Sequence

from ckmerge_ray.errors import ConfigError
from ckmerge_ray.results import JOURNAL_DIR, RUN_FILE, SUMMARY_FILE, TRIALS_FILE

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
        for name in (table_file, SUMMARY_FILE, *extra):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def check_claimable(out: Path, table_file: str, overwrite: bool) -> None:
    """What `claim_output_dir` would refuse, checked without changing anything."""
    check_not_a_file(out)
    if (out / table_file).exists() and not overwrite:
        raise ConfigError(f"{out} already holds {table_file}; pass overwrite=True "
                          "(CLI: --overwrite) or choose another directory")


def jsonable(value):
    """`value` as it reads back from JSON (tuples become lists, paths strings)."""
    return json.loads(json.dumps(value, default=str))
