"""Trial throughput on one node (1 and 2 concurrent trials) and on a simulated two-node cluster
(one trial per node), and the bytes the object store moves between nodes per checkpoint.

All three runs tune the same pair with the same trials, one after another in one process on
the same machine, so their ratios are comparable even when other work shares the CPUs (the
absolute trials/s are not: they depend on that load, which is printed with the table). The
two-node cluster is `ray.cluster_utils.Cluster`: two raylets, two object stores, real object
transfers between them, but on the same cores, so it measures the cost of going multi-node
(worker start-up, pulls), not the gain from more hardware.

Throughput = trials / the Tune experiment's wall time (worker start-up, model builds, merges,
evaluations, scheduling; Ray start-up and checkpoint loading excluded). Bytes between nodes =
growth of the worker node's object store's cumulative created bytes during the run (Ray's
per-node store statistics: the shards it pulled, plus the run's plan and Tune's small objects),
divided by the two checkpoints: an upper bound on the copies of each checkpoint that crossed.

    python benchmarks/cluster_throughput.py            # demo trajectory (made once); writes BENCHMARKS.md
    python benchmarks/cluster_throughput.py --quick    # tiny trajectory, 4 trials, two nodes only;
                                                       # prints the bytes between nodes
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import headline, machine, write_section  # noqa: E402


NOTE = (" On 2 cores, concurrency cannot pay off: a second trial process costs its own start-up "
        "and model build and then contends for the same cores (see the evaluate sums); on a real "
        "cluster the second node brings its own cores and GPUs, and what stays is the pull of "
        "each checkpoint once per node.")


def created_bytes() -> dict:
    """Per alive node: bytes its object store has created so far (puts and received copies)."""
    import ray
    from ray._private import internal_api

    return {
        n["NodeID"]: internal_api.node_stats(n["NodeManagerAddress"], n["NodeManagerPort"],
                                             include_memory_info=False).store_stats.cumulative_created_bytes
        for n in ray.nodes() if n["Alive"]
    }


def objective_bytes(pair, heldout, cfg) -> int:
    """Serialized size of the prepared objective (the tokenized held-out windows): it travels in
    the run's plan, one object that each node pulls once, besides the checkpoint shards."""
    import ray

    from ckmerge_ray.objectives import parse_objective

    obj = parse_objective(f"loss:{heldout}", seq_len=cfg.seq_len, max_tokens=16384)
    obj.prepare(pair[1])
    return len(ray.cloudpickle.dumps(obj))


