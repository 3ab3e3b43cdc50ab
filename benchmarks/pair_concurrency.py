"""Pairs tuned at once (issue 19): a sweep's wall time at P = 1, 2 and 4 pairs at a time on a
simulated two-node cluster, and a watch's latency from "checkpoint complete" to "its pair's
merged model published".

Both run in one process on one `ray.cluster_utils.Cluster`: head + 1 worker node, 2 CPUs each,
1 CPU per trial, so 4 trial slots and P = 4 pairs of one trial each all fit at once (what
`pairs.pair_concurrency` chooses by default for 4 slots and 4 pairs). Both nodes are on this
machine's cores, so P measures how much of each pair's fixed cost (Tune's start-up, storing,
trial-worker start-up, GP steps, results) overlaps with other pairs' work, not more hardware.

1. Sweep. 5 checkpoints of the demo model (4 adjacent pairs) are swept with the same budget per
   pair (`num_trials`, one trial at a time per pair, seed = round) at every P, in rounds whose
   order alternates (1, 2, 4 then 4, 2, 1). Reported: the sweep's wall time (summary `seconds`)
   and the whole call's, the ratio to P = 1, the sum of the pairs' own wall times over the
   sweep's (pairs in flight on average), and the bytes the worker node's object store created
   during the sweep (Ray's per-node store statistics, as in cluster_throughput.py) over the
   checkpoints' bytes: no checkpoint crossing to the worker more than once keeps it ≤ 1 plus the
   pairs' plans. Each pair's best λ at every P is compared with P = 1's.

2. Watch. A writer thread copies the checkpoints one at a time (file by file, `--gap` seconds
   apart) into a folder that `watch_trajectory` follows (no marker: complete = files whole and
   unchanged between two polls), at P = 1 and 2. Per pair: the watch's own split
   (summary.json["latency"]: detect, store, tune_merge total and its Tune fit, publish, first
   seen whole -> published) and, measured here, the writer's last byte -> published.

    python benchmarks/pair_concurrency.py            # demo model, 5 checkpoints (made once); writes BENCHMARKS.md
    python benchmarks/pair_concurrency.py --quick    # tiny model, 3 checkpoints, P = 1, 2, watch at P = 2; prints only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster_throughput import objective_bytes  # noqa: E402
from common import headline, machine, write_section  # noqa: E402

NODE_CPUS = 2  # per node; 1 CPU per trial: 2 nodes x 2 = 4 trial slots


def trajectory(args):
    """The demo model's checkpoints, made once in the cache: 5 (4 adjacent pairs); --quick: a
    tiny model's 3 (2 pairs)."""
    from ckmerge_ray.demo import TrajectoryConfig, make_trajectory

    if args.quick:
        cfg = TrajectoryConfig(steps=60, save_every=20, seq_len=64, vocab_size=512, hidden_size=48,
                               layers=2, train_bytes=300_000)
        work = args.cache / "pairs-quick"
    else:  # the demo trajectory's model and training (400 steps), saved every 80 steps
        cfg, work = TrajectoryConfig(save_every=80), args.cache / "pairs-demo"
    ckpts = sorted(work.glob("checkpoint-*"), key=lambda q: int(q.name.split("-")[1]))
    want = 3 if args.quick else 5
    if len(ckpts) < want or not (work / "heldout.jsonl").exists():
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # 2 threads on 2 shared, loaded cores ran ~20x slower
        try:
            ckpts = make_trajectory(work, cfg, log=lambda m: print(m, flush=True))
        finally:
            torch.set_num_threads(threads)
    assert len(ckpts) >= want, ckpts
    return cfg, ckpts[:want], work / "heldout.jsonl"


def tensor_bytes(ckpt: Path) -> int:
    return sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))


def created_bytes() -> dict:
    """Per alive node: bytes its object store has created so far (puts and received copies)."""
    import ray
    from ray._private import internal_api

    return {
        n["NodeID"]: internal_api.node_stats(n["NodeManagerAddress"], n["NodeManagerPort"],
                                             include_memory_info=False).store_stats.cumulative_created_bytes
        for n in ray.nodes() if n["Alive"]
    }


def objective_options(cfg) -> dict:
    return {"seq_len": cfg.seq_len, "max_tokens": 16384}


