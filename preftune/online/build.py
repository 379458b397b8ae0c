"""From judged samples to training input: pair rules (ONLINE.md §0.3), win rates (§0.1), DNO's
large-margin pairs (§4), INPO's tournament (§5) and Curry-DPO's stages (§9).

Pure functions over one prompt's K samples: scores ``s`` (higher is better), optionally a pairwise
matrix ``P`` (P[i][j] = P(y_i ≻ y_j), P + Pᵀ = 1, diagonal ½), the samples' lengths. They return
``Pair(w, l, margin)`` with sample indices. Ties are always dropped (RLHFlow keeps a pair only under
strict inequality).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Pair:
    w: int  # chosen sample index
    l: int  # rejected sample index
    margin: float  # s_w − s_l (or P_wl − ½ for pairwise judges)
    kind: str = ""  # DNO: "S>S", "T>S", "S>T" (teacher = index K)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def preference_matrix(scores: Sequence[float], temperature: float) -> list[list[float]]:
    """P_ij = σ((s_i − s_j)/T) (ONLINE.md §0.1); T = 0 gives hard preferences with ½ on ties."""
    k = len(scores)
    out = [[0.5] * k for _ in range(k)]
    for i in range(k):
        for j in range(k):
            if i == j:
                continue
            d = scores[i] - scores[j]
            out[i][j] = (1.0 if d > 0 else 0.0 if d < 0 else 0.5) if temperature == 0 else sigmoid(d / temperature)
    return out


def win_rates(P: Sequence[Sequence[float]], include_self: bool = True) -> list[float]:
    """P̂_i = (1/K)·Σ_j P_ij with the diagonal ½ (SPPO), or the mean over j ≠ i."""
    k = len(P)
    if include_self:
        return [sum(P[i]) / k for i in range(k)]
    return [(sum(P[i]) - P[i][i]) / (k - 1) for i in range(k)]


def _order(scores: Sequence[float], lengths: Sequence[int] | None = None,
           tiebreak: Sequence[float] | None = None) -> list[int]:
    """Best first. Equal scores keep the sample order (RLHFlow's argmax/argmin take the first index; samples
    are exchangeable, so this is unbiased, while a length tie-break would teach length), or, with
    ``tiebreak`` (higher first: the loop's ``tie_break=fluency`` passes each sample's mean token log-prob
    under π_0), the more fluent of two equal scores ranks higher: the chosen is the most natural of the
    best answers and the rejected the least natural of the worst."""
    if tiebreak is None:
        return sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(range(len(scores)), key=lambda i: (-scores[i], -tiebreak[i], i))


def sampled_tiebreak(scores: Sequence[float], fluency: Sequence[float], temperature: float,
                     rng: random.Random) -> list[float]:
    """``tie_break=fluency_sampled``: the best-scored samples' fluency plus τ·Gumbel noise, the others' as it
    is. Sorted by it (``_order``), the first of the best is then a draw with P(i) ∝ exp(fluency_i / τ)
    (Gumbel-max), and the last of the worst stays the least fluent. With fluency the mean token log-prob
    under π_0, τ = 1 draws each answer in proportion to its per-token geometric-mean probability: the chosen
    leans to natural answers without always being the single most typical one (``fluency``, τ → 0, which
    narrowed the answers' variety on word_limit; docs/online.md)."""
    top = max(scores)
    return [f + temperature * -math.log(-math.log(rng.random() or 1e-300)) if sc == top else f
            for sc, f in zip(scores, fluency, strict=True)]


def _pair(scores, w: int, l: int) -> list[Pair]:
    return [Pair(w, l, scores[w] - scores[l])] if scores[w] > scores[l] else []


def max_min(scores, lengths=None, rng=None, tiebreak=None, **_) -> list[Pair]:
    o = _order(scores, lengths, tiebreak)
    return _pair(scores, o[0], o[-1])


def max_random(scores, lengths=None, rng: random.Random | None = None, tiebreak=None, **_) -> list[Pair]:
    o = _order(scores, lengths, tiebreak)
    rest = [i for i in o[1:] if scores[i] < scores[o[0]]]
    if not rest:
        return []
    return _pair(scores, o[0], (rng or random.Random(0)).choice(sorted(rest)))


def max_max(scores, lengths=None, tiebreak=None, **_) -> list[Pair]:
    o = _order(scores, lengths, tiebreak)
    return _pair(scores, o[0], o[1]) if len(o) > 1 else []


def random_pair(scores, **_) -> list[Pair]:
    if len(scores) < 2 or scores[0] == scores[1]:
        return []
    return _pair(scores, 0, 1) if scores[0] > scores[1] else _pair(scores, 1, 0)


def max_min_p(scores, lengths=None, texts: Sequence[str] | None = None, length_penalty: float = 0.0,
              tiebreak=None, **_):
    """max_min on s_k − λ·len(y_k), len in characters (RLHFlow ``len_penalty``)."""
    if texts is None:
        raise ValueError("max_min_p needs the response texts")
    pen = [s - length_penalty * len(t) for s, t in zip(scores, texts, strict=True)]
    o = _order(pen, lengths, tiebreak)
    return [Pair(o[0], o[-1], pen[o[0]] - pen[o[-1]])] if pen[o[0]] > pen[o[-1]] else []


def all_pairs(scores, min_margin: float = 0.0, **_) -> list[Pair]:
    """Every i, j with s_i − s_j > δ (a preftune extension)."""
    k = len(scores)
    return [Pair(i, j, scores[i] - scores[j]) for i in range(k) for j in range(k) if scores[i] - scores[j] > min_margin]


def tournament(P: Sequence[Sequence[float]], **_) -> list[Pair]:
    """INPO's knockout (ONLINE.md §5): first-round matches, winners play winners and losers play losers
    until one overall winner and one overall loser remain (a tie counts for the first listed); the pair
    is kept only if the final check says the winner beats the loser. K = 4: 5 comparisons."""
    k = len(P)
    if k < 2:
        return []

    def play(a: int, b: int) -> tuple[int, int]:
        return (a, b) if P[a][b] >= 0.5 else (b, a)

    first = [play(2 * i, 2 * i + 1) for i in range(k // 2)]
    winners = [w for w, _ in first] + ([k - 1] if k % 2 else [])
    losers = [lo for _, lo in first] + ([k - 1] if k % 2 else [])
    while len(winners) > 1:
        nxt = [play(winners[i], winners[i + 1])[0] for i in range(0, len(winners) - 1, 2)]
        winners = nxt + ([winners[-1]] if len(winners) % 2 else [])
    while len(losers) > 1:
        nxt = [play(losers[i], losers[i + 1])[1] for i in range(0, len(losers) - 1, 2)]
        losers = nxt + ([losers[-1]] if len(losers) % 2 else [])
    w, lo = winners[0], losers[0]
    if w == lo or P[w][lo] <= 0.5:
        return []
    return [Pair(w, lo, P[w][lo] - 0.5)]


def dno_points(score: float) -> int:
    """A judge score in [0, 1] on DNO's 6-point scale: 1 + round(5·s) (ONLINE.md §4(d)), halves rounded up
    (Python's round() would send 0.5 to 0)."""
    return 1 + math.floor(5 * min(1.0, max(0.0, score)) + 0.5)


def large_margin(
    scores, teacher: int | None = None, pos_min: int = 5, margin: int = 2, student_pos_margin: int = 1, **_
) -> list[Pair]:
    """DNO-Prct pairs (ONLINE.md §4): on the 6-point scale, the positive scores ≥ ``pos_min``; every
    (positive, negative) with a gap ≥ ``margin``, or ≥ ``student_pos_margin`` when the positive is a
    student sample and a teacher response is among the candidates (index ``teacher``)."""
    pts = [dno_points(s) for s in scores]
    out = []
    for i, pi in enumerate(pts):
        if pi < pos_min:
            continue
        need = student_pos_margin if (teacher is not None and i != teacher) else margin
        for j, pj in enumerate(pts):
            if j != i and pi - pj >= need:
                kind = "T>S" if i == teacher else "S>T" if j == teacher else "S>S"
                out.append(Pair(i, j, float(pi - pj), kind))
    return out


def curriculum_stages(scores, lengths=None, stages: int | None = None, tiebreak=None) -> list[list[Pair]]:
    """Curry-DPO (ONLINE.md §9): stage s (1-based) pairs the best with rank K − s + 1: S1 = best vs worst,
    S2 = best vs second worst, … (K − 1 stages). Zero-gap pairs are dropped."""
    o = _order(scores, lengths, tiebreak)
    k = len(o)
    n = k - 1 if stages is None else min(stages, k - 1)
    return [_pair(scores, o[0], o[k - s]) for s in range(1, n + 1)]


RULE_FUNCTIONS: dict[str, Callable[..., list[Pair]]] = {
    "max_min": max_min,
    "max_random": max_random,
    "max_max": max_max,
    "random": random_pair,
    "max_min_p": max_min_p,
    "all": all_pairs,
    "tournament": tournament,
    "large_margin": large_margin,
}


def build_pairs(rule: str, scores, *, P=None, lengths=None, texts=None, rng=None, **options) -> list[Pair]:
    """One prompt's pairs under ``rule`` (ONLINE.md §0.3)."""
    if rule not in RULE_FUNCTIONS:
        raise ValueError(f"unknown pair rule {rule!r}; choose one of {', '.join(RULE_FUNCTIONS)}")
    if rule == "tournament":
        if P is None:
            raise ValueError("rule=tournament needs a pairwise preference matrix")
        return tournament(P)
    return RULE_FUNCTIONS[rule](scores, lengths=lengths, texts=texts, rng=rng, **options)
