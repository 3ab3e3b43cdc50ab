"""lm-eval objective on a local multiple-choice task built from real text, on a real tiny model."""

import json

import pytest
import torch

from ckmerge_ray.errors import ObjectiveError
from ckmerge_ray.objectives import LmEvalObjective, parse_objective

TASK = "ckmerge_stdlib_mc"


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, trajectory):
    """Multiple choice: which of four continuations follows a passage of the held-out text."""
    out = tmp_path_factory.mktemp("lmeval_tasks")
    texts = [json.loads(line)["text"] for line in (trajectory[-1].parent / "heldout.jsonl").open()]
    text = " ".join(texts)
    docs, n = [], 24
    for i in range(n):
        start = 400 * i
        context, follow = text[start:start + 200], text[start + 200:start + 230]
        others = [text[400 * ((i + k) % n) + 200:400 * ((i + k) % n) + 230] for k in (5, 11, 17)]
        label = i % 4
        choices = others[:label] + [follow] + others[label:]
        docs.append({"context": context, "choices": choices, "label": label})
    (out / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (out / f"{TASK}.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {out / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return out


def test_scores_the_in_memory_model_on_a_local_task(task_dir, trajectory):
    from transformers import AutoModelForCausalLM

    obj = parse_objective(f"lmeval:{TASK}", include_path=task_dir, limit=16, batch_size=4)
    obj.prepare(trajectory[-1])
    assert obj.mode == "max" and obj.include_defaults is False  # local only: built-ins not indexed
    model = AutoModelForCausalLM.from_pretrained(trajectory[-1]).eval()
    first = obj.evaluate(model, torch.device("cpu"))
    assert 0.0 <= first["score"] <= 1.0 and first["score"] == first[f"{TASK}/acc"]
    assert first["score"] * 16 == pytest.approx(round(first["score"] * 16))  # 16 documents scored
    assert obj.evaluate(model, torch.device("cpu"))["score"] == first["score"]  # same documents


def test_unknown_task_and_metric_are_refused_before_any_trial(task_dir, trajectory):
    with pytest.raises(ObjectiveError, match=r"unknown lm-eval task\(s\) \['ckmerge_no_such_task'\]"):
        LmEvalObjective(["ckmerge_no_such_task"], include_path=task_dir).prepare(trajectory[-1])
    with pytest.raises(ObjectiveError, match="does not know whether higher 'made_up_metric'"):
        LmEvalObjective([TASK], metrics="made_up_metric", include_path=task_dir).prepare(trajectory[-1])
    with pytest.raises(ObjectiveError, match="needs at least one task"):
        parse_objective("lmeval:")


def test_tune_merge_with_an_lmeval_objective(ray_session, task_dir, trajectory, tmp_path):
    from ckmerge_ray import tune_merge

    result = tune_merge((trajectory[-2], trajectory[-1]), {"cpu": 1}, objective=f"lmeval:{TASK}",
                        objective_options={"include_path": str(task_dir), "limit": 8, "batch_size": 4},
                        num_trials=3, max_concurrent=1, output_dir=tmp_path / "run",
                        progress=False, export_best=False)
    rows = result.table.to_pylist()
    assert result.mode == "max" and len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    assert all(r["score"] == r[f"{TASK}/acc"] for r in rows)
    assert result.best_score == max(r["score"] for r in rows if r["lam"] >= 0.5)
