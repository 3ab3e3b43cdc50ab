"""Tuned λ against the merging baselines on a real small trajectory (issue 5).

Runs `compare_merges` on the demo trajectory's checkpoints (stdlib source, made once and cached):
uniform and greedy soups, SMA/EMA/WMA, Fisher, RegMean, grid and random λ search with the tuned
run's budget, and the GP-Hedge tuned λ. Also reports the tuned run's best score after its first
k evaluations (from its trials table, in completion order), and random search over several
seeds, so the budgets can be compared fairly.

    python benchmarks/compare_baselines.py           # demo trajectory; writes BENCHMARKS.md
    python benchmarks/compare_baselines.py --quick   # a tiny trajectory, prints only
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import headline, machine, write_section  # noqa: E402


def trajectory(args):
    from ckmerge_ray.demo import TrajectoryConfig, make_trajectory

    if args.quick:  # the same tiny trajectory as end_to_end.py --quick (shared --cache)
        cfg = TrajectoryConfig(steps=40, save_every=20, seq_len=64, vocab_size=512, hidden_size=48,
                               layers=2, train_bytes=300_000)
        work = args.cache / "e2e-quick"
    else:
        cfg, work = TrajectoryConfig(), args.cache / "e2e-demo"
    ckpts = sorted(work.glob("checkpoint-*"), key=lambda q: int(q.name.split("-")[1]))
    if len(ckpts) < 2:
        ckpts = make_trajectory(work, cfg, log=lambda m: print(m, flush=True))
    return cfg, work, ckpts


def tuned_after(trials_rows, k: int, alpha: float) -> float:
    """Best loss among the first k evaluations of the tuned run that lie in [alpha, 1]
    (λ = 0 is the earlier checkpoint's own score, outside the search space)."""
    in_space = [r["score"] for r in trials_rows if r["lam"] >= alpha and r["status"] == "ok"]
    return min(in_space[:k])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "ckmerge-bench")
    p.add_argument("--trials", type=int, default=None, help="λ budget (default 8; quick 3)")
    p.add_argument("--random-seeds", type=int, default=None, help="default 5; quick 1")
    args = p.parse_args(argv)

    import pyarrow.parquet as pq

    from ckmerge_ray import compare_merges

    cfg, work, ckpts = trajectory(args)
    trials = args.trials or (3 if args.quick else 8)
    seeds = args.random_seeds or (1 if args.quick else 5)
    alpha = 0.5
    options = {"seq_len": cfg.seq_len, "max_tokens": 4096 if args.quick else 16384}
    objective = f"loss:{work / 'heldout.jsonl'}"
    out = Path(tempfile.mkdtemp(prefix="ckmerge-compare-"))
    result = compare_merges(ckpts, {"cpu": 1}, objective=objective, objective_options=options,
                            alpha=alpha, num_trials=trials, max_concurrent=2,
                            stats_tokens=2048 if args.quick else 8192, output_dir=out / "main",
                            progress=not args.quick)
    rows = result.table.to_pylist()
    later = result.later_score
    tuned_rows = pq.read_table(out / "main" / "tuned" / "trials.parquet").to_pylist()

    random_scores = [result.row("random")["score"]]
    for seed in range(1, seeds):
        r = compare_merges(ckpts, {"cpu": 1}, objective=objective, objective_options=options,
                           methods=["random"], alpha=alpha, num_trials=trials, max_concurrent=2,
                           seed=seed, output_dir=out / f"random{seed}", progress=False)
        random_scores.append(r.row("random")["score"])

    # Grid search at the smaller budgets the tuned run is read at below.
    ks = sorted({3, min(5, trials), trials})
    grid_at = {trials: result.row("grid")["score"]}
    for k in ks:
        if k not in grid_at:
            r = compare_merges(ckpts, {"cpu": 1}, objective=objective, objective_options=options,
                               methods=["grid"], alpha=alpha, num_trials=k, max_concurrent=2,
                               output_dir=out / f"grid{k}", progress=False)
            grid_at[k] = r.row("grid")["score"]

    lines = [result.markdown(), ""]
    extra = ["| budget check | held-out loss | gain over later checkpoint | evaluations |",
             "|---|---:|---:|---:|"]
    for k in ks:
        s = tuned_after(tuned_rows, k, alpha)
        extra.append(f"| tuned λ, first {k} evaluations in [{alpha}, 1] | {s:.5f} | "
                     f"{later - s:+.5f} | {k} |")
        extra.append(f"| grid search λ, {k} evenly spaced | {grid_at[k]:.5f} | "
                     f"{later - grid_at[k]:+.5f} | {k} |")
    extra.append(f"| random search λ, mean of {seeds} seed(s) (min, max) | "
                 f"{statistics.mean(random_scores):.5f} ({min(random_scores):.5f}, "
                 f"{max(random_scores):.5f}) | {later - statistics.mean(random_scores):+.5f} "
                 f"| {trials} |")
    lines += extra
    others = [r for r in rows if r["status"] == "ok" and r["key"] not in
              ("endpoint", "grid", "random", "tuned") and not r["key"].startswith("checkpoint:")]
    best_other = min(others, key=lambda r: r["score"])
    lines += ["", "Reading: best loss after k evaluations, tuned λ vs grid search with k points: "
              + "; ".join(f"k = {k}: {tuned_after(tuned_rows, k, alpha):.5f} vs {grid_at[k]:.5f}"
                          for k in ks)
              + f". Best method that is not a λ search: {best_other['method']} "
                f"({best_other['score']:.5f}, gain {later - best_other['score']:+.5f}, "
                f"{best_other['evaluations']} evaluations)."]
    table = "\n".join(lines)
    names = ", ".join(c.name for c in ckpts)
    body = (f"Command: `python benchmarks/compare_baselines.py`. Machine: {machine()}. "
            f"Checkpoints (oldest first): {names} of the demo trajectory (stdlib source); "
            f"objective: held-out loss, {options['max_tokens']} tokens, seq_len {options['seq_len']}. "
            f"Moving averages and soups over all {len(ckpts)} checkpoints; Fisher and RegMean "
            f"statistics on 8192 tokens of the held-out text per checkpoint (the same text the "
            f"score uses); λ methods on the last pair, λ ∈ [{alpha}, 1], {trials} evaluations each "
            f"(the tuned run also scores λ = 0). Wall times include each method's own overheads "
            f"(the tuned run: Ray Tune start-up and a model build per trial worker; the baselines "
            f"run on evaluator actors started beforehand).\n\n" + table)
    print(body)
    if not args.quick:
        write_section("Tuned merge vs baselines", body)
    ok = [r for r in rows if r["status"] == "ok" and r["key"] not in ("endpoint",)
          and not r["key"].startswith("checkpoint:")]
    best_baseline = min((r for r in ok if r["key"] != "tuned"), key=lambda r: r["score"])
    tuned = result.row("tuned")
    print(headline(tuned_gain=later - tuned["score"], best_baseline=best_baseline["key"],
                   best_baseline_gain=later - best_baseline["score"],
                   tuned_evaluations=tuned["evaluations"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