def sweep(ckpts, heldout, cfg, pairs_at_once, trials, seed) -> dict:
    import ray

    from ckmerge_ray import sweep_trajectory

    me = ray.get_runtime_context().get_node_id()
    before = created_bytes()
    out = Path(tempfile.mkdtemp(prefix=f"pairs-p{pairs_at_once}-"))
    t = time.perf_counter()
    r = sweep_trajectory([str(c) for c in ckpts], {"cpu": 1}, objective=f"loss:{heldout}",
                         objective_options=objective_options(cfg), num_trials=trials,
                         max_concurrent=1, max_concurrent_pairs=pairs_at_once, seed=seed,
                         output_dir=str(out / "sweep"), progress=False)
    wall = time.perf_counter() - t
    after = created_bytes()
    rows = r.table.to_pylist()
    tune = [json.loads((out / "sweep" / x["run_dir"] / "summary.json").read_text())["seconds"]
            for x in rows if x["status"] == "ok"]
    received = {n: after[n] - before.get(n, 0) for n in after if n != me}
    res = {
        "P": pairs_at_once, "ok": sum(x["status"] == "ok" for x in rows), "pairs": len(rows),
        "pairs_at_once": r.summary["pairs_at_once"],
        "trials_at_once": r.summary["trials_at_once_per_pair"],
        "sweep_s": r.summary["seconds"], "call_s": wall,
        "pair_wall_sum": sum(x["wall_s"] for x in rows),
        "pair_tune_sum": sum(s["tune"] for s in tune),
        "lambdas": [x.get("best_lambda") for x in rows], "scores": [x.get("best_score") for x in rows],
        "evaluations": [x.get("evaluations") for x in rows],
        "puts": r.summary["object_store"]["puts_per_checkpoint"],
        "received": sum(received.values()),
    }
    shutil.rmtree(out, ignore_errors=True)
    return res


