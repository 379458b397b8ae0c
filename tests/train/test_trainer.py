"""End-to-end training on tiny models: CLI outputs, bad data, and the loop's invariances."""

import json

import pytest
import torch
from typer.testing import CliRunner

from preftune.cli import app
from preftune.train.config import TrainConfig
from preftune.train.outputs import CORE_KEYS, read_metrics
from preftune.train.trainer import build_runner, train


def _cfg(model_dir, data, out, **kw) -> TrainConfig:
    base = dict(model=str(model_dir), data=str(data), output=str(out), loss="dpo", max_steps=2, batch_size=4,
                learning_rate=1e-3, warmup_ratio=0.0, progress=False, plot=False, ref_cache_dir=str(out) + "-refcache")
    base.update(kw)
    return TrainConfig(**base)


def test_cli_train_writes_metrics_and_loadable_model(tiny_model_dir, pairs_file, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["train", "--model", str(tiny_model_dir), "--data", str(pairs_file), "--loss", "dpo",
                                   "--max-steps", "2", "--output", str(out), "--set", "progress=false",
                                   "--set", f"ref_cache_dir={tmp_path / 'rc'}"])
    assert res.exit_code == 0, res.output
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for key in CORE_KEYS:
        assert key in rows[0] and rows[0][key] is not None, key
    # step 0: policy == reference, so every implicit reward is 0 and the DPO loss is log 2
    assert rows[0]["loss"] == pytest.approx(0.693147, abs=1e-5)
    assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)  # float32, other padding
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.vocab_size == 320
    assert (out / "training_curves.png").stat().st_size > 1000


def test_malformed_data_names_line_and_field_and_writes_nothing(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n"
        + json.dumps({"prompt": "a", "chosen": "", "rejected": "c"}) + "\n"
        + json.dumps({"prompt": "q", "chosen": "same", "rejected": "same"}) + "\n"
    )
    out = tmp_path / "never"
    res = CliRunner().invoke(app, ["train", "--model", str(tiny_model_dir), "--data", str(bad), "--output", str(out)])
    assert res.exit_code == 2
    assert "bad.jsonl:2" in res.output and "chosen" in res.output
    assert "bad.jsonl:3" in res.output
    assert not out.exists()


def test_bad_hyperparameter_is_a_clear_error(tiny_model_dir, pairs_file, tmp_path):
    res = CliRunner().invoke(app, ["train", "--model", str(tiny_model_dir), "--data", str(pairs_file),
                                   "--loss", "cdpo", "--set", "loss_params.label_smoothing=0.7"])
    assert res.exit_code == 2
    assert "cdpo" in res.output and "label_smoothing" in res.output and "[0, 0.5)" in res.output
    res = CliRunner().invoke(app, ["train", "--set", "no_such_key=1"])
    assert res.exit_code == 2 and "no_such_key" in res.output


def _step_grads(cfg, prepare=None, **kw):
    """Gradients of the first optimizer step (captured just before the update) and its metrics.
    ``prepare(runner)``, when given, runs before the step (to inspect the runner or hook its model)."""
    runner = build_runner(cfg, **kw)
    if prepare is not None:
        prepare(runner)
    captured = {}
    original = runner.opt.step

    def capture(*a, **k):
        for n, p in runner.base_engine.model.named_parameters():
            if p.grad is not None:
                captured[n] = p.grad.detach().clone()
        return original(*a, **k)

    runner.opt.step = capture
    metrics = runner.train_step()
    return captured, metrics


