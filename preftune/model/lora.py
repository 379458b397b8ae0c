"""LoRA adapters, the reference policy, and saving the final model.

The reference policy of the DPO family is the model before training. With LoRA it is the base model
with the adapter switched off (``reference_logits_context``), which costs no memory; for a full
fine-tune it has to be a frozen copy (``frozen_reference_copy``). ``save_final`` writes the output
folder atomically, in the layout ``from_pretrained`` (and vLLM) load.
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class LoraSettings(BaseModel):
    """LoRA hyper-parameters (Hu et al., 2021, arXiv:2106.09685); the update is ``(alpha / r) * B @ A``."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(16, ge=1, description="Rank of the low-rank update.")
    alpha: float = Field(32.0, gt=0, description="Scale numerator: the update is multiplied by alpha / r.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter's input.")
    target_modules: str | list[str] = Field(
        "all-linear",
        description="'all-linear' (every linear layer but the LM head) or module names, e.g. ['q_proj'].",
    )
    bias: Literal["none", "all", "lora_only"] = Field(
        "none",
        description="Which biases train. Anything but 'none' changes the base model (no free reference).",
    )


def apply_lora(model, settings: LoraSettings | None = None):
    """Wrap ``model`` in a ``peft.PeftModel`` with fresh LoRA adapters (B = 0: it starts equal to the base).

    Only the adapter weights are trainable afterwards; base weights are frozen in place (shared, not copied).
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    if isinstance(model, PeftModel):
        raise TypeError("model already has adapters (it is a PeftModel); apply_lora expects a plain model")
    settings = settings or LoraSettings()
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        bias=settings.bias,
        task_type="CAUSAL_LM",
    )
    with quiet_peft_deprecations():
        return get_peft_model(model, config)


@contextlib.contextmanager
def quiet_peft_deprecations() -> Iterator[None]:
    """Silence the one deprecation that PEFT itself triggers on every wrap, while it wraps a model.

    ``PeftModel.__init__`` of peft 0.21 reads ``model.is_gradient_checkpointing``, which transformers
    5.23 deprecated (FutureWarning) in favour of ``is_activation_checkpointing``. The call is inside
    PEFT, so preftune cannot use the new name there; the filter matches only that message, so any
    other warning still shows.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def is_peft_model(model) -> bool:
    """Whether ``model`` (possibly wrapped by DDP / torch.compile) is a ``peft.PeftModel``."""
    try:
        from peft import PeftModel
    except ImportError:  # no peft installed: nothing can be a PeftModel
        return False
    return isinstance(unwrap_model(model), PeftModel)


def unwrap_model(model):
    """Peel DDP-style ``.module`` and torch.compile's ``._orig_mod`` wrappers off a model."""
    import torch

    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        else:
            return model


@contextlib.contextmanager
def reference_logits_context(model, reference=None) -> Iterator:
    """Yield a model whose forward is the reference policy, under ``torch.no_grad`` and in eval mode.

    - ``model`` is a PeftModel: the same object with its adapters disabled (``disable_adapter``),
      i.e. exactly the base model, with no second copy of the weights.
    - otherwise: ``reference`` (e.g. from ``frozen_reference_copy``) is yielded; it is required.

    Eval mode (restored per module on exit) because the reference is a fixed function: dropout
    noise in it would bias every log-ratio. A PeftModel whose adapters train biases
    (``bias != "none"``) is refused: disabling the adapters does not undo a bias update, so the
    disabled model would no longer be the starting policy.
    """
    import torch

    if reference is None:
        if not is_peft_model(model):
            raise TypeError(
                "a full fine-tune has no built-in reference: pass reference=frozen_reference_copy(model) "
                "(made before training starts), or train with LoRA (apply_lora) for a free reference"
            )
        inner = unwrap_model(model)
        trained_bias = {
            name: cfg.bias
            for name, cfg in inner.peft_config.items()
            if getattr(cfg, "bias", "none") != "none"
        }
        if trained_bias:
            raise ValueError(
                f"adapters {trained_bias} train biases of the base model, so disabling them does not restore "
                "the reference policy; use bias='none' or a frozen_reference_copy made before training"
            )
        adapters_off = inner.disable_adapter()
        target = model
    else:
        adapters_off = contextlib.nullcontext()
        target = reference
    modes = [(module, module.training) for module in unwrap_model(target).modules()]
    try:
        unwrap_model(target).eval()
        with adapters_off, torch.no_grad():
            yield target
    finally:
        for module, training in modes:
            module.training = training


