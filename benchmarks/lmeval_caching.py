"""lm-eval objective: per-trial evaluation time with and without request caching (issue 4).

Same task, same model, one process: "uncached" calls `simple_evaluate` on every trial (tasks and
datasets reloaded, prompts rendered again, environment info collected); "cached" is what
`LmEvalObjective` does by default (tasks loaded once per worker, requests built once and reused
through lm-eval's request cache). Both give identical scores (checked). Then a real `tune_merge`
with the cached objective reports the evaluation's share of a trial's wall time.

Tasks: the local multiple-choice and rolling-perplexity tasks that `make_lmeval_tasks` builds from
the demo trajectory's held-out stdlib text; model: the demo's last checkpoint.

    python benchmarks/lmeval_caching.py            # demo trajectory (made once, ~2 min); writes BENCHMARKS.md
    python benchmarks/lmeval_caching.py --quick    # a tiny trajectory, no tune run, prints only
    python benchmarks/lmeval_caching.py --mmlu FILE  # also MMLU-style data you have locally
                                                     # (see examples/tune_on_lmeval.py)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import headline, machine, write_section  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def per_trial_seconds(obj, model, trials: int):
    import torch

    times, scores = [], []
    for _ in range(trials):
        t = time.perf_counter()
        scores.append(obj.evaluate(model, torch.device("cpu"))["score"])
        times.append(time.perf_counter() - t)
    return times, scores


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "ckmerge-bench")
    p.add_argument("--mmlu", type=Path, default=None,
                   help="an MMLU-style .csv/.jsonl/.parquet file to time as well (never downloaded)")
    args = p.parse_args(argv)

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from ckmerge_ray.demo import TrajectoryConfig, make_lmeval_tasks, make_trajectory
    from ckmerge_ray.objectives import LmEvalObjective

    hf_logging.set_verbosity_error()
    if args.quick:
        cfg = TrajectoryConfig(steps=40, save_every=20, seq_len=64, vocab_size=512, hidden_size=48,
                               layers=2, train_bytes=300_000)
        # The same tiny trajectory as end_to_end.py --quick (made once for both with one --cache).
        work, trials, cases = args.cache / "e2e-quick", 3, [("mc", "acc", 16)]
    else:
        cfg, work, trials = TrajectoryConfig(), args.cache / "e2e-demo", 6
        cases = [("mc", "acc", 200), ("ppl", "word_perplexity", 10)]
    ckpts = sorted(work.glob("checkpoint-*"), key=lambda q: int(q.name.split("-")[1]))
    if len(ckpts) < 2:
        ckpts = make_trajectory(work, cfg, log=lambda m: print(m, file=sys.stderr))
    tasks = make_lmeval_tasks(work / "heldout.jsonl", work / "lmeval_tasks")
    if args.mmlu is None:
        print("MMLU-style case skipped: no --mmlu FILE given (real benchmark data is never "
              "downloaded)", file=sys.stderr)
    elif not args.mmlu.is_file():
        print(f"MMLU-style case skipped: {args.mmlu} does not exist", file=sys.stderr)
    else:
        import importlib.util

        spec = importlib.util.spec_from_file_location(
            "tune_on_lmeval", Path(__file__).resolve().parents[1] / "examples" / "tune_on_lmeval.py")
        example = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(example)
        example.write_mmlu_style_task(args.mmlu, tasks, name="local_mmlu")
        cases.append(("local_mmlu", "acc", 200))
    model = AutoModelForCausalLM.from_pretrained(ckpts[-1]).eval()

    lines = ["| task (documents) | uncached: first / median later trial (s) | cached: first / median later (s) | later-trial speed-up |",
             "|---|---|---|---|"]
    figures = {}
    for kind, metric, limit in cases:
        task = kind if kind == "local_mmlu" else f"ckmerge_stdlib_{kind}"
        row = {}
        for cached in (False, True):
            obj = LmEvalObjective([task], metrics=metric, include_path=tasks, limit=limit,
                                  batch_size=16, cache_requests=cached)
            obj.prepare(ckpts[-1])
            times, scores = per_trial_seconds(obj, model, trials)
            row[cached] = (times[0], statistics.median(times[1:]), scores)
        assert row[False][2] == row[True][2], "cached and uncached scores differ"
        speedup = row[False][1] / row[True][1]
        lines.append(f"| {task} ({limit}) | {row[False][0]:.2f} / {row[False][1]:.2f} | "
                     f"{row[True][0]:.2f} / {row[True][1]:.2f} | {speedup:.2f}× |")
        figures[f"speedup_{kind}"] = speedup
        figures[f"cached_s_{kind}"] = row[True][1]
        print(lines[-1], flush=True)

    share_line = ""
    if not args.quick:
        from ckmerge_ray import tune_merge

        result = tune_merge((ckpts[-2], ckpts[-1]), {"cpu": 1}, objective="lmeval:ckmerge_stdlib_mc",
                            objective_options={"include_path": str(tasks), "limit": 200,
                                               "batch_size": 16},
                            num_trials=6, max_concurrent=1, output_dir=work / "lmeval-run",
                            overwrite=True, export_best=False, progress=False)
        rows = [r for r in result.table.to_pylist() if r["status"] == "ok"]
        later = [r for r in rows if not r["model_built"]]
        share = sum(r["eval_s"] for r in later) / sum(r["duration_s"] for r in later)
        merge = sum(r["merge_s"] for r in later) / sum(r["duration_s"] for r in later)
        figures["eval_share"] = share
        share_line = (f"\n\nIn a real run (`tune_merge`, {len(rows)} trials of ckmerge_stdlib_mc on "
                      f"200 documents, 1 at a time, trials after the first on each worker): "
                      f"evaluation is **{share:.0%}** of a trial's wall time (Tune's "
                      f"`time_total_s`), merging {merge:.1%}, the rest is the trainable's own "
                      f"overhead (fetching the plan, reporting). Median eval "
                      f"{statistics.median(r['eval_s'] for r in later):.2f} s per trial.")
    table = "\n".join(lines)
    print(table + share_line)
    if not args.quick:
        write_section("lm-eval objective: request caching",
                      f"Command: `python benchmarks/lmeval_caching.py`. Machine: {machine()}. "
                      f"Model: the demo trajectory's last checkpoint; {trials} trials per setting "
                      "in one process, same documents (scores identical in both settings; checked). "
                      "Uncached = `simple_evaluate` per trial; cached = tasks loaded and requests "
                      "built once per worker (the default).\n\n" + table + share_line)
    print(headline(**figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
