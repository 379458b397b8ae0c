"""SparsePO in training (METHODS.md §M2): MaPO's masks equal a hand computation on a tiny Llama (an explicit
float64 forward written here); the learned mask network trains with the policy (its gradient is the hand
formula's, its weights after 2 steps are a hand-applied AdamW), resumes exactly, is saved; both variants
train by name through the CLI, and their masks are not ones (so they are not TDPO1).
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from typer.testing import CliRunner

from preftune.cli import app
from preftune.model.engine import LogProbEngine, live_reference_inputs, pack
from preftune.model.masks import MASK_WEIGHT_DECAY, load_mask_net
from preftune.train.config import TrainConfig
from preftune.train.outputs import read_metrics
from preftune.train.trainer import build_runner, train

D = torch.float64


# ------------------------------------------------------------------------------------ a hand forward


@torch.no_grad()
def hand_forward(model, ids: list[int]):
    """A Llama forward written out (float64): every MaPO tensor per position, the block outputs and logits."""
    cfg, m = model.config, model.model
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd, eps, L = cfg.hidden_size // H, cfg.rms_norm_eps, len(ids)
    rope = getattr(cfg, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=D) / hd)
    ang = torch.arange(L, dtype=D)[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos()[:, None], torch.cat([ang, ang], -1).sin()[:, None]

    def rms(x, w):
        return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))

    def rot(x):  # (L, heads, hd)
        return x * cos + torch.cat([-x[..., hd // 2 :], x[..., : hd // 2]], -1) * sin

    def lin(x, layer):
        return x @ layer.weight.T + (layer.bias if layer.bias is not None else 0)

    acts = {"mlp": [], "attn": [], "resid": []}
    h = m.embed_tokens.weight[ids]
    acts["resid"].append(h)
    blocks = []
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    for layer in m.layers:
        a, p = layer.self_attn, layer.mlp
        x = rms(h, layer.input_layernorm.weight)
        q, k, v = lin(x, a.q_proj), lin(x, a.k_proj), lin(x, a.v_proj)
        qr, kr, vv = rot(q.view(L, H, hd)), rot(k.view(L, Hkv, hd)), v.view(L, Hkv, hd)
        heads = []
        for j in range(H):
            kv = j // (H // Hkv)
            s = (qr[:, j] @ kr[:, kv].T / math.sqrt(hd)).masked_fill(~causal, float("-inf"))
            heads.append(s.softmax(-1) @ vv[:, kv])
        vout = torch.cat(heads, -1)
        attn_out = lin(vout, a.o_proj)
        post_attn = h + attn_out
        y = rms(post_attn, layer.post_attention_layernorm.weight)
        hid = torch.nn.functional.silu(lin(y, p.gate_proj)) * lin(y, p.up_proj)
        mlp_out = lin(hid, p.down_proj)
        h = post_attn + mlp_out
        acts["mlp"].append(hid)
        acts["attn"] += [q, k, v, qr.flatten(-2), kr.flatten(-2), vout]
        acts["resid"] += [x, attn_out, post_attn, y, mlp_out, h]
        blocks.append(h)
    final = rms(h, m.norm.weight)
    acts["resid"].append(final)
    blocks[-1] = final  # HF hidden_states[-1] is after the final norm
    return acts, blocks, lin(final, model.lm_head)


def hand_mapo(model, prompt: list[int], response: list[int]) -> list[float]:
    """MaPO's mask of one response, one tensor and one token at a time."""
    acts, _, logits = hand_forward(model, prompt + response)
    pos = range(len(prompt) - 1, len(prompt) + len(response) - 1)  # the positions predicting the response
    groups = {g: [t.mean(-1) for t in ts] for g, ts in acts.items()}
    groups["logits"] = [logits.mean(-1)]
    per_group = []
    for tensors in groups.values():
        scaled = []
        for t in tensors:
            vals = [float(t[i]) for i in pos]
            lo, hi = min(vals), max(vals)
            scaled.append([1.0 if hi == lo else (x - lo) / (hi - lo) for x in vals])
        per_group.append([sum(col) / len(col) for col in zip(*scaled)])
    return [sum(col) / len(col) for col in zip(*per_group)]


