"""Token-level objectives (LOSSES.md part D): TDPO1/2, SparsePO, TGDPO and OREO's policy loss.

They read per-token statistics that the engine provides only to objectives that declare them:
``policy.token_logps``/``policy.token_mask`` (B, K, T), ``ref.token_logps`` (B, K, T), and for TDPO
and SparsePO ``policy.token_kl`` (B, K, T) = KL_t(π_ref ‖ π_θ) over the full vocabulary (reference
"live_logits"). Every token sum runs over ``token_mask`` only, and masked positions are replaced by 0
before any arithmetic so padding can hold anything.
"""

from __future__ import annotations

import torch
from torch import Tensor

from preftune.losses.base import LossOutput, PolicyStats, RefStats
from preftune.losses.functional import logsigmoid, loss_output, require_pairs, require_ref
from preftune.losses.registry import Hyper, register

BETA = Hyper(
    0.1, 0.0, None, low_open=True, help="inverse temperature β of the implicit reward β·log(π/π_ref)"
)

TOKEN_NOTE = (
    "needs per-token statistics: policy.token_logps and policy.token_mask (B,K,T) and ref.token_logps (B,K,T)"
)
KL_NOTE = "needs policy.token_kl (B,K,T) = KL_t(π_ref‖π_θ) over the full vocabulary and policy.token_mask"


def _mask(policy: PolicyStats, name: str) -> Tensor:
    if policy.token_mask is None:
        raise ValueError(f"objective '{name}' needs policy.token_mask (B, K, T)")
    return policy.token_mask.bool()


def _tsum(x: Tensor, mask: Tensor) -> Tensor:
    """Σ_t over masked positions; (B, K, T) → (B, K). ``where`` (not a product) so padding NaNs stay out."""
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(-1)


def _seq_kl(policy: PolicyStats, name: str) -> Tensor:
    """(B, K) SeqKL(y; ref‖θ) = Σ_t KL_t(π_ref ‖ π_θ)."""
    if policy.token_kl is None:
        raise ValueError(f"objective '{name}' needs policy.token_kl (declare reference='live_logits')")
    return _tsum(policy.token_kl, _mask(policy, name))


def _token_log_ratios(policy: PolicyStats, ref: RefStats | None, name: str) -> tuple[Tensor, Tensor]:
    """(B, K, T) ρ_t = lp_t^θ − lp_t^ref, zero at masked positions, and the bool mask."""
    ref = require_ref(ref, name)
    if policy.token_logps is None or ref.token_logps is None:
        raise ValueError(f"objective '{name}' needs per-token log-probs of the policy and the reference")
    mask = _mask(policy, name)
    zero = torch.zeros((), dtype=policy.token_logps.dtype, device=policy.token_logps.device)
    rho_t = torch.where(mask, policy.token_logps, zero) - torch.where(mask, ref.token_logps, zero)
    return rho_t, mask


def _tdpo(policy: PolicyStats, ref: RefStats, beta: float, alpha: float | None, name: str) -> LossOutput:
    require_pairs(policy, name)
    ref = require_ref(ref, name)
    rho = policy.logps - ref.logps  # (B, 2)
    kl = _seq_kl(policy, name)  # (B, 2)
    u = rho[:, 0] - rho[:, 1]
    if alpha is None:  # TDPO1: δ = K(y_l) − K(y_w), gradients through both
        delta = kl[:, 1] - kl[:, 0]
    else:  # TDPO2: α·[K(y_l) − sg K(y_w)]
        delta = alpha * (kl[:, 1] - kl[:, 0].detach())
    logits = beta * (u - delta)
    losses = -logsigmoid(logits)
    chosen, rejected = beta * (rho[:, 0] + kl[:, 0]), beta * (rho[:, 1] + kl[:, 1])
    return loss_output(losses, chosen, rejected, **{"seq_kl/chosen": kl[:, 0], "seq_kl/rejected": kl[:, 1]})


TDPO_PAPER = "Token-level Direct Preference Optimization"


