"""The one training loop, for a policy or a reward model: one screenful per phase (setup, step,
evaluate, checkpoint, save).

What differs between the two is the ``Forward``, one micro-batch of examples → the objective's output:
``PolicyForward`` (here) runs the log-prob engine and the reference; ``ScoreForward``
(reward/trainer.py) runs a sequence-classification head. ``Runner`` owns everything else, once: the
optimizer, data order, the exact global-batch reduction, metrics, evaluation, checkpoints and resume.
"""

from __future__ import annotations

import abc
import contextlib
import copy
import functools
import math
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch

from preftune.losses.base import LossOutput, PolicyStats
from preftune.model import critic as critics
from preftune.model import masks
from preftune.model.engine import LogProbEngine, live_reference_inputs, pack, policy_stats, reference_stats
from preftune.train import checkpoint as ckpt
from preftune.train import distributed, dynamics
from preftune.train.config import TrainConfig
from preftune.train.inputs import provide_inputs
from preftune.train.outputs import MetricsLogger, plot_metrics
from preftune.train.trainer import make_optimizer, now, steps_for

if TYPE_CHECKING:
    from preftune.data.collate import GroupBatch


def disable_dropout(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def setup_models(cfg: TrainConfig, model):
    """(policy, frozen reference or None). LoRA needs no reference copy: its reference is the base
    model with the adapter disabled. Full fine-tuning keeps a frozen copy only for a live reference.
    The engine options (``compile``, ``attn_implementation``, ``activation_memory_budget``) are taken as
    they are in ``cfg``: ``engine_choice.resolve`` fills the unset ones first."""
    if cfg.disable_dropout:
        disable_dropout(model)
    ref = None
    if cfg.lora and hasattr(model, "peft_config"):
        pass  # already adapted (the online loop's iterate): its adapter trains on, the base stays the reference
    elif cfg.lora:
        from preftune.model import LoraSettings, apply_lora

        torch.manual_seed(cfg.seed)
        model = apply_lora(model, LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                                                target_modules=cfg.lora_target))
    elif cfg.resolved_reference() == "live":
        from preftune.model import frozen_reference_copy

        # The copy is taken before checkpointing and compiling, which are for the policy only.
        ref = frozen_reference_copy(model)
    _set_attention(cfg, model)
    return _compiled(cfg, _checkpointed(cfg, model)), ref


def _set_attention(cfg: TrainConfig, model) -> None:
    """Switch the policy to ``cfg.attn_implementation`` when it was loaded with another one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if cfg.attn_implementation is not None and base.config._attn_implementation != cfg.attn_implementation:
        base.set_attn_implementation(cfg.attn_implementation)


def _compiled(cfg: TrainConfig, model):
    """Compile every decoder layer in place. Layers, not the whole model: the backbone's mask and cache
    code would break the graph, while the layers are identical, so one compiled graph serves all of them.
    With ``activation_memory_budget`` the layers compile through ``_budget_backend``: inductor with the
    partitioner's budget set while it splits each layer's graph into forward and backward."""
    if not cfg.compile:
        return model
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ValueError(f"compile: found no decoder layers in {type(model).__name__}")
    budget = cfg.activation_memory_budget
    for layer in layers:
        layer.compile(**({} if budget is None else {"backend": _budget_backend(budget)}))
    return model


@functools.cache
def _budget_backend(budget: float):
    """Inductor, partitioning under ``activation_memory_budget``. One backend object per budget: dynamo reuses
    a compiled layer only under the backend it was compiled with, so runs with different budgets in one
    process (and the layers of one run, sharing a graph) each get the partition they asked for."""
    import torch._functorch.config as functorch_config
    from torch._inductor.compile_fx import compile_fx

    def backend(gm, example_inputs):
        with functorch_config.patch(activation_memory_budget=budget):
            return compile_fx(gm, example_inputs)

    return backend


def _checkpointed(cfg: TrainConfig, model):
    if not cfg.gradient_checkpointing:
        return model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ValueError(f"gradient_checkpointing: {type(base).__name__} does not support activation checkpointing")
    # Non-reentrant: works with frozen inputs (LoRA) and with the engine's no-grad reference passes.
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.24: every_n_layers
        base.activation_checkpointing_enable(kwargs, every_n_layers=cfg.checkpoint_every_n_layers)
    elif cfg.checkpoint_every_n_layers == 1:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError("checkpoint_every_n_layers > 1 needs transformers >= 5.24")
    return model


class Micro(NamedTuple):
    """One micro-batch through a forward."""

    result: LossOutput  # the objective's per-example losses, rewards and metrics
    stats: PolicyStats | None  # the policy's log-prob statistics; None for a scoring model
    batch: GroupBatch  # the collated examples (their count and unique tokens)


class Forward(abc.ABC):
    """What a model brings to the loop: one micro-batch of examples → the objective's output.

    ``engine`` is the trained module, the model at ``engine.model``: the Runner builds the optimizer
    over its trainable parameters, has accelerate wrap it, and checkpoints ``engine.model``. A forward
    computes through the wrapped ``runner.engine``, so DDP's gradient hooks see the computation.
    """

    engine: torch.nn.Module
    pad_id: int
    loss_state = None  # the objective's running state (BCO's δ, β-DPO's EMAs), checkpointed; None: stateless
    # Whether this forward has been tested under FSDP2 (two processes ≡ one); the Runner refuses the others.
    supports_sharding = False

    def attach(self, runner: Runner) -> None:  # noqa: B027 (a hook; most forwards need nothing here)
        """Once, after accelerate has prepared the engine and before any step or resume."""

    @abc.abstractmethod
    def __call__(self, runner: Runner, dataset, indices: list[int], grad: bool) -> Micro:
        """Examples ``indices`` of ``dataset`` → the objective's output (gradients only if ``grad``)."""

    @abc.abstractmethod
    def save_final(self, model, tokenizer, target: Path) -> None:
        """Write the trained (unwrapped) ``model`` to ``target``; called on the main process only."""


