"""Preference objectives with a machine-generated rationale per pair (METHODS.md §M3): RDPO and R-ORPO.

Just et al., "Data-Centric Human Preference Optimization with Rationales" (arXiv 2407.14477). Each pair
(x, y_w, y_l) carries a rationale r explaining why y_w is preferred; P(y_w ≻ y_l, r | x) factorises as
P(y_w ≻ y_l | x)·P(r | x, y_w ≻ y_l), so the pairwise loss gains a likelihood term on r under the policy.

The engine scores r as the assistant answer to a third prompt x_rat that restates x and shows both
responses (preftune/data/rationales.py renders it; the policy forward appends these sequences to the batch,
model/engine.py ``with_side``). The objective reads, per pair:

    inputs['rationale_logps']    (B,)  ℓ_θ(r | x_rat), summed over the rationale tokens (with gradient)
    inputs['rationale_lengths']  (B,)  the rationale's token count

No reference log-probs of the rationale are used (the released code computes them and never reads them).
"""

from __future__ import annotations

from torch import Tensor

from preftune.losses.base import LossOutput, PolicyStats, RefStats
from preftune.losses.functional import log1mexp, logsigmoid, loss_output, pair_margin, require_ref
from preftune.losses.registry import Hyper, register

RATIONALE_INPUTS = ("rationale_logps", "rationale_lengths")
PAPER = "Data-Centric Human Preference Optimization with Rationales"
NOTES = (
    "Records carry `rationales` (one per pair; a `rationale` column for a prompt/chosen/rejected row). The "
    "policy scores r as the assistant reply to x_rat (rationale_template: the released 'Response above / "
    "Response below' user turn, chosen first unless rationale_order=random), in the same forward as the pair."
)


def rationale_stats(policy: PolicyStats, name: str) -> tuple[Tensor, Tensor]:
    """(B,) summed ℓ_θ(r|x_rat) and (B,) token counts from ``policy.inputs``; a clear error when absent."""
    missing = [k for k in RATIONALE_INPUTS if k not in policy.inputs]
    if missing:
        raise ValueError(f"objective '{name}' needs inputs {', '.join(missing)} (B,): the policy's log-prob of each "
                         "pair's rationale (records need `rationales`)")
    logps = policy.inputs["rationale_logps"].to(policy.logps.dtype)
    return logps, policy.inputs["rationale_lengths"].to(policy.logps.dtype)


@register(
    "rdpo_rationale",
    summary="RDPO: DPO plus the policy likelihood of a generated rationale for each pair",
    paper=PAPER + " (RDPO)",
    arxiv="2407.14477",
    inputs=RATIONALE_INPUTS,
    hyperparameters={
        "beta": Hyper(0.1, 0.0, None, low_open=True, help="β of the DPO term"),
        "gamma": Hyper(0.1, 0.0, None, help="γ: weight of the rationale term (summed log-prob: shrink γ with "
                       "rationale length)"),
        "form": Hyper("code", choices=("code", "paper"),
                      help="code: −log σ(γ·ℓ_θ(r)) (released RDPOTrainer); paper: −γ·ℓ_θ(r)"),
    },
    notes=NOTES + " Released defaults (config/loss/rdpo.yaml): β = 0.1, γ = 0.1; the README example uses "
    "γ = 0.001 with lr 5e-7.",
)
def rdpo_rationale(
    policy: PolicyStats, ref: RefStats, beta: float = 0.1, gamma: float = 0.1, form: str = "code"
) -> LossOutput:
    """RDPO (Just et al., arXiv 2407.14477; reds-lab/preference-learning-with-rationales ``RDPOTrainer``).

    code:  L = −log σ(β·Δ) − log σ(γ·ℓ_θ(r | x_rat))
    paper: L = −log σ(β·Δ) − γ·ℓ_θ(r | x_rat)
    Δ = ρ(y_w) − ρ(y_l) on summed log-probs; ℓ_θ(r) summed over the rationale tokens, no reference.
    Shapes: (B, 2) + (B,) → (B,). Normalisation: sum.
    """
    ref = require_ref(ref, "rdpo_rationale")
    chosen, rejected, logits = pair_margin(policy, ref, beta)
    r_logps, _ = rationale_stats(policy, "rdpo_rationale")
    pair_loss = -logsigmoid(logits)
    rationale_loss = -logsigmoid(gamma * r_logps) if form == "code" else -gamma * r_logps
    return loss_output(pair_loss + rationale_loss, chosen, rejected, dpo_loss=pair_loss,
                       rationale_loss=rationale_loss, rationale_logps=r_logps)


