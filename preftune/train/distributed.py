"""Many processes: what ``accelerate launch --config_file configs/accelerate/<name>.yaml`` asked for, what the
loop does differently under it, and what it refuses (docs/distributed.md).

- DDP (``ddp.yaml``): every process holds the whole model; nothing here changes.
- FSDP2 (``fsdp2.yaml``, ``fsdp2_offload.yaml``): ``torch.distributed.fsdp.fully_shard`` through accelerate's
  FSDP plugin (version 2). The engine is the root unit and each decoder layer its own, so the LM head that the
  engine reads directly is gathered for the engine's whole forward. A frozen reference is sharded the same way
  (``shard_frozen``). Checkpoints are one shard per process (train/checkpoint.py); the final model is gathered
  into a plain Hugging Face folder (``gathered_model``).
- DeepSpeed ZeRO-2/3 (``deepspeed_zero2.yaml``, ``deepspeed_zero3.yaml``): the engine goes through
  ``deepspeed.initialize`` (accelerate), configured from the run (``configure_deepspeed``): preftune's micro-batch,
  accumulation and clipping, the loss reduced by preftune alone, and under ZeRO-3 the LM head registered with the
  engine, whose forward reads it. Checkpoints and a live reference under ZeRO-3 are refused (``refusals``).

accelerate only turns FSDP and DeepSpeed on for GPU-like devices: on a machine without one it starts the same
processes as plain data parallel (MULTI_CPU, gloo) and ignores the FSDP settings; with DeepSpeed it lets DeepSpeed
form the process group but counts one process per group. ``adopt_launch`` puts both right, so the path that runs
on GPUs is the one the CPU tests run, instead of silently training unsharded or on one process's data.
"""

from __future__ import annotations

import atexit
import os

import torch

# What preftune runs under each launch, by name (the ``kind`` of a run).
KINDS = ("single", "ddp", "fsdp2", "deepspeed")


def adopt_launch(acc, precision: str = "no") -> None:
    """Check the accelerate launch against what preftune supports; on a CPU-only machine, turn the FSDP2 and
    DeepSpeed that accelerate ignored there back on. Called once, right after the run's Accelerator is made
    with mixed precision ``precision`` (preftune's own: "no" or "bf16")."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    _end_group_at_exit()
    env = os.environ
    mp = env.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if mp not in ("no", precision):
        raise ValueError(
            f"the accelerate config sets mixed_precision: {mp}, but preftune sets precision itself (--precision "
            "fp32|bf16): set mixed_precision: 'no' in the config (as configs/accelerate/*.yaml do) and pass "
            "--precision bf16 to preftune"
        )
    if deepspeed_launch():
        _adopt_deepspeed(acc)
    if env.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return
    version = env.get("FSDP_VERSION", "1")
    if version != "2":
        raise ValueError(
            f"the accelerate config asks for FSDP version {version}; preftune runs FSDP2 only "
            "(fsdp_config: fsdp_version: 2, as in configs/accelerate/fsdp2.yaml)"
        )
    if env.get("FSDP_ACTIVATION_CHECKPOINTING", "false").lower() == "true":
        raise ValueError(
            "the accelerate config sets fsdp_activation_checkpointing: true; preftune's own "
            "--set gradient_checkpointing=true is the one tested under FSDP2: set the config's to false"
        )
    if acc.distributed_type == DistributedType.MULTI_CPU:
        plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables the launcher set
        if acc.state.mixed_precision != "no":
            plugin.set_mixed_precision(acc.state.mixed_precision)
        acc.state.fsdp_plugin = plugin
        acc.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    if not acc.is_fsdp2:
        raise ValueError(f"the launch asks for FSDP2, but accelerate set up {acc.distributed_type}")


def _end_group_at_exit() -> None:
    """Destroy the launch's process group when the process ends. Left to the interpreter's teardown, the gloo
    group's C++ threads are destroyed while still joinable and a worker that has finished its work aborts
    (``terminate called without an active exception``, SIGABRT), failing the whole launch: seen now and then
    under FSDP2 and DeepSpeed on CPU. Registered at exit rather than called at the end of training, so a
    user's script may go on using the group after ``train``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and not _end_group_at_exit.done:
        atexit.register(_destroy_group)
        _end_group_at_exit.done = True


_end_group_at_exit.done = False


def _destroy_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def end_launch(code: int | str | None = 0) -> None:
    """End a process of a multi-process launch now, with exit status ``code``: the process group destroyed,
    output and logs flushed, then ``os._exit``. Even with the group destroyed, a finished worker sometimes still
    aborted in the interpreter's teardown (gloo's C++ objects that a wrapper still referenced, destroyed by static
    destructors while their threads were joinable: SIGABRT, which fails the whole launch). Exiting here skips that
    teardown; everything the run writes is written and closed before. Outside a launch it only raises SystemExit."""
    import logging
    import sys

    status = code if isinstance(code, int) else (0 if code is None else 1)
    if isinstance(code, str):
        print(code, file=sys.stderr)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        raise SystemExit(status)
    _destroy_group()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more to say on it
            pass
    os._exit(status)