class PolicyForward(Forward):
    """A causal LM's response log-probs, and the reference's, → a registered preference objective.

    The reference (``TrainConfig.reference``) is a frozen copy (``ref_model``), the base model with the
    LoRA adapter disabled, or log-probs computed before the first step and cached on disk.
    """

    supports_sharding = True

    def __init__(self, cfg: TrainConfig, obj, params: dict, policy, ref_model, tokenizer, critic=None):
        self.cfg, self.obj, self.params = cfg, obj, params
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.engine = LogProbEngine(policy, cfg.logits_chunk, prefix_sharing=cfg.prefix_sharing, fused_head=cfg.compile)
        # Decided now, on the whole model: the check runs the model outside the engine's forward, which a
        # sharded model (FSDP2 gathers the engine's own weights only for the engine's forward) cannot.
        self.engine.shares_prefix()
        self.ref_mode = cfg.resolved_reference()
        self.ref_model = ref_model
        self.need_tokens = obj.token_level  # per-token log-probs of policy and reference (registry)
        self.loss_state = obj.state() if obj.state is not None else None
        self.ref_caches: dict = {}
        # SparsePO: the learned mask network joins the engine (trained, checkpointed); both mask kinds read the
        # live-reference pass (model/masks.py).
        self.engine.token_masks = masks.mask_net_for(obj, params, policy, disable_dropout=cfg.disable_dropout,
                                                     seed=cfg.seed)
        self.reference_needs = {"layer_hidden": masks.learned_masks_needed(obj),
                                 "activation_mask": masks.activation_mask_needed(obj)}
        # OREO: the critic joins the engine (trained in its own parameter group, checkpointed with the policy);
        # `oreo` adds the critic's loss to the policy's, `oreo_value` trains the critic alone (model/critic.py).
        self.engine.critic = critic
        self.engine.policy_kl = "policy_kl" in obj.inputs
        self.value_loss = critics.value_loss_for(obj, params)
        self.tokenizer = tokenizer
        if critic is not None and critics.critic_only(obj):
            policy.requires_grad_(False)

    def attach(self, runner: Runner) -> None:
        if self.engine.critic is not None and runner.kind in ("fsdp2", "deepspeed"):
            raise ValueError(f"objective '{self.obj.name}' trains a critic beside the policy, which is not tested "
                             f"under {runner.kind}; launch it with configs/accelerate/ddp.yaml")
        runner.acc.print(f"prefix sharing: {'on' if self.engine.shares_prefix() else 'off'} "
                         f"({self.engine.prefix_sharing_reason})")
        if self.ref_model is not None and runner.kind == "fsdp2":
            # The frozen copy is sharded like the policy, and as an engine, so its head is gathered with it.
            ref = LogProbEngine(self.ref_model, self.cfg.logits_chunk, prefix_sharing="off")
            self.ref_model = distributed.shard_frozen(runner.acc, ref)
        elif self.ref_model is not None:
            self.ref_model = self.ref_model.to(runner.acc.device)
        # Before anything trains (and before a resume loads trained weights): with a full fine-tune
        # and no frozen copy, the untouched policy is the reference.
        if self.ref_mode == "precompute":
            for ds in (runner.train_set, runner.eval_set):
                if ds is not None and ds.name not in self.ref_caches:  # a caller may hand the cache in
                    self.ref_caches[ds.name] = precompute_reference(self, runner, ds)
            runner.reshard()

    def __call__(self, runner: Runner, dataset, indices: list[int], grad: bool) -> Micro:
        from preftune.data import collate
        from preftune.model.engine import pack_side, split_side, with_side

        acc, engine = runner.acc, runner.base_engine
        batch = collate([dataset.examples[i] for i in indices])
        packed = pack(batch.prompt_ids, batch.response_ids, self.pad_id, device=acc.device,
                      share_prefix=engine.shares_prefix())
        extra = {}
        if self.ref_mode == "live" and self.obj.reference == "live_logits":
            extra = live_reference_inputs(engine, packed, self.ref_model, **self.reference_needs)
        # RDPO/R-ORPO: each pair's (x_rat, rationale) rows join the same policy forward (model/engine.py with_side).
        side = None
        if "rationale_logps" in self.obj.inputs and batch.rationale_ids is not None:
            side = pack_side(batch.rationale_prompt_ids, batch.rationale_ids, self.pad_id, device=acc.device)
        with torch.set_grad_enabled(grad), acc.autocast():
            out = runner.engine(**(packed if side is None else with_side(packed, side, self.pad_id)).tensors(), **extra)
        inputs = batch.inputs
        if side is not None:
            out, r_logps, r_lengths = split_side(packed, side, out)
            inputs = {**inputs, "rationale_logps": r_logps, "rationale_lengths": r_lengths}
        policy, ref = policy_stats(packed, out, need_tokens=self.need_tokens, inputs=inputs)
        if ref is None and self.ref_mode != "none":
            ref = self.reference_for(runner, dataset, indices, packed)
        policy.inputs.update(provide_inputs(runner, self.obj, batch, packed, policy, ref))  # train/inputs.py
        kwargs = dict(self.params)
        if self.loss_state is not None:  # read-only while the Runner evaluates
            kwargs["state"] = self.loss_state
        result = self.obj.fn(policy.to(torch.float32), ref.to(torch.float32) if ref is not None else None, **kwargs)
        if self.value_loss is not None:  # OREO: the critic's loss in the same step (model/critic.py joint_output)
            fn, value_params = self.value_loss
            result = critics.joint_output(result, fn(policy.to(torch.float32), ref.to(torch.float32), **value_params))
        return Micro(result, policy, batch)

    def reference_for(self, runner: Runner, dataset, indices: list[int], packed):
        if dataset.name in self.ref_caches:
            return self.ref_caches[dataset.name].batch(indices, packed.K, self.need_tokens, device=runner.acc.device)
        with runner.acc.autocast():
            return reference_stats(runner.base_engine, packed, self.ref_model, self.need_tokens)

    def save_final(self, model, tokenizer, target: Path) -> None:
        from preftune.model import save_final

        save_final(model, tokenizer, target, merge_lora=self.cfg.merge_lora, overwrite=True)
        if self.engine.token_masks is not None:  # beside the model folder, which stays a plain HF/vLLM folder
            masks.save_mask_net(self.engine.token_masks, target.parent)
        if self.engine.critic is not None:  # output/critic: a token-classification folder (model/critic.py)
            critics.save_critic(self.engine.critic, target.parent / critics.CRITIC_DIR, tokenizer)


