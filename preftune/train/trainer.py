"""The training loop on accelerate. Phases, top to bottom: data → model → reference → loop → save.

Reduction happens here, once: every micro-batch contributes ``sum(losses) / examples in the global
step``, scaled by the process count to undo DDP's gradient averaging. Gradient accumulation and data
parallelism therefore give the same gradient as one big batch.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from preftune.train import distributed
from preftune.train.config import TrainConfig


@dataclass
class TrainResult:
    output_dir: Path
    model_dir: Path | None
    steps: int
    metrics: list[dict] = field(default_factory=list)
    model: object = None  # the trained (possibly PEFT-wrapped) model, still in memory


def build_runner(cfg: TrainConfig, *, train_examples=None, eval_examples=None, tokenizer=None, model=None,
                 ref_cache=None, eval_ref_cache=None):
    """Everything up to the first optimizer step: data (validated and tokenised before anything is
    written), models, optimizer, output folder. Returns the ``loop.Runner`` with a policy forward.

    ``ref_cache``: the training examples' reference log-probs, already computed by the caller (the online
    loop scores its samples under π_0, π_t or APO's extrapolation); with it nothing is precomputed.
    ``eval_ref_cache``: the same for the eval examples (a curriculum stage's refreshed reference)."""
    from preftune.train import data_prep, engine_choice, loop

    obj = cfg.objective()
    params = obj.resolve(cfg.loss_hyperparameters())
    acc = start_run(cfg)
    refused = distributed.refusals(cfg, obj, distributed.kind(acc), distributed.zero_stage(acc))
    if refused:
        raise ValueError(f"not run under {distributed.kind(acc)}: " + "; ".join(refused))
    if model is not None and distributed.kind(acc) in ("fsdp2", "deepspeed"):
        raise ValueError("under FSDP2 and DeepSpeed preftune loads the model itself (cfg.model): sharding replaces "
                         "a passed-in model's weights in place, under the caller's feet")

    # ---- data
    if tokenizer is None:
        from preftune.model import load_tokenizer

        tokenizer = load_tokenizer(cfg.model)
    train_set, eval_set = data_prep.prepare(cfg, obj, tokenizer, train_examples, eval_examples, log=acc.print)

    # ---- model
    model_passed = model is not None
    if model is None:
        from preftune.model import load_model

        model, _ = load_model(cfg.model, dtype="float32", attn_implementation=cfg.attn_implementation)
    if cfg.ches_filter is not None:  # scored with the initial policy, before adapters or compilation
        train_set, ches_dropped = ches_filter(cfg, model, tokenizer, train_set, acc, ref_cache)
    cfg, _ = engine_choice.resolve(cfg, model, acc, model_passed=model_passed)  # engine: auto | plain
    from preftune.model.critic import critic_for

    critic = critic_for(cfg, obj, model)  # OREO: from the initial model, before any adapter (model/critic.py)
    policy, ref_model = loop.setup_models(cfg, model)

    open_output(cfg, acc, "train_config.json")  # the first write
    if cfg.ches_filter is not None and acc.is_main_process:
        write_jsonl(cfg.output_dir / "ches_dropped.jsonl", ches_dropped)
    forward = loop.PolicyForward(cfg, obj, params, policy, ref_model, tokenizer, critic=critic)
    if ref_cache is not None:
        forward.ref_caches[train_set.name] = ref_cache
    if eval_ref_cache is not None and eval_set is not None:
        forward.ref_caches[eval_set.name] = eval_ref_cache
    return loop.Runner(cfg, forward, acc, tokenizer, train_set, eval_set)


def train(cfg: TrainConfig, *, train_examples=None, eval_examples=None, tokenizer=None, model=None,
          ref_cache=None, eval_ref_cache=None) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data`` with objective ``cfg.loss``.

    Library callers may pass already-derived ``train_examples``/``eval_examples`` (data.Example lists)
    and/or an already-loaded ``model``/``tokenizer`` (the demo does, to reuse what it sampled with).
    Nothing is written to ``cfg.output`` until the data has been validated and the model loaded.
    With ``cfg.curriculum`` on, the stages are built from ``cfg.data`` (train/curriculum.py).
    """
    if cfg.curriculum != "off":
        if train_examples is not None or ref_cache is not None:
            raise ValueError("curriculum builds its stages from cfg.data; for pairs of your own call "
                             "preftune.train.curriculum.train_stages")
        from preftune.train.curriculum import train_curriculum

        return train_curriculum(cfg, eval_examples=eval_examples, tokenizer=tokenizer, model=model)
    if cfg.margin_models and train_examples is None:
        raise ValueError("margin_models are scored before training by preftune.reward.margins: call "
                         "train_with_margins(cfg) there (what `preftune train` runs)")
    runner = build_runner(cfg, train_examples=train_examples, eval_examples=eval_examples,
                          tokenizer=tokenizer, model=model, ref_cache=ref_cache, eval_ref_cache=eval_ref_cache)
    return run_to_end(runner)


def run_to_end(runner) -> TrainResult:
    """Run the loop, then save the final model when the config asks for it."""
    runner.run()
    model_dir = runner.save_final() if runner.cfg.save_model else None
    return TrainResult(runner.cfg.output_dir, model_dir, runner.step, runner.history, runner.base_engine.model)


def ches_filter(cfg: TrainConfig, model, tokenizer, train_set, acc, ref_cache=None):
    """``(train set without the cfg.ches_filter fraction of highest length-normalised CHES pairs, rows of the
    dropped)`` (data/ches.py; Razin et al. 2024, Section 6). Indices in the rows are positions in the
    unfiltered training set; the kept pairs are re-indexed from 0."""
    from preftune.data.ches import ches_scores, top_fraction
    from preftune.train.data_prep import TokenizedSet

    if ref_cache is not None:
        raise ValueError("ches_filter drops training pairs, which a reference cache passed in is indexed by")
    examples, home = train_set.examples, next(model.parameters()).device
    pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    scores = ches_scores(model.to(acc.device), examples, pad_id=pad, batch_size=cfg.batch_size, device=acc.device,
                         precision=cfg.precision, progress=cfg.progress and acc.is_main_process)
    model.to(home)  # the run places (or shards) the model itself
    drop = top_fraction(scores.normalised, cfg.ches_filter)
    rows = [{"index": i, "source": examples[i].source, "line": examples[i].line, "ches_ln": scores.normalised[i],
             "ches": scores.raw[i]} for i in drop]
    gone = set(drop)
    kept = [e for i, e in enumerate(examples) if i not in gone]
    for i, e in enumerate(kept):
        e.index = i
    acc.print(f"ches_filter={cfg.ches_filter}: dropped {len(drop)} of {len(examples)} training pairs (highest "
              f"length-normalised CHES under the initial policy), {len(kept)} kept; list in ches_dropped.jsonl")
    return TokenizedSet(kept, train_set.name), rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def start_run(cfg):
    """The run's Accelerator (bf16 autocast when asked), with every seed set from ``cfg.seed``."""
    from accelerate.utils import set_seed

    # cpu=True when there is no accelerator: only then does accelerate form a gloo process group
    # from torchrun / `accelerate launch` environment variables on a CPU machine.
    # DeepSpeed is the exception: with cpu=True accelerate would drop it for plain data parallel; without
    # cpu=True it lets DeepSpeed's CPU accelerator form the group (train/distributed.py).
    no_accel = not torch.cuda.is_available() and not torch.backends.mps.is_available()
    no_accel = no_accel and not distributed.deepspeed_launch()
    acc = make_accelerator(mixed_precision="bf16" if cfg.precision == "bf16" else "no", cpu=no_accel)
    set_seed(cfg.seed)
    return acc


def open_output(cfg, acc, config_name: str) -> None:
    """Create the output folder and record the run's config there (main process; others wait)."""
    out = cfg.output_dir
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".{config_name}.tmp"
        tmp.write_text(json.dumps(cfg.model_dump(mode="json"), indent=1))
        tmp.replace(out / config_name)  # never a half-written config
    acc.wait_for_everyone()


def make_accelerator(**kwargs):
    """An Accelerator with this run's settings. accelerate keeps one process-wide AcceleratorState and
    refuses a second Accelerator with another precision; anything that ran earlier in the process (a
    previous run, a notebook cell, another library's Trainer) may have fixed one. Only that state is
    reset: the process group (PartialState) of a distributed launch stays as it is."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    # The loop steps the schedule once per optimizer step, over steps counted for the global batch
    # (steps_for); accelerate's default would step it once per process, decaying it num_processes times
    # too fast in any multi-process run.
    kwargs.setdefault("step_scheduler_with_optimizer", False)
    acc = Accelerator(**kwargs)
    # FSDP2 and DeepSpeed on CPU processes too; refuses what preftune does not run.
    distributed.adopt_launch(acc, kwargs.get("mixed_precision") or "no")
    return acc


def steps_for(cfg: TrainConfig, n_examples: int, world: int) -> tuple[int, int]:
    """(total optimizer steps, steps per epoch) for ``n_examples`` groups."""
    per_step = cfg.batch_size * cfg.grad_accum * world
    per_epoch = max(1, math.ceil(n_examples / per_step))
    total = cfg.max_steps if cfg.max_steps is not None else max(1, math.ceil(per_epoch * cfg.epochs))
    return total, per_epoch


def lr_lambda(cfg: TrainConfig, total: int):
    warm = int(round(cfg.warmup_ratio * total))

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if cfg.scheduler == "constant":
            return 1.0
        progress = (step - warm) / max(1, total - warm)
        if cfg.scheduler == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1 - progress)

    return f


def make_optimizer(cfg, params: list[torch.nn.Parameter], total: int):
    """AdamW over ``params`` (the fused kernel where torch has one for them) and the LR schedule.

    The fused kernel updates each tensor in one pass; the default multi-tensor (foreach) path makes
    several passes and allocates temporaries the size of all parameters, which on CPU costs ~0.4 s and
    ~0.5 GiB per step at 135M parameters (docs/benchmarks.md).
    """
    flat = [q for p in params for q in (p["params"] if isinstance(p, dict) else [p])]  # tensors or param groups
    fused = bool(flat) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in flat)
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=cfg.adam_betas, weight_decay=cfg.weight_decay,
                            fused=fused or None)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total))


def now() -> float:
    return time.perf_counter()
