"""Unpaired / binary-feedback objectives (LOSSES.md part C): KTO, BCO, unpaired APO-zero.

The batch is a K = 1 grid: ``policy.logps`` (B, 1), ``ref.logps`` (B, 1) and ``policy.inputs['labels']``
(B, 1) or (B,) bool, True for a desirable example. ``LossOutput.chosen_rewards``/``rejected_rewards`` are
None; the per-example rewards go to the metrics as ``rewards/chosen`` (B,) — NaN on undesirable rows —
and ``rewards/rejected`` (NaN on desirable rows). NaN means "not applicable": the trainer's reduction
skips it, so the logged values are label-conditional means over the whole global batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from preftune.losses.base import LossOutput, PolicyStats, RefStats
from preftune.losses.functional import logsigmoid
from preftune.losses.pairwise import RunningMean, _all_reduce_sum
from preftune.losses.registry import Hyper, register

BETA = Hyper(
    0.1, 0.0, None, low_open=True, help="inverse temperature β of the implicit reward β·log(π/π_ref)"
)
LAMBDA_D = Hyper(1.0, 0.0, None, help="λ_D: weight of desirable examples")
LAMBDA_U = Hyper(1.0, 0.0, None, help="λ_U: weight of undesirable examples")


def _unpaired(policy: PolicyStats, ref: RefStats, name: str) -> tuple[Tensor, Tensor]:
    """(B,) log-ratios ρ and (B,) bool labels of a K = 1 batch."""
    if policy.num_responses != 1:
        raise ValueError(
            f"objective '{name}' needs unpaired rows (K=1 response per prompt), got K={policy.num_responses}"
        )
    if "labels" not in policy.inputs:
        raise ValueError(f"objective '{name}' needs policy.inputs['labels'] (desirable = True)")
    rho = policy.logps[:, 0] - ref.logps[:, 0]
    labels = policy.inputs["labels"].reshape(-1).bool()
    return rho, labels


def _unpaired_out(losses: Tensor, rewards: Tensor, labels: Tensor, **metrics: Tensor) -> LossOutput:
    r = rewards.detach()
    d = labels.reshape(r.shape).bool()
    nan = torch.full_like(r, float("nan"))
    m = {"rewards/chosen": torch.where(d, r, nan), "rewards/rejected": torch.where(d, nan, r)}
    m.update({k: v.detach() for k, v in metrics.items()})
    return LossOutput(losses, None, None, m)


def kto_reference_point(kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """KTO's z0 = max(0, mean_j[ℓ_θ(y'_j|x_j) − ℓ_ref(y'_j|x_j)]) over the global batch, detached.

    The mean is count-weighted over all ranks when torch.distributed is initialised.
    """
    diff = (kl_logps.detach() - ref_kl_logps.detach()).reshape(-1).to(torch.float64)
    stats = _all_reduce_sum(torch.stack([diff.sum(), torch.tensor(float(diff.numel()), dtype=torch.float64)]))
    z0 = (stats[0] / stats[1].clamp(min=1)).clamp(min=0)
    return z0.to(kl_logps.dtype)


@register(
    "kto",
    summary="KTO: prospect-theoretic value of unpaired good/bad examples around a KL baseline z0",
    paper="KTO: Model Alignment as Prospect Theoretic Optimization (Eq. 7)",
    arxiv="2402.01306",
    shape="unpaired",
    min_responses=1,
    inputs=("labels", "kl_logps", "ref_kl_logps"),
    hyperparameters={
        "beta": BETA,
        "desirable_weight": LAMBDA_D,
        "undesirable_weight": LAMBDA_U,
        "z0": Hyper(
            0.0,
            0.0,
            None,
            help="fixed reference point (log-ratio units), used only when the "
            "mismatched-pair inputs kl_logps/ref_kl_logps are absent",
        ),
    },
    notes="z0 from mismatched (prompt, completion) pairs: inputs kl_logps / ref_kl_logps (B,), batch mean "
    "over all ranks (count-weighted), clamped ≥ 0, detached, in log-ratio units (inside β). Without them "
    "the fixed z0 hyperparameter is used. Recommended λ_D·n_D/(λ_U·n_U) ∈ [1, 4/3].",
)
def kto(
    policy: PolicyStats,
    ref: RefStats,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    z0: float = 0.0,
) -> LossOutput:
    """KTO (Ethayarajh et al., arXiv 2402.01306, Eq. 7; TRL ``KTOTrainer`` loss_type 'kto').

    ρ = ℓ_θ(y) − ℓ_ref(y) (sums). z0 = max(0, mean(kl_logps − ref_kl_logps)) over the global batch,
    detached (or the fixed ``z0``). Desirable: λ_D·[1 − σ(β(ρ − z0))]; undesirable:
    λ_U·[1 − σ(β(z0 − ρ))]. Normalisation: sum. Shapes: (B, 1) + labels (B,) → (B,).
    """
    rho, labels = _unpaired(policy, ref, "kto")
    inputs = policy.inputs
    if "kl_logps" in inputs and "ref_kl_logps" in inputs:
        ref_point = kto_reference_point(inputs["kl_logps"], inputs["ref_kl_logps"]).to(rho.dtype)
    else:
        ref_point = torch.tensor(float(z0), dtype=rho.dtype, device=rho.device)
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (rho - ref_point)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (ref_point - rho)))
    losses = torch.where(labels, desirable, undesirable)
    return _unpaired_out(losses, beta * rho, labels, kl=ref_point)


@register(
    "bco",
    summary="BCO (unpaired): binary classifier on implicit rewards shifted by their running mean δ",
    paper="Binary Classifier Optimization for Large Language Model Alignment",
    arxiv="2404.04656",
    shape="unpaired",
    min_responses=1,
    inputs=("labels",),
    state=RunningMean,
    hyperparameters={
        "beta": BETA,
        "min_density_ratio": Hyper(0.5, 0.0, None, help="UDM: lower clamp of the undesirable weight"),
        "max_density_ratio": Hyper(10.0, 0.0, None, help="UDM: upper clamp of the undesirable weight"),
    },
    notes="δ as bco_pair (cumulative count-weighted mean of all rewards, updated before the loss, all ranks; "
    "state=None ⇒ δ = 0). UDM: the prompt classifier is not part of the loss; if the engine supplies "
    "inputs['udm_ratio'] (B,) = p(des|x)/(1 − p(des|x)) it is clamped and weights undesirable examples, "
    "otherwise the weight is 1.",
)
def bco(
    policy: PolicyStats,
    ref: RefStats,
    beta: float = 0.1,
    min_density_ratio: float = 0.5,
    max_density_ratio: float = 10.0,
    state: RunningMean | None = None,
) -> LossOutput:
    """BCO, unpaired (Jung et al., arXiv 2404.04656; TRL BCOTrainer ``bco_loss``).

    r = βρ; δ = running mean of all r (this batch included, detached); desirable −log σ(r − δ);
    undesirable w(x)·[−log σ(−(r − δ))], w = clamp(udm_ratio, min, max) when ``inputs['udm_ratio']`` is
    given, else 1. Normalisation: sum. Shapes: (B, 1) + labels (B,) → (B,).
    """
    rho, labels = _unpaired(policy, ref, "bco")
    r = beta * rho
    delta = torch.zeros((), dtype=r.dtype, device=r.device) if state is None else state.update(r)
    desirable = -logsigmoid(r - delta)
    undesirable = -logsigmoid(-(r - delta))
    ratio = policy.inputs.get("udm_ratio")
    if ratio is not None:
        undesirable = (
            undesirable * ratio.reshape(-1).to(r.dtype).clamp(min_density_ratio, max_density_ratio).detach()
        )
    losses = torch.where(labels, desirable, undesirable)
    return _unpaired_out(losses, r, labels, delta=delta)


@register(
    "apo_zero_unpaired",
    summary="APO-zero on unpaired data: desirable 1 − σ(βρ), undesirable σ(βρ)",
    paper="Anchored Preference Optimization and Contrastive Revisions: Addressing Underspecification in "
    "Alignment (Eq. 7, unpaired)",
    arxiv="2408.06266",
    shape="unpaired",
    min_responses=1,
    inputs=("labels",),
    hyperparameters={"beta": BETA, "desirable_weight": LAMBDA_D, "undesirable_weight": LAMBDA_U},
)
def apo_zero_unpaired(
    policy: PolicyStats,
    ref: RefStats,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> LossOutput:
    """Unpaired APO-zero (arXiv 2408.06266; TRL KTOTrainer loss_type 'apo_zero_unpaired').

    Desirable: λ_D·[1 − σ(βρ)]; undesirable: λ_U·σ(βρ). Normalisation: sum.
    Shapes: (B, 1) + labels (B,) → (B,).
    """
    rho, labels = _unpaired(policy, ref, "apo_zero_unpaired")
    r = beta * rho
    losses = torch.where(
        labels, desirable_weight * (1 - torch.sigmoid(r)), undesirable_weight * torch.sigmoid(r)
    )
    return _unpaired_out(losses, r, labels)
