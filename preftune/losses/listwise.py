"""Listwise objectives (LOSSES.md part F, A8/A9 K-ary forms, A16 listwise): PRO, IRPO, NCA-K, InfoNCA-K,
EXO-K, listwise ADPO; and Curry-DPO's pair construction and curriculum ordering.

A group is K ≥ 2 response slots; ``policy.valid`` (B, K) marks the real ones in ragged lists and
``policy.inputs['scores']`` (B, K) holds their scores (higher is better). Masked slots never reach the
arithmetic: every per-slot tensor goes through ``torch.where`` at entry, so NaN or garbage there changes
neither the loss nor any gradient. Softmaxes and log-sum-exps run over valid slots only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from preftune.losses.base import LossOutput, PolicyStats, RefStats
from preftune.losses.functional import logsigmoid, loss_output, require_ref
from preftune.losses.registry import Hyper, register

SCORES_NOTE = "inputs['scores'] (B,K): a score per response, higher is better; ragged lists via policy.valid."


# --------------------------------------------------------------------------------------------------
# Masked helpers


def valid_mask(policy: PolicyStats) -> Tensor:
    """(B, K) bool: ``policy.valid`` or all-true."""
    if policy.valid is None:
        return torch.ones_like(policy.logps, dtype=torch.bool)
    return policy.valid.bool()


def _clean(x: Tensor, valid: Tensor, fill: float = 0.0) -> Tensor:
    return torch.where(valid, x, torch.full((), fill, dtype=x.dtype, device=x.device))


def masked_logsumexp(x: Tensor, include: Tensor, dim: int = -1) -> tuple[Tensor, Tensor]:
    """log Σ exp(x) over ``include`` along ``dim``; returns (lse, any). Rows with nothing included give 0.

    Finite in value and gradient whatever the excluded entries hold (they are swapped for the row max
    before ``exp``, so no ``0·inf`` appears in the backward pass).
    """
    lowest = torch.finfo(x.dtype).min
    m = (
        torch.where(include, x, torch.full((), lowest, dtype=x.dtype, device=x.device))
        .amax(dim, keepdim=True)
        .detach()
    )
    z = torch.where(include, x, m) - m
    s = torch.where(include, z.exp(), torch.zeros((), dtype=x.dtype, device=x.device)).sum(dim, keepdim=True)
    has = include.any(dim, keepdim=True)
    lse = m + torch.log(torch.where(has, s, torch.ones_like(s)))
    lse = torch.where(has, lse, torch.zeros_like(lse))
    return lse.squeeze(dim), has.squeeze(dim)


def masked_log_softmax(x: Tensor, valid: Tensor, dim: int = -1) -> Tensor:
    """log softmax over valid entries; exactly 0 at invalid ones (their probability is 0)."""
    lse, _ = masked_logsumexp(x, valid, dim)
    return _clean(x - lse.unsqueeze(dim), valid)


def _best_worst(values: Tensor, scores: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """(B,) values at the highest- and lowest-scored valid slots (for the chosen/rejected metrics)."""
    inf = torch.tensor(float("inf"), dtype=scores.dtype, device=scores.device)
    best = torch.where(valid, scores, -inf).argmax(-1, keepdim=True)
    worst = torch.where(valid, scores, inf).argmin(-1, keepdim=True)
    return values.gather(-1, best).squeeze(-1), values.gather(-1, worst).squeeze(-1)


def _scores(policy: PolicyStats, valid: Tensor, name: str) -> Tensor:
    if "scores" not in policy.inputs:
        raise ValueError(f"objective '{name}' needs inputs['scores'] (B, K)")
    return _clean(policy.inputs["scores"].to(policy.logps.dtype), valid).detach()


# --------------------------------------------------------------------------------------------------
# PRO


@register(
    "pro",
    summary="PRO: ranking loss with reward-gap temperatures over length-averaged log-probs (+ SFT on the best "
    "response)",
    paper="Preference Ranking Optimization for Human Alignment",
    arxiv="2306.17492",
    shape="listwise",
    reference="none",
    normalisation="mean",
    hyperparameters={
        "sft_weight": Hyper(0.05, 0.0, None, help="λ_sft; the term is λ·(n−1)²·(−ℓ_θ(y_1)) (HH script 0.05)"),
        "reward_temperature": Hyper(
            True,
            help="PRO's reward-gap temperatures T_k^j = r_k − r_j (the paper and its code); "
            "false means T ≡ 1 (plain Plackett–Luce)",
        ),
    },
    inputs=("scores",),
    notes=SCORES_NOTE + " Responses are ranked by score (stable sort: ties keep data order).",
)
def pro(
    policy: PolicyStats,
    ref: RefStats | None = None,
    sft_weight: float = 0.05,
    reward_temperature: bool = True,
) -> LossOutput:
    """PRO (Song et al. 2024, arXiv 2306.17492; DAMO-ConvAI ``PRO/train/utils/process_manager.py``).

    Rank the n valid responses by score, y_1 ≻ … ≻ y_n; s_k = ℓ̄_θ(y_k) (length-averaged log-prob).
    L = Σ_{k=1}^{n−1} −log[ exp(s_k·T_k^k) / Σ_{j≥k} exp(s_j·T_k^j) ] + λ_sft·(n−1)²·(−ℓ_θ(y_1)),
    with the paper's reward-gap temperatures T_k^j = r_k − r_j (j > k) and T_k^k = max_{j>k} T_k^j
    (``reward_temperature``, the default); ``reward_temperature=False`` sets T ≡ 1, the Plackett–Luce NLL
    of the ranking. ℓ_θ(y_1) in the SFT term is the summed log-prob of the top response. Computed with
    log-sum-exp (the reference code's raw exp overflows). For n = 2, T ≡ 1: −log σ(s_1 − s_2).
    Shapes: (B, K) → (B,). Normalisation: mean (scores), sum (SFT).
    """
    valid = valid_mask(policy)
    scores = _scores(policy, valid, "pro")
    lowest = torch.finfo(scores.dtype).min
    # Stable descending sort with invalid slots last.
    order = torch.sort(
        torch.where(valid, scores, torch.full_like(scores, lowest)), dim=-1, descending=True, stable=True
    ).indices
    v = valid.gather(-1, order)  # (B, K)
    logps = _clean(policy.logps, valid).gather(-1, order)
    lengths = _clean(policy.lengths.to(logps.dtype), valid, 1.0).gather(-1, order)
    s = logps / lengths.clamp(min=1)  # (B, K) ℓ̄ in rank order
    r = scores.gather(-1, order)
    K = s.shape[-1]
    idx = torch.arange(K, device=s.device)
    after = idx.view(1, K) > idx.view(K, 1)  # (K, K) [k, j]: j > k
    diag = torch.eye(K, dtype=torch.bool, device=s.device)
    include = (after.unsqueeze(0) & v.unsqueeze(1) & v.unsqueeze(2)) | diag  # (B, K, K)
    if reward_temperature:
        gap = r.unsqueeze(2) - r.unsqueeze(1)  # (B, K, K) r_k − r_j
        off = after.unsqueeze(0) & v.unsqueeze(1) & v.unsqueeze(2)
        t_diag = torch.where(off, gap, torch.full_like(gap, lowest)).amax(-1)
        t_diag = torch.where(off.any(-1), t_diag, torch.zeros_like(t_diag))  # (B, K)
        temp = torch.where(diag, t_diag.unsqueeze(-1).expand(-1, -1, K), gap)
    else:
        temp = torch.ones(1, K, K, dtype=s.dtype, device=s.device)
    logits = s.unsqueeze(1) * temp  # (B, K, K) [k, j] = s_j·T_k^j
    lse, _ = masked_logsumexp(logits, include)
    per_k = lse - torch.diagonal(logits, dim1=-2, dim2=-1)  # rows with only the diagonal give 0
    rank_loss = per_k.sum(-1)
    n = v.sum(-1).to(s.dtype)
    sft = -logps[:, 0]
    losses = rank_loss + sft_weight * (n - 1).clamp(min=0) ** 2 * sft
    best, worst = s[:, 0], s.gather(-1, (n.long() - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return loss_output(losses, best, worst, rank_loss=rank_loss, sft_loss=sft)


# --------------------------------------------------------------------------------------------------
# IRPO (In-context Ranking PO)


@register(
    "irpo_ranking",
    summary="IRPO (In-context Ranking PO): DCG-weighted positional preference of each item over the rest",
    paper="In-context Ranking Preference Optimization (not Iterative Reasoning PO, see dpo_nll)",
    arxiv="2504.15477",
    shape="listwise",
    hyperparameters={
        "beta": Hyper(1.0, 0.0, None, low_open=True, help="β on item log-ratio differences"),
        "gain": Hyper("exponential", choices=("exponential", "none"), help="2^rel − 1, or 1 (no relevance)"),
        "discount": Hyper("log", choices=("log", "linear"), help="1/log2(1 + rank), or 1/rank"),
    },
    inputs=("scores",),
    notes="Each slot is one item of a single generated list; policy/ref logps sum the item's own tokens. "
    "inputs['scores'] (B,K) = graded relevance rel ≥ 0. Position = order of valid slots (1-based), unless "
    "inputs['positions'] (B,K, 1-based) is given.",
)
def irpo_ranking(
    policy: PolicyStats, ref: RefStats, beta: float = 1.0, gain: str = "exponential", discount: str = "log"
) -> LossOutput:
    """IRPO, In-context Ranking PO (Wu et al. 2025, arXiv 2504.15477; authors' ``rdpo_loss``).

    r_i = ℓ_θ(item_i) − ℓ_ref(item_i);  w_i = (2^{rel_i} − 1) / log2(1 + rank_i);
    LSE_i = log Σ_{j≠i} exp(β·(r_j − r_i)) − log(n − 1);   L = −(1/n)·Σ_i w_i·log σ(−LSE_i),
    over the n valid items (the diagonal is excluded by a mask, not the code's −100 offset).
    Ablations: ``gain='none'`` (w = discount only), ``discount='linear'`` (1/rank).
    Shapes: (B, K) → (B,). Normalisation: sum (item log-probs).
    """
    ref = require_ref(ref, "irpo_ranking")
    valid = valid_mask(policy)
    rel = _scores(policy, valid, "irpo_ranking")
    r = _clean(policy.logps, valid) - _clean(ref.logps.to(policy.logps.dtype), valid)  # (B, K)
    if "positions" in policy.inputs:
        rank = _clean(policy.inputs["positions"].to(r.dtype), valid, 1.0)
    else:
        rank = valid.to(r.dtype).cumsum(-1)
    g = torch.pow(2.0, rel) - 1 if gain == "exponential" else torch.ones_like(rel)
    d = 1.0 / torch.log2(1 + rank) if discount == "log" else 1.0 / rank
    w = _clean(g * d, valid)
    K = r.shape[-1]
    eye = torch.eye(K, dtype=torch.bool, device=r.device)
    include = valid.unsqueeze(1) & valid.unsqueeze(2) & ~eye  # (B, K, K) [i, j]
    diff = beta * (r.unsqueeze(1) - r.unsqueeze(2))  # [i, j] = β(r_j − r_i)
    n = valid.sum(-1).to(r.dtype)  # (B,)
    lse, has = masked_logsumexp(diff, include)  # (B, K)
    lse = lse - torch.log((n - 1).clamp(min=1)).unsqueeze(-1)
    term = torch.where(has, w * logsigmoid(-lse), torch.zeros_like(lse))
    losses = -term.sum(-1) / n.clamp(min=1)
    chosen, rejected = _best_worst(r, rel, valid)
    return loss_output(losses, chosen, rejected)


# --------------------------------------------------------------------------------------------------
# NCA-K, InfoNCA-K, EXO-K


NCA_PAPER = "Noise Contrastive Alignment of Language Models with Explicit Rewards"
SCORE_TEMP = Hyper(
    1e-4,
    0.0,
    None,
    low_open=True,
    help="α: target q = softmax(scores/α); the official code's temperature_alpha=1e-4 (≈ one-hot on best)",
)


def _score_target(policy: PolicyStats, valid: Tensor, temperature: float, name: str) -> tuple[Tensor, Tensor]:
    scores = _scores(policy, valid, name)
    logq = masked_log_softmax(scores / temperature, valid)
    return scores, _clean(logq.exp(), valid)


@register(
    "nca_k",
    summary="NCA (K responses with rewards): per-response binary NCE toward softmax(score/α) targets",
    paper=NCA_PAPER + " (K-ary reward NCA)",
    arxiv="2402.05369",
    shape="listwise",
    hyperparameters={
        "beta": Hyper(0.01, 0.0, None, low_open=True, help="β (official README 0.01)"),
        "temperature": SCORE_TEMP,
    },
    inputs=("scores",),
    notes=SCORES_NOTE,
)
def nca_k(policy: PolicyStats, ref: RefStats, beta: float = 0.01, temperature: float = 1e-4) -> LossOutput:
    """NCA, K-ary reward form (Chen et al. 2024, arXiv 2402.05369; thu-ml ``reward_trainer.py``).

    r_i = β·ρ_θ(y_i); q = softmax_i(s_i/α) over valid responses;
    L = −Σ_i q_i·log σ(r_i) − (1/n)·Σ_i log σ(−r_i), n = number of valid responses.
    Choice: α defaults to the official code's ``temperature_alpha`` = 1e-4 (scores divided by it); the
    code's +0.01 tie-break on the best score is not applied (tied best responses share q).
    Shapes: (B, K) → (B,). Normalisation: sum.
    """
    ref = require_ref(ref, "nca_k")
    valid = valid_mask(policy)
    scores, q = _score_target(policy, valid, temperature, "nca_k")
    r = beta * (_clean(policy.logps, valid) - _clean(ref.logps.to(policy.logps.dtype), valid))
    n = valid.sum(-1).to(r.dtype).clamp(min=1)
    losses = -(q * logsigmoid(r)).sum(-1) - _clean(logsigmoid(-r), valid).sum(-1) / n
    chosen, rejected = _best_worst(r, scores, valid)
    return loss_output(losses, chosen, rejected)


@register(
    "infonca_k",
    summary="InfoNCA (K responses with rewards): cross-entropy of softmax(β·ρ) against softmax(score/α)",
    paper=NCA_PAPER + " (K-ary InfoNCA)",
    arxiv="2402.05369",
    shape="listwise",
    hyperparameters={
        "beta": Hyper(0.01, 0.0, None, low_open=True, help="β (official README 0.01)"),
        "temperature": SCORE_TEMP,
    },
    inputs=("scores",),
    notes=SCORES_NOTE + " With K = 2 and a one-hot target this is DPO.",
)
def infonca_k(
    policy: PolicyStats, ref: RefStats, beta: float = 0.01, temperature: float = 1e-4
) -> LossOutput:
    """InfoNCA, K-ary (Chen et al. 2024, arXiv 2402.05369).

    L = −Σ_i q_i·log softmax_i(β·ρ_θ),  q = softmax_i(s_i/α), over valid responses.
    Shapes: (B, K) → (B,). Normalisation: sum.
    """
    ref = require_ref(ref, "infonca_k")
    valid = valid_mask(policy)
    scores, q = _score_target(policy, valid, temperature, "infonca_k")
    r = beta * (_clean(policy.logps, valid) - _clean(ref.logps.to(policy.logps.dtype), valid))
    losses = -(q * masked_log_softmax(r, valid)).sum(-1)
    chosen, rejected = _best_worst(r, scores, valid)
    return loss_output(losses, chosen, rejected)


@register(
    "exo_k",
    summary="EXO-rw (K responses with rewards): reverse KL from softmax(β_π·ρ) to softmax(r/β_r)",
    paper="Towards Efficient Exact Optimization of Language Model Alignment (EXO-rw)",
    arxiv="2402.00856",
    shape="listwise",
    hyperparameters={
        "beta": Hyper(
            0.5, 0.0, None, low_open=True, help="β_π on the policy log-ratios (official scripts 0.5)"
        ),
        "beta_r": Hyper(
            0.5, 0.0, None, low_open=True, help="β_r: reward temperature of the target (official 0.5)"
        ),
    },
    inputs=("scores",),
    notes=SCORES_NOTE,
)
def exo_k(policy: PolicyStats, ref: RefStats, beta: float = 0.5, beta_r: float = 0.5) -> LossOutput:
    """EXO-rw (Ji et al. 2024, arXiv 2402.00856; exact-optimization ``exact_loss``).

    p_θ = softmax_i(β_π·ρ_θ(y_i)), p_rh = softmax_i(r_i/β_r) over valid responses;
    L = KL(p_θ ‖ p_rh) = Σ_i p_θ(i)·[log p_θ(i) − log p_rh(i)], gradients through p_θ in both places.
    Shapes: (B, K) → (B,). Normalisation: sum.
    """
    ref = require_ref(ref, "exo_k")
    valid = valid_mask(policy)
    scores = _scores(policy, valid, "exo_k")
    rho = _clean(policy.logps, valid) - _clean(ref.logps.to(policy.logps.dtype), valid)
    logp = masked_log_softmax(beta * rho, valid)
    logt = masked_log_softmax(scores / beta_r, valid)
    p = _clean(logp.exp(), valid)
    losses = (p * (logp - logt)).sum(-1)
    chosen, rejected = _best_worst(beta * rho, scores, valid)
    return loss_output(losses, chosen, rejected)


# --------------------------------------------------------------------------------------------------
# ADPO, listwise


@register(
    "adpo_list",
    summary="ADPO (listwise): cross-entropy of softmax(ρ/τ) against standardised-reward targets",
    paper="ADPO: Anchored Direct Preference Optimization (listwise form)",
    arxiv="2510.18913",
    shape="listwise",
    hyperparameters={
        "tau": Hyper(
            0.8, 0.0, None, low_open=True, help="τ: temperature of the anchored logits (verl port 0.8)"
        ),
        "beta_r": Hyper(
            0.5, 0.0, None, low_open=True, help="β_r: temperature of the reward target (verl port 0.5)"
        ),
    },
    inputs=("scores",),
    notes=SCORES_NOTE + " The reference slot carries the anchor π_anc (π_ref, an EMA, or the old policy).",
)
def adpo_list(policy: PolicyStats, ref: RefStats, tau: float = 0.8, beta_r: float = 0.5) -> LossOutput:
    """ADPO, listwise (Wang 2025, arXiv 2510.18913; third-party verl ``adpo_policy_loss``).

    a_i = [ℓ_θ(y_i) − ℓ_anc(y_i)]/τ;  R̃ = (R − mean)/(std + 1e-8) over the valid group;
    q = softmax(R̃/β_r);  L = −Σ_i q_i·log softmax_i(a)  (= KL(q ‖ softmax a) − H(q); same gradient).
    Choices [UNVERIFIED constants]: τ = 0.8, β_r = 0.5 from the verl port; std is the sample std
    (n − 1, torch's default as in verl's group normalisation), 0 for single-response groups.
    Shapes: (B, K) → (B,). Normalisation: sum.
    """
    ref = require_ref(ref, "adpo_list")
    valid = valid_mask(policy)
    scores = _scores(policy, valid, "adpo_list")
    n = valid.sum(-1, keepdim=True).to(scores.dtype)
    mean = scores.sum(-1, keepdim=True) / n.clamp(min=1)
    var = _clean((scores - mean) ** 2, valid).sum(-1, keepdim=True) / (n - 1).clamp(min=1)
    std = var.sqrt()
    z = _clean((scores - mean) / (std + 1e-8), valid)
    q = _clean(masked_log_softmax(z / beta_r, valid).exp(), valid)
    rho = _clean(policy.logps, valid) - _clean(ref.logps.to(policy.logps.dtype), valid)
    losses = -(q * masked_log_softmax(rho / tau, valid)).sum(-1)
    chosen, rejected = _best_worst(rho / tau, scores, valid)
    return loss_output(losses, chosen, rejected)


# --------------------------------------------------------------------------------------------------
# BRAIn (METHODS.md §M6)

BRAIN_INPUTS = ("scores", "proposal_logps", "prior_logps")


@register(
    "brain",
    summary="BRAIn: distil the reward-conditioned posterior from K proposal samples by self-normalised "
    "importance sampling, with a self-normalised baseline",
    paper="BRAIn: Bayesian Reward-conditioned Amortized Inference for natural language generation from feedback",
    arxiv="2402.02479",
    shape="listwise",
    reference="none",
    hyperparameters={
        "tau_r": Hyper(1.0, 0.0, None, low_open=True,
                       help="τ_r: reward temperature of the posterior p(y|x)·exp(r/τ_r) [UNVERIFIED]"),
        "beta_pi": Hyper(1.0, 0.0, None, low_open=True,
                         help="β_π: scale of log π_θ − log q inside the baseline softmax ([preftune]; K = 2, hard "
                         "target and q = π_ref give DPO with β = β_π)"),
        "target": Hyper("soft", choices=("soft", "argmax"),
                        help="soft: α = softmax(r/τ_r + log p − log q); argmax: one-hot on its largest entry "
                        "(K = 2: DPO-sft)"),
        "baseline": Hyper("self_normalised", choices=("self_normalised", "none"),
                          help="self_normalised: −Σα·log softmax(β_π·(log π − log q)) (BRAIn); none: −Σα·β_π·"
                          "(log π − log q), the baseline-free distribution-matching gradient (ablation)"),
    },
    inputs=BRAIN_INPUTS,
    required_columns=("proposal_logps",),
    notes="Listwise records: K samples of the proposal q per prompt with `scores` (rewards), `proposal_logps` "
    "(log q(y|x), sequence sums recorded at sampling time: temperature 1, no top-k/top-p) and optionally "
    "`prior_logps` (log p(y|x), the SFT prior; absent: p = q). No reference model. Logs the effective sample "
    "size 1/Σα² of the target weights.",
)
def brain(
    policy: PolicyStats,
    ref: RefStats | None = None,
    tau_r: float = 1.0,
    beta_pi: float = 1.0,
    target: str = "soft",
    baseline: str = "self_normalised",
) -> LossOutput:
    """BRAIn (Pandey et al., ICML 2024, arXiv 2402.02479); METHODS.md §M6(b).

    For the K valid samples y_i ~ q(·|x) with rewards r_i:
      α_i = softmax_i(r_i/τ_r + log p(y_i) − log q(y_i))          (target weights, no gradient)
      s_i = β_π·(log π_θ(y_i) − log q(y_i)),  b_i = softmax_i(s_i)   (self-normalised baseline weights)
      L = −Σ_i α_i·log b_i;  ∇L = −Σ_i (α_i − b_i)·∇s_i.
    ``target='argmax'``: α one-hot at the largest α-logit (ties: first); with K = 2 and q = p = π_ref this
    is −log σ(β_π·(ρ_w − ρ_l)), DPO-sft. ``baseline='none'``: L = −Σ_i α_i·s_i (no baseline).
    Shapes: (B, K) + inputs (B, K) → (B,). Normalisation: sum (sequence log-probs).
    """
    valid = valid_mask(policy)
    dtype = policy.logps.dtype
    rewards = _scores(policy, valid, "brain")
    for key in ("proposal_logps", "prior_logps"):
        if key not in policy.inputs:
            raise ValueError(f"objective 'brain' needs inputs['{key}'] (B, K): sequence log-probs recorded when "
                             "sampling (prior_logps = proposal_logps when the proposal is the SFT model)")
    log_q = _clean(policy.inputs["proposal_logps"].to(dtype), valid).detach()
    log_p = _clean(policy.inputs["prior_logps"].to(dtype), valid).detach()
    a_logits = rewards / tau_r + log_p - log_q  # (B, K)
    if target == "argmax":
        lowest = torch.finfo(dtype).min
        best = torch.where(valid, a_logits, torch.full_like(a_logits, lowest)).argmax(-1, keepdim=True)
        alpha = torch.zeros_like(a_logits).scatter(-1, best, 1.0)
    else:
        alpha = masked_log_softmax(a_logits, valid).exp()
    alpha = _clean(alpha, valid).detach()
    s = beta_pi * (_clean(policy.logps, valid) - log_q)  # (B, K)
    if baseline == "self_normalised":
        losses = -(alpha * masked_log_softmax(s, valid)).sum(-1)
    else:
        losses = -(alpha * _clean(s, valid)).sum(-1)
    ess = 1.0 / (alpha**2).sum(-1).clamp(min=torch.finfo(dtype).tiny)
    best, worst = _best_worst(s, a_logits.detach(), valid)
    entropy = -(alpha * torch.log(torch.where(alpha > 0, alpha, torch.ones_like(alpha)))).sum(-1)
    return loss_output(losses, best, worst, effective_sample_size=ess, target_entropy=entropy)


# --------------------------------------------------------------------------------------------------
# Curry-DPO: pair construction and curriculum (the per-pair loss is DPO)


class CurryPair(NamedTuple):
    """One Curry-DPO pair of response indices; ``difficulty`` = −(score_w − score_l): smaller is easier."""

    winner: int
    loser: int
    difficulty: float


def curry_pairs(
    scores: Sequence[float], strategy: str = "best_vs_rest", tie_eps: float = 0.0
) -> list[CurryPair]:
    """Curry-DPO pairs from one prompt's response scores (Pattnaik et al. 2024, arXiv 2403.07230).

    ``best_vs_rest`` (the paper's main recipe): the top-scored response against each other one —
    (R1,R4), (R1,R3), (R1,R2) for four responses. ``all_pairs`` (the paper's extended sets, exact sets
    [UNVERIFIED]): every ordered pair with a strictly higher winner score. Pairs whose score gap is
    ≤ ``tie_eps`` are dropped (ties carry no preference). Difficulty = −gap (a larger rating gap is an
    easier pair); the list is returned easy → hard, ties in difficulty in index order.
    """
    if strategy not in ("best_vs_rest", "all_pairs"):
        raise ValueError(f"unknown Curry-DPO strategy {strategy!r}; choose best_vs_rest or all_pairs")
    s = [float(x) for x in scores]
    if any(math.isnan(x) for x in s):
        raise ValueError("Curry-DPO scores must not be NaN")
    ranked = sorted(range(len(s)), key=lambda i: (-s[i], i))
    winners = ranked[:1] if strategy == "best_vs_rest" else ranked
    pairs = []
    for w in winners:
        for lo in ranked:
            gap = s[w] - s[lo]
            if lo != w and gap > tie_eps:
                pairs.append(CurryPair(w, lo, -gap))
    return sorted(pairs, key=lambda p: (p.difficulty, p.winner, p.loser))


def curriculum_order(
    pairs_per_prompt: Sequence[Sequence[CurryPair]], iterative: bool = True
) -> list[list[tuple[int, int, int]]]:
    """Order Curry-DPO pairs easy → hard into training stages of ``(prompt_index, winner, loser)``.

    ``iterative=True`` (the paper's iterative variant): stage s holds the s-th easiest pair of every
    prompt — for 4 responses and ``best_vs_rest``, stage 1 is (R1,R4), stage 2 (R1,R3), stage 3 (R1,R2).
    A trainer runs one DPO run per stage, in order, without shuffling across stages, and makes the
    policy at the end of stage s the reference of stage s+1. ``iterative=False``: one stage, the same
    pairs concatenated stage by stage (easy → hard) for a single run with a fixed reference; the
    trainer must then disable shuffling. Prompts with fewer pairs simply drop out of later stages.
    """
    n_stages = max((len(p) for p in pairs_per_prompt), default=0)
    stages: list[list[tuple[int, int, int]]] = [[] for _ in range(n_stages)]
    for g, pairs in enumerate(pairs_per_prompt):
        for s, p in enumerate(sorted(pairs, key=lambda p: (p.difficulty, p.winner, p.loser))):
            stages[s].append((g, p.winner, p.loser))
    if iterative:
        return stages
    return [[item for stage in stages for item in stage]]
