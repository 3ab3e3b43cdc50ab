"""End to end: a 12-trial tune of the demo pair with 1 and 2 concurrent trials (issue 7, bench 4).

Each run starts its own local Ray (as a user's first `tune_merge` call does) and reports where
the wall time went: Ray start-up, reading checkpoints into the object store, merging and
evaluating (summed over trials, so with 2 concurrent trials they add up to more than their share
of the wall time), choosing points (the searcher), and the rest (Tune's trial scheduling, worker
start-up and model building, export of best/).

    python benchmarks/end_to_end.py            # demo trajectory (made once, ~2 min); writes BENCHMARKS.md
    python benchmarks/end_to_end.py --quick    # a tiny trajectory, 4 trials, prints only
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import headline, machine, write_section  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "ckmerge-bench")
    args = p.parse_args(argv)

    from ckmerge_ray import tune_merge
    from ckmerge_ray.demo import TrajectoryConfig, make_trajectory

    if args.quick:
        cfg = TrajectoryConfig(steps=40, save_every=20, seq_len=64, vocab_size=512, hidden_size=48,
                               layers=2, train_bytes=300_000)
        work, trials = args.cache / "e2e-quick", 4
    else:
        cfg, work, trials = TrajectoryConfig(), args.cache / "e2e-demo", 12
    ckpts = sorted(work.glob("checkpoint-*"), key=lambda q: int(q.name.split("-")[1]))
    if len(ckpts) < 2:
        ckpts = make_trajectory(work, cfg, log=lambda m: print(m, flush=True))
    pair = (ckpts[-2], ckpts[-1])
    rows = []
    for q in (1, 2):
        t = time.perf_counter()
        r = tune_merge(pair, {"cpu": 1}, objective=f"loss:{work / 'heldout.jsonl'}",
                       objective_options={"seq_len": cfg.seq_len, "max_tokens": 16384},
                       num_trials=trials, max_concurrent=q, output_dir=tempfile.mkdtemp(),
                       progress=False)
        wall = time.perf_counter() - t
        s = r.summary["seconds"]
        rows.append({"q": q, "wall": wall, **s, "trials": len(r.table)})
        print(rows[-1], flush=True)
    table = ["| concurrent | wall s | Ray start | load | search | merge (sum) | evaluate (sum) | rest | trials |",
             "|---|---|---|---|---|---|---|---|---|"]
    for x in rows:
        busy = x["merge_sum"] + x["eval_sum"]
        rest = x["wall"] - x["ray_start"] - x["load"] - x["search"] - busy / x["q"]
        table.append(f"| {x['q']} | {x['wall']:.1f} | {x['ray_start']:.1f} | {x['load']:.2f} | {x['search']:.2f} | "
                     f"{x['merge_sum']:.2f} | {x['eval_sum']:.1f} | {rest:.1f} | {x['trials']} |")
    body = (f"Command: `python benchmarks/end_to_end.py`. Machine: {machine()}. Pair: the demo "
            f"trajectory's last two checkpoints; objective: held-out loss, 16384 tokens; "
            f"{trials} trials in [0.5, 1] plus λ = 0. 'rest' = wall − Ray start − load − search − "
            "(merge + evaluate sums) / concurrency: Tune's scheduling, worker start-up (each new "
            "worker imports torch and transformers and builds the model once), export of best/.\n\n"
            + "\n".join(table))
    print(body)
    if not args.quick:
        write_section("End to end", body)
    # The table's parts per concurrency, so that tests can check relations among them.
    parts = {f"{k}_q{x['q']}": x[k] for x in rows for k in ("ray_start", "search", "merge_sum", "eval_sum")}
    print(headline(wall_q1=rows[0]["wall"], wall_q2=rows[1]["wall"], speedup_q2=rows[0]["wall"] / rows[1]["wall"],
                   **parts, trials_q1=rows[0]["trials"], trials_q2=rows[1]["trials"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