def deepspeed_launch() -> bool:
    """Whether the launcher asked for DeepSpeed (then the Accelerator must not be told ``cpu=True``, which
    makes accelerate drop DeepSpeed for plain data parallel)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def _adopt_deepspeed(acc) -> None:
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if acc.distributed_type != DistributedType.DEEPSPEED:
        raise ValueError(f"the launch asks for DeepSpeed, but accelerate set up {acc.distributed_type} "
                         "(is deepspeed installed? `pip install deepspeed`)")
    dist = torch.distributed
    if dist.is_initialized() and acc.num_processes != dist.get_world_size():
        # Without a GPU, accelerate lets DeepSpeed form the process group (gloo) but records a world of one.
        actual = {"num_processes": dist.get_world_size(), "process_index": dist.get_rank(),
                  "local_process_index": int(os.environ.get("LOCAL_RANK", dist.get_rank()))}
        PartialState._shared_state.update(actual)
        acc.state.__dict__.update(actual)


def zero_stage(acc) -> int | None:
    """The DeepSpeed ZeRO stage of the run (None: not DeepSpeed)."""
    from accelerate.utils import DistributedType

    if acc.distributed_type != DistributedType.DEEPSPEED:
        return None
    return int(acc.state.deepspeed_plugin.zero_stage)


def configure_deepspeed(acc, cfg, engine: torch.nn.Module) -> None:
    """Fill the DeepSpeed config from the run, before ``acc.prepare``: the micro-batch, accumulation and
    clipping are preftune's (the accelerate config's values would disagree with the loop), and under ZeRO-3
    the LM head, which the engine reads directly instead of calling, is gathered for the engine's forward."""
    ds = acc.state.deepspeed_plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
    ds["gradient_accumulation_steps"] = cfg.grad_accum
    ds["train_batch_size"] = cfg.batch_size * cfg.grad_accum * acc.num_processes
    ds["gradient_clipping"] = cfg.max_grad_norm if cfg.max_grad_norm is not None else 0.0
    acc.gradient_accumulation_steps = cfg.grad_accum  # accelerate warns when it differs from the config's
    if zero_stage(acc) == 3:
        from deepspeed.runtime.zero import register_external_parameter

        from preftune.model.engine import split_lm

        _, _, head = split_lm(engine.model)
        for p in head.parameters(recurse=False):
            register_external_parameter(engine, p)


def kind(acc) -> str:
    """One of ``KINDS``."""
    from accelerate.utils import DistributedType

    if acc.is_fsdp2:
        return "fsdp2"
    if acc.distributed_type == DistributedType.DEEPSPEED:
        return "deepspeed"
    return "ddp" if acc.num_processes > 1 else "single"


def refusals(cfg, obj, run_kind: str, stage: int | None = None) -> list[str]:
    """What this run asks for that preftune does not run under ``run_kind`` (``stage``: DeepSpeed's ZeRO
    stage), each with the reason."""
    if run_kind not in ("fsdp2", "deepspeed"):
        return []
    name = "FSDP2" if run_kind == "fsdp2" else "DeepSpeed"
    out = []
    if obj.reference == "live_logits":
        out.append(
            f"loss={cfg.loss} needs the reference's full-vocabulary log-probs at every response token, read "
            f"from its LM head outside a forward, which {name} does not gather there; train it with ddp.yaml"
        )
    if cfg.compile:
        out.append(
            f"compile=true compiles each decoder layer in place, which would put {name}'s gather and release "
            f"hooks inside the compiled graph (not tested); train with compile=false under {name}"
        )
    if run_kind == "deepspeed":
        if cfg.save_steps or cfg.resume:
            out.append(
                "checkpoints (save_steps, resume): DeepSpeed keeps the optimizer state partitioned in its own "
                "format, which preftune's checkpoints do not write yet; checkpoint with fsdp2.yaml instead"
            )
        if stage == 3 and cfg.resolved_reference() == "live" and not cfg.lora:
            out.append(
                "a live reference under ZeRO-3 would be a whole unpartitioned copy on every process; use "
                "reference=precompute (or LoRA, whose reference is the base with the adapter off)"
            )
    return out


def shard_frozen(acc, module: torch.nn.Module) -> torch.nn.Module:
    """Shard a frozen module (a reference ``LogProbEngine``) as the policy is sharded: each decoder layer its
    own unit, the module the root. The root reshards after every forward too: a frozen module has no
    backward that would free it, so its gathered head and embeddings would otherwise stay gathered."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    plugin = acc.state.fsdp_plugin
    kwargs = {"reshard_after_forward": True, "offload_policy": plugin.cpu_offload,
              "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy()}
    module.requires_grad_(False)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, module)
    if policy is not None:
        for m in list(module.modules())[1:]:
            if policy(m):
                fully_shard(m, **kwargs)
    fully_shard(module, **kwargs)
    return module


def reshard(module: torch.nn.Module) -> None:
    """Free every gathered FSDP2 unit of ``module``. The root unit stays gathered after a forward until the
    backward that follows, so after a forward without one (evaluation, the reference pass) its parameters
    would be whole tensors, not shards, to whatever reads them next (a checkpoint)."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether ``module``'s parameters are DTensor shards (FSDP2)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def full_state_dict(acc, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of a sharded ``module`` (FSDP2, or ZeRO-3's partitions), gathered to the CPU of the main
    process (empty elsewhere). Collective: every process calls it."""
    if zero_stage(acc) == 3:
        return _zero3_state_dict(acc, module)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _zero3_state_dict(acc, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    # One parameter gathered at a time, so no process ever holds more than one whole tensor besides its part.
    from deepspeed.runtime.zero import GatheredParameters

    params = {id(p) for p in module.parameters()}
    out = {}
    for name, t in module.state_dict(keep_vars=True).items():  # a tied weight appears under each of its names
        if id(t) in params:
            with GatheredParameters([t]):
                whole = t.detach().cpu().clone() if acc.is_main_process else None
        else:
            whole = t.detach().cpu().clone()
        if acc.is_main_process:
            out[name] = whole
    return out