class Runner:
    """The loop: micro-batches of ``train_set`` through ``forward``; one optimizer step per global batch."""

    def __init__(self, cfg, forward: Forward, acc, tokenizer, train_set, eval_set):
        self.cfg, self.forward, self.acc = cfg, forward, acc
        self.tokenizer, self.train_set, self.eval_set = tokenizer, train_set, eval_set
        self.loss_state = forward.loss_state
        self.world = acc.num_processes
        self.total, self.per_epoch = steps_for(cfg, len(train_set), self.world)
        self.step, self.history = 0, []
        self.dynamics: dynamics.Dynamics | None = None  # set by run() (train/dynamics.py)
        self.out = cfg.output_dir
        self.ckpt_root = self.out / "checkpoints"
        self.clock = now()  # when the run started (run() restarts it; a resume carries the elapsed time on)
        self.kind = distributed.kind(acc)  # single, ddp, fsdp2, deepspeed (train/distributed.py)
        if self.kind in ("fsdp2", "deepspeed") and not forward.supports_sharding:
            raise ValueError(f"{type(forward).__name__} is not tested under {self.kind}; launch it with "
                             "configs/accelerate/ddp.yaml")

        forward.engine.train()
        trainable = [p for p in forward.engine.parameters() if p.requires_grad]
        # A forward may group its parameters with their own rates (PAL's projectors, prototypes and user weights).
        groups = getattr(forward, "param_groups", None)
        params = groups(trainable) if groups else masks.optimizer_groups(trainable, self.mask_net(forward.engine))
        critic = getattr(forward.engine, "critic", None)  # OREO's critic: its own group and learning rate
        if critic is not None:
            params = critics.optimizer_groups(params, critic, cfg.critic_learning_rate)
        opt, sched = make_optimizer(cfg, params, self.total)
        if self.kind == "deepspeed":
            distributed.configure_deepspeed(acc, cfg, forward.engine)
        self.engine, self.opt, self.sched = acc.prepare(forward.engine, opt, sched)
        self.base_engine = acc.unwrap_model(self.engine)
        forward.attach(self)

    # The policy forward's pad id and reference, where train/inputs.py's providers read them and a
    # caller may swap the reference model.
    @property
    def pad_id(self) -> int:
        return self.forward.pad_id

    @property
    def ref_mode(self) -> str:
        return self.forward.ref_mode

    @property
    def ref_model(self):
        return self.forward.ref_model

    @ref_model.setter
    def ref_model(self, model) -> None:
        self.forward.ref_model = model

    # ------------------------------------------------------------------ data order
    def order(self, epoch: int) -> list[int]:
        from preftune.data import length_grouped_order, shuffled_order

        if not self.cfg.shuffle:  # the data's order is the point (a curriculum)
            return list(range(len(self.train_set)))
        if self.cfg.length_grouping:
            return length_grouped_order(self.train_set.lengths(), self.cfg.batch_size, self.cfg.seed, epoch)
        return shuffled_order(len(self.train_set), self.cfg.seed, epoch)

    def step_micro_batches(self, step: int) -> tuple[list[list[int]], int]:
        """This process's micro-batches (lists of example indices) for global ``step`` and the
        number of examples in the whole global step (all processes)."""
        epoch, pos = divmod(step, self.per_epoch)
        per_step = self.cfg.batch_size * self.cfg.grad_accum * self.world
        order = self.order(epoch)
        global_idx = order[pos * per_step : (pos + 1) * per_step]
        return split_step(global_idx, self.acc.process_index, self.world, self.cfg.batch_size,
                          self.cfg.grad_accum), len(global_idx)

    def forward_loss(self, dataset, indices: list[int], grad: bool) -> Micro:
        return self.forward(self, dataset, indices, grad)

    # ------------------------------------------------------------------ one optimizer step
    def train_step(self) -> dict[str, float]:
        return self._step(*self.step_micro_batches(self.step))

    def step_on(self, examples, ref_cache=None) -> dict[str, float]:
        """One optimizer step on all of ``examples`` (one global batch), for loops that make fresh data for
        every step (online DPO); ``ref_cache`` holds their reference log-probs in the same order."""
        from preftune.train.data_prep import TokenizedSet

        for i, e in enumerate(examples):
            e.index = i
        self.train_set = TokenizedSet(list(examples), "train")
        if ref_cache is not None:
            self.forward.ref_caches["train"] = ref_cache
        mine = list(range(len(examples)))[self.acc.process_index :: self.world]
        bs = self.cfg.batch_size
        busiest = math.ceil(math.ceil(len(examples) / self.world) / bs)  # process 0's micro-batches
        micro = [mine[i : i + bs] for i in range(0, len(mine), bs)]
        metrics = self._step(micro + [[]] * (busiest - len(micro)), len(examples))
        self.step += 1
        self.history.append({"step": self.step, **metrics})
        return metrics

    def _step(self, micro: list[list[int]], n_global: int) -> dict[str, float]:
        """One optimizer step on this process's ``micro``-batches of the global step's ``n_global`` examples.
        An empty micro-batch is a stand-in (``split_step``): a forward and backward on one example whose loss
        counts zero, so that every process runs as many of them as the others."""
        sums: dict[str, torch.Tensor] = {}
        t0, tokens = now(), 0
        # DeepSpeed steps inside backward, at the micro-batch accelerate marks as the last; the loss is
        # reduced here alone (not again by DeepSpeed's accumulation count).
        ds = {"scale_wrt_gas": False} if self.kind == "deepspeed" else {}
        due = self.dynamics is not None and self.dynamics.due(self.step + 1)
        grads = self.dynamics.gradients(self) if due else None
        for i, indices in enumerate(micro):
            sync = i == len(micro) - 1
            self.acc.sync_gradients = sync
            ctx = self.acc.no_sync(self.engine) if not sync else contextlib.nullcontext()
            stand_in = not indices
            with ctx, self.objective_state_kept() if stand_in else contextlib.nullcontext():
                with grads.capture() if grads is not None else contextlib.nullcontext():
                    out = self.forward_loss(self.train_set, indices or [0], grad=True)
                if grads is not None:  # before the backward frees the graph
                    grads.observe(sums, out, stand_in)
                # Sum here, divide by the global example count: exact mean over the global batch.
                loss = out.result.losses.sum() / n_global * self.world
                self.acc.backward(loss * 0.0 if stand_in else loss, **ds)
            # A stand-in counts nothing, but gives its metrics' keys: every process reduces the same ones.
            tokens += 0 if stand_in else out.batch.num_tokens
            _accumulate(sums, out.result, out.batch.batch_size, _logps(out),
                        counted=[False] * out.batch.batch_size if stand_in else None)
        grad_norm = self.clip()
        lr = self.sched.get_last_lr()[0]  # the rate this update uses
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        metrics = self.reduce(sums)
        if due:
            metrics = self.dynamics.finish_step(grads, metrics)
        step_time = now() - t0
        tok_total = float(self.acc.reduce(torch.tensor(float(tokens), device=self.acc.device), "sum"))
        metrics.update(grad_norm=grad_norm, lr=lr, step_time=step_time, **{"tokens/s": tok_total / step_time})
        if getattr(self.base_engine, "critic", None) is not None:
            metrics.update(critic_grad_norm=self.critic_grad_norm, critic_lr=self.critic_lr)
        return metrics

    def clip(self) -> float:
        params = [p for p in self.engine.parameters() if p.requires_grad]
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm is not None else float("inf")
        critic = getattr(self.base_engine, "critic", None)
        if critic is not None:  # OREO: each network clipped on its own, as the authors' two engines
            ids = {id(p) for p in critic.parameters()}
            self.critic_grad_norm = float(self.acc.clip_grad_norm_([p for p in params if id(p) in ids], max_norm))
            self.critic_lr = self.sched.get_last_lr()[-1]  # the rate this update uses (its group is the last)
            params = [p for p in params if id(p) not in ids]
            if not params:  # oreo_value: the critic alone trains
                return self.critic_grad_norm
        return float(self.acc.clip_grad_norm_(params, max_norm))

    def reduce(self, sums: dict) -> dict[str, float]:
        """Means over every example of every micro-batch and process (NaN entries excluded)."""
        keys = sorted(sums)
        if not keys:
            return {}
        vec = torch.stack([torch.stack(sums[k]) for k in keys]).to(self.acc.device)  # (n_keys, 2)
        vec = self.acc.reduce(vec, "sum").cpu()
        return {k: t / c if c > 0 else float("nan") for k, (t, c) in zip(keys, vec.tolist())}

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        sums: dict[str, torch.Tensor] = {}
        idx, counted = eval_shard(len(self.eval_set), self.world, self.acc.process_index)
        bs = self.cfg.batch_size
        with self.evaluating():
            for s in range(0, len(idx), bs):
                out = self.forward_loss(self.eval_set, idx[s : s + bs], grad=False)
                _accumulate(sums, out.result, out.batch.batch_size, _logps(out), counted=counted[s : s + bs])
        self.reshard()
        return {"eval/" + k: v for k, v in self.reduce(sums).items()}

    def reshard(self) -> None:
        """Under FSDP2, back to shards after forwards without a backward (train/distributed.py ``reshard``)."""
        if self.kind == "fsdp2":
            distributed.reshard(self.base_engine)

    @contextlib.contextmanager
    def objective_state_kept(self):
        """The objective's running state as it was before the block (a stand-in micro-batch leaves no trace)."""
        state = self.loss_state
        snapshot = copy.deepcopy(state.state_dict()) if state is not None else None
        try:
            yield
        finally:
            if state is not None:
                state.load_state_dict(snapshot)

    @contextlib.contextmanager
    def evaluating(self):
        """Eval mode, with the objective's state read and not updated: ``training = False`` makes it
        use its running statistics without folding the eval batches in, and the snapshot put back
        afterwards also undoes what evaluation drew from its sampler (β-DPO), so training goes on
        exactly as if it had not evaluated."""
        state = self.loss_state
        snapshot = copy.deepcopy(state.state_dict()) if state is not None else None
        was_training = state.training if state is not None else None
        self.engine.eval()
        if state is not None:
            state.training = False
        try:
            yield
        finally:
            self.engine.train()
            if state is not None:
                state.load_state_dict(snapshot)
                state.training = was_training

    # ------------------------------------------------------------------ the loop
    def run(self) -> None:
        cfg, acc = self.cfg, self.acc
        resumed = self.maybe_resume()
        self.clock = now() - (float(resumed.get("elapsed", 0.0)) if resumed else 0.0)
        logger = MetricsLogger(self.out, enabled=acc.is_main_process, resume_step=self.step if resumed else None)
        bar = _progress(self.total, self.step, enabled=cfg.progress and acc.is_main_process)
        self.dynamics = dynamics.start(self, resumed=resumed is not None)
        try:
            while self.step < self.total:
                metrics = self.train_step()
                self.step += 1
                if self.dynamics is not None and self.dynamics.due(self.step):
                    metrics.update(self.dynamics.measure(self))
                if cfg.eval_steps and self.eval_set is not None and self.step % cfg.eval_steps == 0:
                    metrics.update(self.evaluate())
                if self.step % cfg.logging_steps == 0 or self.step == self.total:
                    self.log(logger, metrics)
                bar.update(1)
                bar.set_postfix(_postfix(metrics), refresh=False)
                if cfg.save_steps and self.step % cfg.save_steps == 0 and self.step < self.total:
                    self.save_checkpoint()
            if self.eval_set is not None and not (cfg.eval_steps and self.step % cfg.eval_steps == 0):
                self.log(logger, self.evaluate())
        finally:
            bar.close()
            logger.close()
        if cfg.plot and acc.is_main_process and (self.out / "metrics.jsonl").exists():
            plot_metrics(self.out / "metrics.jsonl", self.out / "training_curves.png")

    def log(self, logger: MetricsLogger, metrics: dict[str, float]) -> None:
        metrics["elapsed"] = now() - self.clock  # seconds since the run started (resumes included)
        logger.log(self.step, metrics)
        self.history.append({"step": self.step, **metrics})

    # ------------------------------------------------------------------ checkpoints and the final save
    def save_checkpoint(self) -> Path:
        state = {"step": self.step, "total": self.total, "seed": self.cfg.seed, "loss": self.cfg.loss,
                 "elapsed": now() - self.clock}
        self.reshard()
        return ckpt.save_checkpoint(
            self.ckpt_root, self.step, model=self.checkpointed, optimizer=self.opt, scheduler=self.sched,
            trainer_state=state, loss_state=self.loss_state, process_index=self.acc.process_index,
            is_main=self.acc.is_main_process, wait=self.acc.wait_for_everyone, keep=self.cfg.save_total_limit,
            shards=self.shards,
        )

    @staticmethod
    def mask_net(engine):
        return getattr(engine, "token_masks", None)  # SparsePO's learned masks (model/masks.py)

    @property
    def checkpointed(self):
        """What checkpoints hold: the model's trainable weights, and SparsePO's mask network's."""
        model = masks.with_mask_net(self.base_engine.model, self.mask_net(self.base_engine))
        return critics.with_critic(model, getattr(self.base_engine, "critic", None))  # OREO: one file, both

    @property
    def shards(self) -> int | None:
        """Processes holding one shard each of the weights (FSDP2); None: every process holds them whole."""
        return self.world if self.kind == "fsdp2" else None

    def maybe_resume(self) -> dict | None:
        """With ``resume``: load the latest checkpoint and return its trainer state (None: fresh start)."""
        if not self.cfg.resume:
            return None
        found = ckpt.list_checkpoints(self.ckpt_root)
        if not found:
            self.acc.print(f"--resume: no checkpoint in {self.ckpt_root}; starting from step 0")
            return None
        state = ckpt.read_trainer_state(found[-1])
        if state.get("loss") != self.cfg.loss:
            raise ValueError(f"{found[-1]}: checkpoint was trained with loss={state.get('loss')}, not {self.cfg.loss}")
        self.reshard()
        ckpt.load_checkpoint(found[-1], model=self.checkpointed, optimizer=self.opt, scheduler=self.sched,
                             loss_state=self.loss_state, process_index=self.acc.process_index, shards=self.shards)
        self.step = int(state["step"])
        self.acc.print(f"resumed from {found[-1]} at step {self.step}")
        return state

    def save_final(self) -> Path:
        """The trained model in ``output/model``, in the layout its forward defines."""
        self.acc.wait_for_everyone()
        target = self.out / "model"
        model = self.base_engine.model
        self.reshard()
        if self.kind == "fsdp2" or distributed.zero_stage(self.acc) == 3:
            # Gathered into a plain copy on the main process (every process takes part).
            from preftune.model import unsharded_copy

            full = distributed.full_state_dict(self.acc, self.base_engine)  # keyed as the engine's: "model.<name>"
            if self.acc.is_main_process:
                model = unsharded_copy(model, {k.removeprefix("model."): v for k, v in full.items()})
            del full
        if self.acc.is_main_process:
            self.forward.save_final(model, self.tokenizer, target)
        self.acc.wait_for_everyone()
        return target


