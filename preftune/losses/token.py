"""Token-level objectives (LOSSES.md part D): TDPO1/2, SparsePO, TGDPO and OREO (policy and value losses).

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


# ------------------------------------------------------------------------------------------------ OREO
# Wang et al. 2024, "Offline Reinforcement Learning for LLM Multi-Step Reasoning" (arXiv 2412.16145; METHODS.md
# §M7, LOSSES.md D4; jwhj/OREO ``openrlhf/trainer/pcl_trainer.py``). Grids are (B, K, T): one slot per response
# token t, the state s_t being the position that predicts it (the first state is the last prompt token). A
# trajectory's states S are every action position (token level) or the first token of every reasoning step
# (``step_level``: ``inputs['state_mask']``, which the trainer derives from the step delimiters).

OREO_PAPER = "Offline Reinforcement Learning for LLM Multi-Step Reasoning"
OREO_GRID_NOTE = (
    "inputs['values'] (B,K,T): the critic's V_φ(s_t) at every action position; inputs['terminal_reward'] (B,K): "
    "the trajectory reward, used as R = rew_mul·reward + rew_add; optional inputs['state_mask'] (B,K,T) bool: the "
    "step-level states (absent: every action position is a state). Any K ≥ 1 trajectories per group, ragged via "
    "policy.valid; the group's loss is the mean over its trajectories."
)
OREO_COMMON = {
    "beta": Hyper(0.03, 0.0, None, low_open=True, help="β: KL-regularisation strength of the soft Bellman equation"),
    "rew_mul": Hyper(1.0, help="R = rew_mul·reward + rew_add (the math scripts: 1, 0; ALFWorld's ±1: 2, −1)"),
    "rew_add": Hyper(0.0, help="R = rew_mul·reward + rew_add"),
    "step_level": Hyper(False, help="states at the first token of every reasoning step instead of every token"),
    "step_delimiters": Hyper(
        "newline", choices=("newline", "newline_period"),
        help="with step_level: steps end at '\\n' (newline), or also at '. ' and '.$ ' (the authors' "
        "period_as_delimiter); read by the trainer when it derives inputs['state_mask']",
    ),
}


def _future_sum(x: Tensor) -> Tensor:
    """Σ_{i>t} x_i along the last dim (strictly after t)."""
    return x.flip(-1).cumsum(-1).flip(-1) - x


def _to_go(x: Tensor) -> Tensor:
    """Φ_t = Σ_{i≥t} x_i along the last dim."""
    return x.flip(-1).cumsum(-1).flip(-1)


def _next_state(states: Tensor) -> Tensor:
    """(…, T) bool → (…, T) long: for every t, the index of the first state after t, or T when there is none."""
    T = states.shape[-1]
    idx = torch.where(states, torch.arange(T, device=states.device), torch.full((), T, device=states.device))
    first_from = idx.flip(-1).cummin(-1).values.flip(-1)  # min over j ≥ t
    return torch.cat([first_from[..., 1:], torch.full_like(first_from[..., :1], T)], -1)  # min over j > t


def _at_next(x: Tensor, nxt: Tensor) -> Tensor:
    """x at the next state (0 after the last): ``x`` (…, T), ``nxt`` from ``_next_state``."""
    padded = torch.cat([x, torch.zeros_like(x[..., :1])], -1)
    return padded.gather(-1, nxt)


def _oreo_grids(policy: PolicyStats, ref: RefStats | None, name: str, rew_mul: float, rew_add: float):
    """(ρ (B,K,T) zero off the action tokens, action mask, state mask, valid (B,K), R (B,K) zero where invalid)."""
    rho_t, mask = _token_log_ratios(policy, ref, name)
    valid = policy.valid.bool() if policy.valid is not None else torch.ones_like(policy.logps, dtype=torch.bool)
    mask = mask & valid.unsqueeze(-1)
    zero = torch.zeros((), dtype=rho_t.dtype, device=rho_t.device)
    rho_t = torch.where(mask, rho_t, zero)
    states = policy.inputs.get("state_mask")
    states = mask if states is None else states.bool() & mask
    if "terminal_reward" not in policy.inputs:
        raise ValueError(f"objective '{name}' needs inputs['terminal_reward'] (B, K)")
    reward = policy.inputs["terminal_reward"].to(rho_t.dtype) * rew_mul + rew_add
    return rho_t, mask, states, valid, torch.where(valid, reward, zero).detach()


def _values(policy: PolicyStats, mask: Tensor, name: str, like: Tensor) -> Tensor:
    if "values" not in policy.inputs:
        raise ValueError(f"objective '{name}' needs inputs['values'] (B, K, T): the critic's V(s_t)")
    zero = torch.zeros((), dtype=like.dtype, device=like.device)
    return torch.where(mask, policy.inputs["values"].to(like.dtype), zero)


def _group_mean(per_traj: Tensor, valid: Tensor) -> Tensor:
    """(B, K) → (B,): mean over the group's valid trajectories."""
    zero = torch.zeros((), dtype=per_traj.dtype, device=per_traj.device)
    return torch.where(valid, per_traj, zero).sum(-1) / valid.sum(-1).clamp(min=1)


