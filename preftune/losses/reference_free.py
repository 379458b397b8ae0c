"""Reference-free pairwise objectives (LOSSES.md part B): CPO, SLiC-HF, ASFT, TPO.

SimPO and ORPO (also part B) live in ``pairwise.py``. None of these objectives reads a reference model;
``ref`` is accepted and ignored so that every objective has the same signature.
"""

from __future__ import annotations

import torch
from torch import Tensor

from preftune.losses.base import LossOutput, PolicyStats, RefStats
from preftune.losses.functional import log1mexp, logsigmoid, loss_output
from preftune.losses.registry import TRIPLE_COLUMNS, Hyper, register

BETA = Hyper(0.1, 0.0, None, low_open=True, help="inverse temperature β of the reference-free reward β·ℓ_θ")


def _smoothed_sigmoid(logits: Tensor, eps: float) -> Tensor:
    return -(1 - eps) * logsigmoid(logits) - eps * logsigmoid(-logits)


@register(
    "cpo",
    summary="CPO: reference-free sigmoid on summed log-probs + α·NLL of the chosen response",
    paper="Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance in Machine "
    "Translation (Eq. 3)",
    arxiv="2401.08417",
    reference="none",
    hyperparameters={
        "beta": BETA,
        "cpo_alpha": Hyper(1.0, 0.0, None, help="α_BC: weight of the chosen NLL (behaviour-cloning) term"),
        "label_smoothing": Hyper(0.0, 0.0, 0.5, high_open=True, help="ε as in cDPO"),
    },
    notes="NLL is the per-sequence token mean; TRL's CPOTrainer uses a batch token-mean cross-entropy "
    "over all chosen tokens (equal when chosen lengths are equal) and adds it after the batch mean.",
)
def cpo(
    policy: PolicyStats,
    ref: RefStats | None = None,
    beta: float = 0.1,
    cpo_alpha: float = 1.0,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """CPO (Xu et al., arXiv 2401.08417, Eq. 3; TRL ``CPOTrainer.cpo_loss``, loss_type 'sigmoid').

    L = −(1−ε)·log σ(β·(ℓ_θ(y_w) − ℓ_θ(y_l))) − ε·log σ(−β·(…)) + α_BC·NLL(y_w),
    ℓ = summed log-probs, NLL(y_w) = −ℓ_θ(y_w)/|y_w|. Normalisation: sum (contrast), mean (NLL).
    Shapes: (B, 2) → (B,).
    """
    chosen, rejected = beta * policy.logps[:, 0], beta * policy.logps[:, 1]
    pref = _smoothed_sigmoid(chosen - rejected, label_smoothing)
    nll = policy.nll[:, 0]
    return loss_output(pref + cpo_alpha * nll, chosen, rejected, nll_loss=nll, pref_loss=pref)


@register(
    "slic_hf",
    summary="SLiC-HF: rank-calibration hinge on summed log-probs + λ·NLL of the chosen response",
    paper="SLiC-HF: Sequence Likelihood Calibration with Human Feedback",
    arxiv="2305.10425",
    reference="none",
    hyperparameters={
        "delta": Hyper(1.0, 0.0, None, help="δ: calibration margin on ℓ_θ(y_w) − ℓ_θ(y_l)"),
        "lambda_reg": Hyper(0.1, 0.0, None, help="λ: weight of the −ℓ_θ(regularisation target) term"),
    },
    notes="Regularisation target = the chosen response (HALOs); the paper uses an SFT target. "
    "Both terms use summed log-probs (HALOs names δ 'beta').",
)
def slic_hf(
    policy: PolicyStats, ref: RefStats | None = None, delta: float = 1.0, lambda_reg: float = 0.1
) -> LossOutput:
    """SLiC-HF (Zhao et al., arXiv 2305.10425; ContextualAI/HALOs SLiCTrainer).

    L = max(0, δ − ℓ_θ(y_w) + ℓ_θ(y_l)) − λ·ℓ_θ(y_w), ℓ = summed log-probs (regularisation target =
    chosen). Normalisation: sum. Shapes: (B, 2) → (B,).
    """
    lw, ll = policy.logps[:, 0], policy.logps[:, 1]
    cal = torch.relu(delta - lw + ll)
    reg = -lw
    return loss_output(cal + lambda_reg * reg, lw, ll, cal_loss=cal, reg_loss=reg)


@register(
    "asft",
    summary="ASFT (Aligned SFT): chosen NLL + λ·[−log P̄(y_w) − log(1 − P̄(y_l))], no Bradley–Terry",
    paper="ASFT: Aligned Supervised Fine-Tuning through Absolute Likelihood",
    arxiv="2409.10571",
    reference="none",
    normalisation="mean",
    hyperparameters={
        "beta": Hyper(0.1, 0.0, None, help="λ: weight of the absolute-likelihood alignment term")
    },
    notes="[UNVERIFIED form] f_θ = log-odds of the length-normalised probability P̄ = exp(ℓ̄) (as ORPO), so "
    "σ(f_θ) = P̄ and L_align = −ℓ̄(y_w) − log(1 − exp ℓ̄(y_l)); λ default 0.1 mirrors ORPO.",
)
def asft(policy: PolicyStats, ref: RefStats | None = None, beta: float = 0.1) -> LossOutput:
    """ASFT (Wang et al., arXiv 2409.10571), with the [UNVERIFIED] f_θ = ORPO log-odds.

    L_align = −log σ(f(y_w)) − log σ(−f(y_l)) = −ℓ̄_θ(y_w) − log1mexp(ℓ̄_θ(y_l));
    L = NLL(y_w) + λ·L_align, λ = ``beta``. ℓ̄ = length-averaged log-probs. Normalisation: mean.
    Shapes: (B, 2) → (B,).
    """
    avg = policy.avg_logps
    # ℓ̄ ≤ 0 by construction; the clamp keeps log1mexp finite when P̄(y_l) ≈ 1.
    align = -avg[:, 0] - log1mexp(avg[:, 1].clamp(max=-1e-6))
    nll = policy.nll[:, 0]
    return loss_output(nll + beta * align, beta * avg[:, 0], beta * avg[:, 1], nll_loss=nll, align_loss=align)


TPO_PAPER = "Triple Preference Optimization: Achieving Better Alignment using a Single Step Optimization"
TPO_NOTES = (
    "Data: triples as a K = 3 grid, columns (chosen, rejected, gold); shape 'listwise' with "
    "min_responses = 3 (the data layer maps TRL's prompt/chosen/rejected/reference onto it, or from "
    "a scored 4-response set: gold = best, chosen = second, rejected = worst). NLL(gold) is the "
    "per-sequence token mean; TRL uses the batch token mean over gold tokens."
)


def _require_triple(policy: PolicyStats, name: str) -> None:
    if policy.num_responses != 3:
        raise ValueError(
            f"objective '{name}' needs triples (K=3 responses: {', '.join(TRIPLE_COLUMNS)}), "
            f"got K={policy.num_responses}"
        )


@register(
    "tpo",
    columns=TRIPLE_COLUMNS,
    summary="TPO: reference-free sigmoid on chosen vs rejected + α·NLL of a gold response",
    paper=TPO_PAPER,
    arxiv="2405.16681",
    shape="listwise",
    reference="none",
    min_responses=3,
    hyperparameters={
        "beta": Hyper(0.1, 0.0, None, low_open=True, help="β of the contrast (paper 0.1; TRL default 0.01)"),
        "alpha": Hyper(1.0, 0.0, None, help="α: weight of the gold-response NLL"),
        "label_smoothing": Hyper(0.0, 0.0, 0.5, high_open=True, help="ε as in cDPO"),
    },
    notes=TPO_NOTES,
)
def tpo(
    policy: PolicyStats,
    ref: RefStats | None = None,
    beta: float = 0.1,
    alpha: float = 1.0,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """TPO (Saeidi et al., arXiv 2405.16681; sahsaeedi/triple-preference-optimization ``tpo_loss``).

    Columns: 0 chosen y_w, 1 rejected y_l, 2 gold y_gold. L = −log σ(β·(ℓ_θ(y_w) − ℓ_θ(y_l))) +
    α·NLL(y_gold), ℓ = summed log-probs, NLL = token mean. Normalisation: sum (contrast), mean (NLL).
    Shapes: (B, 3) → (B,).
    """
    _require_triple(policy, "tpo")
    chosen, rejected = beta * policy.logps[:, 0], beta * policy.logps[:, 1]
    pref = _smoothed_sigmoid(chosen - rejected, label_smoothing)
    nll = policy.nll[:, 2]
    return loss_output(pref + alpha * nll, chosen, rejected, nll_loss=nll, pref_loss=pref)


@register(
    "tpo_l",
    columns=TRIPLE_COLUMNS,
    summary="TPO-L: length-normalised TPO with a target margin γ (SimPO-style contrast + gold NLL)",
    paper=TPO_PAPER,
    arxiv="2405.16681",
    shape="listwise",
    reference="none",
    normalisation="mean",
    min_responses=3,
    hyperparameters={
        "beta": Hyper(0.1, 0.0, None, low_open=True, help="β of the length-normalised contrast"),
        "gamma": Hyper(0.5, 0.0, None, help="γ: target reward margin (TRL tpo_l_gamma)"),
        "alpha": Hyper(1.0, 0.0, None, help="α: weight of the gold-response NLL"),
        "label_smoothing": Hyper(0.0, 0.0, 0.5, high_open=True, help="ε as in cDPO"),
    },
    notes=TPO_NOTES,
)
def tpo_l(
    policy: PolicyStats,
    ref: RefStats | None = None,
    beta: float = 0.1,
    gamma: float = 0.5,
    alpha: float = 1.0,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """TPO-L (arXiv 2405.16681; TRL ``TPOTrainer`` loss_type 'tpo-l').

    L = −log σ(β·(ℓ̄_θ(y_w) − ℓ̄_θ(y_l)) − γ) + α·NLL(y_gold), ℓ̄ = length-averaged log-probs.
    Normalisation: mean. Shapes: (B, 3) → (B,).
    """
    _require_triple(policy, "tpo_l")
    avg = policy.avg_logps
    chosen, rejected = beta * avg[:, 0], beta * avg[:, 1]
    pref = _smoothed_sigmoid(chosen - rejected - gamma, label_smoothing)
    nll = policy.nll[:, 2]
    return loss_output(pref + alpha * nll, chosen, rejected, nll_loss=nll, pref_loss=pref)
