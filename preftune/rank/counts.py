"""Aggregate records into sufficient statistics, and check that the comparison graph allows ratings.

Fitting never touches the N records again: comparisons become (pair, outcome, weight) *cells* with a
record count each, cells become K×K win / tie matrices, and the bootstrap resamples cell counts
(multinomially) instead of rows. For 1M records among 100 systems that is ≤ 29,700 cells.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from preftune.rank.io import Comparisons, Rankings

# Outcome codes inside a cell key (o = 1, 0, ½ from a's side).
A_WINS, B_WINS, TIE = 0, 1, 2


@dataclass
class PairCells:
    """Unique (a, b, outcome, weight) cells; all arrays (C,). ``n`` = records in each cell."""

    k: int
    a: np.ndarray
    b: np.ndarray
    code: np.ndarray
    weight: np.ndarray
    n: np.ndarray

    @property
    def n_records(self) -> int:
        return int(self.n.sum())


def pair_cells(comps: Comparisons, k: int) -> PairCells:
    """Group comparisons into cells. Unweighted data uses one ``bincount`` over K·K·3 codes; with
    varying weights the weight joins the key so that resampling a cell resamples exact records."""
    code = np.where(comps.outcome == 1.0, A_WINS, np.where(comps.outcome == 0.0, B_WINS, TIE))
    key = (comps.a * k + comps.b) * 3 + code  # (N,)
    if comps.weight.size == 0 or np.all(comps.weight == comps.weight[0]):
        counts = np.bincount(key, minlength=k * k * 3)
        cells = np.flatnonzero(counts)
        n = counts[cells]
        w = np.full(len(cells), comps.weight[0] if comps.weight.size else 1.0)
    else:
        order = np.lexsort((comps.weight, key))
        ks, ws = key[order], comps.weight[order]
        start = np.flatnonzero(np.r_[True, (ks[1:] != ks[:-1]) | (ws[1:] != ws[:-1])])
        cells, w = ks[start], ws[start]
        n = np.diff(np.r_[start, len(ks)])
    pair, code = np.divmod(cells, 3)
    a, b = np.divmod(pair, k)
    return PairCells(k, a, b, code, w, n.astype(np.int64))


def count_matrices(cells: PairCells, n: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Weighted counts from cells (optionally with resampled record counts ``n``).

    Returns ``wins`` (K, K): wins[i, j] = weight of strict wins of i over j, and ``ties`` (K, K),
    symmetric: ties[i, j] = ties[j, i] = weight of ties between i and j.
    """
    k = cells.k
    mass = (cells.n if n is None else n) * cells.weight  # (C,)
    winner = np.where(cells.code == B_WINS, cells.b, cells.a)
    loser = np.where(cells.code == B_WINS, cells.a, cells.b)
    strict = cells.code != TIE
    wins = np.bincount(winner[strict] * k + loser[strict], mass[strict], minlength=k * k).reshape(k, k)
    t = np.bincount(cells.a[~strict] * k + cells.b[~strict], mass[~strict], minlength=k * k).reshape(k, k)
    return wins, t + t.T


@dataclass
class RankCells:
    """Unique weighted rankings: ``items`` (C, L) padded with -1; ``length``, ``weight``, ``n`` (C,)."""

    k: int
    items: np.ndarray
    length: np.ndarray
    weight: np.ndarray
    n: np.ndarray

    @property
    def n_records(self) -> int:
        return int(self.n.sum())


def ranking_cells(r: Rankings, k: int) -> RankCells:
    """Group identical (ranking, weight) records; 2-item rankings among K systems collapse to ≤ K² cells."""
    if len(r) == 0:
        return RankCells(k, r.items, r.length, r.weight, np.zeros(0, dtype=np.int64))
    key = np.column_stack([r.items.astype(np.float64), r.weight])
    uniq, inv = np.unique(key, axis=0, return_inverse=True)
    n = np.bincount(inv.ravel(), minlength=len(uniq))
    items = uniq[:, :-1].astype(np.int64)
    return RankCells(k, items, (items >= 0).sum(1), uniq[:, -1], n)


def ranking_pair_counts(cells: RankCells, n: np.ndarray | None = None) -> np.ndarray:
    """Implied pairwise wins (K, K) of rankings (full breaking): i above j in a ranking = one win,
    weighted. Used for the leaderboard's W/L columns and the graph checks, not for the PL fit."""
    k = cells.k
    mass = (cells.n if n is None else n) * cells.weight
    wins = np.zeros(k * k)
    width = cells.items.shape[1]
    for p in range(width):  # L² bincounts over C cells: rankings are short
        for q in range(p + 1, width):
            ok = cells.items[:, q] >= 0
            wins += np.bincount(cells.items[ok, p] * k + cells.items[ok, q], mass[ok], minlength=k * k)
    return wins.reshape(k, k)


def components(adjacency: np.ndarray, strong: bool = False) -> list[np.ndarray]:
    """Connected components (weak) or strongly connected components of a K×K edge-weight matrix,
    as index arrays, largest first."""
    g = coo_matrix(adjacency > 0)
    n, labels = connected_components(g, directed=True, connection="strong" if strong else "weak")
    comps = [np.flatnonzero(labels == c) for c in range(n)]
    return sorted(comps, key=len, reverse=True)


def describe_groups(groups: list[np.ndarray], names: list[str], max_names: int = 12) -> str:
    """'{a, b, c} | {d, e}' with long groups shortened."""
    parts = []
    for g in groups:
        shown = [names[i] for i in g[:max_names]]
        more = f", ... (+{len(g) - max_names})" if len(g) > max_names else ""
        parts.append("{" + ", ".join(shown) + more + "}")
    return " | ".join(parts)


def order_groups(wins: np.ndarray, groups: list[np.ndarray]) -> list[np.ndarray]:
    """Order strongly connected components from the undefeated group down (topological order of
    the condensation: a group that beat another comes first)."""
    label = np.empty(wins.shape[0], dtype=np.int64)
    for c, g in enumerate(groups):
        label[g] = c
    beat = np.zeros((len(groups), len(groups)))
    np.add.at(beat, (label[:, None], label[None, :]), wins)
    np.fill_diagonal(beat, 0)
    # Kahn-style: repeatedly take a group nobody outside it has beaten.
    remaining, order = list(range(len(groups))), []
    while remaining:
        top = next((c for c in remaining if beat[remaining, c].sum() == 0), remaining[0])
        order.append(top)
        remaining.remove(top)
    return [groups[c] for c in order]
