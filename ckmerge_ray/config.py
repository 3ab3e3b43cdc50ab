"""Settings as values: what to search, how to run, how to read checkpoints, what a trial gets.

Each concern is one small frozen dataclass, checked when it is made, in the style of Ray Tune's
`TuneConfig` / `RunConfig`: `tune_merge`, `compare_merges`, `sweep_trajectory` and the CLI build
them once and pass them down; run.json and summary.json record them with `to_dict`. Plain keyword
arguments (``alpha=0.6``, ``output_dir=...``) still work: `split_options` routes each to the value
that has a field of that name. Example::

    from ckmerge_ray import tune_merge
    from ckmerge_ray.config import RunConfig, SearchConfig
    tune_merge(pair, {"cpu": 2}, "loss:heldout.jsonl",
               search=SearchConfig(alpha=0.5, num_trials=12), run=RunConfig(output_dir="runs/x"))
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any, Dict, Mapping, Optional, Tuple

from ckmerge_ray.errors import ConfigError
from ckmerge_ray.search.record import ACQUISITIONS

# The merge methods `compare_merges` knows, in the order it runs them.
METHODS = ("uniform", "greedy", "sma", "ema", "wma", "fisher", "regmean", "grid", "random", "tuned",
           "tuned-window")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class _Settings:
    """What every settings value can do: be written to JSON."""

    def to_dict(self) -> Dict[str, Any]:
        """The value as JSON-ready data (tuples become lists)."""
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in fields(self)}


@dataclass(frozen=True)
class SearchConfig(_Settings):
    """How λ is chosen: the search space, the budget and the GP-Hedge settings.

    Defaults follow Liu et al. (2024): λ ∈ [0.5, 1], endpoints first.
    """

    alpha: float = 0.5  # λ is searched in [alpha, 1]; 0 <= alpha < 1
    num_trials: int = 10  # distinct λ in [alpha, 1], endpoints included (+1 for λ = 0 if alpha > 0)
    acquisitions: Tuple[str, ...] = ACQUISITIONS  # non-empty subset; one alone disables the hedge
    eta: float = 1.0  # hedge learning rate, >= 0
    kappa: float = 1.0  # UCB exploration weight, >= 0
    xi: float = 0.0  # EI/PI improvement margin, in the metric's units
    gp_noise: float = 1e-6  # GP observation noise variance (normalized scale), > 0
    initial_lambdas: Tuple[float, ...] = ()  # extra λ right after the endpoints, in [alpha, 1]
    seed: int = 0  # makes the search deterministic given the same scores
    noise_aware: bool = False  # feed each score's stderr into the GP; pick by posterior mean
    screen_limit: Optional[float] = None  # multi-fidelity: documents per task of the cheap stage
    screen_keep: float = 0.5  # fraction of screened λ that get the full evaluation, in (0, 1)

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 - frozen
        set_("acquisitions", tuple(dict.fromkeys(_as_tuple(self.acquisitions, "acquisitions"))))
        set_("initial_lambdas", _as_tuple(self.initial_lambdas, "initial_lambdas"))
        if not _is_number(self.alpha) or not 0.0 <= self.alpha < 1.0:
            raise ConfigError(f"alpha must be in [0, 1), got {self.alpha!r}")
        if not isinstance(self.num_trials, int) or isinstance(self.num_trials, bool) \
                or self.num_trials < 2:
            raise ConfigError("num_trials must be at least 2 (the initial points λ=alpha and "
                              f"λ=1), got {self.num_trials!r}")
        if not self.acquisitions or any(a not in ACQUISITIONS for a in self.acquisitions):
            raise ConfigError(f"acquisitions must be a non-empty subset of {ACQUISITIONS}, "
                              f"got {self.acquisitions!r}")
        for name, low in (("eta", 0.0), ("kappa", 0.0)):
            if not _is_number(getattr(self, name)) or getattr(self, name) < low:
                raise ConfigError(f"{name} must be a non-negative number, got "
                                  f"{getattr(self, name)!r}")
        if not _is_number(self.xi):
            raise ConfigError(f"xi must be a finite number, got {self.xi!r}")
        if not _is_number(self.gp_noise) or self.gp_noise <= 0:
            raise ConfigError(f"gp_noise must be positive, got {self.gp_noise!r}")
        if not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        self._check_initial_points()
        self._check_screening()

    def _check_initial_points(self) -> None:
        outside = [x for x in self.initial_lambdas
                   if not (_is_number(x) and self.alpha <= x <= 1)]
        if outside:
            raise ConfigError(f"initial_lambdas must lie in [alpha, 1] = [{self.alpha}, 1], "
                              f"got {outside}")
        first = [x for x in self.initial_points() if x >= self.alpha]
        if self.num_trials < len(first):
            raise ConfigError(
                f"num_trials={self.num_trials} is smaller than the {len(first)} initial points "
                f"in [{self.alpha}, 1] (λ = {', '.join(f'{x:g}' for x in first)}); raise num_trials"
            )

    def _check_screening(self) -> None:
        if not _is_number(self.screen_keep) or not 0.0 < self.screen_keep < 1.0:
            raise ConfigError(f"screen_keep must be in (0, 1), got {self.screen_keep!r}")
        limit = self.screen_limit
        if limit is not None and (not _is_number(limit) or limit <= 0
                                  or (isinstance(limit, float) and limit > 1)):
            raise ConfigError("screen_limit must be a positive count or a fraction in (0, 1], "
                              f"got {limit!r}")

    def initial_points(self) -> Tuple[float, ...]:
        """The λ evaluated first (see `search.initial_points`)."""
        from ckmerge_ray.search import LAMBDA, initial_points

        return tuple(p[LAMBDA] for p in initial_points(self.alpha, self.initial_lambdas))

    @property
    def num_samples(self) -> int:
        """Tune trials: `num_trials` in [alpha, 1], plus λ = 0 when alpha > 0."""
        return self.num_trials + (1 if self.alpha > 0 else 0)

    @property
    def noise_key(self) -> Optional[str]:
        """The result key the GP reads each observation's standard error from, or None."""
        return "score_stderr" if self.noise_aware else None

    def searcher(self, mode: str, batch_size: int):
        """The run's `GPHedgeSearch` over λ ∈ [alpha, 1], endpoints first."""
        from ckmerge_ray.search import merge_searcher

        try:
            return merge_searcher(
                self.alpha, mode, batch_size, self.initial_lambdas,
                acquisitions=self.acquisitions, eta=self.eta, kappa=self.kappa, xi=self.xi,
                gp_noise=self.gp_noise, seed=self.seed, noise_key=self.noise_key,
            )
        except ValueError as e:
            raise ConfigError(str(e)) from e


