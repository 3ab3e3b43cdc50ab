"""Benchmarks stay runnable: each --quick mode runs and ends with key=value headline figures.

These check that the scripts work, not how fast anything is: timings live in BENCHMARKS.md.
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
    return dict(kv.split("=", 1) for kv in last.split())


def test_sample_efficiency_quick(tmp_path):
    if not (ROOT / "benchmarks" / "landscapes.json").exists():
        pytest.skip("benchmarks/landscapes.json is not present")
    figures = run_quick("sample_efficiency.py", tmp_path)
    assert {"gp_hedge_q_1_a0_5", "random_a0_5", "gp_hedge_q_1_a0_0"} <= set(figures)
    assert all(float(v) >= 1 for v in figures.values())


def test_merge_throughput_quick(tmp_path):
    figures = run_quick("merge_throughput.py", tmp_path, "--cache", str(tmp_path))
    assert 0 < float(figures["merge_bw_ratio_fp32"]) and 0 < float(figures["merge_bw_ratio_bf16"])


def test_trial_overhead_quick(tmp_path):
    figures = run_quick("trial_overhead.py", tmp_path, "--cache", str(tmp_path))
    assert 0 < float(figures["overhead_ratio"]) < 1
    # Runs with 1, 2 and 4 concurrent trials, one after another in one Ray session: each run's
    # shards are freed when it ends, so the store's peak does not grow with concurrency.
    assert float(figures["store_growth"]) < 1.3


@pytest.fixture(scope="module")
def quick_trajectory_cache(tmp_path_factory):
    """end_to_end.py and lmeval_caching.py --quick train the same tiny trajectory: once."""
    return tmp_path_factory.mktemp("quick_trajectory")


def test_end_to_end_quick(tmp_path, quick_trajectory_cache):
    figures = run_quick("end_to_end.py", tmp_path, "--cache", str(quick_trajectory_cache))
    assert float(figures["wall_q1"]) > 0 and float(figures["wall_q2"]) > 0


def test_lmeval_caching_quick(tmp_path, quick_trajectory_cache):
    figures = run_quick("lmeval_caching.py", tmp_path, "--cache", str(quick_trajectory_cache))
    assert float(figures["speedup_mc"]) > 0 and float(figures["cached_s_mc"]) > 0


def test_noisy_search_quick(tmp_path):
    if not (ROOT / "benchmarks" / "landscapes.json").exists():
        pytest.skip("benchmarks/landscapes.json is not present")
    figures = run_quick("noisy_search.py", tmp_path)
    assert {"plain_s0.5_q1_obs12", "aware_s0.5_q1_obs12"} <= set(figures)
    assert all(float(v) >= 0 for v in figures.values())


def test_gpu_merge_quick(tmp_path):
    figures = run_quick("gpu_merge.py", tmp_path)
    import torch

    if torch.cuda.is_available():
        assert float(figures["gpu_merge_bw_ratio_min"]) > 0
    else:  # no CUDA here: the script says so and exits cleanly
        assert figures == {"gpu": "skipped"}


def test_compare_baselines_quick(tmp_path, quick_trajectory_cache):
    figures = run_quick("compare_baselines.py", tmp_path, "--cache", str(quick_trajectory_cache))
    assert int(figures["tuned_evaluations"]) == 4  # 3 λ in [0.5, 1] and λ = 0
    assert figures["best_baseline"] in {"uniform", "greedy", "sma", "ema", "wma", "fisher",
                                        "regmean", "grid", "random"}
    assert float(figures["tuned_gain"]) >= 0  # λ = 1 is among the tuned run's evaluations


def test_cluster_throughput_quick(tmp_path, quick_trajectory_cache):
    figures = run_quick("cluster_throughput.py", tmp_path, "--cache", str(quick_trajectory_cache))
    assert float(figures["tput_q1"]) > 0 and float(figures["ratio_2node"]) > 0
    # each checkpoint crosses to the worker node once (a second pull would make it >= 1.5)
    assert float(figures["copies_per_ckpt_max"]) < 1.5
