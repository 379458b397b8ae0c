"""Pair rules (ONLINE.md §0.3), win rates, DNO's large margins, INPO's tournament, Curry-DPO stages."""

import random

import pytest

from preftune.online.build import (
    Pair,
    build_pairs,
    curriculum_stages,
    dno_points,
    large_margin,
    preference_matrix,
    sampled_tiebreak,
    tournament,
    win_rates,
)


def test_max_min_best_vs_worst_and_ties_dropped():
    assert build_pairs("max_min", [0.2, 0.9, 0.1, 0.5]) == [Pair(1, 2, pytest.approx(0.8))]
    assert build_pairs("max_min", [0.4, 0.4, 0.4]) == []  # all tied: no pair
    # equal best scores: the first sample (RLHFlow's argmax), whatever the lengths; the last equal worst
    assert build_pairs("max_min", [1.0, 1.0, 0.0], lengths=[9, 3, 5])[0].w == 0
    assert build_pairs("max_min", [1.0, 0.0, 0.0])[0].l == 2


def test_fluency_tie_break_orders_equal_scores_only():
    s, flu = [1.0, 1.0, 0.0, 0.0, 0.5], [-3.0, -1.0, -0.5, -2.0, -9.0]
    # best: sample 1 (the more fluent of the two 1.0s); worst: sample 3 (the less fluent of the two 0.0s);
    # sample 4's fluency does not lift it over anything (scores decide first)
    assert build_pairs("max_min", s, tiebreak=flu) == [Pair(1, 3, 1.0)]
    assert build_pairs("max_min", s) == [Pair(0, 3, 1.0)]  # without it: first best, last worst
    assert build_pairs("max_max", s, tiebreak=flu) == []  # best vs second best: tied, so no pair
    assert build_pairs("max_random", s, tiebreak=flu, rng=random.Random(0))[0].w == 1
    assert [p for st in curriculum_stages(s, tiebreak=flu) for p in st][0] == Pair(1, 3, 1.0)


def test_sampled_fluency_tie_break_draws_the_chosen_by_softmax():
    """fluency_sampled: among the best-scored samples the chosen is drawn with P ∝ exp(fluency/τ) (Gumbel-max);
    the rejected is still the least fluent of the worst, and lower scores are never lifted."""
    import math

    s, flu = [1.0, 1.0, 1.0, 0.0, 0.0, 0.5], [-1.0, -2.0, -1.5, -0.5, -3.0, 5.0]
    rng, n = random.Random(0), 20000
    for tau in (1.0, 0.5):
        counts = [0] * len(s)
        for _ in range(n):
            (pair,) = build_pairs("max_min", s, tiebreak=sampled_tiebreak(s, flu, tau, rng))
            counts[pair.w] += 1
            assert pair.l == 4  # the least fluent 0.0
        z = sum(math.exp(f / tau) for f in flu[:3])
        want = [math.exp(f / tau) / z for f in flu[:3]]
        for c, p in zip(counts[:3], want, strict=True):  # 4.5 binomial standard errors
            assert abs(c / n - p) < 4.5 * math.sqrt(p * (1 - p) / n)
        assert counts[3:] == [0, 0, 0]


def test_other_rules():
    s = [0.3, 0.9, 0.1, 0.6]
    assert build_pairs("max_max", s) == [Pair(1, 3, pytest.approx(0.3))]
    assert build_pairs("random", s)[0] == Pair(1, 0, pytest.approx(0.6))  # samples 0 and 1, oriented by s
    p = build_pairs("max_random", s, rng=random.Random(0))[0]
    assert p.w == 1 and p.l in (0, 2, 3)
    assert {(p.w, p.l) for p in build_pairs("all", s, min_margin=0.25)} == {(1, 0), (1, 2), (1, 3), (3, 0), (3, 2)}
    # max_min_p: s − λ·chars; the long best answer loses its lead
    texts = ["a" * 10, "b" * 100, "c", "d" * 20]
    got = build_pairs("max_min_p", s, texts=texts, length_penalty=0.01)[0]
    assert (got.w, got.l) == (3, 1) and got.margin == pytest.approx((0.6 - 0.2) - (0.9 - 1.0))
    with pytest.raises(ValueError, match="unknown pair rule"):
        build_pairs("best", s)


def test_preference_matrix_and_win_rates():
    P = preference_matrix([1.0, 0.0], temperature=0.5)
    assert P[0][1] == pytest.approx(1 / (1 + 2.718281828459045**-2)) and P[0][1] + P[1][0] == pytest.approx(1)
    assert P[0][0] == 0.5
    hard = preference_matrix([1.0, 0.0, 1.0], temperature=0)
    assert hard[0][1] == 1.0 and hard[0][2] == 0.5
    assert win_rates(hard) == [pytest.approx((0.5 + 1 + 0.5) / 3), pytest.approx(0.5 / 3), pytest.approx(2 / 3)]
    assert win_rates(hard, include_self=False)[1] == 0.0


def test_tournament_k4_knockout_and_final_check():
    # y2 beats everyone, y1 loses to everyone: winner 2, loser 1
    s = [0.5, 0.0, 1.0, 0.7]
    P = preference_matrix(s, temperature=0)
    assert tournament(P) == [Pair(2, 1, 0.5)]
    # all tied: the knockout winner and loser tie in the final check, so no pair
    assert tournament(preference_matrix([0.3] * 4, 0)) == []


def test_dno_large_margin_pairs():
    assert [dno_points(x) for x in (0.0, 0.1, 0.5, 0.79, 0.8, 1.0)] == [1, 2, 4, 5, 5, 6]
    # student samples only: positives ≥ 5 points, gap ≥ 2
    got = large_margin([1.0, 0.8, 0.5, 0.0])  # points 6, 5, 4, 1
    assert {(p.w, p.l) for p in got} == {(0, 2), (0, 3), (1, 3)}
    # with a teacher (index 4, 6 points): a student positive needs a gap ≥ 1; kinds recorded
    got = large_margin([0.8, 0.6, 0.2, 0.0, 1.0], teacher=4)  # points 5, 4, 2, 1, 6
    pairs = {(p.w, p.l): p.kind for p in got}
    assert pairs[(0, 1)] == "S>S" and pairs[(4, 2)] == "T>S" and (4, 0) not in pairs  # 6 − 5 < 2
    assert all(p.l != 4 for p in got)  # nobody beats the teacher here


def test_curriculum_stages_best_against_each_rank():
    stages = curriculum_stages([0.2, 0.9, 0.5, 0.1])  # ranks: 1, 2, 0, 3
    assert [[(p.w, p.l) for p in s] for s in stages] == [[(1, 3)], [(1, 0)], [(1, 2)]]
    assert curriculum_stages([0.5, 0.5, 0.1]) == [[Pair(0, 2, pytest.approx(0.4))], []]  # zero gap dropped