@register(
    "tdpo1",
    summary="TDPO1: DPO margin corrected by the sequential forward-KL difference SeqKL(ref‖θ)",
    paper=TDPO_PAPER + " (Eq. 19–20)",
    arxiv="2404.11999",
    reference="live_logits",
    hyperparameters={"beta": BETA},
    notes=KL_NOTE + ". Log-ratios ρ come from the sequence sums policy.logps − ref.logps.",
)
def tdpo1(policy: PolicyStats, ref: RefStats, beta: float = 0.1) -> LossOutput:
    """TDPO1 (Zeng et al. 2024, arXiv 2404.11999; Vance0124 ``tdpo_loss`` with ``if_tdpo2=False``).

    L = −log σ(β·[u − δ]),  u = ρ(y_w) − ρ(y_l),  δ = SeqKL(y_l) − SeqKL(y_w),
    SeqKL(y) = Σ_t KL_t(π_ref ‖ π_θ) summed over ``token_mask`` (from ``policy.token_kl``).
    Logged rewards β·(ρ(y) + SeqKL(y)). Shapes: (B, 2) sequence stats + (B, 2, T) token KL → (B,).
    Normalisation: sum (token sums, no averaging). With SeqKL ≡ 0 this is DPO.
    """
    return _tdpo(policy, ref, beta, None, "tdpo1")


@register(
    "tdpo2",
    summary="TDPO2: TDPO with α-weighted KL difference and a stop-gradient on the chosen SeqKL",
    paper=TDPO_PAPER + " (Eq. 21)",
    arxiv="2404.11999",
    reference="live_logits",
    hyperparameters={"beta": BETA, "alpha": Hyper(0.5, 0.0, None, help="α: weight of the SeqKL difference")},
    notes=KL_NOTE + ". Log-ratios ρ come from the sequence sums policy.logps − ref.logps.",
)
def tdpo2(policy: PolicyStats, ref: RefStats, beta: float = 0.1, alpha: float = 0.5) -> LossOutput:
    """TDPO2 (Zeng et al. 2024, arXiv 2404.11999; Vance0124 ``tdpo_loss`` with ``if_tdpo2=True``).

    L = −log σ(β·[u − α·(SeqKL(y_l) − sg[SeqKL(y_w)])]),  u = ρ(y_w) − ρ(y_l); the stop-gradient is on
    the chosen response's SeqKL only, so the gradient pushes SeqKL(y_l) down and leaves SeqKL(y_w) alone.
    Shapes: (B, 2) + (B, 2, T) → (B,). Normalisation: sum.
    """
    return _tdpo(policy, ref, beta, alpha, "tdpo2")


SPARSEPO_PAPER = "SparsePO: Controlling Preference Alignment of LLMs via Sparse Token Masks"


def _sparsepo(
    policy: PolicyStats, ref: RefStats, m_u: Tensor | None, m_d: Tensor | None, beta: float, lam_u: float,
    lam_d: float, name: str,
) -> LossOutput:
    """SparsePO's loss on given masks (None: ≡ 1 and no penalty for that term); see ``sparsepo_learned``."""
    require_pairs(policy, name)
    rho_t, mask = _token_log_ratios(policy, ref, name)  # (B, 2, T)
    if policy.token_kl is None:
        raise ValueError(f"objective '{name}' needs policy.token_kl (declare reference='live_logits')")
    zero = torch.zeros((), dtype=rho_t.dtype, device=rho_t.device)
    g_t = torch.where(mask, -policy.token_kl, zero)  # g_t = −KL_t(ref‖θ)
    penalty = torch.zeros_like(rho_t[:, 0, 0])
    metrics: dict[str, Tensor] = {}
    n_tok = mask.sum((-2, -1)).clamp(min=1)
    for term, m, lam in (("reward", m_u, lam_u), ("kl", m_d, lam_d)):
        if m is None:
            continue
        m = torch.where(mask, m.to(rho_t.dtype), zero)  # (B, 2, T), 0 on padding
        if term == "reward":
            rho_t = m * rho_t
        else:
            g_t = m * g_t
        l1 = m.abs().sum((-2, -1))  # ‖m(y_w)‖₁ + ‖m(y_l)‖₁, (B,)
        penalty = penalty + lam * l1
        metrics[f"mask/{term}_l1"] = l1.detach()
        metrics[f"mask/{term}_mean"] = (l1 / n_tok).detach()
        metrics[f"mask/{term}_sparsity"] = (100.0 * ((m == 0) & mask).sum((-2, -1)) / n_tok).detach()
    u_resp = _tsum(rho_t, mask)  # (B, 2) Σ_t m^u ρ_t
    d_resp = _tsum(g_t, mask)  # (B, 2) Σ_t m^d g_t
    u = u_resp[:, 0] - u_resp[:, 1]
    d = d_resp[:, 0] - d_resp[:, 1]
    losses = -logsigmoid(beta * (u - d)) + penalty
    if metrics:
        metrics["mask/penalty"] = penalty.detach()
    chosen, rejected = beta * (u_resp[:, 0] + d_resp[:, 0]), beta * (u_resp[:, 1] + d_resp[:, 1])
    return loss_output(losses, chosen, rejected, **metrics)


