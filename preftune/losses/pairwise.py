"""Pairwise sequence-level objectives (LOSSES.md parts A and B): the DPO family and its
reference-free relatives. Inputs are (B, 2) statistics, column 0 chosen, column 1 rejected."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from preftune.losses.base import LossOutput, PolicyStats, RefStats
from preftune.losses.functional import log1mexp, logsigmoid, loss_output, pair_margin
from preftune.losses.registry import Hyper, register

BETA = Hyper(
    0.1, 0.0, None, low_open=True, help="inverse temperature β of the implicit reward β·log(π/π_ref)"
)
EPS = Hyper(0.1, 0.0, 0.5, high_open=True, help="assumed label-flip probability ε")

DPO_PAPER = "Direct Preference Optimization: Your Language Model is Secretly a Reward Model"


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
    return loss_output(-logsigmoid(logits), chosen, rejected)


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
    return loss_output(losses, chosen, rejected)


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
    return loss_output(losses, chosen, rejected)


def _ipo(policy: PolicyStats, ref: RefStats, beta: float, normalise: bool) -> LossOutput:
    rho = policy.logps - ref.logps  # (B, 2)
    if normalise:
        rho = rho / policy.lengths.clamp(min=1)
    delta = rho[:, 0] - rho[:, 1]
    losses = (delta - 1.0 / (2.0 * beta)) ** 2
    return loss_output(losses, beta * rho[:, 0], beta * rho[:, 1])


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
    return loss_output(torch.relu(1 - logits), chosen, rejected)


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
    return loss_output(dpo_term + alpha * nll, chosen, rejected, nll_loss=nll, dpo_loss=dpo_term)


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
    return loss_output(losses, chosen, rejected)


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
    return loss_output(
        losses, beta * avg[:, 0], beta * avg[:, 1], nll_loss=nll, or_loss=or_loss, log_odds_ratio=log_odds
    )


# ---------------------------------------------------------------------------------------------------
# Part A, continued: DPO relatives with other links, scores, anchors, weights or state.
# ---------------------------------------------------------------------------------------------------


def _clamp_exp_max(dtype: torch.dtype) -> float:
    # exp(x) must stay representable after the cast back to the working dtype (TRL's limits).
    return 11.0 if dtype == torch.float16 else 80.0


def _all_reduce_sum(t: Tensor) -> Tensor:
    """Sum a tensor over ranks when torch.distributed is initialised (in place on a copy)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


@register(
    "rpo_liu2024",
    summary="RPO (Liu et al. 2024): DPO + η·β·SFT on the chosen response as an adversarial regulariser",
    paper="Provably Mitigating Overoptimization in RLHF: Your SFT Loss is Implicitly an Adversarial "
    "Regularizer (Algorithm 2)",
    arxiv="2405.16436",
    hyperparameters={
        "beta": BETA,
        "eta": Hyper(
            1.0, 0.0, None, help="η: weight of the SFT term, which is multiplied by β as in the paper"
        ),
        "sft_normalisation": Hyper(
            "mean",
            choices=("mean", "sum"),
            help="SFT term on the token-mean NLL (default) or the summed log-prob",
        ),
    },
    notes="[UNVERIFIED constants] The SFT coefficient is η·β (the paper's objective carries β because "
    "the penalty is on the implicit reward β·log π); the SFT log-likelihood is the per-sequence token "
    "mean by default so that η does not scale with |y| (set sft_normalisation='sum' for the summed form).",
)
def rpo_liu2024(
    policy: PolicyStats,
    ref: RefStats,
    beta: float = 0.1,
    eta: float = 1.0,
    sft_normalisation: str = "mean",
) -> LossOutput:
    """RPO of Liu et al. (arXiv 2405.16436, Algorithm 2): DPO plus an SFT term on a baseline response.

    L = −log σ(βΔ) + η·β·S(y_w),  S = NLL(y_w) = −ℓ_θ(y_w)/|y_w| (``sft_normalisation='mean'``) or
    S = −ℓ_θ(y_w) (``'sum'``). The baseline distribution is the chosen response (the paper's practical
    choice). [UNVERIFIED] pieces made explicit: the β factor (kept, as in the paper's derivation) and
    the normalisation of the SFT term (token mean by default; TRL/Pang-style CE). Δ uses sums.
    Shapes: (B, 2) → (B,).
    """
    chosen, rejected, logits = pair_margin(policy, ref, beta)
    sft = policy.nll[:, 0] if sft_normalisation == "mean" else -policy.logps[:, 0]
    dpo_term = -logsigmoid(logits)
    return loss_output(dpo_term + eta * beta * sft, chosen, rejected, sft_loss=sft, dpo_loss=dpo_term)


