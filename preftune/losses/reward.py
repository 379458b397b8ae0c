"""Reward-model and preference-model objectives (LOSSES.md part G): Bradley–Terry (+ margin, centering),
HelpSteer2's regression and scaled BT, GPM's skew-symmetric preference score, and the LSC transform.

These act on **reward-model outputs**, not policy log-probs. The plain functions (``bt_reward_loss``,
``scaled_bt_loss``, ``regression_loss``, ``gpm_score``, ``gpm_loss``, ``lsc_transform``) are what the
reward-model trainer calls. The registered ``rm_*`` entries wrap them in the loss contract so the registry
documents and tests them: there the ``policy.logps`` slot carries the scalar rewards r_φ(x, y) (B, K) —
not log-probabilities — and no reference is used. A policy trainer must not offer them
(they are registered with ``trains="reward_model"``: ``names(trains="reward_model")`` lists them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from preftune.losses.base import LossOutput, PolicyStats, RefStats
from preftune.losses.functional import logsigmoid, loss_output, require_pairs
from preftune.losses.registry import Hyper, register

RM_NOTE = "[reward-model objective] policy.logps carries reward-model outputs r_φ(x,y), not log-probs."
CENTER = Hyper(
    0.0, 0.0, None, help="c: reward-centering coefficient on (r_c + r_r)² (recommended 0.01 when used)"
)


# --------------------------------------------------------------------------------------------------
# Plain functions


def bt_reward_loss(
    r_chosen: Tensor, r_rejected: Tensor, margin: Tensor | float | None = None, centering: float = 0.0
) -> Tensor:
    """Bradley–Terry reward-model loss, per pair.

    InstructGPT; margin: Llama 2; centering: arXiv 2312.09244 Eq. 2.

    L = −log σ(r_c − r_r − m) + c·(r_c + r_r)²;  m = 0 when ``margin`` is None. Shapes: (B,) → (B,).
    Averaging over pairs gives TRL's ``RewardTrainer`` loss (its centering term is the batch mean of
    (r_c + r_r)², identical after the mean).
    """
    z = r_chosen - r_rejected
    if margin is not None:
        z = z - margin
    loss = -logsigmoid(z)
    if centering:
        loss = loss + centering * (r_chosen + r_rejected) ** 2
    return loss


def scaled_bt_loss(r_chosen: Tensor, r_rejected: Tensor, strength: Tensor) -> Tensor:
    """HelpSteer2-Preference scaled BT (Wang et al. 2024, arXiv 2410.01257; NeMo-Aligner ``bt_loss_func``).

    L = |m|·(−log σ(r_c − r_r)), m = preference strength (|m| ∈ {1,2,3}); m = 0 pairs contribute zero.
    (chosen, rejected) must already be ordered by sign(m). Shapes: (B,) → (B,).
    """
    return strength.abs() * -logsigmoid(r_chosen - r_rejected)


def regression_loss(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """SteerLM / HelpSteer2 stage-1 regression (NeMo-Aligner ``reg_loss_func``), per example.

    L = Σ_a mask_a·(ŷ_a − y_a)² / Σ_a mask_a over the last dim (attribute heads); an all-masked row
    gives 0. Shapes: (B, A) → (B,); (B,) inputs are treated as A = 1.
    """
    if pred.dim() == 1:
        pred, target = pred.unsqueeze(-1), target.unsqueeze(-1)
        mask = None if mask is None else mask.unsqueeze(-1)
    if mask is None:
        mask = torch.ones_like(pred, dtype=torch.bool)
    mask = mask.bool()
    zero = torch.zeros((), dtype=pred.dtype, device=pred.device)
    sq = torch.where(mask, pred, zero) - torch.where(mask, target.to(pred.dtype), zero)
    return (sq**2).sum(-1) / mask.sum(-1).clamp(min=1)


def gpm_score(v_i: Tensor, v_j: Tensor, eigenvalues: Tensor | None = None) -> Tensor:
    """GPM preference score s(y_i ≻ y_j) = ⟨R^≻·v_i, v_j⟩ (Zhang et al. 2025, arXiv 2410.02197).

    R^≻ is block-diagonal with k blocks λ_l·[[0, −1], [1, 0]], so
    s = Σ_l λ_l·(v_i[2l]·v_j[2l+1] − v_i[2l+1]·v_j[2l]). Skew-symmetric: s(i≻j) = −s(j≻i), s(i≻i) = 0.
    v_i, v_j: (..., 2k); eigenvalues λ: (..., k) or None (all 1, the basic model). Returns (...).
    """
    if v_i.shape[-1] % 2:
        raise ValueError(f"GPM embeddings need an even dimension 2k, got {v_i.shape[-1]}")
    a, b = v_i.unflatten(-1, (-1, 2)), v_j.unflatten(-1, (-1, 2))  # (..., k, 2)
    per_block = a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]  # (..., k)
    if eigenvalues is not None:
        per_block = eigenvalues * per_block
    return per_block.sum(-1)


def gpm_loss(
    v_chosen: Tensor,
    v_rejected: Tensor,
    tau: float = 0.1,
    margin: Tensor | float = 0.0,
    eigenvalues: Tensor | None = None,
    normalize: bool = True,
) -> Tensor:
    """GPM loss L = −log σ((s(y_w ≻ y_l) − m)/τ), per pair.

    Reference: general-preference-model ``GeneralPreferenceLoss``.

    ``normalize`` L2-normalises each embedding first. Choice: on by default, as the paper and the released
    inference pipeline do (the training code has it commented out); keep the same setting at train and
    test time. Shapes: (B, 2k) → (B,).
    """
    if normalize:
        v_chosen, v_rejected = F.normalize(v_chosen, dim=-1), F.normalize(v_rejected, dim=-1)
    s = gpm_score(v_chosen, v_rejected, eigenvalues)
    return -logsigmoid((s - margin) / tau)


def lsc_transform(r: Tensor, r_ref: Tensor) -> Tensor:
    """LSC transform u = log σ(r − r_ref) (Wang et al. 2024, arXiv 2402.00742).

    The log-probability that y beats the prompt's reference reward; sum u over properties for a
    logical AND. Choice for r_ref [UNVERIFIED recipe]: the caller supplies it (e.g. a high quantile of
    rewards of π_0 samples for the prompt). Shapes broadcast; returns ≤ 0.
    """
    return logsigmoid(r - r_ref)


# --------------------------------------------------------------------------------------------------
# Registered wrappers (the policy.logps slot holds rewards)


BT_PAPER = "Training language models to follow instructions with human feedback (InstructGPT)"


@register(
    "rm_bt",
    summary="Bradley–Terry reward-model loss on scalar rewards, optional reward centering",
    paper=BT_PAPER + "; centering: Helping or Herding? Reward Model Ensembles (arXiv 2312.09244, Eq. 2)",
    arxiv="2203.02155",
    trains="reward_model",
    reference="none",
    hyperparameters={"center_rewards_coefficient": CENTER},
    notes=RM_NOTE + " policy.logps (B,2): rewards of chosen and rejected.",
)
def rm_bt(
    policy: PolicyStats, ref: RefStats | None = None, center_rewards_coefficient: float = 0.0
) -> LossOutput:
    """BT reward-model loss: L = −log σ(r_c − r_r) + c·(r_c + r_r)². ``policy.logps`` = rewards (B, 2).

    Shapes: (B, 2) → (B,). Normalisation: sum (a scalar per response; no length normalisation).
    """
    require_pairs(policy, "rm_bt")
    r = policy.logps
    losses = bt_reward_loss(r[:, 0], r[:, 1], None, center_rewards_coefficient)
    return loss_output(losses, r[:, 0], r[:, 1])


@register(
    "rm_bt_margin",
    summary="Bradley–Terry reward-model loss with a per-pair margin m (Llama 2)",
    paper="Llama 2: Open Foundation and Fine-Tuned Chat Models",
    arxiv="2307.09288",
    trains="reward_model",
    reference="none",
    hyperparameters={"center_rewards_coefficient": CENTER},
    inputs=("margin",),
    required_columns=("margin",),
    notes=RM_NOTE + " inputs['margin'] (B,): margin in reward units (e.g. from Likert preference strength).",
)
def rm_bt_margin(
    policy: PolicyStats, ref: RefStats | None = None, center_rewards_coefficient: float = 0.0
) -> LossOutput:
    """BT with margin: L = −log σ(r_c − r_r − m) + c·(r_c + r_r)², m = ``inputs['margin']`` (B,).

    Shapes: (B, 2) → (B,). Normalisation: sum.
    """
    require_pairs(policy, "rm_bt_margin")
    r = policy.logps
    m = policy.inputs["margin"].to(r.dtype).reshape(-1)
    losses = bt_reward_loss(r[:, 0], r[:, 1], m, center_rewards_coefficient)
    return loss_output(losses, r[:, 0], r[:, 1])


@register(
    "rm_bt_scaled",
    summary="HelpSteer2-Preference scaled Bradley–Terry: |m|·(−log σ(r_c − r_r))",
    paper="HelpSteer2-Preference: Complementing Ratings with Preferences",
    arxiv="2410.01257",
    trains="reward_model",
    reference="none",
    inputs=("preference_strength",),
    required_columns=("preference_strength",),
    notes=RM_NOTE
    + " inputs['preference_strength'] (B,): m ∈ {−3..3}; the data layer orders chosen/rejected by "
    "sign(m) (m = 0 pairs then contribute zero).",
)
def rm_bt_scaled(policy: PolicyStats, ref: RefStats | None = None) -> LossOutput:
    """Scaled BT: L = |m|·(−log σ(r_c − r_r)), m = ``inputs['preference_strength']``. (B, 2) → (B,)."""
    require_pairs(policy, "rm_bt_scaled")
    r = policy.logps
    m = policy.inputs["preference_strength"].to(r.dtype).reshape(-1)
    return loss_output(scaled_bt_loss(r[:, 0], r[:, 1], m), r[:, 0], r[:, 1])


@register(
    "rm_regression",
    summary="SteerLM/HelpSteer2 regression reward model: masked squared error to ratings",
    paper="HelpSteer2-Preference: Complementing Ratings with Preferences (stage 1, SteerLM regression)",
    arxiv="2410.01257",
    trains="reward_model",
    shape="unpaired",
    reference="none",
    min_responses=1,
    inputs=("targets",),
    notes=RM_NOTE + " policy.logps (B,K): predicted ratings, one column per response or attribute head; "
    "inputs['targets'] (B,K): the ratings; policy.valid (B,K) masks unrated columns.",
)
def rm_regression(policy: PolicyStats, ref: RefStats | None = None) -> LossOutput:
    """Regression RM: L = Σ_a valid_a·(ŷ_a − y_a)² / Σ_a valid_a over the K columns of a row.

    Shapes: (B, K) → (B,). Normalisation: mean over valid columns.
    """
    mask = policy.valid if policy.valid is not None else torch.ones_like(policy.logps, dtype=torch.bool)
    losses = regression_loss(policy.logps, policy.inputs["targets"], mask)
    return loss_output(losses, None, None)


@register(
    "rm_gpm",
    summary="GPM: general (skew-symmetric) preference model on 2k-dim preference embeddings",
    paper="Beyond Bradley-Terry Models: A General Preference Model for Language Model Alignment",
    arxiv="2410.02197",
    trains="reward_model",
    reference="none",
    hyperparameters={
        "tau": Hyper(0.1, 0.0, None, low_open=True, help="τ: P(y_i ≻ y_j) = σ(s/τ) (single-node script 0.1)"),
        "normalize": Hyper(True, help="L2-normalise embeddings (paper and inference pipeline)"),
    },
    inputs=("gpm_embeddings",),
    notes="[reward-model objective] inputs['gpm_embeddings'] (B,2,2k): embeddings of chosen and rejected "
    "from the value head; optional inputs['gpm_eigenvalues'] (B,k) for learned/per-prompt λ (default 1); "
    "optional inputs['margin'] (B,). The policy.logps slot is unused.",
)
def rm_gpm(
    policy: PolicyStats, ref: RefStats | None = None, tau: float = 0.1, normalize: bool = True
) -> LossOutput:
    """GPM loss L = −log σ((s(y_w ≻ y_l) − m)/τ) on ``inputs['gpm_embeddings']`` (B, 2, 2k).

    Shapes → (B,). Normalisation: sum. Metrics: the preference score s and P(y_w ≻ y_l) = σ(s/τ).
    """
    v = policy.inputs["gpm_embeddings"]
    lam = policy.inputs.get("gpm_eigenvalues")
    margin = policy.inputs.get("margin", 0.0)
    if isinstance(margin, Tensor):
        margin = margin.to(v.dtype).reshape(-1)
    losses = gpm_loss(v[:, 0], v[:, 1], tau, margin, lam, normalize)
    vc, vr = (F.normalize(v[:, 0], dim=-1), F.normalize(v[:, 1], dim=-1)) if normalize else (v[:, 0], v[:, 1])
    s = gpm_score(vc, vr, lam)
    return loss_output(losses, None, None, preference_score=s, **{"rewards/accuracies": (s > 0).to(s.dtype)})
