"""Checkpoints saved by transformers itself, of architectures whose files are not the model's
state dict (renamed heads, experts stored one by one, fp32 norms in a bf16 file, old buffers):
each pair is tuned end to end, every score equals the score of the same λ-merge computed here
independently (fp64 sum of the files' tensors, written under the files' names, loaded with
`from_pretrained`), and best/ reloads cleanly and reproduces its score.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckmerge_ray import tune_merge
from ckmerge_ray.errors import CheckpointError
from ckmerge_ray.objectives import HeldoutLoss

OPTIONS = {"seq_len": 32, "max_tokens": 512}
VOCAB = 300
SMALL = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
ARCHITECTURES = {
    "gpt_neox_untied": ("gpt_neox", dict(SMALL, tie_word_embeddings=False)),  # Pythia layout
    "mixtral": ("mixtral", dict(SMALL, num_local_experts=3, num_experts_per_tok=2)),
    "qwen2_moe": ("qwen2_moe", dict(SMALL, num_experts=3, num_experts_per_tok=2,
                                    moe_intermediate_size=8, shared_expert_intermediate_size=8)),
    "llama": ("llama", dict(SMALL, tie_word_embeddings=False)),
    "gpt2_tied": ("gpt2", dict(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=64)),
}


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """A byte-level BPE tokenizer trained offline on the stdlib, and held-out stdlib text."""
    from ckmerge_ray.demo import read_texts, split_corpus, stdlib_files, train_tokenizer, write_heldout

    out = tmp_path_factory.mktemp("text")
    train, held = split_corpus(stdlib_files())
    tokenizer = train_tokenizer(read_texts(train, 200_000), VOCAB)
    return tokenizer, write_heldout(out / "heldout.jsonl", held, max_bytes=40_000)


def save_pair(root: Path, model_type: str, config: dict, tokenizer, dtype=torch.float32):
    """Two checkpoints of one tiny model, the second a small step from the first, saved by
    `save_pretrained` (so in the file layout transformers writes for the architecture)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config))
    paths = []
    for step in (1, 2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        path = root / f"checkpoint-{step}"
        model.to(dtype).save_pretrained(path)
        model.float()
        tokenizer.save_pretrained(path)
        paths.append(path)
    return paths


def file_tensors(path: Path) -> dict:
    files = sorted(path.glob("*.safetensors"))
    return {k: v for f in files for k, v in load_file(f).items()}


def independent_merge(pair, lam: float, dest: Path) -> Path:
    """λ·later + (1-λ)·earlier of the files' own tensors in fp64, cast once to each tensor's
    dtype, saved under the files' names with the later checkpoint's config and tokenizer."""
    a, b = file_tensors(pair[0]), file_tensors(pair[1])
    merged = {k: (lam * b[k].double() + (1 - lam) * a[k].double()).to(b[k].dtype)
              if b[k].is_floating_point() else b[k] for k in b}
    shutil.copytree(pair[1], dest)
    for f in dest.glob("*.safetensors*"):
        f.unlink()
    save_file(merged, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def score_of(path: Path, heldout: Path) -> float:
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    objective = HeldoutLoss(heldout, **OPTIONS)
    objective.prepare(path)
    return objective.evaluate(model.eval(), torch.device("cpu"))["score"]


def tune_and_check(pair, heldout, out: Path, **kwargs):
    result = tune_merge(pair, {"cpu": 1}, f"loss:{heldout}", objective_options=OPTIONS,
                        num_trials=2, max_concurrent=2, output_dir=out, progress=False, **kwargs)
    rows = [r for r in result.table.to_pylist() if r["status"] == "ok"]
    assert len(rows) == 3, result.table.to_pylist()  # λ = 0, 0.5, 1
    for r in rows:
        expected = score_of(independent_merge(pair, r["lam"], out / f"independent-{r['lam']}"),
                            heldout)
        assert r["score"] == pytest.approx(expected, abs=2e-5), r["lam"]
    assert score_of(result.best_model_path, heldout) == pytest.approx(result.best_score, abs=2e-5)
    best = file_tensors(result.best_model_path)
    assert set(best) == set(file_tensors(pair[1]))  # the files' own names, not the model's
    return result


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_architecture_is_tuned_in_the_files_own_layout(ray_session, text, tmp_path, name):
    tokenizer, heldout = text
    model_type, config = ARCHITECTURES[name]
    pair = save_pair(tmp_path, model_type, config, tokenizer)
    tune_and_check(pair, heldout, tmp_path / "run")


def test_bf16_checkpoint_with_fp32_norms(ray_session, text, tmp_path):
    """Mixed-precision trainers save bf16 weights with fp32 norms; from_pretrained makes the
    whole model bf16 (the config's dtype), and so must the trial's resident model."""
    tokenizer, heldout = text
    pair = save_pair(tmp_path, "llama", SMALL, tokenizer, dtype=torch.bfloat16)
    for path in pair:
        tensors = file_tensors(path)
        tensors = {k: v.float() if "norm" in k else v for k, v in tensors.items()}
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    assert {str(v.dtype) for v in file_tensors(pair[1]).values()} == {"torch.bfloat16",
                                                                      "torch.float32"}
    tune_and_check(pair, heldout, tmp_path / "run")


def test_old_neox_buffers_are_ignored_as_transformers_ignores_them(ray_session, text, tmp_path):
    """Older Pythia files carry attention.bias / masked_bias and rotary_emb.inv_freq."""
    tokenizer, heldout = text
    model_type, config = ARCHITECTURES["gpt_neox_untied"]
    pair = save_pair(tmp_path, model_type, config, tokenizer)
    saved_by_transformers = set(file_tensors(pair[1]))
    for path in pair:
        tensors = file_tensors(path)
        for i in range(config["num_hidden_layers"]):
            prefix = f"gpt_neox.layers.{i}.attention"
            tensors[f"{prefix}.bias"] = torch.tril(torch.ones(1, 1, 64, 64, dtype=torch.bool))
            tensors[f"{prefix}.masked_bias"] = torch.tensor(-1e9)
            tensors[f"{prefix}.rotary_emb.inv_freq"] = torch.rand(4)
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    result = tune_merge(pair, {"cpu": 1}, f"loss:{heldout}", objective_options=OPTIONS,
                        num_trials=2, max_concurrent=2, output_dir=tmp_path / "run",
                        progress=False)
    # the old buffers were neither refused nor merged: best/ holds what transformers saves
    assert set(file_tensors(result.best_model_path)) == saved_by_transformers
    assert score_of(result.best_model_path, heldout) == pytest.approx(result.best_score, abs=2e-5)


def test_a_tensor_the_model_lacks_is_still_refused(text, tmp_path):
    tokenizer, heldout = text
    pair = save_pair(tmp_path, "llama", SMALL, tokenizer)
    tensors = file_tensors(pair[1])
    tensors["model.layers.0.mystery.weight"] = torch.zeros(2)
    save_file(tensors, pair[1] / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(pair[1] / "model.safetensors", pair[0] / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"do not match LlamaForCausalLM: unexpected "
                                              r"\['model\.layers\.0\.mystery\.weight'\]"):
        tune_merge(pair, {"cpu": 1}, f"loss:{heldout}", objective_options=OPTIONS,
                   output_dir=tmp_path / "run", progress=False)


REMOTE_CODE = '''
from transformers import LlamaConfig, LlamaForCausalLM


class TinyConfig(LlamaConfig):
    model_type = "ckmerge_tiny"


class TinyForCausalLM(LlamaForCausalLM):
    config_class = TinyConfig
'''

REMOTE_TOKENIZER = '''
from transformers import PreTrainedTokenizerFast


class TinyTokenizer(PreTrainedTokenizerFast):
    pass
'''


def test_model_with_its_own_code_needs_the_opt_in(ray_session, text, tmp_path):
    tokenizer, heldout = text
    pair = save_pair(tmp_path, "llama", SMALL, tokenizer)
    for path in pair:
        (path / "modeling_tiny.py").write_text(REMOTE_CODE)
        (path / "tokenization_tiny.py").write_text(REMOTE_TOKENIZER)
        tok_config = json.loads((path / "tokenizer_config.json").read_text())
        tok_config.update(tokenizer_class="TinyTokenizer",
                          auto_map={"AutoTokenizer": [None, "tokenization_tiny.TinyTokenizer"]})
        (path / "tokenizer_config.json").write_text(json.dumps(tok_config))
        config = json.loads((path / "config.json").read_text())
        config.update(model_type="ckmerge_tiny", architectures=["TinyForCausalLM"], auto_map={
            "AutoConfig": "modeling_tiny.TinyConfig",
            "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"})
        (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as refused:
        tune_merge(pair, {"cpu": 1}, f"loss:{heldout}", objective_options=OPTIONS,
                   output_dir=tmp_path / "refused", progress=False)
    assert "modeling_tiny.TinyForCausalLM" in str(refused.value)
    assert str(pair[1] / "modeling_tiny.py") in str(refused.value)
    assert "trust_remote_code=True" in str(refused.value)
    assert not (tmp_path / "refused").exists()
    from ckmerge_ray.errors import ObjectiveError

    with pytest.raises(ObjectiveError, match="cannot load a tokenizer"):
        HeldoutLoss(heldout, **OPTIONS).prepare(pair[1])  # its tokenizer is its own code too

    result = tune_merge(pair, {"cpu": 1}, f"loss:{heldout}", objective_options=OPTIONS,
                        num_trials=3, max_concurrent=2, output_dir=tmp_path / "run",
                        progress=False, trust_remote_code=True)
    rows = result.table.to_pylist()
    assert all(r["status"] == "ok" for r in rows) and len(rows) == 4
    assert len({r["worker"] for r in rows}) == 2  # two trial workers imported the code
    # the scores are those of the same merge built by the built-in Llama class
    for r in rows:
        merged = independent_merge(pair, r["lam"], tmp_path / f"independent-{r['lam']}")
        config = json.loads((merged / "config.json").read_text())
        config.update(model_type="llama", architectures=["LlamaForCausalLM"])
        config.pop("auto_map")
        (merged / "config.json").write_text(json.dumps(config))
        tok_config = json.loads((merged / "tokenizer_config.json").read_text())
        tok_config.pop("auto_map")
        tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"  # what TinyTokenizer derives
        (merged / "tokenizer_config.json").write_text(json.dumps(tok_config))
        assert r["score"] == pytest.approx(score_of(merged, heldout), abs=2e-5)


def test_short_context_model_with_default_options_is_clamped(ray_session, text, tmp_path,
                                                             capsys):
    """A bf16 GPT-2 pair with 64 positions, tuned with the default seq_len (512): the windows
    are clamped to the context, announced, instead of every trial failing with IndexError."""
    tokenizer, heldout = text
    _, config = ARCHITECTURES["gpt2_tied"]
    pair = save_pair(tmp_path, "gpt2", config, tokenizer, dtype=torch.bfloat16)
    result = tune_merge(pair, {"cpu": 1}, f"loss:{heldout}", objective_options={"max_tokens": 512},
                        num_trials=2, max_concurrent=2, output_dir=tmp_path / "run")
    assert "using seq_len=64" in capsys.readouterr().out
    assert all(r["status"] == "ok" for r in result.table.to_pylist())
    assert "seq_len=64" in result.summary["objective"]


@pytest.mark.parametrize("case", ["seq_len", "vocabulary"])
def test_objective_beyond_the_model_is_refused_before_any_work(text, tmp_path, case):
    from ckmerge_ray.errors import ObjectiveError

    tokenizer, heldout = text
    _, config = ARCHITECTURES["gpt2_tied"]
    options = dict(OPTIONS)
    if case == "seq_len":
        options["seq_len"] = 128
        message = r"seq_len=128 is longer than the model's context \(n_positions=64"
    else:
        config = dict(config, vocab_size=200)  # the tokenizer has 300 tokens
        message = r"ids up to \d+, but the model's vocabulary has 200 entries"
    pair = save_pair(tmp_path, "gpt2", config, tokenizer)
    with pytest.raises(ObjectiveError, match=message):
        tune_merge(pair, {"cpu": 1}, f"loss:{heldout}", objective_options=options,
                   output_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", ["max_length", "tokenizer"])
def test_lmeval_objective_beyond_the_model_is_refused_before_any_work(text, tmp_path, case):
    from ckmerge_ray.demo import make_lmeval_tasks
    from ckmerge_ray.errors import ObjectiveError

    tokenizer, heldout = text
    _, config = ARCHITECTURES["gpt2_tied"]
    options = {"include_path": str(make_lmeval_tasks(heldout, tmp_path / "tasks", docs=8)),
               "limit": 4}
    if case == "max_length":
        options["max_length"] = 128
        message = r"max_length=128 is longer than the model's context \(n_positions=64"
    else:
        config = dict(config, vocab_size=200)  # the tokenizer has 300 tokens
        message = r"has 300 tokens but the model's vocabulary has 200 entries"
    pair = save_pair(tmp_path, "gpt2", config, tokenizer)
    with pytest.raises(ObjectiveError, match=message):
        tune_merge(pair, {"cpu": 1}, "lmeval:ckmerge_stdlib_mc", objective_options=options,
                   output_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