LEARNED_HYPER = {
    "beta": BETA,
    "lambda_reward": Hyper(
        0.001, 0.0, None, help="λ_u: L1 weight on the reward mask as configured (halved for a common mask)"
    ),
    "lambda_kl": Hyper(0.001, 0.0, None, help="λ_d: L1 weight on the KL mask as configured (halved for a common mask)"),
    "masks": Hyper(
        "common",
        choices=("common", "independent"),
        help="common: one mask network for both terms (the paper's sparse-common); independent: one per term "
        "(rw_kl_independent)",
    ),
    "mask_reward": Hyper(True, help="mask the reward term (mask_on_reward); false: m^u ≡ 1, no penalty"),
    "mask_kl": Hyper(True, help="mask the KL term (mask_on_kl); false: m^d ≡ 1, no penalty"),
}
LEARNED_NOTES = (
    TOKEN_NOTE + "; " + KL_NOTE + ". inputs['token_reward_mask'], inputs['token_kl_mask'] (B,K,T, ≥ 0, not "
    "bounded by 1, carrying gradient): the learned mask network (model/masks.py TokenMaskHead, 'simple_all') on "
    "the reference's every-block hidden states, owned by the engine, trained with the policy (AdamW, weight decay "
    "0.01 on its weights), checkpointed with the trainable weights and saved as output/sparsepo_mask.safetensors."
)


def sparsepo_learned(
    policy: PolicyStats,
    ref: RefStats,
    beta: float = 0.1,
    lambda_reward: float = 0.001,
    lambda_kl: float = 0.001,
    masks: str = "common",
    mask_reward: bool = True,
    mask_kl: bool = True,
) -> LossOutput:
    """SparsePO with learned masks (Christopoulou et al. 2025, arXiv 2410.05102; HEBO ``SparseTrainer``).

    u = Σ_t m^u_t(y_w)·ρ_t(y_w) − Σ_t m^u_t(y_l)·ρ_t(y_l),   ρ_t = lp_t^θ − lp_t^ref;
    g_t = −KL_t(π_ref ‖ π_θ);  d = Σ_t m^d_t(y_w)·g_t(y_w) − Σ_t m^d_t(y_l)·g_t(y_l);
    L = −log σ(β·(u − d)) + λ_u·(‖m^u(y_w)‖₁ + ‖m^u(y_l)‖₁) + λ_d·(‖m^d(y_w)‖₁ + ‖m^d(y_l)‖₁).
    Masks: ``inputs['token_reward_mask']``, ``inputs['token_kl_mask']`` (B, 2, T), the mask network's output
    (a common mask is one tensor under both keys); norms over response tokens. With ``masks='common'`` and
    both terms masked, λ_u and λ_d are halved (the code: the common mask's norm is added twice). With
    masks ≡ 1 and λ = 0 this is TDPO1. Shapes → (B,). Normalisation: sum.
    Logged rewards: β·(Σ m^u ρ_t + Σ m^d g_t) per response, as the reference code logs them.
    """
    halve = 0.5 if masks == "common" and mask_reward and mask_kl else 1.0
    m_u = policy.inputs["token_reward_mask"] if mask_reward else None
    m_d = policy.inputs["token_kl_mask"] if mask_kl else None
    return _sparsepo(policy, ref, m_u, m_d, beta, halve * lambda_reward, halve * lambda_kl, "sparsepo_learned")


