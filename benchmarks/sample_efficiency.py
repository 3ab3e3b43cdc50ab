"""Sample efficiency of λ searchers on real merge landscapes, with a held-out split (issue 16).

Each landscape f(λ) is the held-out loss of the merge of a real adjacent checkpoint pair,
computed once on a dense grid of λ and cached in JSON. Searchers then query the cached
landscape (linear interpolation, optional Gaussian noise), so many seeds run in minutes. Every
searcher is driven through the Ray Tune Searcher API (`suggest` / `on_trial_complete`) with q
trials pending at once, oldest finishing first, exactly as Tune calls it.

Two splits, by trajectory, so the searcher's defaults are never reported on the data they were
chosen on:
- fit (the defaults — the length-scale floor, the hedge's starting gains, κ, ξ, the initial
  design — were chosen here, by `benchmarks/tune_defaults.py`, which reads only these files):
  `landscapes.json` (the demo: a small Llama on the standard library, fp32) and
  `landscapes_gpt2-shakespeare-fp16.json` (GPT-2 on tinyshakespeare, fp16).
- held-out (reported; never used to choose anything): `landscapes_gptneox-stdlib-bf16.json` and
  `landscapes_gptneox-shakespeare-bf16.json` (GPT-NeoX, bf16, on either corpus).
`benchmarks/make_landscapes.py` makes the new files (architecture, corpus, dtype and seed of each
are recorded in the file).

    python benchmarks/sample_efficiency.py                      # full: both splits, writes BENCHMARKS.md
    python benchmarks/sample_efficiency.py --quick              # a few seconds, no file written
    python benchmarks/sample_efficiency.py --split fit --seeds 5 --hedge kappa=2.0   # ad-hoc runs
    python benchmarks/sample_efficiency.py --trajectory DIR     # landscapes from your checkpoints

Seeds: run k on a landscape uses `landscape_seed(name, k)`, distinct across landscapes, so the
hedge's draws (and random search's λ) are not one sequence repeated on every landscape.

Counting: a "trial" is an evaluation inside the search space [α, 1]. tune_merge also scores
λ = 0 (Θ(t-1) alone) for every run to report the gain over it; GP-Hedge feeds that score to its
GP, the other searchers ignore it; it is not counted for anyone when α > 0 (when α = 0 it is a
point of the space and counts).
"""

from __future__ import annotations

import os

# One BLAS thread: the GP's matrices are tiny, and on shared cores threaded BLAS spins (a
# searcher run took 4.5 s of CPU instead of 1.7 s at load 10). Workers inherit it.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import json
import re
import sys
import time
import zlib
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import headline as format_headline, machine as machine_facts, write_section  # noqa: E402

CACHE = HERE / "landscapes.json"
SPLITS = {
    "held-out": ("landscapes_gptneox-stdlib-bf16.json", "landscapes_gptneox-shakespeare-bf16.json"),
    "fit": ("landscapes.json", "landscapes_gpt2-shakespeare-fp16.json"),
}
HEDGE_OVERRIDES: Dict = {}  # --hedge key=value: merge_searcher arguments, for tuning runs
BUDGET = 12
TARGET = 0.01  # within 1 % of the available gain


