"""Merging a window of the last k checkpoints: tuned weights vs the tuned pair, the fixed
averages and grid search, at equal evaluation budgets (issue 20, "Measure").

Objective: the held-out loss of the merged model, evaluated in this process (no Ray): every
checkpoint's state dict is read once, a weighting w is merged with
`ckmerge_ray.merge.weighted_state_dict` (the product's arithmetic: the fp64 sum rounded once to
the checkpoints' dtype; a pair takes the fused lerp), loaded into the newest checkpoint's model
(in the dtype `from_pretrained` gives it, as a trial's model) and scored with
`ckmerge_ray.objectives.HeldoutLoss`. Evaluations are memoized by weight vector (rounded to
1e-9) and cached in `benchmarks/windows_<trajectory>.json` (weights and losses only, never corpus
text), so a rerun with a complete cache trains and evaluates nothing; a miss trains the
trajectory (kept under --workdir) and evaluates exactly.

Trajectories (`--list`): the demo's Llama on the standard library (`ckmerge_ray.demo`, fp32) with
500 steps and a checkpoint every 100 (warmup 40: the last four checkpoints, 200..500, are in the
constant-LR phase; 1.1M parameters), and make_landscapes.py's GPT-NeoX on tinyshakespeare (bf16,
0.73M parameters: the held-out landscapes' trajectory) with a checkpoint every 100 of its 400
steps (skipped with a message when `../shared/data/tinyshakespeare.txt` is missing). The issue's
figures (a 1.3M-parameter GPT-NeoX) came from another run: this is not a reproduction of them.

For each trajectory and the last k = 2, 3, 4 checkpoints (oldest first):
1. tuned window: `window_run.window_searcher` (GP-Hedge over the family's box, its initial design
   first) for the families simplex, ema, decay and decay+length, q = 1, driven offline the way
   sample_efficiency.py drives searchers (suggest -> evaluate -> on_trial_complete). For k = 2
   only simplex: there every family is a reparametrization of the pair's line (1-λ, λ)
   (simplex: λ ∈ [0, 1]), and the CPU went to the longer windows;
2. tuned pair: λ on the last two, `SearchConfig().searcher` (the product's `merge_searcher`);
3. SMA, EMA(0.5) and WMA of the window (one evaluation each);
4. grid search over each family's box with as many points as the budget (1-D: evenly spaced,
   ends included; 2-D and 3-D: a rank-1 lattice, see `lattice`).
Budgets 6, 10 and 16 evaluations. Counting: every evaluation a method asks for counts, the
design points included; the pair's λ = 0 (Θ(k-1) alone) counts too, as it costs an evaluation
like any other (in tune_merge it is outside [α, 1]; here the budgets are equal model
evaluations). The searchers do not know the budget, so a GP run's figures at 6 and 10 are the
first 6 and 10 evaluations of its 16-evaluation run; a grid is laid out for its budget.
"Trials to within 1 %": evaluations until the running best loss is within 1 % of the best gain
found by any method on that window (gain = loss of the newest checkpoint alone - loss), '>16'
when not within the budget.

d = 2 and 3 landscapes (issue 20, item 2): on the k = 3 and 4 windows, the simplex family
(d = 2, 3) with GP-Hedge at q = 1, 2, 4 (q trials pending, oldest finishing first, as Tune calls
it) vs random search (uniform on the simplex), trials to within 1 % of the best cached gain, on
the real memoized evaluations (no interpolation).

    python benchmarks/window_search.py                  # full: both trajectories, writes BENCHMARKS.md
    python benchmarks/window_search.py --quick          # cached evaluations only, seconds, prints only
    python benchmarks/window_search.py --workdir DIR    # keep the trained trajectories in DIR
    python benchmarks/window_search.py --list

--quick never trains: it reads the committed cache of the first trajectory, and an evaluation
the cache lacks (a searcher that moved since the cache was made) takes the loss of the nearest
cached weighting; the headline's `nearest_used` counts them (the full run never does this).
"""

from __future__ import annotations

import os

# One BLAS thread for the GP (sample_efficiency.py's reason); torch's evaluation threads are set
# to the cores below.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import json
import logging
import math
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from common import headline as format_headline, machine as machine_facts, write_section  # noqa: E402
from sample_efficiency import TARGET, landscape_seed  # noqa: E402

