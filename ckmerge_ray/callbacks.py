"""Ray Tune callbacks of a tuning run: the trials table, written as trials finish, and the stop
when every trial fails.

`TrialTableWriter` is the run's record: one row per trial (λ, the searcher's record, status,
score and every metric the trial reported), trials.parquet rewritten atomically after each, and
one progress line per trial. After a restore it starts from the table on disk. A table or journal
it cannot write (a full disk) stops the run (`interrupts.request_stop`), which a resume continues:
a Tune callback that raised would only fail the trial at hand.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Sequence

from ray import tune

from ckmerge_ray.errors import OutputError
from ckmerge_ray.interrupts import request_stop
from ckmerge_ray.results import (
    JOURNAL_DIR, output_error, read_rows, resume_hint, write_table_atomic,
)
from ckmerge_ray.search import LAMBDA, search_record
from ckmerge_ray.trial import (
    FULL, journal_file, read_weights_journal, write_journal, write_weights_journal,
)


class TrialTableWriter(tune.Callback):
    """Appends a row per finished or failed trial and rewrites trials.parquet atomically."""

    def __init__(self, path: Path, total: int, mode: str, progress: bool,
                 params: Sequence[str] = (LAMBDA,)):
        self.path = Path(path)
        self.total = total
        self.mode = mode
        self.progress = progress
        self.params = tuple(params)  # the searched parameters: a column each
        self.rows: List[Dict] = []
        self._reconciled = True  # setup() starts each fit (and restore) by reconciling

    def setup(self, **info):
        # On a restored experiment this object comes back from Tune's pickled state, rows and
        # all as of the run's start: the table on disk is the record, so start from it.
        self.rows = read_rows(self.path)
        self._reconciled = False

    def on_step_begin(self, iteration: int, trials, **info):
        # After a restore, the table and Tune's last experiment snapshot may disagree: drop rows
        # of trials the snapshot did not hold (they finished after it: the restored searcher
        # proposes them again and the journal answers without recomputing, under a new trial
        # ID; kept, they would count twice), and add the rows of trials the snapshot holds as
        # finished that the table lacks (their row could not be written: a full disk).
        # A finished trial whose worker could not journal its evaluation is journaled here,
        # from Tune's record of its result, so that the journal and the table agree.
        if self._reconciled:
            return
        self._reconciled = True
        known = {t.trial_id for t in trials}
        kept = [r for r in self.rows if r["trial_id"] in known]
        have = {r["trial_id"] for r in kept}
        finished = [t for t in trials if t.status == "TERMINATED" and t.last_result]
        for t in finished:
            if t.last_result.get("journal_error"):
                self._journal(t)
        missing = [self._row(t) for t in finished if t.trial_id not in have]
        if len(kept) != len(self.rows) or missing:
            self.rows = kept + missing
            self._write()

    def on_trial_complete(self, iteration: int, trials, trial, **info):
        r = trial.last_result or {}
        if r.get("journal_error"):
            request_stop(OutputError(
                f"cannot record the evaluation at {self._point(r)} in the run's journal "
                f"{self.path.parent / JOURNAL_DIR} ({r['journal_error']}); everything the run "
                f"wrote before is intact: free space, then resume it "
                f"({resume_hint(self.path.parent)})"), self._log)
        self._add(self._row(trial))

    def _row(self, trial) -> Dict:
        """The table row of a finished trial, from its last result."""
        r = dict(trial.last_result or {})
        score = r.get("score")
        ok = r.get("error") is None and isinstance(score, (int, float)) and math.isfinite(score)
        row = {
            "trial_id": trial.trial_id,
            **{p: float(trial.config.get(p, r.get(p, math.nan))) for p in self.params},
            **search_record(trial.config),
            "status": "ok" if ok else "error",
            "score": score if ok else None,
        }
        for key, value in r.items():
            if key in row or key in TUNE_BOOKKEEPING or isinstance(value, (dict, list)):
                continue
            row[key] = value
        row["duration_s"] = r.get("time_total_s")
        row["error"] = None if ok else (r.get("error") or "no finite score reported")
        return row

    def on_trial_error(self, iteration: int, trials, trial, **info):
        self._add({
            "trial_id": trial.trial_id,
            **{p: float(trial.config.get(p, math.nan)) for p in self.params},
            **search_record(trial.config),
            "status": "error",
            "score": None,
            "error": trial_error(trial),
        })

    def _add(self, row: Dict) -> None:
        # A trial re-run after a restore keeps its trial_id: one row per trial, never two.
        self.rows = [r for r in self.rows if r["trial_id"] != row["trial_id"]] + [row]
        self._write()
        if self.progress:
            if row["status"] == "ok":
                timing = f"merge {row.get('merge_s', 0):.2f}s, eval {row.get('eval_s', 0):.2f}s"
                what = f"score={row['score']:.5f} ({timing})"
            else:
                what = f"FAILED: {row['error']}"
            if row.get("fidelity") == "screen":
                what += " on the screening subset: not competitive, stopped"
            if row.get("from_journal"):
                what += " (from the run's journal, not recomputed)"
            print(
                f"[ckmerge] trial {len(self.rows)}/{self.total} {self._point(row)} "
                f"[{row['acquisition']}] {what}",
                flush=True,
            )

    def _write(self) -> None:
        """Rewrite the table; one that cannot be written stops the run (the table on disk
        keeps every earlier row: the write is atomic)."""
        try:
            write_table_atomic(self.path, self.rows)
        except OSError as e:
            request_stop(output_error(e, f"the trials table {self.path}", self.path.parent),
                         self._log)

    def _journal(self, trial) -> None:
        """Journal a finished trial's result from Tune's record of it, unless it is there."""
        result = {k: v for k, v in trial.last_result.items() if k not in TUNE_BOOKKEEPING}
        journal = str(self.path.parent / JOURNAL_DIR)
        try:
            if LAMBDA not in trial.config:  # a window run: journaled by its merge weights
                if read_weights_journal(journal, result["weights"]) is None:
                    write_weights_journal(journal, result["weights"], result)
                return
            lam, stage = float(trial.config[LAMBDA]), result.get("fidelity", FULL)
            if journal_file(journal, lam, stage).exists():
                return
            write_journal(journal, lam, result, stage)
        except OSError as e:
            request_stop(output_error(e, f"the run's journal {journal}", self.path.parent),
                         self._log)

    def _point(self, row: Dict) -> str:
        """How a progress line names a trial's point: λ, or a window's merge weights."""
        if self.params == (LAMBDA,):
            return f"λ={row.get(LAMBDA, math.nan):.4f}"
        weights = [row[k] for k in sorted((k for k in row if k[:1] == "w" and k[1:].isdigit()),
                                          key=lambda k: int(k[1:]))]
        if weights and all(isinstance(w, float) for w in weights):
            return "w=(" + ", ".join(f"{w:.3f}" for w in weights) + ")"
        return ", ".join(f"{p}={row.get(p, math.nan):.4f}" for p in self.params)

    def _log(self, message: str) -> None:
        if self.progress:
            print(f"[ckmerge] {message}", flush=True)


class StopWhenAllFail(tune.stopper.Stopper):
    """Ends the experiment once `after` trials have ended and every one of them failed: a broken
    objective or model fails every λ alike, and the run should say so, not spin through all."""

    def __init__(self, writer: TrialTableWriter, after: int):
        self.writer = writer
        self.after = after

    def __call__(self, trial_id: str, result: Dict) -> bool:
        return False

    def stop_all(self) -> bool:
        rows = self.writer.rows
        return len(rows) >= self.after and all(r["status"] != "ok" for r in rows)


TUNE_BOOKKEEPING = {
    "timestamp", "checkpoint_dir_name", "done", "training_iteration", "trial_id", "date",
    "time_this_iter_s", "time_total_s", "pid", "hostname", "node_ip", "time_since_restore",
    "iterations_since_restore", "config", "should_checkpoint", "experiment_tag",
    "journal_error",  # a stop request, not a property of the trial (see on_trial_complete)
}



def trial_error(trial) -> str:
    """The last line of a failed trial's error (Ray keeps the full traceback in error.txt)."""
    try:
        path = getattr(trial, "error_file", None)
        text = Path(path).read_text() if path and Path(path).exists() else str(trial.status)
    except Exception as e:  # the error file may live on another node's disk
        text = f"trial failed ({e})"
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "trial failed"
