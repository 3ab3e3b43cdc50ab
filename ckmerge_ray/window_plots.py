"""Pictures of a window run (`tune_window`), drawn from its rows and summary as plots.py draws a
pair's: the GP is refitted from the trials table with the run's own settings, never taken from a
live searcher, so `ckmerge-ray plot RUN_DIR` redraws them from disk.

- ``simplex`` with k = 3: the posterior mean over the weight triangle (a heatmap on barycentric
  coordinates, each corner one checkpoint alone) with the evaluated weightings;
- one searched parameter (``ema``, ``decay``): the landscape over it, posterior mean ± std;
- two (``ema+length``, ``decay+length``): the posterior mean over (shape, length);
- ``simplex`` with k ≥ 4: each trial's score against its distance from the newest checkpoint
  alone (a k-1 dimensional surface has no honest picture).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

from ckmerge_ray.families import Family, simplex_to_cube
from ckmerge_ray.plots import ACQUISITION_COLOURS, OTHER_COLOUR, save_figure, score_label

WINDOW_PLOT = "window.png"
TRIANGLE_STEPS = 60  # grid lines per side of the weight triangle


def refit_searcher(rows: Sequence[Dict], summary: Dict):
    """The run's GP refitted from its table (every row recorded as the searcher did)."""
    from ckmerge_ray.config import SearchConfig
    from ckmerge_ray.window_run import window_searcher

    family = Family(**summary["family"])
    seed = (summary.get("search") or {}).get("seed", 0)
    searcher = window_searcher(family, SearchConfig(seed=seed), summary["mode"], 1)
    for row in rows:
        params = {p: float(row[p]) for p in family.space()}
        searcher.record_result(params, row, error=row.get("status") != "ok")
    return family, searcher


def draw_window_plots(out: Path, rows: Sequence[Dict], summary: Dict, log=None) -> List[str]:
    """Draw window.png into `out`; returns its path relative to `out` ([] on failure, logged:
    a plot never loses a finished run's results). The GP is refitted from `rows`."""
    try:
        path = plot_window(rows, summary, out / WINDOW_PLOT)
    except Exception as e:  # noqa: BLE001
        if log:
            log(f"warning: plots not drawn: {type(e).__name__}: {e}")
        return []
    if log:
        log(f"plots: {path}")
    return [path.relative_to(out).as_posix()]


def plot_window(rows: Sequence[Dict], summary: Dict, path: Path) -> Path:
    from matplotlib.figure import Figure

    family, searcher = refit_searcher(rows, summary)
    ok = [r for r in rows if r.get("status") == "ok"]
    fig = Figure(figsize=(6.4, 5.0))
    ax = fig.subplots()
    dims = list(family.space())
    fitted = len(searcher.optimizer.space) >= 2
    if family.name == "simplex" and family.k == 3:
        draw_triangle(fig, ax, family, searcher if fitted else None, ok, summary)
    elif len(dims) == 1:
        draw_curve(ax, family, searcher if fitted else None, ok, dims[0], summary)
    elif len(dims) == 2 and family.search_length:
        draw_grid(fig, ax, family, searcher if fitted else None, ok, dims, summary)
    else:
        draw_distance(ax, ok, summary)
    ax.set_title(f"{family.label} over {family.k} checkpoints: {len(ok)} merges scored",
                 fontsize=10, pad=12)
    return save_figure(fig, path)


def corner_xy(weights: np.ndarray) -> np.ndarray:
    """Barycentric (n, 3) weights -> (n, 2) points of a triangle: Θ₁ left, Θ₂ right, Θ₃ top."""
    corners = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, np.sqrt(3) / 2]])
    return weights @ corners