K_MAX = 4  # the longest window: evaluations are keyed by weights over the last K_MAX checkpoints
KS = (2, 3, 4)
BUDGETS = (6, 10, 16)
FAMILY_LABELS = ("simplex", "ema", "decay", "decay+length")
HELDOUT_TOKENS = 8192  # held-out tokens scored per evaluation (landscapes*.json use 16384)
ROUND = 9  # memo key: weights rounded to 1e-9
TITLE = "Windows of k checkpoints (issue 20)"


# --- trajectories --------------------------------------------------------------------------------

def trajectories() -> Dict[str, Dict]:
    """name -> {"kind", "config"}: the demo's maker (`demo.TrajectoryConfig`) or
    make_landscapes.py's (`make_landscapes.Trajectory`)."""
    from make_landscapes import TRAJECTORIES as LANDSCAPE_TRAJECTORIES

    from ckmerge_ray.demo import TrajectoryConfig

    return {
        "llama-stdlib-fp32": {"kind": "demo", "config": TrajectoryConfig(steps=500, save_every=100)},
        "gptneox-shakespeare-bf16": {
            "kind": "landscapes",
            "config": replace(LANDSCAPE_TRAJECTORIES["gptneox-shakespeare-bf16"], save_every=100)},
    }


def describe(spec: Dict) -> Dict:
    return {"kind": spec["kind"], **asdict(spec["config"])}


def corpus_missing(spec: Dict, shakespeare: Path) -> Optional[str]:
    if spec["kind"] == "landscapes" and spec["config"].corpus == "shakespeare" \
            and not shakespeare.exists():
        return f"corpus file {shakespeare} not found"
    return None


def train(name: str, spec: Dict, workdir: Path, shakespeare: Path) -> Path:
    """The trajectory's directory under `workdir` (trained once; `trajectory.json` marks a
    finished one with the settings it was made with)."""
    out = workdir / name
    marker = out / "trajectory.json"
    if marker.exists() and json.loads(marker.read_text()) == describe(spec):
        print(f"{name}: reusing the trajectory in {out}", flush=True)
        return out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    start = time.perf_counter()
    print(f"{name}: training ({spec['kind']} maker) in {out}", flush=True)
    if spec["kind"] == "demo":
        from ckmerge_ray.demo import make_trajectory

        make_trajectory(out, spec["config"], log=lambda m: print(f"  {name}: {m}", flush=True))
    else:
        from make_landscapes import corpus_texts, pretrain

        corpus = corpus_texts(spec["config"], shakespeare)
        if corpus is None:
            raise SystemExit(f"{name}: corpus file {shakespeare} not found; the cache lacks "
                             "weightings that need the trajectory")
        pretrain(spec["config"], out, *corpus)
    marker.write_text(json.dumps(describe(spec), indent=1) + "\n")
    print(f"{name}: trained in {time.perf_counter() - start:.0f}s", flush=True)
    return out