# --- f-DPO -----------------------------------------------------------------------------------------

FDPO_PAPER = (
    "Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse Divergence Constraints"
)


def _fdpo(policy: PolicyStats, ref: RefStats, beta: float, score) -> LossOutput:
    rho = policy.logps - ref.logps  # (B, 2)
    psi = score(rho)  # (B, 2)
    logits = beta * (psi[:, 0] - psi[:, 1])
    return loss_output(-logsigmoid(logits), beta * rho[:, 0], beta * rho[:, 1], score_margin=psi[:, 0] - psi[:, 1])


def _neg_exp_clamped(x: Tensor) -> Tensor:
    """exp(x) with the exponent clamped from above (no overflow; zero gradient beyond the clamp)."""
    return torch.exp(x.clamp(max=_clamp_exp_max(x.dtype)))


@register(
    "fdpo_forward_kl",
    summary="f-DPO with the forward-KL constraint: score ψ(ρ) = −exp(−ρ)",
    paper=FDPO_PAPER,
    arxiv="2309.16240",
    hyperparameters={"beta": BETA},
    notes="TRL uses 1 − exp(−ρ) (same loss: additive constants cancel in the margin). The exponent is "
    "clamped at 80 (11 in fp16) like TRL's α-divergence branch; TRL's forward-KL branch does not clamp.",
)
def fdpo_forward_kl(policy: PolicyStats, ref: RefStats, beta: float = 0.1) -> LossOutput:
    """f-DPO, forward KL (Wang et al., arXiv 2309.16240, Thm. 1 with f(u) = −log u).

    L = −log σ(β·[ψ(ρ_w) − ψ(ρ_l)]),  ψ(ρ) = f'(e^ρ) = −exp(−ρ); −ρ is clamped at 80 (11 in fp16).
    ρ uses sequence sums. Normalisation: sum. Shapes: (B, 2) → (B,).
    """
    return _fdpo(policy, ref, beta, lambda rho: -_neg_exp_clamped(-rho))


@register(
    "fdpo_js",
    summary="f-DPO with the Jensen–Shannon constraint: score ψ(ρ) = log σ(ρ)",
    paper=FDPO_PAPER,
    arxiv="2309.16240",
    hyperparameters={"beta": BETA},
    notes="TRL adds log 2 to the score (cancels in the margin).",
)
def fdpo_js(policy: PolicyStats, ref: RefStats, beta: float = 0.1) -> LossOutput:
    """f-DPO, Jensen–Shannon (arXiv 2309.16240): f'(u) = log(2u/(1+u)) ⇒ ψ(ρ) = log σ(ρ) (+ log 2).

    L = −log σ(β·[log σ(ρ_w) − log σ(ρ_l)]). Normalisation: sum. Shapes: (B, 2) → (B,).
    """
    return _fdpo(policy, ref, beta, logsigmoid)


@register(
    "fdpo_alpha",
    summary="f-DPO with the α-divergence constraint (paper α: α→0 is DPO, α=1 forward KL)",
    paper=FDPO_PAPER,
    arxiv="2309.16240",
    hyperparameters={
        "beta": BETA,
        "alpha": Hyper(0.5, 0.0, 1.0, help="α of the α-divergence (paper parametrisation); 0 gives DPO"),
    },
    notes="Paper/TRL v0.19 parametrisation. TRL HEAD's f_alpha_divergence_coef is a = 1 − α "
    "(a → 1 is reverse KL); the two agree only at 0.5.",
)
def fdpo_alpha(policy: PolicyStats, ref: RefStats, beta: float = 0.1, alpha: float = 0.5) -> LossOutput:
    """f-DPO, α-divergence (arXiv 2309.16240), α ∈ [0, 1] in the paper's parametrisation.

    f'(u) = (1 − u^{−α})/α ⇒ ψ(ρ) = (1 − exp(−αρ))/α; the exponent −αρ is clamped at 80 (11 in fp16),
    as TRL does. α = 0 is the reverse-KL limit ψ(ρ) = ρ (exactly DPO); α = 1 is forward KL.
    TRL HEAD calls a = 1 − α its coefficient. Normalisation: sum. Shapes: (B, 2) → (B,).
    """
    if alpha < 1e-6:
        return _fdpo(policy, ref, beta, lambda rho: rho)
    return _fdpo(policy, ref, beta, lambda rho: (1.0 - _neg_exp_clamped(-alpha * rho)) / alpha)