@dataclass(frozen=True)
class RunConfig(_Settings):
    """Where results go and how the run behaves around its trials."""

    output_dir: str = "ckmerge_runs/latest"  # trials.parquet, summary.json, best/
    overwrite: bool = False  # replace a run already in output_dir
    resume: bool = False  # continue the run in output_dir (excludes overwrite)
    storage_path: Optional[str] = None  # Ray Tune storage (default output_dir/ray); URI allowed
    progress: bool = True  # one line per stored shard and per finished trial
    max_concurrent: Optional[int] = None  # trials at once (default: what the cluster fits)
    # sweep and watch: pairs tuned at once (default: as many as the trial slots and the object
    # store fit; see ckmerge_ray/pairs.py)
    max_concurrent_pairs: Optional[int] = None
    max_failures: int = 2  # retries of a trial whose worker process died
    allow_spilling: bool = False  # run even if the checkpoints exceed a node's object store
    export_best: bool = True  # write the best merged model to output_dir/best
    export_to: Optional[str] = None  # also publish best/ here: a path or URI (s3://b/run/best)
    gpu_shard_cache: bool = True  # GPU workers keep both checkpoints in device memory

    def __post_init__(self):
        object.__setattr__(self, "output_dir", str(self.output_dir))
        if self.export_to is not None:
            object.__setattr__(self, "export_to", str(self.export_to))
            if not self.export_best:
                raise ConfigError("export_to publishes best/: it needs export_best=True")
        if self.overwrite and self.resume:
            raise ConfigError("overwrite and resume exclude each other: choose one")
        if self.max_concurrent is not None and (
                not isinstance(self.max_concurrent, int) or self.max_concurrent < 1):
            raise ConfigError(f"max_concurrent must be a positive integer, got "
                              f"{self.max_concurrent!r}")
        if self.max_concurrent_pairs is not None and (
                not isinstance(self.max_concurrent_pairs, int) or self.max_concurrent_pairs < 1):
            raise ConfigError(f"max_concurrent_pairs must be a positive integer, got "
                              f"{self.max_concurrent_pairs!r}")
        if not isinstance(self.max_failures, int) or self.max_failures < 0:
            raise ConfigError(f"max_failures must be a non-negative integer, got "
                              f"{self.max_failures!r}")


