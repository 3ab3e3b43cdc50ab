"""lm-eval objectives on local tasks built from real text (stdlib held-out source), on real tiny
models: multiple choice and a loglikelihood_rolling perplexity task; tuning with them, with
noise-aware search and multi-fidelity screening."""

import json
import math

import pytest
import torch

from ckmerge_ray.demo import make_lmeval_tasks
from ckmerge_ray.errors import ConfigError, ObjectiveError
from ckmerge_ray.objectives import LmEvalObjective, parse_objective

MC, PPL = "ckmerge_stdlib_mc", "ckmerge_stdlib_ppl"


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, trajectory):
    return make_lmeval_tasks(trajectory[-1].parent / "heldout.jsonl",
                             tmp_path_factory.mktemp("lmeval_tasks"), docs=24)


@pytest.fixture(scope="module")
def model(trajectory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(trajectory[-1]).eval()


def _scores(row):
    """A result without its cost accounting (eval_seconds, ...), which differs run to run."""
    return {k: v for k, v in row.items() if not k.startswith("eval_")}


def test_multiple_choice_on_the_in_memory_model_cached_equals_uncached(task_dir, trajectory, model):
    cached = parse_objective(f"lmeval:{MC}", include_path=task_dir, limit=16, batch_size=4)
    cached.prepare(trajectory[-1])
    assert cached.mode == "max" and cached.include_defaults is False  # built-ins not indexed
    first = cached.evaluate(model, torch.device("cpu"))
    assert 0.0 <= first["score"] <= 1.0 and first["score"] == first[f"{MC}/acc"]
    assert first["score"] * 16 == pytest.approx(round(first["score"] * 16))  # 16 documents scored
    # Closed-form standard error of a mean of 16 Bernoulli scores, as lm-eval computes it.
    p = first["score"]
    assert first["score_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / 15), rel=1e-6)
    assert _scores(cached.evaluate(model, torch.device("cpu"))) == _scores(first)  # requests reused

    uncached = LmEvalObjective([MC], include_path=task_dir, limit=16, batch_size=4,
                               cache_requests=False)
    uncached.prepare(trajectory[-1])
    assert _scores(uncached.evaluate(model, torch.device("cpu"))) == _scores(first)  # from scratch
    cheap = cached.with_limit(4).evaluate(model, torch.device("cpu"))
    assert cheap["score"] * 4 == pytest.approx(round(cheap["score"] * 4))  # a 4-document subset
    # The cost of each evaluation: a multiple-choice document is one request per choice.
    choices = first["eval_requests"] / 16
    assert choices == int(choices) >= 2 and cheap["eval_requests"] == 4 * choices
    assert first["eval_batch_size"] == 4 and first["eval_seconds"] > 0
    assert first["eval_requests_per_s"] == pytest.approx(first["eval_requests"] / first["eval_seconds"])


def test_rolling_perplexity_task(task_dir, trajectory, model):
    obj = LmEvalObjective([PPL], metrics="word_perplexity", include_path=task_dir, limit=2)
    obj.prepare(trajectory[-1])
    assert obj.mode == "min"  # lm-eval: lower perplexity is better
    row = obj.evaluate(model, torch.device("cpu"))
    assert row["score"] == row[f"{PPL}/word_perplexity"] and math.isfinite(row["score"])
    # bits per byte and byte perplexity come from the same loglikelihoods: bpb = log2(byte ppl).
    assert row[f"{PPL}/bits_per_byte"] == pytest.approx(math.log2(row[f"{PPL}/byte_perplexity"]))
    assert 1.0 < row[f"{PPL}/byte_perplexity"] < 256.0
    assert "score_stderr" not in row  # lm-eval computes no standard error for perplexities
    assert row["eval_requests"] == 2  # one rolling request per document
    assert row["eval_batch_size"] == 8  # the CPU default


def test_bad_tasks_metrics_and_tokenizers_are_refused_before_any_trial(task_dir, trajectory, tiny_pair,
                                                                       tmp_path):
    with pytest.raises(ObjectiveError, match=r"unknown lm-eval task\(s\) \['ckmerge_no_such_task'\]"):
        LmEvalObjective(["ckmerge_no_such_task"], include_path=task_dir).prepare(trajectory[-1])
    with pytest.raises(ObjectiveError, match="does not know whether higher 'made_up_metric'"):
        LmEvalObjective([MC], metrics="made_up_metric", include_path=task_dir).prepare(trajectory[-1])
    with pytest.raises(ObjectiveError, match=rf"task '{MC}' does not produce metric 'word_perplexity'; "
                                             r"it produces \['acc'\]"):
        LmEvalObjective([MC], metrics="word_perplexity", include_path=task_dir).prepare(trajectory[-1])
    with pytest.raises(ObjectiveError, match="needs at least one task"):
        parse_objective("lmeval:")
    gen_dir = tmp_path / "gen_task"  # a directory of its own: task managers are cached per path
    gen_dir.mkdir()
    (gen_dir / "gen.yaml").write_text((task_dir / f"{MC}.yaml").read_text()
                                      .replace(f"task: {MC}", "task: ckmerge_stdlib_gen")
                                      .replace("output_type: multiple_choice", "output_type: generate_until")
                                      .replace("  - metric: acc\n", "  - metric: exact_match\n"))
    with pytest.raises(ObjectiveError, match=r"generation tasks \['ckmerge_stdlib_gen'\]\) needs "
                                             r"the later checkpoint's tokenizer, but .* holds no "
                                             r"tokenizer files"):
        LmEvalObjective(["ckmerge_stdlib_gen"], metrics="exact_match",
                        include_path=gen_dir).prepare(tiny_pair[1])  # weights, no tokenizer


def test_objective_from_a_yaml_file(task_dir, tmp_path):
    spec = tmp_path / "objective.yaml"
    spec.write_text(f"lmeval:\n  tasks: [{MC}, {PPL}]\n  metrics: {{{MC}: acc, {PPL}: word_perplexity}}\n"
                    f"  include_path: {task_dir}\n  limit: 8\n")
    obj = parse_objective(str(spec))
    assert obj.tasks == [MC, PPL] and obj.metrics[PPL] == "word_perplexity" and obj.limit == 8
    spec.write_text("lmeval:\n  tasks: [a]\n  no_such_option: 1\n")
    with pytest.raises(ObjectiveError, match="no_such_option"):
        parse_objective(str(spec))


def test_tune_merge_with_an_lmeval_objective(ray_session, task_dir, trajectory, tmp_path):
    from ckmerge_ray import tune_merge

    result = tune_merge((trajectory[-2], trajectory[-1]), {"cpu": 1}, objective=f"lmeval:{MC}",
                        objective_options={"include_path": str(task_dir), "limit": 8, "batch_size": 4},
                        num_trials=3, max_concurrent=1, output_dir=tmp_path / "run",
                        progress=False, export_best=False, noise_aware=True)
    rows = result.table.to_pylist()
    assert result.mode == "max" and len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    assert all(r["score"] == r[f"{MC}/acc"] and r["fidelity"] == "full" for r in rows)
    assert all(r["score_stderr"] >= 0 for r in rows)  # what the noise-aware GP was fed
    assert result.summary["search"]["noise_key"] == "score_stderr"
    # Noise-aware: the best λ is the evaluated one with the best posterior mean, its score is its own.
    assert result.summary["best_by"] == "posterior_mean" and result.best_lambda >= 0.5
    assert result.best_score == next(r["score"] for r in rows if r["lam"] == result.best_lambda)
    observed = max((r for r in rows if r["lam"] >= 0.5), key=lambda r: r["score"])
    assert result.summary["best_observed_lambda"] == observed["lam"]


def test_multi_fidelity_screening(ray_session, task_dir, trajectory, tmp_path):
    """Every trial is scored on 1 document first; only competitive λ get the 4-document score."""
    from ckmerge_ray import tune_merge

    out = tmp_path / "run"
    result = tune_merge((trajectory[-2], trajectory[-1]), {"cpu": 1}, objective=f"lmeval:{PPL}",
                        objective_options={"include_path": str(task_dir), "limit": 4,
                                           "metrics": "word_perplexity"},
                        num_trials=6, max_concurrent=1, output_dir=out, progress=False,
                        export_best=False, screen_limit=1, screen_keep=0.25, seed=3)
    rows = result.table.to_pylist()
    assert len(rows) == 7 and all(r["status"] == "ok" for r in rows)
    initial = [r for r in rows if r["acquisition"] == "initial"]
    assert len(initial) == 3 and all(r["fidelity"] == "full" for r in initial)
    screened = [r for r in rows if r["fidelity"] == "screen"]
    full = [r for r in rows if r["fidelity"] == "full"]
    assert screened, "with keep=0.25 some λ must have been stopped after the cheap stage"
    assert result.summary["fidelity"]["screened_out"] == len(screened)
    assert result.best_score == min(r["score"] for r in full if r["lam"] >= 0.5)
    journal = {p.name for p in (out / "evaluations").iterdir()}
    for r in rows:  # every trial journaled its cheap stage; only full trials the full one
        assert f"lam={r['lam']!r}.screen.json" in journal
        assert (f"lam={r['lam']!r}.json" in journal) == (r["fidelity"] == "full")
    for r in full:  # the full score is on 4 documents, the cheap one on 1: they differ
        cheap = json.loads((out / "evaluations" / f"lam={r['lam']!r}.screen.json").read_text())
        assert cheap["fidelity"] == "screen" and cheap["score"] != r["score"]


def test_screening_needs_a_subsettable_objective_and_a_smaller_limit(trajectory, tmp_path, task_dir):
    from ckmerge_ray import tune_merge

    pair = (trajectory[-2], trajectory[-1])
    heldout = trajectory[-1].parent / "heldout.jsonl"
    with pytest.raises(ObjectiveError, match="no cheaper subset for multi-fidelity screening"):
        tune_merge(pair, objective=f"loss:{heldout}", screen_limit=10, output_dir=tmp_path / "a")
    with pytest.raises(ConfigError, match="screen_limit=8 is not smaller than the objective's own limit=8"):
        tune_merge(pair, objective=f"lmeval:{MC}", screen_limit=8, output_dir=tmp_path / "b",
                   objective_options={"include_path": str(task_dir), "limit": 8})
    with pytest.raises(ConfigError, match=r"screen_keep must be in \(0, 1\)"):
        tune_merge(pair, objective=f"lmeval:{MC}", screen_limit=2, screen_keep=1.0,
                   output_dir=tmp_path / "c", objective_options={"include_path": str(task_dir)})


def test_example_mmlu_style_task_from_csv_and_jsonl(tmp_path, trajectory, model):
    """examples/tune_on_lmeval.py turns MMLU-style files into a task: here, real questions made
    from the standard library (which module has this docstring?), in both layouts it reads."""
    import ast
    import csv
    import importlib.util
    import sysconfig
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "tune_on_lmeval.py"
    spec = importlib.util.spec_from_file_location("tune_on_lmeval", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)

    mods = []
    for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:80]:
        doc = ast.get_docstring(ast.parse(p.read_text(encoding="utf-8")))
        if doc and len(doc.split("\n")[0]) > 20:
            mods.append((p.stem, doc.split("\n")[0]))
    rows = []
    for i, (name, first) in enumerate(mods[:12]):
        others = [mods[(i + k) % len(mods)][0] for k in (3, 5, 7)]
        label = i % 4
        rows.append((f"Which standard-library module says: {first}", others[:label] + [name] + others[label:], label))
    with (tmp_path / "q.csv").open("w", newline="") as f:
        csv.writer(f).writerows([q, *c, "ABCD"[a]] for q, c, a in rows)
    (tmp_path / "q.jsonl").write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                                              for q, c, a in rows))
    scores = []
    for fmt in ("csv", "jsonl"):
        tasks = tmp_path / f"tasks_{fmt}"
        name = example.write_mmlu_style_task(tmp_path / f"q.{fmt}", tasks, name=f"stdlib_qa_{fmt}")
        obj = LmEvalObjective([name], include_path=tasks, limit=8)
        obj.prepare(trajectory[-1])
        row = obj.evaluate(model, torch.device("cpu"))
        assert row[f"{name}/sample_len"] == 8 and 0 <= row["score"] <= 1
        scores.append(row["score"])
    assert scores[0] == scores[1]  # the same questions, read from either layout


def test_auto_batch_size_is_detected_once_and_kept(task_dir, trajectory, model):
    """batch_size="auto" (the GPU default): lm-eval's detection runs on the first trial only; its
    size is kept for the worker's later trials and recorded in the row."""
    obj = LmEvalObjective([MC], include_path=task_dir, limit=4, batch_size="auto")
    obj.prepare(trajectory[-1])
    first = obj.evaluate(model, torch.device("cpu"))
    assert isinstance(obj._batch, int) and first["eval_batch_size"] == obj._batch >= 1
    second = obj.evaluate(model, torch.device("cpu"))
    assert second["eval_batch_size"] == obj._batch and second["score"] == first["score"]
    with pytest.raises(ObjectiveError, match="batch_size must be a positive int or 'auto'"):
        LmEvalObjective([MC], batch_size=0)