register(
    "sparsepo_learned",
    summary="SparsePO, learned masks: a mask network on the reference's hidden states weights each token's "
    "reward and KL, with L1 sparsity penalties",
    paper=SPARSEPO_PAPER,
    arxiv="2410.05102",
    reference="live_logits",
    hyperparameters=LEARNED_HYPER,
    inputs=("token_reward_mask", "token_kl_mask"),
    notes=LEARNED_NOTES,
)(sparsepo_learned)
# The paper's method is the learned mask (MaPO is its parameter-free variant): `sparsepo` names it too.
register(
    "sparsepo",
    summary="SparsePO (the paper's learned masks): the same objective as sparsepo_learned, under the paper's name",
    paper=SPARSEPO_PAPER,
    arxiv="2410.05102",
    reference="live_logits",
    hyperparameters=LEARNED_HYPER,
    inputs=("token_reward_mask", "token_kl_mask"),
    notes=LEARNED_NOTES,
)(sparsepo_learned)


@register(
    "sparsepo_mapo",
    summary="SparsePO, MaPO masks: token weights on reward and KL from the reference's activations, min–max "
    "rescaled per response (no parameters)",
    paper=SPARSEPO_PAPER + " (MaPO)",
    arxiv="2410.05102",
    reference="live_logits",
    hyperparameters={"beta": BETA},
    inputs=("token_activation_mask",),
    notes=TOKEN_NOTE + "; " + KL_NOTE + ". inputs['token_activation_mask'] (B,K,T) in [0,1], no gradient: "
    "computed in the live-reference pass by hooks on a Llama-style reference (model/masks.py mapo_mask).",
)
def sparsepo_mapo(policy: PolicyStats, ref: RefStats, beta: float = 0.1) -> LossOutput:
    """SparsePO with MaPO masks (Christopoulou et al. 2025, arXiv 2410.05102; HEBO ``MAPOTrainer.mapo_loss``).

    One common mask m ∈ [0, 1] from the frozen reference's activations (``inputs['token_activation_mask']``,
    detached): m_t = mean over four groups (MLP activations, attention q/k/v/rotary q,k/head outputs,
    residual stream, logits) of the mean over the group's tensors of the per-response min–max rescaled
    feature mean at the position predicting token t.
    L = −log σ(β·[(Σ_t m_t ρ_t(y_w) − Σ_t m_t ρ_t(y_l)) − (Σ_t m_t g_t(y_w) − Σ_t m_t g_t(y_l))]),
    g_t = −KL_t(π_ref ‖ π_θ); no L1 term. Logged rewards β·(Σ m ρ_t + Σ m g_t). Shapes (B, 2, T) → (B,).
    Normalisation: sum.
    """
    m = policy.inputs["token_activation_mask"].detach()
    return _sparsepo(policy, ref, m, m, beta, 0.0, 0.0, "sparsepo_mapo")


