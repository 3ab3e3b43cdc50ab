"""Benchmarks stay runnable and keep their relations: each --quick mode runs, ends with key=value
headline figures, and those figures must satisfy a relation that a regression would break.

Every relation compares two things measured in the same run (the merge against a copy of the
same bytes, the trial path against the arithmetic it performs, cached against uncached), never
an absolute time: the suite runs on 2 shared cores. Each factor is stated beside its assertion
with the figures it rests on (BENCHMARKS.md's full runs, and --quick runs on the same 2-core
machine while other jobs shared it); the factors leave room for that noise and still fail on a
regression of about 3x or on the relation turning the wrong way.
"""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_quick(script, tmp_path, *extra):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", *extra],
                       capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    last = r.stdout.strip().splitlines()[-1]
    print(script, last)  # shown by pytest when an assertion on the figures fails
    return dict(kv.split("=", 1) for kv in last.split())


def test_sample_efficiency_quick(tmp_path):
    if not (ROOT / "benchmarks" / "landscapes.json").exists():
        pytest.skip("benchmarks/landscapes.json is not present")
    figures = run_quick("sample_efficiency.py", tmp_path)
    assert {"gp_hedge_q_1_a0_5", "random_a0_5", "gp_hedge_q_1_a0_0"} <= set(figures)
    # Median trials to reach 1 % of the available gain ('inf' = not within 12), same landscapes
    # and seeds; --quick runs 2 seeds on every fourth held-out pair (3 with an interior optimum),
    # so its medians are coarse. BENCHMARKS.md (held-out split, 10 seeds): GP-Hedge 3 on
    # [0.5, 1] and 4 on [0, 1], random 6 and >12. --quick measured: GP-Hedge 4.5 and 5.5, random
    # 10 and inf. On [0.5, 1] random search is competitive (a short interval, a smooth bowl; it
    # won 3 to 5 with the seeds used before landscape_seed), so there the test only bounds the
    # hedge; on [0, 1] a GP that learned nothing from its observations is random search (9 to
    # >12), and the hedge must beat it.
    hedge = {a: float(figures[f"gp_hedge_q_1_a{a}"]) for a in ("0_5", "0_0")}
    assert hedge["0_5"] <= 8 and hedge["0_0"] <= 8, figures
    assert hedge["0_0"] < float(figures["random_a0_0"]), figures


@pytest.fixture(scope="module")
def quick_pair_cache(tmp_path_factory):
    """merge_throughput.py and trial_overhead.py --quick both use common.make_pair's 14M bf16
    pair (reused when already on disk): written once."""
    return tmp_path_factory.mktemp("quick_pairs")


def test_merge_throughput_quick(tmp_path, quick_pair_cache):
    figures = run_quick("merge_throughput.py", tmp_path, "--cache", str(quick_pair_cache))
    # merge GB/s ÷ copy GB/s of the same bytes, back to back. BENCHMARKS.md: 0.92–1.10 (median
    # of pairs) from 14M to 953M; --quick (14M, 3 pairs, shared cores): fp32 1.10, bf16 0.83,
    # IQR down to 0.67. ≥ 0.3 never flakes on that noise and fails if the merge gets ~3x slower
    # than the memory traffic it needs (e.g. an extra copy per tensor, or fp64 arithmetic).
    for dtype in ("fp32", "bf16"):
        assert float(figures[f"merge_bw_ratio_{dtype}"]) >= 0.3, figures


def test_trial_overhead_quick(tmp_path, quick_pair_cache):
    figures = run_quick("trial_overhead.py", tmp_path, "--cache", str(quick_pair_cache))
    # (a) the product's trial path (fetch the shards, lerp into the resident model) ÷ (b) a naive
    # from_pretrained merge, same model, same run. Target 0.05 (docstring); BENCHMARKS.md 0.024
    # at 134M, --quick (14M) 0.016–0.023. ≤ 0.1 fails if the trial path gets ~5x slower.
    assert float(figures["overhead_ratio"]) <= 0.1, figures
    # (a) ÷ the lerp arithmetic it performs (torch.lerp over in-memory tensors), same run.
    # Target ≤ 3 (docstring); BENCHMARKS.md 1.04 at 134M; --quick 0.06 (the per-tensor reference
    # suffers more from shared cores than the trial's one lerp per flat buffer). Fails if the
    # trial path costs 3x the arithmetic it performs.
    assert float(figures["vs_arithmetic"]) <= 3, figures
    # A trial's worker holds one copy of the model: its private memory grows by the model's
    # bytes when the model is built (BENCHMARKS.md 1.00 at 134M; --quick 1.015). A second
    # copy (e.g. a state dict next to the model) would make it ≥ 2.
    assert float(figures["model_uss_first_over_model"]) <= 1.5, figures
    # Runs with 1, 2 and 4 concurrent trials, one after another in one Ray session: each run's
    # shards are freed when it ends, so the store's peak does not grow with concurrency.
    assert float(figures["store_growth"]) < 1.3


