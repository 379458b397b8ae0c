"""``engine: auto``: the fastest measured engine settings for this model, machine and precision.

What it chooses is only how the same step is computed, never what it computes: compiling the decoder
layers, the attention implementation, and how much of the compiled layers' activations backward recomputes
instead of keeping (``activation_memory_budget``). Each choice gives the plain engine's numbers to float
rounding (tests/train/test_engine_choice.py); none touches the objective, the optimizer, clipping or the
data. An option set in the config always wins over the choice.

The rules come from measurements (docs/benchmarks.md, "engine: auto"). On a CPU, compiled layers with eager
attention (inductor fuses the attention math; the CPU flash kernel's backward was the slowest non-matmul op)
was the fastest bf16 configuration measured (3.6x TRL on the AMX host). A 0.2 activation memory budget
(AOTAutograd's partitioner recomputes the attention probabilities, norms, weight casts and one MLP
projection per layer in backward) brings SmolLM2-135M's bf16 peak at 120/120 from 4.05 to 2.90 GiB (0.58x
TRL). Its cost in step time, and the fp32 choice, still have to be measured at 2 threads on the AMD host.
Where nothing was measured (GPUs, LoRA, sharded runs) auto keeps the plain engine and says so.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass

# Compiling costs ~10–40 s once per shape class; below this size the whole run is usually shorter than that.
MIN_PARAMS_FOR_COMPILE = 20_000_000
# Share of a compiled layer's activations kept for backward under auto (torch._functorch.config
# activation_memory_budget: 1.0 = the partitioner's speed-first default, 0.0 = recompute the whole layer).
AUTO_MEMORY_BUDGET = 0.2
# (device type, precision) -> what auto turns on there; measured rows only.
AUTO_RULES: dict[tuple[str, str], dict] = {
    ("cpu", "bf16"): {"compile": True, "attn_implementation": "eager", "activation_memory_budget": AUTO_MEMORY_BUDGET},
    ("cpu", "fp32"): {"compile": True, "attn_implementation": "eager", "activation_memory_budget": AUTO_MEMORY_BUDGET},
}
TUNED = ("compile", "attn_implementation", "activation_memory_budget")
ATTENTION_OPTIONS = ("eager", "sdpa", "flash_attention_2")  # TrainConfig.attn_implementation


@dataclass(frozen=True)
class EngineChoice:
    compile: bool
    attn_implementation: str | None  # None: unknown (the model's own)
    activation_memory_budget: float | None  # None: torch's default (1.0)
    reason: str

    def describe(self) -> str:
        attn = self.attn_implementation or "model default"
        budget = self.activation_memory_budget
        budget = "" if budget is None else f", activation memory budget {budget:g}"
        return f"compile={'on' if self.compile else 'off'}, attention {attn}{budget} ({self.reason})"

    def updates(self) -> dict:
        """The config fields this choice sets (an attention the config cannot name, e.g. a custom one the
        caller registered, stays unset there)."""
        out = {k: getattr(self, k) for k in TUNED}
        if out["attn_implementation"] not in ATTENTION_OPTIONS:
            out["attn_implementation"] = None
        return out


def choose(cfg, model, *, device_type: str, run_kind: str = "single", model_passed: bool = False) -> EngineChoice:
    """The engine settings for ``cfg`` on ``model`` (already loaded, float32 master weights).

    ``run_kind``: train/distributed.py ``kind`` (compile is refused under FSDP2 and DeepSpeed).
    ``model_passed``: the caller handed the model in (the online loop samples with it between training
    phases): auto then leaves it as it is, since compiling layers and switching attention act in place.
    """
    explicit = {k: getattr(cfg, k) for k in TUNED if getattr(cfg, k) is not None}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    loaded = {"attn_implementation": getattr(base.config, "_attn_implementation", None)}  # what it runs now
    if cfg.engine == "plain":
        return _with({**loaded, **explicit}, "engine=plain")
    rule = AUTO_RULES.get((device_type, cfg.precision))
    n_params = sum(p.numel() for p in model.parameters())
    why_not = None
    if rule is None:
        why_not = f"no measurement on {device_type} at {cfg.precision}: plain engine"
    elif model_passed:
        why_not = "the model was passed in by the caller: left as it is (compile and attention act in place)"
    elif run_kind in ("fsdp2", "deepspeed"):
        why_not = f"compiled layers are not run under {run_kind}"
    elif cfg.lora:
        why_not = "LoRA: no faster configuration measured yet"
    elif n_params < MIN_PARAMS_FOR_COMPILE:
        why_not = f"{n_params / 1e6:.2g} M parameters: compiling would take longer than it saves"
    elif device_type == "cpu" and not _cpp_compiler():
        why_not = "no C++ compiler found for torch.compile's CPU kernels"
    elif not _has_decoder_layers(model):
        why_not = f"{type(model).__name__} has no transformers decoder layers to compile"
    if why_not is not None:
        return _with({**loaded, **explicit}, f"auto: {why_not}")
    reason = (f"auto: {device_type} {cfg.precision}, {n_params / 1e6:.0f} M parameters: the fastest configuration "
              "measured within 0.6x TRL's memory (docs/benchmarks.md)")
    if cfg.precision == "bf16" and device_type == "cpu" and not cpu_has_native_bf16():
        reason += "; this CPU has no AVX512-BF16/AMX, so bf16 matmuls are emulated and fp32 is faster here"
    if explicit:
        reason += "; set in the config: " + ", ".join(explicit)
    return _with({**rule, **explicit}, reason)


def _with(values: dict, reason: str) -> EngineChoice:
    return EngineChoice(bool(values.get("compile", False)), values.get("attn_implementation"),
                        values.get("activation_memory_budget"), reason)


def _cpp_compiler() -> bool:
    import os

    return any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c)


def _has_decoder_layers(model) -> bool:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return any(isinstance(m, GradientCheckpointingLayer) for m in model.modules())


def cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return True  # unknown: say nothing
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve(cfg, model, acc, *, model_passed: bool):
    """``cfg`` with the engine options filled in by ``choose`` (they land in train_config.json), and the
    choice; the choice and its reason are printed on the main process."""
    from preftune.train import distributed

    choice = choose(cfg, model, device_type=acc.device.type, run_kind=distributed.kind(acc), model_passed=model_passed)
    acc.print(f"engine: {choice.describe()}")
    return cfg.model_copy(update=choice.updates()), choice
