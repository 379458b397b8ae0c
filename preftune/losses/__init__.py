"""Objectives as pure functions of per-response statistics, behind one registry.

Imports only torch: no transformers, accelerate or datasets (a test checks it).
"""

from preftune.losses.base import LossOutput, PolicyStats, RefStats
from preftune.losses.registry import Hyper, Objective, all_objectives, get, names, register

__all__ = [
    "Hyper",
    "LossOutput",
    "Objective",
    "PolicyStats",
    "RefStats",
    "all_objectives",
    "get",
    "names",
    "register",
]
