"""Settings values: checked when made, routed from plain keywords, serialized once (no Ray run)."""

import dataclasses
import json

import pytest

from ckmerge_ray.config import (
    BaselineConfig, CheckpointConfig, Resources, RunConfig, SearchConfig, split_options,
)
from ckmerge_ray.errors import CkmergeError, ConfigError


@pytest.mark.parametrize("cls,kwargs,message", [
    (SearchConfig, {"alpha": 1.5}, "alpha must be in [0, 1), got 1.5"),
    (SearchConfig, {"alpha": -0.1}, "alpha must be in [0, 1), got -0.1"),
    (SearchConfig, {"num_trials": 1}, "num_trials must be at least 2"),
    (SearchConfig, {"num_trials": 2.5}, "num_trials must be at least 2"),
    (SearchConfig, {"acquisitions": ("ei", "lcb")}, "acquisitions must be a non-empty subset"),
    (SearchConfig, {"acquisitions": ()}, "acquisitions must be a non-empty subset"),
    (SearchConfig, {"eta": -1.0}, "eta must be a non-negative number, got -1.0"),
    (SearchConfig, {"gp_noise": 0.0}, "gp_noise must be positive, got 0.0"),
    (SearchConfig, {"initial_lambdas": (0.3,)}, "initial_lambdas must lie in [alpha, 1]"),
    (SearchConfig, {"num_trials": 3, "initial_lambdas": (0.7, 0.8)},
     "num_trials=3 is smaller than the 4 initial points"),
    (SearchConfig, {"screen_keep": 1.0}, "screen_keep must be in (0, 1), got 1.0"),
    (SearchConfig, {"screen_limit": 1.5}, "screen_limit must be a positive count or a fraction"),
    (RunConfig, {"overwrite": True, "resume": True}, "overwrite and resume exclude each other"),
    (RunConfig, {"max_concurrent": 0}, "max_concurrent must be a positive integer, got 0"),
    (RunConfig, {"max_failures": -1}, "max_failures must be a non-negative integer, got -1"),
    (CheckpointConfig, {"max_shard_bytes": 0}, "max_shard_bytes must be a positive integer"),
    (Resources, {"cpu": 0, "gpu": 0}, "must ask for at least some CPU or GPU"),
    (Resources, {"gpu": -1}, "resources['gpu'] must be a non-negative number, got -1"),
    (BaselineConfig, {"methods": "uniform,nope"}, "unknown methods ['nope']"),
    (BaselineConfig, {"ema_alpha": 0.0}, "ema_alpha must be in (0, 1], got 0.0"),
    (BaselineConfig, {"regmean_alpha": 2.0}, "regmean_alpha must be in [0, 1], got 2.0"),
    (BaselineConfig, {"stats_tokens": 1}, "stats_tokens must be at least 2, got 1"),
])
def test_bad_value_is_refused_when_made(cls, kwargs, message):
    with pytest.raises(ConfigError) as info:
        cls(**kwargs)
    assert message in str(info.value)
    assert isinstance(info.value, CkmergeError)


def test_values_are_frozen_and_normalized():
    search = SearchConfig(acquisitions=["ucb", "ei", "ucb"], initial_lambdas=[0.75])
    assert search.acquisitions == ("ucb", "ei") and search.initial_lambdas == (0.75,)
    with pytest.raises(dataclasses.FrozenInstanceError):
        search.alpha = 0.6
    assert BaselineConfig(methods="uniform, ema").methods == ("uniform", "ema")
    assert Resources.of({"CPU": 2, "gpu": 0.5}) == Resources(cpu=2.0, gpu=0.5)
    with pytest.raises(ConfigError, match="resources keys must be 'cpu' and 'gpu', got 'tpu'"):
        Resources.of({"tpu": 1})


def test_search_counts_lambda_zero_as_an_extra_trial_only_when_alpha_is_positive():
    assert SearchConfig(alpha=0.5, num_trials=5).num_samples == 6
    assert SearchConfig(alpha=0.0, num_trials=5).num_samples == 5
    assert SearchConfig(alpha=0.0).initial_points()[:3] == (0.0, 1.0, 0.5)


def test_plain_keywords_are_routed_to_the_value_that_has_the_field():
    got = split_options({"alpha": 0.6, "output_dir": "x", "allow_pickle": True},
                        search=None, run=None, checkpoint=None)
    assert got["search"] == SearchConfig(alpha=0.6)
    assert got["run"] == RunConfig(output_dir="x")
    assert got["checkpoint"] == CheckpointConfig(allow_pickle=True)


def test_keywords_override_a_given_value_and_defaults_fill_the_rest():
    given = SearchConfig(alpha=0.7, num_trials=12)
    got = split_options({"num_trials": 4}, {"num_trials": 8, "output_dir": "sweep"},
                        search=given, run=None)
    assert got["search"] == SearchConfig(alpha=0.7, num_trials=4)  # the default does not win
    assert got["run"].output_dir == "sweep"
    assert split_options({}, {"num_trials": 8}, search=None)["search"].num_trials == 8


def test_unknown_keyword_and_wrong_value_type_are_refused():
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['alhpa'\]"):
        split_options({"alhpa": 0.5}, search=None, run=None)
    with pytest.raises(ConfigError, match="search must be a SearchConfig, got RunConfig"):
        split_options({}, search=RunConfig())
    with pytest.raises(ConfigError, match="alpha must be in"):
        split_options({"alpha": 2}, search=SearchConfig())


def test_to_dict_is_json_and_round_trips():
    for value in (SearchConfig(initial_lambdas=(0.8,)), RunConfig(), CheckpointConfig(),
                  BaselineConfig(methods="ema")):
        data = json.loads(json.dumps(value.to_dict()))
        assert type(value)(**data) == value


def test_renamed_output_names_still_answer_with_a_warning():
    import ckmerge_ray.compare as compare
    import ckmerge_ray.sweep as sweep

    with pytest.warns(DeprecationWarning, match="use ckmerge_ray.results.COMPARE_TABLE"):
        assert compare.COMPARE_FILE == "compare.parquet"
    with pytest.warns(DeprecationWarning, match="use ckmerge_ray.results.HEATMAP_TABLE"):
        assert sweep.HEATMAP_FILE == "heatmap.parquet"
    with pytest.raises(AttributeError, match="has no attribute 'NOPE'"):
        compare.NOPE
