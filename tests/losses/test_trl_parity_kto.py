"""Parity with TRL 1.16's ``KTOTrainer`` (loss_type 'kto' and 'apo_zero_unpaired'): one loss evaluation through
TRL's trainer and through preftune (engine + registry) on the same tiny models and unpaired batch, equal within
1e-5 (float32; relative once a loss exceeds 1).

As in test_trl_parity.py, preftune is fed TRL's own token ids (``prompt_ids``/``completion_ids`` of the trainer's
dataset) and the policy and reference are different random tiny Llamas (seeds 0 and 1). The batch mixes desirable
and undesirable examples in unequal numbers, so the λ_D/λ_U weighting and the reduction are exercised.

Reduction: TRL's loss is ``cat(λ_D·ℓ_desirable, λ_U·ℓ_undesirable).nanmean()`` = (1/B)·Σ_i λ_{y_i}·ℓ_i, a plain mean
over all B examples (not a per-group mean, not divided by the weights); preftune's trainer takes
``losses.sum() / n_global`` of the same weighted per-example losses, so ``losses.mean()`` is the like-for-like
quantity. Over several processes TRL averages per-rank means (of the loss and of z0) where preftune takes
count-weighted global means; the two agree whenever every rank holds the same number of examples.
"""

import pytest
import torch

pytest.importorskip("trl")

from preftune.losses import get  # noqa: E402
from preftune.model.engine import LogProbEngine, pack, policy_stats, reference_stats, scatter_stats  # noqa: E402
from preftune.testing import tiny_model  # noqa: E402

B = 5
TOL = 1e-5
# Two desirable, three undesirable: unequal groups, so a per-group mean would not equal the mean over all examples.
ROWS = [
    (" yes, the helpful answer.", True),
    (" no lazy dog jumps over!", False),
    (" the fox.", True),
    (" maybe the brown sea haiku answer no!", False),
    (" 0 1 2 3", False),
]


def _rows():
    return [
        {"prompt": f"Question {i}: the quick brown fox {'sea ' * i}?", "completion": c, "label": lab}
        for i, (c, lab) in enumerate(ROWS)
    ]


def _kto_trainer(models, trl_trainer, **cfg):
    from trl import KTOConfig, KTOTrainer

    policy, ref, tok = models
    return trl_trainer(KTOTrainer, KTOConfig, _rows(), policy, tok, ref_model=ref, max_length=None, **cfg)


def _trl_loss(trainer):
    """TRL's loss on its first batch (one per-device batch: the unit its KL pairing is built for), its collated
    batch and its logged metrics (z0 is logged as ``kl``)."""
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(B)])
    trainer.model.eval()
    with torch.no_grad():
        loss = float(trainer.compute_loss(trainer.model, batch))
    return loss, batch, {k: v[-1] for k, v in trainer._metrics["eval"].items()}


def _kl_completions(trainer, batch) -> list[list[int]]:
    """The mismatched completions TRL's forward actually saw: the completion-mask span of ``KL_input_ids``.

    TRL builds them once, in ``_prepare_dataset``, by rotating ``completion_ids`` by +1 within each chunk of
    ``per_device_train_batch_size`` consecutive dataset rows (and requires sequential sampling so the chunks are
    its batches); preftune rotates within each micro-batch as sampled (shuffled or length-grouped anew each
    epoch). Within one batch both give prompt i with the completion of example i − 1 (mod B), which is asserted
    here; across epochs TRL keeps the same pairs and preftune draws new ones.
    """
    ds = trainer.train_dataset
    out = []
    for i in range(B):
        ids, mask = batch["KL_input_ids"][i], batch["KL_completion_mask"][i].bool()
        prompt = ids[batch["KL_attention_mask"][i].bool() & ~mask].tolist()
        assert prompt == ds[i]["prompt_ids"], i
        out.append(ids[mask].tolist())
    assert out == [ds[(i - 1) % B]["completion_ids"] for i in range(B)]
    return out


