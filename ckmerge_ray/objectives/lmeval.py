"""lm-evaluation-harness tasks as an objective, run on the trial's in-memory merged model.

lm-eval gets an `HFLM` that wraps the model the worker already holds (never a path, so nothing
is reloaded from disk) and Θ(t)'s tokenizer. Tasks are any registered lm-eval task or group, or
local task YAMLs from `include_path`. Task names, metrics and their directions are checked on
the driver before any trial starts.

Per worker, the tasks are loaded once and their requests (documents rendered into prompts) are
built once: the documents do not change between trials, only the weights. So a trial calls
`lm_eval.evaluator.evaluate` on the already-loaded tasks with lm-eval's request cache, instead of
`simple_evaluate`, which reloads the datasets and collects environment information (a `pip list`
subprocess) on every call.

Batching: ``batch_size="auto"`` on a GPU by default (lm-eval finds the largest batch that fits,
halving from ``max_batch_size`` on out-of-memory), 8 on CPU; the size found on a worker's first
trial is kept for its later trials. A fixed size that runs out of memory is halved and the
evaluation started over, each size once (`ckmerge_ray.objectives.batching.halving`).
"""

from __future__ import annotations

import copy
import difflib
import math
import os
import tempfile
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ckmerge_ray.errors import ObjectiveError
from ckmerge_ray.objectives.base import Objective, load_tokenizer
from ckmerge_ray.objectives.batching import PeakMemory, Stopwatch, free_cached, halving, is_oom

# (include_path, include_defaults) -> TaskManager; indexing the built-in tasks costs seconds, so
# each process (driver, worker) builds it once.
_TASK_MANAGERS: Dict[Tuple[Optional[str], bool], object] = {}
# Objective.task_key() -> (loaded task dict, private request-cache directory), once per process.
_LOADED: Dict[Tuple, Tuple[Dict, str]] = {}

CPU_BATCH_SIZE = 8  # requests per pass on CPU when batch_size is not given
STDERR_BOOTSTRAP_ITERS = 100  # closed form for mean metrics; a 100-draw bootstrap for the others


def task_manager(include_path: Optional[str], include_defaults: bool):
    from lm_eval.tasks import TaskManager

    key = (include_path, include_defaults)
    if key not in _TASK_MANAGERS:
        _TASK_MANAGERS[key] = TaskManager(include_path=include_path,
                                          include_defaults=include_defaults)
    return _TASK_MANAGERS[key]


