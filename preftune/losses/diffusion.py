"""Diffusion-model preference objectives (LOSSES.md part H): Diffusion-DPO (also Tango 2) and SmPO-Diffusion.

Both are functions of per-sample denoising errors e = MSE(ε_pred − ε_target) (mean over latent
elements) of the trained and the frozen reference denoiser, for the winner and loser of a pair that
share the same t and the same noise. The plain functions take those errors directly.

The registered entries ``diffusion_dpo`` and ``smpo_diffusion`` put them in the loss contract with
``policy.logps`` = −[e_θ^w, e_θ^l] and ``ref.logps`` = −[e_ref^w, e_ref^l] (B, 2): the negative error
plays the log-likelihood's role (it is the ELBO surrogate up to the folded weighting constant), so
Diffusion-DPO is DPO with β/2 on those slots. A text-model trainer must not offer them
(``trains="diffusion"``: ``names(trains="diffusion")`` lists them); a diffusion trainer fills the slots with −MSEs.
"""

from __future__ import annotations

from torch import Tensor

from preftune.losses.base import LossOutput, PolicyStats, RefStats
from preftune.losses.functional import logsigmoid, loss_output, require_pairs, require_ref
from preftune.losses.registry import Hyper, register

DIFF_NOTE = (
    "[diffusion objective] policy.logps = −[MSE_θ(w), MSE_θ(l)] and ref.logps = −[MSE_ref(w), MSE_ref(l)] "
    "(per-sample mean denoising errors, same t and noise for both members of a pair); not for text models."
)
PICKSCORE_MIN = 0.11543526500463486  # Pick-a-Pic v2 normalisers in SmPO's script
PICKSCORE_MAX = 0.28201571106910706


def _inside(mse_w_theta: Tensor, mse_w_ref: Tensor, mse_l_theta: Tensor, mse_l_ref: Tensor) -> Tensor:
    return (mse_w_theta - mse_l_theta) - (mse_w_ref - mse_l_ref)


def diffusion_dpo(
    mse_w_theta: Tensor, mse_w_ref: Tensor, mse_l_theta: Tensor, mse_l_ref: Tensor, beta: float = 5000.0
) -> Tensor:
    """Diffusion-DPO (Wallace et al. 2024, arXiv 2311.12908, Eq. 14; DiffusionDPO ``train.py``; Tango 2).

    L = −log σ( −(β/2)·[(e_θ^w − e_θ^l) − (e_ref^w − e_ref^l)] ), e = per-sample MSE (mean over latent
    elements). The paper's T·ω(λ_t) is folded into β, and the ½ is the reference code's. Shapes: (B,) → (B,).
    """
    return -logsigmoid(-0.5 * beta * _inside(mse_w_theta, mse_w_ref, mse_l_theta, mse_l_ref))


def smpo_soft_label(
    score_w: Tensor, score_l: Tensor, score_min: float = PICKSCORE_MIN, score_max: float = PICKSCORE_MAX
) -> Tensor:
    """SmPO smoothed preference p = exp(ŝ_w)/(exp(ŝ_w) + exp(ŝ_l)) = σ(ŝ_w − ŝ_l), ŝ = (s − min)/(max − min).

    ``w`` must be the higher-scored image (p ∈ [½, e/(1+e)] for in-range scores). Shapes broadcast.
    """
    span = score_max - score_min
    return ((score_w - score_l) / span).sigmoid()


def smpo_diffusion(
    mse_w_theta: Tensor,
    mse_w_ref: Tensor,
    mse_l_theta: Tensor,
    mse_l_ref: Tensor,
    pref_prob: Tensor,
    beta: float = 2000.0,
    scale: float = 10.0,
) -> Tensor:
    """SmPO-Diffusion (Lu et al. 2025, arXiv 2506.02698; JaydenLyh/SmPO ``train.py``, train_method "smpo").

    L = −log σ( −(β/2)·(2p − 1)·scale·[(e_θ^w − e_θ^l) − (e_ref^w − e_ref^l)] ), p = ``pref_prob``
    (``smpo_soft_label``), errors measured against the ReNoise-inverted noise ε̃ (computed by the caller).
    Choice [UNVERIFIED]: ``scale`` = 10 is hard-coded in the released script; the paper's equation may carry
    only β·(2p − 1) — set ``scale=1`` for that. Shapes: (B,) → (B,).
    """
    w = (2 * pref_prob - 1) * scale
    return -logsigmoid(-0.5 * beta * w * _inside(mse_w_theta, mse_w_ref, mse_l_theta, mse_l_ref))


def _errors(policy: PolicyStats, ref: RefStats | None, name: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    require_pairs(policy, name)
    ref = require_ref(ref, name)
    e_t, e_r = -policy.logps, -ref.logps.to(policy.logps.dtype)
    return e_t[:, 0], e_r[:, 0], e_t[:, 1], e_r[:, 1]


@register(
    "diffusion_dpo",
    summary="Diffusion-DPO / Tango 2: DPO on denoising errors of trained vs frozen denoiser",
    paper="Diffusion Model Alignment Using Direct Preference Optimization (Eq. 14)",
    arxiv="2311.12908",
    trains="diffusion",
    normalisation="mean",
    hyperparameters={
        "beta": Hyper(5000.0, 0.0, None, low_open=True, help="β_dpo (SD1.5/SDXL 5000; Tango 2 2000)")
    },
    notes=DIFF_NOTE,
)
def _diffusion_dpo_objective(policy: PolicyStats, ref: RefStats, beta: float = 5000.0) -> LossOutput:
    """Registered Diffusion-DPO: ``diffusion_dpo`` on errors read from the −MSE slots. (B, 2) → (B,).

    Logged rewards: (β/2)·(e_ref − e_θ) per image (the implicit reward of the ELBO surrogate).
    Normalisation: mean (MSE over latent elements).
    """
    ewt, ewr, elt, elr = _errors(policy, ref, "diffusion_dpo")
    return loss_output(diffusion_dpo(ewt, ewr, elt, elr, beta), 0.5 * beta * (ewr - ewt), 0.5 * beta * (elr - elt))


@register(
    "smpo_diffusion",
    summary="SmPO-Diffusion: Diffusion-DPO scaled per pair by a smoothed preference (2p − 1)",
    paper="Smoothed Preference Optimization via ReNoise Inversion for Aligning Diffusion Models with Varied "
    "Human Preferences",
    arxiv="2506.02698",
    trains="diffusion",
    normalisation="mean",
    hyperparameters={
        "beta": Hyper(2000.0, 0.0, None, low_open=True, help="β (SD1.5 2000)"),
        "scale": Hyper(
            10.0, 0.0, None, low_open=True, help="constant of the released script [UNVERIFIED in paper]"
        ),
    },
    inputs=("pref_prob",),
    notes=DIFF_NOTE
    + " inputs['pref_prob'] (B,): smoothed preference p from smpo_soft_label(); the errors are "
    "against ReNoise-inverted noise.",
)
def _smpo_diffusion_objective(
    policy: PolicyStats, ref: RefStats, beta: float = 2000.0, scale: float = 10.0
) -> LossOutput:
    """Registered SmPO-Diffusion on the −MSE slots with ``inputs['pref_prob']`` (B,). (B, 2) → (B,)."""
    ewt, ewr, elt, elr = _errors(policy, ref, "smpo_diffusion")
    p = policy.inputs["pref_prob"].to(ewt.dtype).reshape(-1)
    losses = smpo_diffusion(ewt, ewr, elt, elr, p, beta, scale)
    return loss_output(losses, 0.5 * beta * (ewr - ewt), 0.5 * beta * (elr - elt))
