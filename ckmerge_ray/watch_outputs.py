"""What a watch keeps in its output directory as pairs finish: ``watch.json`` (what defines the
watch: a resume must match it), ``sweep.parquet`` (a row per pair, in pair order), ``latest/``
and ``best_overall/`` (published atomically, `ckmerge_ray.publish`) and ``summary.json``.

`claim_watch_dir` takes the directory for a new watch or a resume; `WatchOutputs` records each
finished pair; `ckmerge_ray.watch` decides which pairs to tune.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from ckmerge_ray.pairs import pair_plots
from ckmerge_ray.plots import draw_plots
from ckmerge_ray.publish import publish_dir, recover_published
from ckmerge_ray.results import (
    BEST_OVERALL_DIR, LATEST_DIR, SUMMARY_FILE, SWEEP_TABLE, WATCH_FILE, write_json_atomic,
    write_table_atomic, writing,
)
from ckmerge_ray.rundir import claim_series_dir

# What to do once a full disk has space again (each finished pair's run is complete on disk).
AGAIN = "continue the watch: the same arguments and --resume"


def claim_watch_dir(out: Path, record: Dict, run) -> List[Dict]:
    """Claim `out` for a watch defined by `record` (`rundir.claim_series_dir`; `run` is its
    `RunConfig`); returns the rows of the pairs done so far (resume) or []. A resume first
    finishes a publish of ``latest/`` or ``best_overall/`` that was killed midway."""
    rows = claim_series_dir(out, WATCH_FILE, record, run)
    if run.resume:
        for name in (LATEST_DIR, BEST_OVERALL_DIR):
            recover_published(out / name)
    return rows


class WatchOutputs:
    """The watch's table and published models. `rows` are the pairs done (on resume, read
    back by `claim_watch_dir`); `mode` ("min"/"max") is the objective's, set once it is known."""

    def __init__(self, out: Path, rows: List[Dict], log: Callable[[str], None]):
        self.out, self.rows, self.log = out, rows, log
        previous = read_json(out / SUMMARY_FILE) if rows else {}
        self.previous = previous  # a resumed watch's summary.json ({} for a new watch)
        self.mode: Optional[str] = previous.get("mode")
        self.objective_repr: Optional[str] = previous.get("objective")
        self.latency: List[Dict] = previous.get("latency", [])
        self.pair_plots: List[str] = pair_plots(out, rows)

    def add(self, row: Dict, result) -> float:
        """Publish pair ``row["pair"]``'s best model (when `result`, its `TuneResult`, is not
        None) and write the table with its row; returns the seconds publishing took.
        Raises OutputError (a full disk: the pair's own run is whole, resume re-records it)."""
        with writing(f"pair {row['pair'] + 1}'s results in {self.out}", self.out, AGAIN):
            publish_s = self.publish(row, result) if result is not None else 0.0
            self.rows.append(row)
            self.rows.sort(key=lambda r: r["pair"])
            write_table_atomic(self.out / SWEEP_TABLE, self.rows)
        return publish_s

    def publish(self, row: Dict, result) -> float:
        """latest/ := this pair's best/; best_overall/ too when its score is the best so far."""
        t0 = time.perf_counter()
        best = Path(result.best_model_path) if result.best_model_path else None
        if best is None or not best.is_dir():
            self.log(f"pair {row['pair'] + 1} has no best/ to publish")  # 1-based, as logged
            return 0.0
        newest = max((r["pair"] for r in self.rows if r["status"] == "ok"), default=-1)
        if row["pair"] > newest:  # pairs in flight together may finish out of order
            publish_dir(best, self.out / LATEST_DIR)
            self.log(f"latest/ <- pair {row['pair'] + 1} (λ={row['best_lambda']:.4f}, score "
                     f"{row['best_score']:.6g})")
        leader = self.best_row()
        if leader is None or _better(row["best_score"], leader["best_score"], self.mode):
            publish_dir(best, self.out / BEST_OVERALL_DIR)
            self.log(f"best_overall/ <- pair {row['pair'] + 1}")
        return time.perf_counter() - t0

    def best_row(self) -> Optional[Dict]:
        """The finished pair whose best merged model scores best (the first of equals)."""
        best = None
        for r in self.rows:
            if r["status"] == "ok" and _finite(r.get("best_score")) and (
                    best is None or _better(r["best_score"], best["best_score"], self.mode)):
                best = r
        return best

    def summary(self, header: Dict[str, Any]) -> Dict:
        """summary.json's content: `header` (what the watch follows and how), then the
        objective, the pairs, the latest and best merged models and the latency of each pair."""
        leader = self.best_row()
        newest = next((r for r in reversed(self.rows) if r["status"] == "ok"), None)
        return {
            "kind": "watch", **header, "objective": self.objective_repr, "mode": self.mode,
            "steps": sorted({s for r in self.rows for s in (r["earlier_step"], r["later_step"])}),
            "pairs": len(self.rows), "pairs_ok": sum(r["status"] == "ok" for r in self.rows),
            "latest": _model(newest, LATEST_DIR), "best_overall": _model(leader, BEST_OVERALL_DIR),
            "latency": self.latency, "plots": [],
        }

    def write_summary(self, header: Dict[str, Any]) -> None:
        """Draw the plots and write summary.json atomically (`summary(header)` with the plots)."""
        summary = self.summary(header)
        summary["plots"] = draw_plots(self.out, "sweep", self.rows, summary, self.log,
                                      extra=self.pair_plots)
        with writing(f"the summary {self.out / SUMMARY_FILE}", self.out, AGAIN):
            write_json_atomic(self.out / SUMMARY_FILE, summary)


def read_json(path: Path) -> Dict:
    """The JSON object in `path`, or {} when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _model(row: Optional[Dict], path: str) -> Optional[Dict]:
    return row and {"pair": row["pair"], "later": row["later"], "best_lambda": row["best_lambda"],
                    "best_score": row["best_score"], "path": path}


def _better(a: float, b: float, mode: Optional[str]) -> bool:
    return a > b if mode == "max" else a < b


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
