"""TPO preference trees (METHODS.md §M4, ``tpo_tree``) and MAPL's multi-level pairs (§M5, ``mapl_intra``,
``mapl_inter``).

``tpo_tree``: a group is the N root-to-leaf responses of one preference tree (they share step prefixes) with a
score each. Every response token carries its step index (``inputs['step_ids']`` (B, K, T), −1 off the response),
indices clipped to S_min − 1 (S_min = the group's fewest steps). Per step, ρ̄_{i,s} is the *mean* token
log-ratio; a_{i,s} = 1 + cos(h̄_{i,s}, h̄_{g,s}) weighs it by how close the step's pooled policy hidden state is
to the same step of the best-scored response g (``inputs['step_hidden']`` (B, K, S, H), detached [preftune]);
z_i = Σ_s a ρ̄ / Σ_s a. The loss is the mean over ordered pairs with ψ_i > ψ_j of −logσ(β·(z_i − z_j))
(METHODS.md's recommended form, not the released code's sign-inverted one; docs/objectives_notes.md), optionally
LiPO-λ weighted.

MAPL: both levels are DPO-form losses on the log-ratios of two sequences; what differs is the data
(preftune/data/mapl.py). ``mapl_intra``: one response y under two prompts, column 0 = (x_w, y) (y meets x_w's
added instructions), column 1 = (x_l, y) (it violates x_l's): L = −logσ(β·[ρ(y; x_w) − ρ(y; x_l)]) (the Rc-DPO
reading, [UNVERIFIED]). ``mapl_inter``: ordinary pairs, the original ones and the instruction-augmented ones.
"""

from __future__ import annotations

import torch
from torch import Tensor

from preftune.losses.base import LossOutput, PolicyStats, RefStats
from preftune.losses.functional import log_ratios, logsigmoid, loss_output, require_ref
from preftune.losses.listwise import _best_worst, _clean, _scores, valid_mask
from preftune.losses.registry import Hyper, register

# --------------------------------------------------------------------------------------------------
# TPO trees


def clip_steps(step_ids: Tensor, valid: Tensor) -> Tensor:
    """(B, K, T) long step ids with indices ≥ S_min clipped to S_min − 1 (S_min: the fewest steps of a valid
    response in the group); −1 (no token) stays −1."""
    ids = step_ids.long()
    count = ids.amax(-1) + 1  # (B, K) steps per response
    big = torch.iinfo(torch.long).max
    s_min = torch.where(valid, count, torch.full_like(count, big)).amin(-1).clamp(min=1)  # (B,)
    return torch.where(ids >= 0, torch.minimum(ids, (s_min - 1)[:, None, None]), ids)


def step_means(values: Tensor, step_ids: Tensor, num_steps: int) -> tuple[Tensor, Tensor]:
    """((B, K, S) mean of ``values`` (B, K, T[, ...]) over each step's tokens, (B, K, S) bool step present)."""
    onehot = (step_ids.unsqueeze(-1) == torch.arange(num_steps, device=step_ids.device)).to(values.dtype)  # B,K,T,S
    count = onehot.sum(-2)  # (B, K, S)
    total = torch.einsum("bkts,bkt...->bks...", onehot, values)
    present = count > 0
    denom = count.clamp(min=1)
    return total / denom.view(*denom.shape, *([1] * (total.dim() - 3))), present


def step_weights(hidden: Tensor | None, present: Tensor, gold: Tensor) -> Tensor:
    """(B, K, S) a_{i,s} = 1 + cos(h̄_{i,s}, h̄_{g,s}) (1 without hidden states), 0 where the step is absent."""
    if hidden is None:
        return present.to(torch.get_default_dtype())
    h = hidden.detach()
    ref = h.gather(1, gold.view(-1, 1, 1, 1).expand(-1, 1, *h.shape[2:]))  # (B, 1, S, H)
    a = 1.0 + torch.nn.functional.cosine_similarity(h, ref.expand_as(h), dim=-1, eps=1e-8)
    return torch.where(present, a, torch.zeros_like(a))


