"""What a comparison writes as it goes: ``compare.parquet`` and ``compare.md``, a row per method
(score, gain over the later checkpoint, evaluations, wall time, weights or λ), rewritten
atomically after every method so that a failure later loses nothing (`ckmerge_ray.compare`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional

import pyarrow as pa

from ckmerge_ray.errors import last_line
from ckmerge_ray.results import (
    COMPARE_MD, COMPARE_TABLE, write_bytes_atomic, write_table_atomic, writing,
)

# What to do once a full disk has space again: a comparison has no resume (its methods are
# cheap next to a pretraining run; the tuned run under tuned/ can be resumed alone).
AGAIN = "run the comparison again with --overwrite"


class Table:
    """compare.parquet and compare.md, rewritten after every method so nothing is lost."""

    def __init__(self, out: Path, mode: str, rows: List[Dict]):
        self.out, self.mode, self.rows = out, mode, rows
        self.later_score = math.nan

    def add(self, key: str, label: str, score: Optional[float], evaluations: int, wall_s: float,
            weights: Optional[List[float]], extra_cost: str, lam: Optional[float] = None,
            error: Optional[str] = None, checkpoint: Optional[str] = None) -> None:
        sign = 1.0 if self.mode == "min" else -1.0
        ok = score is not None and math.isfinite(score)
        self.rows.append({
            "method": label, "key": key, "status": "ok" if ok else "error",
            "score": float(score) if ok else None,
            "gain": sign * (self.later_score - score) if ok and key != "endpoint" else (
                0.0 if ok else None),
            "evaluations": int(evaluations), "wall_s": float(wall_s),
            "lam": lam, "weights": json.dumps([round(w, 6) for w in weights]) if weights else None,
            "extra_cost": extra_cost, "checkpoint": checkpoint, "error": error,
        })
        self.write()

    def add_error(self, key: str, label: str, wall_s: float, error: BaseException) -> None:
        self.add(key, label, None, 0, wall_s, None, "",
                 error=f"{type(error).__name__}: {last_line(error)}")

    def first_error(self) -> Optional[str]:
        return next((r["error"] for r in self.rows if r.get("error")), None)

    def best_key(self) -> Optional[str]:
        ok = [r for r in self.rows if r["status"] == "ok"]
        if not ok:
            return None
        pick = min if self.mode == "min" else max
        return pick(ok, key=lambda r: r["score"])["key"]

    def write(self) -> pa.Table:
        with writing(f"the comparison's table {self.out / COMPARE_TABLE}", self.out, AGAIN):
            table = write_table_atomic(self.out / COMPARE_TABLE, self.rows)
            write_bytes_atomic(self.out / COMPARE_MD,
                               (markdown_table(self.rows, self.mode) + "\n").encode())
        return table


def markdown_table(rows: List[Dict], mode: str) -> str:
    """The comparison as a Markdown table; gains are over the later checkpoint alone."""
    better = "lower" if mode == "min" else "higher"
    lines = [f"| method | score ({better} is better) | gain over later checkpoint | evaluations "
             "| wall time (s) | weights / λ |",
             "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['method']} | failed: {r['error']} | | {r['evaluations']} "
                         f"| {r['wall_s']:.1f} | |")
            continue
        what = f"λ={r['lam']:.4f}" if r.get("lam") is not None else (r.get("weights") or "")
        lines.append(f"| {r['method']} | {r['score']:.5f} | {r['gain']:+.5f} | "
                     f"{r['evaluations']} | {r['wall_s']:.1f} | {what} |")
    return "\n".join(lines)