class LmEvalObjective(Objective):
    """Weighted mean of one lm-eval metric per task; higher or lower is better as lm-eval says.

    Args:
        tasks: lm-eval task or group names, e.g. ``["mmlu", "gsm8k"]`` or local task names.
        metrics: the metric per task, one name for all (default ``"acc"``) or ``{task: metric}``
            (``acc_norm``, ``exact_match``, ``word_perplexity``, ...).
        weights: ``{task: weight}`` (default equal weights).
        include_path: a directory of task YAMLs. When every task is found there, the built-in
            tasks are not indexed (``include_defaults=False``).
        limit: documents per task (count, or fraction), the same documents in every trial.
        num_fewshot, max_length, apply_chat_template: passed to lm-eval.
        batch_size: requests per forward pass, an int or ``"auto"``. Default None: ``"auto"``
            on a GPU, 8 on CPU. The size used is kept for the worker's later trials (for
            ``"auto"``, the smallest lm-eval detected), and halved on out-of-memory.
        cache_requests: load the tasks and build their requests once per worker (default True).
            False runs ``simple_evaluate`` from scratch on every trial (for comparison).
        stderr: also compute each metric's standard error (closed form for mean metrics such as
            acc, a 100-draw in-process bootstrap for perplexities) and report ``score_stderr``,
            which a noise-aware search uses (default True; costs milliseconds).
    """

    name = "lmeval"

    def __init__(
        self,
        tasks: Sequence[str],
        metrics: str | Mapping[str, str] = "acc",
        weights: Optional[Mapping[str, float]] = None,
        include_path: Optional[str | Path] = None,
        limit: Optional[int | float] = None,
        num_fewshot: Optional[int] = None,
        batch_size: Optional[int | str] = None,
        max_length: Optional[int] = None,
        apply_chat_template: bool = False,
        cache_requests: bool = True,
        stderr: bool = True,
    ):
        self.tasks = [t.strip() for t in tasks if t and t.strip()]
        if not self.tasks:
            raise ObjectiveError("lmeval objective needs at least one task, e.g. 'lmeval:mmlu'")
        if isinstance(metrics, str):
            metrics = {t: metrics for t in self.tasks}
        self.metrics = {t: metrics.get(t, "acc") for t in self.tasks}
        self.weights = {t: float((weights or {}).get(t, 1.0)) for t in self.tasks}
        unknown = set(metrics) - set(self.tasks) | set(weights or {}) - set(self.tasks)
        if unknown:
            raise ObjectiveError(f"metrics/weights name tasks not in the objective: {sorted(unknown)}")
        if any(w < 0 for w in self.weights.values()) or sum(self.weights.values()) <= 0:
            raise ObjectiveError(f"task weights must be non-negative, not all zero: {self.weights}")
        if limit is not None and (limit <= 0 or (isinstance(limit, float) and limit > 1)):
            raise ObjectiveError(f"limit must be a positive count or a fraction in (0, 1], got {limit}")
        self.include_path = str(include_path) if include_path else None
        self.include_defaults = True
        self.limit, self.num_fewshot = limit, num_fewshot
        self.batch_size, self.max_length = batch_size, max_length
        self.apply_chat_template = apply_chat_template
        self.cache_requests, self.stderr = bool(cache_requests), bool(stderr)
        if not (batch_size is None or batch_size == "auto"
                or (isinstance(batch_size, int) and batch_size >= 1)):
            raise ObjectiveError(f"batch_size must be a positive int or 'auto', got {batch_size!r}")
        self.tokenizer = None
        self._batch: Optional[int | str] = batch_size  # the size that worked last, on a worker

    def __getstate__(self) -> Dict:
        state = dict(self.__dict__)
        state["_batch"] = self.batch_size  # worker state starts afresh where it is unpickled
        return state

    def __repr__(self) -> str:
        return (f"LmEvalObjective({self.tasks!r}, metrics={self.metrics!r}, limit={self.limit!r}, "
                f"include_path={self.include_path!r})")

    def with_limit(self, limit: int | float) -> "LmEvalObjective":
        """The same objective on the first `limit` documents per task (a cheaper fidelity)."""
        cheaper = copy.copy(self)
        cheaper.limit = limit
        return cheaper

    # --- driver ------------------------------------------------------------------------------

    def prepare(self, tokenizer_dir: Path) -> None:
        """Check tasks, metrics and their directions; load the tokenizer. Runs on the driver."""
        from lm_eval.api.registry import is_higher_better

        self.include_defaults = not (self.include_path and self._all_found(include_defaults=False))
        manager = task_manager(self.include_path, self.include_defaults)
        missing = [t for t in self.tasks if t not in manager.all_tasks]
        if missing:
            hints = {t: difflib.get_close_matches(t, manager.all_tasks, n=3) for t in missing}
            where = f" (looked in {self.include_path} and lm-eval's tasks)" if self.include_path else ""
            raise ObjectiveError(
                f"unknown lm-eval task(s) {missing}{where}; close names: "
                + "; ".join(f"{t}: {h or 'none'}" for t, h in hints.items())
            )
        directions = {}
        for task, metric in self.metrics.items():
            higher = is_higher_better(metric)
            if higher is None:
                raise ObjectiveError(
                    f"lm-eval does not know whether higher {metric!r} (task {task!r}) is better; "
                    "choose a registered metric such as acc, acc_norm, exact_match, word_perplexity"
                )
            directions[task] = bool(higher)
        if len(set(directions.values())) > 1:
            raise ObjectiveError(
                f"metrics point in different directions (higher is better: {directions}); "
                "combine metrics that all improve the same way"
            )
        self.mode = "max" if next(iter(directions.values())) else "min"
        loaded = self._load_tasks()
        self._check_metrics_produced(loaded)
        self._load_tokenizer(tokenizer_dir, loaded)

    def _check_metrics_produced(self, loaded: Dict) -> None:
        """Each chosen metric must be one that every leaf task under the name computes."""
        for task, metric in self.metrics.items():
            leaves = _leaves(task, loaded)
            for leaf in leaves:
                produced = sorted(loaded["tasks"][leaf].aggregation())
                if metric not in produced:
                    where = f"task {leaf!r} (in {task!r})" if leaf != task else f"task {task!r}"
                    raise ObjectiveError(
                        f"{where} does not produce metric {metric!r}; it produces {produced}"
                    )

    def _load_tokenizer(self, tokenizer_dir: Path, loaded: Dict) -> None:
        generating = [n for n, t in loaded["tasks"].items()
                      if t.get_config("output_type") == "generate_until"]
        purpose = (f"the lm-eval objective (generation tasks {generating[:3]})" if generating
                   else "the lm-eval objective")
        self.tokenizer = load_tokenizer(tokenizer_dir, self.trust_remote_code, purpose)
        if generating and self.tokenizer.eos_token is None:
            raise ObjectiveError(f"generation tasks {generating[:3]} need a tokenizer with an "
                                 f"end-of-sequence token; the one in {tokenizer_dir} has none")

    def _all_found(self, include_defaults: bool) -> bool:
        manager = task_manager(self.include_path, include_defaults)
        return all(t in manager.all_tasks for t in self.tasks)

    # --- worker ------------------------------------------------------------------------------

    def evaluate(self, model: torch.nn.Module, device: torch.device) -> Dict[str, float]:
        """Run the tasks on `model`; the result holds the score, every task metric and the
        evaluation's cost: ``eval_requests`` (requests the model answered), ``eval_seconds``,
        ``eval_requests_per_s``, ``eval_peak_mem_mb`` and ``eval_batch_size``."""
        device = torch.device(device)
        if self.stderr:
            # lm-eval's bootstrap otherwise starts a pool of cpu_count() processes inside a
            # worker that Ray gave a CPU or two.
            os.environ.setdefault("DISABLE_MULTIPROC", "1")
        if self._batch is None:
            self._batch = "auto" if device.type == "cuda" else CPU_BATCH_SIZE
        lms: List = []  # the last HFLM built, for its request count and detected batch sizes

        def run(batch: int | str) -> Dict:
            lms[:] = [_hflm_class()(pretrained=model, tokenizer=self.tokenizer, batch_size=batch,
                                    max_length=self.max_length, device=str(device))]
            return self._run_cached(lms[0]) if self.cache_requests else self._run_uncached(lms[0])

        with Stopwatch(device) as clock, PeakMemory(device) as peak:
            batch, out = self._batch, None
            if batch == "auto":
                try:
                    out = run("auto")
                except Exception as e:  # noqa: BLE001 - filtered just below
                    if not is_oom(e):
                        raise
                detected = lms[0].detected if lms else []
                batch = min(detected) if detected else "auto"
                if out is None:  # the detected size did not fit a later, longer batch
                    free_cached(device)
                    batch = max(1, (batch if batch != "auto" else 64) // 2)
            if out is None:
                out, batch = halving(run, batch, device, "lm-eval")
        self._batch = batch
        requests = lms[0].requests if lms else 0
        return {**self._score(out), "eval_requests": requests, "eval_seconds": clock.seconds,
                "eval_requests_per_s": requests / max(clock.seconds, 1e-9),
                "eval_peak_mem_mb": peak.mb,
                "eval_batch_size": batch if isinstance(batch, int) else math.nan}

    def _run_cached(self, lm) -> Dict:
        from lm_eval.caching import cache as lm_eval_cache
        from lm_eval.evaluator import evaluate

        loaded, cache_dir = self._load_tasks_once()
        # lm-eval's request cache is keyed by task name only; a directory private to this
        # process and objective means another run's (or another dataset's) requests never leak in.
        lm_eval_cache.PATH = cache_dir
        return evaluate(
            lm=lm, task_dict=loaded, limit=self.limit, cache_requests=True,
            bootstrap_iters=self._bootstrap_iters(), log_samples=False,
            apply_chat_template=self.apply_chat_template, verbosity="ERROR",
        )

    def _run_uncached(self, lm) -> Dict:
        from lm_eval import simple_evaluate

        return simple_evaluate(
            model=lm, tasks=list(self.tasks),
            task_manager=task_manager(self.include_path, self.include_defaults),
            limit=self.limit, num_fewshot=self.num_fewshot, bootstrap_iters=self._bootstrap_iters(),
            log_samples=False, apply_chat_template=self.apply_chat_template, verbosity="ERROR",
        )

    def _bootstrap_iters(self) -> int:
        return STDERR_BOOTSTRAP_ITERS if self.stderr else 0

    def task_key(self) -> Tuple:
        return (tuple(self.tasks), self.include_path, self.include_defaults, self.num_fewshot)

    def _load_tasks_once(self) -> Tuple[Dict, str]:
        key = self.task_key()
        if key not in _LOADED:
            cache_dir = tempfile.mkdtemp(prefix="ckmerge-lmeval-requests-")
            _LOADED[key] = (self._load_tasks(), cache_dir)
        return _LOADED[key]

    def _load_tasks(self) -> Dict:
        """Load the tasks and apply the settings `simple_evaluate` would (few-shot count, seed)."""
        from lm_eval.evaluator import DEFAULT_OTHER_SEED

        loaded = task_manager(self.include_path, self.include_defaults).load(list(self.tasks))
        for task in loaded["tasks"].values():
            if self.num_fewshot is not None and task.get_config("num_fewshot") != 0:
                task.set_config(key="num_fewshot", value=self.num_fewshot)
            elif task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)
        return loaded

    def _score(self, out: Dict) -> Dict[str, float]:
        row: Dict[str, float] = {}
        for task in self.tasks:
            for key, value in out["results"].get(task, {}).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    row[f"{task}/{key.replace(',none', '')}"] = float(value)
        total = sum(self.weights.values())
        score, variance = 0.0, 0.0
        for task, metric in self.metrics.items():
            key = f"{task}/{metric}"
            if key not in row:
                produced = sorted(k.split("/", 1)[1] for k in row if k.startswith(f"{task}/"))
                raise ObjectiveError(f"task {task!r} did not produce metric {metric!r} (it produced {produced})")
            self._check_direction(out, task, metric)
            w = self.weights[task] / total
            score += w * row[key]
            se = row.get(f"{task}/{metric}_stderr")
            variance = variance + (w * se) ** 2 if se is not None and math.isfinite(se) else math.nan
        result = {"score": score, **row}
        if self.stderr and math.isfinite(variance):
            result["score_stderr"] = math.sqrt(variance)  # tasks scored on independent documents
        return result

    def _check_direction(self, out: Dict, task: str, metric: str) -> None:
        higher = out.get("higher_is_better", {}).get(task, {}).get(metric)
        if higher is not None and bool(higher) != (self.mode == "max"):
            raise ObjectiveError(
                f"lm-eval reports higher_is_better={higher} for {task}/{metric}, but the objective "
                f"was set up to {self.mode}imize it"
            )


