"""preftune.model: loading (HF folder, hub id, local GGUF, aliases, adapter folders), LoRA, reference
handling, saving.

Names are resolved on first use (PEP 562), so ``import preftune.model`` loads neither torch,
transformers, peft nor pydantic; the functions import what they need when called.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "preftune.model.loading": (
        "ACCEPTED_SPECS",
        "ALIASES",
        "BASE_SPEC_ATTR",
        "ModelNotFoundError",
        "adapter_base",
        "base_spec",
        "convert_gguf",
        "convert_gguf_cached",
        "default_cache_dir",
        "ensure_pad_token",
        "is_adapter_folder",
        "is_quantized",
        "load_adapter_folder",
        "load_model",
        "load_tokenizer",
        "resolve_model",
    ),
    "preftune.model.lora": (
        "LoraSettings",
        "apply_lora",
        "frozen_reference_copy",
        "is_peft_model",
        "reference_logits_context",
        "save_final",
        "unsharded_copy",
        "unwrap_model",
    ),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'preftune.model' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