@register(
    "tgdpo",
    token_level=True,
    summary="TGDPO: DPO with per-token weights β(1 ± α·r̂_t) from a frozen token-level reward policy",
    paper="TGDPO: Harnessing Token-Level Reward Guidance for Enhancing Direct Preference Optimization",
    arxiv="2506.14574",
    reference="logps",
    hyperparameters={
        "beta": BETA,
        "alpha": Hyper(0.5, 0.0, None, help="α (tgdpo_alpha): strength of the token reward guidance"),
        "sft_weight": Hyper(0.0, 0.0, None, help="γ_ftx: weight of the chosen token-mean NLL"),
    },
    inputs=("token_rm_logps",),
    notes=TOKEN_NOTE
    + ". inputs['token_rm_logps'] (B,K,T): per-token log-probs of the frozen token-level reward "
    "policy π_rm (e.g. a DPO-trained model with the same tokenizer and truncation), no gradient.",
)
def tgdpo(
    policy: PolicyStats, ref: RefStats, beta: float = 0.1, alpha: float = 0.5, sft_weight: float = 0.0
) -> LossOutput:
    """TGDPO (Zhu et al. 2025, arXiv 2506.14574; dvlab-research/TGDPO ``dpo_loss``, sigmoid branch).

    r̂_t(y) = β·[lp_t^rm(y) − lp_t^ref(y)] (no gradient; π_rm = ``inputs['token_rm_logps']``),
    L = −log σ( Σ_t β·(1 + α·r̂_t(y_w))·ρ_t(y_w) − Σ_t β·(1 − α·r̂_t(y_l))·ρ_t(y_l) ) + γ_ftx·NLL(y_w).
    The same β scales the token reward and the log-ratios, as in the reference code. Weights are not
    clipped (a rejected weight turns negative when α·r̂_t > 1, as in the paper). NLL(y_w) is the
    per-sequence token mean. Shapes: (B, 2, T) → (B,). Normalisation: sum (token sums).
    """
    require_pairs(policy, "tgdpo")
    rho_t, mask = _token_log_ratios(policy, ref, "tgdpo")
    zero = torch.zeros((), dtype=rho_t.dtype, device=rho_t.device)
    rm = torch.where(mask, policy.inputs["token_rm_logps"].to(rho_t.dtype), zero)
    r_hat = (beta * (rm - torch.where(mask, ref.token_logps, zero))).detach()  # (B, 2, T)
    w_chosen = beta * (1 + alpha * r_hat[:, 0])
    w_rejected = beta * (1 - alpha * r_hat[:, 1])
    chosen = _tsum(w_chosen * rho_t[:, 0], mask[:, 0])
    rejected = _tsum(w_rejected * rho_t[:, 1], mask[:, 1])
    losses = -logsigmoid(chosen - rejected)
    metrics = {
        "token_reward/chosen": _tsum(r_hat[:, 0], mask[:, 0]),
        "token_reward/rejected": _tsum(r_hat[:, 1], mask[:, 1]),
    }
    if sft_weight:
        nll = -_tsum(policy.token_logps[:, 0], mask[:, 0]) / mask[:, 0].sum(-1).clamp(min=1)
        losses = losses + sft_weight * nll
        metrics["nll_loss"] = nll
    return loss_output(losses, chosen, rejected, **metrics)


def _future_sum(x: Tensor) -> Tensor:
    """Σ_{i>t} x_i along the last dim (strictly after t)."""
    return x.flip(-1).cumsum(-1).flip(-1) - x


def oreo_value_loss(
    values: Tensor, token_log_ratios: Tensor, token_mask: Tensor, reward: Tensor, beta: float
) -> Tensor:
    """OREO critic loss per trajectory (Wang et al. 2024, arXiv 2412.16145; jwhj/OREO ``pcl_trainer``).

    L_V = (1/|S|)·Σ_{t∈S} ( V_φ(s_t) + β·Σ_{i≥t} sg[ρ_i] − R )².
    values, token_log_ratios, token_mask: (..., T); reward: (...). Returns (...) per-trajectory means.
    Not registered: the critic is trained by the value-model step of an OREO trainer, not the policy loss.
    """
    mask = token_mask.bool()
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    rho = torch.where(mask, token_log_ratios, zero).detach()
    to_go = rho.flip(-1).cumsum(-1).flip(-1)  # Σ_{i≥t}
    resid = torch.where(mask, values, zero) + beta * to_go - reward.unsqueeze(-1)
    return _tsum(resid**2, mask) / mask.sum(-1).clamp(min=1)


