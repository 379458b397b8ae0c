"""`preftune reward train`: the one training loop (train/loop.py ``Runner``) with a scoring forward.

``ScoreForward`` is all that differs from policy training:

- the forward: each (prompt, response) is one sequence through the seq-cls model; its head outputs
  (B·K, L) become rewards (B, K) (BT), ratings (B, A) (regression) or embeddings (B, 2, 2k) (GPM),
  and the registered objective (``rm_bt``, ``rm_bt_margin``, ``rm_bt_scaled``, ``rm_regression``,
  ``rm_gpm``; losses/reward.py) turns them into per-example losses;
- the final save: a plain ``AutoModelForSequenceClassification`` folder (LoRA merged).

Order, micro-batches, the exact global-batch reduction, the optimizer, evaluation, metrics,
checkpoints and resume are ``Runner``'s. ``eval/rewards/accuracies`` is the held-out pairwise
accuracy (GPM: s(y_w ≻ y_l) > 0).
"""

from __future__ import annotations

from pathlib import Path

import torch

from preftune.reward.config import RewardConfig
from preftune.reward.model import (
    apply_reward_lora,
    build_reward_model,
    group_sequences,
    pad_right,
    plain_model,
)
from preftune.train.loop import Forward, Micro, Runner, disable_dropout
from preftune.train.trainer import TrainResult, open_output, run_to_end, start_run


class ScoreEngine(torch.nn.Module):
    """The reward model as the loop's engine: (input_ids, attention_mask) → head outputs (N, L)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


class ScoreForward(Forward):
    """A seq-cls model's head outputs per (prompt, response) → a registered reward objective."""

    def __init__(self, cfg: RewardConfig, model):
        self.cfg, self.obj = cfg, cfg.objective()
        self.params = self.obj.resolve(cfg.loss_hyperparameters())
        self.pad_id = model.config.pad_token_id  # the head pools at the last non-pad token
        self.engine = ScoreEngine(model)
        self.loss_state = self.obj.state() if self.obj.state is not None else None

    def __call__(self, runner: Runner, dataset, indices: list[int], grad: bool) -> Micro:
        from preftune.data import collate

        batch = collate([dataset.examples[i] for i in indices])
        b, k = batch.batch_size, batch.num_responses
        ids, mask = pad_right(group_sequences(batch.prompt_ids, batch.response_ids), self.pad_id, runner.acc.device)
        with torch.set_grad_enabled(grad), runner.acc.autocast():
            out = runner.engine(ids, mask)  # (B·K, L)
        out = out.float().view(b, k, -1)  # (B, K, L)
        inputs = {n: t.to(out.device) for n, t in batch.inputs.items()}
        result = objective_output(self.cfg, self.obj, self.params, out, inputs)
        if self.cfg.loss == "rm_carm" and not grad:  # eval/context_acc, eval/context_free_acc (reward/carm.py)
            from preftune.reward.carm import add_context_metrics

            add_context_metrics(self, runner, dataset, indices, result, out[..., 0])
        return Micro(result, None, batch)

    def save_final(self, model, tokenizer, target: Path) -> None:
        from preftune.model import save_final

        save_final(plain_model(model), tokenizer, target, overwrite=True)


