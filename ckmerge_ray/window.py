"""`tune_window`: find the merge weights of a window of k checkpoints that score best, on Ray Tune.

The pair's method (Liu et al. 2024) tunes λ between two adjacent checkpoints; the same paper
merges 3 and 4, and pretraining teams average longer windows with fixed formulas (PMA's SMA,
EMA, WMA; LAWA; WSM's decay-shaped weights). `tune_window` searches those weights with GP-Hedge
over a `Family` (families.py): every convex combination (``simplex``, small k) or a
low-dimensional family (``ema``, ``decay``, optionally with the window length). The run is the
pair's (tuner.py), step for step: inputs checked before Ray starts, every checkpoint stored once,
trials of `window_trial.py` merging into a resident model, a journal of finished evaluations
(keyed by the merge weights) and Tune's snapshots for resume, the trials table with a column per
weight, ``best/`` exported (Σ wᵢ·Θᵢ in fp64, one rounding), summary.json and plots. The
``pair`` family is `tune_merge` itself (k = 2). Example::

    from ckmerge_ray.window import tune_window
    result = tune_window(["ckpts/step700", "ckpts/step800", "ckpts/step900"], {"cpu": 1},
                         "loss:heldout.jsonl", family="simplex", num_trials=10, output_dir="runs/w")
    print(result.best_weights, result.best_score)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from ckmerge_ray.config import (
    CheckpointConfig, Resources, RunConfig, SearchConfig, resumed_settings, split_options,
)
from ckmerge_ray.errors import ConfigError
from ckmerge_ray.families import Family, family_of

@dataclass
class WindowResult:
    """What `tune_window` returns; the same is on disk in ``output_dir``.

    ``best_weights``: w₁..w_k, oldest first; ``best_params``: the family's point;
    ``single_scores``: checkpoint name -> its score alone, for the checkpoints the search
    evaluated alone (the initial design holds the two newest)."""

    family: Family
    checkpoints: List[str]
    best_weights: List[float]
    best_params: Dict[str, float]
    best_score: float
    single_scores: Dict[str, float]
    mode: str
    table: Any  # pyarrow.Table of the trials
    output_dir: Path
    best_model_path: Optional[Path] = None
    summary: Dict = field(default_factory=dict)

    def format(self) -> str:
        """The final table (best first) and the best weights, as the run prints them."""
        rows = [r for r in self.table.to_pylist() if r["status"] == "ok"]
        rows.sort(key=lambda r: r["score"], reverse=self.mode == "max")
        k = len(self.checkpoints)
        lines = [f"best of {len(rows)} merges of {k} checkpoints ({self.family.label}):",
                 " | ".join(["score"] + [f"w{i}" for i in range(1, k + 1)] + ["acquisition"])]
        for r in rows[:10]:
            lines.append(" | ".join([f"{r['score']:.5f}"] + [f"{r[f'w{i}']:.3f}" for i in
                                                             range(1, k + 1)] + [r["acquisition"]]))
        singles = ", ".join(f"{n} {s:.5f}" for n, s in self.single_scores.items())
        lines.append(f"best weights {[round(w, 4) for w in self.best_weights]}: score "
                     f"{self.best_score:.5f}" + (f" (alone: {singles})" if singles else ""))
        if self.best_model_path:
            lines.append(f"best merged model: {self.best_model_path}")
        return "\n".join(lines)


def tune_window(
    checkpoints: Sequence[str | os.PathLike],
    resources: "Resources | Mapping[str, float] | None" = None,
    objective: Any = "",
    *,
    family: "Family | str" = "simplex",
    search: Optional[SearchConfig] = None,
    run: Optional[RunConfig] = None,
    checkpoint: Optional[CheckpointConfig] = None,
    objective_options: Optional[Mapping[str, Any]] = None,
    stored: Optional[Sequence] = None,
    **options,
) -> WindowResult:
    """Find the merge weights of `checkpoints` (oldest first) that score best, with concurrent
    Ray Tune trials searching the `family`'s parameters by GP-Hedge.

    Args:
        checkpoints: k ≥ 2 checkpoint folders or URIs of one trajectory, oldest first.
        resources, objective, search, run, checkpoint, objective_options, stored, **options:
            as `tune_merge`. Of `SearchConfig`, the GP-Hedge settings, ``num_trials`` (distinct
            weightings, the initial design included), ``seed`` and ``noise_aware`` apply;
            ``alpha`` only to the ``pair`` family.
        family: a `Family`, or a name: ``"simplex"`` (default), ``"ema"``, ``"decay"``,
            ``"ema+length"``, ``"decay+length"``, or ``"pair"`` (k = 2: `tune_merge`).

    Returns:
        A `WindowResult`. Raises what `tune_merge` raises; ConfigError also for a family that
        does not fit k, or ``num_trials`` below the family's initial design.
    """
    settings = split_options(options, search=search, run=run, checkpoint=checkpoint)
    if isinstance(checkpoints, (str, os.PathLike)) or len(checkpoints) < 2:
        raise ConfigError(f"checkpoints must list at least 2 checkpoints, oldest first, got "
                          f"{checkpoints!r}")
    fam = family_of(family, len(checkpoints), settings["search"].alpha)
    if fam.name == "pair":
        return _pair(checkpoints, resources, objective, objective_options, stored, fam, settings)
    design = fam.initial_points()
    if settings["search"].num_trials < len(design):
        raise ConfigError(f"num_trials={settings['search'].num_trials} is smaller than the "
                          f"{len(design)} initial points of family {fam.label!r}; raise it")
    from ckmerge_ray.window_run import run_window

    return run_window(list(checkpoints), resources, objective, objective_options, stored, fam,
                      **settings)


def _pair(checkpoints, resources, objective, objective_options, stored, fam: Family,
          settings: Dict) -> WindowResult:
    """The ``pair`` family: `tune_merge` itself, its result as a window's."""
    from ckmerge_ray.tuner import tune_merge

    r = tune_merge(checkpoints, resources, objective, objective_options=objective_options,
                   stored=stored, **settings)
    rows = r.table.to_pylist()
    for row in rows:
        row["w1"], row["w2"] = 1.0 - row["lam"], row["lam"]
    import pyarrow as pa

    names = [Path(str(c)).name for c in checkpoints]
    singles = {names[i]: s for i, s in enumerate((r.endpoint_scores[0.0],
                                                  r.endpoint_scores[1.0])) if s == s}
    return WindowResult(fam, [str(c) for c in checkpoints], [1.0 - r.best_lambda, r.best_lambda],
                        {"lam": r.best_lambda}, r.best_score, singles, r.mode,
                        pa.Table.from_pylist(rows), r.output_dir, r.best_model_path, r.summary)


