"""Pairwise sequence-level objectives (LOSSES.md parts A and B): the DPO family and its
reference-free relatives. Inputs are (B, 2) statistics, column 0 chosen, column 1 rejected."""

from __future__ import annotations

import torch
from torch import Tensor

from preftune.losses.base import LossOutput, PolicyStats, RefStats
from preftune.losses.functional import log1mexp, logsigmoid, pair_margin
from preftune.losses.registry import Hyper, register

BETA = Hyper(0.1, 0.0, None, low_open=True, help="inverse temperature β of the implicit reward β·log(π/π_ref)")
EPS = Hyper(0.1, 0.0, 0.5, high_open=True, help="assumed label-flip probability ε")

DPO_PAPER = "Direct Preference Optimization: Your Language Model is Secretly a Reward Model"


def _out(losses: Tensor, chosen: Tensor, rejected: Tensor, **metrics: Tensor) -> LossOutput:
    return LossOutput(losses, chosen.detach(), rejected.detach(), {k: v.detach() for k, v in metrics.items()})


@register(
    "dpo",
    summary="DPO: Bradley–Terry log-sigmoid on the reference-anchored log-ratio margin",
    paper=DPO_PAPER + " (Eq. 7)",
    arxiv="2305.18290",
    hyperparameters={"beta": BETA},
)
def dpo(policy: PolicyStats, ref: RefStats, beta: float = 0.1) -> LossOutput:
    """DPO (Rafailov et al. 2023, arXiv 2305.18290, Eq. 7).

    L = −log σ(β·Δ),  Δ = [ℓ_θ(y_w) − ℓ_θ(y_l)] − [ℓ_ref(y_w) − ℓ_ref(y_l)], ℓ = summed log-probs.
    Shapes: (B, 2) stats → (B,) losses. Normalisation: sum.
    """
    chosen, rejected, logits = pair_margin(policy, ref, beta)
    return _out(-logsigmoid(logits), chosen, rejected)


@register(
    "cdpo",
    summary="Conservative DPO: DPO with label smoothing ε (noisy labels, finite optimum)",
    paper="A note on DPO with noisy preferences & relationship to IPO (Mitchell 2023)",
    arxiv=None,
    hyperparameters={"beta": BETA, "label_smoothing": Hyper(0.1, 0.0, 0.5, high_open=True, help="ε")},
)
def cdpo(policy: PolicyStats, ref: RefStats, beta: float = 0.1, label_smoothing: float = 0.1) -> LossOutput:
    """cDPO (Mitchell 2023).

    L = −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ), ε ∈ [0, 0.5); ε = 0 is DPO. Normalisation: sum.
    Shapes: (B, 2) → (B,).
    """
    chosen, rejected, logits = pair_margin(policy, ref, beta)
    eps = label_smoothing
    losses = -(1 - eps) * logsigmoid(logits) - eps * logsigmoid(-logits)
    return _out(losses, chosen, rejected)


@register(
    "rdpo",
    summary="Robust DPO: unbiased correction for a known symmetric label-flip rate ε",
    paper="Provably Robust DPO: Aligning Language Models with Noisy Feedback (Eq. 8)",
    arxiv="2403.00409",
    hyperparameters={"beta": BETA, "label_smoothing": EPS},
)
def rdpo(policy: PolicyStats, ref: RefStats, beta: float = 0.1, label_smoothing: float = 0.1) -> LossOutput:
    """rDPO (Chowdhury et al. 2024, arXiv 2403.00409).

    L = [−(1−ε)·log σ(βΔ) + ε·log σ(−βΔ)] / (1 − 2ε). Unbounded below by design (negative losses are
    expected). Normalisation: sum. Shapes: (B, 2) → (B,).
    """
    chosen, rejected, logits = pair_margin(policy, ref, beta)
    eps = label_smoothing
    losses = (-(1 - eps) * logsigmoid(logits) + eps * logsigmoid(-logits)) / (1 - 2 * eps)
    return _out(losses, chosen, rejected)