def frozen_reference_copy(model, *, dtype=None):
    """A deep copy of ``model`` for use as the reference of a full fine-tune: eval mode, no gradients.

    Memory: one more full set of weights on the same device (parameters x bytes per value, e.g.
    135M x 4 B = 0.54 GB for SmolLM2-135M in float32, 14 GB for a 7B model in bfloat16) but no
    gradients or optimiser state. Pass ``dtype=torch.bfloat16`` to halve it for a float32 policy
    (the reference log-probs then carry bfloat16 rounding). Make it before training starts. With
    LoRA, prefer ``reference_logits_context``, which needs no copy.
    """
    reference = copy.deepcopy(unwrap_model(model))
    if dtype is not None:
        reference = reference.to(dtype)
    reference.eval()
    reference.requires_grad_(False)
    return reference


def save_final(
    model, tokenizer, out_dir: str | Path, *, merge_lora: bool = False, overwrite: bool = False
) -> Path:
    """Write the trained model and its tokenizer to ``out_dir`` atomically; return ``out_dir``.

    - full fine-tune: ``out_dir`` is a plain HF folder (``AutoModelForCausalLM.from_pretrained(out_dir)``).
    - PeftModel: ``out_dir`` holds the adapter (``adapter_config.json`` + ``adapter_model.safetensors``,
      loadable with ``preftune.model.load_model(out_dir)``, or ``peft.PeftModel.from_pretrained(base,
      out_dir)`` on the loaded base); with ``merge_lora`` also ``out_dir/merged``, a
      plain HF folder with the adapter folded into the weights (model + tokenizer, loadable by vLLM).
      Merging works on a temporary copy (one more set of weights in memory while saving), so
      ``model`` stays a trainable PeftModel.
      ``merge_lora`` is ignored for a model without adapters.
      The adapter's ``base_model_name_or_path`` is the base's portable spec when ``load_model``
      loaded it (``loading.base_spec``: the alias ``smollm2-135m-instruct``, a hub id, or the folder
      given), not the machine-local GGUF conversion cache that the weights were read from.

    Everything is written to ``<out_dir>.tmp-xxxxxxxx`` first and renamed into place, so a crash
    leaves either the old folder or the new one, never a half-written one. An existing ``out_dir``
    is replaced whole when it is empty or a model folder (a previous save: it has ``config.json`` or
    ``adapter_config.json``); any other non-empty folder only with ``overwrite=True``, so a run
    folder with checkpoints and logs is never swept away by mistake. Pass the unwrapped model, on
    the main process only.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not (overwrite or _replaceable(out_dir)):
        raise FileExistsError(
            f"{out_dir} exists and is not a model folder; save into a new folder, or pass overwrite=True "
            "to replace it and everything in it"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        _write_model_folder(unwrap_model(model), tokenizer, tmp, merge_lora=merge_lora)
        _swap_into_place(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def unsharded_copy(model, state_dict: dict):
    """A plain CPU copy of ``model`` (a Hugging Face model, PEFT-wrapped or not) holding ``state_dict``: the
    full weights of a sharded (FSDP2) ``model`` gathered on one process, keyed as ``model.state_dict()``.

    The copy is built on the meta device and its tensors assigned from ``state_dict`` (no initialisation, no
    second copy); buffers that a state dict leaves out (rotary frequencies) come from ``model``, which keeps
    them whole on every process. ``save_final`` then writes it as it writes any model.
    """
    import itertools

    import torch
    from torch.distributed.fsdp import FSDPModule

    from preftune.model.loading import BASE_SPEC_ATTR

    peft = is_peft_model(model)
    base = model.get_base_model() if peft else model
    cls = next(c for c in type(base).__mro__ if not issubclass(c, FSDPModule))  # FSDP2 subclasses in place
    with torch.device("meta"):
        out = cls(copy.deepcopy(base.config))
    out.generation_config = copy.deepcopy(getattr(base, "generation_config", None))
    for attr in ("name_or_path", BASE_SPEC_ATTR):  # what _save_adapter records as the adapter's base
        if attr in base.__dict__:
            out.__dict__[attr] = base.__dict__[attr]
    if peft:
        from peft import get_peft_model

        names = list(model.peft_config)
        with quiet_peft_deprecations():
            out = get_peft_model(out, copy.deepcopy(model.peft_config[names[0]]), adapter_name=names[0])
            for name in names[1:]:
                out.add_adapter(name, copy.deepcopy(model.peft_config[name]))
    out.load_state_dict(state_dict, strict=True, assign=True)
    for name, buf in model.named_buffers():
        owner_name, _, leaf = name.rpartition(".")
        owner = out.get_submodule(owner_name)
        if owner._buffers.get(leaf) is not None and owner._buffers[leaf].is_meta:
            owner._buffers[leaf] = buf.detach().cpu().clone()
    (out.get_base_model() if peft else out).tie_weights()  # assignment unties shared embeddings
    left = [n for n, t in itertools.chain(out.named_parameters(), out.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"the gathered state dict lacks {left[:3]}: cannot rebuild {cls.__name__} from it")
    return out.eval()


# Files that mark a folder as a saved model (full weights, or an adapter).
_MODEL_MARKERS = ("config.json", "adapter_config.json")


def _replaceable(folder: Path) -> bool:
    """An existing folder save_final may replace: empty, or holding a previously saved model."""
    if not folder.is_dir():
        return False
    return not any(folder.iterdir()) or any((folder / name).is_file() for name in _MODEL_MARKERS)


def _write_model_folder(model, tokenizer, folder: Path, *, merge_lora: bool) -> None:
    """``save_pretrained`` of model (adapter, or full weights) and tokenizer into a new ``folder``."""
    folder.mkdir()
    if is_peft_model(model):
        _save_adapter(model, folder)
    else:
        model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if merge_lora and is_peft_model(model):
        # merge_and_unload rewrites the model in place; work on a copy so training can go on.
        merged = copy.deepcopy(model).merge_and_unload()
        merged.save_pretrained(folder / "merged")
        if tokenizer is not None:
            tokenizer.save_pretrained(folder / "merged")
        del merged


def _save_adapter(model, folder: Path) -> None:
    """``save_pretrained`` of a PeftModel, recording the base's portable spec as ``base_model_name_or_path``.

    While saving, each adapter config names the local folder the base weights were read from: PEFT's
    save looks the recorded base up (locally, else on the hub) to check the vocabulary size, and the
    local folder answers that without a network. The files are then rewritten with the portable spec
    (``loading.base_spec``), because for an alias or a GGUF that local folder is this machine's
    conversion cache. A base not loaded by ``load_model`` (built from a config, say) keeps PEFT's record.
    """
    from preftune.model.loading import ADAPTER_CONFIG, BASE_SPEC_ATTR

    base = model.get_base_model()
    local = base.__dict__.get("name_or_path") or None
    configs = list(model.peft_config.values())
    recorded = [config.base_model_name_or_path for config in configs]
    try:
        for config in configs:
            config.base_model_name_or_path = local or config.base_model_name_or_path
        model.save_pretrained(folder)
    finally:
        for config, name in zip(configs, recorded, strict=True):
            config.base_model_name_or_path = name
    portable = getattr(base, BASE_SPEC_ATTR, None)
    if not portable:
        return
    for config_path in folder.rglob(ADAPTER_CONFIG):  # one per adapter (extra adapters in subfolders)
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["base_model_name_or_path"] = portable
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")


def _swap_into_place(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``; an existing ``target`` is moved aside first, then deleted."""
    if not target.exists():
        new.rename(target)
        return
    old = target.with_name(f"{target.name}.old-{uuid.uuid4().hex[:8]}")
    target.rename(old)
    try:
        new.rename(target)
    except OSError:
        old.rename(target)  # put the previous folder back rather than leave nothing
        raise
    shutil.rmtree(old, ignore_errors=True)