def split_step(global_idx: list[int], rank: int, world: int, batch_size: int, grad_accum: int) -> list[list[int]]:
    """Process ``rank``'s micro-batches of a global step's examples ``global_idx``: its ``batch_size ×
    grad_accum`` consecutive ones, ``batch_size`` at a time. Forwards and gradient syncs are collective (DDP's
    all-reduce at the last micro-batch, FSDP2's gathers in every forward, DeepSpeed's step), so every process
    runs as many micro-batches as process 0: one short of examples (the last step of an epoch whose examples
    do not fill every process) gets empty ones, which ``Runner._step`` runs as stand-ins counting zero.
    Objectives that pool statistics across processes inside the loss (β-DPO) see the stand-in's example in
    that step's pooled statistics."""
    per_proc = batch_size * grad_accum
    mine = global_idx[rank * per_proc : (rank + 1) * per_proc]
    micro = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    busiest = math.ceil(min(per_proc, len(global_idx)) / batch_size)
    return micro + [[] for _ in range(busiest - len(micro))]


def eval_shard(n: int, world: int, rank: int) -> tuple[list[int], list[bool]]:
    """This process's eval examples and which of them count. Every process gets ⌈n / world⌉ (the
    last few wrap around to the start and are not counted), so all run the same micro-batches and
    collectives inside a forward (β-DPO's gather across processes, FSDP) pair up."""
    if n == 0:
        return [], []
    padded = list(range(n)) + [i % n for i in range((-n) % world)]
    positions = range(rank, len(padded), world)
    return [padded[p] for p in positions], [p < n for p in positions]