@register(
    "rorpo_rationale",
    summary="R-ORPO: ORPO plus the policy likelihood of a generated rationale (length-averaged), no reference",
    paper=PAPER + " (R-ORPO)",
    arxiv="2407.14477",
    reference="none",
    normalisation="mean",
    inputs=RATIONALE_INPUTS,
    hyperparameters={
        "beta": Hyper(0.1, 0.0, None, low_open=True, help="λ: weight of the odds-ratio term (as orpo's beta)"),
        "gamma": Hyper(1.0, 0.0, None, help="γ: weight of the rationale term"),
        "form": Hyper("simple", choices=("simple", "sigmoid"),
                      help="simple: −γ·ℓ̄_θ(r) (released SimpleRORPOTrainer); sigmoid: −log σ(γ·ℓ̄_θ(r)) "
                      "(RORPOTrainer)"),
    },
    notes=NOTES + " Released defaults (config/loss/rorpo-simple.yaml): β = 0.1, γ = 1.0. The chosen NLL is the "
    "per-sequence token mean (as preftune's orpo); the released code averages over the batch's chosen tokens.",
)
def rorpo_rationale(
    policy: PolicyStats, ref: RefStats | None = None, beta: float = 0.1, gamma: float = 1.0, form: str = "simple"
) -> LossOutput:
    """R-ORPO (Just et al., arXiv 2407.14477; ``SimpleRORPOTrainer`` / ``RORPOTrainer``).

    log odds = [ℓ̄_w − log(1 − e^{ℓ̄_w})] − [ℓ̄_l − log(1 − e^{ℓ̄_l})] (ORPO, LOSSES.md B2, averaged log-probs);
    simple:  L = NLL(y_w) − β·log σ(log odds) − γ·ℓ̄_θ(r | x_rat)
    sigmoid: L = NLL(y_w) − β·log σ(log odds) − log σ(γ·ℓ̄_θ(r | x_rat))
    ℓ̄_θ(r) = ℓ_θ(r)/|r|. Shapes: (B, 2) + (B,) → (B,). Normalisation: mean.
    """
    avg = policy.avg_logps
    avg_c = avg.clamp(max=-1e-6)  # ℓ̄ ≤ 0; keeps log(1 − e^ℓ̄) finite at probability ~1 (as orpo)
    log_odds = (avg_c[:, 0] - log1mexp(avg_c[:, 0])) - (avg_c[:, 1] - log1mexp(avg_c[:, 1]))
    or_loss = -logsigmoid(log_odds)
    nll = policy.nll[:, 0]
    r_logps, r_len = rationale_stats(policy, "rorpo_rationale")
    r_avg = r_logps / r_len.clamp(min=1)
    rationale_loss = -gamma * r_avg if form == "simple" else -logsigmoid(gamma * r_avg)
    losses = nll + beta * or_loss + rationale_loss
    return loss_output(losses, beta * avg[:, 0], beta * avg[:, 1], nll_loss=nll, or_loss=or_loss,
                       log_odds_ratio=log_odds, rationale_loss=rationale_loss, rationale_logps=r_logps)


def needs_rationales(obj) -> bool:
    """Whether a registry entry trains on rationales (the data must carry one per pair)."""
    return "rationale_logps" in obj.inputs


__all__ = ["RATIONALE_INPUTS", "needs_rationales", "rationale_stats", "rdpo_rationale", "rorpo_rationale"]
