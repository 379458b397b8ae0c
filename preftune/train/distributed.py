"""Many processes: what ``accelerate launch --config_file configs/accelerate/<name>.yaml`` asked for, what the
loop does differently under it, and what it refuses (docs/distributed.md).

- DDP (``ddp.yaml``): every process holds the whole model; nothing here changes.
- FSDP2 (``fsdp2.yaml``, ``fsdp2_offload.yaml``): ``torch.distributed.fsdp.fully_shard`` through accelerate's
  FSDP plugin (version 2). The engine is the root unit and each decoder layer its own, so the LM head that the
  engine reads directly is gathered for the engine's whole forward. A frozen reference is sharded the same way
  (``shard_frozen``). Checkpoints are one shard per process (train/checkpoint.py); the final model is gathered
  into a plain Hugging Face folder (``gathered_model``).
- DeepSpeed: see ``refuse_deepspeed``.

accelerate only turns FSDP on for GPU-like devices: on a machine without one it starts the same processes as
plain data parallel (MULTI_CPU, gloo) and ignores the FSDP settings. ``adopt_launch`` turns them back on there,
so the FSDP2 path that runs on GPUs is the one the CPU tests run, instead of silently training unsharded.
"""

from __future__ import annotations

import os

import torch

# What preftune runs under each launch, by name (the ``kind`` of a run).
KINDS = ("single", "ddp", "fsdp2", "deepspeed")


def adopt_launch(acc) -> None:
    """Check the accelerate launch against what preftune supports; on a CPU-only machine, turn the FSDP2
    that accelerate ignored there back on. Called once, right after the run's Accelerator is made."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    env = os.environ
    mp = env.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if mp not in ("no", acc.state.mixed_precision) and acc.distributed_type != DistributedType.DEEPSPEED:
        raise ValueError(
            f"the accelerate config sets mixed_precision: {mp}, but preftune sets precision itself (--precision "
            "fp32|bf16): set mixed_precision: 'no' in the config (as configs/accelerate/*.yaml do) and pass "
            "--precision bf16 to preftune"
        )
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        refuse_deepspeed(acc)
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


def refuse_deepspeed(acc) -> None:
    raise ValueError("DeepSpeed is not supported yet")


def kind(acc) -> str:
    """One of ``KINDS``."""
    from accelerate.utils import DistributedType

    if acc.is_fsdp2:
        return "fsdp2"
    if acc.distributed_type == DistributedType.DEEPSPEED:
        return "deepspeed"
    return "ddp" if acc.num_processes > 1 else "single"


def refusals(cfg, obj, run_kind: str) -> list[str]:
    """What this run asks for that preftune does not run under ``run_kind``, each with the reason."""
    if run_kind != "fsdp2":
        return []
    out = []
    if obj.reference == "live_logits":
        out.append(
            f"loss={cfg.loss} needs the reference's full-vocabulary log-probs at every response token, read "
            "from its LM head outside a forward, where FSDP2 keeps that head sharded; train it with ddp.yaml"
        )
    if cfg.compile:
        out.append(
            "compile=true compiles each decoder layer in place, which would put FSDP2's gather and reshard "
            "hooks inside the compiled graph (not tested); train with compile=false under FSDP2"
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


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether ``module``'s parameters are DTensor shards (FSDP2)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of a sharded ``module``, gathered to the CPU of the main process (empty elsewhere).
    Collective: every process calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
