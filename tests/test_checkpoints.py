"""Reading and validating checkpoint directories: each bad input gets its own message."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckmerge_ray.checkpoints import load_checkpoint_info, plan_shards, validate_pair
from ckmerge_ray.errors import CheckpointError, ConfigError
from tests.conftest import tiny_llama


def test_reads_single_file_headers(tiny_pair):
    info = load_checkpoint_info(tiny_pair[0])
    assert info.format == "safetensors"
    assert info.specs["model.embed_tokens.weight"].shape == (64, 16)
    assert info.nbytes == sum(t.numel() * 4 for t in load_file(tiny_pair[0] / "model.safetensors").values())


def test_reads_sharded_checkpoint(tmp_path):
    tiny_llama(0).save_pretrained(tmp_path / "s", max_shard_size="10KB")
    info = load_checkpoint_info(tmp_path / "s")
    assert len(info.shard_files) > 1
    tensors = info.read_tensors(list(info.specs))
    assert set(tensors) == set(info.specs)


def test_valid_pair_passes(tiny_pair):
    validate_pair(load_checkpoint_info(tiny_pair[0]), load_checkpoint_info(tiny_pair[1]))


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint directory .*nope does not exist"):
        load_checkpoint_info(tmp_path / "nope")


def test_directory_without_weights(tmp_path, tiny_pair):
    (tmp_path / "empty").mkdir()
    shutil.copy(tiny_pair[0] / "config.json", tmp_path / "empty")
    with pytest.raises(CheckpointError, match="no weights in .*empty: expected model.safetensors"):
        load_checkpoint_info(tmp_path / "empty")


def test_directory_without_config(tmp_path, tiny_pair):
    (tmp_path / "noconf").mkdir()
    with pytest.raises(CheckpointError, match=r"no config.json in \S*noconf$"):
        load_checkpoint_info(tmp_path / "noconf")
    # the run's folder given instead of one of its checkpoints: the message says so
    with pytest.raises(CheckpointError, match=r"it holds checkpoint folders \(a, b\): pass one "
                                              r"of them, or the whole folder to `ckmerge-ray sweep`"):
        load_checkpoint_info(tiny_pair[0].parent)


def test_missing_shard_named_in_index(tmp_path):
    tiny_llama(0).save_pretrained(tmp_path / "s", max_shard_size="10KB")
    index = json.loads((tmp_path / "s/model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / "s" / victim).unlink()
    with pytest.raises(CheckpointError, match=f"shard {victim} named in .* is missing"):
        load_checkpoint_info(tmp_path / "s")


def test_truncated_safetensors(tiny_pair):
    f = tiny_pair[0] / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read .*model.safetensors \\(truncated or corrupt"):
        load_checkpoint_info(tiny_pair[0])


def test_corrupt_safetensors_header(tiny_pair):
    (tiny_pair[0] / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint_info(tiny_pair[0])


def _rewrite(path, fn):
    f = path / "model.safetensors"
    tensors = load_file(f)
    fn(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def test_tensor_name_mismatch(tiny_pair):
    _rewrite(tiny_pair[1], lambda t: t.__setitem__("extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"tensor names differ: 0 only in .*, 1 only in .*\['extra.weight'\]"):
        validate_pair(load_checkpoint_info(tiny_pair[0]), load_checkpoint_info(tiny_pair[1]))


def test_shape_mismatch(tiny_pair):
    name = "model.norm.weight"
    _rewrite(tiny_pair[1], lambda t: t.__setitem__(name, torch.zeros(17)))
    with pytest.raises(CheckpointError, match=r"tensor 'model.norm.weight' has shape \[16\] in .* but \[17\]"):
        validate_pair(load_checkpoint_info(tiny_pair[0]), load_checkpoint_info(tiny_pair[1]))


def test_dtype_mismatch(tiny_pair):
    name = "model.norm.weight"
    _rewrite(tiny_pair[1], lambda t: t.__setitem__(name, t[name].to(torch.bfloat16)))
    with pytest.raises(CheckpointError, match="tensor 'model.norm.weight' has dtype float32 in .* but bfloat16"):
        validate_pair(load_checkpoint_info(tiny_pair[0]), load_checkpoint_info(tiny_pair[1]))


def test_different_architectures(tmp_path, tiny_pair):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "g")
    with pytest.raises(CheckpointError, match="checkpoints have different model_type: 'llama' .* vs 'gpt2'"):
        validate_pair(load_checkpoint_info(tiny_pair[0]), load_checkpoint_info(tmp_path / "g"))


def test_config_field_that_shapes_weights(tiny_pair):
    cfg = json.loads((tiny_pair[1] / "config.json").read_text())
    cfg["num_key_value_heads"] = 1
    (tiny_pair[1] / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config field 'num_key_value_heads' differs: 2 in .* vs 1"):
        validate_pair(load_checkpoint_info(tiny_pair[0]), load_checkpoint_info(tiny_pair[1]))


def test_pickle_checkpoint_needs_opt_in(tmp_path):
    d = tmp_path / "p"
    tiny_llama(0).save_pretrained(d)
    sd = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    torch.save(sd, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="holds only a pickle checkpoint .*pass allow_pickle=True"):
        load_checkpoint_info(d)
    info = load_checkpoint_info(d, allow_pickle=True)
    assert info.format == "pickle"
    got = info.read_tensors(["model.norm.weight"])["model.norm.weight"]
    assert torch.equal(got, sd["model.norm.weight"])


class _Exploit:
    def __reduce__(self):
        import os
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_with_code_is_refused_even_with_opt_in(tmp_path):
    d = tmp_path / "evil"
    tiny_llama(0).save_pretrained(d)
    (d / "model.safetensors").unlink()
    torch.save({"w": torch.zeros(1), "x": _Exploit()}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"cannot load .* with torch.load\(weights_only=True\)"):
        load_checkpoint_info(d, allow_pickle=True)


def test_plan_shards_bounds_size_and_follows_files(tiny_pair, tmp_path):
    info = load_checkpoint_info(tiny_pair[0])
    plan = plan_shards(info, max_shard_bytes=4096)
    assert sorted(n for g in plan for n in g) == sorted(info.specs)
    for group in plan:
        size = sum(info.specs[n].nbytes for n in group)
        assert size <= 4096 or len(group) == 1
    tiny_llama(0).save_pretrained(tmp_path / "s", max_shard_size="10KB")
    sharded = load_checkpoint_info(tmp_path / "s")
    assert len(plan_shards(sharded, 1 << 30)) == len(sharded.shard_files)


# --- a checkpoint that changes after validation (issue 21, fault 4) ---------------------------

def _validated(pair):
    from ckmerge_ray.config import CheckpointConfig
    from ckmerge_ray.inputs import load_window

    return load_window(pair, CheckpointConfig())


@pytest.mark.parametrize("change, message", [
    ("replace", "model.safetensors changed .* before it was stored"),
    ("truncate", "model.safetensors changed .* before it was stored"),
    ("delete", "model.safetensors was deleted after the checkpoint was validated"),
])
def test_a_checkpoint_changed_after_validation_is_not_stored(tiny_pair, change, message):
    from ckmerge_ray.store import put_checkpoint

    _, later = _validated(tiny_pair)
    f = tiny_pair[1] / "model.safetensors"
    if change == "replace":  # the trainer saved again: same names and shapes, other values
        tiny_llama(7).save_pretrained(tiny_pair[1])
    elif change == "truncate":  # a sync still copying
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    else:
        f.unlink()
    with pytest.raises(CheckpointError, match=message):
        put_checkpoint(later, plan_shards(later, 1 << 30))  # raises before any ray.put


def test_a_checkpoint_rewritten_while_it_is_stored_is_refused(ray_session, tiny_pair):
    """Test hook: the reader rewrites the file after the first shard is read (a trainer saving
    over a checkpoint mid-read); the shards read so far hold old bytes, later ones new."""
    from ckmerge_ray.store import put_checkpoint

    _, later = _validated(tiny_pair)
    plan = plan_shards(later, 4096)
    assert len(plan) > 2
    read, calls = later.reader, []

    def reader(names):
        calls.append(names)
        if len(calls) == 2:
            tiny_llama(7).save_pretrained(tiny_pair[1])
        return read(names)

    later.reader = reader
    with pytest.raises(CheckpointError, match="changed .* while it was being stored"):
        put_checkpoint(later, plan)
    assert len(calls) == len(plan)  # detected at the end of the pass, before anything is used


def test_tune_refuses_a_checkpoint_replaced_between_validation_and_storing(
        ray_session, trajectory, tmp_path, monkeypatch):
    """Test hook: tuner.store_pair is wrapped to replace the later checkpoint's weights first
    (as a trainer overwriting checkpoint-120 would, between tune's checks and its reads)."""
    import ckmerge_ray.tuner as tuner
    from ckmerge_ray import tune_merge

    pair = []
    for c in trajectory[-2:]:
        shutil.copytree(c, tmp_path / c.name)
        pair.append(tmp_path / c.name)
    store_pair = tuner.store_pair

    def rewrite_then_store(ctx, stored):
        tensors = load_file(pair[1] / "model.safetensors")
        save_file({k: v + 1 for k, v in tensors.items()}, pair[1] / "model.safetensors",
                  metadata={"format": "pt"})
        return store_pair(ctx, stored)

    monkeypatch.setattr(tuner, "store_pair", rewrite_then_store)
    with pytest.raises(CheckpointError, match=f"{pair[1].name}/model.safetensors changed"):
        tune_merge(tuple(pair), {"cpu": 1}, f"loss:{trajectory[-1].parent / 'heldout.jsonl'}",
                   objective_options={"seq_len": 64, "max_tokens": 512}, num_trials=2,
                   output_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "trials.parquet").exists()
    assert not (tmp_path / "run" / "best").exists()


def test_a_separate_head_under_a_tied_config_is_refused(tmp_path):
    """A trainer's untied output head saved with a config that ties it to the embedding: the
    model (and from_pretrained) would silently keep one of the two, so it is refused."""
    from ckmerge_ray.store import put_checkpoint

    pair = []
    for i in range(2):
        model = tiny_llama(i, tie_word_embeddings=True)
        model.save_pretrained(tmp_path / f"c{i}")
        tensors = load_file(tmp_path / f"c{i}" / "model.safetensors")
        tensors["lm_head.weight"] = torch.randn_like(tensors["model.embed_tokens.weight"])
        save_file(tensors, tmp_path / f"c{i}" / "model.safetensors", metadata={"format": "pt"})
        pair.append(tmp_path / f"c{i}")
    _, later = _validated(pair)
    assert later.tied == [["model.embed_tokens.weight", "lm_head.weight"]] or \
        later.tied == [["lm_head.weight", "model.embed_tokens.weight"]]
    with pytest.raises(CheckpointError, match="differ, but .*config.json ties them .*"
                                              "tie_word_embeddings: false"):
        put_checkpoint(later, plan_shards(later, 1 << 30))


def test_checkpoints_named_by_step_must_come_oldest_first(trajectory, tmp_path):
    """A newcomer's swapped pair (later first) would tune λ toward the older checkpoint without
    a word: refused, naming both, before any work; names without a step are not judged."""
    from ckmerge_ray import tune_merge
    from ckmerge_ray.inputs import check_order

    heldout = trajectory[-1].parent / "heldout.jsonl"
    with pytest.raises(ConfigError, match=r"checkpoint-120 \(step 120\) is listed before "
                                          r"checkpoint-80 \(step 80\): swap them"):
        tune_merge((trajectory[-1], trajectory[-2]), {"cpu": 1}, f"loss:{heldout}",
                   output_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match=r"step-80 \(step 80\) is listed before step_40"):
        check_order(["iter_10", "step-80", "step_40"])
    with pytest.raises(ConfigError, match="step-80 and checkpoint-80 are both step 80"):
        check_order(["step-80", "checkpoint-80"])
    check_order(["checkpoint-40", "checkpoint-80", "global_step120"])
    check_order(["final", "checkpoint-40"])  # not every name has a step: no judgement


def test_a_trainer_run_saved_without_its_tokenizer_tunes_with_the_tokenizer_given_apart(
        ray_session, trajectory, tmp_path):
    """transformers' Trainer given no processing_class saves checkpoints without tokenizer
    files (as most pretraining frameworks do): the objective refuses them, naming
    tokenizer=/--tokenizer; with the run's tokenizer given apart the pair tunes, and best/
    holds that tokenizer beside the merged weights."""
    from transformers import Trainer, TrainingArguments

    from ckmerge_ray import tune_merge
    from ckmerge_ray.errors import ObjectiveError
    from tests.test_watch import _Tokens

    run = tmp_path / "run"
    args = TrainingArguments(output_dir=str(run), max_steps=20, save_steps=10,
                             per_device_train_batch_size=4, learning_rate=1e-3, report_to=[],
                             use_cpu=True, logging_steps=100, disable_tqdm=True, seed=0)
    model = tiny_llama(0, vocab_size=512, max_position_embeddings=64)
    Trainer(model=model, args=args, train_dataset=_Tokens(vocab=512)).train()
    pair = (run / "checkpoint-10", run / "checkpoint-20")
    assert not (pair[1] / "tokenizer.json").exists()
    heldout = f"loss:{trajectory[-1].parent / 'heldout.jsonl'}"
    options = dict(objective_options={"seq_len": 64, "max_tokens": 512}, num_trials=2,
                   progress=False)
    with pytest.raises(ObjectiveError, match=r"holds no tokenizer files .* --tokenizer DIR"):
        tune_merge(pair, {"cpu": 1}, heldout, output_dir=tmp_path / "refused", **options)
    with pytest.raises(CheckpointError, match="tokenizer directory .* holds no tokenizer files"):
        tune_merge(pair, {"cpu": 1}, heldout, output_dir=tmp_path / "refused", tokenizer=run,
                   **options)
    assert not (tmp_path / "refused").exists()

    result = tune_merge(pair, {"cpu": 1}, heldout, output_dir=tmp_path / "tuned",
                        tokenizer=trajectory[-1], **options)
    assert result.table.num_rows == 3
    best = tmp_path / "tuned" / "best"
    assert (best / "tokenizer.json").read_bytes() == (trajectory[-1] / "tokenizer.json").read_bytes()
    run_json = json.loads((tmp_path / "tuned" / "run.json").read_text())
    assert run_json["checkpoint"]["tokenizer"] == str(trajectory[-1])  # a resume reads it again

    from ckmerge_ray.inputs import tokenizer_dir
    from ckmerge_ray.objectives.base import load_tokenizer

    bare = tmp_path / "bare"  # tokenizer.json alone: AutoTokenizer also needs a config.json
    bare.mkdir()
    shutil.copy(trajectory[-1] / "tokenizer.json", bare)
    staged = tokenizer_dir(load_checkpoint_info(pair[1]), str(bare))
    assert staged != bare and (staged / "config.json").exists()
    assert load_tokenizer(staged)("one trajectory")["input_ids"]
