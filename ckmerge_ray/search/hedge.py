"""GP-Hedge over EI, PI and UCB for Ray Tune, in batches of concurrent trials, pending-aware.

GP-Hedge (Brochu, Hoffman and de Freitas, 2011) keeps a portfolio of acquisition functions.
Each nominates a point; one nominee is run, chosen with probability ∝ exp(η·gain); once the GP is
refitted, every function's gain grows by the posterior mean at its own nominee, so functions
whose nominees turn out good are chosen more often. The paper on checkpoint merging runs it one
trial at a time; here trials run concurrently, so suggestions come in batches.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from bayes_opt.util import NotUniqueError
from ray.tune.search.bayesopt import BayesOptSearch
from ray.tune.utils.util import flatten_dict, unflatten_dict

from ckmerge_ray.search.acquisition import Box, finite_real, kriging_believer, result_value
from ckmerge_ray.search.record import ACQUISITIONS, SEARCH_KEY

logger = logging.getLogger(__name__)

_BYO_KIND = {"ei": "ei", "pi": "poi", "ucb": "ucb"}


# BayesOptSearch arguments GPHedgeSearch does not take, and what to use instead.
_REFUSED = {
    "random_state": "pass seed= instead (it seeds the GP fits, candidates and hedge draws)",
    "utility_kwargs": "pass acquisitions=, kappa= and xi= instead (a portfolio, not one utility)",
    "random_search_steps": "GPHedgeSearch has its own initial design: points_to_evaluate, then "
                           "space-filling points until two results are in",
    "patience": "GPHedgeSearch never repeats a point, so it never stops early",
    "skip_duplicate": "GPHedgeSearch never suggests a point within min_spacing of a taken one",
    "repeat_float_precision": "GPHedgeSearch never suggests a point within min_spacing of a "
                              "taken one; set min_spacing instead",
}


class GPHedgeSearch(BayesOptSearch):
    """GP-Hedge portfolio (EI/PI/UCB) around Ray Tune's `BayesOptSearch`, batch- and pending-aware.

    It keeps Ray's searcher for everything but the choice of the next point: search-space
    conversion (a space passed in, or Tune's ``param_space``), the bayesian-optimization GP and
    its observations, ``save``/``restore`` and ``register_analysis``.

    **Batches, one acquisition per slot.** With ``batch_size = q`` (set it to Tune's
    ``max_concurrent_trials``), q consecutive suggestions form a batch and share the hedge
    probabilities of that moment; each slot draws its own acquisition. Per slot rather than per
    batch because (a) a batch then mixes exploiting and exploring nominees, which spreads it, and
    (b) the hedge gets q sets of nominees to learn from per batch instead of one. Batches are
    asynchronous: a slot is filled as soon as Tune frees it, never waiting for the whole batch.

    **Pending points.** Every nominee is chosen on a GP conditioned on the pending points (running
    trials and earlier slots of this batch) at their posterior mean, the "kriging believer", so
    the acquisitions stop pointing where a trial is already running; in addition no point closer
    than ``min_spacing`` (as a fraction of each dimension's range) to an evaluated, pending or
    failed point is ever suggested. So a run never repeats a point and never ends early.

    **Gains.** When every trial of a batch has finished, the GP is refitted and each function's
    gain grows by the posterior mean at each of its nominees of that batch, standardized by the
    observed scores' mean and spread so that ``eta`` does not depend on the metric's scale.

    **Initial points.** ``points_to_evaluate`` run first (for merging: λ = α and λ = 1, as in
    the paper, and λ = 0), and no other point is suggested until all of them have returned:
    ``suggest`` returns None meanwhile and Tune asks again when a trial ends. Blind exploration
    would cost trials, an idle slot costs nothing. If fewer than two initial points succeed, the
    next points go where nothing has been tried ("explore", farthest from every taken point).

    **What a suggestion holds.** The space's parameters, and one more key, ``"_ckmerge_search"``
    (``SEARCH_KEY``): the searcher's record of the trial, ``{"acquisition": "initial" | "explore"
    | "ei" | "pi" | "ucb", "batch": int, "p_ei": float, ...}``; read it with
    ``ckmerge_ray.search.search_record(config)``. Nothing else is added, so a user's own
    ``batch`` or ``acquisition`` parameter reaches the trainable unchanged. Tune names trials
    after every config leaf, so the record's leaves appear in trial names too.

    **Scores.** Any finite real number is an observation, whatever its type (``float``, ``int``,
    ``np.float32``, ``np.int64``, a 0-d array, ``Repeater``'s mean); so is any finite stderr under
    ``noise_key``. A failed trial (error, missing, non-finite or non-numeric metric) is recorded:
    its point is never suggested again, and nothing waits for it.

    **Trials re-run under a new id.** A finished result for a trial it did not suggest under
    that id, whose ``config`` gives every parameter of the space, is an observation of that point
    (no longer a failed one): ``Tuner.restore(..., restart_errored=True)`` re-runs an errored
    trial, say one of a lost worker node, under a new id. So that Tune's ``max_concurrent_trials``
    limiter passes such results on (it drops those of trials it did not hand out), the searcher
    keeps that limit itself (``set_max_concurrency``).

    **BayesOptSearch's arguments.**

    ===========================  ==================================================================
    ``space``, ``metric``,       accepted, as in BayesOptSearch (``space`` may be bounds or Tune
    ``mode``, ``analysis``,      domains, or None to take Tune's ``param_space``; ``analysis`` is
    ``verbose``                  registered with either)
    ``points_to_evaluate``       accepted; checked once the space is known: a point missing a
                                 parameter or with a non-finite value raises ValueError, a repeat
                                 runs once (logged)
    ``random_state``             replaced by ``seed``
    ``utility_kwargs``           replaced by ``acquisitions``, ``kappa``, ``xi``
    ``random_search_steps``      refused: its own initial design (``points_to_evaluate``, then
                                 space-filling points until two results are in)
    ``patience``,                refused: it never suggests a point within ``min_spacing`` of a
    ``skip_duplicate``,          taken one, so it never repeats and never stops early
    ``repeat_float_precision``
    ===========================  ==================================================================

    A refused or replaced name raises ``TypeError("GPHedgeSearch does not take BayesOptSearch's
    random_state=: pass seed= instead ...")``, naming what to use instead.

    Args:
        space: bayesian-optimization bounds ``{"name": (low, high)}`` or Tune domains; or None to
            take it from Tune's ``param_space``.
        metric, mode: what to optimize, as in every Tune searcher.
        points_to_evaluate: configurations to run first, in order.
        batch_size: suggestions per batch (default 1: classic sequential GP-Hedge).
        acquisitions: any non-empty subset of ("ei", "pi", "ucb") (default all three); a single
            one disables the hedge.
        eta: hedge learning rate (default 1.0).
        initial_gains: the hedge's starting gain per acquisition (default none: all 0, the
            uniform start of GP-Hedge); a name outside ``acquisitions`` is ignored. Gains are in
            units of the observed scores' spread, as the credits are, so with ``eta`` = 1
            ``{"pi": -1.0}`` starts PI at probability e⁻¹/(2 + e⁻¹) ≈ 16 % instead of 1/3, and
            PI catches up only if its nominees' posterior means beat the others' by about one
            spread in all. ``merge_searcher`` passes ``{"pi": -1.0}`` (chosen on the fit split;
            see there).
        xi: EI/PI improvement margin, in the metric's units (default 0.0; ``xi`` depends on the
            metric's scale, so no other default would carry across metrics. On the fit split no
            margin helped: ξ = 0.3·std(y) moved PI's first nominee into the 1 % band on 2 of 9
            landscapes but EI's out of it on 3, ``benchmarks/tune_defaults.py``).
        kappa: UCB exploration weight (default 1.0, not bayes_opt's 2.576, which is tuned for
            long runs: within a budget of about ten trials on a smooth 1-D landscape, UCB at
            2.576 σ spends trials on the edges. On the demo landscapes, median trials to 1 % of
            the gain went from 4 to 3 at q = 1 on [0.5, 1] and from 7 to 5 at q = 4. Checked
            again on the fit split by ``benchmarks/tune_defaults.py``: UCB's first nominee lands
            within 1 % of the gain on 6 of 9 landscapes at κ = 1, on 3 of 9 at 0.5 or 2).
        gp_noise: the GP's ``alpha``, observation noise variance added to the kernel diagonal
            on the normalized target scale (default 1e-6: deterministic objectives). Raise it
            (e.g. 1e-2) for noisy objectives so the GP does not interpolate noise.
        noise_key: a result key holding each observation's standard error (e.g. lm-eval's
            ``score_stderr``). Each observation then gets its own noise variance, (stderr / spread
            of the observed scores)² on the GP's normalized scale (at least ``gp_noise``), and
            EI/PI measure improvement over the best posterior mean at an observed point rather
            than over the best observed score. Why: a benchmark subset of a few hundred
            questions has a standard error of a few accuracy points, often larger than the
            differences between nearby λ; a GP that interpolates such scores puts a spike at
            every lucky draw and spends trials next to it. Heteroscedastic noise (one variance
            per point) rather than one fitted noise level, because the error is known per trial
            and differs between fidelities (see ``fidelity`` results below). Results without a
            finite stderr keep ``gp_noise``.
            A result with ``fidelity == "screen"`` (a trial stopped after its cheap evaluation)
            is never suggested again; it informs the GP only when it carries a stderr.
        min_spacing: smallest allowed distance between two suggested points, as a fraction of
            the range (default 0.01).
        min_length_scale: lower bound of the GP kernel's length scale, as a fraction of the
            range (default None: bayes_opt's Matern kernel, bounds 1e-5 to 1e5). In more than
            one dimension the kernel gets a length scale per dimension (ARD), each bounded by
            this fraction of its own range: a window's weights and its length vary on
            different scales. With
            a handful of points a free length scale often collapses, the GP mean reverts to the
            prior between observations, and the acquisitions cling to the best observed point;
            a bound encodes "the landscape is smooth at this scale". ``merge_searcher`` sets
            0.2 in λ units, whatever the range (see there).
        seed: seeds the GP fits, the candidate sets and the hedge draws; same seed and same
            results give the same sequence, also across save/restore.
        n_candidates: random candidates per acquisition maximization and dimension (default
            2000: 2000·d points in d dimensions), the best three refined with L-BFGS-B.
        embed: None (default), or a picklable callable ``embed(points, names)`` mapping points
            (n, d), whose columns are the parameters `names` (the searcher's order, which is
            bayes_opt's sorted one), to what they mean (n, m): ``min_spacing`` is then measured
            there (max norm, unscaled), so parameters that mean one thing count as one point.
            `tune_window` passes the window's merge weights (``families.WeightsOf``): an edge
            of the simplex's cube is one checkpoint alone, proposed once.
        analysis: a finished run's ``ExperimentAnalysis`` whose results seed the GP (as in
            BayesOptSearch). verbose: bayesian-optimization's verbosity (default 0).

    Example::

        from ray import tune
        from ckmerge_ray import GPHedgeSearch

        searcher = GPHedgeSearch(metric="score", mode="min", batch_size=2, seed=0)
        tuner = tune.Tuner(objective, param_space={"lam": tune.uniform(0.5, 1.0)},
                           tune_config=tune.TuneConfig(search_alg=searcher, num_samples=12,
                                                       max_concurrent_trials=2))

    .. warning:: Set ``batch_size`` equal to the number of concurrent trials; a smaller value
       only makes batches shorter, a larger one lets probabilities lag behind results.
    """

    STATE_VERSION = 1

    def __init__(
        self,
        space: Optional[Dict] = None,
        metric: Optional[str] = None,
        mode: Optional[str] = None,
        points_to_evaluate: Optional[List[Dict]] = None,
        batch_size: int = 1,
        acquisitions: Sequence[str] = ACQUISITIONS,
        eta: float = 1.0,
        initial_gains: Optional[Dict[str, float]] = None,
        xi: float = 0.0,
        kappa: float = 1.0,
        gp_noise: float = 1e-6,
        noise_key: Optional[str] = None,
        min_spacing: float = 0.01,
        min_length_scale: Optional[float] = None,
        seed: int = 0,
        n_candidates: int = 2000,
        embed=None,
        analysis=None,
        verbose: int = 0,
        **bayesopt_only,
    ):
        for name in bayesopt_only:
            if name in _REFUSED:
                raise TypeError(f"GPHedgeSearch does not take BayesOptSearch's {name}=: "
                                f"{_REFUSED[name]}")
            raise TypeError(f"GPHedgeSearch got an unexpected keyword argument {name!r}")
        acquisitions = tuple(dict.fromkeys(acquisitions))
        if not acquisitions or any(a not in ACQUISITIONS for a in acquisitions):
            raise ValueError(
                f"acquisitions must be a non-empty subset of {ACQUISITIONS}, got {acquisitions!r}"
            )
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if eta < 0:
            raise ValueError(f"eta must be non-negative, got {eta}")
        if gp_noise <= 0:
            raise ValueError(f"gp_noise must be positive, got {gp_noise}")
        if not 0 <= min_spacing < 0.5:
            raise ValueError(f"min_spacing must be in [0, 0.5), got {min_spacing}")
        self.state_version = self.STATE_VERSION
        self.batch_size = batch_size
        self.acquisitions = acquisitions
        self.eta, self.xi, self.kappa = float(eta), float(xi), float(kappa)
        self.gp_noise = float(gp_noise)
        self.noise_key = noise_key
        self._obs_stderr: List[float] = []  # per registered observation, in registration order
        self.min_spacing = float(min_spacing)
        if min_length_scale is not None and min_length_scale <= 0:
            raise ValueError(f"min_length_scale must be positive, got {min_length_scale}")
        self.min_length_scale = min_length_scale
        self.seed = int(seed)
        self.n_candidates = int(n_candidates)
        self.embed = embed
        initial_gains = dict(initial_gains or {})
        unknown = [a for a in initial_gains if a not in ACQUISITIONS]
        if unknown:
            raise ValueError(f"initial_gains names {unknown}; acquisitions are {ACQUISITIONS}")
        if any(finite_real(v) is None for v in initial_gains.values()):
            raise ValueError(f"initial_gains must be finite numbers, got {initial_gains!r}")
        # A name outside `acquisitions` is ignored, so one prior serves every portfolio.
        self.gains: Dict[str, float] = {a: float(initial_gains.get(a, 0.0)) for a in acquisitions}
        self.batch_index = -1
        self._slot = batch_size  # the first suggestion opens batch 0
        self._batch_probs: Dict[str, float] = {}
        self._nominees: Dict[int, List[Dict[str, List[float]]]] = {}
        self._outstanding: Dict[int, List[str]] = {}
        self._trial_info: Dict[str, Dict] = {}
        self._failed: List[List[float]] = []
        self.suggest_seconds = 0.0  # time spent choosing points, for the run's time budget
        self.max_concurrent = 0  # Tune's max_concurrent_trials (set_max_concurrency); 0: none
        if points_to_evaluate is not None and not isinstance(points_to_evaluate, (list, tuple)):
            raise TypeError(f"points_to_evaluate must be a list of dicts, got "
                            f"{type(points_to_evaluate).__name__}")
        for p in points_to_evaluate or []:
            if not isinstance(p, dict):
                raise TypeError(f"points_to_evaluate must be a list of dicts, got {p!r}")
        super().__init__(
            space=space, metric=metric, mode=mode,
            points_to_evaluate=[flatten_dict(dict(p)) for p in (points_to_evaluate or [])],
            random_state=seed, random_search_steps=0, patience=10**9, skip_duplicate=False,
            analysis=analysis, verbose=verbose,
        )

    # --- Searcher contract -------------------------------------------------------------------

    def _setup_optimizer(self):
        # BayesOptSearch registers `analysis` at the end of its own set-up; our keys, bounds and
        # GP settings must exist first, so hold the analysis back and register it afterwards.
        analysis, self._analysis = self._analysis, None
        try:
            super()._setup_optimizer()
        finally:
            self._analysis = analysis
        self.optimizer.set_gp_params(alpha=self.gp_noise, random_state=self.seed)
        self._keys = list(self.optimizer.space.keys)
        self._bounds = np.asarray(self.optimizer.space.bounds, dtype=float)  # (d, 2)
        if self.min_length_scale is not None:
            from sklearn.gaussian_process.kernels import Matern

            ranges = self._bounds[:, 1] - self._bounds[:, 0]
            if len(ranges) == 1:
                low = self.min_length_scale * float(ranges[0])
                kernel = Matern(nu=2.5, length_scale=max(1.0, low), length_scale_bounds=(low, 1e5))
            else:  # one length scale per dimension, each floored at its own range's fraction
                lows = self.min_length_scale * ranges
                kernel = Matern(nu=2.5, length_scale=np.maximum(1.0, lows),
                                length_scale_bounds=[(float(lo), 1e5) for lo in lows])
            self.optimizer.set_gp_params(kernel=kernel)
        self._points_to_evaluate = self._checked_points(self._points_to_evaluate or [])
        if self._analysis is not None:
            self.register_analysis(self._analysis)

    def _checked_points(self, points: List[Dict]) -> List[Dict[str, float]]:
        """`points_to_evaluate` against the space, once it is known: every point names each
        parameter with a finite number (else ValueError); repeats are merged (logged)."""
        out, seen = [], set()
        for p in points:
            flat = flatten_dict(dict(p))
            missing = [k for k in self._keys if k not in flat]
            if missing:
                raise ValueError(f"points_to_evaluate: {p!r} has no value for {missing} "
                                 f"(the space's parameters are {self._keys})")
            values = {k: finite_real(flat[k]) for k in self._keys}
            bad = [k for k, v in values.items() if v is None]
            if bad:
                raise ValueError(f"points_to_evaluate: {p!r} must give a finite number for "
                                 f"{bad}")
            key = tuple(round(v, 12) for v in values.values())
            if key in seen:
                logger.warning("GPHedgeSearch: points_to_evaluate repeats %s; it runs once",
                               values)
                continue
            seen.add(key)
            out.append(values)
        return out

    def suggest(self, trial_id: str) -> Optional[Dict]:
        start = time.perf_counter()
        try:
            return self._suggest(trial_id)
        finally:
            self.suggest_seconds += time.perf_counter() - start

    def _suggest(self, trial_id: str) -> Optional[Dict]:
        if not self.optimizer:
            return super().suggest(trial_id)  # raises Ray's "no search space" error
        if not self._metric or not self._mode:
            return super().suggest(trial_id)  # raises Ray's "no metric/mode" error
        if not self._points_to_evaluate and self._initial_pending():
            # The GP's first choices are only as good as the initial points it has seen: wait
            # for them (Tune asks again when a trial ends) rather than spend trials exploring
            # blind. Idle slots cost nothing; a trial costs an evaluation.
            return None
        if self.max_concurrent and len(self._live_trial_mapping) >= self.max_concurrent:
            return None  # the limit Tune's ConcurrencyLimiter left to us (set_max_concurrency)
        if self._slot >= self.batch_size:
            self._open_batch()
        if self._points_to_evaluate:
            params = {k: float(v) for k, v in self._points_to_evaluate.pop(0).items()}
            x, source = self._to_array(params), "initial"
        else:
            x, source = self._propose(trial_id)
            params = self._to_params(x)
        self._slot += 1
        self._live_trial_mapping[trial_id] = params
        info = {"batch": self.batch_index, "acquisition": source}
        info.update({f"p_{a}": self._batch_probs[a] for a in self.acquisitions})
        self._trial_info[trial_id] = info
        self._outstanding[self.batch_index].append(trial_id)
        # The bookkeeping rides in one namespaced key, never beside the user's parameters.
        return {**unflatten_dict(dict(params)), SEARCH_KEY: dict(info)}

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        """Tune's ``max_concurrent_trials`` (through ``ConcurrencyLimiter``): kept here, so that
        the limiter passes on the results of trials it did not hand out (see the class doc)."""
        self.max_concurrent = int(max_concurrent)
        return True

    def on_trial_complete(
        self, trial_id: str, result: Optional[Dict] = None, error: bool = False
    ) -> None:
        params = self._live_trial_mapping.pop(trial_id, None)
        if params is None:
            self._complete_unknown(result, error)
            return
        self.record_result(params, result, error)
        batch = self._trial_info.get(trial_id, {}).get("batch")
        if batch is not None and trial_id in self._outstanding.get(batch, []):
            self._outstanding[batch].remove(trial_id)
            self._credit_if_complete(batch)

    def _complete_unknown(self, result: Optional[Dict], error: bool) -> None:
        """A trial this searcher did not suggest under this id: Tune re-ran an errored one
        (``restart_errored``) under a new id. Its result's ``config`` (nested, or flattened to
        ``config/<name>`` as Tune passes it) names the point; a repeat is a no-op (bayes_opt
        refuses a known point, and a failed point is listed once)."""
        if error or result is None or not self.optimizer:
            return
        try:
            flat = flatten_dict(dict(result))
        except (TypeError, ValueError):
            return
        values = {k: finite_real(flat.get(f"config/{k}")) for k in self._keys}
        if any(v is None for v in values.values()):
            return  # not a trial of this space: nothing to learn from
        x = self._to_array(values)
        for tid, p in list(self._live_trial_mapping.items()):
            if np.allclose(self._to_array(p), x, rtol=1e-12, atol=1e-12):
                # Our own trial at that point, still pending under its old id (the searcher's
                # state was saved before its error): the same trial, so it completes that one.
                self.on_trial_complete(tid, result, error)
                return
        self.record_result(values, result)

    def record_result(self, params: Dict, result: Optional[Dict], error: bool = False) -> None:
        """Record a finished evaluation: a GP observation, or a failed point never suggested again.

        Public so that a saved trials table can rebuild the GP a run ended with (plots).
        """
        finite = finite_real(result_value(result, self._metric)) is not None
        screened = result_value(result, "fidelity") == "screen"
        if error or not finite or (screened and not self._finite_stderr(result)):
            # (screened without a stderr: excluded, but no GP input)
            x = self._to_array(params).tolist()
            if x not in self._failed:
                self._failed.append(x)
        else:
            self._register_result(params, result)

    def _register_result(self, params, result):
        # Also reached directly from BayesOptSearch.register_analysis (a dataframe row and a
        # trial's whole config), so check everything here.
        flat = flatten_dict(dict(params))
        value = finite_real(result_value(result, self._metric))
        if value is None or any(finite_real(flat.get(k)) is None for k in self._keys):
            return
        params = {k: float(flat[k]) for k in self._keys}
        with warnings.catch_warnings():
            # Initial points may lie outside the bounds on purpose (λ = 0 informs the GP).
            warnings.filterwarnings("ignore", message="(?s).*outside the bounds")
            try:
                super()._register_result(params, {self._metric: value})
            except (KeyError, NotUniqueError) as e:  # the point is already known
                logger.info("GPHedgeSearch: not registering a repeated point: %s", e)
                return
        self._obs_stderr.append(self._finite_stderr(result) or math.nan)
        if self._failed:  # observed now (a re-run of a trial that errored): no longer failed
            x = self._to_array(params)
            self._failed = [f for f in self._failed
                            if not np.allclose(f, x, rtol=1e-12, atol=1e-12)]

    def _finite_stderr(self, result: Optional[Dict]) -> Optional[float]:
        value = finite_real(result_value(result, self.noise_key)) if self.noise_key else None
        return value if value is not None and value >= 0 else None

    def get_state(self) -> Dict:
        state = super().get_state()
        state.pop("_gp_cache", None)  # a fit, recomputed on demand
        state["state_version"] = self.STATE_VERSION
        return state

    def set_state(self, state: Dict) -> None:
        version = state.get("state_version")
        if version != self.STATE_VERSION:
            raise ValueError(
                f"GPHedgeSearch state version {version!r} cannot be restored by version "
                f"{self.STATE_VERSION}"
            )
        super().set_state(state)

    # --- Hedge ---------------------------------------------------------------------------------

    def probabilities(self) -> Dict[str, float]:
        """Current hedge probabilities, ∝ exp(η·gain)."""
        g = np.array([self.gains[a] for a in self.acquisitions])
        w = np.exp(self.eta * (g - g.max()))
        return dict(zip(self.acquisitions, (w / w.sum()).tolist()))

    def posterior_mean(self, points: Sequence[Dict]) -> np.ndarray:
        """The GP's posterior mean of the metric (in its own units and sign) at `points`."""
        X, y = self._observations()
        gp = self._fit_gp(X, y)
        return self._metric_op * gp.predict(np.asarray([self._to_array(p) for p in points]))

    def posterior(self, points: Sequence[Dict]) -> Tuple[np.ndarray, np.ndarray]:
        """The GP's posterior mean and standard deviation of the metric (its own units and sign).

        The same fit as `posterior_mean`; the standard deviation is what plots draw as a band.
        """
        X, y = self._observations()
        gp = self._fit_gp(X, y)
        mean, std = gp.predict(np.asarray([self._to_array(p) for p in points]), return_std=True)
        return self._metric_op * mean, std

    def _initial_pending(self) -> bool:
        return any(self._trial_info.get(t, {}).get("acquisition") == "initial"
                   for t in self._live_trial_mapping)

    def _open_batch(self) -> None:
        self.batch_index += 1
        self._slot = 0
        self._batch_probs = self.probabilities()
        self._nominees[self.batch_index] = []
        self._outstanding[self.batch_index] = []

    def _credit_if_complete(self, batch: int) -> None:
        closed = batch < self.batch_index or self._slot >= self.batch_size
        if not closed or self._outstanding[batch] or not self._nominees.get(batch):
            return
        X, y = self._observations()
        if len(y) < 2:
            return
        gp = self._fit_gp(X, y)
        mu_y, sd_y = float(y.mean()), float(y.std()) or 1.0
        for nominees in self._nominees.pop(batch):
            for acq, x in nominees.items():
                mu = float(gp.predict(np.asarray([x]))[0])
                self.gains[acq] += (mu - mu_y) / sd_y

    # --- Proposals -----------------------------------------------------------------------------

    def _propose(self, trial_id: str):
        rng = np.random.default_rng([self.seed, self.batch_index, self._slot])
        X, y = self._observations()
        pending = [self._to_array(p) for t, p in self._live_trial_mapping.items() if t != trial_id]
        taken = [*X, *pending, *(np.asarray(f) for f in self._failed)]
        if len(y) < 2:
            return self._box().farthest(taken, rng), "explore"
        gp = self._fit_gp(X, y)
        # With noisy scores the incumbent is the best posterior mean, not a lucky draw.
        y_max = float(gp.predict(X).max()) if self.noise_key else float(y.max())
        if pending:
            gp = kriging_believer(gp, X, y, np.asarray(pending), self.gp_noise)
        box = self._box()
        nominees = {a: box.maximize(_BYO_KIND[a], self.kappa, self.xi, gp, y_max, taken, rng)
                    for a in self.acquisitions}
        self._nominees[self.batch_index].append({a: x.tolist() for a, x in nominees.items()})
        probs = [self._batch_probs[a] for a in self.acquisitions]
        chosen = self.acquisitions[int(rng.choice(len(self.acquisitions), p=probs))]
        return nominees[chosen], chosen

    def _box(self) -> Box:
        embed = self.embed
        return Box(self._bounds, self.min_spacing, self.n_candidates,
                   None if embed is None else (lambda X: embed(X, self._keys)))

    # --- GP helpers ----------------------------------------------------------------------------

    def _observations(self):
        space = self.optimizer.space
        return np.asarray(space.params, dtype=float), np.asarray(space.target, dtype=float)

    def _fit_gp(self, X: np.ndarray, y: np.ndarray):
        from sklearn.base import clone

        alpha = self.noise_variances(y)
        # The fit is deterministic (fixed seed), so the same data give the same GP: the fit that
        # credits a finished batch serves the next proposal too (half the fits at q = 1).
        key = (X.tobytes(), y.tobytes(), np.asarray(alpha, dtype=float).tobytes())
        cached = getattr(self, "_gp_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        gp = clone(self.optimizer._gp)  # same kernel, noise and seed as bayes_opt's own GP
        gp.set_params(alpha=alpha)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gp.fit(X, y)
        self._gp_cache = (key, gp)
        return gp

    def noise_variances(self, y: np.ndarray) -> np.ndarray | float:
        """Per-observation noise variance on the GP's normalized scale (see ``noise_key``)."""
        if not self.noise_key or len(self._obs_stderr) != len(y):
            return self.gp_noise
        spread = float(np.std(y)) or 1.0
        se = np.nan_to_num(np.asarray(self._obs_stderr, dtype=float), nan=0.0)
        return np.maximum(self.gp_noise, (se / spread) ** 2)

    def _to_array(self, params: Dict) -> np.ndarray:
        return np.asarray([float(params[k]) for k in self._keys])

    def _to_params(self, x: np.ndarray) -> Dict[str, float]:
        return {k: float(v) for k, v in zip(self._keys, x)}