@pytest.mark.parametrize("loss", ["dpo", "simpo"])
def test_grad_accumulation_equals_big_batch(tiny_model_dir, pairs_file, tmp_path, loss):
    common = dict(loss=loss, length_grouping=False, max_grad_norm=None)
    g1, m1 = _step_grads(_cfg(tiny_model_dir, pairs_file, tmp_path / "a", batch_size=4, grad_accum=1, **common))
    g4, m4 = _step_grads(_cfg(tiny_model_dir, pairs_file, tmp_path / "b", batch_size=1, grad_accum=4, **common))
    assert g1.keys() == g4.keys() and len(g1) > 0
    for n in g1:
        assert torch.allclose(g1[n], g4[n], atol=1e-6, rtol=1e-4), n
    for k in ("loss", "rewards/accuracies", "logps/chosen", "grad_norm"):
        assert m1[k] == pytest.approx(m4[k], rel=1e-5, abs=1e-6), k


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_gives_the_same_step(tiny_model_dir, pairs_file, tmp_path, lora):
    common = dict(length_grouping=False, max_grad_norm=None, lora=lora)
    g0, m0 = _step_grads(_cfg(tiny_model_dir, pairs_file, tmp_path / "a", **common))
    cfg = _cfg(tiny_model_dir, pairs_file, tmp_path / "b", gradient_checkpointing=True, **common)
    calls = []

    def count_layer_runs(runner):
        from transformers.modeling_layers import GradientCheckpointingLayer

        layers = [m for m in runner.base_engine.model.modules()
                  if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
        assert layers, "no decoder layer was switched to checkpointing"
        # A checkpointed layer's forward runs twice per step (again in backward). The layer's own hooks stay
        # outside the checkpoint, so count calls of a module inside it.
        next(layers[0].children()).register_forward_hook(lambda *a: calls.append(1))

    captured, m1 = _step_grads(cfg, prepare=count_layer_runs)
    assert len(calls) == 2
    assert captured.keys() == g0.keys() and len(g0) > 0
    for n in g0:
        assert torch.allclose(captured[n], g0[n], atol=1e-6, rtol=1e-5), n
    for k in ("loss", "logps/chosen", "grad_norm"):
        assert m1[k] == pytest.approx(m0[k], rel=1e-6, abs=1e-7), k


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_layers_give_the_same_step(tiny_model_dir, pairs_file, tmp_path, checkpointing):
    common = dict(length_grouping=False, max_grad_norm=None, gradient_checkpointing=checkpointing)
    g0, m0 = _step_grads(_cfg(tiny_model_dir, pairs_file, tmp_path / "a", **common))
    g1, m1 = _step_grads(_cfg(tiny_model_dir, pairs_file, tmp_path / "b", compile=True, **common))
    assert g1.keys() == g0.keys() and len(g0) > 0
    for n in g0:  # inductor reorders float32 reductions: equal to rounding, not bit for bit
        assert torch.allclose(g1[n], g0[n], atol=1e-5, rtol=1e-4), n
    for k in ("loss", "logps/chosen", "grad_norm"):
        assert m1[k] == pytest.approx(m0[k], rel=1e-5, abs=1e-6), k


def test_attn_implementation_reaches_the_policy(tiny_model_dir, pairs_file, tmp_path):
    runner = build_runner(_cfg(tiny_model_dir, pairs_file, tmp_path / "a", attn_implementation="eager"))
    assert runner.base_engine.model.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="attn_implementation"):
        _cfg(tiny_model_dir, pairs_file, tmp_path / "b", attn_implementation="flash")


def test_resumed_run_equals_uninterrupted(tiny_model_dir, pairs_file, tmp_path):
    from preftune.testing import train_interrupted_after

    common = dict(max_steps=4, batch_size=2, save_steps=2, learning_rate=5e-3)
    full = train(_cfg(tiny_model_dir, pairs_file, tmp_path / "full", **common))

    interrupted = _cfg(tiny_model_dir, pairs_file, tmp_path / "resumed", **common)
    train_interrupted_after(interrupted, 2)
    resumed = train(interrupted.model_copy(update={"resume": True}))

    a = read_metrics(tmp_path / "full" / "metrics.jsonl")
    b = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for k in ("loss", "rewards/margins", "grad_norm", "lr"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-7), (ra["step"], k)
    pa = dict(full.model.named_parameters())
    for n, p in resumed.model.named_parameters():
        assert torch.allclose(p, pa[n], atol=1e-6), n


def test_lora_run_saves_adapter_and_merged(tiny_model_dir, pairs_file, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    res = train(_cfg(tiny_model_dir, pairs_file, out, lora=True, lora_r=4, merge_lora=True))
    assert (out / "model" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out / "model" / "merged")
    ids = torch.tensor([[5, 6, 7, 8]])
    res.model.eval()
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, res.model(ids).logits, atol=1e-5)
    rows = read_metrics(out / "metrics.jsonl")
    assert rows[0]["loss"] == pytest.approx(0.693147, abs=1e-5)  # adapter starts as a no-op


def test_eval_split_logs_eval_metrics(tiny_model_dir, pairs_file, tmp_path):
    out = tmp_path / "ev"
    train(_cfg(tiny_model_dir, pairs_file, out, eval_fraction=0.25, save_model=False))
    rows = read_metrics(out / "metrics.jsonl")
    evals = [r for r in rows if "eval/loss" in r]
    assert evals and evals[-1]["step"] == 2
    assert 0.0 <= evals[-1]["eval/rewards/accuracies"] <= 1.0


def test_precomputed_reference_cache_is_reused(tiny_model_dir, pairs_file, tmp_path):
    cache = tmp_path / "cache"
    cfg = _cfg(tiny_model_dir, pairs_file, tmp_path / "r1", ref_cache_dir=str(cache), save_model=False)
    train(cfg)
    files = list(cache.glob("*.safetensors"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    r_live = train(cfg.model_copy(update={"output": str(tmp_path / "r2"), "reference": "live"}))
    r_cached = train(cfg.model_copy(update={"output": str(tmp_path / "r3")}))
    assert files[0].stat().st_mtime_ns == mtime  # hit, not recomputed
    for a, b in zip(r_live.metrics, r_cached.metrics):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
