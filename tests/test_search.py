"""MergeSearch: endpoints first, no repeated λ, no hang or early stop, state survives save."""

import pytest

from ckmerge_ray.search import MergeSearch, initial_points, widest_gap_midpoint


def test_widest_gap_midpoint():
    assert widest_gap_midpoint([0.5, 1.0], 0.5, 1.0) == 0.75
    assert widest_gap_midpoint([0.0, 0.5, 1.0, 0.6], 0.5, 1.0) == 0.8


def test_initial_points_are_the_endpoints():
    assert initial_points(0.5) == [{"lam": 0.0}, {"lam": 0.5}, {"lam": 1.0}]
    assert initial_points(0.0) == [{"lam": 0.0}, {"lam": 1.0}]


def _run(searcher, f, n, concurrent=1):
    """Drive the searcher as Tune would: up to `concurrent` pending, results in order."""
    seen, pending, i = [], [], 0
    while len(seen) + len(pending) < n or pending:
        while len(pending) < concurrent and len(seen) + len(pending) < n:
            cfg = searcher.suggest(f"t{i}")
            if cfg is None:
                break
            assert cfg != searcher.FINISHED
            pending.append((f"t{i}", cfg))
            i += 1
        tid, cfg = pending.pop(0)
        searcher.on_trial_complete(tid, {"score": f(cfg["lam"])})
        seen.append(cfg)
    return seen


def test_endpoints_first_then_distinct_points_without_early_stop():
    s = MergeSearch(alpha=0.5, mode="min", seed=0)
    flat = lambda lam: 1.0  # a flat landscape makes the GP repeat itself: stock patience would stop
    seen = _run(s, flat, 12, concurrent=2)
    lams = [c["lam"] for c in seen]
    assert lams[:3] == [0.0, 0.5, 1.0]
    assert [c["acquisition"] for c in seen[:3]] == ["initial"] * 3
    assert len(lams) == 12
    assert min(abs(a - b) for i, a in enumerate(lams) for b in lams[i + 1:]) >= s.min_spacing
    assert all(0.5 <= x <= 1.0 for x in lams[1:])


def test_finds_interior_minimum():
    s = MergeSearch(alpha=0.5, mode="min", seed=0)
    seen = _run(s, lambda lam: (lam - 0.71) ** 2, 10)
    best = min(seen, key=lambda c: (c["lam"] - 0.71) ** 2)["lam"]
    assert abs(best - 0.71) < 0.03


def test_failed_initial_trial_does_not_stall():
    s = MergeSearch(alpha=0.5, mode="min", seed=0)
    s.suggest("a"), s.suggest("b"), s.suggest("c")
    s.on_trial_complete("a", {"score": 2.0})
    s.on_trial_complete("b", None, error=True)  # λ = 0.5 failed
    s.on_trial_complete("c", {"score": 1.0})
    nxt = s.suggest("d")
    assert nxt is not None, "the searcher must not wait for a result that will never come"
    assert abs(nxt["lam"] - 0.5) >= s.min_spacing  # never re-suggests the failed λ


def test_save_restore_keeps_pending_and_sequence(tmp_path):
    a = MergeSearch(alpha=0.5, mode="min", seed=3)
    f = lambda lam: (lam - 0.6) ** 2
    _run(a, f, 5)
    a.suggest("p1")  # pending at save time
    a.save(str(tmp_path / "s.pkl"))
    b = MergeSearch(alpha=0.5, mode="min", seed=3)
    b.restore(str(tmp_path / "s.pkl"))
    assert "p1" in b._live_trial_mapping
    a.on_trial_complete("p1", {"score": 0.5})
    b.on_trial_complete("p1", {"score": 0.5})
    assert a.suggest("n")["lam"] == pytest.approx(b.suggest("n")["lam"])