def checkpoints_of(directory: Path) -> List[Path]:
    return sorted(directory.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


# --- the objective: exact, memoized, cached -------------------------------------------------------

class Landscape:
    """Held-out loss of the merge of the last `K_MAX` checkpoints with weights w (oldest first;
    a shorter w is the newest checkpoints': zeros are prepended). Memoized by w rounded to 1e-9
    and cached in `path`. The trajectory is trained and loaded on the first miss only.

    offline: never evaluate; a miss takes the loss of the nearest cached w (L∞) and is counted
    in `nearest_used` (--quick only)."""

    def __init__(self, name: str, spec: Dict, path: Path, workdir: Path, shakespeare: Path,
                 offline: bool = False):
        self.name, self.spec, self.path = name, spec, path
        self.workdir, self.shakespeare, self.offline = workdir, shakespeare, offline
        self.record = {"trajectory": {"name": name, **describe(spec)},
                       "objective": {"kind": "HeldoutLoss", "seq_len": self.seq_len,
                                     "max_tokens": HELDOUT_TOKENS}}
        self.memo: Dict[Tuple[float, ...], float] = {}
        self.checkpoint_names: List[str] = []
        self.new = self.nearest_used = 0
        self.eval_seconds = 0.0
        self._ready = False
        if path.exists():
            data = json.loads(path.read_text())
            if {k: data.get(k) for k in self.record} == self.record:
                self.checkpoint_names = data["checkpoints"]
                for row in data["evaluations"]:
                    self.memo[self.key(row[:K_MAX])] = float(row[K_MAX])
            else:
                print(f"{path.name} was made with other settings; starting a new cache",
                      file=sys.stderr)

    @property
    def seq_len(self) -> int:
        return self.spec["config"].seq_len

    @staticmethod
    def key(w: Sequence[float]) -> Tuple[float, ...]:
        w = [0.0] * (K_MAX - len(w)) + [float(x) for x in w]
        return tuple(round(x, ROUND) + 0.0 for x in w)  # + 0.0: no -0.0 keys

    def __call__(self, w: Sequence[float]) -> float:
        key = self.key(w)
        if key in self.memo:
            return self.memo[key]
        if self.offline:
            if not self.memo:
                raise SystemExit(f"{self.path.name} holds no evaluations; run the full benchmark")
            near = min(self.memo, key=lambda c: max(abs(a - b) for a, b in zip(c, key)))
            self.nearest_used += 1
            return self.memo[near]
        self._load()
        t = time.perf_counter()
        self.memo[key] = self._evaluate(key)
        self.eval_seconds += time.perf_counter() - t
        self.new += 1
        if self.new % 25 == 0:
            self.save()
        return self.memo[key]

    def _load(self) -> None:
        if self._ready:
            return
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        from ckmerge_ray.objectives import HeldoutLoss

        hf_logging.set_verbosity_error()
        torch.set_num_threads(os.cpu_count() or 1)
        directory = train(self.name, self.spec, self.workdir, self.shakespeare)
        window = checkpoints_of(directory)[-K_MAX:]
        names = [c.name for c in window]
        if self.checkpoint_names and self.checkpoint_names != names:
            raise SystemExit(f"{self.path.name} holds {self.checkpoint_names}, the trajectory "
                             f"has {names}")
        self.checkpoint_names = names
        # The tensors as a trial's model holds them: transformers' renamings applied (GPT-NeoX's
        # embed_out is lm_head in transformers 5), in the dtype from_pretrained gives (the
        # checkpoint's own here: fp32 and bf16), values bit for bit the files'.
        self.shards = [{k: v.detach() for k, v in
                        AutoModelForCausalLM.from_pretrained(c).state_dict().items()}
                       for c in window]
        self.model = AutoModelForCausalLM.from_pretrained(window[-1]).eval()
        self.objective = HeldoutLoss(directory / "heldout.jsonl", seq_len=self.seq_len,
                                     max_tokens=HELDOUT_TOKENS)
        self.objective.prepare(window[-1])
        self._ready = True
        newest = self.key([0.0] * (K_MAX - 1) + [1.0])
        if newest in self.memo:  # a retrained trajectory must be the one the cache was made on
            fresh = self._evaluate(newest)
            if abs(fresh - self.memo[newest]) > 1e-6:
                print(f"{self.path.name}: the newest checkpoint now scores {fresh:.6f}, the "
                      f"cache says {self.memo[newest]:.6f}; discarding the cache",
                      file=sys.stderr)
                self.memo = {newest: fresh}

    def _evaluate(self, key: Tuple[float, ...]) -> float:
        import torch

        from ckmerge_ray.merge import weighted_state_dict

        used = [(s, w) for s, w in zip(self.shards, key) if w != 0.0]
        merged = weighted_state_dict([s for s, _ in used], [w for _, w in used])
        missing, unexpected = self.model.load_state_dict(merged, strict=False)
        loaded = {self.model.state_dict()[k].data_ptr() for k in merged}
        untied = [k for k in missing if self.model.state_dict()[k].data_ptr() not in loaded]
        if unexpected or untied:
            raise RuntimeError(f"checkpoint and model differ: missing {untied}, unexpected "
                               f"{unexpected}")
        return float(self.objective.evaluate(self.model, torch.device("cpu"))["score"])

    def best(self, k: int) -> Tuple[float, Tuple[float, ...]]:
        """The lowest cached loss among weightings of the last k checkpoints, and its w."""
        inside = [(v, w) for w, v in self.memo.items() if all(x == 0.0 for x in w[:K_MAX - k])]
        v, w = min(inside)
        return v, w[K_MAX - k:]

    def save(self) -> None:
        if self.offline or not self.new:
            return
        rows = sorted([*w, v] for w, v in self.memo.items())
        data = {**self.record, "checkpoints": self.checkpoint_names,
                "note": "held-out loss of the merge sum(w_i * checkpoint_i) of the last "
                        f"{K_MAX} checkpoints (oldest first); rows are w_1..w_{K_MAX}, loss",
                "evaluations": rows}
        head = json.dumps({k: v for k, v in data.items() if k != "evaluations"}, indent=1)
        body = ",\n".join(json.dumps(r) for r in rows)  # one weighting per line
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(head[:-2] + ',\n "evaluations": [\n' + body + "\n ]\n}\n")
        tmp.replace(self.path)


# --- searchers, driven as Tune drives them -----------------------------------------------------

def drive(searcher, to_weights: Callable[[Dict], List[float]], f: Callable, budget: int,
          q: int = 1) -> List[Tuple[List[float], float]]:
    """(weights, loss) of each evaluation in the order they finish: `budget` evaluations, q
    pending at once, the oldest finishing first (sample_efficiency.run_one for any space)."""
    done, pending, i, idle = [], [], 0, 0
    while len(done) < budget:
        while len(pending) < q and len(done) + len(pending) < budget:
            cfg = searcher.suggest(f"t{i}")
            i += 1
            if not isinstance(cfg, dict):
                break  # None: waiting for the initial design to return
            pending.append((f"t{i - 1}", cfg))
        if not pending:
            idle += 1
            if idle > 10:
                break
            continue
        tid, cfg = pending.pop(0)
        w = to_weights(cfg)
        y = f(w)
        searcher.on_trial_complete(tid, {"score": y})
        done.append((w, y))
    return done


def window_run(family, f, budget: int, q: int, seed: int):
    from ckmerge_ray.config import SearchConfig
    from ckmerge_ray.window_run import window_searcher

    searcher = window_searcher(family, SearchConfig(seed=seed), "min", q)
    return drive(searcher, family.weights, f, budget, q)


def pair_run(f, budget: int, seed: int):
    from ckmerge_ray.config import SearchConfig

    searcher = SearchConfig(seed=seed).searcher("min", 1)
    return drive(searcher, lambda c: [1.0 - float(c["lam"]), float(c["lam"])], f, budget)


class RandomSimplex:
    """Uniform on the simplex: uniform in the family's cube, through `cube_to_simplex`."""

    def __init__(self, family, seed: int):
        self.family, self.rng = family, np.random.default_rng(seed)

    def suggest(self, trial_id):
        return dict(zip(self.family.space(), self.rng.uniform(0.0, 1.0, self.family.k - 1)))

    def on_trial_complete(self, trial_id, result=None, error=False):
        pass


def lattice(n: int, d: int) -> np.ndarray:
    """n points in [0, 1]^d: a rank-1 (Korobov) lattice, x_i = frac((i·(1, a, a², …) mod n + ½)/n),
    with the generator a that maximizes the smallest distance between points (ties: smallest
    a). Every coordinate takes each of n evenly spaced values once, so an integer dimension
    (the window length) is covered evenly too. d = 1: n evenly spaced points, ends included."""
    if d == 1:
        return np.linspace(0.0, 1.0, n)[:, None]
    best, best_gap = None, -1.0
    for a in range(1, n):
        if math.gcd(a, n) != 1 and n > 2:
            continue
        z = np.array([pow(a, j, n) for j in range(d)])
        pts = ((np.arange(n)[:, None] * z[None, :]) % n + 0.5) / n
        gaps = np.linalg.norm(pts[:, None] - pts[None, :], axis=-1)
        gap = gaps[np.triu_indices(n, 1)].min()
        if gap > best_gap + 1e-12:
            best, best_gap = pts, gap
    return best


def grid_run(family, f, budget: int):
    space = family.space()
    lows = np.array([lo for lo, _ in space.values()])
    highs = np.array([hi for _, hi in space.values()])
    points = lows + lattice(budget, len(space)) * (highs - lows)
    out = []
    for p in points:
        w = family.weights(dict(zip(space, p)))
        out.append((w, f(w)))
    return out


# --- figures -------------------------------------------------------------------------------------

def trials_to(values: Sequence[float], f_best: float, f_newest: float) -> float:
    gain = f_newest - f_best
    running = np.minimum.accumulate(values)
    hit = [i + 1 for i, v in enumerate(running) if v <= f_best + TARGET * gain]
    return float(hit[0]) if hit else math.inf


def best_at(run: List[Tuple[List[float], float]], n: int) -> Tuple[float, List[float]]:
    w, v = min(run[:n], key=lambda r: r[1])
    return v, w


def fmt_trials(x: float, budget: int) -> str:
    return f">{budget}" if math.isinf(x) else f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}"