_HFLM_CLASS = None


def _hflm_class():
    """lm-eval's HFLM, extended to count the requests it answers and to remember the batch
    sizes its ``batch_size="auto"`` detection found (defined on first use: lm-eval imports
    slowly)."""
    global _HFLM_CLASS
    if _HFLM_CLASS is None:
        from lm_eval.models.huggingface import HFLM

        class CountingHFLM(HFLM):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.requests = 0
                self.detected: List[int] = []

            def _detect_batch_size(self, *args, **kwargs):
                size = super()._detect_batch_size(*args, **kwargs)
                self.detected.append(int(size))
                return size

            def loglikelihood(self, requests, *args, **kwargs):
                self.requests += len(requests)
                return super().loglikelihood(requests, *args, **kwargs)

            def loglikelihood_rolling(self, requests, *args, **kwargs):
                self.requests += len(requests)
                return super().loglikelihood_rolling(requests, *args, **kwargs)

            def generate_until(self, requests, *args, **kwargs):
                self.requests += len(requests)
                return super().generate_until(requests, *args, **kwargs)

        _HFLM_CLASS = CountingHFLM
    return _HFLM_CLASS


def _leaves(name: str, loaded: Dict) -> List[str]:
    """The leaf tasks under a task or group name, as lm-eval loaded them."""
    if name in loaded["tasks"]:
        return [name]
    leaves = []
    for child in loaded.get("group_map", {}).get(name, []):
        leaves.extend(_leaves(child, loaded))
    return leaves


def parse_tasks(arg: str) -> List[str]:
    return [t.strip() for t in arg.split(",") if t.strip()]