def run(pair, heldout, cfg, trials, q, seed=0) -> dict:
    import ray

    from ckmerge_ray import tune_merge

    me = ray.get_runtime_context().get_node_id()
    before = created_bytes()
    r = tune_merge(pair, {"cpu": 1}, objective=f"loss:{heldout}",
                   objective_options={"seq_len": cfg.seq_len, "max_tokens": 16384},
                   num_trials=trials, max_concurrent=q, output_dir=tempfile.mkdtemp(),
                   seed=seed, export_best=False, progress=False)
    after = created_bytes()
    rows = r.table.to_pylist()
    nodes = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
    return {
        "trials": len(rows), "ok": sum(x["status"] == "ok" for x in rows),
        "tune_s": r.summary["seconds"]["tune"], "tput": len(rows) / r.summary["seconds"]["tune"],
        "workers": len({x["worker"] for x in rows}),
        "eval_sum": r.summary["seconds"]["eval_sum"],
        "bytes_per_checkpoint": r.summary["object_store"]["bytes_per_checkpoint"],
        "shards": r.summary["object_store"]["shards_per_checkpoint"],
        # bytes each node other than the driver's received during the run
        "received": {n: after[n] - before.get(n, 0) for n in after if n != me and n in nodes},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=None,
                   help="rounds of the three runs, interleaved (default 2; 1 with --quick)")
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "ckmerge-bench")
    args = p.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 2)

    import ray
    from ray.cluster_utils import Cluster

    from ckmerge_ray.demo import TrajectoryConfig, make_trajectory

    os.environ.pop("RAY_ADDRESS", None)  # every run here starts its own Ray
    if args.quick:
        cfg = TrajectoryConfig(steps=40, save_every=20, seq_len=64, vocab_size=512, hidden_size=48,
                               layers=2, train_bytes=300_000)
        work, trials = args.cache / "e2e-quick", 4  # the same as end_to_end.py --quick
    else:  # the demo trajectory, shared with end_to_end.py
        cfg, work, trials = TrajectoryConfig(), args.cache / "e2e-demo", 12
    ckpts = sorted(work.glob("checkpoint-*"), key=lambda q: int(q.name.split("-")[1]))
    if len(ckpts) < 2:
        ckpts = make_trajectory(work, cfg, log=lambda m: print(m, flush=True))
    pair, heldout = (ckpts[-2], ckpts[-1]), work / "heldout.jsonl"
    load_before = os.getloadavg()

    names = ("1 node, 1 concurrent", "1 node, 2 concurrent", "2 nodes, 1 trial each")
    results = {name: [] for name in names}
    for i in range(rounds):
        if not args.quick:  # --quick (the test suite) checks what crosses between nodes only
            ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
            try:
                for q, name in ((1, names[0]), (2, names[1])):
                    results[name].append(run(pair, heldout, cfg, trials, q, seed=i))
                    print(name, results[name][-1], flush=True)
            finally:
                ray.shutdown()
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        try:
            cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, logging_level="WARNING")
            results[names[2]].append(run(pair, heldout, cfg, trials, 2, seed=i))
            print(names[2], results[names[2]][-1], flush=True)
        finally:
            ray.shutdown()
            cluster.shutdown()
    load_after = os.getloadavg()
    two = results[names[2]]
    received = [list(x["received"].values())[0] for x in two]
    per_ckpt = two[0]["bytes_per_checkpoint"]
    copies = [b / (2 * per_ckpt) for b in received]
    if args.quick:
        print(headline(copies_per_ckpt_max=max(copies),
                       received_bytes_per_ckpt=int(statistics.median(received)) // 2))
        return 0
    obj_bytes = objective_bytes(pair, heldout, cfg)

    med = {name: statistics.median(x["tput"] for x in rs) for name, rs in results.items()}
    base = med[names[0]]
    # Bytes the worker node's store took in per run (`received`, above), against the pair:
    # everything counted as if it were shards gives an upper bound on the copies of each
    # checkpoint that crossed over.
    table = ["| setup | trials | trial processes | Tune wall s | trials/s (median) | vs 1 node, 1 concurrent | evaluate (sum) s |",
             "|---|---|---|---|---|---|---|"]
    for name, rs in results.items():
        walls = " / ".join(f"{x['tune_s']:.1f}" for x in rs)
        table.append(f"| {name} | {rs[0]['trials']} | {rs[0]['workers']} | {walls} | {med[name]:.3f} | "
                     f"{med[name] / base:.2f} | {statistics.median(x['eval_sum'] for x in rs):.1f} |")
    moved = (
        "\n\nBetween nodes (two-node runs): the worker node's object store took in "
        + " / ".join(f"{b / 2**20:.3f} MiB" for b in received)
        + f" per run, against a pair of 2 × {per_ckpt / 2**20:.3f} MiB ({two[0]['shards']} shard(s) per "
        "checkpoint): at most " + " / ".join(f"{c:.3f}" for c in copies)
        + " copies of each checkpoint, so each crossed once (a second pull of a checkpoint would "
        "make it ≥ 1.5). The rest is the run's plan (one object in the driver's store, pulled once "
        f"per node; it carries the objective's tokenized held-out data, {obj_bytes / 2**20:.3f} "
        "MiB) and Tune's small objects."
        + NOTE
    )
    body = (
        f"Command: `python benchmarks/cluster_throughput.py` ({rounds} rounds; each round runs the "
        f"three setups one after another; medians over rounds, Tune wall times per round). "
        f"Machine: {machine()}; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after: "
        "other jobs shared these 2 cores, so compare the ratios, measured in one run, not the "
        "absolute rates. Pair: the demo trajectory's last two checkpoints; objective: held-out "
        f"loss, 16384 tokens; {trials} trials in [0.5, 1] plus λ = 0, 1 CPU per trial. The two-node "
        "cluster is `ray.cluster_utils.Cluster` on this machine (two raylets and object stores, "
        "1 CPU each, the driver on the head): real transfers between object stores, no extra "
        "hardware, so it shows the cost of going multi-node, not a speed-up. Throughput = trials / "
        "Tune's wall time (worker start-up and model builds included; Ray start-up and loading "
        "excluded). Bytes between nodes = growth of the worker node's object-store cumulative "
        "created bytes during the run (Ray's per-node store statistics).\n\n" + "\n".join(table) + moved
    )
    print(body)
    if not args.quick:
        write_section("Cluster throughput", body)
    print(headline(tput_q1=base, ratio_q2=med[names[1]] / base, ratio_2node=med[names[2]] / base,
                   ratio_2node_vs_q2=med[names[2]] / med[names[1]],
                   copies_per_ckpt_max=statistics.median(copies),
                   received_bytes_per_ckpt=int(statistics.median(received)) // 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