@pytest.fixture(scope="module")
def quick_trajectory_cache(tmp_path_factory):
    """end_to_end.py and lmeval_caching.py --quick train the same tiny trajectory: once."""
    return tmp_path_factory.mktemp("quick_trajectory")


def test_end_to_end_quick(tmp_path, quick_trajectory_cache):
    figures = run_quick("end_to_end.py", tmp_path, "--cache", str(quick_trajectory_cache))
    # Both runs complete: 4 trials in [0.5, 1] plus λ = 0.
    assert int(figures["trials_q1"]) == int(figures["trials_q2"]) == 5, figures
    # Two concurrent trials on these 2 shared cores may not pay off, but must not serialise
    # badly: wall(q=1) ÷ wall(q=2) was 1.09 in BENCHMARKS.md and 0.66 in --quick at load 19
    # (two more worker start-ups on contended cores). ≥ 0.4: q = 2 at most 2.5x slower.
    assert float(figures["speedup_q2"]) >= 0.4, figures
    for q in (1, 2):
        # The merge is cheap next to an evaluation of the same model: merge sum ÷ evaluation sum
        # was 0.001 (q=1) and 0.003 (q=2) in BENCHMARKS.md, 0.001 in --quick. ≤ 0.05.
        assert float(figures[f"merge_sum_q{q}"]) <= 0.05 * float(figures[f"eval_sum_q{q}"]), figures
        # The searcher's own time (GP fits, suggestions) is a small part of the run after Ray's
        # start: 0.035 (q=1) and 0.064 (q=2) in BENCHMARKS.md, 0.035 / 0.008 in --quick. ≤ 0.2.
        after_start = float(figures[f"wall_q{q}"]) - float(figures[f"ray_start_q{q}"])
        assert float(figures[f"search_q{q}"]) <= 0.2 * after_start, figures


def test_lmeval_caching_quick(tmp_path, quick_trajectory_cache):
    figures = run_quick("lmeval_caching.py", tmp_path, "--cache", str(quick_trajectory_cache))
    # Median later-trial seconds, uncached ÷ cached, same documents, same process. BENCHMARKS.md
    # 1.57x at 200 documents; --quick (16 documents, where the per-trial reloading dominates)
    # 7.97x at load average 9 and 3.82x at load 12. Without the cache both settings do the same
    # work (~1.0x). ≥ 1.5.
    assert float(figures["speedup_mc"]) >= 1.5, figures


def test_noisy_search_quick(tmp_path):
    if not (ROOT / "benchmarks" / "landscapes.json").exists():
        pytest.skip("benchmarks/landscapes.json is not present")
    figures = run_quick("noisy_search.py", tmp_path)
    assert {"plain_s0.5_q1_obs12", "aware_s0.5_q1_obs12"} <= set(figures)
    # Mean regret after 12 trials, % of the gain, σ = 0.5 × gain, q = 1. --quick runs one seed
    # (× 3 landscapes), which cannot make "noise-aware ≤ plain" stable: over seeds 0–5 the plain
    # GP's mean regret was 7.8, 23.4, 15.7, 0.5, 22.8, 1.7 and the noise-aware one's 4.0, 6.6,
    # 4.6, 6.1, 3.1, 5.1 (best observed) and 1.7, 2.7, 3.3, 4.1, 16.4, 3.8 (best posterior mean),
    # so plain wins on seeds 3 and 5 (BENCHMARKS.md, 20 seeds: 15.9 vs 6.4 and 5.6). The test
    # bounds the noise-aware search's regret instead: it stays below 10 % and 20 % of the gain
    # on every one of those seeds, where the plain GP reaches 16–23 % on three of six.
    assert float(figures["aware_s0.5_q1_obs12"]) <= 10, figures
    assert float(figures["aware_s0.5_q1_post12"]) <= 20, figures


