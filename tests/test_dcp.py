"""Checkpoints as trainers write them: torch.distributed.checkpoint (DCP) directories written here
by `torch.distributed.checkpoint.save` (single process), in the Trainer/Accelerate FSDP layout
and in torchtitan's naming, with wrapper prefixes and optimizer state inside. That tuning such a
pair gives the same scores, best λ and bit-identical best/ as the same weights saved as
safetensors is tested end to end in tests/test_remote.py (both read from an S3 server; the
local reader is the same code through a local Location), and here tensor for tensor."""

import re
import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

from ckmerge_ray.checkpoints import NameMap, load_checkpoint_info
from ckmerge_ray.config import CheckpointConfig
from ckmerge_ray.errors import CheckpointError, ConfigError
from ckmerge_ray.inputs import load_window
from ckmerge_ray.objectives import HeldoutLoss
from tests.conftest import tiny_llama

SEQ = {"seq_len": 64, "max_tokens": 2048}
TITAN_MAP = "examples/torchtitan_llama.yaml"
HF_SIDE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "generation_config.json")


def hf_tensors(ckpt):
    return {k: v for f in sorted(ckpt.glob("*.safetensors")) for k, v in load_file(f).items()}


def optimizer_state(tensors):
    """AdamW state for these weights, as `optimizer.state_dict()` keys it (by index)."""
    return {"state": {i: {"exp_avg": torch.randn_like(t), "exp_avg_sq": torch.rand_like(t),
                          "step": torch.tensor(7.0)} for i, t in enumerate(tensors.values())},
            "param_groups": [{"lr": 3e-4, "betas": (0.9, 0.95), "params": list(range(len(tensors)))}]}


def save_fsdp_layout(hf_ckpt, dest):
    """Trainer/Accelerate with FSDP's sharded state dict: checkpoint-N/pytorch_model_fsdp_0/
    holds {"model": state_dict} (here of a torch.compile'd model: `_orig_mod.` names) and the
    optimizer state beside it; config.json and the tokenizer in checkpoint-N/."""
    tensors = hf_tensors(hf_ckpt)
    model = {f"_orig_mod.{k}": v for k, v in tensors.items()}
    dcp.save({"model": model, "optimizer": optimizer_state(tensors), "step": 120},
             checkpoint_id=str(dest / "pytorch_model_fsdp_0"), no_dist=True)
    for name in HF_SIDE_FILES:
        if (hf_ckpt / name).exists():
            shutil.copy(hf_ckpt / name, dest / name)
    return dest