def resume_window(output_dir: str | os.PathLike, **overrides) -> WindowResult:
    """Resume the window run in `output_dir` with the settings in its run.json (the CLI's
    ``tune-window --resume``); `overrides` may set `RunConfig` fields that do not define the
    search (``progress``, ``export_best``, ...)."""
    from ckmerge_ray.rundir import read_run_file

    out = Path(output_dir)
    stored = read_run_file(out)
    if "window" not in stored:
        raise ConfigError(f"{out} holds a pair's run, not a window's: resume it with "
                          f"ckmerge-ray tune --resume {out}")
    if not stored.get("objective_is_spec"):
        raise ConfigError(f"the run in {out} was given a Python objective; resume it from "
                          "Python: tune_window(..., objective=<the same object>, resume=True)")
    search = SearchConfig(**{k: stored[k] for k in SearchConfig.__dataclass_fields__
                             if k in stored})
    run, checkpoint = resumed_settings(stored, str(out), **overrides)
    return tune_window(stored["window"], stored["resources"], stored["objective"],
                       family=Family(**stored["family"]), search=search, run=run,
                       checkpoint=checkpoint, objective_options=stored["objective_options"])


def load_window_result(out: Path, log=None) -> WindowResult:
    """The result of the finished window run in `out`, from its summary and table."""
    import json

    from ckmerge_ray.results import SUMMARY_FILE, TRIALS_FILE, read_rows, rows_to_table

    summary = json.loads((out / SUMMARY_FILE).read_text())
    result = WindowResult(
        Family(**summary["family"]), summary["checkpoints"], summary["best_weights"],
        summary["best_params"], summary["best_score"], summary["single_scores"],
        summary["mode"], rows_to_table(read_rows(out / TRIALS_FILE)), out,
        Path(summary["best_model_path"]) if summary.get("best_model_path") else None, summary)
    if log is not None:
        log(result.format())
    return result
