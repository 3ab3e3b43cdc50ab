"""Held-out loss: readers, clear errors, determinism, and agreement with transformers' loss."""

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ckmerge_ray.errors import ObjectiveError
from ckmerge_ray.objectives import HeldoutLoss, parse_objective
from ckmerge_ray.objectives.heldout import read_texts


def test_reads_jsonl_parquet_txt(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"body": t}) for t in ["x y", "z"]))
    pq.write_table(pa.table({"body": ["x y", "z"]}), tmp_path / "a.parquet")
    (tmp_path / "a.txt").write_text("x y\nz")
    assert read_texts(tmp_path / "a.jsonl", "body") == ["x y", "z"]
    assert read_texts(tmp_path / "a.parquet", "body") == ["x y", "z"]
    assert read_texts(tmp_path / "a.txt") == ["x y\nz"]


def test_missing_field_names_the_fields(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "x"}))
    with pytest.raises(ObjectiveError, match=r"a.jsonl:1 has no text field 'text' \(fields: \['body'\]\)"):
        read_texts(tmp_path / "a.jsonl")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "a.parquet")
    with pytest.raises(ObjectiveError, match=r"has no column 'text' \(columns: \['body'\]\)"):
        read_texts(tmp_path / "a.parquet")


@pytest.mark.parametrize("content,message", [
    ("", "holds no text"),
    ("   \n\n", "holds no text"),
])
def test_empty_file(tmp_path, content, message):
    (tmp_path / "e.txt").write_text(content)
    with pytest.raises(ObjectiveError, match=message):
        read_texts(tmp_path / "e.txt")


def test_unreadable_and_missing_files(tmp_path):
    with pytest.raises(ObjectiveError, match="held-out file does not exist"):
        read_texts(tmp_path / "nope.jsonl")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(ObjectiveError, match="cannot read parquet file"):
        read_texts(tmp_path / "bad.parquet")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ObjectiveError, match="is not UTF-8 text"):
        read_texts(tmp_path / "bin.txt")
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(ObjectiveError, match="must be .jsonl, .parquet or .txt"):
        read_texts(tmp_path / "x.csv")


def test_parse_objective_strings():
    assert isinstance(parse_objective("loss:x.jsonl", seq_len=16), HeldoutLoss)
    with pytest.raises(ObjectiveError, match="unknown objective kind 'acc'"):
        parse_objective("acc:x")
    with pytest.raises(ObjectiveError, match=r"must be an Objective or a string like.* \(did "
                                             r"you mean 'loss:heldout.jsonl'\?\)"):
        parse_objective("heldout.jsonl")


def test_a_misspelled_option_is_named_with_what_the_objective_takes(tmp_path):
    with pytest.raises(ObjectiveError, match=r"unknown option\(s\) \['seqlen'\] for the 'loss' "
                                             r"objective \(did you mean 'seq_len'\?\); it takes "
                                             r"\['text_field', 'seq_len', 'max_tokens'"):
        parse_objective("loss:x.jsonl", seqlen=16)
    spec = tmp_path / "objective.yaml"
    spec.write_text("lmeval:\n  tasks: [a]\n  limt: 20\n  fewshot: 0\n")
    with pytest.raises(ObjectiveError, match=rf"unknown option\(s\) \['fewshot', 'limt'\] for "
                                             rf"the 'lmeval' objective in {spec} \(did you mean "
                                             r"'num_fewshot', 'limit'\?\)"):
        parse_objective(str(spec))


def _model_and_objective(ckpt, seq_len=32, max_tokens=512):
    cfg = json.loads((ckpt / "config.json").read_text())
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    obj = HeldoutLoss(ckpt.parent / "heldout.jsonl", seq_len=seq_len, max_tokens=max_tokens, batch_size=3)
    obj.prepare(ckpt)
    return model, obj, cfg


def test_loss_is_deterministic_and_matches_transformers(trajectory):
    model, obj, _ = _model_and_objective(trajectory[-1])
    a = obj.evaluate(model, torch.device("cpu"))
    b = obj.evaluate(model, torch.device("cpu"))
    scored = ("score", "loss", "perplexity", "tokens")
    assert {k: a[k] for k in scored} == {k: b[k] for k in scored}
    assert obj.windows.shape[1] == 32 and a["tokens"] == obj.windows.shape[0] * 31
    assert a["tokens"] >= 512
    # Independent: transformers' own mean loss per window, averaged with equal window weights
    # (all windows have the same length, so this equals the token-weighted mean).
    with torch.no_grad():
        ids = torch.from_numpy(obj.windows)
        ref = sum(model(input_ids=ids[i:i + 1], labels=ids[i:i + 1]).loss.item() for i in range(len(ids))) / len(ids)
    assert a["loss"] == pytest.approx(ref, rel=1e-5)
    assert a["perplexity"] == pytest.approx(math.exp(ref), rel=1e-5)


