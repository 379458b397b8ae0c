"""Parity with TRL 1.16 where TRL implements the same objective: the same tiny model, the same batch, one
loss evaluation through TRL's trainer and through preftune (engine + registry), equal within 1e-5 (float32).

preftune is fed the token ids TRL's own tokenisation produced (``prompt_ids``/``chosen_ids``/
``rejected_ids`` of the trainer's dataset), so tokenisation cannot hide or create a mismatch. The policy
and the reference are different random tiny Llamas (seeds 0 and 1), so log-ratios are far from 0.
Every chosen response has the same length: TRL's NLL terms are token means over the whole batch,
preftune's per-sequence token means, and the two agree exactly only then (docs/objectives.md).
"""

import pytest
import torch

pytest.importorskip("trl")

from preftune.losses import get  # noqa: E402
from preftune.model.engine import LogProbEngine, pack, policy_stats, reference_stats  # noqa: E402
from preftune.testing import tiny_model, tiny_tokenizer  # noqa: E402

B = 4
# 1e-5, relative once a loss exceeds 1: sppo_hard's squared errors reach ~50, where float32 rounding of the
# summed log-probs alone moves the loss by ~7e-5.
TOL = 1e-5
REJECTED = [" no lazy dog jumps over!", " the fox.", " maybe the brown sea haiku answer no!", " 0 1 2 3"]


def _rows():
    return [
        {
            "prompt": f"Question {i}: the quick brown fox {'sea ' * i}?",
            "chosen": " yes, the helpful answer.",
            "rejected": REJECTED[i],
        }
        for i in range(B)
    ]


def _dpo_trainer(models, trl_trainer, **cfg):
    from trl import DPOConfig, DPOTrainer

    policy, ref, tok = models
    return trl_trainer(DPOTrainer, DPOConfig, _rows(), policy, tok, ref_model=ref, max_length=None, **cfg)


def _trl_loss(trainer) -> float:
    examples = [trainer.train_dataset[i] for i in range(B)]
    batch = trainer.data_collator(examples)
    trainer.model.eval()
    with torch.no_grad():
        return float(trainer.compute_loss(trainer.model, batch))


def _preftune_loss(trainer, models, name, *, reference=True, **params) -> float:
    # Fresh copies of the same weights: TRL's trainer patches the models it is given (fused LM head).
    policy_model, ref_model, tok = (
        tiny_model("llama", seed=0).eval(),
        tiny_model("llama", seed=1).eval(),
        models[2],
    )
    ds = trainer.train_dataset
    prompts = [ds[i]["prompt_ids"] for i in range(B)]
    responses = [[ds[i]["chosen_ids"], ds[i]["rejected_ids"]] for i in range(B)]
    assert len({len(r[0]) for r in responses}) == 1, "chosen responses must have equal lengths"
    packed = pack(prompts, responses, tok.pad_token_id)
    obj = get(name)
    with torch.no_grad():
        out = LogProbEngine(policy_model, prefix_sharing="off")(**packed.tensors())
        policy, _ = policy_stats(packed, out, need_tokens=obj.token_level)
        ref = (
            reference_stats(LogProbEngine(ref_model), packed, ref_model, obj.token_level)
            if reference
            else None
        )
    return float(obj.fn(policy, ref, **obj.resolve(params)).losses.mean())


