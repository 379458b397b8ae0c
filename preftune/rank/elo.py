"""Online Elo (LOSSES.md I1): sequential updates in record order — order-dependent by design.

Shown for familiarity; Bradley–Terry (``bt.py``) is the consistent estimator for leaderboards.
"""

from __future__ import annotations

import numpy as np


def elo_expected(r_a: float, r_b: float, scale: float = 400.0, base: float = 10.0) -> float:
    """E_a = 1 / (1 + base^((R_b − R_a)/scale)): a's expected score against b."""
    return 1.0 / (1.0 + base ** ((r_b - r_a) / scale))


def elo_update(r_a: float, r_b: float, outcome: float, k_factor: float = 4.0) -> tuple[float, float]:
    """One battle: R_a ← R_a + K·(o − E_a); R_b ← R_b − K·(o − E_a). o = 1 / 0 / ½ from a's side."""
    delta = k_factor * (outcome - elo_expected(r_a, r_b))
    return r_a + delta, r_b - delta


def elo_ratings(
    a: np.ndarray,
    b: np.ndarray,
    outcome: np.ndarray,
    k: int,
    k_factor: float = 4.0,
    init: float = 1000.0,
    weight: np.ndarray | None = None,
) -> np.ndarray:
    """Ratings (k,) after one pass over the records (N,) in the given order, starting at ``init``.

    A weighted record moves ratings by K·w·(o − E_a) (w = 1 is FastChat's update).
    Plain-Python loop: the update is inherently sequential, and lists of floats are ~10x faster than
    numpy scalar indexing (about 1 s per million records).
    """
    r = [float(init)] * k
    w = [1.0] * len(a) if weight is None else weight.tolist()
    for i, j, o, wt in zip(a.tolist(), b.tolist(), outcome.tolist(), w, strict=True):
        delta = k_factor * wt * (o - 1.0 / (1.0 + 10.0 ** ((r[j] - r[i]) / 400.0)))
        r[i] += delta
        r[j] -= delta
    return np.asarray(r)


def elo_bootstrap(
    a: np.ndarray,
    b: np.ndarray,
    outcome: np.ndarray,
    weight: np.ndarray,
    k: int,
    rounds: int,
    rng: np.random.Generator,
    k_factor: float = 4.0,
    init: float = 1000.0,
    chunk: int = 8192,
) -> np.ndarray:
    """FastChat's ``compute_bootstrap_elo``: each round replays N records drawn with replacement
    (so in a random order). Vectorised over rounds: one numpy step per time step updates all rounds,
    (rounds, k) ratings. Index draws are made per chunk of time steps to bound memory. With ≤ 32
    rounds a plain-Python replay per round is faster and is used instead.

    Returns (rounds, k) ratings.
    """
    n = len(a)
    if rounds <= 32:  # few rounds: the plain-Python replay per round beats tiny numpy vectors
        idx = [rng.integers(0, n, size=n) for _ in range(rounds)]
        return np.stack([elo_ratings(a[i], b[i], outcome[i], k, k_factor, init, weight[i]) for i in idx])
    r = np.full((rounds, k), float(init))
    rows = np.arange(rounds)
    for start in range(0, n, chunk):
        idx = rng.integers(0, n, size=(rounds, min(chunk, n - start)))  # (rounds, T)
        ai, bi, oi, wi = a[idx], b[idx], outcome[idx], weight[idx]
        for t in range(idx.shape[1]):
            i, j = ai[:, t], bi[:, t]
            delta = (
                k_factor * wi[:, t] * (oi[:, t] - 1.0 / (1.0 + 10.0 ** ((r[rows, j] - r[rows, i]) / 400.0)))
            )
            r[rows, i] += delta
            r[rows, j] -= delta
    return r
