"""engine: auto — what it chooses, and that the engine it chooses computes the plain engine's step."""

import pytest
import torch

from preftune.model.engine import pack
from preftune.train import engine_choice
from preftune.train.config import TrainConfig
from preftune.train.trainer import build_runner


def _cfg(model_dir, data, out, **kw) -> TrainConfig:
    base = dict(model=str(model_dir), data=str(data), output=str(out), loss="dpo", max_steps=3, batch_size=2,
                learning_rate=1e-3, warmup_ratio=0.0, progress=False, plot=False, save_model=False,
                length_grouping=False, ref_cache_dir=str(out) + "-refcache")
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture()
def tiny(tiny_model_dir):
    from preftune.model import load_model

    return load_model(tiny_model_dir)[0]


def test_auto_rules(tiny_model_dir, pairs_file, tmp_path, tiny, monkeypatch):
    cfg = _cfg(tiny_model_dir, pairs_file, tmp_path, precision="bf16")
    c = engine_choice.choose(cfg, tiny, device_type="cpu")
    assert not c.compile and c.attn_implementation == tiny.config._attn_implementation != "eager"
    assert "compiling would take longer" in c.reason

    monkeypatch.setattr(engine_choice, "MIN_PARAMS_FOR_COMPILE", 0)  # as for a real model
    c = engine_choice.choose(cfg, tiny, device_type="cpu")
    assert (c.compile, c.attn_implementation, c.activation_memory_budget) == (
        True, "eager", engine_choice.AUTO_MEMORY_BUDGET)
    assert "cpu bf16" in c.reason and c.describe().startswith("compile=on, attention eager")
    # an option set in the config wins
    c = engine_choice.choose(cfg.model_copy(update={"attn_implementation": "sdpa"}), tiny, device_type="cpu")
    assert c.compile and c.attn_implementation == "sdpa" and "set in the config: attn_implementation" in c.reason
    # where auto does not act, it says why, and leaves the options as set
    for kw, why in [(dict(model_passed=True), "passed in"), (dict(run_kind="fsdp2"), "fsdp2"),
                    (dict(device_type="cuda"), "no measurement on cuda")]:
        c = engine_choice.choose(cfg, tiny, **{"device_type": "cpu", **kw})
        assert not c.compile and c.activation_memory_budget is None and why in c.reason, kw
    c = engine_choice.choose(cfg.model_copy(update={"lora": True}), tiny, device_type="cpu")
    assert not c.compile and "LoRA" in c.reason
    c = engine_choice.choose(cfg.model_copy(update={"engine": "plain", "compile": True}), tiny, device_type="cpu")
    assert c.compile and c.attn_implementation == tiny.config._attn_implementation and c.reason == "engine=plain"


def _run(cfg, steps: int):
    """The first micro-batch's policy log-probs (before any step), per-step metrics and the final weights."""
    runner = build_runner(cfg)
    ex = [runner.train_set.examples[i] for i in range(2)]
    eng = runner.base_engine
    packed = pack([e.prompt_ids for e in ex], [e.response_ids for e in ex], runner.pad_id,
                  share_prefix=eng.shares_prefix())
    logps = eng(**packed.tensors())["token_logps"].detach()
    metrics = []
    for _ in range(steps):
        metrics.append(runner.train_step())
        runner.step += 1
    weights = {n: p.detach().clone() for n, p in eng.model.named_parameters()}
    return runner, logps, metrics, weights


def test_auto_choice_computes_the_plain_step(tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    """What auto picks on a CPU (compiled layers, eager attention, recomputation under the memory budget)
    against the plain engine: the same log-probs, and after three steps with gradient accumulation and
    clipping that bites, the same losses, gradient norms and weights (float32, to inductor's rounding)."""
    common = dict(grad_accum=2, max_grad_norm=0.05)
    plain, lp0, m0, w0 = _run(_cfg(tiny_model_dir, pairs_file, tmp_path / "plain", engine="plain", **common), 3)
    monkeypatch.setattr(engine_choice, "MIN_PARAMS_FOR_COMPILE", 0)
    auto, lp1, m1, w1 = _run(_cfg(tiny_model_dir, pairs_file, tmp_path / "auto", **common), 3)
    assert auto.cfg.compile and auto.cfg.attn_implementation == "eager"
    assert auto.cfg.activation_memory_budget == engine_choice.AUTO_MEMORY_BUDGET
    assert auto.base_engine.model.config._attn_implementation == "eager"
    assert plain.base_engine.model.config._attn_implementation != "eager"
    torch.testing.assert_close(lp1, lp0, atol=1e-5, rtol=1e-5)
    assert all(m["grad_norm"] > common["max_grad_norm"] for m in m0)  # clipping acted at every step
    for a, b in zip(m0, m1):
        for k in ("loss", "logps/chosen", "logps/rejected", "grad_norm"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k
    for n in w0:
        torch.testing.assert_close(w1[n], w0[n], atol=1e-5, rtol=1e-4, msg=n)


def test_memory_budget_recomputes_in_backward(tiny_model_dir, pairs_file, tmp_path):
    """The budget reaches the partitioner: a compiled layer keeps fewer bytes for backward under budget 0.2
    than without one, and the step's gradients do not change."""

    def saved_bytes_and_grads(budget, out):
        cfg = _cfg(tiny_model_dir, pairs_file, out, engine="plain", compile=True, attn_implementation="eager",
                   activation_memory_budget=budget, max_grad_norm=None)
        runner = build_runner(cfg)
        params = {p.untyped_storage().data_ptr() for p in runner.base_engine.parameters()}
        seen, total = set(), [0]

        def keep(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in seen and ptr not in params:
                seen.add(ptr)
                total[0] += t.untyped_storage().nbytes()
            return t

        ex = [runner.train_set.examples[i] for i in range(2)]
        packed = pack([e.prompt_ids for e in ex], [e.response_ids for e in ex], runner.pad_id,
                      share_prefix=runner.base_engine.shares_prefix())
        runner.base_engine(**packed.tensors())  # compiled here, outside the hooks
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            out = runner.base_engine(**packed.tensors())["token_logps"]
        out.sum().backward()
        return total[0], {n: p.grad.clone() for n, p in runner.base_engine.model.named_parameters()}

    full, g_full = saved_bytes_and_grads(None, tmp_path / "full")
    low, g_low = saved_bytes_and_grads(0.2, tmp_path / "low")
    assert low < 0.8 * full, (low, full)
    for n in g_full:
        torch.testing.assert_close(g_low[n], g_full[n], atol=1e-5, rtol=1e-4, msg=n)
