"""Self-play and iterative objectives (LOSSES.md part E): the per-iteration losses of SPPO, DNO and INPO.

In these methods the "reference" slot holds the **previous iterate** π_t, refreshed by the online loop
every iteration (π_1 = the initial SFT model); INPO additionally needs the fixed π_ref, which goes in the
reference slot while π_t's log-probs arrive as ``inputs['prev_logps']``. The loops themselves (sampling,
judging, pair building) live in ``preftune.online``.
"""

from __future__ import annotations

from torch import Tensor

from preftune.losses.base import LossOutput, PolicyStats, RefStats
from preftune.losses.functional import logsigmoid, loss_output, pair_margin, require_pairs, require_ref
from preftune.losses.registry import Hyper, register

SPPO_PAPER = "Self-Play Preference Optimization for Language Model Alignment (Alg. 1, Eq. 4.7)"
SPPO_BETA = Hyper(
    0.001, 0.0, None, low_open=True, help="β = 1/η: an inverse step size (paper 1e-3), not DPO's KL weight"
)
PREV_NOTE = "The reference slot carries the previous iterate π_t (refreshed every iteration)."


def _rho(policy: PolicyStats, ref: RefStats | None, name: str) -> Tensor:
    require_pairs(policy, name)
    ref = require_ref(ref, name)
    return policy.logps - ref.logps  # (B, 2)


@register(
    "sppo",
    summary="SPPO (soft): square loss pulling each log-ratio to η·(P̂ − ½) from estimated win rates",
    paper=SPPO_PAPER,
    arxiv="2405.00675",
    hyperparameters={"beta": SPPO_BETA},
    inputs=("win_probs",),
    required_columns=("win_probs",),
    notes=PREV_NOTE
    + " inputs['win_probs'] (B,2): P̂(y ≻ π_t) for chosen and rejected, P̂_i = (1/K)·Σ_j σ(s_i − s_j) "
    "over the K sampled responses (j = i included), from a pairwise preference model.",
)
def sppo(policy: PolicyStats, ref: RefStats, beta: float = 0.001) -> LossOutput:
    """SPPO, soft form (Wu et al. 2024, arXiv 2405.00675, Eq. 4.7; uclaml/SPPO ``sppo_loss``).

    L = ½·[(ρ(y_w) − η·(P̂_w − ½))² + (ρ(y_l) − η·(P̂_l − ½))²],  η = 1/β,  ρ = ℓ_θ − ℓ_{π_t}.
    P̂ = ``inputs['win_probs']`` (B, 2). Shapes: (B, 2) → (B,). Normalisation: sum.
    """
    rho = _rho(policy, ref, "sppo")
    p = policy.inputs["win_probs"].to(rho.dtype)
    eta = 1.0 / beta
    losses = 0.5 * ((rho[:, 0] - eta * (p[:, 0] - 0.5)) ** 2 + (rho[:, 1] - eta * (p[:, 1] - 0.5)) ** 2)
    return loss_output(losses, beta * rho[:, 0], beta * rho[:, 1])


@register(
    "sppo_single",
    summary="SPPO (single): both log-ratios pulled to ±η·(P(y_w ≻ y_l) − ½) from one pairwise probability",
    paper=SPPO_PAPER,
    arxiv="2405.00675",
    hyperparameters={"beta": SPPO_BETA},
    inputs=("pair_win_prob",),
    required_columns=("pair_win_prob",),
    notes=PREV_NOTE + " inputs['pair_win_prob'] (B,): P(y_w ≻ y_l) from the preference model.",
)
def sppo_single(policy: PolicyStats, ref: RefStats, beta: float = 0.001) -> LossOutput:
    """SPPO, single-probability form (uclaml/SPPO ``sppo_loss``, loss_type "sppo_single").

    L = ½·[(ρ(y_w) − η·(P_wl − ½))² + (ρ(y_l) + η·(P_wl − ½))²],  η = 1/β, P_wl = ``inputs['pair_win_prob']``.
    Shapes: (B, 2) → (B,). Normalisation: sum.
    """
    rho = _rho(policy, ref, "sppo_single")
    p = policy.inputs["pair_win_prob"].to(rho.dtype).reshape(-1)
    eta = 1.0 / beta
    losses = 0.5 * ((rho[:, 0] - eta * (p - 0.5)) ** 2 + (rho[:, 1] + eta * (p - 0.5)) ** 2)
    return loss_output(losses, beta * rho[:, 0], beta * rho[:, 1])