def _ipo(policy: PolicyStats, ref: RefStats, beta: float, normalise: bool) -> LossOutput:
    rho = policy.logps - ref.logps  # (B, 2)
    if normalise:
        rho = rho / policy.lengths.clamp(min=1)
    delta = rho[:, 0] - rho[:, 1]
    losses = (delta - 1.0 / (2.0 * beta)) ** 2
    return _out(losses, beta * rho[:, 0], beta * rho[:, 1])


@register(
    "ipo",
    summary="IPO, length-normalised log-ratios (TRL's form; what the IPO authors reported)",
    paper="A General Theoretical Paradigm to Understand Learning from Human Preferences (Eq. 17)",
    arxiv="2310.12036",
    normalisation="mean",
    hyperparameters={"beta": Hyper(0.1, 0.0, None, low_open=True, help="τ: the target margin is 1/(2τ)")},
)
def ipo(policy: PolicyStats, ref: RefStats, beta: float = 0.1) -> LossOutput:
    """IPO (Azar et al. 2024, arXiv 2310.12036, Eq. 17), per-token averaged log-ratios.

    L = (ρ(y_w)/|y_w| − ρ(y_l)/|y_l| − 1/(2τ))², τ = ``beta``. Normalisation: mean (per token).
    Shapes: (B, 2) → (B,). See ``ipo_sum`` for the paper's sequence-sum form.
    """
    return _ipo(policy, ref, beta, normalise=True)


@register(
    "ipo_sum",
    summary="IPO on sequence-sum log-ratios (the paper's equation as written)",
    paper="A General Theoretical Paradigm to Understand Learning from Human Preferences (Eq. 17)",
    arxiv="2310.12036",
    hyperparameters={"beta": Hyper(0.1, 0.0, None, low_open=True, help="τ: the target margin is 1/(2τ)")},
)
def ipo_sum(policy: PolicyStats, ref: RefStats, beta: float = 0.1) -> LossOutput:
    """IPO with sequence sums: L = (Δ − 1/(2τ))², τ = ``beta``. Normalisation: sum. (B, 2) → (B,)."""
    return _ipo(policy, ref, beta, normalise=False)


@register(
    "hinge",
    summary="Hinge (RSO): max-margin on the reference-anchored margin",
    paper="Statistical Rejection Sampling Improves Preference Optimization",
    arxiv="2309.06657",
    hyperparameters={"beta": Hyper(0.1, 0.0, None, low_open=True, help="β = 1/margin")},
)
def hinge(policy: PolicyStats, ref: RefStats, beta: float = 0.1) -> LossOutput:
    """Hinge / RSO (Liu et al. 2024, arXiv 2309.06657). L = relu(1 − βΔ). Normalisation: sum.

    Zero gradient once βΔ ≥ 1. Shapes: (B, 2) → (B,).
    """
    chosen, rejected, logits = pair_margin(policy, ref, beta)
    return _out(torch.relu(1 - logits), chosen, rejected)


@register(
    "dpo_nll",
    summary="DPO + α·NLL of the chosen response (Iterative RPO; TRL's rpo_alpha)",
    paper="Iterative Reasoning Preference Optimization (Pang et al. 2024)",
    arxiv="2404.19733",
    hyperparameters={"beta": BETA, "alpha": Hyper(1.0, 0.0, None, help="weight of the chosen NLL term")},
    notes="NLL is the per-sequence token mean, averaged over examples; TRL averages over all chosen "
    "tokens of the batch, which agrees when chosen lengths are equal.",
)
def dpo_nll(policy: PolicyStats, ref: RefStats, beta: float = 0.1, alpha: float = 1.0) -> LossOutput:
    """DPO + NLL (Pang et al. 2024, arXiv 2404.19733): L = −log σ(βΔ) + α·NLL(y_w).

    NLL(y_w) = −ℓ_θ(y_w)/|y_w| (per-sequence token mean). Normalisation: sum for Δ, mean for NLL.
    Shapes: (B, 2) → (B,).
    """
    chosen, rejected, logits = pair_margin(policy, ref, beta)
    nll = policy.nll[:, 0]
    dpo_term = -logsigmoid(logits)
    return _out(dpo_term + alpha * nll, chosen, rejected, nll_loss=nll, dpo_loss=dpo_term)