def draw_triangle(fig, ax, family: Family, searcher, ok, summary) -> None:
    n = TRIANGLE_STEPS
    grid = np.array([(i / n, j / n, (n - i - j) / n)
                     for i in range(n + 1) for j in range(n + 1 - i)])
    xy = corner_xy(grid)
    if searcher is not None:
        points = [dict(zip(family.space(), simplex_to_cube(w))) for w in grid]
        mean = searcher.posterior_mean(points)
        tcf = ax.tricontourf(xy[:, 0], xy[:, 1], mean, levels=20, cmap="viridis")
        fig.colorbar(tcf, ax=ax, label=f"posterior mean ({score_label(summary['mode'])})")
    draw_points(ax, corner_xy(np.array([[r["w1"], r["w2"], r["w3"]] for r in ok]))
                if ok else np.zeros((0, 2)), ok, summary)
    names = [Path(c).name for c in summary["checkpoints"]]
    for (x, y), name in zip(corner_xy(np.eye(3)), names):
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(0, 6 if y else -14),
                    ha="center", fontsize=8)
    ax.set_xlim(-0.12, 1.12)
    ax.set_ylim(-0.1, np.sqrt(3) / 2 + 0.1)
    ax.set_aspect("equal")
    ax.axis("off")


def draw_curve(ax, family: Family, searcher, ok, dim: str, summary) -> None:
    lo, hi = family.space()[dim]
    xs = np.linspace(lo, hi, 201)
    if searcher is not None:
        mean, std = searcher.posterior([{dim: float(x)} for x in xs])
        ax.plot(xs, mean, color="tab:blue", label="posterior mean")
        ax.fill_between(xs, mean - 2 * std, mean + 2 * std, color="tab:blue", alpha=0.15,
                        label="± 2 std")
    pts = np.array([[r[dim], r["score"]] for r in ok]) if ok else np.zeros((0, 2))
    draw_points(ax, pts, ok, summary)
    ax.set_xlabel(dim)
    ax.set_ylabel(score_label(summary["mode"]))
    ax.legend(fontsize=8)


def draw_grid(fig, ax, family: Family, searcher, ok, dims: List[str], summary) -> None:
    shape = dims[0]
    lo, hi = family.space()[shape]
    xs = np.linspace(lo, hi, 81)
    lengths = np.arange(1, family.k + 1)
    if searcher is not None:
        mean = searcher.posterior_mean([{shape: float(x), "length": float(L)}
                                        for L in lengths for x in xs]).reshape(len(lengths), -1)
        mesh = ax.pcolormesh(xs, lengths, mean, shading="nearest", cmap="viridis")
        fig.colorbar(mesh, ax=ax, label=f"posterior mean ({score_label(summary['mode'])})")
    pts = np.array([[r[shape], family.length(r)] for r in ok]) if ok else np.zeros((0, 2))
    draw_points(ax, pts, ok, summary)
    ax.set_xlabel(shape)
    ax.set_ylabel("window length L (newest L checkpoints)")


def draw_distance(ax, ok, summary) -> None:
    k = len(summary["checkpoints"])
    pts = np.array([[1.0 - r[f"w{k}"], r["score"]] for r in ok]) if ok else np.zeros((0, 2))
    draw_points(ax, pts, ok, summary)
    ax.set_xlabel("1 - weight of the newest checkpoint")
    ax.set_ylabel(score_label(summary["mode"]))


def draw_points(ax, xy: np.ndarray, ok, summary) -> None:
    """The evaluated points, coloured by acquisition; the best one ringed."""
    for (x, y), r in zip(xy, ok):
        ax.scatter([x], [y], s=28, color=ACQUISITION_COLOURS.get(r.get("acquisition"),
                                                                 OTHER_COLOUR),
                   edgecolors="white", linewidths=0.5, zorder=3)
    best = [i for i, r in enumerate(ok) if r["score"] == summary.get("best_score")]
    if best:
        x, y = xy[best[0]]
        ax.scatter([x], [y], s=120, facecolors="none", edgecolors="red", linewidths=1.5,
                   zorder=4, label="best")