@register(
    "oreo",
    token_level=True,
    summary="OREO policy loss: token-level soft-Bellman (path-consistency) residual with a value model",
    paper="Offline Reinforcement Learning for LLM Multi-Step Reasoning",
    arxiv="2412.16145",
    shape="unpaired",
    reference="logps",
    normalisation="mean",
    min_responses=1,
    hyperparameters={
        "beta": Hyper(0.03, 0.0, None, low_open=True, help="β: entropy-regularisation strength"),
        "kl_coef": Hyper(0.01, 0.0, None, help="λ_KL: weight of the sampled-token KL(π_θ‖π_ref) regulariser"),
    },
    inputs=("values", "terminal_reward"),
    notes=TOKEN_NOTE + ". inputs['values'] (B,K,T): critic V_φ(s_t) at every action position (read with "
    "stop-gradient); inputs['terminal_reward'] (B,K): trajectory reward R (e.g. 0/1 correctness). Any K ≥ 1 "
    "trajectories per group, ragged via policy.valid. The critic itself trains with oreo_value_loss().",
)
def oreo(policy: PolicyStats, ref: RefStats, beta: float = 0.03, kl_coef: float = 0.01) -> LossOutput:
    """OREO policy loss, token-level variant (Wang et al. 2024, arXiv 2412.16145; jwhj/OREO).

    Per trajectory (S = action positions, ρ_i = lp_i^θ − lp_i^ref):
    L_π = (1/|S|)·Σ_{t∈S} ( sg[V_φ(s_t)] + β·ρ_t + β·sg[Σ_{i>t} ρ_i] − R )² + λ_KL·(1/|S|)·Σ_t k3_t,
    k3_t = exp(−ρ_t) + ρ_t − 1, the sampled-token estimator of KL(π_θ ‖ π_ref). Choice: the reference
    code's default is the full-vocabulary KL(π_θ‖π_ref), which the engine does not provide (its
    ``token_kl`` is the other direction); the k3 estimator is the code's documented alternative. ρ_t is
    clamped to [−20, 20] inside k3 only (as OpenRLHF clamps), so extreme ratios cannot overflow.
    Shapes: (B, K, T) → (B,), the mean over the group's valid trajectories. Normalisation: mean over
    tokens within a trajectory.
    """
    rho_t, mask = _token_log_ratios(policy, ref, "oreo")  # (B, K, T)
    valid = (
        policy.valid.bool() if policy.valid is not None else torch.ones_like(policy.logps, dtype=torch.bool)
    )
    mask = mask & valid.unsqueeze(-1)
    rho_t = torch.where(mask, rho_t, torch.zeros((), dtype=rho_t.dtype, device=rho_t.device))
    zero = torch.zeros((), dtype=rho_t.dtype, device=rho_t.device)
    values = torch.where(mask, policy.inputs["values"].to(rho_t.dtype), zero).detach()
    reward = torch.where(valid, policy.inputs["terminal_reward"].to(rho_t.dtype), zero).detach()
    resid = values + beta * rho_t + beta * _future_sum(rho_t).detach() - reward.unsqueeze(-1)
    n_tok = mask.sum(-1).clamp(min=1)  # (B, K)
    pcl = _tsum(resid**2, mask) / n_tok
    r = rho_t.clamp(-20.0, 20.0)
    kl = _tsum(torch.exp(-r) + r - 1, mask) / n_tok
    per_traj = torch.where(valid, pcl + kl_coef * kl, zero)
    n = valid.sum(-1).clamp(min=1)
    losses = per_traj.sum(-1) / n
    seq_rho = _tsum(rho_t, mask)
    return loss_output(
        losses,
        None,
        None,
        pcl_loss=torch.where(valid, pcl, zero).sum(-1) / n,
        kl=torch.where(valid, kl, zero).sum(-1) / n,
        **{"rewards/implicit": torch.where(valid, beta * seq_rho, zero).sum(-1) / n},
    )
