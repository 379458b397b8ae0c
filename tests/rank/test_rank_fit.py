"""Fitting: recovery of known strengths, agreement with choix, invariances, ties, Elo, PL, bootstrap."""

from __future__ import annotations

import math

import choix
import numpy as np
import pytest

from preftune.rank import RankConfig, comparisons_from_arrays, rank
from preftune.rank.api import to_ratings
from preftune.rank.bt import bt_win_prob, fit_bt, fit_davidson
from preftune.rank.config import ELO_SCALE
from preftune.rank.counts import count_matrices, pair_cells
from preftune.rank.elo import elo_ratings, elo_update
from preftune.rank.io import parse_records, rankings_from_lists
from preftune.rank.pl import fit_pl

from ._sim import bt_battles, davidson_battles, pl_rankings, spearman


def _data(a, b, winner, names=None, weights=None):
    names = names or [f"s{i}" for i in range(max(max(a), max(b)) + 1)]
    return comparisons_from_arrays([names[i] for i in a], [names[i] for i in b], list(winner), weights)


def _cfg(**kw):
    kw.setdefault("bootstrap", 0)
    return RankConfig(file="<memory>", **kw)


def _true_ratings(theta, names_in_order, board):
    """Truth on the board's system order, centred like the board (mean = base)."""
    t = np.array([theta[int(n[1:])] for n in board.names])
    return 1000 + ELO_SCALE * (t - t.mean())


# ---------------------------------------------------------------- Bradley–Terry


def test_bt_recovers_known_strengths():
    # 12 systems, θ ~ N(0, 1), 30,000 comparisons (≈5,000 per system): the MLE's standard error is
    # ≈ 1/sqrt(5000·0.2) ≈ 0.03 nats ≈ 5.5 rating points; we require RMSE ≤ 20 points.
    rng = np.random.default_rng(1)
    theta = rng.normal(0, 1, 12)
    a, b, w = bt_battles(theta, 30_000, rng)
    board = rank(_data(a, b, w), _cfg())
    truth = _true_ratings(theta, None, board)
    assert spearman(board.rating, truth) >= 0.95
    assert math.sqrt(np.mean((board.rating - truth) ** 2)) <= 20.0


@pytest.mark.parametrize("l2", [0.0, 0.2])
def test_bt_agrees_with_choix(l2):
    rng = np.random.default_rng(2)
    theta = rng.normal(0, 1, 8)
    a, b, w = bt_battles(theta, 3000, rng)
    pairs = [(int(x), int(y)) if o == "a" else (int(y), int(x)) for x, y, o in zip(a, b, w, strict=True)]
    wins = np.zeros((8, 8))
    for i, j in pairs:
        wins[i, j] += 1
    ours = fit_bt(wins, l2=l2).theta
    # choix penalises alpha·Σθ²; our prior is (l2/2)·Σθ², hence alpha = l2/2.
    ref = (
        choix.opt_pairwise(8, pairs, alpha=l2 / 2, tol=1e-10)
        if l2
        else choix.ilsr_pairwise(8, pairs, tol=1e-12)
    )
    ref = ref - ref.mean()
    assert np.abs(ours - ref).max() < 1e-4


def test_relabelling_permutes_ratings():
    rng = np.random.default_rng(3)
    theta = rng.normal(0, 1, 6)
    a, b, w = bt_battles(theta, 2000, rng, tie_rate=0.1)
    names = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"]
    perm = ["zulu", "yankee", "x-ray", "whiskey", "victor", "uniform"]  # different sort order
    b1 = rank(_data(a, b, w, names), _cfg(method="bt"))
    b2 = rank(_data(a, b, w, perm), _cfg(method="bt"))
    for n, p in zip(names, perm, strict=True):
        assert b1.rating_of(n) == pytest.approx(b2.rating_of(p), abs=1e-8)


def test_ratings_invariant_to_adding_a_constant():
    # LOSSES.md Appendix A: "fitted ratings are invariant to adding a constant (anchor before comparing)".
    theta = np.array([0.3, -1.2, 0.9, 0.0])
    cfg = _cfg()
    for anchor in (None, 2):
        np.testing.assert_allclose(
            to_ratings(theta + 7.5, cfg, anchor), to_ratings(theta, cfg, anchor), atol=1e-9
        )
    rng = np.random.default_rng(4)
    a, b, w = bt_battles(theta, 1000, rng)
    wins, ties = count_matrices(pair_cells(_data(a, b, w).comparisons, 4))
    np.testing.assert_allclose(fit_bt(wins, theta0=np.full(4, 3.0)).theta, fit_bt(wins).theta, atol=1e-8)


