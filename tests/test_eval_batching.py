"""Evaluation batching: a batch that runs out of memory is halved and the evaluation recovers;
peak memory is measured; errors other than out-of-memory are not swallowed."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ckmerge_ray.objectives.batching import PeakMemory, halving, is_oom

# Runs in a child process: it caps its own address space (RLIMIT_AS) just above what a batch of
# 4 windows needs, so that larger batches fail to allocate for real (the CPU allocator's
# "can't allocate memory"), the same condition a GPU's OutOfMemoryError signals. A fixed mmap
# threshold makes every large tensor its own mapping, so the address space tracks live memory.
OOM_CHILD = textwrap.dedent("""
    import gc, resource, torch, transformers as tf
    from ckmerge_ray.objectives import HeldoutLoss
    from ckmerge_ray.objectives.batching import PeakMemory

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=2000, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=512, tie_word_embeddings=False,
                         attn_implementation="eager")
    model = tf.LlamaForCausalLM(cfg).eval()
    windows = torch.randint(0, 2000, (16, 512), generator=torch.Generator().manual_seed(1)).numpy()

    def objective(batch, some=windows):
        obj = HeldoutLoss("unused.txt", seq_len=512, batch_size=batch)
        obj.windows = some
        return obj

    ref = objective(2).evaluate(model, torch.device("cpu"))  # warms up, and the expected score
    peaks = []
    for batch in (1, 2):  # one pass each
        with PeakMemory("cpu") as peak:
            objective(batch, windows[:batch]).evaluate(model, torch.device("cpu"))
        peaks.append(peak.bytes)
    per_window = peaks[1] - peaks[0]
    gc.collect()  # garbage still mapped now, freed later, would widen the room below
    with open("/proc/self/statm") as f:
        vm = int(f.read().split()[0]) * 4096
    # Memory grows linearly with the batch: room for 2 + 2.5 windows, so 4 fit and 8 do not.
    resource.setrlimit(resource.RLIMIT_AS, (vm + peaks[1] + int(2.5 * per_window),
                                            resource.RLIM_INFINITY))
    obj = objective(16)
    first = obj.evaluate(model, torch.device("cpu"))
    second = obj.evaluate(model, torch.device("cpu"))  # the worker keeps the size that worked
    print("RESULT", per_window, first["eval_batch_size"], second["eval_batch_size"],
          first["loss"], second["loss"], ref["loss"])
    print("MEMORY", "vm", vm, "peaks", peaks, "limit", vm + peaks[1] + int(2.5 * per_window))
""")


def test_out_of_memory_batch_is_halved_and_kept(tmp_path):
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    r = subprocess.run([sys.executable, "-c", OOM_CHILD], capture_output=True, text=True,
                       cwd=tmp_path, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT"))
    per_window, first_batch, second_batch, first, second, ref = line.split()[1:]
    assert int(per_window) > 4 * 2**20  # the margins are far above allocator noise
    assert first_batch == second_batch == "4", r.stdout  # 16 -> 8 -> 4, then kept
    assert float(first) == pytest.approx(float(ref), rel=1e-6)
    assert float(second) == pytest.approx(float(ref), rel=1e-6)
    assert r.stderr.count("ran out of memory at batch size") == 2  # 16 and 8, each once


def test_halving_tries_each_size_once_and_records_it():
    """The fault here is raised by hand (CUDA's OutOfMemoryError cannot happen on this CPU-only
    machine); the test above causes a real one."""
    tried = []

    def run(batch):
        tried.append(batch)
        if batch > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return batch * 10

    assert halving(run, 16, torch.device("cpu")) == (20, 2)
    assert tried == [16, 8, 4, 2]


def test_halving_gives_up_at_one_and_passes_other_errors_through():
    def oom(batch):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")

    with pytest.raises(RuntimeError, match="can't allocate memory"):
        halving(oom, 4, torch.device("cpu"))
    tried = []

    def broken(batch):
        tried.append(batch)
        raise ValueError("not a memory problem")

    with pytest.raises(ValueError):
        halving(broken, 8, torch.device("cpu"))
    assert tried == [8]
    assert not is_oom(ValueError("out of memory"))  # only allocation errors count


def test_peak_memory_sees_a_temporary_allocation():
    with PeakMemory("cpu") as peak:
        block = torch.ones(64 * 2**20, dtype=torch.uint8)  # 64 MiB, touched
        del block
    assert 60 <= peak.mb <= 80