def test_gpu_merge_quick(tmp_path):
    figures = run_quick("gpu_merge.py", tmp_path)
    import torch

    if torch.cuda.is_available():
        # On-device merge GB/s ÷ device-copy GB/s, same run (--quick: 134M bf16). BENCHMARKS.md
        # (H200): flat layout 0.98, per tensor 0.16 (one kernel launch per tensor at this size).
        # ≥ 0.3 flat and ≥ 0.05 per tensor: a ~3x regression fails; and the result is within one
        # bf16 rounding of the exact formula.
        assert float(figures["gpu_flat_ratio_min"]) >= 0.3, figures
        assert float(figures["gpu_merge_bw_ratio_min"]) >= 0.05, figures
        assert figures["within_one_rounding_all"] == "1", figures
    else:  # no CUDA here: the script says so and exits cleanly
        assert figures == {"gpu": "skipped"}


def test_compare_baselines_quick(tmp_path, quick_trajectory_cache):
    figures = run_quick("compare_baselines.py", tmp_path, "--cache", str(quick_trajectory_cache))
    assert int(figures["tuned_evaluations"]) == 4  # 3 λ in [0.5, 1] and λ = 0
    assert figures["best_baseline"] in {"uniform", "greedy", "sma", "ema", "wma", "fisher",
                                        "regmean", "grid", "random"}
    # λ = 1 is among the tuned run's evaluations, so its best is never worse than the later
    # checkpoint (--quick: 0, its best is λ = 1; BENCHMARKS.md: +0.053, within 0.0001 of the best
    # baseline, grid search).
    assert float(figures["tuned_gain"]) >= 0, figures


def test_cluster_throughput_quick(tmp_path, quick_trajectory_cache):
    figures = run_quick("cluster_throughput.py", tmp_path, "--cache", str(quick_trajectory_cache))
    # --quick runs the two-node setup only (the throughput ratios are BENCHMARKS.md's, from the
    # full run; test_end_to_end_quick bounds two concurrent trials against one): each checkpoint
    # crosses to the worker node once. The worker node's store took in 1.017x each checkpoint
    # in BENCHMARKS.md, 1.21x in --quick (its checkpoints are 0.3 MiB, so the run's plan and
    # Tune's small objects weigh more); a second pull of each would make it >= 1.5.
    assert float(figures["copies_per_ckpt_max"]) < 1.5, figures
    assert int(figures["received_bytes_per_ckpt"]) > 0, figures  # it did cross, once


def test_eval_throughput_quick(tmp_path):
    figures = run_quick("eval_throughput.py", tmp_path)
    # Held-out loss at vocabularies 128k and 256k: the chunked path's peak memory stays flat
    # (bounded by its head chunk), the full-logits path's doubles with the vocabulary.
    assert float(figures["chunked_mem_ratio"]) < 1.25
    assert float(figures["full_mem_ratio"]) > 1.6
    assert float(figures["loss_rel_diff_max"]) < 1e-5  # the same loss
    # The largest batch of 64-token windows one pass fits under a 1 GiB address-space cap at
    # 256k (a real allocation failure ends the search): the full logits' ~200 MiB per window
    # stop it at a few windows (--quick measured 5), the chunked path reaches the cap of 64.
    assert 1 <= int(figures["largest_full"]) < 16, figures
    assert int(figures["largest_chunked"]) == 64, figures


def test_eval_throughput_gpu_figures_count_what_they_say():
    """The GPU row's arithmetic, checked here since no GPU runs in the suite: the peak rate
    looked up by device name (the most specific name first) and the parameters counted."""
    import importlib.util

    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    spec = importlib.util.spec_from_file_location("eval_throughput",
                                                  ROOT / "benchmarks" / "eval_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.peak_tflops("NVIDIA H200") == 989.4
    assert bench.peak_tflops("NVIDIA H200 NVL") == 835.5
    assert bench.peak_tflops("NVIDIA H100 PCIe") == 756.5
    assert bench.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert bench.peak_tflops("Some Future GPU") is None
    untied = LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=1, num_attention_heads=2,
                                          tie_word_embeddings=False))
    total = sum(p.numel() for p in untied.parameters())
    assert bench.matmul_params(untied) == total - 1000 * 32  # the embedding is a lookup
    tied = GPT2LMHeadModel(GPT2Config(vocab_size=1000, n_embd=32, n_layer=1, n_head=2))
    # the tied matrix is the head: counted once, as parameters() gives it
    assert bench.matmul_params(tied) == sum(p.numel() for p in tied.parameters())