def med_range(xs: Sequence[float], budget: int = 0, digits: int = 4) -> str:
    """median [min–max]; trials (budget > 0) as integers with '>budget'."""
    xs = np.asarray(xs, dtype=float)
    med = float(np.percentile(xs, 50, method="nearest")) if budget else float(np.median(xs))
    fmt = (lambda v: fmt_trials(v, budget)) if budget else (lambda v: f"{v:.{digits}f}")
    if len(xs) == 1 or xs.min() == xs.max():
        return fmt(med)
    return f"{fmt(med)} [{fmt(xs.min())}–{fmt(xs.max())}]"


def fmt_w(w: Sequence[float]) -> str:
    return "(" + ", ".join(f"{x:.2f}" for x in w) + ")"


def median_run(runs: List[List[Tuple[List[float], float]]], n: int):
    """The run whose best after n evaluations is the median (lower median) of the seeds'."""
    order = sorted(range(len(runs)), key=lambda i: best_at(runs[i], n)[0])
    return runs[order[(len(order) - 1) // 2]]


# --- the benchmark -------------------------------------------------------------------------------

@dataclass
class Settings:
    ks: Tuple[int, ...] = KS
    budgets: Tuple[int, ...] = BUDGETS
    families: Tuple[str, ...] = FAMILY_LABELS
    k2_families: Tuple[str, ...] = ("simplex",)  # k = 2: every family is the pair's line
    seeds: int = 3
    qs: Tuple[int, ...] = (1, 2, 4)
    d_ks: Tuple[int, ...] = (3, 4)  # windows of the d = 2, 3 part
    grid: bool = True


def run_trajectory(name: str, f: Landscape, s: Settings, log=print) -> Dict:
    """Every method on every window of `name`; figures are computed at the end (`tables`)."""
    from ckmerge_ray.baselines import ema_weights, sma_weights, wma_weights
    from ckmerge_ray.families import family_of

    B = max(s.budgets)
    out: Dict = {"pair": [], "windows": {}, "d": {}}
    t0 = time.perf_counter()
    out["alone"] = [f([1.0 if j == i else 0.0 for j in range(K_MAX)]) for i in range(K_MAX)]
    out["pair"] = [pair_run(f, B, landscape_seed(f"{name}:pair", i)) for i in range(s.seeds)]
    log(f"  {name} pair: {len(out['pair'])} runs ({time.perf_counter() - t0:.0f}s, "
        f"{f.new} new evaluations)")
    for k in s.ks:
        w: Dict = {"newest": f([0.0] * (k - 1) + [1.0]), "gp": {}, "grid": {}, "fixed": {}}
        for label, weights in (("SMA", sma_weights(k)), ("EMA(0.5)", ema_weights(k, 0.5)),
                               ("WMA", wma_weights(k))):
            w["fixed"][label] = (weights, f(weights))
        for label in (s.k2_families if k == 2 else s.families):
            family = family_of(label, k)
            w["gp"][label] = [window_run(family, f, B, 1, landscape_seed(f"{name}:k{k}:{label}", i))
                              for i in range(s.seeds)]
            if s.grid:
                w["grid"][label] = {b: grid_run(family, f, b) for b in s.budgets}
            log(f"  {name} k={k} {label}: done ({time.perf_counter() - t0:.0f}s, "
                f"{f.new} new evaluations, {f.eval_seconds:.0f}s evaluating)")
        out["windows"][k] = w
    for k in s.d_ks:
        family = family_of("simplex", k)
        runs = {}
        for q in s.qs:
            if q == 1 and k in out["windows"] and "simplex" in out["windows"][k]["gp"]:
                runs["GP-Hedge q=1"] = out["windows"][k]["gp"]["simplex"]
                continue
            runs[f"GP-Hedge q={q}"] = [window_run(family, f, B, q,
                                                  landscape_seed(f"{name}:k{k}:simplex", i))
                                       for i in range(s.seeds)]
        runs["random"] = [drive(RandomSimplex(family, landscape_seed(f"{name}:k{k}:random", i)),
                                family.weights, f, B) for i in range(s.seeds)]
        out["d"][k] = runs
        log(f"  {name} d={k - 1} (k={k}): done ({time.perf_counter() - t0:.0f}s, "
            f"{f.new} new evaluations)")
    return out


def loss(v: float) -> str:
    """A loss for the headline: 5 decimals (its default 4 significant digits hide the
    differences measured here, 1e-5 to 1e-3 nats)."""
    return f"{v:.5f}"


def trials_figure(xs: Sequence[float]) -> float:
    return float(np.percentile(xs, 50, method="nearest"))


def tables(name: str, f: Landscape, res: Dict, s: Settings) -> Tuple[List[str], Dict, List]:
    """Markdown lines, headline figures, and the window-vs-pair comparisons
    (trajectory, k, family, {budget: (window median best, pair median best)})."""
    B = max(s.budgets)
    tag = name.split("-")[0]
    alone = ", ".join(f"{n.split('-')[-1]}: {v:.4f}" for n, v in zip(f.checkpoint_names,
                                                                        res["alone"]))
    lines = [f"\n**{name}** (checkpoints {', '.join(f.checkpoint_names)}, the window of k is "
             f"the last k; each checkpoint alone by step: {alone})\n",
             "| k | method | evals | " + " | ".join(f"best loss @{b}" for b in s.budgets)
             + f" | trials to within 1 % (≤{B}) | weights of the best @{B} (oldest first) |",
             "|---|---|---|" + "---|" * len(s.budgets) + "---|---|"]
    figures, comparisons = {}, []
    for k, w in res["windows"].items():
        f_best, w_best = f.best(k)
        f_new = w["newest"]
        gain = f_new - f_best
        pair_best = {b: float(np.median([best_at(r, b)[0] for r in res["pair"]]))
                     for b in s.budgets}
        rows = []

        def gp_row(label, runs, evals):
            t = [trials_to([v for _, v in r], f_best, f_new) for r in runs]
            rows.append(f"| {k} | {label} | {evals} | "
                        + " | ".join(med_range([best_at(r, b)[0] for r in runs])
                                     for b in s.budgets)
                        + f" | {med_range(t, B)} | {fmt_w(best_at(median_run(runs, B), B)[1])} |")
            return t

        rows.append(f"| {k} | newest checkpoint alone | 1 | "
                    + " | ".join(f"{f_new:.4f}" for _ in s.budgets) + " | — | "
                    + fmt_w([0.0] * (k - 1) + [1.0]) + " |")
        for label, runs in w["gp"].items():
            t = gp_row(f"tuned window, {label}", runs, f"≤{B}, {len(runs)} seeds")
            key = f"{tag}_k{k}_{label.replace('+', '_')}"
            medians = {b: float(np.median([best_at(r, b)[0] for r in runs])) for b in s.budgets}
            figures.update({f"{key}_b{b}": loss(v) for b, v in medians.items()})
            figures[f"{key}_t1pct"] = trials_figure(t)
            comparisons.append((name, k, label, {b: (medians[b], pair_best[b])
                                                  for b in s.budgets}))
        pair_runs = [[([0.0] * (k - 2) + wp, v) for wp, v in r] for r in res["pair"]]
        t = gp_row("tuned pair (λ on the last two)", pair_runs, f"≤{B}, {len(pair_runs)} seeds")
        figures[f"{tag}_k{k}_pair_t1pct"] = trials_figure(t)
        figures.update({f"{tag}_k{k}_pair_b{b}": loss(v) for b, v in pair_best.items()})
        for label, (weights, v) in w["fixed"].items():
            rows.append(f"| {k} | {label} | 1 | " + " | ".join(f"{v:.4f}" for _ in s.budgets)
                        + f" | {'1' if v <= f_best + TARGET * gain else '—'} | {fmt_w(weights)} |")
            figures[f"{tag}_k{k}_{label.split('(')[0].lower()}"] = loss(v)
        for label, grids in w["grid"].items():
            reach = [b for b in s.budgets if best_at(grids[b], b)[0] <= f_best + TARGET * gain]
            rows.append(f"| {k} | grid, {label} | = budget | "
                        + " | ".join(f"{best_at(grids[b], b)[0]:.4f}" for b in s.budgets)
                        + f" | {'grids of ' + ', '.join(map(str, reach)) if reach else f'>{B}'}"
                        + f" | {fmt_w(best_at(grids[B], B)[1])} |")
        pair_all = min(v for r in res["pair"] for _, v in r)
        lines += rows
        lines.append(f"| {k} | *best found by any method* | all | " + "— | " * (len(s.budgets) - 1)
                     + f"{f_best:.5f} | gain {gain:.4f} over the newest (1 %: {TARGET * gain:.5f}"
                     f"); the pair's best over its runs {pair_all:.5f}, "
                     f"{(f_new - pair_all) / gain * 100:.1f} % of that gain | {fmt_w(w_best)} |")
        figures[f"{tag}_k{k}_newest"] = loss(f_new)
        figures[f"{tag}_k{k}_best"] = loss(f_best)
    return lines, figures, comparisons


def comparison_table(comparisons: List, budgets: Sequence[int]) -> Tuple[List[str], List[str]]:
    """Markdown rows of window − pair per budget, and one statement per (trajectory, k, family)
    where the window does not beat the pair at some budget."""
    lines = ["| trajectory | k | family | " + " | ".join(f"@{b}" for b in budgets)
             + " | window better at |", "|---|---|---|" + "---|" * len(budgets) + "---|"]
    statements = []
    for name, k, label, by_budget in comparisons:
        diffs = {b: by_budget[b][0] - by_budget[b][1] for b in budgets}
        better = [b for b in budgets if diffs[b] < 0]
        lines.append(f"| {name} | {k} | {label} | "
                     + " | ".join("0 (same loss)" if diffs[b] == 0 else f"{diffs[b]:+.5f}"
                                  for b in budgets)
                     + f" | {', '.join(f'@{b}' for b in better) or 'none'} |")
        worse = [b for b in budgets if diffs[b] >= 0]
        if worse:
            statements.append(
                f"{name}, k = {k}, {label}: not better than the pair at "
                + ", ".join(f"@{b} ({by_budget[b][0]:.5f} vs {by_budget[b][1]:.5f})"
                            for b in worse))
    diffs = [by[b][0] - by[b][1] for *_, by in comparisons for b in budgets]
    better, worse = [d for d in diffs if d < 0], [d for d in diffs if d >= 0]
    if diffs:
        statements.insert(0, (
            f"In all: the window is better in {len(better)} of {len(diffs)} (trajectory, k, "
            "family, budget) cells" + (f", by at most {-min(better):.5f} nats" if better else "")
            + (f"; where it is not, it trails by up to {max(worse):.5f} nats" if worse else "")
            + "."))
    return lines, statements


def d_table(name: str, f: Landscape, res: Dict, s: Settings) -> Tuple[List[str], Dict]:
    B = max(s.budgets)
    tag = name.split("-")[0]
    lines, figures = [], {}
    for k, runs in res["d"].items():
        f_best, _ = f.best(k)
        f_new = f([0.0] * (k - 1) + [1.0])
        lines.append(f"| {name} | {k} ({k - 1}) | {TARGET * (f_new - f_best):.5f} | " + " | ".join(
            med_range([trials_to([v for _, v in r], f_best, f_new) for r in rr], B)
            for rr in runs.values()) + " |")
        for label, rr in runs.items():
            key = f"{tag}_d{k - 1}_{label.lower().replace('gp-hedge q=', 'gp_q')}_t1pct"
            figures[key] = trials_figure([trials_to([v for _, v in r], f_best, f_new)
                                          for r in rr])
    labels = list(next(iter(res["d"].values()))) if res["d"] else []
    header = ["| trajectory | k (d) | 1 % of the gain (nats) | " + " | ".join(labels) + " |",
              "|---|---|---|" + "---|" * len(labels)] if labels else []
    return header + lines, figures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="first trajectory's cache only: k = 3, the simplex family and the "
                        "pair, budgets 6 and 10, 2 seeds; prints only")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--only", nargs="*", default=None, help="trajectory names (default: all)")
    p.add_argument("--list", action="store_true")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where trajectories are trained and kept (default: a temporary folder)")
    p.add_argument("--shakespeare", type=Path,
                   default=HERE.parent.parent / "shared" / "data" / "tinyshakespeare.txt")
    p.add_argument("--write", type=Path, default=HERE.parent / "BENCHMARKS.md")
    args = p.parse_args(argv)
    logging.getLogger("ckmerge_ray.search.hedge").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="sklearn")
    specs = trajectories()
    if args.list:
        for name, spec in specs.items():
            print(json.dumps({"name": name, **describe(spec)}))
        return 0
    start, cpu0, load_start = time.perf_counter(), time.process_time(), os.getloadavg()[0]
    s = Settings(seeds=args.seeds)
    names = args.only or list(specs)
    if args.quick:
        s = Settings(ks=(3,), budgets=(6, 10), families=("simplex",), seeds=2,
                     qs=(1,), d_ks=(3,))
        names = [n for n in names if (HERE / f"windows_{n}.json").exists()][:1]
        if not names:
            print("no cached windows_*.json; run the full benchmark", file=sys.stderr)
            return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ckmerge-windows-"))
    lines, d_lines, figures, comparisons, skipped = [], [], {}, [], []
    landscapes = []
    try:
        for name in names:
            spec = specs[name]
            missing = corpus_missing(spec, args.shakespeare)
            cache = HERE / f"windows_{name}.json"
            if missing and not cache.exists():
                print(f"skipping {name}: {missing}", file=sys.stderr)
                skipped.append(f"{name} ({missing})")
                continue
            f = Landscape(name, spec, cache, workdir, args.shakespeare, offline=args.quick)
            landscapes.append(f)
            try:
                res = run_trajectory(name, f, s)
            finally:
                f.save()
            rows, figs, nb = tables(name, f, res, s)
            drows, dfigs = d_table(name, f, res, s)
            lines += rows
            d_lines += drows[2:] if d_lines else drows
            figures.update(figs)
            figures.update(dfigs)
            comparisons += nb
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    versus, not_beating = comparison_table(comparisons, s.budgets)
    text = ("\n".join(lines)
            + "\n\n**Tuned window − tuned pair**: median best loss over seeds at the same budget "
            "(nats; negative: the window is better; '0 (same loss)': both medians are the same "
            "evaluation's loss)\n\n" + "\n".join(versus)
            + "\n\n**Where the tuned window does not beat the tuned pair** (window ≥ pair at "
            "that budget):\n\n" + ("\n".join(f"- {x}" for x in not_beating) or "- nowhere")
            + "\n\n**d = 2 and 3 landscapes** (simplex family on the k = 3 and 4 windows; trials "
            "to within 1 % of the best cached gain, median [min–max] over seeds):\n\n"
            + "\n".join(d_lines))
    print(text)
    machine = machine_facts()
    new = sum(f.new for f in landscapes)
    evals = sum(f.eval_seconds for f in landscapes)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
    print(f"elapsed {wall:.0f}s ({cpu:.0f}s CPU; {new} new evaluations, {evals:.0f}s of them) "
          f"on {machine}")
    if not args.quick:
        cmd = ("python benchmarks/window_search.py " + " ".join(
            argv if argv is not None else sys.argv[1:])).strip()
        body = (
            f"Command: `{cmd}`. Machine: {machine}; {wall:.0f} s wall, {cpu:.0f} s CPU of this "
            f"process, {new} evaluations not yet in the cache ({evals:.0f} s), 1-minute load "
            f"average {load_start:.1f} at the start and {os.getloadavg()[0]:.1f} at the end (shared "
            f"cores). "
            "Objective: held-out loss (nats/token, lower is better) of the merge Σ wᵢΘᵢ of the "
            f"window, {HELDOUT_TOKENS} held-out tokens in windows of the trajectory's seq_len, "
            "evaluated in-process with the product's merge arithmetic and memoized per weighting "
            "in `benchmarks/windows_<trajectory>.json` (a rerun evaluates only what the cache "
            "lacks). Trajectories: `python benchmarks/window_search.py --list`"
            + (f"; skipped: {', '.join(skipped)}" if skipped else "") + ". "
            f"Methods at budgets {', '.join(map(str, s.budgets))} evaluations: the tuned window "
            "(`window_searcher`, GP-Hedge over the family's box, design first, q = 1; for k = 2 "
            "only the simplex family, λ ∈ [0, 1]: there every family is a reparametrization of "
            "the pair's line), the tuned "
            "pair (`SearchConfig().searcher`, λ ∈ [0.5, 1] plus λ = 0; every evaluation counts, "
            "λ = 0 included), SMA / EMA(0.5) / WMA of the window (1 evaluation), and grid search "
            "over each family's box laid out for the budget (1-D evenly spaced with ends; 2-D "
            "and 3-D a rank-1 lattice). The GP rows are median [min–max] over "
            f"{s.seeds} seeds; a run's figure @6 and @10 is its first 6 and 10 evaluations (the "
            "searchers do not know the budget). Trials to within 1 %: evaluations until the "
            "running best is within 1 % of the best gain over the newest checkpoint found by any "
            f"method on that window ('>{max(s.budgets)}': not within the budget; for a fixed "
            "average '1' if it is within, for a grid the grid sizes that reach it). Weights: the "
            "best weighting of the median seed's 16-evaluation run.\n" + text + "\n")
        write_section(TITLE, body, path=args.write)
    figures["nearest_used"] = sum(f.nearest_used for f in landscapes)
    figures["new_evaluations"] = new
    print(format_headline(**figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
