"""GPHedgeSearch: hedge update, batch spreading, pending points, failures, save/restore."""

import math

import numpy as np
import pytest

from ckmerge_ray.search import GPHedgeSearch, initial_points, merge_searcher, search_record


def drive(searcher, f, n, concurrent=1, fail=lambda lam: False):
    """Run the searcher as Tune does: up to `concurrent` pending, oldest finishes first."""
    done, pending, i = [], [], 0
    while len(done) < n:
        while len(pending) < concurrent and len(done) + len(pending) < n:
            cfg = searcher.suggest(f"t{i}")
            assert cfg != GPHedgeSearch.FINISHED
            if cfg is None:  # waiting for results: Tune asks again when a trial ends
                assert pending, "None with nothing running would stall the run"
                break
            pending.append((f"t{i}", cfg))
            i += 1
        tid, cfg = pending.pop(0)
        if fail(cfg["lam"]):
            searcher.on_trial_complete(tid, None, error=True)
        else:
            searcher.on_trial_complete(tid, {"score": f(cfg["lam"])})
        done.append(cfg)
    return done


def bowl(lam):
    return (lam - 0.71) ** 2 + 3.0


def test_initial_points_are_the_endpoints():
    assert initial_points(0.5) == [{"lam": 0.0}, {"lam": 0.5}, {"lam": 1.0}]
    assert initial_points(0.0, extra=[0.3, 1.0]) == [{"lam": 0.0}, {"lam": 1.0}, {"lam": 0.5}, {"lam": 0.3}]


def test_waits_for_initial_results_before_the_first_gp_choice():
    s = merge_searcher(0.5, "min", batch_size=4, seed=0)
    first = [s.suggest(t) for t in "abcd"]
    assert [c["lam"] for c in first[:3]] == [0.0, 0.5, 1.0]
    assert first[3] is None  # no blind exploration while the initial points are running
    for t, lam in zip("abc", (0.0, 0.5, 1.0)):
        s.on_trial_complete(t, {"score": bowl(lam)})
    nxt = s.suggest("e")
    assert search_record(nxt)["acquisition"] in {"ei", "pi", "ucb"}


def test_endpoints_first_then_distinct_points_on_a_flat_landscape():
    s = merge_searcher(0.5, "min", batch_size=2, seed=0)
    seen = drive(s, lambda lam: 1.0, 12, concurrent=2)  # stock BayesOptSearch would stop early
    lams = [c["lam"] for c in seen]
    assert lams[:3] == [0.0, 0.5, 1.0]
    assert [search_record(c)["acquisition"] for c in seen[:3]] == ["initial"] * 3
    assert len(set(lams)) == 12
    gaps = np.diff(sorted(lams[1:]))
    assert gaps.min() >= s.min_spacing * 0.5 - 1e-12


def test_finds_interior_minimum_quickly():
    s = merge_searcher(0.5, "min", batch_size=1, seed=0)
    seen = drive(s, bowl, 7)
    assert min(abs(c["lam"] - 0.71) for c in seen) < 0.02


@pytest.mark.parametrize("q", [2, 4])
def test_batch_is_spread_and_respects_pending(q):
    s = merge_searcher(0.5, "min", batch_size=q, seed=1)
    drive(s, bowl, 4)  # some history, nothing pending
    batch = [s.suggest(f"b{i}") for i in range(q)]  # all pending at once
    assert len({search_record(c)["batch"] for c in batch}) == 1
    lams = sorted(c["lam"] for c in batch)
    assert np.diff(lams).min() >= s.min_spacing * 0.5  # min_spacing is relative to [0.5, 1]
    evaluated = [float(x[0]) for x in s.optimizer.space.params]
    assert all(min(abs(l - e) for e in evaluated) >= s.min_spacing * 0.5 for l in lams)


def test_rows_record_batch_acquisition_and_probabilities():
    s = merge_searcher(0.5, "min", batch_size=2, seed=0)
    seen = [search_record(c) for c in drive(s, bowl, 8, concurrent=2)]
    batches = [c["batch"] for c in seen]
    assert batches == sorted(batches) and max(batches.count(b) for b in batches) <= 2
    for c in seen:
        assert math.isclose(c["p_ei"] + c["p_pi"] + c["p_ucb"], 1.0)
        assert c["acquisition"] in {"initial", "explore", "ei", "pi", "ucb"}
    assert {c["acquisition"] for c in seen[3:]} <= {"ei", "pi", "ucb", "explore"}