def tree_rewards(policy: PolicyStats, ref: RefStats) -> tuple[Tensor, Tensor]:
    """((B, K) z_i, (B, K) valid): the step-weighted mean log-ratio of every response."""
    if policy.token_logps is None or ref.token_logps is None:
        raise ValueError("objective 'tpo_tree' needs per-token log-probs of the policy and the reference")
    if "step_ids" not in policy.inputs:
        raise ValueError("objective 'tpo_tree' needs inputs['step_ids'] (B, K, T)")
    valid = valid_mask(policy)
    mask = policy.token_mask if policy.token_mask is not None else torch.ones_like(policy.token_logps, dtype=torch.bool)
    ids = torch.where(mask, policy.inputs["step_ids"].to(policy.token_logps.device).long(), -1)
    ids = clip_steps(ids, valid)
    num_steps = max(int(ids.max().item()) + 1, 1)
    rho_t = torch.where(mask, policy.token_logps - ref.token_logps, torch.zeros_like(policy.token_logps))
    rho_bar, present = step_means(rho_t, ids, num_steps)
    scores = _scores(policy, valid, "tpo_tree")
    gold = torch.where(valid, scores, torch.full_like(scores, -torch.inf)).argmax(-1)
    hidden = policy.inputs.get("step_hidden")
    if hidden is not None:
        hidden = hidden[:, :, :num_steps].to(rho_bar.dtype)
    a = step_weights(hidden, present, gold).to(rho_bar.dtype)
    z = (a * rho_bar).sum(-1) / a.sum(-1).clamp(min=1e-12)
    return _clean(z, valid), valid


def lipo_lambda(scores: Tensor, z: Tensor, valid: Tensor) -> Tensor:
    """(B, K, K) λ_ij = |G_i − G_j|·|1/D_i − 1/D_j|, G = 2^ψ̃ − 1 (ψ̃: scores min–max scaled per group),
    D = log2(1 + rank of z) (rank 1 = largest z among valid slots); no gradient."""
    lo = torch.where(valid, scores, torch.full_like(scores, torch.inf)).amin(-1, keepdim=True)
    hi = torch.where(valid, scores, torch.full_like(scores, -torch.inf)).amax(-1, keepdim=True)
    scaled = (scores - lo) / (hi - lo).clamp(min=1e-12)
    gain = torch.pow(2.0, scaled) - 1.0
    zz = torch.where(valid, z.detach(), torch.full_like(z, -torch.inf))
    rank = (zz.unsqueeze(-1) < zz.unsqueeze(-2)).sum(-1) + 1  # number of strictly larger z, plus one
    inv_d = 1.0 / torch.log2(1.0 + rank.to(z.dtype))
    gap = (gain.unsqueeze(-1) - gain.unsqueeze(-2)).abs()
    return (gap * (inv_d.unsqueeze(-1) - inv_d.unsqueeze(-2)).abs()).detach()


@register(
    "tpo_tree",
    summary="TPO trees: listwise ranking of a preference tree's responses by step-weighted mean log-ratios "
    "(adaptive step reward: steps weighted by 1 + cos to the best response's step)",
    paper="TPO: Aligning Large Language Models with Multi-branch & Multi-step Preference Trees",
    arxiv="2410.12854",
    shape="listwise",
    reference="logps",
    normalisation="mean",
    token_level=True,
    hyperparameters={
        "beta": Hyper(0.5, 0.0, None, low_open=True, help="β (tpo_train.py 0.5)"),
        "weighting": Hyper("none", choices=("none", "lipo_lambda"),
                           help="pair weights: none (mean over ordered pairs) or LiPO-λ (weighted mean)"),
    },
    inputs=("scores", "step_ids", "step_hidden"),
    notes="Records: responses, scores, optional steps (per response, step strings that concatenate to it; "
    "without them steps end at newlines). step_ids (B,K,T) and step_hidden (B,K,S,H, the policy's last-layer "
    "hidden states pooled per step, detached) are computed by the trainer. Best reading of the paper's list "
    "loss [UNVERIFIED]: mean of −logσ(β·(z_i − z_j)) over ψ_i > ψ_j; docs/objectives_notes.md.",
)
def tpo_tree(policy: PolicyStats, ref: RefStats | None = None, beta: float = 0.5,
             weighting: str = "none") -> LossOutput:
    ref = require_ref(ref, "tpo_tree")
    z, valid = tree_rewards(policy, ref)
    scores = _scores(policy, valid, "tpo_tree")
    pair = valid.unsqueeze(-1) & valid.unsqueeze(-2) & (scores.unsqueeze(-1) > scores.unsqueeze(-2))  # (B,K,K)
    diff = z.unsqueeze(-1) - z.unsqueeze(-2)
    terms = -logsigmoid(beta * torch.where(pair, diff, torch.zeros_like(diff)))
    w = pair.to(z.dtype)
    if weighting == "lipo_lambda":
        w = w * lipo_lambda(scores, z, valid)
    denom = w.sum((-1, -2))
    losses = torch.where(denom > 0, (w * terms).sum((-1, -2)) / denom.clamp(min=1e-12), torch.zeros_like(denom))
    best, worst = _best_worst(beta * z, scores, valid)
    return loss_output(losses, best, worst, z_gap=(best - worst) / beta)