@register(
    "simpo",
    summary="SimPO: reference-free, length-normalised reward with a target margin γ",
    paper="SimPO: Simple Preference Optimization with a Reference-Free Reward",
    arxiv="2405.14734",
    reference="none",
    normalisation="mean",
    hyperparameters={
        "beta": Hyper(2.0, 0.0, None, low_open=True, help="β (SimPO's β is 20–100× DPO's)"),
        "gamma_beta_ratio": Hyper(0.5, 0.0, None, help="γ/β: the target reward margin divided by β"),
        "label_smoothing": Hyper(0.0, 0.0, 0.5, high_open=True, help="ε as in cDPO"),
        "sft_weight": Hyper(0.0, 0.0, None, help="weight of an extra chosen NLL term"),
    },
)
def simpo(
    policy: PolicyStats,
    ref: RefStats | None = None,
    beta: float = 2.0,
    gamma_beta_ratio: float = 0.5,
    label_smoothing: float = 0.0,
    sft_weight: float = 0.0,
) -> LossOutput:
    """SimPO (Meng et al. 2024, arXiv 2405.14734, Eq. 6).

    L = −(1−ε)·log σ(β·[ℓ̄_w − ℓ̄_l − γ/β]) − ε·log σ(−β·[…]) + sft_weight·NLL(y_w),
    ℓ̄ = length-averaged log-probs. Normalisation: mean. Shapes: (B, 2) → (B,).
    """
    avg = policy.avg_logps
    chosen, rejected = beta * avg[:, 0], beta * avg[:, 1]
    logits = beta * (avg[:, 0] - avg[:, 1] - gamma_beta_ratio)
    losses = -(1 - label_smoothing) * logsigmoid(logits) - label_smoothing * logsigmoid(-logits)
    if sft_weight:
        losses = losses + sft_weight * policy.nll[:, 0]
    return _out(losses, chosen, rejected)


@register(
    "orpo",
    summary="ORPO: chosen NLL + λ·odds-ratio log-sigmoid, reference-free",
    paper="ORPO: Monolithic Preference Optimization without Reference Model (Eqs. 4–7)",
    arxiv="2403.07691",
    reference="none",
    normalisation="mean",
    hyperparameters={"beta": Hyper(0.1, 0.0, None, low_open=True, help="λ: weight of the odds-ratio term")},
)
def orpo(policy: PolicyStats, ref: RefStats | None = None, beta: float = 0.1) -> LossOutput:
    """ORPO (Hong et al. 2024, arXiv 2403.07691, Eqs. 4–7).

    log odds(y) = ℓ̄(y) − log(1 − exp ℓ̄(y)); L_OR = −log σ(log odds(y_w) − log odds(y_l));
    L = NLL(y_w) + λ·L_OR with λ = ``beta``. Normalisation: mean. Shapes: (B, 2) → (B,).
    """
    avg = policy.avg_logps
    # ℓ̄ is ≤ 0 by construction; clamp keeps log1mexp finite when a response has probability ~1.
    avg_c = avg.clamp(max=-1e-6)
    log_odds = (avg_c[:, 0] - log1mexp(avg_c[:, 0])) - (avg_c[:, 1] - log1mexp(avg_c[:, 1]))
    or_loss = -logsigmoid(log_odds)
    nll = policy.nll[:, 0]
    losses = nll + beta * or_loss
    return _out(losses, beta * avg[:, 0], beta * avg[:, 1], nll_loss=nll, or_loss=or_loss, log_odds_ratio=log_odds)
