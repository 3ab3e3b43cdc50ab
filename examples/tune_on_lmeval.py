"""Tune a checkpoint pair on lm-eval tasks: a local multiple-choice task, or MMLU-style data.

Local task (default): makes the demo trajectory if DIR has none, writes two lm-eval tasks built
from its held-out text (multiple choice and rolling perplexity; see `make_lmeval_tasks`), and
tunes the last pair on the multiple-choice one with the noise-aware GP:

    python examples/tune_on_lmeval.py --trajectory ckmerge_demo

MMLU-style data given by path (no download): a .csv in the original MMLU release's layout
(question,A,B,C,D,answer; no header), or a .jsonl/.parquet with `question`, `choices` (a list)
and `answer` (index or letter), as in the Hugging Face `cais/mmlu` files:

    python examples/tune_on_lmeval.py --trajectory ckpts --mmlu path/to/abstract_algebra_test.csv \\
        --limit 200 --screen-limit 50

`--screen-limit N` turns on multi-fidelity screening: every λ is scored on N questions first and
only competitive ones on all `--limit` questions.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

MMLU_TEMPLATE = (
    '"{{question.strip()}}\\nA. {{choices[0]}}\\nB. {{choices[1]}}\\nC. {{choices[2]}}\\n'
    'D. {{choices[3]}}\\nAnswer:"'
)


def write_mmlu_style_task(data: Path, out_dir: Path, name: str = "local_mmlu") -> str:
    """Write an lm-eval task YAML (MMLU's prompt and scoring) for a local MMLU-style file."""
    data = Path(data).resolve()
    if not data.is_file():
        raise SystemExit(f"no such file: {data}")
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = data.suffix.lower()
    if suffix == ".csv":  # original release: question,A,B,C,D,answer (letter), no header
        source = ("dataset_path: csv\ndataset_kwargs:\n  data_files:\n"
                  f"    test: {data}\n  column_names: [question, A, B, C, D, answer]\n")
        choices, target = "[A, B, C, D]", "{{['A', 'B', 'C', 'D'].index(answer)}}"
        text = MMLU_TEMPLATE.replace("choices[0]", "A").replace("choices[1]", "B") \
                            .replace("choices[2]", "C").replace("choices[3]", "D")
    elif suffix in (".jsonl", ".json", ".parquet"):
        kind = "parquet" if suffix == ".parquet" else "json"
        source = f"dataset_path: {kind}\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        choices = "[A, B, C, D]"
        target = "{{answer if answer is number else ['A', 'B', 'C', 'D'].index(answer)}}"
        text = MMLU_TEMPLATE
    else:
        raise SystemExit(f"MMLU-style data must be .csv, .jsonl or .parquet, got {data.name}")
    (out_dir / f"{name}.yaml").write_text(
        f"task: {name}\n{source}test_split: test\noutput_type: multiple_choice\n"
        f"doc_to_text: {text}\ndoc_to_choice: {choices}\ndoc_to_target: \"{target}\"\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n",
        encoding="utf-8")
    return name


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trajectory", type=Path, default=Path("ckmerge_demo"),
                   help="directory of checkpoint-<step>/ (made with the demo's recipe if empty)")
    p.add_argument("--mmlu", type=Path, default=None, help="MMLU-style .csv/.jsonl/.parquet file")
    p.add_argument("--limit", type=float, default=None, help="questions per trial (default all)")
    p.add_argument("--screen-limit", type=float, default=None, help="multi-fidelity: cheap stage size")
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--max-concurrent", type=int, default=2)
    args = p.parse_args(argv)

    from ckmerge_ray import tune_merge
    from ckmerge_ray.demo import make_lmeval_tasks, make_trajectory

    ckpts = sorted(args.trajectory.glob("checkpoint-*"), key=lambda c: int(c.name.split("-")[1]))
    if len(ckpts) < 2:
        ckpts = make_trajectory(args.trajectory)
    tasks_dir = args.trajectory / "lmeval_tasks"
    if args.mmlu:
        task = write_mmlu_style_task(args.mmlu, tasks_dir)
    else:
        make_lmeval_tasks(args.trajectory / "heldout.jsonl", tasks_dir)
        task = "ckmerge_stdlib_mc"
    count = lambda v: v if v is None or v < 1 else int(v)
    result = tune_merge(
        (ckpts[-2], ckpts[-1]), {"cpu": 1}, objective=f"lmeval:{task}",
        objective_options={"include_path": str(tasks_dir), "metrics": "acc",
                           "limit": count(args.limit)},
        num_trials=args.trials, max_concurrent=args.max_concurrent, noise_aware=True,
        screen_limit=count(args.screen_limit), output_dir=args.trajectory / f"run_{task}",
        overwrite=True,
    )
    print(json.dumps({"best_lambda": result.best_lambda, "best_score": result.best_score,
                      "endpoint_scores": result.endpoint_scores}, indent=1))


if __name__ == "__main__":
    main()