@dataclass(frozen=True)
class CheckpointConfig(_Settings):
    """How checkpoints are read and put into the object store."""

    allow_pickle: bool = False  # accept pytorch_model.bin (torch.load(weights_only=True))
    max_shard_bytes: int = 1 << 30  # object-store shard size for single-file checkpoints
    # Run the modeling code a checkpoint ships (config.json's auto_map), on the driver and on
    # every trial worker, imported from the later checkpoint's directory. Off: such a
    # checkpoint is refused, naming the classes and files that would run.
    trust_remote_code: bool = False
    # "auto" (detect), "hf" (config.json + safetensors) or "dcp" (torch.distributed.checkpoint).
    format: str = "auto"
    # Trainer names -> the architecture's: a YAML file, a `NameMap` or a callable name -> name
    # (None drops it); see ckmerge_ray/checkpoints/names.py. Wrapper prefixes need none.
    name_map: Any = None
    # config.json (or its directory) for DCP checkpoints with none beside or above them.
    model_config: Optional[str] = None
    # A directory (or URI) holding the run's tokenizer, for checkpoints saved without one
    # (a Trainer given no processing_class, most pretraining frameworks). Default: Θ(t)'s own.
    tokenizer: Optional[str] = None

    def __post_init__(self):
        if not isinstance(self.max_shard_bytes, int) or self.max_shard_bytes <= 0:
            raise ConfigError(f"max_shard_bytes must be a positive integer, got "
                              f"{self.max_shard_bytes!r}")
        if self.format not in ("auto", "hf", "dcp"):
            raise ConfigError(f"format must be 'auto', 'hf' or 'dcp', got {self.format!r}")
        from ckmerge_ray.checkpoints.names import NameMap

        object.__setattr__(self, "name_map", NameMap.of(self.name_map))
        for key in ("model_config", "tokenizer"):
            if getattr(self, key) is not None:
                object.__setattr__(self, key, str(getattr(self, key)))

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready, the name map as its rules (`NameMap.to_dict`): run.json keeps it so that
        a resume reads the checkpoints as the run did, even if the map's file moved."""
        d = super().to_dict()
        d["name_map"] = None if self.name_map is None else self.name_map.to_dict()
        return d