# --- EXO, NCA, BCO, APO ----------------------------------------------------------------------------


@register(
    "exo_pair",
    summary="EXO (pairwise): reverse KL between softmax(βρ) over the pair and the target (1−ε, ε)",
    paper="Towards Efficient Exact Optimization of Language Model Alignment (Eq. 16)",
    arxiv="2402.00856",
    hyperparameters={
        "beta": BETA,
        "label_smoothing": Hyper(
            1e-3, 0.0, 0.5, low_open=True, high_open=True, help="ε > 0: target loser mass"
        ),
    },
    notes="TRL form (normalised target). The official code uses unnormalised log-targets (0, −10).",
)
def exo_pair(
    policy: PolicyStats, ref: RefStats, beta: float = 0.1, label_smoothing: float = 1e-3
) -> LossOutput:
    """EXO-pref with K = 2 (Ji et al., arXiv 2402.00856, Eq. 16).

    z = βΔ; L = σ(z)·[log σ(z) − log(1−ε)] + σ(−z)·[log σ(−z) − log ε], ε = ``label_smoothing`` > 0.
    Gradient flows through both σ weights. Normalisation: sum. Shapes: (B, 2) → (B,).
    """
    chosen, rejected, z = pair_margin(policy, ref, beta)
    eps = label_smoothing
    losses = torch.sigmoid(z) * (logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (
        logsigmoid(-z) - math.log(eps)
    )
    return loss_output(losses, chosen, rejected)


@register(
    "nca_pair",
    summary="NCA (pairwise): binary NCE on each implicit reward, keeps the chosen likelihood up",
    paper="Noise Contrastive Alignment of Language Models with Explicit Rewards",
    arxiv="2402.05369",
    hyperparameters={"beta": BETA},
)
def nca_pair(policy: PolicyStats, ref: RefStats, beta: float = 0.1) -> LossOutput:
    """NCA, pairwise (Chen et al., arXiv 2402.05369).

    r = βρ; L = −log σ(r_w) − ½·log σ(−r_w) − ½·log σ(−r_l). Normalisation: sum. (B, 2) → (B,).
    """
    chosen, rejected, _ = pair_margin(policy, ref, beta)
    losses = -logsigmoid(chosen) - 0.5 * logsigmoid(-chosen) - 0.5 * logsigmoid(-rejected)
    return loss_output(losses, chosen, rejected)


class RunningMean:
    """BCO's reward shift δ: the cumulative (count-weighted) mean of every implicit reward seen.

    ``update(rewards)`` folds a batch in (summed over ranks when torch.distributed is initialised)
    and returns the new mean; set ``training = False`` to read δ without updating (evaluation).
    The checkpoint saves ``state_dict()`` so that a resumed run continues with the same δ.
    """

    def __init__(self) -> None:
        self.mean = 0.0
        self.count = 0.0
        self.training = True

    def update(self, rewards: Tensor) -> Tensor:
        r = rewards.detach().to(torch.float64).reshape(-1)
        if self.training:
            stats = _all_reduce_sum(
                torch.stack([r.sum(), torch.tensor(float(r.numel()), dtype=torch.float64)])
            )
            total, n = float(stats[0]), float(stats[1])
            if n > 0:
                new_count = self.count + n
                self.mean = self.mean + (total - n * self.mean) / new_count
                self.count = new_count
        return torch.tensor(self.mean, dtype=rewards.dtype, device=rewards.device)

    def state_dict(self) -> dict:
        return {"mean": self.mean, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean = float(state["mean"])
        self.count = float(state["count"])


@register(
    "bco_pair",
    summary="BCO (pairwise): binary classifier on implicit rewards shifted by their running mean δ",
    paper="Binary Classifier Optimization for Large Language Model Alignment",
    arxiv="2404.04656",
    hyperparameters={"beta": BETA},
    state=RunningMean,
    notes="δ is the cumulative count-weighted mean of all chosen and rejected rewards, updated with the "
    "batch before the loss (TRL v0.19). TRL HEAD's DPO 'bco_pair' drops δ (δ = 0). Without a state "
    "object (state=None) δ = 0.",
)
def bco_pair(
    policy: PolicyStats, ref: RefStats, beta: float = 0.1, state: RunningMean | None = None
) -> LossOutput:
    """BCO, paired form (Jung et al., arXiv 2404.04656).

    r = βρ; δ = running mean of all r seen so far (this batch included, detached, over all ranks);
    L = −log σ(r_w − δ) − log σ(−(r_l − δ)). ``state=None`` ⇒ δ = 0 (stateless evaluation).
    Normalisation: sum. Shapes: (B, 2) → (B,).
    """
    chosen, rejected, _ = pair_margin(policy, ref, beta)
    if state is None:
        delta = torch.zeros((), dtype=chosen.dtype, device=chosen.device)
    else:
        delta = state.update(torch.cat([chosen, rejected]))
    losses = -logsigmoid(chosen - delta) - logsigmoid(-(rejected - delta))
    return loss_output(losses, chosen, rejected, delta=delta)


APO_PAPER = (
    "Anchored Preference Optimization and Contrastive Revisions: Addressing Underspecification in Alignment"
)


@register(
    "apo_zero",
    summary="APO-zero: raise the chosen and lower the rejected likelihood (chosen better than the model)",
    paper=APO_PAPER + " (Eq. 7)",
    arxiv="2408.06266",
    hyperparameters={"beta": BETA},
)
def apo_zero(policy: PolicyStats, ref: RefStats, beta: float = 0.1) -> LossOutput:
    """APO-zero (D'Oosterlinck et al., arXiv 2408.06266, Eq. 7).

    L = [1 − σ(βρ_w)] + σ(βρ_l). Normalisation: sum. Shapes: (B, 2) → (B,).
    """
    chosen, rejected, _ = pair_margin(policy, ref, beta)
    return loss_output(1 - torch.sigmoid(chosen) + torch.sigmoid(rejected), chosen, rejected)


@register(
    "apo_down",
    summary="APO-down: lower both likelihoods, the rejected more (chosen worse than the model)",
    paper=APO_PAPER + " (Eq. 8)",
    arxiv="2408.06266",
    hyperparameters={"beta": BETA},
)
def apo_down(policy: PolicyStats, ref: RefStats, beta: float = 0.1) -> LossOutput:
    """APO-down (arXiv 2408.06266, Eq. 8).

    L = σ(βρ_w) + [1 − σ(βΔ)]. Normalisation: sum. Shapes: (B, 2) → (B,).
    """
    chosen, rejected, logits = pair_margin(policy, ref, beta)
    return loss_output(torch.sigmoid(chosen) + 1 - torch.sigmoid(logits), chosen, rejected)


# --- β-DPO ----------------------------------------------------------------------------------------


class BetaDPOState:
    """β-DPO's EMA statistics of the gap M = sg[Δ] and the seeded sampler used for filtering.

    ``gamma`` is the EMA factor (0.9 in the paper's code); ``seed`` seeds the torch.Generator that
    draws the kept pairs, so runs are reproducible and resumable (the generator state is saved).
    ``training = False`` reads the statistics without updating them.
    """

    def __init__(self, gamma: float = 0.9, seed: int = 0) -> None:
        self.gamma = gamma
        self.m0 = 0.0
        self.sigma = 0.0
        self.steps = 0
        self.training = True
        self.generator = torch.Generator().manual_seed(seed)

    def update(self, gap: Tensor) -> None:
        """Fold one (global) micro-batch of gaps into the EMAs (both start at 0, as in the paper's code)."""
        if not self.training:
            return
        g = gap.detach().to(torch.float64)
        mean = float(g.mean())
        std = float(g.std()) if g.numel() > 1 else 0.0
        self.m0 = self.gamma * self.m0 + (1 - self.gamma) * mean
        self.sigma = self.gamma * self.sigma + (1 - self.gamma) * std
        self.steps += 1

    def state_dict(self) -> dict:
        return {
            "gamma": self.gamma,
            "m0": self.m0,
            "sigma": self.sigma,
            "steps": self.steps,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.gamma = float(state["gamma"])
        self.m0 = float(state["m0"])
        self.sigma = float(state["sigma"])
        self.steps = int(state["steps"])
        self.generator.set_state(state["generator"])


def _all_gather_flat(t: Tensor) -> tuple[Tensor, int]:
    """Concatenate a 1-d tensor over ranks (equal sizes); returns it and this rank's offset."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return t, 0
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts), dist.get_rank() * t.numel()


@register(
    "beta_dpo",
    summary="β-DPO: batch-adaptive β from the gap statistics, with β-guided filtering of outlier pairs",
    paper="β-DPO: Direct Preference Optimization with Dynamic β",
    arxiv="2407.08639",
    hyperparameters={
        "beta": Hyper(0.1, 0.0, None, low_open=True, help="β0, the base β"),
        "a": Hyper(0.6, 0.0, None, help="sensitivity of β to the selected pairs' mean gap (0: fixed β)"),
        "filter_ratio": Hyper(0.2, 0.0, 1.0, high_open=True, help="ρ: fraction of pairs dropped per batch"),
    },
    state=BetaDPOState,
    notes="Statistics and filtering are per micro-batch, gathered over ranks (the authors' code); with "
    "gradient accumulation this is not the optimiser batch. Dropped pairs get loss 0 and kept ones "
    "are scaled by N/n_kept so the trainer's mean over examples is the mean over kept pairs (global). "
    "state=None ⇒ plain DPO with β0 (stateless evaluation).",
)
def beta_dpo(
    policy: PolicyStats,
    ref: RefStats,
    beta: float = 0.1,
    a: float = 0.6,
    filter_ratio: float = 0.2,
    state: BetaDPOState | None = None,
) -> LossOutput:
    """β-DPO (Wu et al., arXiv 2407.08639; junkangwu/beta-DPO ``preference_loss``).

    M = sg[Δ] over the global micro-batch (all ranks). EMA update first:
    M0 ← γM0 + (1−γ)·mean(M), σ_M ← γσ_M + (1−γ)·std(M). Keep n = ⌊N(1−ρ)⌋ pairs sampled without
    replacement ∝ exp(−½((M_i − M0)/σ_M)²) (the state's seeded generator; uniform when σ_M = 0 or the
    weights underflow). β_b = max(β0·(1 + a·(mean_kept M − M0)), 1e-3), detached.
    L_i = (N/n)·1[i kept]·(−log σ(β_b·Δ_i)). ``state=None`` ⇒ DPO with β0.
    Normalisation: sum. Shapes: (B, 2) → (B,).
    """
    rho = policy.logps - ref.logps  # (B, 2)
    delta = rho[:, 0] - rho[:, 1]
    chosen, rejected = beta * rho[:, 0], beta * rho[:, 1]
    if state is None:
        return loss_output(-logsigmoid(beta * delta), chosen, rejected)
    gap, offset = _all_gather_flat(delta.detach())  # (N,)
    state.update(gap)
    n_all = gap.numel()
    n_keep = max(1, int(n_all * (1 - filter_ratio)))
    g64 = gap.to(torch.float64).cpu()
    if state.sigma > 0:
        w = torch.exp(-0.5 * ((g64 - state.m0) / state.sigma) ** 2)
    else:
        w = torch.ones_like(g64)
    if not torch.isfinite(w).all() or w.sum() <= 0 or (w > 0).sum() < n_keep:
        w = torch.ones_like(g64)
    idx = torch.multinomial(w, n_keep, replacement=False, generator=state.generator)
    keep = torch.zeros(n_all, dtype=torch.bool)
    keep[idx] = True
    beta_b = max(beta * (1 + a * (float(g64[idx].mean()) - state.m0)), 1e-3)
    local_keep = keep[offset : offset + delta.numel()].to(delta.device)
    weight = local_keep.to(delta.dtype) * (n_all / n_keep)
    losses = weight * -logsigmoid(beta_b * delta)
    return loss_output(
        losses,
        chosen,
        rejected,
        beta_batch=torch.tensor(beta_b),
        kept=local_keep.to(delta.dtype),
    )


# --- MADPO ----------------------------------------------------------------------------------------


def madpo_weight(h: Tensor, w_max: float, w_min: float, scale: float) -> Tensor:
    """MADPO instance weight w(ĥ) from a frozen reward-model margin ĥ (chosen in preftune, see below).

    w(ĥ) = w_max for ĥ < 0 (capped: a negative margin may be label noise, so it is not amplified further);
           w_min + (w_max − w_min)·exp(−ĥ/scale) for ĥ ≥ 0 (hard pairs amplified, easy pairs damped).
    Continuous at 0, monotone non-increasing for ĥ ≥ 0, bounded in [w_min, w_max].
    """
    decay = w_min + (w_max - w_min) * torch.exp(-h.clamp(min=0) / scale)
    return torch.where(h < 0, torch.full_like(h, w_max), decay)


@register(
    "madpo",
    summary="MADPO: DPO re-weighted per pair by a frozen reward-model margin ĥ",
    paper="Margin Adaptive DPO: Leveraging Reward Model for Granular Control in Preference Optimization",
    arxiv="2510.05342",
    inputs=("rm_margin",),
    required_columns=("rm_margin",),
    hyperparameters={
        "beta": BETA,
        "w_max": Hyper(2.0, 1.0, None, help="weight at ĥ ≤ 0 (hardest pairs; also the cap for ĥ < 0)"),
        "w_min": Hyper(0.5, 0.0, 1.0, low_open=True, help="asymptotic weight of very easy pairs (ĥ → ∞)"),
        "margin_scale": Hyper(1.0, 0.0, None, low_open=True, help="ĥ scale of the exponential decay"),
    },
    notes="[UNVERIFIED weight function] preftune's w: w_max for ĥ < 0, w_min + (w_max − w_min)·exp(−ĥ/s) "
    "for ĥ ≥ 0 — continuous, piecewise, amplifying (w > 1) hard pairs, damping easy ones, capped for "
    "negative margins. Input rm_margin (B,) = r_φ(x, y_w) − r_φ(x, y_l).",
)
def madpo(
    policy: PolicyStats,
    ref: RefStats,
    beta: float = 0.1,
    w_max: float = 2.0,
    w_min: float = 0.5,
    margin_scale: float = 1.0,
) -> LossOutput:
    """MADPO (Rho, arXiv 2510.05342): L = −w(ĥ)·log σ(βΔ), w detached (a function of the frozen RM).

    ĥ = ``policy.inputs['rm_margin']`` (B,). w is :func:`madpo_weight` (the paper's exact piecewise
    function is [UNVERIFIED]; preftune's choice is documented there). Normalisation: sum.
    Shapes: (B, 2) + (B,) → (B,).
    """
    chosen, rejected, logits = pair_margin(policy, ref, beta)
    h = policy.inputs["rm_margin"].reshape(-1).to(logits.dtype)
    w = madpo_weight(h, w_max, w_min, margin_scale).detach()
    return loss_output(w * -logsigmoid(logits), chosen, rejected, weight=w)


# --- LD-DPO ---------------------------------------------------------------------------------------


def ld_logps(token_logps: Tensor, token_mask: Tensor, alpha: float) -> Tensor:
    """(B, 2, T) per-token log-probs → (B, 2) length-desensitised sums.

    Positions are counted over response tokens only (cumsum of the mask); the public length is
    l_p = min(|y_w|, |y_l|); tokens beyond it are scaled by α.
    """
    mask = token_mask.to(token_logps.dtype)
    pos = mask.cumsum(-1)  # (B, 2, T) 1-based position among response tokens
    lengths = mask.sum(-1)  # (B, 2)
    public = lengths.min(dim=1, keepdim=True).values.unsqueeze(-1)  # (B, 1, 1)
    shared = (pos <= public).to(mask.dtype) * mask
    tail = mask - shared
    return (token_logps * shared).sum(-1) + alpha * (token_logps * tail).sum(-1)


@register(
    "ld_dpo",
    summary="LD-DPO: DPO with the tail beyond the shorter response down-weighted by α",
    paper="Length Desensitization in Direct Preference Optimization",
    arxiv="2409.06411",
    token_level=True,
    hyperparameters={
        "beta": BETA,
        "alpha": Hyper(
            0.5, 0.0, 1.0, help="weight of tokens beyond the public length (1: DPO) [UNVERIFIED default]"
        ),
    },
    notes="Needs per-token log-probs of policy and reference (token_logps, token_mask). The decomposition "
    "is applied to both policy and reference (TRL HEAD; TRL v0.19 applied it to the policy only).",
)
def ld_dpo(policy: PolicyStats, ref: RefStats, beta: float = 0.1, alpha: float = 0.5) -> LossOutput:
    """LD-DPO (Liu et al., arXiv 2409.06411).

    l_p = min(|y_w|, |y_l|); ℓ̃(y) = Σ_{t≤l_p} lp_t(y) + α·Σ_{t>l_p} lp_t(y), for policy and reference;
    ρ̃ = ℓ̃_θ − ℓ̃_ref; L = −log σ(β·[ρ̃(y_w) − ρ̃(y_l)]). α = 1 is DPO.
    Needs ``policy.token_logps``/``token_mask`` and ``ref.token_logps`` (B, 2, T). Normalisation: sum.
    Shapes: (B, 2, T) → (B,).
    """
    if policy.token_logps is None or policy.token_mask is None or ref.token_logps is None:
        raise ValueError(
            "objective 'ld_dpo' needs per-token log-probs of policy and reference (token_logps, token_mask)"
        )
    pol = ld_logps(policy.token_logps, policy.token_mask, alpha)
    rf = ld_logps(ref.token_logps, policy.token_mask, alpha)
    rho = pol - rf  # (B, 2)
    chosen, rejected = beta * rho[:, 0], beta * rho[:, 1]
    return loss_output(-logsigmoid(chosen - rejected), chosen, rejected)


# --- Sem-DPO and ADPO -----------------------------------------------------------------------------


@register(
    "sem_dpo",
    summary="Sem-DPO: DPO weighted by exp(−α·cosine distance) between the prompt and the chosen response",
    paper="Sem-DPO: Mitigating Semantic Inconsistency in Preference Optimization for Prompt Engineering",
    arxiv="2507.20133",
    inputs=("semantic_distance",),
    required_columns=("semantic_distance",),
    hyperparameters={
        "beta": BETA,
        "alpha": Hyper(1.0, 0.0, None, help="α: strength of the semantic-drift penalty [UNVERIFIED default]"),
    },
    notes="Input semantic_distance (B,) = 1 − cos(e(x), e(y_w)) from a frozen embedder, computed upstream. "
    "Weights are not normalised within the batch.",
)
def sem_dpo(policy: PolicyStats, ref: RefStats, beta: float = 0.1, alpha: float = 1.0) -> LossOutput:
    """Sem-DPO (Mohamed et al., arXiv 2507.20133).

    w = exp(−α·d), d = ``policy.inputs['semantic_distance']`` (B,), w detached and not batch-normalised;
    L = w·(−log σ(βΔ)). Normalisation: sum. Shapes: (B, 2) + (B,) → (B,).
    """
    chosen, rejected, logits = pair_margin(policy, ref, beta)
    d = policy.inputs["semantic_distance"].reshape(-1).to(logits.dtype)
    w = torch.exp(-alpha * d).detach()
    return loss_output(w * -logsigmoid(logits), chosen, rejected, weight=w)


@register(
    "adpo",
    summary="ADPO (pairwise): anchored soft-label DPO, a_i = (ℓ_θ − ℓ_anchor)/τ with label q",
    paper="ADPO: Anchored Direct Preference Optimization",
    arxiv="2510.18913",
    hyperparameters={
        "tau": Hyper(
            10.0, 0.0, None, low_open=True, help="τ: anchored temperature (τ = 1/β; 10 ≡ DPO's β = 0.1)"
        ),
    },
    notes="Optional input soft_label (B,) = q ∈ [0, 1], default 1 (then ADPO with the reference as anchor "
    "is DPO with β = 1/τ). The anchor is whatever RefStats holds (reference, EMA or old policy).",
)
def adpo(policy: PolicyStats, ref: RefStats, tau: float = 10.0) -> LossOutput:
    """ADPO, pairwise soft-label form (Wang, arXiv 2510.18913).

    a_i = [ℓ_θ(y_i) − ℓ_anc(y_i)]/τ; L = −[q·log σ(a_1 − a_2) + (1−q)·log σ(a_2 − a_1)],
    q = ``policy.inputs.get('soft_label', 1)`` (B,). Normalisation: sum. Shapes: (B, 2) → (B,).
    """
    rho = policy.logps - ref.logps
    a = rho / tau
    z = a[:, 0] - a[:, 1]
    q = policy.inputs.get("soft_label")
    q = torch.ones_like(z) if q is None else q.reshape(-1).to(z.dtype)
    losses = -(q * logsigmoid(z) + (1 - q) * logsigmoid(-z))
    return loss_output(losses, a[:, 0], a[:, 1])


# --- MODPO ----------------------------------------------------------------------------------------

# β/w_0 is the effective KL weight of the w_0 objective; below this the policy drifts far from π_ref.
MODPO_KL_FLOOR = 0.05


def modpo_weights(w, margin_columns: int) -> tuple[float, list[float]]:
    """``(w_0, w_{1:})`` checked against the number of margin columns; ValueError says what is wrong.

    ``w = None`` means the single objective w = (1,): allowed only without margin columns (then MODPO is DPO).
    """
    if w is None:
        if margin_columns:
            raise ValueError(
                f"objective 'modpo': the data carries {margin_columns} margin reward column(s) (margin_rewards); "
                f"set loss_params.w to {1 + margin_columns} weights (w_0 for the trained preference, then one "
                "per margin column)"
            )
        return 1.0, []
    if isinstance(w, (int, float)) and not isinstance(w, bool):
        w = [w]
    if not isinstance(w, (list, tuple)) or not w or not all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in w
    ):
        raise ValueError(f"objective 'modpo': w={w!r} must be a list of finite numbers (w_0, w_1, ...)")
    if w[0] <= 0:
        raise ValueError(f"objective 'modpo': w_0={w[0]} must be > 0 (the loss divides by it)")
    if len(w) != 1 + margin_columns:
        raise ValueError(
            f"objective 'modpo': w has {len(w)} weight(s) but the data carries {margin_columns} margin reward "
            f"column(s): w needs 1 + {margin_columns} = {1 + margin_columns} (w_0, then one per margin column)"
        )
    return float(w[0]), [float(x) for x in w[1:]]


@register(
    "modpo",
    summary="MODPO: DPO on one objective's pairs with the other objectives' rewards as a weighted margin",
    paper="Beyond One-Preference-Fits-All Alignment: Multi-Objective Direct Preference Optimization",
    arxiv="2310.03708",
    inputs=("margin_rewards",),
    hyperparameters={
        "beta": BETA,
        "w": Hyper(
            None,
            help="objective weights (w_0, w_1, ...): w_0 > 0 weighs the trained preference, w_j the j-th margin "
            "reward column; null = (1,), allowed only without margin columns (then MODPO is DPO)",
        ),
        "loss_type": Hyper("sigmoid", choices=("sigmoid", "hinge"), help="link: −log σ(z) or relu(1 − z)"),
    },
    notes="Margin rewards (B, 2, n−1): the data's margin_rewards (one list per response, objective_names), or "
    "computed once before training from margin_models (reward models, or implicit DPO rewards "
    "β_j·(log π_j − log π_ref) of other policies). As ZHZisZZ/modpo modpo_loss: the effective KL weight "
    "is β/w_0 (a warning below 0.05); w = (1, 0, ...) is DPO.",
)
def modpo(
    policy: PolicyStats, ref: RefStats, beta: float = 0.1, w: list[float] | None = None, loss_type: str = "sigmoid"
) -> LossOutput:
    """MODPO (Zhou et al., arXiv 2310.03708; ZHZisZZ/modpo ``modpo_trainer.modpo_loss``).

    h(y) = (1/w_0)·[β·ρ_θ(y) − w_{1:}ᵀ m(x, y)],  z = h(y_w) − h(y_l),
    L = −log σ(z) (sigmoid) or relu(1 − z) (hinge). m = ``policy.inputs['margin_rewards']`` (B, 2, n−1),
    detached; logged rewards are h. Normalisation: sum. Shapes: (B, 2) + (B, 2, n−1) → (B,).
    """
    rho = policy.logps - ref.logps  # (B, 2)
    m = policy.inputs.get("margin_rewards")
    m = rho.new_zeros(*rho.shape, 0) if m is None else m.to(rho.dtype).detach()
    if m.dim() != 3 or m.shape[:2] != rho.shape:
        raise ValueError(f"objective 'modpo': margin_rewards must be (B, 2, n−1), got {tuple(m.shape)}")
    w0, rest = modpo_weights(w, m.shape[-1])
    margin = m @ rho.new_tensor(rest) if rest else rho.new_zeros(rho.shape)  # (B, 2)
    h = (beta * rho - margin) / w0
    z = h[:, 0] - h[:, 1]
    losses = -logsigmoid(z) if loss_type == "sigmoid" else torch.relu(1 - z)
    return loss_output(losses, h[:, 0], h[:, 1], margin_chosen=margin[:, 0], margin_rejected=margin[:, 1])