def objective_output(cfg: RewardConfig, obj, params: dict, out: torch.Tensor, inputs: dict):
    """Head outputs (B, K, L) → the registered objective's LossOutput (losses (B,) and metrics)."""
    from preftune.losses import PolicyStats

    b, k, _ = out.shape
    zeros = torch.zeros(b, k, device=out.device)
    if cfg.kind == "bt":  # rewards (B, 2): chosen, rejected
        return obj.fn(PolicyStats(out[..., 0], zeros, inputs=inputs), None, **params)
    if cfg.kind == "gpm":  # embeddings (B, 2, 2k)
        result = obj.fn(PolicyStats(zeros, zeros, inputs={**inputs, "gpm_embeddings": out}), None, **params)
        result.metrics["preference_prob"] = torch.sigmoid(result.metrics["preference_score"] / params["tau"])
        return result
    # regression: one response per example, one head per attribute → (B, A)
    pred = out[:, 0, :]
    targets = torch.stack([inputs[f"target:{a}"] for a in cfg.attributes], dim=1)
    valid = torch.stack([inputs[f"mask:{a}"] for a in cfg.attributes], dim=1) > 0
    result = obj.fn(
        PolicyStats(pred, torch.zeros_like(pred), valid=valid, inputs={"targets": targets}), None, **params
    )
    err = (pred.detach() - targets).abs() * valid
    result.metrics["mae"] = err.sum(1) / valid.sum(1).clamp(min=1)
    for i, a in enumerate(cfg.attributes):  # NaN where unrated: not counted in the mean
        result.metrics[f"mae/{a}"] = torch.where(
            valid[:, i], err[:, i], torch.full_like(err[:, i], float("nan"))
        )
    return result


def build_reward_runner(
    cfg: RewardConfig, *, train_examples=None, eval_examples=None, tokenizer=None, model=None
) -> Runner:
    """Data (validated and tokenised before anything is written), model, optimizer, output folder."""
    from preftune.reward import data as reward_data

    acc = start_run(cfg)
    if tokenizer is None:
        from preftune.model import load_tokenizer

        tokenizer = load_tokenizer(cfg.model)
    users: list[str] = []  # PAL's user table, filled from the training data
    train_set, eval_set = reward_data.prepare(cfg, tokenizer, train_examples, eval_examples, log=acc.print,
                                              users=users)
    if cfg.kind in ("pal_a", "pal_b"):
        return _pal_runner(cfg, acc, tokenizer, train_set, eval_set, users, model)
    if model is None:
        model = build_reward_model(cfg, tokenizer)
    else:
        from preftune.reward.model import describe, set_pad

        if model.config.num_labels != cfg.num_labels:
            raise ValueError(
                f"the model has {model.config.num_labels} outputs; {cfg.loss} needs {cfg.num_labels}"
            )
        set_pad(model, tokenizer)
        describe(model, cfg)
    if cfg.disable_dropout:
        disable_dropout(model)
    if cfg.lora:
        torch.manual_seed(cfg.seed)
        model = apply_reward_lora(model, cfg)
    open_output(cfg, acc, "reward_config.json")
    return Runner(cfg, ScoreForward(cfg, model), acc, tokenizer, train_set, eval_set)


def _pal_runner(cfg, acc, tokenizer, train_set, eval_set, users, model) -> Runner:
    """PAL (reward/pal.py): backbone + heads + user table; ``model`` may be a PALModel (library callers)."""
    from preftune.reward import pal

    if not users:  # examples passed in by a caller: the table is their user indices
        users = [str(i) for i in range(1 + max(int(e.inputs["user_index"]) for e in train_set.examples))]
    model = model if model is not None else pal.build_pal_model(cfg, tokenizer, users)
    if cfg.disable_dropout:
        disable_dropout(model)
    if cfg.lora and not cfg.freeze_backbone:
        torch.manual_seed(cfg.seed)
        model = pal.apply_backbone_lora(model, cfg)
    open_output(cfg, acc, "reward_config.json")
    return Runner(cfg, pal.PALForward(cfg, model), acc, tokenizer, train_set, eval_set)


def train_reward(
    cfg: RewardConfig, *, train_examples=None, eval_examples=None, tokenizer=None, model=None
) -> TrainResult:
    """Train a reward / preference model; ``TrainResult.model`` is the trained (possibly PEFT) model.

    Library callers may pass derived ``train_examples``/``eval_examples`` (data.Example lists; for
    rm_regression with ``target:<a>``/``mask:<a>`` inputs) and an already-built seq-cls ``model``.
    """
    runner = build_reward_runner(
        cfg, train_examples=train_examples, eval_examples=eval_examples, tokenizer=tokenizer, model=model
    )
    return run_to_end(runner)