@dataclass(frozen=True)
class Resources:
    """What one trial (or evaluator actor) asks Ray for."""

    cpu: float = 1.0
    gpu: float = 0.0  # fractions pack trials onto one GPU (0.5: two per GPU)

    def __post_init__(self):
        for name in ("cpu", "gpu"):
            value = getattr(self, name)
            if not _is_number(value) or value < 0:
                raise ConfigError(f"resources[{name!r}] must be a non-negative number, got "
                                  f"{value!r}")
            object.__setattr__(self, name, float(value))
        if self.cpu == 0 and self.gpu == 0:
            raise ConfigError("resources must ask for at least some CPU or GPU, got cpu=0, gpu=0")

    @classmethod
    def of(cls, resources: "Resources | Mapping[str, float] | None") -> "Resources":
        """From a `Resources`, a ``{"cpu": 2, "gpu": 0.5}`` mapping (keys any case) or None."""
        if isinstance(resources, Resources):
            return resources
        values = {}
        for key, value in dict(resources or {}).items():
            if str(key).lower() not in ("cpu", "gpu"):
                raise ConfigError(f"resources keys must be 'cpu' and 'gpu', got {key!r}")
            values[str(key).lower()] = value
        return cls(**values)

    def to_dict(self) -> Dict[str, float]:
        return {"cpu": self.cpu, "gpu": self.gpu}


@dataclass(frozen=True)
class BaselineConfig(_Settings):
    """The baseline merges `compare_merges` scores beside the tuned one."""

    methods: Tuple[str, ...] = METHODS  # any of METHODS, in any order; a comma string works too
    last_n: Optional[int] = None  # SMA/EMA/WMA window: the last N checkpoints (default all)
    ema_alpha: float = 0.5  # EMA's weight of the newest checkpoint, in (0, 1]
    stats_tokens: int = 8192  # tokens per checkpoint for Fisher and RegMean statistics
    calibration: Optional[str] = None  # text file for those statistics (needed with lm-eval)
    regmean_alpha: float = 0.9  # RegMean's scaling of the Grams' off-diagonals, in [0, 1]
    fisher_floor: float = 1e-6  # smallest Fisher value
    # tuned-window's family (families.FAMILIES, "+length" allowed); None: simplex up to 4
    # checkpoints, decay+length beyond (a GP needs a few trials per dimension)
    window_family: Optional[str] = None

    def __post_init__(self):
        methods = self.methods
        if isinstance(methods, str):
            methods = [m.strip() for m in methods.split(",") if m.strip()]
        methods = tuple(dict.fromkeys(methods))
        unknown = [m for m in methods if m not in METHODS]
        if unknown or not methods:
            raise ConfigError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
        object.__setattr__(self, "methods", methods)
        if self.last_n is not None and (not isinstance(self.last_n, int) or self.last_n < 1):
            raise ConfigError(f"last_n must be a positive integer, got {self.last_n!r}")
        if not _is_number(self.ema_alpha) or not 0.0 < self.ema_alpha <= 1.0:
            raise ConfigError(f"ema_alpha must be in (0, 1], got {self.ema_alpha!r}")
        if not _is_number(self.regmean_alpha) or not 0.0 <= self.regmean_alpha <= 1.0:
            raise ConfigError(f"regmean_alpha must be in [0, 1], got {self.regmean_alpha!r}")
        if not isinstance(self.stats_tokens, int) or self.stats_tokens < 2:
            raise ConfigError(f"stats_tokens must be at least 2, got {self.stats_tokens!r}")
        if not _is_number(self.fisher_floor) or self.fisher_floor <= 0:
            raise ConfigError(f"fisher_floor must be positive, got {self.fisher_floor!r}")
        if self.calibration is not None:
            object.__setattr__(self, "calibration", str(self.calibration))


# RunConfig fields a resume repeats from run.json (the others are the resume's own: output_dir,
# resume, overwrite, progress, export_best; Tune restores storage_path and max_failures itself).
RESUMED_RUN_FIELDS = ("max_concurrent", "allow_spilling", "export_to", "gpu_shard_cache")