@pytest.fixture(scope="module")
def llama64():
    from preftune.testing import tiny_model

    return tiny_model("llama", seed=3).double().eval()


PROMPT, RESPONSES = [5, 9, 2, 7, 11], [[6, 1, 10, 4], [12, 13, 14, 15, 16, 17], [8]]


@pytest.mark.parametrize("shared", [False, True])
def test_mapo_masks_equal_a_hand_computation_on_a_tiny_model(llama64, shared):
    packed = pack([PROMPT], [RESPONSES], 0, share_prefix=shared)
    engine = LogProbEngine(llama64, prefix_sharing="on" if shared else "off")
    out = live_reference_inputs(engine, packed, llama64, activation_mask=True, layer_hidden=True)
    want = [x for r in RESPONSES for x in hand_mapo(llama64, PROMPT, r)]
    # 1e-6, not float64's 1e-12: HF's Llama computes the rotary angles and RMSNorm in float32 even for a
    # float64 model. A wrong hook point moves a mask by ~1e-2.
    torch.testing.assert_close(out["ref_activation_mask"], torch.tensor(want, dtype=D), rtol=0, atol=1e-6)
    assert want[-1] == 1.0 and min(want[:4]) >= 0 and max(want[:4]) <= 1  # one token: 1; others in [0, 1]
    # The learned masks' input: every block's output at the same positions (the last one after the final norm).
    blocks = [torch.cat([hand_forward(llama64, PROMPT + r)[1][li][len(PROMPT) - 1 : len(PROMPT) + len(r) - 1]
                         for r in RESPONSES]) for li in range(llama64.config.num_hidden_layers)]
    torch.testing.assert_close(out["ref_layer_hidden"], torch.stack(blocks), rtol=0, atol=1e-6)


def test_mapo_refuses_a_model_it_cannot_hook():
    from preftune.testing import tiny_model

    gpt2 = tiny_model("gpt2")
    packed = pack([PROMPT], [RESPONSES[:2]], 0)
    with pytest.raises(ValueError, match="sparsepo_mapo hooks Llama-style models"):
        live_reference_inputs(LogProbEngine(gpt2, prefix_sharing="off"), packed, gpt2, activation_mask=True)


# ------------------------------------------------------------------------------------ learned masks train


def _cfg(model_dir, data, out, **kw) -> TrainConfig:
    base = dict(model=str(model_dir), data=str(data), output=str(out), loss="sparsepo_learned", max_steps=2,
                batch_size=2, learning_rate=1e-2, warmup_ratio=0.0, scheduler="constant", progress=False,
                plot=False, max_grad_norm=None, loss_params={"lambda_reward": 0.05, "lambda_kl": 0.05})
    base.update(kw)
    return TrainConfig(**base)


def explicit_head(h, ln_w, ln_b, W, b, c, eps):
    """The mask of one position from the L block outputs h (L, H): LayerNorm, per-layer ReLU, mixer, ReLU."""
    z = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + eps) * ln_w + ln_b
    return torch.relu(torch.relu((z * W).sum(-1) + b) @ c)


