"""Rank systems from side-by-side judgements: read → aggregate → check → fit → bootstrap → report.

Python use::

    from preftune.rank import RankConfig, rank, read_preferences
    data = read_preferences("battles.jsonl")
    board = rank(data, RankConfig(file="battles.jsonl", method="bt", bootstrap=200))
    board.rows()   # best first: system, rating, ci_low, ci_high, wins, losses, ties, comparisons
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from preftune.rank.bt import Fit
from preftune.rank.config import RankConfig
from preftune.rank.counts import components, describe_groups, order_groups
from preftune.rank.io import PreferenceData, RankError, RankWarning, read_preferences
from preftune.rank.methods import METHODS, bootstrap_thetas


@dataclass
class Leaderboard:
    """Fitted ratings and everything the reports show. Arrays are indexed like ``names`` (K,)."""

    names: list[str]
    method: str
    rating: np.ndarray
    theta: np.ndarray  # natural log-strengths, centred
    ci_low: np.ndarray | None
    ci_high: np.ndarray | None
    wins: np.ndarray
    losses: np.ndarray
    ties: np.ndarray
    comparisons: np.ndarray
    win_prob: np.ndarray  # (K, K): P(i beats j)
    tie_prob: np.ndarray | None  # (K, K), Davidson only
    config: RankConfig
    info: dict = field(default_factory=dict)
    boot_ratings: np.ndarray | None = None  # (rounds, K)

    @property
    def order(self) -> np.ndarray:
        """Indices best first (ties in rating broken by name for a stable table)."""
        return np.array(sorted(range(len(self.names)), key=lambda i: (-self.rating[i], self.names[i])))

    def rows(self) -> list[dict]:
        """One dict per system, best first."""
        out = []
        for rank_, i in enumerate(self.order, start=1):
            out.append(
                {
                    "rank": rank_,
                    "system": self.names[i],
                    "rating": float(self.rating[i]),
                    "ci_low": None if self.ci_low is None else float(self.ci_low[i]),
                    "ci_high": None if self.ci_high is None else float(self.ci_high[i]),
                    "wins": float(self.wins[i]),
                    "losses": float(self.losses[i]),
                    "ties": float(self.ties[i]),
                    "comparisons": float(self.comparisons[i]),
                }
            )
        return out

    def rating_of(self, name: str) -> float:
        return float(self.rating[self.names.index(name)])


def to_ratings(theta: np.ndarray, cfg: RankConfig, anchor: int | None) -> np.ndarray:
    """R = base + scale·θ with Σθ = 0, or R = anchor_rating + scale·(θ − θ_anchor). Works on (..., K)."""
    if anchor is None:
        return cfg.base + cfg.scale * (theta - np.nanmean(theta, axis=-1, keepdims=True))
    return cfg.anchor_value + cfg.scale * (theta - theta[..., anchor : anchor + 1])


def check_graph(names: list[str], wins: np.ndarray, ties: np.ndarray, cfg: RankConfig, mle: bool) -> None:
    """Ratings of systems that were never (indirectly) compared are not identified; without a prior
    that is an error naming the groups. With ``mle``, also require that every group of systems lost
    at least once to the rest (strong connectivity, Ford 1957), else the MLE is infinite."""
    pairs = wins + wins.T + ties  # (K, K) undirected
    weak = components(pairs)
    hint = "add a prior with --l2 (e.g. --l2 0.01) to rank them anyway"
    if len(weak) > 1:
        msg = (
            f"the comparison graph is disconnected: {len(weak)} groups were never compared with each "
            f"other, so their ratings cannot be compared: {describe_groups(weak, names)}"
        )
        if cfg.l2 == 0:
            raise RankError(msg + f"; {hint}")
        warnings.warn(
            msg + f"; the L2 prior (l2={cfg.l2:g}) pulls each group to the mean", RankWarning, stacklevel=3
        )
        return
    if not mle:
        return
    strong = components(wins + ties, strong=True)  # a tie is an edge both ways
    if len(strong) > 1:
        groups = order_groups(wins + ties, strong)
        msg = (
            "some systems won (or lost) every comparison against the rest, so the maximum-likelihood "
            f"ratings are infinite; groups from undefeated to winless: {describe_groups(groups, names)}"
        )
        if cfg.l2 == 0:
            raise RankError(msg + f"; {hint}")
        warnings.warn(msg + f"; the L2 prior (l2={cfg.l2:g}) keeps them finite", RankWarning, stacklevel=3)


def rank(data: PreferenceData, cfg: RankConfig) -> Leaderboard:
    """Fit ``cfg.method`` on ``data``, bootstrap intervals, predict the win-probability matrix."""
    method = METHODS[cfg.method]
    anchor = None
    if cfg.anchor is not None:
        if cfg.anchor not in data.names:
            raise RankError(
                f"--anchor {cfg.anchor!r} is not a system in {data.source} "
                f"(systems: {', '.join(sorted(data.names)[:20])})"
            )
        anchor = data.names.index(cfg.anchor)
    stats = method.prepare(data, cfg)
    check_graph(data.names, stats.wins, stats.ties, cfg, method.needs_mle_check)
    fit: Fit = method.fit(stats, None, cfg, None)
    if not fit.converged:
        warnings.warn(
            f"{cfg.method}: the fit did not converge in {fit.iterations} iterations",
            RankWarning,
            stacklevel=2,
        )
    rating = to_ratings(fit.theta, cfg, anchor)
    lo = hi = boot = None
    if cfg.bootstrap > 0:
        boot = to_ratings(bootstrap_thetas(method, stats, cfg, fit), cfg, anchor)  # (rounds, K)
        alpha = 100 * (1 - cfg.ci) / 2
        with warnings.catch_warnings():  # a system absent from every round → NaN interval, fine
            warnings.simplefilter("ignore", RuntimeWarning)
            lo, hi = np.nanpercentile(boot, [alpha, 100 - alpha], axis=0)
    win_prob, tie_prob = method.probs(fit)
    w, t = stats.wins, stats.ties
    info = {
        "iterations": fit.iterations,
        "converged": fit.converged,
        "records": int(stats.cell_n.sum()),
        "systems": data.n_systems,
        "source": data.source,
        "order_dependent": method.order_dependent,
        "summary": method.summary,
    }
    if fit.tie_log_nu is not None:
        info["tie_nu"] = float(np.exp(fit.tie_log_nu))
    return Leaderboard(
        names=list(data.names),
        method=cfg.method,
        rating=rating,
        theta=fit.theta,
        ci_low=lo,
        ci_high=hi,
        wins=w.sum(1),
        losses=w.sum(0),
        ties=t.sum(1),
        comparisons=w.sum(1) + w.sum(0) + t.sum(1),
        win_prob=win_prob,
        tie_prob=tie_prob,
        config=cfg,
        info=info,
        boot_ratings=boot,
    )


def run_rank(cfg: RankConfig, console=None) -> Leaderboard:
    """The ``preftune rank`` command: read ``cfg.file``, rank, print the table, write the files.

    Warnings (dropped self-comparisons, prior-rescued graphs) are printed above the table.
    """
    from preftune.rank.report import print_leaderboard, write_reports

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RankWarning)
        data = read_preferences(cfg.file, judge=cfg.judge, self_comparisons=cfg.self_comparisons)
        board = rank(data, cfg)
    notes = [str(w.message) for w in caught if issubclass(w.category, RankWarning)]
    for w in caught:  # re-emit anything that is not ours
        if not issubclass(w.category, RankWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    board.info["warnings"] = notes
    print_leaderboard(board, console=_console(console))
    if cfg.output is not None:
        written = write_reports(board, cfg.output, cfg.formats)
        board.info["written"] = [str(p) for p in written]
        _console(console).print("wrote " + ", ".join(str(p) for p in written))
    return board


def _console(console):
    from rich.console import Console

    return console if console is not None else Console()
