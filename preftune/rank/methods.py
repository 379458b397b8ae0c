"""One table of rank-aggregation methods. Each entry turns ``PreferenceData`` into sufficient
statistics once (``prepare``), fits natural log-strengths θ from them (``fit``, optionally on
resampled record counts), and predicts pairwise probabilities (``probs``).

The bootstrap is generic for the count-based methods: draw record counts per cell from a multinomial
(the same as resampling records with replacement), refit on the K×K statistics. Elo replays records
in order, so it resamples records instead (``bootstrap`` hook).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from preftune.rank.bt import Fit, bt_win_prob, davidson_probs, fit_bt, fit_davidson
from preftune.rank.config import RankConfig
from preftune.rank.counts import (
    TIE,
    PairCells,
    count_matrices,
    pair_cells,
    ranking_cells,
    ranking_pair_counts,
)
from preftune.rank.elo import elo_bootstrap, elo_ratings
from preftune.rank.io import PreferenceData, RankError
from preftune.rank.pl import fit_pl

LN10_OVER_400 = math.log(10.0) / 400.0  # Elo points → natural log-strength


@dataclass
class Stats:
    """Prepared statistics. ``cell_n`` (C,) is what the bootstrap resamples; ``wins``/``ties`` (K, K)
    are the observed pairwise counts for the table and the graph checks."""

    k: int
    cell_n: np.ndarray
    wins: np.ndarray
    ties: np.ndarray
    payload: object


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    order_dependent: bool
    prepare: Callable[[PreferenceData, RankConfig], Stats]
    fit: Callable[[Stats, np.ndarray | None, RankConfig, Fit | None], Fit]  # (stats, counts, cfg, warm)
    probs: Callable[[Fit], tuple[np.ndarray, np.ndarray | None]]
    bootstrap: Callable[[Stats, RankConfig, np.random.Generator, Fit], np.ndarray] | None = None
    needs_mle_check: bool = True  # MLE exists only if the win graph is strongly connected


# ---------------------------------------------------------------- pairwise (BT, Davidson)


def _prepare_pairs(data: PreferenceData, cfg: RankConfig) -> Stats:
    if len(data.rankings):
        raise RankError(
            f"{data.source}: contains {len(data.rankings)} ranking record(s); rank them with --method pl"
        )
    cells = pair_cells(data.comparisons, data.n_systems)
    wins, ties = count_matrices(cells)
    return Stats(data.n_systems, cells.n, wins, ties, cells)


def _present(wins: np.ndarray, ties: np.ndarray) -> np.ndarray:
    """Systems with at least one comparison in (resampled) counts: a bootstrap round can miss one."""
    return np.flatnonzero((wins + wins.T + ties).sum(1) > 0)


def _fit_on_present(k: int, wins, ties, fit_sub: Callable, warm: Fit | None) -> Fit:
    """Fit on the systems present; absent ones get NaN (ignored by the percentile intervals)."""
    keep = _present(wins, ties)
    sub = np.ix_(keep, keep)
    f = fit_sub(wins[sub], ties[sub], None if warm is None else warm.theta[keep])
    theta = np.full(k, np.nan)
    theta[keep] = f.theta
    return Fit(theta, f.iterations, f.converged, f.tie_log_nu)


def _fit_bt(stats: Stats, n, cfg: RankConfig, warm: Fit | None) -> Fit:
    cells: PairCells = stats.payload
    wins, ties = (stats.wins, stats.ties) if n is None else count_matrices(cells, n)
    # Half-win ties: a tie adds ½ to W_ab and ½ to W_ba (ties is symmetric, so + ties/2 does both).
    return _fit_on_present(
        stats.k, wins, ties, lambda w, t, x0: fit_bt(w + 0.5 * t, cfg.l2, x0, cfg.max_iter), warm
    )


def _fit_davidson(stats: Stats, n, cfg: RankConfig, warm: Fit | None) -> Fit:
    cells: PairCells = stats.payload
    wins, ties = (stats.wins, stats.ties) if n is None else count_matrices(cells, n)
    if n is None and ties.sum() == 0:
        raise RankError(
            "--ties davidson needs at least one tie in the data (the tie parameter is unidentified)"
        )
    log_nu = None if warm is None else warm.tie_log_nu

    def fit_sub(w, t, x0):
        return fit_davidson(w, t, cfg.l2, None if x0 is None else np.r_[x0, log_nu], cfg.max_iter)

    return _fit_on_present(stats.k, wins, ties, fit_sub, warm)


def _bt_probs(f: Fit):
    return bt_win_prob(f.theta), None


def _davidson_probs(f: Fit):
    return davidson_probs(f.theta, f.tie_log_nu)


# ---------------------------------------------------------------- Plackett–Luce


@dataclass
class _PLRows:
    """Rows of 2..L-item rankings; row r takes ``cell_n[cell[r]] · per_record[r]`` mass."""

    items: np.ndarray  # (R, L)
    length: np.ndarray  # (R,)
    cell: np.ndarray  # (R,)
    per_record: np.ndarray  # (R,) weight × share (½ for each direction of a tie)


def _prepare_pl(data: PreferenceData, cfg: RankConfig) -> Stats:
    k = data.n_systems
    rc = ranking_cells(data.rankings, k)
    pc = pair_cells(data.comparisons, k)
    width = max(rc.items.shape[1] if len(rc.n) else 0, 2)
    # A comparison is a 2-item ranking; a tie is half a ranking each way (the half-win convention).
    winner = np.where(pc.code == 1, pc.b, pc.a)
    loser = np.where(pc.code == 1, pc.a, pc.b)
    tie = pc.code == TIE
    c_items = np.concatenate([np.column_stack([winner, loser]), np.column_stack([pc.b, pc.a])[tie]])
    c_cell = np.concatenate([np.arange(len(pc.n)), np.flatnonzero(tie)]) + len(rc.n)
    c_share = np.concatenate([np.where(tie, 0.5, 1.0), np.full(tie.sum(), 0.5)])
    c_pad = np.full((len(c_items), width), -1, dtype=np.int64)
    c_pad[:, :2] = c_items
    r_pad = np.full((len(rc.n), width), -1, dtype=np.int64)
    r_pad[:, : rc.items.shape[1]] = rc.items
    rows = _PLRows(
        items=np.concatenate([r_pad, c_pad]),
        length=np.concatenate([rc.length, np.full(len(c_items), 2)]),
        cell=np.concatenate([np.arange(len(rc.n)), c_cell]),
        per_record=np.concatenate([rc.weight, pc.weight[c_cell - len(rc.n)] * c_share]),
    )
    wins_c, ties_c = count_matrices(pc)
    return Stats(k, np.concatenate([rc.n, pc.n]), ranking_pair_counts(rc) + wins_c, ties_c, rows)


def _fit_pl(stats: Stats, n, cfg: RankConfig, warm: Fit | None) -> Fit:
    rows: _PLRows = stats.payload
    mass = (stats.cell_n if n is None else n)[rows.cell] * rows.per_record  # (R,)
    live = mass > 0
    items, length, mass = rows.items[live], rows.length[live], mass[live]
    present = np.unique(items[items >= 0])
    remap = np.full(stats.k, -1, dtype=np.int64)
    remap[present] = np.arange(len(present))
    sub_items = np.where(items >= 0, remap[np.maximum(items, 0)], -1)
    x0 = None if warm is None else warm.theta[present]
    f = fit_pl(sub_items, length, mass, len(present), cfg.l2, x0, max_iter=cfg.max_iter)
    theta = np.full(stats.k, np.nan)
    theta[present] = f.theta
    return Fit(theta, f.iterations, f.converged)


# ---------------------------------------------------------------- online Elo


def _prepare_elo(data: PreferenceData, cfg: RankConfig) -> Stats:
    if len(data.rankings):
        raise RankError(
            f"{data.source}: contains ranking records; online Elo needs comparisons (use --method pl)"
        )
    cells = pair_cells(data.comparisons, data.n_systems)
    wins, ties = count_matrices(cells)
    return Stats(data.n_systems, cells.n, wins, ties, data.comparisons)


def _fit_elo(stats: Stats, n, cfg: RankConfig, warm: Fit | None) -> Fit:
    c = stats.payload
    weight = None if np.all(c.weight == 1.0) else c.weight
    r = elo_ratings(c.a, c.b, c.outcome, stats.k, cfg.k_factor, 1000.0, weight)
    theta = (r - 1000.0) * LN10_OVER_400  # Elo points on the natural-log strength scale
    return Fit(theta - theta.mean(), len(c.a), True)


def _bootstrap_elo(stats: Stats, cfg: RankConfig, rng: np.random.Generator, full: Fit) -> np.ndarray:
    c = stats.payload
    r = elo_bootstrap(c.a, c.b, c.outcome, c.weight, stats.k, cfg.bootstrap, rng, cfg.k_factor)
    theta = (r - 1000.0) * LN10_OVER_400
    return theta - theta.mean(1, keepdims=True)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "bt",
            "Bradley-Terry MLE (ties = half wins), Newton on the K×K win matrix",
            False,
            _prepare_pairs,
            _fit_bt,
            _bt_probs,
        ),
        Method(
            "davidson",
            "Bradley-Terry with the Davidson (1970) tie model, L-BFGS on K×K counts",
            False,
            _prepare_pairs,
            _fit_davidson,
            _davidson_probs,
        ),
        Method(
            "elo",
            "online Elo in file order (order-dependent; K factor)",
            True,
            _prepare_elo,
            _fit_elo,
            _bt_probs,
            _bootstrap_elo,
            needs_mle_check=False,
        ),
        Method(
            "pl",
            "Plackett-Luce MLE (Newton; Hunter-2004 MM available), comparisons as 2-item rankings",
            False,
            _prepare_pl,
            _fit_pl,
            _bt_probs,
        ),
    )
}


def bootstrap_thetas(method: Method, stats: Stats, cfg: RankConfig, full: Fit) -> np.ndarray:
    """(rounds, K) natural log-strengths from ``cfg.bootstrap`` seeded resamples (NaN = system absent
    from that resample). Count methods draw cell counts ~ Multinomial(N, n_c / N) per round."""
    rng = np.random.default_rng(cfg.seed)
    if method.bootstrap is not None:
        return method.bootstrap(stats, cfg, rng, full)
    total = int(stats.cell_n.sum())
    p = stats.cell_n / total
    out = np.empty((cfg.bootstrap, stats.k))
    for r in range(cfg.bootstrap):
        n = rng.multinomial(total, p)  # (C,)
        # Warm start from the full-data fit: 2-4 Newton steps per round instead of ~8.
        out[r] = method.fit(stats, n, cfg, full).theta
    return out