def precompute_reference(forward: PolicyForward, runner: Runner, dataset):
    """Reference token log-probs for every example of ``dataset``, from the disk cache when the model,
    data and tokenisation are unchanged; computed once otherwise, each process scoring its share, and
    written (atomically) by one process per machine."""
    from preftune.data import collate
    from preftune.model import is_peft_model
    from preftune.model.reference import (
        ReferenceCache,
        cache_key,
        data_fingerprint,
        default_cache_dir,
        model_fingerprint,
    )

    cfg, acc = runner.cfg, runner.acc
    engine = runner.base_engine
    ref_weights = forward.ref_model if forward.ref_model is not None else engine.model
    key = cache_key(model_fingerprint(ref_weights), data_fingerprint(dataset.examples),
                    {"precision": cfg.precision, "pad": forward.pad_id})
    path = Path(cfg.ref_cache_dir) if cfg.ref_cache_dir else default_cache_dir()
    path = path / f"{key}.safetensors"
    # Every process must take the same branch (under FSDP2 a forward is collective): a hit only when all
    # of them see the file (a cache folder that is not shared between machines misses on the others).
    if _on_every_process(acc, path.exists()):
        acc.print(f"reference log-probs: cache hit {path}")
        return ReferenceCache.load(path)
    acc.print(f"reference log-probs: computing for {len(dataset)} examples on {acc.num_processes} "
              f"process(es) (cached at {path})")
    # Before the first step a full fine-tune's policy *is* the reference (the engine itself, so that a
    # sharded model runs through its engine's forward); LoRA disables its adapter.
    ref_model = forward.ref_model
    if ref_model is None and not is_peft_model(engine.model):
        ref_model = engine
    was_training = engine.training
    engine.eval()
    bs = max(1, cfg.batch_size)
    mine, counted = eval_shard(len(dataset), acc.num_processes, acc.process_index)
    scored: list[tuple[int, list[torch.Tensor]]] = []
    for s in range(0, len(mine), bs):
        idx = mine[s : s + bs]
        batch = collate([dataset.examples[i] for i in idx])
        packed = pack(batch.prompt_ids, batch.response_ids, forward.pad_id, device=acc.device,
                      share_prefix=engine.shares_prefix())
        with acc.autocast():
            ref = reference_stats(engine, packed, ref_model, need_tokens=True)
        for b, i in enumerate(idx):
            if not counted[s + b]:  # a repeat that only keeps the processes' forwards in step
                continue
            lengths = packed.lengths[b, : len(dataset.examples[i].response_ids)].tolist()
            scored.append((i, [ref.token_logps[b, k, : int(n)].float().cpu() for k, n in enumerate(lengths)]))
    engine.train(was_training)
    if acc.num_processes > 1:
        from accelerate.utils import gather_object

        scored = gather_object(scored)
    token_logps: list = [None] * len(dataset)
    for i, logps in scored:
        token_logps[i] = logps
    cache = ReferenceCache(token_logps)
    if acc.is_local_main_process:
        cache.save(path)
    acc.wait_for_everyone()
    return cache