def test_anchor_fixes_rating_and_keeps_gaps():
    rng = np.random.default_rng(5)
    a, b, w = bt_battles(np.array([0.0, 0.5, 1.0]), 3000, rng)
    free = rank(_data(a, b, w), _cfg())
    anch = rank(_data(a, b, w), _cfg(anchor="s1", anchor_rating=1114))
    assert anch.rating_of("s1") == pytest.approx(1114)
    np.testing.assert_allclose(np.diff(anch.rating), np.diff(free.rating), atol=1e-9)


def test_half_win_ties_equal_half_weighted_wins():
    # Documented convention: a tie counts as half a win each way.
    rng = np.random.default_rng(6)
    a, b, w = bt_battles(np.array([0.0, 0.4, -0.3, 1.0]), 800, rng, tie_rate=0.3)
    tied = rank(_data(a, b, w), _cfg())
    aa, bb, ww, wt = [], [], [], []
    for x, y, o in zip(a, b, w, strict=True):
        outs = [("a", 0.5), ("b", 0.5)] if o == "tie" else [(o, 1.0)]
        for oo, weight in outs:
            aa.append(x), bb.append(y), ww.append(oo), wt.append(weight)
    split = rank(_data(aa, bb, ww, weights=wt), _cfg())
    np.testing.assert_allclose(tied.rating, split.rating, atol=1e-8)
    # ...and ties pull the ratings together compared with dropping them.
    keep = w != "tie"
    dropped = rank(_data(a[keep], b[keep], w[keep]), _cfg())
    assert np.ptp(tied.rating) < np.ptp(dropped.rating)


def test_davidson_estimates_tie_parameter():
    rng = np.random.default_rng(7)
    theta = rng.normal(0, 0.8, 6)
    a, b, w = davidson_battles(theta, 0.6, 40_000, rng)
    board = rank(_data(a, b, w), _cfg(method="davidson"))
    assert board.info["tie_nu"] == pytest.approx(0.6, abs=0.04)
    truth = _true_ratings(theta, None, board)
    assert math.sqrt(np.mean((board.rating - truth) ** 2)) <= 15.0
    assert board.tie_prob is not None and np.allclose(board.win_prob + board.win_prob.T + board.tie_prob, 1)
    # --ties davidson on method bt is the same model
    assert rank(_data(a, b, w), _cfg(method="bt", ties="davidson")).method == "davidson"


def test_davidson_gradient_is_zero_at_fit():
    from preftune.rank.bt import davidson_nll_grad

    rng = np.random.default_rng(8)
    wins = rng.integers(1, 30, (5, 5)).astype(float)
    np.fill_diagonal(wins, 0)
    t = rng.integers(1, 6, (5, 5)).astype(float)
    ties = t + t.T
    np.fill_diagonal(ties, 0)
    f = fit_davidson(wins, ties, l2=0.1)
    assert f.converged
    assert np.abs(davidson_nll_grad(np.r_[f.theta, f.tie_log_nu], wins, ties, 0.1)[1]).max() < 1e-6


def test_win_prob_matrix():
    theta = np.array([0.0, 1.0, -0.5])
    p = bt_win_prob(theta)
    np.testing.assert_allclose(p + p.T, 1.0)
    assert p[1, 0] == pytest.approx(1 / (1 + math.exp(-1.0)))


# ---------------------------------------------------------------- Elo


def test_elo_golden_value():
    # LOSSES.md Appendix A: "Elo update (A wins, K=4)" = 2.000000 from equal ratings.
    ra, rb = elo_update(1000.0, 1000.0, 1.0, k_factor=4.0)
    assert ra - 1000.0 == pytest.approx(2.0, abs=1e-5)
    assert rb - 1000.0 == pytest.approx(-2.0, abs=1e-5)
    r = elo_ratings(np.array([0]), np.array([1]), np.array([1.0]), 2, k_factor=4.0)
    np.testing.assert_allclose(r, [1002.0, 998.0])


def test_elo_is_order_dependent_and_labelled_so():
    a, b, o = np.array([0, 0, 1, 1]), np.array([1, 1, 0, 0]), np.array([1.0, 1.0, 1.0, 1.0])
    fwd = elo_ratings(a, b, o, 2, 32.0)
    rev = elo_ratings(a[::-1], b[::-1], o[::-1], 2, 32.0)
    assert not np.allclose(fwd, rev)
    board = rank(_data([0, 1], [1, 0], ["a", "a"]), _cfg(method="elo"))
    assert board.info["order_dependent"]
    from preftune.rank.report import title

    assert "order" in title(board)


# ---------------------------------------------------------------- Plackett–Luce


