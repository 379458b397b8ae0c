"""`preftune compare`: objectives × tasks × seeds (× a small beta / learning-rate sweep) at an equal budget,
compared on held-out prompts — a table, two trade-off plots and a Bradley–Terry leaderboard.

    from preftune.compare import CompareConfig, run_compare
    result = run_compare(CompareConfig(objectives=["dpo", "ipo"], output="runs/cmp"))
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "CompareConfig": "preftune.compare.config",
    "Cell": "preftune.compare.config",
    "comparable": "preftune.compare.config",
    "run_compare": "preftune.compare.grid",
    "CompareResult": "preftune.compare.grid",
    "pairwise_outcomes": "preftune.compare.leaderboard",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'preftune.compare' has no attribute {name!r}")
