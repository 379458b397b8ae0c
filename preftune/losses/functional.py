"""Shared numerically stable pieces of the objectives (LOSSES.md §1)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from preftune.losses.base import LossOutput, PolicyStats, RefStats


def logsigmoid(z: Tensor) -> Tensor:
    """log σ(z) = min(z, 0) − log1p(e^{−|z|}), torch's stable kernel. Not −softplus(−z): softplus returns
    its input past its threshold (20), so that form drops log1p(e^z) for z < −20 (2e-9 in float64)."""
    return F.logsigmoid(z)


def log1mexp(a: Tensor) -> Tensor:
    """log(1 − e^a) for a < 0, two-branch stable form (Mächler 2012)."""
    return torch.where(a > -math.log(2.0), torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


def log_ratios(policy: PolicyStats, ref: RefStats | None) -> Tensor:
    """(B, K) sequence log-ratios ρ = ℓ_θ − ℓ_ref (ℓ_θ itself for reference-free objectives)."""
    if ref is None:
        return policy.logps
    return policy.logps - ref.logps


def pair_margin(policy: PolicyStats, ref: RefStats | None, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """Implicit rewards β·ρ for chosen and rejected, and the logit βΔ. Shapes (B,)."""
    rho = log_ratios(policy, ref)
    chosen = beta * rho[:, 0]
    rejected = beta * rho[:, 1]
    return chosen, rejected, chosen - rejected


def loss_output(
    losses: Tensor, chosen: Tensor | None, rejected: Tensor | None, **metrics: Tensor
) -> LossOutput:
    """The contract's return value: per-example losses, detached implicit rewards and metrics."""
    return LossOutput(
        losses,
        None if chosen is None else chosen.detach(),
        None if rejected is None else rejected.detach(),
        {k: v.detach() for k, v in metrics.items()},
    )


def require_pairs(policy: PolicyStats, name: str) -> None:
    if policy.num_responses != 2:
        raise ValueError(f"objective '{name}' needs pairs (K=2 responses per prompt), got K={policy.num_responses}")


def require_ref(ref: RefStats | None, name: str) -> RefStats:
    if ref is None:
        raise ValueError(f"objective '{name}' needs reference log-probs")
    return ref