def test_learned_masks_train_with_the_policy_by_hand_adamw(tiny_model_dir, pairs_file, tmp_path):
    from transformers import AutoModelForCausalLM

    runner = build_runner(_cfg(tiny_model_dir, pairs_file, tmp_path / "out"))
    net = runner.base_engine.token_masks
    head = net.heads["common"]
    names = ["norm.weight", "norm.bias", "layer_weight", "layer_bias", "mixer"]
    theta0 = {n: p.detach().double().clone() for n, p in head.named_parameters()}
    assert any(id(p) in {id(q) for g in runner.opt.param_groups for q in g["params"]} for p in net.parameters())

    # Step 1's gradient by hand: policy = reference, so ρ_t = g_t = 0 and only the L1 term moves the network:
    # mean over the step's pairs of (λ/2)·2·Σ_t m_t, m from the reference's block outputs (explicit head).
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()
    micro, n_global = runner.step_micro_batches(0)
    leaves = [theta0[n].clone().requires_grad_(True) for n in names]
    penalty, l1_per_pair = 0.0, []
    for i in [i for mb in micro for i in mb]:
        ex = runner.train_set.examples[i]
        l1 = 0.0
        for r in ex.response_ids:
            with torch.no_grad():
                hs = ref.model(input_ids=torch.tensor([ex.prompt_ids + r]), output_hidden_states=True).hidden_states
            for t in range(len(r)):
                pos = len(ex.prompt_ids) - 1 + t
                h = torch.stack([x[0, pos] for x in hs[1:]])  # (L, H)
                l1 = l1 + explicit_head(h, *leaves, head.norm.eps)
        l1_per_pair.append(float(l1.detach()))
        penalty = penalty + 0.05 * l1  # (0.05 / 2) per term, two terms
    (penalty / n_global).backward()
    hand_g1 = {n: leaf.grad for n, leaf in zip(names, leaves, strict=True)}

    grads = []
    real_step = runner.opt.step

    def capture(*a, **k):
        grads.append({n: p.grad.detach().double().clone() for n, p in head.named_parameters()})
        return real_step(*a, **k)

    runner.opt.step = capture
    runner.run()
    rows = read_metrics(tmp_path / "out" / "metrics.jsonl")

    for n in names:
        torch.testing.assert_close(grads[0][n], hand_g1[n], rtol=1e-4, atol=1e-8)
    # The L1 term as logged (mean over the step's pairs) is its formula on the hand masks.
    assert rows[0]["mask/penalty"] == pytest.approx(0.05 * sum(l1_per_pair) / len(l1_per_pair), rel=1e-5)
    assert rows[0]["loss"] == pytest.approx(math.log(2) + rows[0]["mask/penalty"], rel=1e-5)

    # AdamW by hand on the captured gradients: weight decay 0.01 on w_l and c only, lr 1e-2, constant.
    lr, (b1, b2), eps = 1e-2, (0.9, 0.999), 1e-8
    decayed = {"layer_weight", "mixer"}

    def adamw(n, wd):
        p, m, v = theta0[n].clone(), 0.0, 0.0
        for t, g in enumerate((grads[0][n], grads[1][n]), start=1):
            p = p * (1 - lr * wd)
            m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
            p = p - lr * (m / (1 - b1**t)) / (torch.sqrt(v / (1 - b2**t)) + eps)
        return p

    for n in names:
        want = adamw(n, MASK_WEIGHT_DECAY if n in decayed else 0.0)
        got = dict(head.named_parameters())[n].detach().double()
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)  # float32 weights and AdamW state
        assert float((got - theta0[n]).abs().max()) > 5e-3, n  # every tensor moved by ~lr per step
        if n in decayed:  # the decay is resolved: without it the weights would be off by ≫ the tolerance
            assert float((adamw(n, 0.0) - want).abs().max()) > 1e-6, n


def test_learned_mask_state_resumes_and_is_saved(tiny_model_dir, pairs_file, tmp_path):
    from safetensors.torch import load_file

    from preftune.testing import train_interrupted_after

    common = dict(max_steps=4, save_steps=2, learning_rate=5e-3)
    train(_cfg(tiny_model_dir, pairs_file, tmp_path / "full", **common))
    interrupted = _cfg(tiny_model_dir, pairs_file, tmp_path / "resumed", **common)
    train_interrupted_after(interrupted, 2)
    ckpt = tmp_path / "resumed" / "checkpoints" / "checkpoint-0000002" / "trainable.safetensors"
    in_ckpt = {k for k in load_file(str(ckpt)) if k.startswith("token_masks.")}
    assert in_ckpt == {f"token_masks.heads.common.{n}" for n in
                       ("norm.weight", "norm.bias", "layer_weight", "layer_bias", "mixer")}
    train(interrupted.model_copy(update={"resume": True}))

    a, b = load_mask_net(tmp_path / "full"), load_mask_net(tmp_path / "resumed")
    init = load_file(str(ckpt))  # step 2's network: the resumed run must have gone on from it
    for n, p in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[n], p, rtol=0, atol=1e-6)
    assert float((a.heads["common"].mixer - init["token_masks.heads.common.mixer"]).abs().max()) > 1e-3
    ra, rb = read_metrics(tmp_path / "full" / "metrics.jsonl"), read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    for x, y in zip(ra, rb, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5) and x["mask/penalty"] == pytest.approx(y["mask/penalty"])