# --------------------------------------------------------------------------------------------------
# MAPL


def own_prompt_ratios(policy: PolicyStats, ref: RefStats) -> Tensor:
    """(B, K) ρ over the response tokens after each response's own prompt tokens (``inputs['prompt_tokens']``,
    records with pair_prompts); the sequence log-ratios when there are none or no per-token log-probs."""
    own = policy.inputs.get("prompt_tokens")
    if own is None or policy.token_logps is None or ref.token_logps is None:
        return log_ratios(policy, ref)
    T = policy.token_logps.shape[-1]
    scored = torch.arange(T, device=own.device) >= own.unsqueeze(-1)  # (B, K, T)
    if policy.token_mask is not None:
        scored = scored & policy.token_mask
    diff = policy.token_logps - ref.token_logps
    return torch.where(scored, diff, torch.zeros_like(diff)).sum(-1)


def _dpo_form(policy: PolicyStats, ref: RefStats | None, beta: float, name: str) -> LossOutput:
    ref = require_ref(ref, name)
    rho = own_prompt_ratios(policy, ref)
    if rho.shape[1] != 2:
        raise ValueError(f"objective '{name}' needs pairs (K = 2), got K = {rho.shape[1]}")
    margin = beta * (rho[:, 0] - rho[:, 1])
    return loss_output(-logsigmoid(margin), beta * rho[:, 0], beta * rho[:, 1])


@register(
    "mapl_intra",
    summary="MAPL intra-sample: one response under two prompts with added instructions it meets (x_w) and "
    "violates (x_l); DPO form on ρ(y; x_w) − ρ(y; x_l)",
    paper="Multi-Level Aware Preference Learning: Enhancing RLHF for Complex Multi-Instruction Tasks",
    arxiv="2505.12845",
    hyperparameters={"beta": Hyper(0.1, 0.0, None, low_open=True, help="β")},
    inputs=("prompt_tokens",),
    token_level=True,
    notes="Pairs of one response under two prompts: records with pair_prompts ([x_w, x_l] per pair), written by "
    "`preftune data mapl`; each response is scored under its own prompt (its prompt's tokens after the shared "
    "beginning are not scored); plain pairs train as DPO. The DPO form across prompts is the Rc-DPO reading "
    "[UNVERIFIED]: β·log Z(x) does not cancel between x_w and x_l.",
)
def mapl_intra(policy: PolicyStats, ref: RefStats | None = None, beta: float = 0.1) -> LossOutput:
    return _dpo_form(policy, ref, beta, "mapl_intra")


@register(
    "mapl_inter",
    summary="MAPL inter-sample: DPO on pairs synthesised from an original pair by adding instructions to its "
    "prompt and ordering the responses by compliance, then the original preference",
    paper="Multi-Level Aware Preference Learning: Enhancing RLHF for Complex Multi-Instruction Tasks",
    arxiv="2505.12845",
    hyperparameters={"beta": Hyper(0.1, 0.0, None, low_open=True, help="β")},
    inputs=("prompt_tokens",),
    token_level=True,
    notes="Ordinary pairs: the original ones and the inter-sample ones `preftune data mapl` appends "
    "(HIGH-LEVEL in METHODS.md §M5; construction [UNVERIFIED], docs/objectives_notes.md); records with "
    "pair_prompts train as in mapl_intra, so one file holds every level (L = L_pair + L_intra + L_inter, λ = 1).",
)
def mapl_inter(policy: PolicyStats, ref: RefStats | None = None, beta: float = 0.1) -> LossOutput:
    return _dpo_form(policy, ref, beta, "mapl_inter")