def compute_landscapes(trajectory: Path, grid: int, seq_len: int, max_tokens: int) -> Dict:
    """Held-out loss on a λ grid in [0, 1] for every adjacent pair of `trajectory`."""
    import torch
    from transformers import AutoModelForCausalLM

    from ckmerge_ray.merge import merge_state_dicts
    from ckmerge_ray.objectives import HeldoutLoss

    torch.set_num_threads(os.cpu_count() or 1)  # the one-BLAS-thread default is for the searchers
    ckpts = sorted(trajectory.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    lams = np.linspace(0.0, 1.0, grid)
    out = {"lambdas": lams.tolist(), "pairs": {}}
    for earlier, later in zip(ckpts, ckpts[1:]):
        a = AutoModelForCausalLM.from_pretrained(earlier).state_dict()
        model = AutoModelForCausalLM.from_pretrained(later).eval()
        b = {k: v.clone() for k, v in model.state_dict().items()}
        obj = HeldoutLoss(trajectory / "heldout.jsonl", seq_len=seq_len, max_tokens=max_tokens)
        obj.prepare(later)
        scores = []
        for lam in lams:
            model.load_state_dict(merge_state_dicts(a, b, float(lam)))
            scores.append(obj.evaluate(model, torch.device("cpu"))["score"])
        out["pairs"][f"{earlier.name}->{later.name}"] = scores
        print(f"landscape {earlier.name}->{later.name}: min {min(scores):.4f} at "
              f"λ={lams[int(np.argmin(scores))]:.3f}, f(0)={scores[0]:.4f}, f(1)={scores[-1]:.4f}",
              flush=True)
    return out


# --- searchers, all driven through the Tune Searcher API -----------------------------------------

def hedge(alpha: float, q: int, seed: int):
    from ckmerge_ray.search import merge_searcher

    return merge_searcher(alpha, "min", batch_size=q, seed=seed, **HEDGE_OVERRIDES)


def stock_bayesopt(alpha: float, q: int, seed: int):
    import logging

    from ray.tune.search.bayesopt import BayesOptSearch

    logging.getLogger("ray.tune.search.bayesopt.bayesopt_search").setLevel(logging.ERROR)

    # Ray's defaults (UCB, kappa 2.576, patience 5, skip_duplicate) but 3 random steps, not 10,
    # so that it can use its GP within a 12-trial budget.
    return BayesOptSearch(space={"lam": (alpha, 1.0)}, metric="score", mode="min",
                          random_state=seed, random_search_steps=3)


class RandomSearch:
    """Uniform in [α, 1]; ignores results, so its figures do not depend on q."""

    def __init__(self, alpha, q, seed):
        self.rng, self.alpha = np.random.default_rng(seed), alpha

    def suggest(self, trial_id):
        return {"lam": float(self.rng.uniform(self.alpha, 1.0))}

    def on_trial_complete(self, trial_id, result=None, error=False):
        pass


class GridSearch:
    """A uniform grid of BUDGET points over [α, 1], visited coarse to fine (endpoints, middle,
    quarters, ...), the sensible order for a sequential grid."""

    def __init__(self, alpha, q, seed):
        grid = np.linspace(alpha, 1.0, BUDGET)
        order, seen = [0, BUDGET - 1], {0, BUDGET - 1}
        step = BUDGET - 1
        while len(order) < BUDGET:
            step = max(1, step // 2)
            for i in range(0, BUDGET, step):
                if i not in seen:
                    order.append(i)
                    seen.add(i)
        self.points = [float(grid[i]) for i in order]

    def suggest(self, trial_id):
        return {"lam": self.points.pop(0)} if self.points else None

    def on_trial_complete(self, trial_id, result=None, error=False):
        pass


def run_one(make, landscape: Callable[[float], float], noise: float, alpha: float, q: int,
            seed: int, stop_at: float = -np.inf) -> List[float]:
    """True f of each in-space evaluation, in the order they finish (λ = 0 not counted); stops
    early once one is at most `stop_at` (tuning runs need only the trials to the target)."""
    searcher = make(alpha, q, seed)
    rng = np.random.default_rng(10_000 + seed)
    values, pending, i, idle = [], [], 0, 0
    while len(values) < BUDGET and not (values and min(values) <= stop_at):
        while len(pending) < q and len(values) + len(pending) < BUDGET + 1:
            cfg = searcher.suggest(f"t{i}")
            i += 1
            if not isinstance(cfg, dict) or "lam" not in cfg:
                break  # None (waiting / duplicate skipped) or FINISHED
            pending.append((f"t{i - 1}", float(cfg["lam"])))
        if not pending:
            idle += 1
            if idle > 10:  # the searcher stopped for good (e.g. BayesOptSearch patience)
                break
            continue
        tid, lam = pending.pop(0)
        f = landscape(lam)
        searcher.on_trial_complete(tid, {"score": f + noise * rng.standard_normal()})
        if lam >= alpha - 1e-12:
            values.append(f)
    return values


def summarize(values: List[float], f_star: float, f_one: float):
    gain = f_one - f_star
    best = np.minimum.accumulate(values) if values else np.array([])
    hit = [k + 1 for k, v in enumerate(best) if v <= f_star + TARGET * gain]
    regret = lambda n: (best[min(n, len(best)) - 1] - f_star) / gain * 100 if len(best) else np.inf
    return (hit[0] if hit else np.inf), regret(4), regret(8), regret(12)


def median_iqr(xs) -> str:
    xs = np.asarray(xs, dtype=float)
    q1, med, q3 = np.percentile(xs, [25, 50, 75], method="nearest")  # no interpolation with inf
    fmt = lambda v: ">12" if np.isinf(v) else (f"{v:.0f}" if float(v).is_integer() else f"{v:.1f}")
    return f"{fmt(med)} [{fmt(q1)}–{fmt(q3)}]"


def landscape_seed(name: str, seed: int) -> int:
    """The seed of run `seed` on landscape `name`: distinct across landscapes. With the same
    seeds on every landscape, a searcher's random draws (the hedge's choice of acquisition,
    random search's λ) would be one sequence repeated on all of them, and the median would
    measure that sequence rather than the searcher."""
    return zlib.crc32(name.encode()) % 100_000 * 100 + seed


def load_split(files) -> Dict[str, tuple]:
    """{"<trajectory>:<pair>": (lambdas, scores)} from the cached landscape files present."""
    out = {}
    for name in files:
        path = HERE / name
        if not path.exists():
            print(f"  (missing {name}; run benchmarks/make_landscapes.py)", file=sys.stderr)
            continue
        data = json.loads(path.read_text())
        traj = path.stem.replace("landscapes_", "") if path.stem != "landscapes" else "llama-stdlib-fp32"
        for pair, scores in data["pairs"].items():
            out[f"{traj}:{pair}"] = (np.asarray(data["lambdas"]), np.asarray(scores))
    return out


JOBS = 1


def _task(task):
    """One searcher on one landscape with one seed (a top-level function: it runs in workers)."""
    make, lams, s, f_star, f_one, noise, alpha, q, seed = task
    f = lambda lam: float(np.interp(lam, lams, s))
    return summarize(run_one(make, f, noise, alpha, q, seed), f_star, f_one)


def table(landscapes: Dict[str, tuple], searchers: Dict, alpha: float, seeds, noise: float,
          start: float, split: str):
    """Markdown rows (one per searcher) and {label: median trials to 1 %} on [α, 1]."""
    pairs = {}
    for name, (lams, s) in landscapes.items():
        inside = lams >= alpha - 1e-12
        f_star, f_one = float(s[inside].min()), float(s[-1])
        if f_one - f_star > 1e-4 * abs(f_one):  # an interior optimum: something to find
            pairs[name] = (lams, s, f_star, f_one)
    lines = [f"\n**{split}, λ ∈ [{alpha}, 1]**: {len(pairs)} landscapes "
             f"({', '.join(sorted({n.split(':')[0] for n in pairs}))}); noise σ = {noise}\n",
             "| searcher | trials to within 1 % of the gain | regret @4 (% of gain) | regret @8 | regret @12 |",
             "|---|---|---|---|---|"]
    medians = {}
    for label, (make, q) in searchers.items():
        tasks = [(make, lams, s, f_star, f_one, noise, alpha, q, landscape_seed(name, seed))
                 for name, (lams, s, f_star, f_one) in pairs.items() for seed in seeds]
        if JOBS > 1:
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(JOBS) as pool:
                rows = list(pool.map(_task, tasks))
        else:
            rows = [_task(t) for t in tasks]
        cols = list(zip(*rows))
        print(f"  done: {split} {label} on [{alpha}, 1] ({time.perf_counter() - start:.0f}s)",
              file=sys.stderr, flush=True)
        lines.append(f"| {label} | " + " | ".join(median_iqr(c) for c in cols) + " |")
        print(f"  {split} [{alpha}, 1] {lines[-1]}", file=sys.stderr, flush=True)
        medians[label] = float(np.median(cols[0]))
    return lines, medians


def first_choice(landscapes: Dict[str, tuple], alpha: float, split: str) -> str:
    """A markdown row: after the initial design, on how many landscapes each acquisition's first
    nominee (GP-Hedge's defaults, one GP fit, no search) lies within 1 % of the gain, and the
    share of first GP choices expected to, weighting each by the hedge's first probabilities.
    Explains the q = 1 medians: the design takes 2 trials of [0.5, 1] (λ = 0 is outside) and 3
    of [0, 1], so a median of d + 1 trials needs more than half of the first choices to hit."""
    from ckmerge_ray.search.hedge import _BYO_KIND

    hits, expected, n, design = {a: 0 for a in _BYO_KIND}, 0.0, 0, 0
    for name, (lams, s) in landscapes.items():
        inside = lams >= alpha - 1e-12
        f_star, f_one = float(s[inside].min()), float(s[-1])
        if f_one - f_star <= 1e-4 * abs(f_one):
            continue
        f = lambda x: float(np.interp(x, lams, s))  # noqa: E731
        searcher = hedge(alpha, 1, 0)
        design = len([p for p in searcher._points_to_evaluate if p["lam"] >= alpha - 1e-12])
        for i in range(len(searcher._points_to_evaluate)):
            cfg = searcher.suggest(f"t{i}")
            searcher.on_trial_complete(f"t{i}", {"score": f(cfg["lam"])})
        X, y = searcher._observations()
        gp = searcher._fit_gp(X, y)
        probs = searcher.probabilities()
        rng = np.random.default_rng(0)
        n += 1
        for a in searcher.acquisitions:
            x = float(searcher._box().maximize(_BYO_KIND[a], searcher.kappa, searcher.xi, gp,
                                               float(y.max()), list(X), rng)[0])
            hit = f(x) <= f_star + TARGET * (f_one - f_star)
            hits[a] += hit
            expected += probs[a] * hit
    return (f"| {split} | [{alpha}, 1] | {design} | " + " | ".join(f"{hits[a]}/{n}" for a in hits)
            + f" | {100 * expected / max(n, 1):.0f} % |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="2 seeds, every fourth held-out pair, q=1 hedge vs random; writes nothing")
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--noise", type=float, default=0.0, help="std of Gaussian noise on observations")
    p.add_argument("--split", choices=["both", *SPLITS], default="both")
    p.add_argument("--q", type=int, nargs="*", default=[1, 2, 4])
    p.add_argument("--only", nargs="*", default=None, help="searcher labels to run (default all)")
    p.add_argument("--hedge", nargs="*", default=[], metavar="KEY=VALUE",
                   help="merge_searcher arguments for GP-Hedge (tuning runs; writes nothing)")
    p.add_argument("--trajectory", type=Path, default=None,
                   help="recompute landscapes.json from this directory of checkpoint-<step>/ + heldout.jsonl")
    p.add_argument("--grid", type=int, default=41)
    p.add_argument("--jobs", type=int, default=1, help="worker processes")
    p.add_argument("--alpha", type=float, nargs="*", default=[0.5, 0.0],
                   help="lower ends of the search spaces [α, 1]")
    p.add_argument("--first-choice", action="store_true",
                   help="only the first-GP-choice table (seconds; writes nothing)")
    p.add_argument("--section", default="", help="suffix of the BENCHMARKS.md section title")
    p.add_argument("--write", type=Path, default=HERE.parent / "BENCHMARKS.md")
    args = p.parse_args(argv)
    start = time.perf_counter()
    load_start = os.getloadavg()[0]
    global JOBS
    JOBS = args.jobs
    for kv in args.hedge:
        key, value = kv.split("=", 1)
        HEDGE_OVERRIDES[key] = json.loads(value)

    if args.first_choice:
        print("| split | space | design trials in the space | EI first nominee within 1 % | PI | "
              "UCB | first GP choices within 1 % (hedge-weighted) |\n|---|---|---|---|---|---|---|")
        for split in (list(SPLITS) if args.split == "both" else [args.split]):
            for alpha in args.alpha:
                print(first_choice(load_split(SPLITS[split]), alpha, split), flush=True)
        return 0

    if args.trajectory:
        data = compute_landscapes(args.trajectory, args.grid, seq_len=128, max_tokens=16384)
        CACHE.write_text(json.dumps(data, indent=1) + "\n")

    searchers = {}
    for q in args.q:
        searchers[f"GP-Hedge q={q}"] = (hedge, q)
    for q in args.q:
        searchers[f"BayesOptSearch (stock) q={q}"] = (stock_bayesopt, q)
    searchers["random"] = (RandomSearch, 1)
    searchers["grid (coarse to fine)"] = (GridSearch, 1)
    seeds = range(args.seeds)
    splits = list(SPLITS) if args.split == "both" else [args.split]
    if args.quick:
        searchers = {"GP-Hedge q=1": (hedge, 1), "random": (RandomSearch, 1)}
        seeds = range(2)
        splits = [s for s in SPLITS if all((HERE / f).exists() for f in SPLITS[s])][:1] or ["fit"]
    if args.only:
        searchers = {k: v for k, v in searchers.items() if k in args.only}
    lines, headline = [], {}
    for split in splits:
        landscapes = load_split(SPLITS[split])
        if args.quick:  # every fourth landscape of the split, from both trajectories
            landscapes = dict(list(landscapes.items())[::4])
        if not landscapes:
            print(f"no cached landscapes for the {split} split", file=sys.stderr)
            return 2
        for alpha in args.alpha:
            rows, medians = table(landscapes, searchers, alpha, seeds, args.noise, start, split)
            lines += rows
            for label, med in medians.items():
                prefix = "" if split == splits[0] else f"{split}_"
                key = re.sub(r"[^a-z0-9]+", "_", f"{prefix}{label} a{alpha}".lower()).strip("_")
                headline[key] = med
    text = "\n".join(lines)
    print(text)
    machine = machine_facts()
    print(f"elapsed {time.perf_counter() - start:.0f}s on {machine}")
    if not args.quick and not HEDGE_OVERRIDES:
        cmd = "python benchmarks/sample_efficiency.py " + " ".join(argv if argv is not None else sys.argv[1:])
        cmd = cmd.strip()
        write_section(f"Sample efficiency of λ searchers, held-out landscapes (noise {args.noise})"
                      + (f", {args.section}" if args.section else ""),
                      f"Command: `{cmd}` ({args.seeds} seeds per landscape, distinct across "
                      f"landscapes; median [IQR] over landscapes × seeds; '>12' = not reached "
                      f"within 12 trials). Machine: {machine}; {time.perf_counter() - start:.0f} s "
                      f"at --jobs {args.jobs}, 1-minute load average {load_start:.1f} at the start "
                      f"and {os.getloadavg()[0]:.1f} at the end (the cores are shared with other "
                      f"jobs). Landscapes: "
                      f"held-out loss of merges of adjacent checkpoint pairs, {args.grid}-point "
                      f"grids, split by trajectory: the **held-out** split ("
                      f"{', '.join(f'`benchmarks/{f}`' for f in SPLITS['held-out'])}) was never "
                      f"used to choose a default; the **fit** split ("
                      f"{', '.join(f'`benchmarks/{f}`' for f in SPLITS['fit'])}) is where the "
                      f"length-scale floor, the hedge's starting gains, κ, ξ and the initial "
                      f"design were chosen (`python benchmarks/tune_defaults.py`). Random search "
                      f"ignores results, so it has one row for every q.\n" + text,
                      path=args.write)
    print(format_headline(**headline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