def test_hedge_moves_toward_the_acquisition_with_better_nominees():
    # UCB with a huge kappa nominates the most uncertain point, whatever its mean; EI nominates
    # where the mean is good. On a smooth bowl EI's nominees have the better posterior mean.
    s = GPHedgeSearch(space={"lam": (0.0, 1.0)}, metric="score", mode="min",
                      points_to_evaluate=[{"lam": 0.0}, {"lam": 1.0}], acquisitions=("ei", "ucb"),
                      kappa=50.0, eta=1.0, batch_size=1, seed=0)
    drive(s, bowl, 14)
    p = s.probabilities()
    assert s.gains["ei"] > s.gains["ucb"]
    assert p["ei"] > 0.7 > p["ucb"]


def test_single_acquisition_disables_the_hedge():
    s = merge_searcher(0.5, "min", batch_size=1, acquisitions=("ei",), seed=0)
    seen = [search_record(c) for c in drive(s, bowl, 6)]
    assert all(c["p_ei"] == 1.0 for c in seen)
    assert {c["acquisition"] for c in seen[3:]} == {"ei"}


def test_bad_arguments():
    with pytest.raises(ValueError, match="acquisitions must be a non-empty subset"):
        merge_searcher(0.5, "min", 1, acquisitions=("lcb",))
    with pytest.raises(ValueError, match="acquisitions must be a non-empty subset"):
        merge_searcher(0.5, "min", 1, acquisitions=())
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        merge_searcher(0.5, "min", 0)


def test_failed_initial_trial_does_not_stall_and_is_not_resuggested():
    s = merge_searcher(0.5, "min", batch_size=3, seed=0)
    a, b, c = (s.suggest(t) for t in "abc")
    s.on_trial_complete("a", {"score": 2.0})
    s.on_trial_complete("b", None, error=True)  # λ = 0.5 failed
    s.on_trial_complete("c", {"score": float("nan")})  # λ = 1 returned NaN: failed too
    nxt = [s.suggest(t) for t in "def"]
    assert all(x is not None for x in nxt), "the searcher must not wait for results that never come"
    assert all(min(abs(x["lam"] - 0.5), abs(x["lam"] - 1.0)) >= 0.5 * s.min_spacing * 0.5 for x in nxt)


def test_same_seed_same_sequence():
    a = drive(merge_searcher(0.5, "min", 2, seed=7), bowl, 9, concurrent=2)
    b = drive(merge_searcher(0.5, "min", 2, seed=7), bowl, 9, concurrent=2)
    assert a == b


def test_save_restore_keeps_pending_and_continues_the_same_sequence(tmp_path):
    ref = merge_searcher(0.5, "min", 2, seed=3)
    drive(ref, bowl, 5, concurrent=2)
    live = merge_searcher(0.5, "min", 2, seed=3)
    drive(live, bowl, 5, concurrent=2)
    for s in (ref, live):
        s.suggest("p1")
        s.suggest("p2")
    live.on_trial_complete("p1", {"score": bowl(live._live_trial_mapping["p1"]["lam"])})
    ref.on_trial_complete("p1", {"score": bowl(ref._live_trial_mapping["p1"]["lam"])})
    live.save(str(tmp_path / "s.pkl"))
    restored = merge_searcher(0.5, "min", 2, seed=3)
    restored.restore(str(tmp_path / "s.pkl"))
    assert "p2" in restored._live_trial_mapping  # pending trial still tracked
    assert restored.gains == ref.gains and restored.batch_index == ref.batch_index
    for s in (ref, restored):
        s.on_trial_complete("p2", {"score": bowl(s._live_trial_mapping["p2"]["lam"])})
    assert drive(restored, bowl, 4, concurrent=2) == drive(ref, bowl, 4, concurrent=2)


def test_restore_refuses_unknown_state_version(tmp_path):
    import pickle

    s = merge_searcher(0.5, "min", 1)
    state = s.get_state()
    state["state_version"] = 99
    (tmp_path / "s.pkl").write_bytes(pickle.dumps(state))
    with pytest.raises(ValueError, match="state version 99 cannot be restored"):
        merge_searcher(0.5, "min", 1).restore(str(tmp_path / "s.pkl"))


def test_tune_checkpoint_round_trip_into_a_blank_searcher(tmp_path):
    # Tuner.restore rebuilds the searcher through save_to_dir / restore_from_dir.
    live = merge_searcher(0.5, "min", 2, seed=5)
    drive(live, bowl, 5, concurrent=2)
    live.suggest("pending")
    live.save_to_dir(str(tmp_path), session_str="s")
    blank = GPHedgeSearch()
    blank.restore_from_dir(str(tmp_path))
    assert "pending" in blank._live_trial_mapping and blank.gains == live.gains
    for s in (live, blank):
        s.on_trial_complete("pending", {"score": 3.1})
    assert drive(blank, bowl, 3, concurrent=2) == drive(live, bowl, 3, concurrent=2)