def oreo_value_loss(
    values: Tensor, token_log_ratios: Tensor, token_mask: Tensor, reward: Tensor, beta: float,
    state_mask: Tensor | None = None,
) -> Tensor:
    """OREO critic loss per trajectory (jwhj/OREO ``PCLTrainer.loss`` on the critic's values).

    L_V = (1/|S|)·Σ_{t∈S} ( V_φ(s_t) + β·sg[Φ_t] − R )², Φ_t = Σ_{i≥t} ρ_i over every later action token.
    values, token_log_ratios, token_mask, state_mask (states S; default: every action position): (..., T);
    reward R: (...). Returns (...) per-trajectory means. The gradient reaches the values only.
    """
    mask = token_mask.bool()
    states = mask if state_mask is None else state_mask.bool() & mask
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    phi = _to_go(torch.where(mask, token_log_ratios, zero)).detach()
    resid = torch.where(states, values, zero) + beta * phi - reward.unsqueeze(-1)
    return _tsum(resid**2, states) / states.sum(-1).clamp(min=1)


@register(
    "oreo_value",
    token_level=True,
    summary="OREO value (critic) loss: V_φ(s_t) regressed on R − β·Σ_{i≥t} ρ_i; `--loss oreo_value` trains the "
    "critic alone (the authors' critic_only), `--loss oreo` trains it jointly with the policy",
    paper=OREO_PAPER,
    arxiv="2412.16145",
    shape="listwise",
    reference="logps",
    normalisation="mean",
    min_responses=1,
    hyperparameters={k: OREO_COMMON[k] for k in ("beta", "rew_mul", "rew_add", "step_level", "step_delimiters")},
    inputs=("values", "terminal_reward", "state_mask"),
    notes=TOKEN_NOTE + ". " + OREO_GRID_NOTE + " The gradient reaches the critic only (Φ is read with "
    "stop-gradient); model/critic.py builds and trains the critic.",
)
def oreo_value(
    policy: PolicyStats, ref: RefStats, beta: float = 0.03, rew_mul: float = 1.0, rew_add: float = 0.0,
    step_level: bool = False, step_delimiters: str = "newline",
) -> LossOutput:
    """OREO value loss (METHODS.md §M7(b) step 2; jwhj/OREO ``PCLTrainer.loss`` with the critic's values).

    Per trajectory: L_V = (1/|S|)·Σ_{t∈S} ( V_φ(s_t) + β·sg[Φ_t] − R )², Φ_t = Σ_{i≥t} ρ_i, ρ_i = lp_i^θ − lp_i^ref,
    R = rew_mul·reward + rew_add. Φ is the policy's before this step's update (no EMA policy: the current one).
    Shapes: (B, K, T) → (B,), the mean over the group's valid trajectories. Normalisation: mean over states.
    ``step_level``/``step_delimiters`` are read by the trainer, which derives ``inputs['state_mask']``.
    """
    rho_t, mask, states, valid, reward = _oreo_grids(policy, ref, "oreo_value", rew_mul, rew_add)
    values = _values(policy, states, "oreo_value", rho_t)
    per = oreo_value_loss(values, rho_t, mask, reward, beta, states)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    n_states = states.sum(-1).clamp(min=1)
    return loss_output(
        _group_mean(per, valid), None, None,
        value_loss=_group_mean(per, valid),
        value_mean=_group_mean(_tsum(values, states) / n_states, valid),
        **{"rewards/implicit": _group_mean(torch.where(valid, beta * rho_t.sum(-1), zero), valid)},
    )


def _oreo_kl(policy: PolicyStats, rho_t: Tensor, mask: Tensor, kl: str) -> Tensor:
    """(B, K, T) per-token KL estimate of the actor's regulariser (jwhj/OREO ``kls_actor``)."""
    zero = torch.zeros((), dtype=rho_t.dtype, device=rho_t.device)
    if kl == "full":  # unbiased_kl: KL(π_θ ‖ π_ref) over the vocabulary, from the engine
        if "policy_kl" not in policy.inputs:
            raise ValueError("objective 'oreo' with kl=full needs inputs['policy_kl'] (B,K,T) = KL_t(π_θ‖π_ref) over "
                             "the full vocabulary (the engine computes it with a live reference)")
        return torch.where(mask, policy.inputs["policy_kl"].to(rho_t.dtype), zero)
    if kl == "forward":  # forward_kl: KL(π_ref ‖ π_θ) over the vocabulary = the engine's token_kl
        if policy.token_kl is None:
            raise ValueError("objective 'oreo' with kl=forward needs policy.token_kl (a live reference)")
        return torch.where(mask, policy.token_kl.to(rho_t.dtype), zero)
    # sampled: exp(lp_ref − lp_θ) + (lp_θ − lp_ref) − 1, ρ clamped to [−20, 20] so extreme ratios cannot overflow
    r = rho_t.clamp(-20.0, 20.0)
    return torch.where(mask, torch.exp(-r) + r - 1, zero)


