"""The loss contract: what the engine hands an objective and what the objective returns.

Every batch is a grid of ``B`` groups (one prompt each) by ``K`` responses. Pairs are ``K = 2`` with
column 0 the chosen and column 1 the rejected response; unpaired data (KTO, BCO) is ``K = 1`` with a
boolean label; listwise data (PRO, IRPO, NCA-K) uses ``K >= 2`` columns with scores, a ``valid`` mask
for ragged lists, and responses ordered however the data gave them.

Objectives are pure functions ``fn(policy, ref, **hyperparameters) -> LossOutput`` over these
statistics; they never see a model. The trainer reduces ``LossOutput.losses`` once.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch
from torch import Tensor


@dataclass
class PolicyStats:
    """Per-response statistics of the trained policy (gradients flow through them).

    Shapes: ``logps`` and ``lengths`` are ``(B, K)``; token-level fields are ``(B, K, T)``.
    """

    logps: Tensor  # (B, K) summed log-probs of the response tokens
    lengths: Tensor  # (B, K) response token counts (float)
    valid: Tensor | None = None  # (B, K) bool; None means every slot holds a response
    token_logps: Tensor | None = None  # (B, K, T) per-token log-probs, 0 where masked
    token_mask: Tensor | None = None  # (B, K, T) bool
    token_kl: Tensor | None = None  # (B, K, T) KL(ref || policy) at each response position
    token_entropy: Tensor | None = None  # (B, K, T) optional diagnostics
    # Data-derived inputs (scores, labels, win probabilities, judge margins...) keyed by name;
    # each (B, K) or (B,). Registry entries declare which keys they need.
    inputs: dict[str, Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.logps.shape[0]

    @property
    def num_responses(self) -> int:
        return self.logps.shape[1]

    @property
    def avg_logps(self) -> Tensor:
        """(B, K) length-averaged log-probs (ℓ̄ in LOSSES.md)."""
        return self.logps / self.lengths.clamp(min=1)

    @property
    def nll(self) -> Tensor:
        """(B, K) per-sequence token-mean negative log-likelihood."""
        return -self.avg_logps

    # Pair views (K = 2): column 0 is chosen, column 1 rejected.
    @property
    def chosen_logps(self) -> Tensor:
        return self.logps[:, 0]

    @property
    def rejected_logps(self) -> Tensor:
        return self.logps[:, 1]

    def to(self, dtype: torch.dtype) -> PolicyStats:
        """Cast floating tensors (losses are computed in float32 even under bf16 autocast)."""
        changes = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor) and v.is_floating_point():
                changes[f.name] = v.to(dtype)
            elif isinstance(v, dict):
                changes[f.name] = {k: t.to(dtype) if t.is_floating_point() else t for k, t in v.items()}
        return replace(self, **changes)


@dataclass
class RefStats:
    """The same statistics under the frozen reference policy (no gradients)."""

    logps: Tensor  # (B, K)
    token_logps: Tensor | None = None  # (B, K, T)

    @property
    def chosen_logps(self) -> Tensor:
        return self.logps[:, 0]

    @property
    def rejected_logps(self) -> Tensor:
        return self.logps[:, 1]

    def to(self, dtype: torch.dtype) -> RefStats:
        tl = self.token_logps.to(dtype) if self.token_logps is not None else None
        return RefStats(self.logps.to(dtype), tl)


@dataclass
class LossOutput:
    """What an objective returns.

    ``losses`` is unreduced, one value per group (B,). ``chosen_rewards``/``rejected_rewards`` are
    detached implicit rewards for the metrics (None where the objective has no such notion, e.g.
    unpaired batches report ``metrics['rewards/...']`` themselves). ``metrics`` holds detached
    scalars or (B,) tensors that the trainer averages over examples.
    """

    losses: Tensor  # (B,)
    chosen_rewards: Tensor | None = None  # (B,)
    rejected_rewards: Tensor | None = None  # (B,)
    metrics: dict[str, Tensor] = field(default_factory=dict)
