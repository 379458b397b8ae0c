"""`preftune reward train`: the policy trainer's loop (train/loop.py ``Runner``) with a scoring forward.

Only two things differ from policy training, so only they are written here:

- the forward: each (prompt, response) is one sequence through the seq-cls model; its head outputs
  (B·K, L) become rewards (B, K) (BT), ratings (B, A) (regression) or embeddings (B, 2, 2k) (GPM),
  and the registered objective (``rm_bt``, ``rm_bt_margin``, ``rm_bt_scaled``, ``rm_regression``,
  ``rm_gpm``; losses/reward.py) turns them into per-example losses;
- the final save: a plain ``AutoModelForSequenceClassification`` folder (LoRA merged).

Order, micro-batches, the exact global-batch reduction, evaluation, metrics, checkpoints and resume
are ``Runner``'s. ``eval/rewards/accuracies`` is the held-out pairwise accuracy (GPM: s(y_w ≻ y_l) > 0).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
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
from preftune.train.loop import Runner, disable_dropout
from preftune.train.trainer import TrainResult, make_optimizer, steps_for


class ScoreEngine(torch.nn.Module):
    """The reward model as the loop's engine: (input_ids, attention_mask) → head outputs (N, L)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


@dataclass(frozen=True)
class _Rows:
    """What the loop's metric accumulator needs to know of a batch (no log-probs to log here)."""

    batch_size: int
    num_responses: int = 0


class RewardRunner(Runner):
    def __init__(self, cfg: RewardConfig, acc, model, tokenizer, train_set, eval_set):
        # Runner's attributes, set up for a scoring model: no reference, no log-prob engine.
        self.cfg, self.obj, self.acc = cfg, cfg.objective(), acc
        self.params = self.obj.resolve(cfg.loss_hyperparameters())
        self.tokenizer, self.train_set, self.eval_set = tokenizer, train_set, eval_set
        self.pad_id = model.config.pad_token_id
        self.ref_mode, self.need_tokens, self.loss_state, self.ref_model, self.ref_caches = (
            "none",
            False,
            None,
            None,
            {},
        )
        self.world = acc.num_processes
        self.total, self.per_epoch = steps_for(cfg, len(train_set), self.world)
        self.step, self.history = 0, []

        model.train()
        opt, sched = make_optimizer(cfg, [p for p in model.parameters() if p.requires_grad], self.total)
        self.engine, self.opt, self.sched = acc.prepare(ScoreEngine(model), opt, sched)
        self.base_engine = acc.unwrap_model(self.engine)
        self.out = cfg.output_dir
        self.ckpt_root = self.out / "checkpoints"

    def forward_loss(self, dataset, indices: list[int], grad: bool):
        from preftune.data import collate

        batch = collate([dataset.examples[i] for i in indices])
        b, k = batch.batch_size, batch.num_responses
        ids, mask = pad_right(
            group_sequences(batch.prompt_ids, batch.response_ids), self.pad_id, self.acc.device
        )
        with torch.set_grad_enabled(grad), self.acc.autocast():
            out = self.engine(ids, mask)  # (B·K, L)
        out = out.float().view(b, k, -1)  # (B, K, L)
        inputs = {n: t.to(out.device) for n, t in batch.inputs.items()}
        result = objective_output(self.cfg, self.obj, self.params, out, inputs)
        return result, _Rows(b), batch

    def save_final(self) -> Path | None:
        from preftune.model import save_final

        self.acc.wait_for_everyone()
        target = self.out / "model"
        if self.acc.is_main_process:
            save_final(plain_model(self.base_engine.model), self.tokenizer, target, overwrite=True)
        self.acc.wait_for_everyone()
        return target


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
):
    """Data (validated and tokenised before anything is written), model, optimizer, output folder."""
    from accelerate.utils import set_seed

    from preftune.reward import data as reward_data
    from preftune.train.trainer import make_accelerator

    no_accel = not torch.cuda.is_available() and not torch.backends.mps.is_available()
    acc = make_accelerator(mixed_precision="bf16" if cfg.precision == "bf16" else "no", cpu=no_accel)
    set_seed(cfg.seed)
    if tokenizer is None:
        from preftune.model import load_tokenizer

        tokenizer = load_tokenizer(cfg.model)
    train_set, eval_set = reward_data.prepare(cfg, tokenizer, train_examples, eval_examples, log=acc.print)
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
    out = cfg.output_dir
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "reward_config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=1))
    acc.wait_for_everyone()
    return RewardRunner(cfg, acc, model, tokenizer, train_set, eval_set)


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
    runner.run()
    model_dir = runner.save_final() if cfg.save_model else None
    return TrainResult(cfg.output_dir, model_dir, runner.step, runner.history, runner.base_engine.model)