def _observe(searcher, points):
    """Feed (λ, result) pairs as finished trials."""
    for i, (lam, result) in enumerate(points):
        searcher._live_trial_mapping[f"o{i}"] = {"lam": lam}
        searcher.on_trial_complete(f"o{i}", result)


@pytest.mark.parametrize("aware", [False, True])
def test_noise_aware_gp_does_not_interpolate_a_lucky_draw(aware):
    """One observation 4 standard errors below a smooth bowl: the noise-aware GP (fed the
    stderr) stays near the bowl there; the plain GP goes through the outlier."""
    se, outlier = 0.01, 0.75
    lams = [0.5, 0.6, 0.7, outlier, 0.8, 0.9, 1.0]
    points = [(lam, {"score": bowl(lam) - (4 * se if lam == outlier else 0.0), "score_stderr": se})
              for lam in lams]
    s = merge_searcher(0.5, "min", 1, noise_key="score_stderr" if aware else None)
    _observe(s, points)
    X, y = s._observations()
    alpha = s.noise_variances(y)
    if aware:
        assert np.allclose(alpha, max(1e-6, (se / np.std(y)) ** 2))  # normalized-scale variance
    else:
        assert alpha == s.gp_noise
    predicted = -float(s._fit_gp(X, y).predict(np.array([[outlier]]))[0])  # GP maximizes -score
    pulled = (predicted - (bowl(outlier) - 4 * se)) / (4 * se)  # 0: at the outlier, 1: at the bowl
    assert (pulled > 0.5) if aware else (abs(pulled) < 0.05)


def test_screened_out_trials_are_excluded_and_informative_only_with_a_stderr():
    s = merge_searcher(0.5, "min", 1, noise_key="score_stderr")
    for i, score in enumerate((5.0, 4.0, 4.5)):  # the initial points λ = 0, 0.5, 1, in full
        s.on_trial_complete(f"i{i}", {"score": score, "fidelity": "full"}) if s.suggest(f"i{i}") else None
    _observe(s, [(0.8, {"score": 4.4, "fidelity": "screen"}),  # no stderr: excluded only
                 (0.6, {"score": 4.1, "fidelity": "screen", "score_stderr": 0.2})])  # noisy input
    X, _ = s._observations()
    assert sorted(X[:, 0].tolist()) == [0.0, 0.5, 0.6, 1.0]
    assert s._failed == [[0.8]]
    assert s.noise_variances(s._observations()[1])[-1] > 1e-3  # the screened λ is a noisy point
    for i in range(6):  # neither screened λ is proposed again
        cfg = s.suggest(f"n{i}")
        assert min(abs(cfg["lam"] - 0.8), abs(cfg["lam"] - 0.6)) >= 0.005
        s.on_trial_complete(f"n{i}", {"score": bowl(cfg["lam"])})


def test_length_scale_floor_is_in_lambda_units():
    # The GP's inputs are λ; on [0, 1] and on [0.5, 1] it sees the same initial points, so the
    # same scores give the same posterior (the floor was 0.4 of the range: 0.4 λ on [0, 1]).
    from ckmerge_ray.search.space import LENGTH_SCALE_FLOOR

    posts = []
    for alpha in (0.0, 0.5):
        s = merge_searcher(alpha, "min", 1, seed=0)
        _observe(s, [(lam, {"score": bowl(lam)}) for lam in (0.0, 0.5, 1.0)])
        X, y = s._observations()
        assert s._fit_gp(X, y).kernel_.length_scale >= LENGTH_SCALE_FLOOR - 1e-9
        posts.append(s.posterior([{"lam": x} for x in np.linspace(0.5, 1.0, 11)]))
    assert np.allclose(posts[0][0], posts[1][0]) and np.allclose(posts[0][1], posts[1][1])
    assert merge_searcher(0.5, "min", 1, min_length_scale=0.1).min_length_scale == 0.1  # explicit wins