def _on_every_process(acc, flag: bool) -> bool:
    if acc.num_processes == 1:
        return flag
    return bool(acc.gather(torch.tensor([float(flag)], device=acc.device)).min() > 0)


def _logps(out: Micro):
    return out.stats.logps if out.stats is not None else None


def _accumulate(sums: dict, result: LossOutput, batch_size: int, logps=None, counted=None) -> None:
    """Per-example sums and counts of the logged quantities. A metric is a (B,) tensor (a scalar is
    taken as the value of every example); NaN entries mean "not applicable" and are not counted
    (e.g. chosen rewards on the undesirable rows of an unpaired batch), nor are the examples that
    ``counted`` (B bools: eval padding) leaves out. ``logps`` (B, K): the policy's summed
    log-probs, when the forward has them."""
    keep = None if counted is None else torch.as_tensor(counted, dtype=torch.bool)

    def add(key: str, values: torch.Tensor) -> None:
        v = values.detach().float().reshape(-1).cpu()
        if v.numel() == 1 and batch_size > 1:
            v = v.expand(batch_size)
        ok = ~torch.isnan(v)
        if keep is not None:  # (B, …) flattened row by row: each example's entries are contiguous
            ok &= keep.repeat_interleave(v.numel() // batch_size)
        total, count = sums.get(key, (torch.zeros(()), torch.zeros(())))
        sums[key] = (total + v[ok].sum(), count + ok.sum())

    add("loss", result.losses)
    if result.chosen_rewards is not None and result.rejected_rewards is not None:
        add("rewards/chosen", result.chosen_rewards)
        add("rewards/rejected", result.rejected_rewards)
        add("rewards/margins", result.chosen_rewards - result.rejected_rewards)
        add("rewards/accuracies", (result.chosen_rewards > result.rejected_rewards).float())
    if logps is not None and logps.shape[1] >= 2:
        add("logps/chosen", logps[:, 0])
        add("logps/rejected", logps[:, 1])
    for k, v in result.metrics.items():
        if v.dim() == 0 or v.shape[0] == batch_size:
            add(k, v)


def _postfix(m: dict) -> dict:
    keys = {"loss": "loss", "rewards/accuracies": "acc", "rewards/margins": "margin", "tokens/s": "tok/s"}
    return {short: f"{m[k]:.3g}" for k, short in keys.items() if k in m and m[k] is not None and math.isfinite(m[k])}


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)