def to_titan(hf: dict, config: dict, rotary: bool = True) -> dict:
    """Hugging Face Llama tensors in torchtitan's names and rotary layout (the inverse of the
    worked name map), independently of ckmerge_ray; with `rotary` False, in its names only."""
    def unpermute(w, heads):  # half-split -> interleaved rotary rows (torchtitan's _reverse_permute)
        if not rotary:
            return w
        rows = w.shape[0]
        return w.view(heads, 2, rows // heads // 2, -1).transpose(1, 2).reshape(w.shape)

    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    out = {"tok_embeddings.weight": hf["model.embed_tokens.weight"],
           "norm.weight": hf["model.norm.weight"]}
    if "lm_head.weight" in hf:  # absent when the embedding is tied (the demo's Llama)
        out["output.weight"] = hf["lm_head.weight"]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.update({
            f"layers.{i}.attention.wq.weight": unpermute(hf[p + "self_attn.q_proj.weight"], heads),
            f"layers.{i}.attention.wk.weight": unpermute(hf[p + "self_attn.k_proj.weight"], kv),
            f"layers.{i}.attention.wv.weight": hf[p + "self_attn.v_proj.weight"],
            f"layers.{i}.attention.wo.weight": hf[p + "self_attn.o_proj.weight"],
            f"layers.{i}.feed_forward.w1.weight": hf[p + "mlp.gate_proj.weight"],
            f"layers.{i}.feed_forward.w2.weight": hf[p + "mlp.down_proj.weight"],
            f"layers.{i}.feed_forward.w3.weight": hf[p + "mlp.up_proj.weight"],
            f"layers.{i}.attention_norm.weight": hf[p + "input_layernorm.weight"],
            f"layers.{i}.ffn_norm.weight": hf[p + "post_attention_layernorm.weight"],
        })
    assert len(out) == len(hf)
    return {k: v.contiguous() for k, v in out.items()}


def save_titan_layout(hf_ckpt, dest, rotary: bool = True):
    """torchtitan's step-N/: model weights at the top level in its own names, freqs_cis, and
    optimizer, lr_scheduler, dataloader and train_state entries beside them (`rotary`: as
    `to_titan`)."""
    import json

    config = json.loads((hf_ckpt / "config.json").read_text())
    model = to_titan(hf_tensors(hf_ckpt), config, rotary)
    state = {**{f"_orig_mod.{k}": v for k, v in model.items()},
             "freqs_cis": torch.randn(64, 4), "optimizer": optimizer_state(model),
             "lr_scheduler": {"last_epoch": 120}, "train_state": {"step": 120}}
    dcp.save(state, checkpoint_id=str(dest), no_dist=True)
    return dest


@pytest.fixture(scope="module")
def dcp_pair(trajectory, tmp_path_factory):
    out = tmp_path_factory.mktemp("dcp")
    return tuple(save_fsdp_layout(c, out / c.name) for c in trajectory[-2:])


def test_trainer_fsdp_layout_reads_weights_only(dcp_pair, trajectory):
    info = load_checkpoint_info(dcp_pair[1])
    assert info.format == "dcp" and info.name == trajectory[-1].name
    assert info.path.name == "pytorch_model_fsdp_0" and info.model_dir.name == info.name
    assert any(n.startswith("optimizer.") for n in info.specs)  # headers: everything stored
    infos = load_window(dcp_pair, CheckpointConfig())
    hf = hf_tensors(trajectory[-1])
    assert set(infos[1].specs) == set(hf)  # optimizer skipped, model. and _orig_mod. stripped
    assert infos[1].renaming.skipped == {"optimizer": 3 * len(hf)}  # exp_avg, exp_avg_sq, step
    assert set(infos[1].renaming.stripped) == {"_orig_mod.", "model."}
    read = infos[1].read_tensors(sorted(hf))
    assert all(torch.equal(read[n], hf[n]) for n in hf)


def assert_hf_loss(info, hf_ckpt):
    """The model built from `info`'s read (mapped) tensors has exactly the held-out loss of the
    same weights loaded by `from_pretrained` from the HF directory `hf_ckpt`."""
    from transformers import AutoModelForCausalLM

    from ckmerge_ray.model import build_model, dtypes_of, tensor_map

    model = build_model(info.config, dtypes_of(info))
    tensors = info.read_tensors(list(info.specs))
    own = tensor_map(model)
    with torch.no_grad():
        for name, t in tensors.items():
            own[name].copy_(t)
    reference = AutoModelForCausalLM.from_pretrained(hf_ckpt)
    objective = HeldoutLoss(hf_ckpt.parent / "heldout.jsonl", **SEQ)
    objective.prepare(hf_ckpt)
    mapped = objective.evaluate(model.eval(), torch.device("cpu"))["score"]
    assert mapped == objective.evaluate(reference.eval(), torch.device("cpu"))["score"]


def test_torchtitan_names_with_the_worked_name_map_give_the_hf_loss(trajectory, tmp_path):
    titan = [save_titan_layout(c, tmp_path / f"step-{i}") for i, c in
             enumerate(trajectory[-2:])]
    cfg = CheckpointConfig(name_map=TITAN_MAP, model_config=str(trajectory[-1] / "config.json"))
    infos = load_window(titan, cfg)
    assert_hf_loss(infos[1], trajectory[-1])
    assert set(infos[1].renaming.skipped) == {"optimizer"}  # its tensors
    assert set(infos[1].non_tensors) == {"optimizer", "lr_scheduler", "train_state"}  # the rest


def test_a_python_callable_as_name_map(trajectory, tmp_path):
    """The name map as a Python callable (API only): the worked map's renaming and skip, written
    as a function; a callable renames only, so these checkpoints keep Hugging Face's rotary
    layout under torchtitan's names (its permutation needs the YAML map's `rotary` rule)."""
    import yaml

    worked = yaml.safe_load(open(TITAN_MAP))
    rules = [(re.compile(r["match"]), r["to"]) for r in worked["rules"]]

    def titan_to_hf(name):
        if any(re.search(p, name) for p in worked["skip"]):
            return None  # freqs_cis: not a weight
        return next((rx.sub(to, name) for rx, to in rules if rx.search(name)), name)

    titan = [save_titan_layout(c, tmp_path / f"step-{i}", rotary=False) for i, c in
             enumerate(trajectory[-2:])]
    infos = load_window(titan, CheckpointConfig(name_map=titan_to_hf,
                                                model_config=str(trajectory[-1] / "config.json")))
    assert infos[1].renaming.name_map == "titan_to_hf"
    hf = hf_tensors(trajectory[-1])
    assert set(infos[1].specs) == set(hf)
    read = infos[1].read_tensors(sorted(hf))
    assert all(torch.equal(read[n], hf[n]) for n in hf)
    assert_hf_loss(infos[1], trajectory[-1])


def test_resume_reads_the_checkpoints_as_the_run_did(ray_session, trajectory, tmp_path, capsys):
    """`--resume` repeats how the run read its checkpoints (format, name map, model config) and
    where it published best/, from run.json alone: here the name map's file is gone by then.
    Before, run.json kept only allow_pickle and trust_remote_code, and resuming this run failed
    on torchtitan's names."""
    import json

    from ckmerge_ray.cli import main as cli

    titan = [save_titan_layout(c, tmp_path / f"step-{i}") for i, c in enumerate(trajectory[-2:])]
    name_map = tmp_path / "titan.yaml"
    shutil.copy(TITAN_MAP, name_map)
    out, published = tmp_path / "run", tmp_path / "published"
    heldout = trajectory[-1].parent / "heldout.jsonl"
    args = ["tune", *map(str, titan), "--objective", f"loss:{heldout}", "--seq-len", "64",
            "--max-tokens", "2048", "--trials", "2", "--format", "dcp",
            "--name-map", str(name_map), "--model-config", str(trajectory[-1] / "config.json"),
            "--export-to", str(published), "--output", str(out), "--quiet"]
    assert cli(args) == 0
    first = capsys.readouterr().out
    run = json.loads((out / "run.json").read_text())
    assert run["checkpoint"]["format"] == "dcp" and run["run"]["export_to"] == str(published)
    assert len(run["checkpoint"]["name_map"]["rules"]) == len(
        NameMap.from_file(TITAN_MAP).rules)
    name_map.unlink()
    assert cli(["tune", "--resume", str(out), "--quiet"]) == 0
    again = capsys.readouterr().out
    best = [line for line in first.splitlines() if "best" in line.lower()]
    assert best and all(line in again for line in best), (first, again)
    assert (published / "config.json").exists()


def test_the_record_of_a_run_keeps_local_paths_absolute(tmp_path, monkeypatch):
    """A run started with relative --export-to / --model-config is resumed from anywhere: the
    record holds them absolute (a URI as given)."""
    from ckmerge_ray.config import RunConfig, launch_record, resumed_settings

    monkeypatch.chdir(tmp_path)
    record = launch_record(RunConfig(export_to="pub"),
                           CheckpointConfig(model_config="m/config.json"), 1)
    assert record["run"]["export_to"] == str(tmp_path / "pub")
    assert record["checkpoint"]["model_config"] == str(tmp_path / "m" / "config.json")
    monkeypatch.chdir("/")
    run, checkpoint = resumed_settings(record, str(tmp_path / "run"))
    assert run.export_to == str(tmp_path / "pub")
    assert launch_record(RunConfig(export_to="s3://b/run/best"), CheckpointConfig(), 1)[
        "run"]["export_to"] == "s3://b/run/best"


def test_a_python_callable_name_map_is_not_stored_and_resume_says_so(tmp_path):
    import json

    from ckmerge_ray.config import RunConfig, launch_record, resumed_settings

    record = launch_record(RunConfig(), CheckpointConfig(name_map=lambda n: n), 1)
    with pytest.raises(ConfigError, match=r"Python callable \(<lambda>\).*resume it from Python"):
        resumed_settings(json.loads(json.dumps(record)), str(tmp_path))


# --- bad input: each refused with its own message, before any trial ---------------------------

def test_dcp_folder_without_metadata(dcp_pair, tmp_path):
    broken = tmp_path / "checkpoint-9"
    shutil.copytree(dcp_pair[1], broken)
    (broken / "pytorch_model_fsdp_0" / ".metadata").unlink()
    with pytest.raises(CheckpointError, match=r"not a torch.distributed.checkpoint directory: "
                                              r"no \.metadata"):
        load_checkpoint_info(broken / "pytorch_model_fsdp_0")
    with pytest.raises(CheckpointError, match=r"no \.metadata"):
        load_checkpoint_info(broken, format="dcp")


def test_checkpoint_with_only_optimizer_state(trajectory, tmp_path):
    tensors = hf_tensors(trajectory[-1])
    for name in ("a", "b"):
        dcp.save({"optimizer": optimizer_state(tensors)}, checkpoint_id=str(tmp_path / name),
                 no_dist=True)
        shutil.copy(trajectory[-1] / "config.json", tmp_path / name)
    with pytest.raises(CheckpointError, match=r"holds no model weights, only training state: "
                                              r"skipped training state .*optimizer"):
        load_window([tmp_path / "a", tmp_path / "b"], CheckpointConfig())


def test_names_that_match_nothing_get_the_names_and_a_rule(trajectory, tmp_path):
    tensors = hf_tensors(trajectory[-1])
    for name in ("a", "b"):
        dcp.save({f"backbone.{k[len('model.'):]}" if k.startswith("model.") else k: v
                  for k, v in tensors.items()}, checkpoint_id=str(tmp_path / name), no_dist=True)
        shutil.copy(trajectory[-1] / "config.json", tmp_path / name)
    with pytest.raises(CheckpointError) as err:
        load_window([tmp_path / "a", tmp_path / "b"], CheckpointConfig())
    text = str(err.value)
    assert "do not match LlamaForCausalLM" in text and "unexpected ['backbone." in text
    assert "missing ['model." in text
    assert "match: '^backbone\\.(.*)$'" in text and "to: 'model.\\1'" in text


def test_name_map_that_makes_a_shape_mismatch(trajectory, tmp_path):
    titan = [save_titan_layout(c, tmp_path / f"step-{i}") for i, c in enumerate(trajectory[-2:])]
    bad = tmp_path / "bad.yaml"  # w1 (gate) and w2 (down) swapped: [ffn, hidden] vs [hidden, ffn]
    bad.write_text(open(TITAN_MAP).read().replace("mlp.gate_proj", "mlp.TMP")
                   .replace("mlp.down_proj", "mlp.gate_proj").replace("mlp.TMP", "mlp.down_proj"))
    cfg = CheckpointConfig(name_map=str(bad), model_config=str(trajectory[-1] / "config.json"))
    with pytest.raises(CheckpointError, match=r"mlp\.(gate|down)_proj\.weight' has shape \[\d+, "
                                              r"\d+\] but LlamaForCausalLM expects"):
        load_window(titan, cfg)


def test_dcp_without_any_config(trajectory, tmp_path):
    dcp.save({"model": hf_tensors(trajectory[-1])}, checkpoint_id=str(tmp_path / "x" / "w"),
             no_dist=True)
    with pytest.raises(CheckpointError, match="without the architecture: no config.json .*"
                                              "--model-config"):
        load_checkpoint_info(tmp_path / "x" / "w")


def test_name_map_file_errors(tmp_path):
    bad = tmp_path / "m.yaml"
    bad.write_text("rules:\n  - match: '(['\n    to: x\n")
    with pytest.raises(ConfigError, match="not a valid regex"):
        NameMap.from_file(bad)
    bad.write_text("rules:\n  - {match: a, to: [x, y]}\n")
    with pytest.raises(ConfigError, match="without a split"):
        NameMap.from_file(bad)
    with pytest.raises(ConfigError, match="name-map file does not exist"):
        CheckpointConfig(name_map=str(tmp_path / "nope.yaml"))


def test_metadata_with_code_is_refused(dcp_pair, tmp_path):
    import os
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch pwned",))

    evil = tmp_path / "evil"
    shutil.copytree(dcp_pair[1], evil)
    (evil / "pytorch_model_fsdp_0" / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError, match=r"global (posix|os)\.system is not allowed in DCP "
                                              "metadata"):
        load_checkpoint_info(evil)
    assert not os.path.exists("pwned")


def test_split_and_rotary_transforms_are_exact():
    from ckmerge_ray.checkpoints.names import NameRule, rotary_half_split

    model = tiny_llama(0, num_key_value_heads=1)
    sd = model.state_dict()
    q, k, v = (sd[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv")
    rule = NameRule(r"^wqkv$", ("q", "k", "v"), split=("hidden_size", "num_key_value_heads * "
                                                       "head_dim", "num_key_value_heads * head_dim"))
    targets, fn = rule.apply("wqkv", model.config.to_dict())
    parts = fn(torch.cat([q, k, v]))
    assert targets == ["q", "k", "v"] and all(torch.equal(a, b) for a, b in zip(parts, (q, k, v)))
    heads = model.config.num_attention_heads
    interleaved = q.view(heads, 2, -1, q.shape[1]).transpose(1, 2).reshape(q.shape)
    assert torch.equal(rotary_half_split(interleaved, heads), q)


@pytest.mark.parametrize("extra, message", [
    (["--name-map", "nope.yaml"], "name-map file does not exist: nope.yaml"),
    (["--format", "dcp"], "is not a torch.distributed.checkpoint directory"),
])
def test_cli_checkpoint_options_refuse_bad_input_in_one_line(tiny_pair, capsys, extra, message):
    from ckmerge_ray.cli import main as cli_main

    args = ["tune", str(tiny_pair[0]), str(tiny_pair[1]), "--objective", "loss:x.jsonl",
            "--quiet", *extra]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("ckmerge-ray: error: ") and message in err and err.count("\n") == 1


def test_torchtitan_names_without_a_map_point_to_the_example(trajectory, tmp_path):
    titan = [save_titan_layout(c, tmp_path / f"step-{i}") for i, c in enumerate(trajectory[-2:])]
    cfg = CheckpointConfig(model_config=str(trajectory[-1] / "config.json"))
    with pytest.raises(CheckpointError) as err:
        load_window(titan, cfg)
    assert "torchtitan_llama.yaml" in str(err.value) and "match:" not in str(err.value)


def test_a_name_map_typo_names_the_map_and_suggests_no_wrong_rule(trajectory, tmp_path):
    titan = [save_titan_layout(c, tmp_path / f"step-{i}") for i, c in enumerate(trajectory[-2:])]
    typo = tmp_path / "typo.yaml"
    typo.write_text(open(TITAN_MAP).read().replace("self_attn.q_proj", "self_attn.q_prj"))
    cfg = CheckpointConfig(name_map=str(typo), model_config=str(trajectory[-1] / "config.json"))
    with pytest.raises(CheckpointError) as err:
        load_window(titan, cfg)
    text = str(err.value)
    assert f"The name map {typo} made '_orig_mod.layers.0.attention.wq.weight' -> " \
        "'model.layers.0.self_attn.q_prj.weight'" in text and "check its 'to'" in text
    assert "match:" not in text


def test_format_hf_on_a_trainer_fsdp_folder_says_what_it_holds(dcp_pair):
    with pytest.raises(CheckpointError, match="holds a torch.distributed.checkpoint in .*"
                                              "pytorch_model_fsdp_0.*--format dcp"):
        load_checkpoint_info(dcp_pair[1], format="hf")