# (TRL DPOConfig fields, preftune objective, its hyperparameters)
DPO_CASES = {
    "sigmoid": (dict(loss_type=["sigmoid"], beta=0.1), "dpo", dict(beta=0.1)),
    "hinge": (dict(loss_type=["hinge"], beta=0.1), "hinge", dict(beta=0.1)),
    "ipo": (dict(loss_type=["ipo"], beta=0.1), "ipo", dict(beta=0.1)),
    "robust": (
        dict(loss_type=["robust"], beta=0.1, label_smoothing=0.1),
        "rdpo",
        dict(beta=0.1, label_smoothing=0.1),
    ),
    "exo_pair": (
        dict(loss_type=["exo_pair"], beta=0.1, label_smoothing=1e-3),
        "exo_pair",
        dict(beta=0.1, label_smoothing=1e-3),
    ),
    "nca_pair": (dict(loss_type=["nca_pair"], beta=0.1), "nca_pair", dict(beta=0.1)),
    "bco_pair": (dict(loss_type=["bco_pair"], beta=0.1), "bco_pair", dict(beta=0.1)),  # stateless: δ = 0
    "sppo_hard": (dict(loss_type=["sppo_hard"], beta=0.1), "sppo_hard", dict(beta=0.1)),
    "apo_zero": (dict(loss_type=["apo_zero"], beta=0.1), "apo_zero", dict(beta=0.1)),
    "apo_down": (dict(loss_type=["apo_down"], beta=0.1), "apo_down", dict(beta=0.1)),
    "forward_kl": (
        dict(loss_type=["sigmoid"], beta=0.1, f_divergence_type="forward_kl"),
        "fdpo_forward_kl",
        dict(beta=0.1),
    ),
    "js_divergence": (
        dict(loss_type=["sigmoid"], beta=0.1, f_divergence_type="js_divergence"),
        "fdpo_js",
        dict(beta=0.1),
    ),
    # TRL's coefficient a = 1 − α (preftune follows the paper's α): equal at 0.5, and a = 0.3 ↔ α = 0.7.
    "alpha_divergence_0.5": (
        dict(
            loss_type=["sigmoid"], beta=0.1, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.5
        ),
        "fdpo_alpha",
        dict(beta=0.1, alpha=0.5),
    ),
    "alpha_divergence_0.3": (
        dict(
            loss_type=["sigmoid"], beta=0.1, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3
        ),
        "fdpo_alpha",
        dict(beta=0.1, alpha=0.7),
    ),
    # DPO + NLL: TRL's sigmoid + sft (weights 1, α) against dpo_nll (α = 1).
    "sigmoid+sft": (
        dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 1.0], beta=0.1),
        "dpo_nll",
        dict(beta=0.1, alpha=1.0),
    ),
    "ld_alpha": (dict(loss_type=["sigmoid"], beta=0.1, ld_alpha=0.5), "ld_dpo", dict(beta=0.1, alpha=0.5)),
}


@pytest.mark.parametrize(
    "case", list(DPO_CASES)
)
def test_dpo_trainer_parity(case, models, trl_trainer):
    cfg, name, params = DPO_CASES[case]
    trainer = _dpo_trainer(models, trl_trainer, **cfg)
    trl, ours = _trl_loss(trainer), _preftune_loss(trainer, models, name, **params)
    assert abs(trl - ours) <= TOL * max(1.0, abs(trl)), (case, trl, ours)


# ---------------------------------------------------------------- CPOTrainer (CPO, SimPO) and ORPOTrainer
# Both live in trl.experimental in 1.16 and share the legacy tokenisation: ``chosen_input_ids`` is
# BOS + prompt + response + EOS and ``chosen_labels`` masks the prompt with -100.


def _legacy_trainer(kind: str, trl_trainer, **cfg):
    if kind == "cpo":
        from trl.experimental.cpo import CPOConfig as Config
        from trl.experimental.cpo import CPOTrainer as Trainer
    else:
        from trl.experimental.orpo import ORPOConfig as Config
        from trl.experimental.orpo import ORPOTrainer as Trainer
    return trl_trainer(Trainer, Config, _rows(), tiny_model("llama", seed=0).eval(), tiny_tokenizer(), **cfg)


def _legacy_split(example: dict, side: str) -> tuple[list[int], list[int]]:
    ids, labels = example[f"{side}_input_ids"], example[f"{side}_labels"]
    n_prompt = sum(1 for x in labels if x == -100)
    assert all(x == -100 for x in labels[:n_prompt]), "the prompt must be the masked prefix"
    return ids[:n_prompt], ids[n_prompt:]


