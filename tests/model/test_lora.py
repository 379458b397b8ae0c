"""LoRA adapters, the reference policy (adapter off / frozen copy) and the saved output folder."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from pydantic import ValidationError

from preftune.model import (
    LoraSettings,
    apply_lora,
    frozen_reference_copy,
    is_peft_model,
    reference_logits_context,
    save_final,
)
from preftune.testing import ARCHES, tiny_model, tiny_tokenizer

PROMPTS = ["The quick brown fox jumps over the lazy dog.", "Which answer is better? yes"]


def _batch():
    tok = tiny_tokenizer()
    return tok(PROMPTS, return_tensors="pt", padding=True)  # right-padded: exercises the mask


def token_logps(model, batch):
    """Per-token log p(x_t | x_<t), zeroed at padding: (B, T-1)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    logps = logits.float().log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return logps * batch["attention_mask"][:, 1:]


def _perturb_adapters(peft_model, scale: float = 0.5, seed: int = 1):
    """Give every lora_B non-zero values (fresh adapters have B = 0 and change nothing)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def _lora_peft(arch="llama", seed=0, **settings):
    model = tiny_model(arch, seed=seed)
    peft_model = apply_lora(model, LoraSettings(r=4, alpha=8, **settings))
    _perturb_adapters(peft_model)
    return peft_model


# ------------------------------------------------------------------------------------ settings / apply


def test_settings_defaults_and_validation():
    s = LoraSettings()
    assert (s.r, s.alpha, s.dropout, s.target_modules, s.bias) == (16, 32.0, 0.0, "all-linear", "none")
    with pytest.raises(ValidationError):
        LoraSettings(r=0)
    with pytest.raises(ValidationError):
        LoraSettings(rank=8)  # unknown keys are typos, not silently ignored
    with pytest.raises(ValidationError):
        LoraSettings(bias="some")


def test_apply_lora_trains_exactly_the_adapters_of_all_linear_layers():
    model = tiny_model("llama")
    linears = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head")
    }
    assert len(linears) == 2 * 7  # q k v o gate up down, two layers
    expected = sum(4 * (m.in_features + m.out_features) for m in linears.values())
    peft_model = apply_lora(model, LoraSettings(r=4, alpha=8))
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert all("lora_A" in n or "lora_B" in n for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == expected
    assert is_peft_model(peft_model) and not is_peft_model(tiny_model("llama"))
    with pytest.raises(TypeError, match="already has adapters"):
        apply_lora(peft_model)


def test_apply_lora_with_named_targets():
    peft_model = apply_lora(tiny_model("qwen2"), LoraSettings(r=2, target_modules=["q_proj", "v_proj"]))
    adapted = {
        n.split(".lora_")[0].split(".")[-1] for n, p in peft_model.named_parameters() if p.requires_grad
    }
    assert adapted == {"q_proj", "v_proj"}


# ---------------------------------------------------------------------------------- the reference


@pytest.mark.parametrize("arch", ARCHES)
def test_reference_context_is_the_base_model_after_training_the_adapter(arch):
    batch = _batch()
    model = tiny_model(arch).eval()
    with torch.no_grad():
        base = token_logps(model, batch)
    peft_model = apply_lora(model, LoraSettings(r=4, alpha=8))
    _perturb_adapters(peft_model)
    peft_model.eval()
    with torch.no_grad():
        adapted = token_logps(peft_model, batch)
    assert (adapted - base).abs().max() > 1e-2  # the adapter matters

    peft_model.train()
    with reference_logits_context(peft_model) as ref:
        assert ref is peft_model  # the same weights, no second copy
        assert not torch.is_grad_enabled()
        assert not any(m.training for m in ref.modules())  # no dropout noise in the reference
        reference = token_logps(ref, batch)
    torch.testing.assert_close(reference, base, atol=1e-6, rtol=0)

    # On exit: adapters back on, grad and train mode as they were.
    assert torch.is_grad_enabled() and all(m.training for m in peft_model.modules())
    peft_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(token_logps(peft_model, batch), adapted, atol=1e-6, rtol=0)


def test_reference_context_restores_mixed_train_modes():
    peft_model = _lora_peft()
    peft_model.train()
    frozen_block = peft_model.get_base_model().model.layers[0]
    frozen_block.eval()
    before = {name: m.training for name, m in peft_model.named_modules()}
    with reference_logits_context(peft_model):
        pass
    assert {name: m.training for name, m in peft_model.named_modules()} == before


def test_reference_context_refuses_bias_training_adapters():
    peft_model = apply_lora(tiny_model("gpt2"), LoraSettings(r=2, bias="all"))
    with pytest.raises(ValueError, match="train biases"):
        with reference_logits_context(peft_model):
            pass


def test_reference_context_for_full_fine_tune_needs_a_copy():
    batch = _batch()
    policy = tiny_model("llama")
    with pytest.raises(TypeError, match="frozen_reference_copy"):
        with reference_logits_context(policy):
            pass
    reference_copy = frozen_reference_copy(policy)
    with torch.no_grad():
        before = token_logps(policy.eval(), batch)
        for p in policy.parameters():  # "training" moves the policy, not the copy
            p.add_(0.05)
    with reference_logits_context(policy, reference=reference_copy) as ref:
        assert ref is reference_copy
        torch.testing.assert_close(token_logps(ref, batch), before, atol=0, rtol=0)


def test_frozen_reference_copy_is_detached_and_frozen():
    policy = tiny_model("llama").train()
    ref = frozen_reference_copy(policy)
    assert not ref.training and not any(m.training for m in ref.modules())
    assert not any(p.requires_grad for p in ref.parameters())
    assert all(p.requires_grad for p in policy.parameters()) and policy.training  # policy untouched
    for (name, p), q in zip(policy.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr(), name
    half = frozen_reference_copy(policy, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


# ---------------------------------------------------------------------------------------- saving


def _logits(model, batch):
    with torch.no_grad():
        return model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_save_lora_with_merge_loads_as_plain_model_with_same_logits(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    batch, tok = _batch(), tiny_tokenizer()
    peft_model = _lora_peft("llama")
    expected = _logits(peft_model, batch)
    out = save_final(peft_model, tok, tmp_path / "out", merge_lora=True)

    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "merged"} <= names
    assert "model.safetensors" not in names  # the adapter folder holds only the adapter
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert type(merged).__name__ == "LlamaForCausalLM" and not any(
        "lora" in n for n, _ in merged.named_parameters()
    )
    assert "quantization_config" not in json.loads((out / "merged" / "config.json").read_text())
    torch.testing.assert_close(_logits(merged, batch), expected, atol=1e-5, rtol=0)
    assert AutoTokenizer.from_pretrained(out / "merged").chat_template == tok.chat_template

    reloaded = PeftModel.from_pretrained(tiny_model("llama"), out)  # adapter on a fresh copy of the base
    torch.testing.assert_close(_logits(reloaded, batch), expected, atol=1e-6, rtol=0)

    # The merge worked on a copy: the training model still has its adapters and outputs.
    assert is_peft_model(peft_model)
    torch.testing.assert_close(_logits(peft_model, batch), expected, atol=0, rtol=0)


def _trained_lora(arch="llama", steps=3):
    """A LoRA model after a few real optimiser steps (the adapters are no longer B = 0), in eval mode."""
    batch = _batch()
    model = apply_lora(tiny_model(arch), LoraSettings(r=4, alpha=8))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    for _ in range(steps):
        (-token_logps(model, batch).sum()).backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def test_saved_adapter_loads_both_ways_with_the_training_time_logits(tmp_path):
    """The adapter folder reproduces the in-memory trained model through PEFT and through transformers'
    adapter API (the pinned transformers accepts the pinned peft for enable/disable), and switching the
    adapter off gives exactly the base model."""
    from peft import PeftModel

    batch = _batch()
    trained = _trained_lora()
    expected = _logits(trained, batch)
    base = _logits(tiny_model("llama"), batch)
    assert (expected - base).abs().max() > 1e-2  # training moved the outputs, so the checks below bite
    out = save_final(trained, tiny_tokenizer(), tmp_path / "adapter")

    by_peft = PeftModel.from_pretrained(tiny_model("llama"), out)
    torch.testing.assert_close(_logits(by_peft, batch), expected, atol=1e-6, rtol=0)
    with by_peft.disable_adapter():
        torch.testing.assert_close(_logits(by_peft, batch), base, atol=0, rtol=0)
    torch.testing.assert_close(_logits(by_peft, batch), expected, atol=1e-6, rtol=0)

    by_transformers = tiny_model("llama")
    by_transformers.load_adapter(str(out))
    assert by_transformers.active_adapters() == ["default"]
    torch.testing.assert_close(_logits(by_transformers, batch), expected, atol=1e-6, rtol=0)
    by_transformers.disable_adapters()
    torch.testing.assert_close(_logits(by_transformers, batch), base, atol=0, rtol=0)
    by_transformers.enable_adapters()
    torch.testing.assert_close(_logits(by_transformers, batch), expected, atol=1e-6, rtol=0)


def test_lora_wrap_save_and_load_emit_no_deprecation_warnings(tmp_path, tiny_model_dir):
    """Warnings a user would see on every run: none from wrapping, saving or loading an adapter."""
    from preftune.model import load_model

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, tok = load_model(tiny_model_dir)
        out = save_final(apply_lora(model, LoraSettings(r=4, alpha=8)), tok, tmp_path / "adapter", merge_lora=True)
        load_model(out)
        load_model(out / "merged")
    assert [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))] == []


def test_save_lora_without_merge_writes_no_merged_folder(tmp_path):
    out = save_final(_lora_peft("qwen2"), tiny_tokenizer(), tmp_path / "adapter")
    assert (out / "adapter_config.json").is_file() and not (out / "merged").exists()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_save_full_fine_tune_loads_with_same_logits(tmp_path, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    batch, tok = _batch(), tiny_tokenizer()
    model = tiny_model(arch)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.1)  # not the seeded initialisation any more
    expected = _logits(model, batch)
    out = save_final(model, tok, tmp_path / "full", merge_lora=True)  # merge_lora: no adapters, ignored
    assert not (out / "merged").exists()
    loaded = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(_logits(loaded, batch), expected, atol=1e-6, rtol=0)
    loaded_tok = AutoTokenizer.from_pretrained(out)
    assert loaded_tok(PROMPTS[0]).input_ids == tok(PROMPTS[0]).input_ids


def test_save_replaces_a_previous_model_folder_whole(tmp_path):
    out = tmp_path / "model"
    save_final(_lora_peft("llama"), tiny_tokenizer(), out, merge_lora=True)
    save_final(tiny_model("llama"), tiny_tokenizer(), out)  # now a full model: the adapter files go
    names = {p.name for p in out.iterdir()}
    assert "config.json" in names and "adapter_config.json" not in names and "merged" not in names
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no .tmp- / .old- leftovers


def test_save_refuses_to_sweep_away_a_run_folder(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_final(tiny_model("llama"), tiny_tokenizer(), run)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "metrics.jsonl"]
    save_final(tiny_model("llama"), tiny_tokenizer(), run, overwrite=True)
    assert (run / "config.json").is_file() and not (run / "checkpoints").exists()


def test_failed_save_keeps_the_old_folder(tmp_path, monkeypatch):
    out = tmp_path / "model"
    save_final(tiny_model("llama", seed=0), tiny_tokenizer(), out)
    before = (out / "model.safetensors").read_bytes()
    tok = tiny_tokenizer()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tok, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        save_final(tiny_model("llama", seed=1), tok, out)
    assert (out / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