# ------------------------------------------------------------------------------------ the CLI


def _cli(model, data, out, loss, *extra):
    args = ["train", "--model", str(model), "--data", str(data), "--loss", loss, "--max-steps", "2",
            "--output", str(out)]
    for kv in ("progress=false", "plot=false", "batch_size=2", "learning_rate=1e-3", "warmup_ratio=0", *extra):
        args += ["--set", kv]
    return CliRunner().invoke(app, args)


@pytest.mark.parametrize("loss", ["sparsepo_learned", "sparsepo_mapo", "sparsepo"])
def test_two_step_cli_runs_and_masks_are_not_ones(loss, tiny_model_dir, pairs_file, tmp_path):
    res = _cli(tiny_model_dir, pairs_file, tmp_path / "out", loss)
    assert res.exit_code == 0, res.output + repr(res.exception)
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    first = rows[0]
    if loss == "sparsepo_mapo":
        # Policy = reference at step 1: the loss is log 2 whatever the masks; the masks are in [0, 1], not ones.
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert 0.2 < first["mask/reward_mean"] < 0.9 and first["mask/penalty"] == 0.0
        assert not (tmp_path / "out" / "sparsepo_mask.safetensors").exists()
    else:
        # The learned masks start small (weights N(0, 0.02²)): far from ones, and the L1 term is in the loss.
        assert 0 < first["mask/reward_mean"] < 0.2
        assert first["loss"] == pytest.approx(math.log(2) + first["mask/penalty"], abs=1e-6)
        net = load_mask_net(tmp_path / "out")
        assert set(net.heads) == {"common"} and net.settings["num_layers"] == 2
    assert all(math.isfinite(r["loss"]) for r in rows)


def test_sparsepo_trains_differently_from_tdpo1(tiny_model_dir, pairs_file, tmp_path):
    """Same data, seed and model: TDPO1 and SparsePO's first step are both log 2 (policy = reference), then
    their token weights differ, so the second losses and the trained weights differ."""
    runs = {}
    for loss in ("tdpo1", "sparsepo_mapo"):
        res = _cli(tiny_model_dir, pairs_file, tmp_path / loss, loss, "learning_rate=5e-2")
        assert res.exit_code == 0, res.output
        runs[loss] = read_metrics(tmp_path / loss / "metrics.jsonl")
    assert runs["tdpo1"][0]["loss"] == pytest.approx(runs["sparsepo_mapo"][0]["loss"], abs=1e-6)
    assert abs(runs["tdpo1"][1]["loss"] - runs["sparsepo_mapo"][1]["loss"]) > 1e-4
    # SparsePO's logged reward is masked: β·(Σ m ρ_t + Σ m g_t) ≠ TDPO1's β·(ρ + SeqKL) after a step.
    assert abs(runs["tdpo1"][1]["rewards/margins"] - runs["sparsepo_mapo"][1]["rewards/margins"]) > 1e-5


def test_lora_trains_the_mask_network_in_full(tiny_model_dir, pairs_file, tmp_path):
    runner = build_runner(_cfg(tiny_model_dir, pairs_file, tmp_path / "lora", lora=True, lora_r=4))
    net = copy.deepcopy(runner.base_engine.token_masks)
    runner.run()
    after = runner.base_engine.token_masks
    for (n, p), q in zip(after.named_parameters(), net.parameters(), strict=True):
        assert p.requires_grad and float((p - q).abs().max()) > 1e-3, n