def launch_record(run: RunConfig, checkpoint: CheckpointConfig, max_concurrent: int) -> Dict:
    """run.json's record of how a run was started, which `resumed_settings` reads back. Local
    paths (``export_to``, ``model_config``, ``tokenizer``) are made absolute: a resume may start
    elsewhere."""
    run_fields = {k: getattr(run, k) for k in RESUMED_RUN_FIELDS}
    read = checkpoint.to_dict()
    run_fields["export_to"] = _absolute(run_fields["export_to"])
    read["model_config"] = _absolute(read["model_config"])
    read["tokenizer"] = _absolute(read["tokenizer"])
    return {"run": {**run_fields, "max_concurrent": max_concurrent}, "checkpoint": read}


def _absolute(location: Optional[str]) -> Optional[str]:
    """A local path made absolute, a URI as it is (`storage.checkpoint_id`); None stays None."""
    from ckmerge_ray.storage import checkpoint_id

    return None if location is None else checkpoint_id(location)


def resumed_settings(stored: Mapping, output_dir: str, **overrides) -> Tuple[RunConfig,
                                                                             CheckpointConfig]:
    """The `RunConfig` and `CheckpointConfig` of the run whose run.json is `stored`, resuming
    in `output_dir`; `overrides` set the resume's own `RunConfig` fields (``progress``,
    ``export_best``: without it, a recorded ``export_to`` is dropped too). Reads the record of
    runs started before `launch_record` existed too. Raises ConfigError if the run's name map
    was a Python callable (code is not stored; resume from Python, passing it again)."""
    run = dict(stored.get("run") or {"max_concurrent": stored["max_concurrent"],
                                      "allow_spilling": stored.get("allow_spilling", False)})
    if overrides.get("export_best") is False:
        run["export_to"] = None
    checkpoint = dict(stored.get("checkpoint") or {
        "allow_pickle": stored["allow_pickle"],
        "trust_remote_code": stored.get("trust_remote_code", False)})
    if "callable" in (checkpoint.get("name_map") or {}):
        raise ConfigError(
            f"the run in {output_dir} renamed tensors with a Python callable "
            f"({checkpoint['name_map']['callable']}), which run.json cannot hold: resume it from "
            "Python with the same name_map (resume=True)")
    return (RunConfig(output_dir=output_dir, resume=True, **{**run, **overrides}),
            CheckpointConfig(**checkpoint))


def _as_tuple(value, name: str) -> tuple:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    try:
        return tuple(value)
    except TypeError:
        raise ConfigError(f"{name} must be a sequence, got {value!r}") from None


def split_options(options: Mapping[str, Any], defaults: Mapping[str, Any] = (),
                  **given) -> Dict[str, Any]:
    """Route plain keyword arguments to the settings values that have a field of that name.

    `given` maps a keyword (``search``, ``run``, ``checkpoint``, ``baselines``) to a value or
    None; `options` are the caller's other keywords, which override those values' fields;
    `defaults` are the entry point's own defaults (e.g. sweep's ``num_trials=8``), used where
    neither sets a field. Returns the values by the same keywords. Raises TypeError for a keyword
    no value has, as Python does for an unknown argument, and ConfigError for a bad value.
    """
    classes = {"search": SearchConfig, "run": RunConfig, "checkpoint": CheckpointConfig,
               "baselines": BaselineConfig}
    owner = {f.name: key for key in given for f in fields(classes[key])}
    unknown = [k for k in options if k not in owner]
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {unknown}; settings are fields of "
                        f"{', '.join(classes[k].__name__ for k in given)}")
    out = {}
    for key, value in given.items():
        cls = classes[key]
        if value is not None and not isinstance(value, cls):
            raise ConfigError(f"{key} must be a {cls.__name__}, got {type(value).__name__}")
        mine = {k: v for k, v in options.items() if owner[k] == key}
        if value is None:
            base = {k: v for k, v in dict(defaults).items() if owner.get(k) == key}
            out[key] = cls(**{**base, **mine})
        else:
            out[key] = dataclasses.replace(value, **mine) if mine else value
    return out
