"""Pictures of a run, drawn from its rows and summary: the same data its tables hold on disk.

A run calls `draw_plots` with the rows and summary it has in memory, before it writes
summary.json once (with the returned paths under ``plots``); `ckmerge-ray plot RUN_DIR`
(`plot_run`) redraws them later from the saved tables. Never a live searcher or Tune experiment:
the GP band of a landscape is refitted from the trials with the run's own settings.

    from ckmerge_ray.plots import plot_run
    plot_run("ckmerge_runs/latest")   # redraws landscape.png, records it in summary.json

Figures are `matplotlib.figure.Figure` objects rendered by the Agg canvas, never pyplot: no
display is needed and the caller's matplotlib backend is left alone. matplotlib is imported
inside the functions, so `import ckmerge_ray` stays light.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from ckmerge_ray.errors import ConfigError
from ckmerge_ray.results import (
    COMPARE_PLOT, COMPARE_TABLE, HEATMAP_TABLE, LANDSCAPE_PLOT, SUMMARY_FILE, SWEEP_GAIN_PLOT,
    SWEEP_HEATMAP_PLOT, SWEEP_TABLE, TRIALS_FILE, TUNED_DIR, WINDOW_DIR, read_rows, write_bytes_atomic,
    write_json_atomic,
)

PathLike = Union[str, os.PathLike]

LATER_ENDPOINT = "later endpoint"  # the compare table's reference method (compare.ENDPOINT)

# One fixed colour per acquisition, so that plots of different runs read alike.
ACQUISITION_COLOURS = {
    "initial": "black", "ei": "tab:blue", "pi": "tab:orange", "ucb": "tab:green",
    "explore": "tab:purple",
}
OTHER_COLOUR = "tab:gray"
GRID_POINTS = 201  # λ values at which the GP band is drawn
DPI = 120


# --- Tune run: the λ landscape ------------------------------------------------------------------

def plot_landscape(rows: Sequence[Dict], summary: Dict, path: Path) -> Path:
    """Draw a tune run's landscape.png at `path`: scores over λ, the GP refitted from `rows`,
    endpoints and the chosen λ (`summary` as tune_merge writes it)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    alpha = float(summary["alpha"])
    if alpha > 0:
        ax.axvspan(-0.02, alpha, color="0.94", zorder=0, label="outside the search space")
    draw_posterior(ax, rows, summary)
    draw_endpoints(ax, summary.get("endpoint_scores") or {})
    draw_trials(ax, rows)
    best = summary.get("best_lambda")
    if _finite(best):
        ax.axvline(best, color="tab:red", linewidth=1.2, label=f"chosen λ = {best:.3f}")
    ax.set_xlim(-0.02, 1.02)
    focus_on_search_space(ax, rows, summary)
    ax.set_xlabel("λ (weight of the later checkpoint)")
    ax.set_ylabel(score_label(summary.get("mode")))
    ax.set_title(landscape_title(summary), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_figure(fig, path)


def draw_posterior(ax, rows: Sequence[Dict], summary: Dict) -> None:
    """GP posterior mean and ±2σ over [alpha, 1], refitted from the table (omitted if < 2 points)."""
    from ckmerge_ray.search import posterior_from_rows

    grid = np.linspace(float(summary["alpha"]), 1.0, GRID_POINTS)
    posterior = posterior_from_rows(rows, summary, grid)
    if posterior is None:
        return
    mean, std = posterior
    ax.fill_between(grid, mean - 2 * std, mean + 2 * std, color="tab:blue", alpha=0.15,
                    linewidth=0, label="GP ±2σ")
    ax.plot(grid, mean, color="tab:blue", linewidth=1.2, label="GP posterior mean")


def draw_endpoints(ax, endpoint_scores: Dict[str, float]) -> None:
    """Dotted horizontal lines at the scores of the two checkpoints alone (λ = 0 and λ = 1)."""
    names = {"0.0": ("λ = 0 (earlier)", "tab:brown"), "1.0": ("λ = 1 (later)", "tab:olive")}
    for key, (name, colour) in names.items():
        score = endpoint_scores.get(key)
        if _finite(score):
            ax.axhline(score, color=colour, linestyle=":", linewidth=1.2,
                       label=f"{name}: {score:.4g}")


def draw_trials(ax, rows: Sequence[Dict]) -> None:
    """Evaluated points coloured by acquisition: full evaluations filled, screened ones hollow."""
    scored = [r for r in rows if r.get("status") == "ok" and _finite(r.get("score"))]
    for acquisition in dict.fromkeys(r.get("acquisition") or "" for r in scored):
        colour = ACQUISITION_COLOURS.get(acquisition, OTHER_COLOUR)
        group = [r for r in scored if (r.get("acquisition") or "") == acquisition]
        full = [r for r in group if r.get("fidelity") != "screen"]
        screened = [r for r in group if r.get("fidelity") == "screen"]
        label = acquisition or "other"
        for subset, face, suffix in ((full, colour, ""), (screened, "none", " (screened)")):
            if not subset:
                continue
            lams = [r["lam"] for r in subset]
            scores = [r["score"] for r in subset]
            stderr = [r.get("score_stderr") for r in subset]
            if all(_finite(s) for s in stderr):
                ax.errorbar(lams, scores, yerr=stderr, fmt="none", ecolor=colour, alpha=0.6,
                            zorder=3)
            ax.scatter(lams, scores, s=40, facecolors=face, edgecolors=colour, linewidths=1.5,
                       zorder=4, label=label + suffix)


def focus_on_search_space(ax, rows: Sequence[Dict], summary: Dict) -> None:
    """Scale y to the scores in [alpha, 1]; a far-off score outside it is marked at the edge.

    Why: Θ(t-1) alone (λ = 0) often scores far worse than any merge in [alpha, 1], and drawn to
    scale it would flatten the part of the landscape the search is about.
    """
    alpha = float(summary["alpha"])
    scored = [r for r in rows if r.get("status") == "ok" and _finite(r.get("score"))]
    inside = [r["score"] for r in scored if r["lam"] >= alpha - 1e-12]
    if len(inside) < 2:
        return
    low, high = min(inside), max(inside)
    span = (high - low) or abs(high) * 0.01 or 1.0
    y0, y1 = low - 0.15 * span, high + 0.25 * span
    outside = [(r["lam"], r["score"]) for r in scored if r["lam"] < alpha - 1e-12]
    near = [y for _, y in outside if y0 - span <= y <= y1 + span]  # close: keep it to scale
    y0, y1 = min([y0, *(y - 0.1 * span for y in near)]), max([y1, *(y + 0.1 * span for y in near)])
    ax.set_ylim(y0, y1)
    for lam, score in outside:
        if not y0 <= score <= y1:
            edge = y1 if score > y1 else y0
            ax.annotate(f"λ = {lam:.2g}: {score:.4g} (off scale)", (lam, edge),
                        xytext=(4, -12 if score > y1 else 6), textcoords="offset points",
                        fontsize=8, arrowprops=None)
            ax.scatter([lam], [edge], marker="^" if score > y1 else "v", s=60, color="black",
                       clip_on=False, zorder=5)


def landscape_title(summary: Dict) -> str:
    """'merge of <earlier> and <later>' over the shortened objective."""
    pair = [Path(summary[k]).name for k in ("earlier", "later") if summary.get(k)]
    head = f"merge of {pair[0]} and {pair[1]}" if len(pair) == 2 else "λ landscape"
    objective = short_objective(str(summary.get("objective", "")))
    return f"{head}\n{objective}" if objective else head


def short_objective(text: str, width: int = 70) -> str:
    """The objective's repr with quoted paths reduced to file names, cut at `width` characters."""
    text = re.sub(r"'[^']*/([^'/]+)'", r"'\1'", text)
    return text if len(text) <= width else text[: width - 1] + "…"


def score_label(mode: Optional[str]) -> str:
    """Y axis label saying which direction is better."""
    return "score (lower is better)" if mode == "min" else "score (higher is better)"


# --- Sweep: every adjacent pair of a trajectory -------------------------------------------------

def plot_sweep(rows: Sequence[Dict], heat: Sequence[Dict], summary: Dict, out: Path
               ) -> List[Path]:
    """Draw sweep_gain.png and, when there are heatmap rows, sweep_heatmap.png into `out`."""
    paths = [plot_sweep_gain(rows, out / SWEEP_GAIN_PLOT)]
    if heat:
        paths.append(plot_heatmap(heat, summary, out / SWEEP_HEATMAP_PLOT))
    return paths


def plot_sweep_gain(rows: Sequence[Dict], path: Path) -> Path:
    """Gain of each pair's best merge over its later checkpoint, along the trajectory."""
    from matplotlib.figure import Figure

    rows = sorted((r for r in rows if _finite(r.get("gain"))), key=lambda r: r["later_step"])
    steps = [r["later_step"] for r in rows]
    gains = [r["gain"] for r in rows]
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    ax.axhline(0.0, color="0.4", linewidth=1)
    ax.plot(steps, gains, color="0.6", linewidth=1, zorder=2)
    colours = ["tab:green" if g > 0 else "tab:red" for g in gains]
    ax.scatter(steps, gains, c=colours, s=45, zorder=3)
    for r in rows:
        if _finite(r.get("best_lambda")):
            ax.annotate(f"λ={r['best_lambda']:.2f}", (r["later_step"], r["gain"]),
                        textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
    ax.margins(x=0.08, y=0.15)  # room for the λ labels
    ax.set_xticks(steps)
    ax.set_xlabel("later checkpoint's step")
    ax.set_ylabel("gain of the best merge over the later checkpoint\n(positive = merge is better)")
    ax.set_title("merge gain along the trajectory", fontsize=10)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_heatmap(rows: Sequence[Dict], summary: Dict, path: Path) -> Path:
    """Score of checkpoint i merged with j (i ≤ j; diagonal: the checkpoint alone), best per cell."""
    from matplotlib.figure import Figure

    scores, lams, steps = heatmap_matrix(rows, summary.get("mode"), summary.get("steps"))
    n = len(steps)
    fig = Figure(figsize=(1.0 + 0.75 * max(n, 4), 0.8 + 0.65 * max(n, 4)))
    ax = fig.add_subplot()
    cmap = "viridis_r" if summary.get("mode") == "min" else "viridis"  # better is always yellow
    image = ax.imshow(np.ma.masked_invalid(scores), cmap=cmap, origin="upper")
    fig.colorbar(image, ax=ax, label=score_label(summary.get("mode")))
    if n <= 12:
        annotate_cells(ax, scores, lams)
    ax.set_xticks(range(n), [str(s) for s in steps], rotation=45)
    ax.set_yticks(range(n), [str(s) for s in steps])
    ax.set_xlabel("checkpoint j (step), weight λ")
    ax.set_ylabel("checkpoint i (step), weight 1 - λ")
    ax.set_title("merge score of checkpoints i and j", fontsize=10)
    return save_figure(fig, path)


def heatmap_matrix(rows: Sequence[Dict], mode: Optional[str], steps: Optional[Sequence[int]]):
    """(scores, lams, steps): n×n matrices, NaN where no row; several rows per cell keep the best."""
    rows = [r for r in rows if _finite(r.get("score"))]
    labels = {int(r["i"]): r["step_i"] for r in rows} | {int(r["j"]): r["step_j"] for r in rows}
    n = max(len(steps or ()), max(labels, default=-1) + 1)
    if not steps or len(steps) != n:
        steps = [labels.get(k, k) for k in range(n)]
    scores, lams = np.full((n, n), np.nan), np.full((n, n), np.nan)
    sign = -1.0 if mode == "min" else 1.0
    for r in rows:
        i, j = int(r["i"]), int(r["j"])
        if math.isnan(scores[i, j]) or sign * r["score"] > sign * scores[i, j]:
            scores[i, j] = r["score"]
            lams[i, j] = r["lam"] if _finite(r.get("lam")) else np.nan
    return scores, lams, list(steps)


def annotate_cells(ax, scores: np.ndarray, lams: np.ndarray) -> None:
    """Write each cell's score (and λ off the diagonal) into it."""
    for (i, j), score in np.ndenumerate(scores):
        if math.isnan(score):
            continue
        text = f"{score:.4g}" if i == j or math.isnan(lams[i, j]) else (
            f"{score:.4g}\nλ={lams[i, j]:.2f}")
        ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white",
                bbox={"facecolor": "black", "alpha": 0.35, "linewidth": 0, "pad": 1})


# --- Compare: the tuned merge against baselines -------------------------------------------------

def plot_compare(rows: Sequence[Dict], summary: Dict, out: Path) -> List[Path]:
    """Draw compare.png (score per method) into `out`."""
    return [plot_compare_bars(rows, summary.get("mode"), out / COMPARE_PLOT)]


def plot_compare_bars(rows: Sequence[Dict], mode: Optional[str], path: Path) -> Path:
    """Horizontal bars of each method's score, best at the top, with the later endpoint marked."""
    from matplotlib.figure import Figure

    scored = sorted((r for r in rows if _finite(r.get("score"))), key=lambda r: r["score"],
                    reverse=mode != "min")
    failed = [r for r in rows if not _finite(r.get("score"))]
    ordered = (scored + failed)[::-1]  # barh draws bottom-up: best ends at the top
    fig = Figure(figsize=(7.5, 1.2 + 0.4 * max(len(ordered), 3)))
    ax = fig.add_subplot()
    y = np.arange(len(ordered))
    values = [r["score"] if _finite(r.get("score")) else np.nan for r in ordered]
    colours = [compare_colour(r) for r in ordered]
    ax.barh(y, values, color=colours, height=0.6)
    low, high = score_limits([r["score"] for r in scored])
    ax.set_xlim(low, high)
    for k, r in enumerate(ordered):
        text = f"{r['score']:.4g}" if _finite(r.get("score")) else "no score"
        if r.get("evaluations") is not None:
            text += f"  ({r['evaluations']} eval{'s' if r['evaluations'] != 1 else ''})"
        x = r["score"] if _finite(r.get("score")) else low
        ax.text(x, k, " " + text, va="center", fontsize=8)
    reference = next((r["score"] for r in scored if r.get("method") == LATER_ENDPOINT), None)
    if reference is not None:
        ax.axvline(reference, color="0.2", linestyle="--", linewidth=1,
                   label=f"{LATER_ENDPOINT}: {reference:.4g}")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_yticks(y, [str(r.get("method")) for r in ordered])
    ax.set_xlabel(score_label(mode) + "; axis zoomed to the scores")
    ax.set_title("merge methods compared", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return save_figure(fig, path)


def compare_colour(row: Dict) -> str:
    """Tuned merge in red, other methods green when better than the later endpoint, else grey."""
    if "tuned" in str(row.get("method", "")):
        return "tab:red"
    return "tab:green" if _finite(row.get("gain")) and row["gain"] > 0 else "tab:gray"


def score_limits(scores: Sequence[float]):
    """X range around the scores with room for labels: differences between merges are small."""
    if not scores:
        return 0.0, 1.0
    low, high = min(scores), max(scores)
    span = (high - low) or abs(high) * 0.01 or 1.0
    return low - 0.3 * span, high + 0.6 * span


# --- Dispatch -----------------------------------------------------------------------------------

def draw_plots(out: Path, kind: str, rows: Sequence[Dict], summary: Dict, log=None,
               heat: Sequence[Dict] = (), extra: Sequence[str] = ()) -> List[str]:
    """Draw the plots of a finished run of `kind` ("tune", "sweep" or "compare") into `out`
    and return their paths relative to `out`, followed by `extra` (plots its sub-runs drew).
    A failure is logged, never raised: a plot must never lose a finished run's results."""
    try:
        if kind == "tune":
            paths = [plot_landscape(rows, summary, out / LANDSCAPE_PLOT)]
        elif kind == "sweep":
            paths = plot_sweep(rows, heat, summary, out)
        else:
            paths = plot_compare(rows, summary, out)
    except Exception as e:  # noqa: BLE001
        if log:
            log(f"warning: plots not drawn: {type(e).__name__}: {e}")
        return list(extra)
    if log:
        log(f"plots: {', '.join(str(p) for p in paths)}")
    return [Path(p).relative_to(out).as_posix() for p in paths] + list(extra)


def plot_run(run_dir: PathLike) -> List[Path]:
    """Redraw every plot of a finished tune, tune_window, sweep or compare directory from its
    saved tables (and those of its tune and tune_window runs in subfolders: a sweep's pairs, a
    comparison's ``tuned/`` and ``tuned_window/``), and record them in its summary.json."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} does not exist")
    if not any((run_dir / t).exists() for t in (SWEEP_TABLE, COMPARE_TABLE, TRIALS_FILE)):
        raise ConfigError(
            f"{run_dir} holds none of {SWEEP_TABLE}, {COMPARE_TABLE} or {TRIALS_FILE}: "
            "pass the output directory of a tune, sweep or compare run"
        )
    summary = read_summary(run_dir)
    if summary.get("kind") == "window":  # a tune_window run: its own pictures
        from ckmerge_ray.window_plots import WINDOW_PLOT, plot_window

        paths = [plot_window(read_rows(run_dir / TRIALS_FILE), summary, run_dir / WINDOW_PLOT)]
        summary["plots"] = [WINDOW_PLOT]
        write_json_atomic(run_dir / SUMMARY_FILE, summary)
        return paths
    if (run_dir / SWEEP_TABLE).exists():
        rows = read_rows(run_dir / SWEEP_TABLE)
        paths = plot_sweep(rows, read_rows(run_dir / HEATMAP_TABLE), summary, run_dir)
        subruns = [run_dir / str(r["run_dir"]) for r in rows if r.get("run_dir")]
    elif (run_dir / COMPARE_TABLE).exists():
        paths = plot_compare(read_rows(run_dir / COMPARE_TABLE), summary, run_dir)
        subruns = [run_dir / TUNED_DIR, run_dir / WINDOW_DIR]  # the tuned and tuned-window runs
    else:
        paths = [plot_landscape(read_rows(run_dir / TRIALS_FILE), summary,
                                run_dir / LANDSCAPE_PLOT)]
        subruns = []
    paths += [p for sub in subruns if is_tune_run(sub) for p in plot_run(sub)]
    summary["plots"] = [Path(p).relative_to(run_dir).as_posix() for p in paths]
    write_json_atomic(run_dir / SUMMARY_FILE, summary)
    return paths


# --- Helpers ------------------------------------------------------------------------------------

def read_summary(run_dir: Path) -> Dict:
    """The run's summary.json; a ConfigError if it is missing (the run did not finish)."""
    path = Path(run_dir) / SUMMARY_FILE
    if not path.exists():
        raise ConfigError(f"{path} is missing: plots need the summary of a finished run")
    return json.loads(path.read_text())


def is_tune_run(path: Path) -> bool:
    """True if `path` holds a finished tune run's tables (trials.parquet and summary.json)."""
    return (path / TRIALS_FILE).exists() and (path / SUMMARY_FILE).exists()


def save_figure(fig, path: Path) -> Path:
    """Render `fig` to PNG and write it atomically (a crash never leaves half an image)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    write_bytes_atomic(path, buffer.getvalue())
    return path


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
