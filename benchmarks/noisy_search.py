"""Noise-aware GP on noisy λ landscapes (issue 4's benchmark for `GPHedgeSearch(noise_key=...)`).

Benchmark scores on a subset of a few hundred documents carry a standard error that is often as
large as the differences between nearby λ. This benchmark takes the real merge landscapes of
`benchmarks/landscapes.json` (held-out loss of the demo trajectory's adjacent pairs), adds
Gaussian noise of a known standard deviation σ to every observation and reports σ as the trial's
`score_stderr`, as the lm-eval objective does. GP-Hedge runs with and without `noise_key`; both
are driven through the Tune Searcher API with q trials pending (as in sample_efficiency.py).

Reported per searcher: the regret of the λ a run picks, on the noise-free landscape, in % of the
available gain (f(1) - min f), after 8 and 12 trials; two pick rules: the best *observed* score
(what `tune_merge` reports) and the best GP posterior mean among evaluated λ.

    python benchmarks/noisy_search.py            # 20 seeds × 3 landscapes × 2 noise levels
    python benchmarks/noisy_search.py --quick    # seconds; writes nothing
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import headline as format_headline, machine as machine_facts, write_section  # noqa: E402

CACHE = HERE / "landscapes.json"


def run(noise_aware: bool, f, sigma: float, alpha: float, q: int, seed: int, budget: int):
    """Observed (λ, noisy score) in order, and the searcher (for its GP)."""
    from ckmerge_ray.search import merge_searcher

    searcher = merge_searcher(alpha, "min", batch_size=q, seed=seed,
                              noise_key="score_stderr" if noise_aware else None)
    rng = np.random.default_rng(10_000 + seed)
    seen, pending, i = [], [], 0
    while len([x for x in seen if x[0] >= alpha - 1e-12]) < budget:
        while len(pending) < q:
            cfg = searcher.suggest(f"t{i}")
            i += 1
            if not isinstance(cfg, dict):
                break
            pending.append((f"t{i - 1}", float(cfg["lam"])))
        if not pending:
            continue
        tid, lam = pending.pop(0)
        y = f(lam) + sigma * rng.standard_normal()
        searcher.on_trial_complete(tid, {"score": y, "score_stderr": sigma})
        seen.append((lam, y))
    return seen, searcher


def regrets(seen, searcher, f, f_star, gain, alpha):
    """(regret of the best observed λ, regret of the best posterior mean), in % of the gain.

    `searcher` has observed exactly `seen`; only λ in [α, 1] can be picked.
    """
    inside = [(lam, y) for lam, y in seen if lam >= alpha - 1e-12]
    lam_obs = min(inside, key=lambda t: t[1])[0]
    X, y = searcher._observations()
    gp = searcher._fit_gp(X, y)
    cands = np.asarray([[lam] for lam, _ in inside])
    lam_post = float(cands[int(np.argmax(gp.predict(cands)))][0])  # the GP maximizes -score
    pct = lambda lam: (f(lam) - f_star) / gain * 100
    return pct(lam_obs), pct(lam_post)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--write", type=Path, default=HERE.parent / "BENCHMARKS.md")
    args = p.parse_args(argv)
    start = time.perf_counter()
    data = json.loads(CACHE.read_text())
    lams = np.asarray(data["lambdas"])
    alpha, budget = 0.5, 12
    noise_levels = (0.25, 0.5) if not args.quick else (0.5,)
    seeds = range(args.seeds if not args.quick else 1)
    qs = (1, 2) if not args.quick else (1,)
    lines = [
        "| noise σ (× gain) | q | GP | regret @8, best observed | @8, best posterior mean "
        "| @12, best observed | @12, best posterior mean |",
        "|---|---|---|---|---|---|---|",
    ]
    headline = {}
    for frac in noise_levels:
        for q in qs:
            for aware in (False, True):
                cols = {k: [] for k in ("o8", "p8", "o12", "p12")}
                for name, scores in data["pairs"].items():
                    s = np.asarray(scores)
                    inside = lams >= alpha - 1e-12
                    f_star, f_one = float(s[inside].min()), float(s[-1])
                    gain = f_one - f_star
                    if gain <= 1e-4 * abs(f_one):
                        continue
                    f = lambda lam, s=s: float(np.interp(lam, lams, s))
                    for seed in seeds:
                        seen, _ = run(aware, f, frac * gain, alpha, q, seed, budget)
                        # The GP a run would have after its first n trials.
                        for n, (ko, kp) in ((8, ("o8", "p8")), (12, ("o12", "p12"))):
                            upto = _prefix(seen, alpha, n)
                            sub = _replay(aware, upto, frac * gain, alpha, q, seed)
                            o, pm = regrets(upto, sub, f, f_star, gain, alpha)
                            cols[ko].append(o)
                            cols[kp].append(pm)
                label = "noise-aware (noise_key)" if aware else "plain (gp_noise 1e-6)"
                fmt = lambda xs: f"{np.median(xs):.1f} (mean {np.mean(xs):.1f})"
                lines.append(f"| {frac} | {q} | {label} | " + " | ".join(fmt(cols[k]) for k in ("o8", "p8", "o12", "p12")) + " |")
                key = f"{'aware' if aware else 'plain'}_s{frac}_q{q}"
                headline[f"{key}_obs12"] = float(np.mean(cols["o12"]))
                headline[f"{key}_post12"] = float(np.mean(cols["p12"]))
                print(f"  done: σ={frac} q={q} aware={aware} ({time.perf_counter() - start:.0f}s)",
                      file=sys.stderr, flush=True)
    table = "\n".join(lines)
    print(table)
    machine = machine_facts()
    if not args.quick:
        write_section(
            "Noise-aware GP on noisy landscapes",
            f"Command: `python benchmarks/noisy_search.py` ({args.seeds} seeds × 3 landscapes, λ ∈ "
            f"[{alpha}, 1]). Machine: {machine}. The real held-out-loss landscapes of "
            "`benchmarks/landscapes.json` plus Gaussian noise of σ = the given fraction of the "
            "landscape's gain, reported to the searcher as `score_stderr`. Cells: regret of the "
            "picked λ on the noise-free landscape, % of the gain, median (mean) over runs; lower "
            "is better.\n\n" + table, path=args.write)
    print(format_headline(**headline))
    return 0


def _prefix(seen, alpha, n):
    out, count = [], 0
    for lam, y in seen:
        out.append((lam, y))
        count += lam >= alpha - 1e-12
        if count == n:
            break
    return out


def _replay(aware, seen, sigma, alpha, q, seed):
    """A fresh searcher that has observed exactly `seen` (to fit the GP a run would have)."""
    from ckmerge_ray.search import merge_searcher

    s = merge_searcher(alpha, "min", batch_size=q, seed=seed,
                       noise_key="score_stderr" if aware else None)
    for i, (lam, y) in enumerate(seen):
        s._live_trial_mapping[f"r{i}"] = {"lam": lam}
        s.on_trial_complete(f"r{i}", {"score": y, "score_stderr": sigma})
    return s


if __name__ == "__main__":
    sys.exit(main())
