"""Objectives as pure functions of per-response statistics, behind one registry.

Imports only torch: no transformers, accelerate or datasets (a test checks it).
"""

from preftune.losses.base import LossOutput, PolicyStats, RefStats
from preftune.losses.registry import (
    TRIPLE_COLUMNS,
    Hyper,
    Objective,
    all_objectives,
    choices_text,
    get,
    names,
    register,
)

__all__ = [
    "TRIPLE_COLUMNS",
    "Hyper",
    "LossOutput",
    "Objective",
    "PolicyStats",
    "RefStats",
    "all_objectives",
    "choices_text",
    "get",
    "names",
    "register",
]
