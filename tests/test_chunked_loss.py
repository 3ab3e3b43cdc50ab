"""Chunked held-out loss: the same NLL as the full logits and as transformers' own loss, across
architectures (untied and tied heads, soft-capped and scaled logits); models it cannot split fall
back to the full logits."""

import numpy as np
import pytest
import torch
import transformers as tf

from ckmerge_ray.objectives import HeldoutLoss
from ckmerge_ray.objectives.chunked import chunk_bytes, chunked_nll, full_logits_nll, split_model

VOCAB = 300
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              bos_token_id=0, eos_token_id=1, pad_token_id=2)

# (architecture, config, the post-head step the split must find)
CONFIGS = {
    "llama": (lambda: tf.LlamaConfig(**COMMON, tie_word_embeddings=False), "none"),
    "gpt_neox": (lambda: tf.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, bos_token_id=0, eos_token_id=1), "none"),
    "gpt2_tied": (lambda: tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                        n_positions=64, bos_token_id=0, eos_token_id=1), "none"),
    # a small cap so soft-capping changes the logits measurably
    "gemma2_softcap": (lambda: tf.Gemma2Config(**COMMON, head_dim=8, final_logit_softcapping=0.5),
                       "softcap(0.5)"),
    "gemma3_softcap": (lambda: tf.Gemma3TextConfig(**COMMON, head_dim=8,
                                                   final_logit_softcapping=0.5), "softcap(0.5)"),
    "granite_logits_scaling": (lambda: tf.GraniteConfig(**COMMON, logits_scaling=4.0), "divide(4)"),
    "cohere_logit_scale": (lambda: tf.CohereConfig(**COMMON, logit_scale=0.25), "scale(0.25)"),
}


def _model(config, dtype=torch.float32):
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(config).to(dtype).eval()


def _ids(batch=3, seq_len=40, seed=1):
    return torch.randint(3, VOCAB, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("by", ["vocab", "positions"])
@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_chunked_nll_equals_full_logits_and_transformers(arch, by):
    make_config, post = CONFIGS[arch]
    model, ids = _model(make_config()), _ids()
    with torch.inference_mode():
        split, why = split_model(model, ids[:1])
        assert split is not None, why
        assert split.post_name == post
        # budgets that cut the vocabulary into slices of 37 columns (3 x 39 positions each), or
        # the positions into chunks of 7 that straddle window boundaries
        budget = 4 * (3 * 39 * 37 if by == "vocab" else VOCAB * 7)
        chunked = float(chunked_nll(split, ids, budget, by=by))
        full = float(full_logits_nll(model, ids))
        # transformers' own loss: mean over the B*(T-1) shifted targets
        reference = float(model(input_ids=ids, labels=ids).loss) * ids[:, 1:].numel()
    assert chunked == pytest.approx(full, rel=1e-6)
    assert chunked == pytest.approx(reference, rel=1e-6)


def test_chunk_size_does_not_change_the_sum():
    model, ids = _model(CONFIGS["llama"][0]()), _ids()
    with torch.inference_mode():
        split, _ = split_model(model, ids[:1])
        sums = [float(chunked_nll(split, ids, 4 * VOCAB * n, by=by))
                for n in (1, 13, 39, 10_000) for by in ("vocab", "positions")]
    assert sums == pytest.approx([sums[0]] * 8, rel=1e-6)


def test_bf16_model_matches_its_full_logits():
    """In bf16 the head's output and the post step stay in bf16, as in the model's forward; only
    the cross-entropy is fp32, so the score is today's to fp32 round-off."""
    model, ids = _model(CONFIGS["gemma2_softcap"][0](), torch.bfloat16), _ids()
    with torch.inference_mode():
        split, why = split_model(model, ids[:1])
        assert split is not None, why
        chunked = float(chunked_nll(split, ids, 4 * 117 * 50))  # 50 columns a slice
        full = float(full_logits_nll(model, ids))
    assert chunked == pytest.approx(full, rel=1e-5)


class ScaledLlama(tf.LlamaForCausalLM):
    """A model whose forward rescales the logits in a way no config field announces."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 3.0
        return out


def test_unknown_post_head_step_falls_back_to_full_logits(tmp_path):
    torch.manual_seed(0)
    model = ScaledLlama(CONFIGS["llama"][0]()).eval()
    ids = _ids()
    with torch.inference_mode():
        split, why = split_model(model, ids[:1])
    assert split is None and "match no known post-head step" in why
    obj = HeldoutLoss(tmp_path / "unused.txt", seq_len=40, batch_size=2)
    obj.windows = ids.numpy()
    row = obj.evaluate(model, torch.device("cpu"))
    assert row["eval_path"] == "full"
    with torch.inference_mode():
        expected = float(full_logits_nll(model, ids)) / ids[:, 1:].numel()
    assert row["loss"] == pytest.approx(expected, rel=1e-6)


def test_model_without_output_head_falls_back():
    model = tf.LlamaModel(tf.LlamaConfig(**COMMON)).eval()  # a body with no LM head
    with torch.inference_mode():
        split, why = split_model(model, _ids()[:1])
    assert split is None and "no output head" in why


def test_heldout_objective_scores_gpt2_like_transformers(tmp_path):
    """The objective end to end on a tied-head model: windows, batches, chunks."""
    model = _model(CONFIGS["gpt2_tied"][0]())
    obj = HeldoutLoss(tmp_path / "unused.txt", seq_len=40, batch_size=2)
    obj.windows = _ids(batch=5).numpy()
    row = obj.evaluate(model, torch.device("cpu"))
    assert row["eval_path"] == "chunked" and row["tokens"] == 5 * 39
    ids = torch.from_numpy(obj.windows)
    with torch.no_grad():
        ref = np.mean([model(input_ids=ids[i:i + 1], labels=ids[i:i + 1]).loss.item()
                       for i in range(len(ids))])
    assert row["loss"] == pytest.approx(ref, rel=1e-6)


def test_chunk_budget_per_device():
    assert chunk_bytes("cpu") == 64 * 2**20 and chunk_bytes("cuda") == 2**30
    assert chunk_bytes("mps") == chunk_bytes("cpu")


def test_objective_checks_the_split_once_and_keeps_no_model_alive(tmp_path, monkeypatch):
    import gc
    import weakref

    import ckmerge_ray.objectives.heldout as heldout

    model = _model(CONFIGS["gemma2_softcap"][0]())
    obj = HeldoutLoss(tmp_path / "unused.txt", seq_len=40, batch_size=2)
    obj.windows = _ids(batch=4).numpy()
    first = obj.evaluate(model, torch.device("cpu"))
    probes = []
    monkeypatch.setattr(heldout, "split_model",
                        lambda *a, **k: probes.append(k.get("post_name")) or split_model(*a, **k))
    second = obj.evaluate(model, torch.device("cpu"))
    assert probes == ["softcap(0.5)"]  # looked up by name, not checked again
    assert second["loss"] == first["loss"]
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None  # the objective's cache holds names, not modules