def test_pl_recovers_known_strengths_and_matches_choix():
    rng = np.random.default_rng(9)
    theta = rng.normal(0, 1, 7)
    lists = pl_rankings(theta, 2000, rng, size=4)
    r = rankings_from_lists(lists)
    f = fit_pl(r.items, r.length, r.weight, 7)
    assert f.converged
    assert spearman(f.theta, theta) >= 0.95
    assert math.sqrt(np.mean((f.theta - (theta - theta.mean())) ** 2)) < 0.1  # ≈ 17 rating points
    ref = choix.ilsr_rankings(7, lists, tol=1e-12)
    assert np.abs(f.theta - (ref - ref.mean())).max() < 1e-5
    mm = fit_pl(r.items, r.length, r.weight, 7, algorithm="mm", max_iter=5000, tol=1e-12)
    assert np.abs(mm.theta - f.theta).max() < 1e-6


def test_pl_with_two_item_rankings_equals_bt():
    rng = np.random.default_rng(10)
    a, b, w = bt_battles(np.array([0.2, -0.4, 0.9, 0.0, 0.5]), 1500, rng)
    lists = [[int(x), int(y)] if o == "a" else [int(y), int(x)] for x, y, o in zip(a, b, w, strict=True)]
    recs = [{"ranking": [f"s{i}" for i in r]} for r in lists]
    pl = rank(parse_records(recs), _cfg(method="pl"))
    bt = rank(_data(a, b, w), _cfg(method="bt"))
    for n in bt.names:
        assert pl.rating_of(n) == pytest.approx(bt.rating_of(n), abs=1e-6)
    # The general PL terms (not the K×K shortcut fit_pl takes for 2-item rows) give BT's likelihood.
    from preftune.rank.bt import bt_nll
    from preftune.rank.pl import pl_terms

    r = rankings_from_lists(lists)
    wins = np.zeros((5, 5))
    np.add.at(wins, (r.items[:, 0], r.items[:, 1]), 1.0)
    x = rng.normal(size=5)
    assert pl_terms(x, r.items, r.length, r.weight)[0] == pytest.approx(bt_nll(x, wins), rel=1e-12)


def test_pl_hessian_matches_finite_differences():
    from scipy.optimize import approx_fprime

    from preftune.rank.pl import pl_hessian, pl_terms

    rng = np.random.default_rng(11)
    r = rankings_from_lists(pl_rankings(rng.normal(size=5), 30, rng, size=4) + [[0, 1, 2], [3, 4]])
    x = rng.normal(size=5)
    g = lambda z: (lambda t: t[2] - t[1])(pl_terms(z, r.items, r.length, r.weight))  # noqa: E731
    num = np.array([approx_fprime(x, lambda z, i=i: g(z)[i], 1e-6) for i in range(5)])
    np.testing.assert_allclose(pl_hessian(x, r.items, r.length, r.weight), num, atol=1e-4)


# ---------------------------------------------------------------- bootstrap


def test_bootstrap_contains_estimate_shrinks_and_is_seeded():
    rng = np.random.default_rng(12)
    theta = np.array([0.0, 0.3, 0.6, -0.4])
    small = _data(*bt_battles(theta, 1000, rng))
    big = _data(*bt_battles(theta, 16000, rng))
    bs = rank(small, _cfg(bootstrap=200, seed=3))
    bb = rank(big, _cfg(bootstrap=200, seed=3))
    assert np.all(bs.ci_low <= bs.rating) and np.all(bs.rating <= bs.ci_high)
    ratio = np.median((bb.ci_high - bb.ci_low) / (bs.ci_high - bs.ci_low))
    assert 0.15 < ratio < 0.4  # 16x data → about 1/4 the width
    again = rank(small, _cfg(bootstrap=200, seed=3))
    np.testing.assert_array_equal(again.ci_low, bs.ci_low)
    assert not np.array_equal(rank(small, _cfg(bootstrap=200, seed=4)).ci_low, bs.ci_low)


def test_bootstrap_coverage_near_nominal():
    # 40 simulated leaderboards × 5 systems; 90% intervals should cover the (mean-centred) truth
    # about 90% of the time. Percentile intervals run a little narrow at n = 600; accept ≥ 80%.
    rng = np.random.default_rng(13)
    theta = np.array([-0.6, -0.2, 0.0, 0.3, 0.7])
    hits = total = 0
    for _ in range(40):
        board = rank(
            _data(*bt_battles(theta, 600, rng)), _cfg(bootstrap=100, ci=0.9, seed=int(rng.integers(1 << 30)))
        )
        truth = _true_ratings(theta, None, board)
        hits += int(np.sum((board.ci_low <= truth) & (truth <= board.ci_high)))
        total += len(truth)
    assert 0.8 <= hits / total <= 0.99


def test_elo_bootstrap_runs():
    rng = np.random.default_rng(14)
    board = rank(_data(*bt_battles(np.array([0.0, 1.0, -1.0]), 500, rng)), _cfg(method="elo", bootstrap=30))
    assert board.ci_low.shape == (3,) and np.all(board.ci_low < board.ci_high)
