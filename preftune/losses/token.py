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


@register(
    "sparsepo",
    summary="SparsePO: token masks on the reward (m^u) and on the token KL (m^d), with L1 sparsity penalties",
    paper="SparsePO: Controlling Preference Alignment of LLMs via Sparse Token Masks",
    arxiv="2410.05102",
    reference="live_logits",
    hyperparameters={
        "beta": BETA,
        "lambda_reward": Hyper(
            0.001, 0.0, None, help="λ_u: L1 weight on the reward mask (halve it for a common mask)"
        ),
        "lambda_kl": Hyper(
            0.001, 0.0, None, help="λ_d: L1 weight on the KL mask (halve it for a common mask)"
        ),
        "mask_reward": Hyper(
            True, help="apply m^u (read inputs['token_reward_mask']); false means m^u ≡ 1, no penalty"
        ),
        "mask_kl": Hyper(
            True, help="apply m^d (read inputs['token_kl_mask']); false means m^d ≡ 1, no penalty"
        ),
    },
    inputs=("token_reward_mask", "token_kl_mask"),
    notes=TOKEN_NOTE
    + "; "
    + KL_NOTE
    + ". The masks (B,K,T, non-negative, not bounded by 1) come from a mask "
    "model on reference hidden states (learned 'simple_all', or MaPO's parameter-free 'zn_rescale'); engine "
    "computes them and may keep their graph so the mask model trains. A common mask: pass the same tensor "
    "under both keys and halve λ.",
)
def sparsepo(
    policy: PolicyStats,
    ref: RefStats,
    beta: float = 0.1,
    lambda_reward: float = 0.001,
    lambda_kl: float = 0.001,
    mask_reward: bool = True,
    mask_kl: bool = True,
) -> LossOutput:
    """SparsePO (Christopoulou et al. 2025, arXiv 2410.05102; HEBO ``SparseTrainer.get_batch_loss_metrics``).

    u = Σ_t m^u_t(y_w)·ρ_t(y_w) − Σ_t m^u_t(y_l)·ρ_t(y_l),   ρ_t = lp_t^θ − lp_t^ref;
    g_t = −KL_t(π_ref ‖ π_θ);  d = Σ_t m^d_t(y_w)·g_t(y_w) − Σ_t m^d_t(y_l)·g_t(y_l);
    L = −log σ(β·(u − d)) + λ_u·(‖m^u(y_w)‖₁ + ‖m^u(y_l)‖₁) + λ_d·(‖m^d(y_w)‖₁ + ‖m^d(y_l)‖₁).
    Masks: ``inputs['token_reward_mask']``, ``inputs['token_kl_mask']`` (B, 2, T); norms over response
    tokens. With masks ≡ 1 and λ = 0 this is TDPO1. Shapes → (B,). Normalisation: sum.
    Logged rewards: β·(Σ m^u ρ_t + Σ m^d g_t) per response, as the reference code logs them.
    """
    require_pairs(policy, "sparsepo")
    rho_t, mask = _token_log_ratios(policy, ref, "sparsepo")  # (B, 2, T)
    if policy.token_kl is None:
        raise ValueError("objective 'sparsepo' needs policy.token_kl (declare reference='live_logits')")
    g_t = -policy.token_kl
    zero = torch.zeros((), dtype=rho_t.dtype, device=rho_t.device)
    penalty = torch.zeros_like(rho_t[:, 0, 0])
    metrics: dict[str, Tensor] = {}
    if mask_reward:
        m_u = torch.where(mask, policy.inputs["token_reward_mask"].to(rho_t.dtype), zero)
        rho_t = m_u * rho_t
        l1_u = m_u.abs().sum(-1)  # (B, 2)
        penalty = penalty + lambda_reward * l1_u.sum(-1)
        metrics["mask/reward_l1"] = l1_u.sum(-1)
    if mask_kl:
        m_d = torch.where(mask, policy.inputs["token_kl_mask"].to(rho_t.dtype), zero)
        g_t = m_d * torch.where(mask, g_t, zero)
        l1_d = m_d.abs().sum(-1)
        penalty = penalty + lambda_kl * l1_d.sum(-1)
        metrics["mask/kl_l1"] = l1_d.sum(-1)
    reward = _tsum(rho_t, mask)  # (B, 2)
    wkl = _tsum(g_t, mask)  # (B, 2)
    u = reward[:, 0] - reward[:, 1]
    d = wkl[:, 0] - wkl[:, 1]
    losses = -logsigmoid(beta * (u - d)) + penalty
    chosen, rejected = beta * (reward[:, 0] + wkl[:, 0]), beta * (reward[:, 1] + wkl[:, 1])
    return loss_output(losses, chosen, rejected, **metrics)


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