def test_initial_gains_start_the_hedge_and_are_checked():
    s = merge_searcher(0.5, "min", 1, seed=0)  # merge_searcher: PI starts at gain -1
    p = s.probabilities()
    assert math.isclose(p["pi"], math.exp(-1) / (2 + math.exp(-1)))
    assert math.isclose(p["ei"], p["ucb"])
    seen = [search_record(c) for c in drive(s, bowl, 4)]
    assert math.isclose(seen[3]["p_pi"], p["pi"])  # the first GP choice draws with them
    g = GPHedgeSearch(space={"lam": (0.0, 1.0)}, metric="score", mode="min")
    assert g.gains == {"ei": 0.0, "pi": 0.0, "ucb": 0.0}  # GPHedgeSearch itself: uniform
    assert merge_searcher(0.5, "min", 1, acquisitions=("ei", "ucb")).gains == {"ei": 0.0, "ucb": 0.0}
    assert merge_searcher(0.5, "min", 1, initial_gains={}).gains["pi"] == 0.0
    with pytest.raises(ValueError, match="initial_gains names"):
        merge_searcher(0.5, "min", 1, initial_gains={"lcb": 1.0})
    with pytest.raises(ValueError, match="initial_gains must be finite"):
        merge_searcher(0.5, "min", 1, initial_gains={"pi": float("-inf")})


@pytest.mark.parametrize("first_attempt", ["errored", "pending"])
def test_a_trial_rerun_under_a_new_id_is_observed(first_attempt, tmp_path):
    """Tuner.restore(..., restart_errored=True) runs an errored trial again as a new Trial with a
    new id (ray/tune/execution/tune_controller.py: _requeue_restored_trials → Trial.reset(),
    trial_id=None), never handed out by the searcher; Tune passes its result flattened, config
    included (stop_trial: flatten_dict(trial.last_result)), through the ConcurrencyLimiter that
    max_concurrent_trials wraps around the searcher. "errored": the searcher was told of the
    error; "pending": its state was saved while the first attempt still ran."""
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.utils.util import flatten_dict

    from ckmerge_ray.search import SEARCH_KEY

    def searcher():
        s = GPHedgeSearch(space={"x": (0.0, 1.0)}, metric="score", mode="min", batch_size=2,
                          seed=0, points_to_evaluate=[{"x": 0.0}, {"x": 1.0}], n_candidates=200)
        return s, ConcurrencyLimiter(s, max_concurrent=2)  # what max_concurrent_trials=2 builds

    s, limiter = searcher()
    a, b = limiter.suggest("a"), limiter.suggest("b")
    assert limiter.suggest("c") is None  # the limit still holds
    limiter.on_trial_complete("a", {"score": bowl(0.0)})
    if first_attempt == "errored":
        limiter.on_trial_complete("b", None, error=True)  # its worker node was lost
        assert s._failed == [[1.0]]
    s.save(str(tmp_path / "s.pkl"))  # Tuner.restore: a fresh searcher from the saved state
    s, limiter = searcher()
    s.restore(str(tmp_path / "s.pkl"))
    rerun = flatten_dict({"score": bowl(1.0), "trial_id": "b2", "config": b})
    assert "config/x" in rerun and f"config/{SEARCH_KEY}/batch" in rerun
    limiter.on_trial_complete("b2", rerun)
    X, y = s._observations()
    assert sorted(X[:, 0].tolist()) == [0.0, 1.0] and s._failed == []
    assert sorted((-y).tolist()) == sorted([bowl(0.0), bowl(1.0)])
    assert s._live_trial_mapping == {} and s._outstanding[0] == []  # batch 0 closed
    limiter.on_trial_complete("b2", rerun)  # told twice: still one observation
    limiter.on_trial_complete("other", {"score": 1.0, "config": {"y": 0.5}})  # not this space
    assert len(s.optimizer.space) == 2
    nxt = [limiter.suggest(t) for t in ("d", "e", "f")]
    assert nxt[2] is None and {search_record(c)["acquisition"] for c in nxt[:2]} <= \
        {"ei", "pi", "ucb"}  # the GP chose from both results, two at a time


# --- every constructor argument, whichever way the space is given (issue 16) -------------------

SPACE_2D = {"x": (0.0, 1.0), "y": (0.0, 2.0)}
DOMAINS_2D = {"x": ("uniform", 0.0, 1.0), "y": ("uniform", 0.0, 2.0)}


def bowl_2d(config):
    return (config["x"] - 0.3) ** 2 + (config["y"] - 1.2) ** 2 / 4 + 1.0


def sum_of_coordinates(points, names):
    """An `embed` for the argument test: points with the same x + y/2 mean one thing."""
    points = np.asarray(points, dtype=float)
    return points[:, [names.index("x")]] + points[:, [names.index("y")]] / 2


BASE_2D = dict(metric="score", mode="min", seed=0, n_candidates=100)
PTE = [{"x": 0.9, "y": 0.1}, {"x": 0.1, "y": 1.9}, {"x": 0.5, "y": 1.0}]
GP = {"points_to_evaluate": PTE}  # for an argument of the GP's choice: three results first