def _legacy_losses(trainer, name: str, **params) -> tuple[float, dict, float, dict]:
    """(TRL loss, TRL metrics, preftune loss, preftune metrics) on the trainer's first batch."""
    ds = trainer.train_dataset
    examples = [ds[i] for i in range(B)]
    batch = trainer.data_collator(examples)
    trainer.model.eval()
    with torch.no_grad():
        trl_loss, trl_metrics = trainer.get_batch_loss_metrics(trainer.model, batch)
    prompts, responses = [], []
    for ex in examples:
        prompt, chosen = _legacy_split(ex, "chosen")
        prompt_r, rejected = _legacy_split(ex, "rejected")
        assert prompt == prompt_r
        prompts.append(prompt)
        responses.append([chosen, rejected])
    assert len({len(r[0]) for r in responses}) == 1, "chosen responses must have equal lengths"
    packed = pack(prompts, responses, trainer.processing_class.pad_token_id)
    obj = get(name)
    with torch.no_grad():
        out = LogProbEngine(tiny_model("llama", seed=0).eval(), prefix_sharing="off")(**packed.tensors())
        policy, _ = policy_stats(packed, out, need_tokens=obj.token_level)
        res = obj.fn(policy, None, **obj.resolve(params))
    ours = {k: float(v.mean()) for k, v in res.metrics.items()} if res.metrics else {}
    return float(trl_loss), trl_metrics, float(res.losses.mean()), ours


# (trainer, TRL config fields, preftune objective, its hyperparameters)
CPO_CASES = {
    "cpo": ("cpo", dict(loss_type="sigmoid", beta=0.1, cpo_alpha=1.0), "cpo", dict(beta=0.1, cpo_alpha=1.0)),
    "cpo_smoothed": (
        "cpo",
        dict(loss_type="sigmoid", beta=0.1, cpo_alpha=0.5, label_smoothing=0.2),
        "cpo",
        dict(beta=0.1, cpo_alpha=0.5, label_smoothing=0.2),
    ),
    # TRL's simpo_gamma is γ; preftune's hyperparameter is γ/β (the paper's parameterisation).
    "simpo": (
        "cpo",
        dict(loss_type="simpo", beta=2.0, simpo_gamma=0.5, cpo_alpha=0.0),
        "simpo",
        dict(beta=2.0, gamma_beta_ratio=0.25),
    ),
    # CPO-SimPO: SimPO plus the chosen NLL (sft_weight in preftune).
    "cpo_simpo": (
        "cpo",
        dict(loss_type="simpo", beta=2.0, simpo_gamma=0.5, cpo_alpha=0.5),
        "simpo",
        dict(beta=2.0, gamma_beta_ratio=0.25, sft_weight=0.5),
    ),
}


@pytest.mark.parametrize("case", list(CPO_CASES))
def test_cpo_trainer_parity(case, trl_trainer):
    kind, cfg, name, params = CPO_CASES[case]
    trl, _, ours, _ = _legacy_losses(_legacy_trainer(kind, trl_trainer, **cfg), name, **params)
    assert abs(trl - ours) <= TOL * max(1.0, abs(trl)), (case, trl, ours)


def test_orpo_trainer_parity(trl_trainer):
    """ORPO: the odds-ratio term is equal; the NLL term differs by definition and is compared as such.

    The experimental ORPOTrainer's NLL is the token mean over prompt *and* response tokens of the chosen
    sequence (its comment: "computed over the full prompt and response"); the paper's L_SFT and preftune's
    ``orpo`` use the response tokens. So TRL's loss − TRL's NLL (= −λ·mean log σ(log-odds)) must equal
    preftune's loss − preftune's NLL, and the log-odds ratios must agree.
    """
    trainer = _legacy_trainer("orpo", trl_trainer, beta=0.1)
    trl, trl_m, ours, our_m = _legacy_losses(trainer, "orpo", beta=0.1)
    trl_or, our_or = trl - float(trl_m["nll_loss"]), ours - our_m["nll_loss"]
    assert abs(trl_or - our_or) <= TOL, (trl_or, our_or)
    # TRL's metric names are shifted: its "log_odds_chosen" is the mean log-odds ratio and its "log_odds_ratio"
    # the mean log σ(log-odds ratio).
    assert abs(float(trl_m["log_odds_chosen"]) - our_m["log_odds_ratio"]) <= TOL
    assert abs(float(trl_m["log_odds_ratio"]) + our_m["or_loss"]) <= TOL
    # The NLL definitions really differ here (prompt tokens included or not), so equality would be an accident.
    assert abs(float(trl_m["nll_loss"]) - our_m["nll_loss"]) > 1e-3