def test_convert_store_quick(tmp_path):
    figures = run_quick("convert_store.py", tmp_path)
    # Reading a Mixtral file and stacking its experts costs one extra copy of the expert
    # weights: 1.45x the plain store in BENCHMARKS.md, 1.53x in --quick. A conversion that
    # read a tensor twice or went through Python per element would pass 4x.
    assert float(figures["convert_ratio"]) < 4.0
    assert int(figures["tensors"]) == 21  # the model's tensors, not the file's 41


def test_checkpoint_sources_quick(tmp_path):
    pytest.importorskip("moto.server")
    pytest.importorskip("accelerate")
    figures = run_quick("checkpoint_sources.py", tmp_path, "--cache", str(tmp_path))
    # Every source puts the same tensors into the store: one SHA-256 over every stored tensor
    # (name, dtype, shape, bytes) is equal for HF and DCP, local and on S3, and for the
    # merge_fsdp_weights conversion; a reader that dropped, renamed, transposed or mis-cast a
    # tensor changes it.
    assert figures["same_digest"] == "1" and figures["same_stored"] == "1", figures
    assert int(figures["tensors"]) == 21  # 2 layers x 9 + embedding, norm, head
    # From the S3 server each stored byte is read once: the safetensors files' bytes exactly
    # (header and tensors), and of the DCP's .distcp exactly the model's items, never the
    # optimizer's (two thirds of the file: AdamW's two moments beside the weights).
    assert int(figures["hf_s3_weight_bytes_extra"]) == 0, figures
    assert int(figures["dcp_s3_weight_bytes_extra"]) == 0, figures
    assert float(figures["model_items_over_dcp"]) < 0.4, figures
    # What the server sent, counted by a proxy outside the process, covers those reads (it
    # cannot be less) plus HTTP overhead; a second read of a checkpoint would add 50 % of the
    # pair's tensor bytes. --quick measured +33,632 bytes and 0.021.
    assert int(figures["wire_minus_read_min"]) >= 0, figures
    assert float(figures["wire_extra_over_tensors_max"]) < 0.25, figures
    # The conversion path writes one more copy of the pair (model.safetensors + config.json).
    assert 0.99 < float(figures["convert_disk_over_hf"]) < 1.01, figures


def test_window_search_quick(tmp_path):
    if not (ROOT / "benchmarks" / "windows_llama-stdlib-fp32.json").exists():
        pytest.skip("benchmarks/windows_llama-stdlib-fp32.json is not present")
    figures = run_quick("window_search.py", tmp_path)
    # --quick replays the committed cache of real held-out losses (the demo Llama's last k = 3
    # checkpoints, the simplex family and the pair, budgets 6 and 10, 2 seeds) and never trains
    # or evaluates. A searcher that moved since the cache was made reads the nearest cached
    # weighting instead (counted in nearest_used, 0 when measured), so the figures stay close
    # to real ones.
    assert int(figures["new_evaluations"]) == 0, figures
    newest, best = float(figures["llama_k3_newest"]), float(figures["llama_k3_best"])
    share = lambda key: (newest - float(figures[key])) / (newest - best)  # noqa: E731
    # Share of the best gain over the newest checkpoint reached within 10 evaluations (median of
    # 2 seeds). BENCHMARKS.md (3 seeds): tuned window (simplex) 0.975 (0.955-0.981), pair
    # 0.994; --quick: 0.965 and 0.994. The simplex family's initial design alone
    # (newest, the one before, SMA, EMA(0.5)) reaches 0.38, the best fixed average (WMA) 0.61:
    # >= 0.8 fails when the GP stops improving on its design, or the pair's search breaks.
    for key in ("llama_k3_simplex_b10", "llama_k3_pair_b10"):
        assert share(key) >= 0.8, (key, figures)
    # The tuned window beats every fixed average of the same window (SMA, EMA(0.5), WMA).
    fixed = min(float(figures[f"llama_k3_{x}"]) for x in ("sma", "ema", "wma"))
    assert float(figures["llama_k3_simplex_b10"]) < fixed, figures
