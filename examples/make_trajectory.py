"""Pretrain a small Llama on the standard library's source and save a checkpoint trajectory.

    python examples/make_trajectory.py --out ckpts --steps 400 --save-every 100
    python examples/make_trajectory.py --out ckpts_bf16 --save-dtype bfloat16 --max-shard-size 2MB

Then tune any adjacent pair:

    ckmerge-ray tune ckpts/checkpoint-300 ckpts/checkpoint-400 --objective loss:ckpts/heldout.jsonl
"""

import argparse
import dataclasses

from ckmerge_ray.demo import TrajectoryConfig, make_trajectory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for checkpoint-<step>/ and heldout.jsonl")
    for f in dataclasses.fields(TrajectoryConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = type(f.default) if f.default is not None else str
        parser.add_argument(flag, type=kind, default=f.default, help=f"default {f.default}")
    args = vars(parser.parse_args())
    out = args.pop("out")
    paths = make_trajectory(out, TrajectoryConfig(**args))
    print("saved:", *[p.name for p in paths])


if __name__ == "__main__":
    main()