def _seq_logps(model, prompts, completions, pad_id, ref: bool):
    """(B,) summed log-probs of completion i given prompt i, through preftune's engine."""
    packed = pack(prompts, [[c] for c in completions], pad_id)
    if ref:
        return reference_stats(LogProbEngine(model), packed, model, False).logps[:, 0], packed
    out = LogProbEngine(model, prefix_sharing="off")(**packed.tensors())
    return scatter_stats(packed, out["token_logps"], False)[0][:, 0], packed


def _preftune_loss(trainer, batch, models, name, **params):
    # Fresh copies of the same weights: TRL's trainer patches the models it is given (fused LM head).
    policy_model, ref_model, tok = tiny_model("llama", seed=0).eval(), tiny_model("llama", seed=1).eval(), models[2]
    ds = trainer.train_dataset
    prompts = [ds[i]["prompt_ids"] for i in range(B)]
    completions = [ds[i]["completion_ids"] for i in range(B)]
    obj = get(name)
    inputs = {"labels": torch.tensor([ds[i]["label"] for i in range(B)])}
    with torch.no_grad():
        if "kl_logps" in obj.inputs:
            kl = _kl_completions(trainer, batch)
            inputs["kl_logps"] = _seq_logps(policy_model, prompts, kl, tok.pad_token_id, ref=False)[0]
            inputs["ref_kl_logps"] = _seq_logps(ref_model, prompts, kl, tok.pad_token_id, ref=True)[0]
        packed = pack(prompts, [[c] for c in completions], tok.pad_token_id)
        out = LogProbEngine(policy_model, prefix_sharing="off")(**packed.tensors())
        policy, _ = policy_stats(packed, out, need_tokens=False, inputs=inputs)
        ref = reference_stats(LogProbEngine(ref_model), packed, ref_model, False)
    return obj.fn(policy, ref, **obj.resolve(params))


# (TRL KTOConfig fields, preftune objective, its hyperparameters). β = 0.5 moves the sigmoid off its linear
# region; the weights 1.5 / 0.75 check that both apply them per example inside the plain mean.
KTO_CASES = {
    "kto": (dict(loss_type="kto", beta=0.1), "kto", dict(beta=0.1)),
    "kto_weighted": (
        dict(loss_type="kto", beta=0.5, desirable_weight=1.5, undesirable_weight=0.75),
        "kto",
        dict(beta=0.5, desirable_weight=1.5, undesirable_weight=0.75),
    ),
    # TRL computes no KL term for apo_zero_unpaired (calculate_KL is False), nor does preftune's objective.
    "apo_zero_unpaired": (dict(loss_type="apo_zero_unpaired", beta=0.1), "apo_zero_unpaired", dict(beta=0.1)),
    "apo_zero_unpaired_weighted": (
        dict(loss_type="apo_zero_unpaired", beta=0.5, desirable_weight=1.5, undesirable_weight=0.75),
        "apo_zero_unpaired",
        dict(beta=0.5, desirable_weight=1.5, undesirable_weight=0.75),
    ),
}


@pytest.mark.parametrize("case", list(KTO_CASES))
def test_kto_trainer_parity(case, models, trl_trainer):
    cfg, name, params = KTO_CASES[case]
    trainer = _kto_trainer(models, trl_trainer, **cfg)
    trl, batch, metrics = _trl_loss(trainer)
    result = _preftune_loss(trainer, batch, models, name, **params)
    ours = float(result.losses.mean())
    assert abs(trl - ours) <= TOL * max(1.0, abs(trl)), (case, trl, ours)
    # Label-conditional reward means are the same quantity in both (TRL: sum / count per group).
    for key in ("rewards/chosen", "rewards/rejected"):
        assert float(result.metrics[key].nanmean()) == pytest.approx(metrics[key], abs=TOL), key
    if name == "kto":
        # z0 itself, so a compensating error in the loss could not pass; it is far from the clamp here.
        assert metrics["kl"] > 0.05
        assert float(result.metrics["kl"]) == pytest.approx(metrics["kl"], abs=TOL)
