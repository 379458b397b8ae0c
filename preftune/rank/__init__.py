"""preftune.rank: side-by-side rank aggregation — Bradley–Terry (half-win or Davidson ties), online
Elo, Plackett–Luce — fitted on aggregated K×K counts, with bootstrap intervals (LOSSES.md Part I).

Imports only numpy/scipy (and pydantic for the config); names resolve lazily so that
``import preftune.rank`` stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "RankConfig": "preftune.rank.config",
    "read_preferences": "preftune.rank.io",
    "parse_records": "preftune.rank.io",
    "comparisons_from_arrays": "preftune.rank.io",
    "PreferenceData": "preftune.rank.io",
    "RankError": "preftune.rank.io",
    "RankDataError": "preftune.rank.io",
    "RankWarning": "preftune.rank.io",
    "rank": "preftune.rank.api",
    "run_rank": "preftune.rank.api",
    "Leaderboard": "preftune.rank.api",
    "METHODS": "preftune.rank.methods",
    "fit_bt": "preftune.rank.bt",
    "fit_davidson": "preftune.rank.bt",
    "fit_pl": "preftune.rank.pl",
    "elo_update": "preftune.rank.elo",
    "elo_ratings": "preftune.rank.elo",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'preftune.rank' has no attribute {name!r}")