@register(
    "oreo",
    reference="live_logits",
    token_level=True,
    summary="OREO: soft-Bellman (path-consistency) policy loss; `preftune train` trains the critic (oreo_value) "
    "jointly, and model/critic.py searches with it (value-guided beam search)",
    paper=OREO_PAPER,
    arxiv="2412.16145",
    shape="listwise",
    normalisation="mean",
    min_responses=1,
    hyperparameters={
        **OREO_COMMON,
        "kl_coef": Hyper(0.01, 0.0, None, help="λ_KL: weight of the actor's KL(π_θ‖π_ref) regulariser"),
        "kl": Hyper(
            "full", choices=("full", "sampled", "forward"),
            help="the regulariser per token: full = KL(π_θ‖π_ref) over the vocabulary (unbiased_kl, the math "
            "scripts), sampled = exp(−ρ)+ρ−1 (the code's default), forward = KL(π_ref‖π_θ) (forward_kl)",
        ),
        "actor_loss": Hyper(
            "dro", choices=("dro", "pcl", "single_step", "traj"),
            help="dro: e_t = sg[V_t] + β(Φ_t − Φ_next + sg[Φ_next]) − R (the scripts); pcl: sg[V_t] + βΦ_t − R; "
            "single_step: soft Bellman sg[V_t] − r_t − sg[V_next] + β(Φ_t − Φ_next); traj: the first state only",
        ),
    },
    inputs=("values", "terminal_reward", "state_mask", "policy_kl"),
    notes=TOKEN_NOTE + ". " + OREO_GRID_NOTE + " inputs['policy_kl'] (B,K,T): KL_t(π_θ‖π_ref) over the vocabulary "
    "(kl=full). The values enter with stop-gradient; the critic trains with oreo_value in the same step "
    "(model/critic.py).",
)
def oreo(
    policy: PolicyStats, ref: RefStats, beta: float = 0.03, kl_coef: float = 0.01, kl: str = "full",
    actor_loss: str = "dro", rew_mul: float = 1.0, rew_add: float = 0.0, step_level: bool = False,
    step_delimiters: str = "newline",
) -> LossOutput:
    """OREO policy (actor) loss (METHODS.md §M7(b) step 3; jwhj/OREO ``PCLTrainer.dro_loss``, ``single_step_loss``,
    ``loss``, ``traj_loss``).

    Φ_t = Σ_{i≥t} ρ_i (ρ_i = lp_i^θ − lp_i^ref), "next" = the next state (Φ_next = V_next = 0 after the last),
    R = rew_mul·reward + rew_add, V read with stop-gradient. Residual e_t at every state t ∈ S:
      dro:         sg[V_t] + β·((Φ_t − Φ_next) + sg[Φ_next]) − R  (token level: sg[V_t] + β(ρ_t + sg[Σ_{i>t}ρ_i]) − R)
      pcl:         sg[V_t] + β·Φ_t − R
      single_step: sg[V_t] − r_t − sg[V_next] + β·(Φ_t − Φ_next),  r_t = R at the last state, else 0
      traj:        the first state's e only (pcl's residual); its square is the trajectory's term.
    L_π = (1/|S|)·Σ_{t∈S} e_t² + λ_KL·(1/n)·Σ_t KL_t over the n action tokens; KL_t per ``kl``. The hinge of
    ``traj`` (hinge_coeff, off in every script) is not implemented.
    Shapes: (B, K, T) → (B,), the mean over the group's valid trajectories. Normalisation: mean over states.
    """
    rho_t, mask, states, valid, reward = _oreo_grids(policy, ref, "oreo", rew_mul, rew_add)
    values = _values(policy, states, "oreo", rho_t).detach()
    zero = torch.zeros((), dtype=rho_t.dtype, device=rho_t.device)
    phi = _to_go(rho_t)
    nxt = _next_state(states)
    phi_next = _at_next(phi, nxt)
    R = reward.unsqueeze(-1)
    if actor_loss == "dro":
        resid = values + beta * ((phi - phi_next) + phi_next.detach()) - R
    elif actor_loss == "pcl" or actor_loss == "traj":
        resid = values + beta * phi - R
    else:  # single_step
        last = states & (nxt == states.shape[-1])  # the last state of each trajectory
        r = torch.where(last, R.expand_as(values), zero)
        resid = values - r - _at_next(values, nxt) + beta * (phi - phi_next)
    if actor_loss == "traj":  # the first state only
        first = states & (states.long().cumsum(-1) == 1)
        pcl = _tsum(resid**2, first)
    else:
        pcl = _tsum(resid**2, states) / states.sum(-1).clamp(min=1)
    # kl_coef = 0 needs no KL input (it would only be logged).
    kl_t = torch.zeros_like(rho_t) if kl_coef == 0 and kl != "sampled" else _oreo_kl(policy, rho_t, mask, kl)
    kl_mean = _tsum(kl_t, mask) / mask.sum(-1).clamp(min=1)
    losses = _group_mean(pcl + kl_coef * kl_mean, valid)
    return loss_output(
        losses, None, None,
        pcl_loss=_group_mean(pcl, valid),
        kl=_group_mean(kl_mean, valid),
        **{"rewards/implicit": _group_mean(torch.where(valid, beta * rho_t.sum(-1), zero), valid)},
    )
