"""How a run ends when SIGTERM reaches its whole process group (Slurm's scancel, systemd's stop).

A `ckmerge-ray tune` with its own local Ray is started in a session of its own; once `--after`
trials are in trials.parquet the whole group gets SIGTERM, and this measures the seconds to the
driver's exit, its exit code, whether run.json notes the interruption, and whether any process of
the group outlived it. `--checkout DIR` runs another checkout of ckmerge-ray (say an older commit,
`git worktree add DIR <commit>`) in place of this one, for a before/after comparison.

    python benchmarks/group_sigterm.py                       # this checkout; writes BENCHMARKS.md
    python benchmarks/group_sigterm.py --checkout /tmp/old   # another one; prints only
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, headline, machine, write_section


def measure(ckpts, heldout: Path, out: Path, checkout: Path, after: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray
    env["PYTHONPATH"] = str(checkout)
    cmd = [sys.executable, "-m", "ckmerge_ray.cli", "tune", str(ckpts[-2]), str(ckpts[-1]),
           "--objective", f"loss:{heldout}", "--seq-len", "64", "--max-tokens", "4096",
           "--trials", "20", "--max-concurrent", "1", "--output", str(out)]
    proc = subprocess.Popen(cmd, env=env, cwd=checkout,  # `-m` puts the cwd first on sys.path
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    sys.path.insert(0, str(ROOT))
    from ckmerge_ray.results import read_rows

    while len(read_rows(out / "trials.parquet")) < after:
        if proc.poll() is not None:
            raise SystemExit(f"the run ended before the signal:\n{proc.stdout.read()}")
        time.sleep(0.1)
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGTERM)
    log, _ = proc.communicate(timeout=300)
    seconds = time.monotonic() - t0
    time.sleep(2.0)
    survivors = subprocess.run(["ps", "-o", "pid=,comm=", "-g", str(proc.pid)],
                               capture_output=True, text=True).stdout.split()
    if survivors:
        os.killpg(proc.pid, signal.SIGKILL)
    noted = "interrupted" in json.loads((out / "run.json").read_text())
    return {"exit": proc.returncode, "seconds": seconds, "noted": noted,
            "survivors": " ".join(survivors[1::2]) or "none",
            "log": [line for line in log.splitlines() if "ckmerge-ray:" in line]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkout", type=Path, default=ROOT, help="the ckmerge-ray checkout to run")
    p.add_argument("--after", type=int, default=2, help="trials recorded before the signal")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from ckmerge_ray.demo import TrajectoryConfig, make_trajectory

    with tempfile.TemporaryDirectory(prefix="ckmerge-sigterm-") as tmp:
        cfg = TrajectoryConfig(steps=40, save_every=20, seq_len=64, vocab_size=512,
                               hidden_size=48, layers=2, train_bytes=300_000)
        ckpts = make_trajectory(Path(tmp) / "traj", cfg, log=lambda m: None)
        r = measure(ckpts, Path(tmp) / "traj" / "heldout.jsonl", Path(tmp) / "run",
                    args.checkout.resolve(), args.after)
    print("\n".join(r["log"]))
    print(headline(exit=r["exit"], seconds=r["seconds"], noted=r["noted"],
                   survivors=r["survivors"]))
    if args.checkout.resolve() == ROOT:
        write_section("SIGTERM to the whole process group", f"""
`python benchmarks/group_sigterm.py` on {machine()}: `ckmerge-ray tune` with its own local Ray
(a 2-layer Llama pair, 20 trials, one at a time), SIGTERM to its whole process group once
{args.after} trials are recorded, as Slurm's `scancel` or systemd's stop send it.

| checkout | exit code | seconds to exit | run.json notes the interruption | processes that outlived it |
| --- | ---: | ---: | --- | --- |
| this one | {r['exit']} | {r['seconds']:.1f} | {r['noted']} | {r['survivors']} |

Before the watchdog (`interrupts.watch_local_ray`), the same command on commit d056272
(`--checkout` of a worktree there), same machine, same day: exit code 1 after 60.4 s (Ray's
driver waits 60 s for its lost GCS, then exits), and run.json noted nothing. The ~10 s that
remain are Ray's own: its GCS and raylet take that long to stop after their SIGTERM, and the
driver exits as soon as they are gone (it cannot save Tune's experiment without them; the
resume starts from the journal and Tune's last snapshot).
""")


if __name__ == "__main__":
    main()
