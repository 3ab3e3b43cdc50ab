"""The merge arithmetic against an independent fp32 computation."""

import pytest
import torch

from ckmerge_ray.merge import lerp_into_, merge_shard_into_, merge_state_dicts


def checkpoint_like(dtype, n=200_000, seed=0):
    """Two tensors that differ by a little more than bf16 rounding, as adjacent checkpoints do."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, generator=g) * 0.02
    b = a + torch.randn(n, generator=g) * 0.0005
    return a.to(dtype), b.to(dtype)


def ulp_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Distance in units in the last place, for same-sign 16-bit floats (bit patterns differ)."""
    bits = torch.int16
    return (x.view(bits).to(torch.int32) - y.view(bits).to(torch.int32)).abs()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lam", [0.5, 0.6180339, 0.9, 1.0])
def test_half_precision_merge_is_fp32_formula_rounded_once(dtype, lam):
    a, b = checkpoint_like(dtype)
    out = torch.empty_like(a)
    lerp_into_(out, a, b, lam)
    exact = (lam * b.double() + (1 - lam) * a.double()).to(dtype)  # one rounding from exact
    d = ulp_distance(out, exact)
    assert int(d.max()) <= 1, "more than one rounding away from the exact merge"
    assert float((d == 0).float().mean()) > 0.99
    # The check discriminates: three bf16 roundings (λ*b + (1-λ)*a in bf16) fail it.
    naive = lam * b + (1 - lam) * a
    if lam not in (0.5, 1.0):
        assert float((ulp_distance(naive, exact) == 0).float().mean()) < 0.95


def test_fp32_merge_matches_formula():
    a, b = checkpoint_like(torch.float32)
    out = torch.empty_like(a)
    lerp_into_(out, a, b, 0.7)
    torch.testing.assert_close(out, 0.7 * b + 0.3 * a, rtol=0, atol=1e-7)


def test_endpoints_reproduce_checkpoints_exactly():
    a, b = checkpoint_like(torch.bfloat16)
    out = torch.empty_like(a)
    assert torch.equal(lerp_into_(out, a, b, 1.0), b)
    assert torch.equal(lerp_into_(out, a, b, 0.0), a)


def test_non_float_tensors_are_copied():
    dst = torch.zeros(4, dtype=torch.int64)
    lerp_into_(dst, torch.arange(4), torch.arange(4), 0.3)
    assert dst.tolist() == [0, 1, 2, 3]


def test_mixed_dtype_rounds_once_into_destination():
    a, b = checkpoint_like(torch.float32)
    dst = torch.empty(a.shape, dtype=torch.bfloat16)
    lerp_into_(dst, a, b, 0.3)
    assert torch.equal(dst, torch.lerp(a, b, 0.3).to(torch.bfloat16))


def test_tied_weight_is_merged_once():
    shared = torch.zeros(3)
    params = {"embed.weight": shared, "lm_head.weight": shared}
    earlier = {"embed.weight": torch.ones(3), "lm_head.weight": torch.ones(3) * 100}
    later = {"embed.weight": torch.ones(3) * 3, "lm_head.weight": torch.ones(3) * 300}
    written = merge_shard_into_(params, earlier, later, 0.5, done=set())
    assert shared.tolist() == [2.0, 2.0, 2.0]  # from the first name only
    assert written == 3 * 4


def test_merge_state_dicts_keeps_inputs():
    a, b = checkpoint_like(torch.bfloat16, n=10)
    a0, b0 = a.clone(), b.clone()
    out = merge_state_dicts({"w": a}, {"w": b}, 0.25)
    assert torch.equal(a, a0) and torch.equal(b, b0)
    assert out["w"].dtype == torch.bfloat16


def test_gpu_shard_cache_copies_pairs_and_stays_off_on_cpu():
    from ckmerge_ray.trial import Resident, cache_shards_on_device, shards_to_device

    from ckmerge_ray.store import pack_shard, shard_view

    a, b = checkpoint_like(torch.bfloat16, n=1000)
    pairs = [(shard_view(pack_shard({"w": a})), shard_view(pack_shard({"w": b})))]
    copied = shards_to_device(pairs, "cpu")
    assert torch.equal(copied[0][0].tensors["w"], a) and torch.equal(copied[0][1].tensors["w"], b)
    # On a CPU worker the shards stay zero-copy views of the store: nothing is fetched or copied
    # here (the plan is never touched). The CUDA branch is measured by benchmarks/gpu_merge.py.
    resident = Resident(model=None, tensors={}, uss_before_build_mb=0.0)
    assert cache_shards_on_device(resident, plan=None, device=torch.device("cpu")) is False
    assert resident.shards is None and not resident.shards_on_device


def test_flat_layout_merge_equals_the_per_tensor_merge():
    """A model moved into the shards' flat layout merges with one lerp per buffer, and gets
    exactly what the per-tensor merge writes, tied weights included."""
    from ckmerge_ray.store import pack_shard, shard_view
    from ckmerge_ray.model import adopt_flat_layout, tensor_map
    from tests.conftest import tiny_llama

    earlier = tiny_llama(0, tie_word_embeddings=True).to(torch.bfloat16).state_dict()
    later = tiny_llama(1, tie_word_embeddings=True).to(torch.bfloat16).state_dict()
    earlier.pop("lm_head.weight"), later.pop("lm_head.weight")  # saved once, as HF does
    names = list(later)
    groups = [names[: len(names) // 2], names[len(names) // 2:]]  # two shards
    shards = [(shard_view(pack_shard({n: earlier[n] for n in g})),
               shard_view(pack_shard({n: later[n] for n in g}))) for g in groups]

    flat_model = tiny_llama(2, tie_word_embeddings=True).to(torch.bfloat16).requires_grad_(False)
    tensors = tensor_map(flat_model)
    flat = adopt_flat_layout(tensors, [l.layout for _, l in shards])
    assert flat is not None and len(flat) == 2
    from ckmerge_ray.merge import merge_buffers_into_

    for buffers, (e, l) in zip(flat, shards):
        merge_buffers_into_(buffers, e.buffers, l.buffers, 0.3)
    want = merge_state_dicts(earlier, later, 0.3)
    for n in names:
        assert torch.equal(tensors[n], want[n]), n
    assert flat_model.lm_head.weight is flat_model.model.embed_tokens.weight  # still tied
    assert torch.equal(flat_model.lm_head.weight, want["model.embed_tokens.weight"])
    # a tensor stored under two names cannot share one layout: nothing is changed
    other = tiny_llama(3, tie_word_embeddings=True).to(torch.bfloat16)
    both = {**later, "lm_head.weight": later["model.embed_tokens.weight"]}
    before = {n: t.data_ptr() for n, t in tensor_map(other).items()}
    assert adopt_flat_layout(tensor_map(other), [shard_view(pack_shard(both)).layout]) is None
    assert {n: t.data_ptr() for n, t in tensor_map(other).items()} == before