def on_cluster(fn):
    """fn() with the driver connected to a fresh two-node `Cluster` (head + 1 worker node,
    NODE_CPUS each)."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": NODE_CPUS, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=NODE_CPUS)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="WARNING")
        return fn()
    finally:
        ray.shutdown()
        cluster.shutdown()


def run_sweeps(ckpts, heldout, cfg, trials, rounds, pvals) -> dict:
    """Every P once per round, in the order of pvals, reversed every other round."""
    results = {p: [] for p in pvals}
    for i in range(rounds):
        for p in (pvals if i % 2 == 0 else pvals[::-1]):
            results[p].append(sweep(ckpts, heldout, cfg, p, trials, seed=i))
            print(f"sweep round {i} P={p}", results[p][-1], f"load {os.getloadavg()[0]:.1f}",
                  flush=True)
    return results


def writer(ckpts, dest: Path, gap: float, done: dict, stop: threading.Event) -> None:
    """Copy each checkpoint into dest/ file by file (config first, then the weights, then the
    rest), `gap` seconds apart; done[name] = time of its last byte."""
    for src in ckpts:
        if stop.wait(gap):
            return
        d = dest / src.name
        d.mkdir()
        first = [f for f in ("config.json", "generation_config.json", "model.safetensors")
                 if (src / f).exists()]
        for name in first + sorted(p.name for p in src.iterdir() if p.name not in first):
            shutil.copyfile(src / name, d / name)
            time.sleep(0.05)
        done[src.name] = time.time()


def watch(ckpts, heldout, cfg, pairs_at_once, trials, gap, poll) -> dict:
    from ckmerge_ray import watch_trajectory

    root = Path(tempfile.mkdtemp(prefix=f"watch-p{pairs_at_once}-"))
    (root / "run").mkdir()
    done, stop = {}, threading.Event()
    w = threading.Thread(target=writer, args=(ckpts, root / "run", gap, done, stop), daemon=True)
    t = time.perf_counter()
    w.start()
    try:
        r = watch_trajectory(str(root / "run"), {"cpu": 1}, f"loss:{heldout}",
                             objective_options=objective_options(cfg), num_trials=trials,
                             max_concurrent=1, max_concurrent_pairs=pairs_at_once,
                             output_dir=str(root / "watch"), poll_seconds=poll,
                             max_pairs=len(ckpts) - 1, idle_timeout=120, progress=False)
    finally:
        stop.set()
        w.join()
    wall = time.perf_counter() - t
    rows = r.table.to_pylist()
    lat = sorted(r.summary["latency"], key=lambda x: x["pair"])
    for x in lat:
        x["written_to_published_s"] = x["published_at"] - done[x["later"]]
        # waiting for room in the pool, scheduling, recording: what the parts leave
        x["other_s"] = x["complete_to_published_s"] - x["detect_s"] - x["store_s"] \
            - x["tune_merge_total_s"] - x["publish_s"]
    res = {"P": pairs_at_once, "ok": sum(x["status"] == "ok" for x in rows), "pairs": len(rows),
           "wall": wall, "latency": lat, "lambdas": [x.get("best_lambda") for x in rows],
           "latest": r.latest is not None}
    shutil.rmtree(root, ignore_errors=True)
    return res


def run_watches(ckpts, heldout, cfg, trials, gap, poll, watch_p) -> dict:
    out = {}
    for p in watch_p:
        out[p] = watch(ckpts, heldout, cfg, p, trials, gap, poll)
        print(f"watch P={p}", out[p], f"load {os.getloadavg()[0]:.1f}", flush=True)
    return out


def per(rs, f, fmt) -> str:
    """One figure per round, "a / b"."""
    return " / ".join(format(f(x), fmt) for x in rs)


def watch_verdict(lat_med: dict, gap: float) -> str:
    """What the medians say, in words."""
    parts = [f"P={pv}: {m['written_to_published_s']:.1f} s from the writer's last byte to "
             f"published, of which tune_merge {m['tune_merge_total_s']:.1f} s"
             for pv, m in lat_med.items()]
    out = "Median latency: " + "; ".join(parts) + "."
    if 1 in lat_med and 2 in lat_med:
        one, two = lat_med[1], lat_med[2]
        queue = one["tune_merge_total_s"] > gap
        out += (f" Checkpoints came {gap:g} s apart and a pair took "
                + ("longer than that at P = 1, so pairs queued there; " if queue else
                   "less than that at P = 1; ")
                + "at P = 2 each pair's tune_merge took "
                f"{two['tune_merge_total_s'] / one['tune_merge_total_s']:.2f}x as long as at "
                "P = 1 (two pairs on the same shared cores), and the median latency was "
                f"{two['written_to_published_s'] / one['written_to_published_s']:.2f}x P = 1's.")
    return out


LAT_KEYS = ("detect_s", "store_s", "tune_s", "tune_merge_total_s", "publish_s", "other_s",
            "complete_to_published_s", "written_to_published_s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=None,
                   help="sweep rounds over P, order alternating (default 2; 1 with --quick)")
    p.add_argument("--trials", type=int, default=None,
                   help="num_trials per pair (default 4; 2 with --quick)")
    p.add_argument("--gap", type=float, default=None,
                   help="seconds between the writer's checkpoints (default 10; 1 with --quick)")
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "ckmerge-bench")
    args = p.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 2)
    trials = args.trials or (2 if args.quick else 4)
    gap = args.gap if args.gap is not None else (1.0 if args.quick else 10.0)
    poll = 1.0
    pvals = (1, 2) if args.quick else (1, 2, 4)
    watch_p = (2,) if args.quick else (1, 2)

    os.environ.pop("RAY_ADDRESS", None)  # every run here starts its own Ray
    cfg, ckpts, heldout = trajectory(args)
    n = len(ckpts) - 1  # pairs
    ckpt_bytes = sum(tensor_bytes(c) for c in ckpts)
    load0, t0 = os.getloadavg(), time.perf_counter()
    loads = {}

    def everything():
        sweeps = run_sweeps(ckpts, heldout, cfg, trials, rounds, pvals)
        loads["sweeps"] = os.getloadavg()
        return sweeps, run_watches(ckpts, heldout, cfg, trials, gap, poll, watch_p)

    sweeps, watches = on_cluster(everything)
    plan = objective_bytes(ckpts[-2:], heldout, cfg)  # each pair's plan carries the objective
    bound = (ckpt_bytes + n * plan) / ckpt_bytes
    load2, total = os.getloadavg(), time.perf_counter() - t0

    base = statistics.median(x["sweep_s"] for x in sweeps[1])
    table = ["| P (pairs at once) | trials at once per pair | sweep wall s (per round) | median | vs P=1 "
             "| whole call s (per round) "
             f"| Σ pair wall ÷ sweep wall | worker-node store created ÷ {len(ckpts)} checkpoints "
             "| best λ as P=1's (same round) |",
             "|---|---|---|---|---|---|---|---|---|"]
    med, drift, failed = {}, {}, 0
    for pv, rs in sweeps.items():
        med[pv] = statistics.median(x["sweep_s"] for x in rs)
        drift[pv] = max((abs(a - b) for x, ref in zip(rs, sweeps[1])
                         for a, b in zip(x["lambdas"], ref["lambdas"])
                         if a is not None and b is not None), default=float("nan"))
        bad = sum(x["pairs"] - x["ok"] + n - x["pairs"] for x in rs)
        failed += bad
        table.append(
            f"| {pv} | {rs[0]['trials_at_once']} | {per(rs, lambda x: x['sweep_s'], '.1f')} | "
            f"{med[pv]:.1f} | {med[pv] / base:.2f} | {per(rs, lambda x: x['call_s'], '.1f')} | "
            f"{per(rs, lambda x: x['pair_wall_sum'] / x['sweep_s'], '.2f')} | "
            f"{per(rs, lambda x: x['received'] / ckpt_bytes, '.3f')} | "
            f"{'yes' if drift[pv] < 1e-6 else f'no: max |Δλ| {drift[pv]:.3g}'}"
            f"{f' ({bad} pair(s) failed!)' if bad else ''} |")
    puts = sorted({v for rs in sweeps.values() for x in rs for v in x["puts"].values()})

    lat_table = ["| watch P | pair | later checkpoint | detect s | store s | tune_merge s (Tune fit) | "
                 "publish s | other s | first whole → published s | writer's last byte → published s |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
    lat_med = {}
    for pv, w in watches.items():
        failed += w["pairs"] - w["ok"] + n - w["pairs"]
        for x in w["latency"]:
            lat_table.append(
                f"| {pv} | {x['pair']} | {x['later']} | {x['detect_s']:.2f} | {x['store_s']:.2f} | "
                f"{x['tune_merge_total_s']:.1f} ({x['tune_s']:.1f}) | {x['publish_s']:.2f} | "
                f"{x['other_s']:.2f} | {x['complete_to_published_s']:.1f} | "
                f"{x['written_to_published_s']:.1f} |")
        lat_med[pv] = m = {k: statistics.median(x[k] for x in w["latency"]) for k in LAT_KEYS}
        lat_table.append(
            f"| {pv} | **median** | | {m['detect_s']:.2f} | {m['store_s']:.2f} | "
            f"{m['tune_merge_total_s']:.1f} ({m['tune_s']:.1f}) | {m['publish_s']:.2f} | "
            f"{m['other_s']:.2f} | {m['complete_to_published_s']:.1f} | "
            f"{m['written_to_published_s']:.1f} |")

    command = "python benchmarks/pair_concurrency.py" + (" --quick" if args.quick else "")
    for k, v in (("rounds", args.rounds), ("trials", args.trials), ("gap", args.gap)):
        command += f" --{k} {v:g}" if v is not None else ""
    speed = {pv: base / med[pv] for pv in pvals if pv > 1}
    verdict = ("P > 1 was faster here: " if all(v > 1 for v in speed.values()) else
               "P > 1 was NOT faster everywhere here: ") + ", ".join(
        f"P={pv} took {1 / v:.2f}x P=1's wall time ({v:.2f}x as fast)" for pv, v in speed.items())
    body = (
        f"Command: `{command}` ({rounds} sweep round(s), P in the order "
        f"{', '.join(map(str, pvals))}" + (f" then {', '.join(map(str, pvals[::-1]))}" if rounds > 1
                                           else "")
        + f", medians over rounds; then the watch; {total / 60:.1f} min in all). "
        f"Machine: {machine()}; load average {load0[0]:.1f} before, {loads['sweeps'][0]:.1f} after "
        f"the sweeps, {load2[0]:.1f} after the watch: other jobs shared these cores, so compare "
        "figures measured in this one run, not absolute times.\n\n"
        f"Trajectory: {len(ckpts)} checkpoints (steps "
        f"{', '.join(c.name.split('-')[1] for c in ckpts)}) of the demo model "
        f"({'--quick sizes' if args.quick else 'TrajectoryConfig(save_every=80): the demo run saved every 80 steps'}"
        f"), {ckpt_bytes / len(ckpts) / 2**20:.2f} MiB of tensors each, all trained by "
        "`ckmerge_ray.demo.make_trajectory` (none extrapolated); objective: held-out loss, 16384 "
        f"tokens. Every pair: num_trials {trials}, one trial at a time (max_concurrent=1), 1 CPU "
        "per trial, seed = round, so only P changes between the runs of a round.\n\n"
        f"Cluster: `ray.cluster_utils.Cluster`, head + 1 worker node, num_cpus={NODE_CPUS} each: "
        f"4 trial slots at 1 CPU per trial, so P = 4 pairs of one trial each all run at once (what "
        "`pairs.pair_concurrency` picks by default for 4 slots and 4 pairs); the driver is on the "
        f"head. **Both nodes share this machine's {os.cpu_count()} cores**: the 4 slots oversubscribe "
        "them 2x, so P measures how far pairs overlap one another's fixed costs (Tune start-up, "
        "storing, trial-worker start-up and model build, GP steps, writing results), not more "
        "hardware; on a real cluster each slot brings its own cores.\n\n"
        f"**Sweep** (`sweep_trajectory(..., max_concurrent_pairs=P)`, {n} pairs). Sweep wall = the "
        "sweep's summary `seconds` (storing, every pair, plots; Ray already up); whole call = the "
        "`sweep_trajectory` call, which adds the checks made before anything is stored (reading "
        "the checkpoints' headers, tokenizing the held-out text). Σ pair wall ÷ "
        "sweep wall = pairs in flight on average. Worker-node store created = growth of the worker "
        "node's cumulative created bytes during the sweep (Ray's per-node store statistics, as in "
        f"cluster_throughput.py), over the {len(ckpts)} checkpoints' {ckpt_bytes / 2**20:.2f} MiB "
        "of tensors. It also counts each pair's plan (one object per pair, pulled once per node; it "
        f"carries the tokenized held-out data, {plan / 2**20:.3f} MiB) and Tune's small objects, so "
        f"every checkpoint crossing once and every plan once gives at most {bound:.3f}; one "
        f"checkpoint crossing twice would add {1 / len(ckpts):.2f} (k/{len(ckpts)} ≈ k checkpoints' "
        "worth: fewer than all when no trial of a pair ran on the worker). Puts per checkpoint "
        f"in every sweep: {puts}.\n\n"
        + "\n".join(table)
        + f"\n\n{verdict} (median sweep wall {base:.1f} s at P=1). "
        + ("Every pair's best λ at every P matched P=1's in the same round (same seed, one trial "
           "at a time per pair; best λs " + "; ".join(
               f"round {i}: " + ", ".join(f"{v:.4f}" for v in x["lambdas"])
               for i, x in enumerate(sweeps[1])) + "), so pairs tuned together did not disturb "
           "each other's search."
           if all(d < 1e-6 for d in drift.values()) else
           "Some pairs' best λ differ from P=1's although seed and per-pair concurrency are the "
           "same: see the table.")
        + (f" {failed} pair(s) failed (see the log)." if failed else "")
        + "\n\n"
        f"**Watch latency** (`watch_trajectory(..., max_concurrent_pairs=P)`, P = "
        f"{', '.join(map(str, watch_p))}) on the same cluster: a writer thread copies the "
        f"{len(ckpts)} checkpoints one at a time ({gap:g} s apart, file by file) into the watched "
        f"folder; the watch polls every {poll:g} s with no marker (complete = files whole and "
        "unchanged between two polls, so detect ≈ one poll) and stops after "
        f"{n} pairs. Columns from summary.json[\"latency\"]: detect (first seen whole → declared "
        "complete), store (both checkpoints validated, the new one put into the object store), "
        "tune_merge total (in parentheses its Tune fit: the search), publish (latest/ and "
        "best_overall/ replaced), other = first whole → published − those (waiting for a free "
        "pair slot, results, plots); the last column is measured here from the writer's last byte "
        "of the pair's later checkpoint. With P = 1 the watch tunes each pair in its main thread "
        "and does not poll meanwhile, so a checkpoint written while a pair is tuned is first seen "
        "whole only after that pair: the watch's own figures (from first whole) leave out that "
        "wait, which only the last column shows; with P > 1 it polls on while pairs run.\n\n"
        + "\n".join(lat_table) + "\n\n" + watch_verdict(lat_med, gap)
    )
    print(body)
    if not args.quick:
        write_section("Pair concurrency", body)
    print(headline(sweep_s_p1=base, **{f"ratio_p{pv}": med[pv] / base for pv in pvals if pv > 1},
                   copies_max=max(x["received"] / ckpt_bytes for rs in sweeps.values() for x in rs),
                   copies_bound=bound,
                   lambda_drift_max=max(drift.values()), failed=failed,
                   **{f"latency_med_p{pv}": m["written_to_published_s"] for pv, m in lat_med.items()},
                   **{f"tune_med_p{pv}": m["tune_merge_total_s"] for pv, m in lat_med.items()},
                   load=load2[0], total_s=total))
    return 0


if __name__ == "__main__":
    sys.exit(main())