@register(
    "sppo_hard",
    summary="SPPO (hard, TRL's form): P̂ ∈ {1, 0} and no ½ factor",
    paper=SPPO_PAPER,
    arxiv="2405.00675",
    hyperparameters={"beta": Hyper(0.1, 0.0, None, low_open=True, help="β = 1/η (TRL default 0.1)")},
    notes=PREV_NOTE + " Equals TRL's loss_type='sppo_hard'; it is 2× the soft form with P̂_w = 1, P̂_l = 0.",
)
def sppo_hard(policy: PolicyStats, ref: RefStats, beta: float = 0.1) -> LossOutput:
    """SPPO hard (TRL ``dpo_trainer.py`` loss_type "sppo_hard").

    L = (ρ(y_w) − η/2)² + (ρ(y_l) + η/2)²,  η = 1/β. Shapes: (B, 2) → (B,). Normalisation: sum.
    """
    rho = _rho(policy, ref, "sppo_hard")
    half_eta = 0.5 / beta
    losses = (rho[:, 0] - half_eta) ** 2 + (rho[:, 1] + half_eta) ** 2
    return loss_output(losses, beta * rho[:, 0], beta * rho[:, 1])


@register(
    "dno",
    summary="DNO-Prct per-iteration loss: DPO against the previous iterate on large-margin on-policy pairs",
    paper="Direct Nash Optimization: Teaching Language Models to Self-Improve with General Preferences",
    arxiv="2404.03715",
    hyperparameters={"beta": Hyper(0.1, 0.0, None, low_open=True, help="η [UNVERIFIED default]")},
    notes=PREV_NOTE
    + " The method is the pair selection (large win-rate margin, teacher response allowed as y_w), "
    "done by the online loop; the loss is DPO with β = η.",
)
def dno(policy: PolicyStats, ref: RefStats, beta: float = 0.1) -> LossOutput:
    """DNO-Prct per-iteration loss (Rosset et al. 2024, arXiv 2404.03715, Alg. 2).

    L = −log σ(η·[log π_θ(y_w)/π_t(y_w) − log π_θ(y_l)/π_t(y_l)]), η = ``beta``.
    Default η = 0.1 is [UNVERIFIED] (the paper's appendix tunes it).
    Shapes: (B, 2) → (B,). Normalisation: sum.
    """
    require_pairs(policy, "dno")
    chosen, rejected, logits = pair_margin(policy, require_ref(ref, "dno"), beta)
    return loss_output(-logsigmoid(logits), chosen, rejected)


@register(
    "inpo",
    summary="INPO: squared loss on a mix of π_ref and π_t log-ratios with target 1/(2η)",
    paper="Iterative Nash Policy Optimization: Aligning LLMs with General Preferences via No-Regret Learning",
    arxiv="2407.00617",
    hyperparameters={
        "tau": Hyper(0.01, 0.0, None, help="τ: KL strength toward π_ref (must be ≤ η) [UNVERIFIED default]"),
        "eta": Hyper(
            0.1,
            0.0,
            None,
            low_open=True,
            help="η: inverse step size; target margin 1/(2η) [UNVERIFIED default]",
        ),
    },
    inputs=("prev_logps",),
    notes="The reference slot carries the fixed π_ref; inputs['prev_logps'] (B,2): summed log-probs of "
    "the previous iterate π_t on chosen and rejected.",
)
def inpo(policy: PolicyStats, ref: RefStats, tau: float = 0.01, eta: float = 0.1) -> LossOutput:
    """INPO (Zhang et al. 2025, arXiv 2407.00617).

    h = [ℓ_θ(y_w) − ℓ_θ(y_l)] − (τ/η)·[ℓ_ref(y_w) − ℓ_ref(y_l)] − ((η−τ)/η)·[ℓ_t(y_w) − ℓ_t(y_l)],
    L = (h − 1/(2η))²,  ℓ_t = ``inputs['prev_logps']`` (B, 2). With π_t = π_ref it is IPO (sum form,
    τ_IPO = η). Defaults τ = 0.01, η = 0.1 are [UNVERIFIED] (the paper tunes both); τ ≤ η is required
    so the π_t exponent 1 − τ/η stays in [0, 1]. Shapes: (B, 2) → (B,). Normalisation: sum.
    """
    if tau > eta:
        raise ValueError(f"objective 'inpo': tau={tau} must be ≤ eta={eta}")
    require_pairs(policy, "inpo")
    ref = require_ref(ref, "inpo")
    prev = policy.inputs["prev_logps"].to(policy.logps.dtype)
    pi = policy.logps[:, 0] - policy.logps[:, 1]
    h = (
        pi
        - (tau / eta) * (ref.logps[:, 0] - ref.logps[:, 1])
        - ((eta - tau) / eta) * (prev[:, 0] - prev[:, 1])
    )
    losses = (h - 1.0 / (2.0 * eta)) ** 2
    # Logged rewards: η·h_i per response, the win-rate term P(y ≻ π_t) implied by the OMD update.
    h_i = policy.logps - (tau / eta) * ref.logps - ((eta - tau) / eta) * prev  # (B, 2)
    return loss_output(losses, eta * h_i[:, 0], eta * h_i[:, 1], h=h)