def test_text_shorter_than_a_window(trajectory, tmp_path):
    (tmp_path / "short.txt").write_text("x = 1")
    obj = HeldoutLoss(tmp_path / "short.txt", seq_len=512)
    with pytest.raises(ObjectiveError, match="fewer than one window of seq_len=512"):
        obj.prepare(trajectory[-1])


def test_evaluation_accounting_in_the_result(trajectory):
    """Every evaluation says what it scored and what that cost, under the names trials.parquet
    and summary.json use."""
    model, obj, _ = _model_and_objective(trajectory[-1])
    row = obj.evaluate(model, torch.device("cpu"))
    assert row["eval_tokens"] == row["tokens"]
    assert row["eval_batch_size"] == 3  # the objective's batch_size, kept (no out-of-memory here)
    assert row["eval_path"] == "chunked"  # a Llama splits into body and head
    assert row["eval_seconds"] > 0
    assert row["eval_tokens_per_s"] == pytest.approx(row["eval_tokens"] / row["eval_seconds"])
    assert row["eval_peak_mem_mb"] >= 0


def test_default_batch_on_cpu_is_4096_tokens(trajectory):
    model, obj, _ = _model_and_objective(trajectory[-1], seq_len=32, max_tokens=20000)
    obj.batch_size = obj._batch = None
    row = obj.evaluate(model, torch.device("cpu"))
    assert row["eval_batch_size"] == min(len(obj.windows), 4096 // 32)


def test_full_logits_option_scores_the_same(trajectory):
    model, obj, _ = _model_and_objective(trajectory[-1])
    chunked = obj.evaluate(model, torch.device("cpu"))
    obj.full_logits = True
    full = obj.evaluate(model, torch.device("cpu"))
    assert full["eval_path"] == "full"
    assert chunked["loss"] == pytest.approx(full["loss"], rel=1e-6)


def test_objective_pickles_without_worker_state(trajectory):
    import pickle

    model, obj, _ = _model_and_objective(trajectory[-1])
    obj.evaluate(model, torch.device("cpu"))
    assert list(obj._splits.values()) == ["none"]  # a Llama: no post-head step
    copy = pickle.loads(pickle.dumps(obj))
    assert copy._splits == {} and copy._batch == 3
    cpu = torch.device("cpu")
    assert copy.evaluate(model, cpu)["loss"] == pytest.approx(obj.evaluate(model, cpu)["loss"])


def test_a_checkpoint_without_tokenizer_files_is_refused_before_any_work(tiny_pair, tmp_path):
    """What `save_pretrained` of a model alone leaves: config and weights. transformers would
    build an empty tokenizer from config.json that turns all text into end-of-text tokens; the
    run is refused instead, before an output directory exists."""
    from ckmerge_ray import tune_merge

    heldout = tmp_path / "heldout.txt"
    heldout.write_text("Adjacent checkpoints lie on one training trajectory.\n" * 200)
    with pytest.raises(ObjectiveError, match=r"held-out loss needs the later checkpoint's "
                                             r"tokenizer, but .*/b holds no tokenizer files"):
        HeldoutLoss(heldout, seq_len=8).prepare(tiny_pair[1])
    with pytest.raises(ObjectiveError, match="holds no tokenizer files"):
        tune_merge(tiny_pair, {"cpu": 1}, f"loss:{heldout}", objective_options={"seq_len": 8},
                   output_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_a_tokenizer_that_turns_the_text_into_nothing_is_refused():
    """A real tokenizer with an empty vocabulary (no unknown token) drops every character."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from ckmerge_ray.objectives.heldout import make_windows

    empty = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()), eos_token="<eos>")
    with pytest.raises(ObjectiveError, match=r"turned 2200 characters of held-out text into no "
                                             r"tokens"):
        make_windows(["one training trajectory " * 50, "x" * 1000], empty, seq_len=8,
                     max_tokens=64)


def test_max_tokens_below_one_window_is_refused_not_rounded_up(trajectory):
    """max_tokens=100 with 256-token windows used to score one whole window (255 tokens),
    silently; now it is refused, saying what to change. At or above one window it rounds up to
    whole windows, as documented."""
    obj = HeldoutLoss(trajectory[-1].parent / "heldout.jsonl", seq_len=256, max_tokens=100)
    with pytest.raises(ObjectiveError, match=r"max_tokens=100 is less than one window of "
                                             r"seq_len=256 \(255 scored tokens\): raise "
                                             r"max_tokens to at least 255, or lower seq_len"):
        obj.prepare(trajectory[-1])
    obj = HeldoutLoss(trajectory[-1].parent / "heldout.jsonl", seq_len=64, max_tokens=100)
    obj.prepare(trajectory[-1])
    assert obj.windows.shape == (2, 64)  # ceil(100 / 63) windows