# (argument, value, arguments it is tried with (also in its default run), what the searcher
# holds once it has the space). Each value changes the suggestions up to the first GP choice
# (after two explored points, or after the three of PTE) against the argument's default:
# checked, so a dropped argument cannot pass.
ARGUMENTS = [
    ("points_to_evaluate", PTE, {}, lambda s: s._points_to_evaluate == PTE),
    ("batch_size", 3, {}, lambda s: s.batch_size == 3),
    ("acquisitions", ("ucb", "ei"), {}, lambda s: s.acquisitions == ("ucb", "ei")),
    ("eta", 4.0, {"initial_gains": {"pi": -1.0}}, lambda s: s.eta == 4.0),
    ("initial_gains", {"pi": -1.0}, {}, lambda s: s.gains == {"ei": 0.0, "pi": -1.0, "ucb": 0.0}),
    ("xi", 0.5, {"acquisitions": ("ei",), **GP}, lambda s: s.xi == 0.5),
    ("kappa", 5.0, {"acquisitions": ("ucb",), **GP}, lambda s: s.kappa == 5.0),
    ("gp_noise", 0.1, {"acquisitions": ("ucb",), **GP},
     lambda s: s.gp_noise == 0.1 and s.optimizer._gp.alpha == 0.1),
    ("noise_key", "se", {"acquisitions": ("ei",), **GP}, lambda s: s.noise_key == "se"),
    ("min_spacing", 0.45, {"acquisitions": ("ucb",), **GP}, lambda s: s._box().min_spacing == 0.45),
    ("min_length_scale", 0.5, {"acquisitions": ("ucb",), **GP},
     lambda s: s.optimizer._gp.kernel.length_scale_bounds == [(0.5, 1e5), (1.0, 1e5)]),
    ("seed", 7, {"acquisitions": ("ucb",)},
     lambda s: s.seed == 7 and s.optimizer._gp.random_state == 7),
    ("n_candidates", 30, {"acquisitions": ("ucb",)}, lambda s: s._box().n_candidates == 30),
    ("embed", sum_of_coordinates, {"acquisitions": ("ucb",)},
     lambda s: s.embed is sum_of_coordinates),
]


def drive_2d(searcher, n, start=0):
    """Sequential trials on the 2-D bowl; results carry a stderr `se` (read with noise_key)."""
    seen = []
    for i in range(start, start + n):
        cfg = searcher.suggest(f"t{i}")
        seen.append(cfg)
        searcher.on_trial_complete(f"t{i}", {"score": bowl_2d(cfg), "se": 0.05})
    return seen


@pytest.mark.parametrize("name,value,support,holds", ARGUMENTS, ids=[a[0] for a in ARGUMENTS])
def test_every_argument_works_with_every_way_of_giving_the_space(name, value, support, holds,
                                                                 tmp_path):
    """Issue 16: each argument that changes behaviour takes effect whether the space comes
    (1) to the constructor, (2) from Tune's param_space (set_search_properties), or (3) from a
    saved state restored into a blank searcher mid-run (as Tuner.restore does): the searcher
    holds the setting, and all three make the same suggestions, which differ from those made
    with the argument at its default."""
    from ray import tune

    kwargs = {**BASE_2D, **support, name: value}
    n = len(kwargs.get("points_to_evaluate", [])) + 1 if "points_to_evaluate" in kwargs else 3
    k = 2  # (3) is saved after the first k trials; compared: n suggestions, to the GP's first
    domains = {p: getattr(tune, kind)(lo, hi) for p, (kind, lo, hi) in DOMAINS_2D.items()}
    given = GPHedgeSearch(space=SPACE_2D, **kwargs)
    tuned, saved = GPHedgeSearch(**kwargs), GPHedgeSearch(**kwargs)
    for s in (tuned, saved):
        assert s.set_search_properties(None, None, dict(domains))
    for s in (given, tuned, saved):
        assert holds(s), (name, "before any trial")
    first = drive_2d(saved, k)
    saved.save_to_dir(str(tmp_path), session_str="s")
    restored = GPHedgeSearch()  # blank, as Tune's restore builds it
    restored.restore_from_dir(str(tmp_path))
    assert name == "points_to_evaluate" or holds(restored), (name, "after restore")
    runs = {"constructor": drive_2d(given, n), "param_space": drive_2d(tuned, n),
            "restored": first + drive_2d(restored, n - k, start=k)}
    assert runs["param_space"] == runs["constructor"], name
    assert runs["restored"] == runs["constructor"], name
    default = drive_2d(GPHedgeSearch(space=SPACE_2D, **BASE_2D, **support), n)
    assert runs["constructor"] != default, f"{name}={value!r} changed nothing"
