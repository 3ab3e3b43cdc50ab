"""Shards in the Ray object store: exact round trip, zero-copy reads, bad tensors refused."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckmerge_ray.checkpoints import load_checkpoint_info, plan_shards
from ckmerge_ray.errors import CheckpointError
from ckmerge_ray.store import get_shard, put_checkpoint


def test_round_trip_is_exact_for_bf16(ray_session, trajectory_bf16):
    info = load_checkpoint_info(trajectory_bf16[-1])
    plan = plan_shards(info, 1 << 30)
    stored = put_checkpoint(info, plan)
    assert len(stored.refs) == len(info.shard_files) > 1  # one object per safetensors shard
    for ref, names in zip(stored.refs, stored.names):
        got = get_shard(ref)
        want = info.read_tensors(names)
        for name in names:
            assert got[name].dtype == torch.bfloat16
            assert torch.equal(got[name], want[name])


def test_reads_are_zero_copy(ray_session, trajectory_bf16):
    import ray

    info = load_checkpoint_info(trajectory_bf16[-1])
    stored = put_checkpoint(info, plan_shards(info, 1 << 30))
    first = ray.get(stored.refs[0])
    second = ray.get(stored.refs[0])
    name = stored.names[0][0]
    dtype, offset, _ = first["layout"][name]
    a, b = first["buffers"][dtype], second["buffers"][dtype]
    # Two gets see the same shared-memory bytes, read-only: nothing was copied.
    assert not a.flags.writeable
    assert a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
    t = get_shard(stored.refs[0])[name]
    assert t.data_ptr() == a.__array_interface__["data"][0] + offset * a.itemsize
    # every tensor of the shard is a view into its dtype's flat buffer, 64-byte aligned
    assert all(off * first["buffers"][d].itemsize % 64 == 0 for d, off, _ in first["layout"].values())


def test_single_file_split_into_bounded_objects(ray_session, tiny_pair):
    info = load_checkpoint_info(tiny_pair[0])
    stored = put_checkpoint(info, plan_shards(info, 8192))
    assert len(stored.refs) > 1
    assert all(n <= 8192 or len(names) == 1 for n, names in zip(stored.nbytes, stored.names))
    assert stored.total_bytes == info.nbytes


def test_nan_in_weights_is_refused(ray_session, tiny_pair):
    f = tiny_pair[0] / "model.safetensors"
    t = load_file(f)
    t["model.norm.weight"][3] = float("nan")
    save_file(t, f, metadata={"format": "pt"})
    info = load_checkpoint_info(tiny_pair[0])
    with pytest.raises(CheckpointError, match="tensor 'model.norm.weight' in .* contains NaN or inf"):
        put_checkpoint(info, plan_shards(info, 1 << 30))


def test_non_float_tensors_must_match(ray_session, tiny_pair):
    for i, path in enumerate(tiny_pair):
        f = path / "model.safetensors"
        t = load_file(f)
        t["step_counter"] = torch.tensor([i], dtype=torch.int64)
        save_file(t, f, metadata={"format": "pt"})
    ref = {}
    infos = [load_checkpoint_info(p) for p in tiny_pair]
    plan = plan_shards(infos[1], 1 << 30)
    put_checkpoint(infos[0], plan, reference=ref)
    with pytest.raises(CheckpointError, match="non-float tensor 'step_counter' differs"):
        put_checkpoint(infos[1], plan, reference=ref)
