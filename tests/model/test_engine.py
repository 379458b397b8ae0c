"""The engine's log-probs and gradients equal a naive full-logits computation, per architecture.

Invariances (float64, so "equal" means to 1e-10): prefix-shared ≡ unshared ≡ naive, chunked ≡
unchunked, for log-probs and for the gradients of every parameter, on tiny Llama, Qwen2 and GPT-2
models, with sdpa and eager attention.
"""

import pytest
import torch

from preftune.model import engine as engine_mod
from preftune.model.engine import (
    LogProbEngine,
    live_reference_inputs,
    pack,
    policy_stats,
    prefix_sharing_supported,
    reference_stats,
)
from preftune.testing import ARCHES, tiny_model

PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
RESPONSES = [[[11, 12, 13], [14, 15]], [[16, 17, 18, 19, 20], [21]], [[22, 23], []]]  # ragged: last has K=1


def naive_logps(model, prompts, responses):
    """Sum of log-probs of each response, one full forward per (prompt, response), all logits."""
    out = torch.zeros(len(prompts), 2, dtype=torch.float64)
    for b, (p, rs) in enumerate(zip(prompts, responses)):
        for k, r in enumerate(rs):
            if not r:
                continue
            lp = model(torch.tensor([p + r])).logits.log_softmax(-1)[0]
            out[b, k] = sum(lp[len(p) - 1 + t, tok] for t, tok in enumerate(r))
    return out


def _close(a, b, rel=0.0, atol=1e-10):
    """Elementwise within ``atol``, or (rel > 0) within ``rel`` of the whole tensor's norm."""
    return bool((a - b).abs().max() <= atol + rel * b.norm())


def _model(arch, attn="sdpa"):
    m = tiny_model(arch, seed=1).double()
    m.config._attn_implementation = attn
    m.eval()  # no dropout: both computations must see the same network
    return m


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("chunk", [1, 4, 1024])
@pytest.mark.parametrize("shared", [False, True], ids=["unshared", "shared"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_logps_and_grads_match_naive(arch, chunk, shared, attn):
    m = _model(arch, attn)
    packed = pack(PROMPTS, RESPONSES, pad_id=3, share_prefix=shared)
    stats, _ = policy_stats(packed, LogProbEngine(m, chunk)(**packed.tensors()), need_tokens=True)
    expected = naive_logps(m, PROMPTS, RESPONSES)
    assert torch.allclose(stats.logps, expected, atol=1e-10)
    assert stats.valid.tolist() == [[True, True], [True, True], [True, False]]
    assert stats.lengths.tolist() == [[3, 2], [5, 1], [2, 0]]
    # token layout sums back to the sequence values
    assert torch.allclose(stats.token_logps.sum(-1), stats.logps)

    w = torch.tensor([[0.3, -1.2], [0.7, 2.0], [-0.5, 0.0]], dtype=torch.float64)
    m.zero_grad()
    (stats.logps * w).sum().backward()
    g_engine = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    (naive_logps(m, PROMPTS, RESPONSES) * w).sum().backward()
    # Llama/Qwen2's RMSNorm computes in float32 even for a float64 model: summing the K responses'
    # gradients at the shared prompt (instead of per parameter) changes rounding at float32 level.
    rel = 1e-6 if shared and arch != "gpt2" else 0.0
    for ge, p in zip(g_engine, m.parameters()):
        assert _close(ge, p.grad, rel)


@pytest.mark.parametrize("shared", [False, True], ids=["unshared", "shared"])
def test_live_reference_kl_matches_full_vocabulary(shared):
    policy, ref = _model("llama"), tiny_model("llama", seed=7).double().eval()
    packed = pack(PROMPTS, RESPONSES, pad_id=3, share_prefix=shared)
    engine = LogProbEngine(policy, chunk_size=3)
    extra = live_reference_inputs(engine, packed, ref)
    stats, ref_stats = policy_stats(packed, engine(**packed.tensors(), **extra), need_tokens=True)
    # naive KL(ref || policy) summed over the first response of group 0
    p, r = PROMPTS[0], RESPONSES[0][0]
    ids = torch.tensor([p + r])
    lp = policy(ids).logits.log_softmax(-1)[0, len(p) - 1 : len(p) - 1 + len(r)]
    lr = ref(ids).logits.log_softmax(-1)[0, len(p) - 1 : len(p) - 1 + len(r)]
    kl = (lr.exp() * (lr - lp)).sum(-1)
    assert torch.allclose(stats.token_kl[0, 0, : len(r)], kl, atol=1e-10)
    assert torch.allclose(ref_stats.logps, naive_logps(ref, PROMPTS, RESPONSES), atol=1e-10)


def test_bf16_autocast_logps_are_float32_and_close():
    m = tiny_model("llama", seed=1).eval()
    packed = pack(PROMPTS, RESPONSES, pad_id=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = LogProbEngine(m)(**packed.tensors())
    assert out["token_logps"].dtype == torch.float32
    full, _ = policy_stats(packed, LogProbEngine(m)(**packed.tensors()), need_tokens=False)
    bf, _ = policy_stats(packed, out, need_tokens=False)
    assert torch.allclose(bf.logps, full.logps, rtol=0.05)


def test_empty_prompt_is_rejected():
    with pytest.raises(ValueError, match="at least one token"):
        pack([[]], [[[1, 2]]], pad_id=0)


# ---------------------------------------------------------------------------- prefix sharing


def _grads(m, packed, chunk, w):
    m.zero_grad()
    stats, _ = policy_stats(packed, LogProbEngine(m, chunk)(**packed.tensors()), need_tokens=True)
    (stats.logps * w).sum().backward()
    return stats, [p.grad.clone() for p in m.parameters()]


@pytest.mark.parametrize("arch", ARCHES)
def test_shared_equals_unshared_with_packing_and_lists(arch):
    """Short groups share a row (padding-free packing); K = 3 lists; shared ≡ unshared exactly."""
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12], [9, 10], [11, 12, 13], [4], [7, 8]]
    responses = [
        [[11, 12, 13], [14, 15], [16, 17, 18, 19]],
        [[16, 17], [21], [22, 23]],
        [[22, 23], [], [5]],
        [[30], [31, 32], [33]],
        [[], [40, 41], []],
    ]
    m = _model(arch)
    shared = pack(prompts, responses, pad_id=3, share_prefix=True)
    unshared = pack(prompts, responses, pad_id=3)
    assert shared.input_ids.shape[0] < len(prompts)  # groups were packed together
    assert shared.num_positions < unshared.num_positions
    w = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    s1, g1 = _grads(m, shared, 4, w)
    s2, g2 = _grads(m, unshared, 1024, w)
    assert torch.allclose(s1.logps, s2.logps, atol=1e-10)
    assert torch.equal(s1.token_mask, s2.token_mask)
    assert torch.allclose(s1.token_logps, s2.token_logps, atol=1e-10)
    rel = 1e-6 if arch != "gpt2" else 0.0  # RMSNorm: see test_logps_and_grads_match_naive
    for a, b in zip(g1, g2):
        assert _close(a, b, rel)


def test_shared_layout_masks_other_responses():
    packed = pack([[1, 2]], [[[3, 4], [5]]], pad_id=0, share_prefix=True)
    assert packed.input_ids.tolist() == [[1, 2, 3, 4, 5]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 2]]
    m = packed.attention_mask[0, 0].int().tolist()
    assert m == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 0, 0, 1],  # the second response sees the prompt and itself, not the first response
    ]
    # both first tokens are predicted from the prompt's last position
    assert packed.pred_pos.tolist() == [1, 2, 1]


@pytest.mark.parametrize("arch", ARCHES)
def test_prefix_sharing_check_accepts_supported_models(arch):
    ok, why = prefix_sharing_supported(tiny_model(arch, seed=2))
    assert ok, why
    assert LogProbEngine(tiny_model(arch), prefix_sharing="auto").shares_prefix()
    assert not LogProbEngine(tiny_model(arch), prefix_sharing="off").shares_prefix()


def test_prefix_sharing_falls_back_when_the_mask_is_ignored(monkeypatch):
    """An attention path that drops the block mask changes the numbers: auto falls back, on fails."""
    monkeypatch.setattr(engine_mod, "_attention_mask_for", lambda model, mask, like: None if mask.dim() == 4 else mask)
    ok, why = prefix_sharing_supported(tiny_model("llama"))
    assert not ok and "ignores the block mask" in why
    eng = LogProbEngine(tiny_model("llama"), prefix_sharing="auto")
    assert not eng.shares_prefix()
    with pytest.raises(ValueError, match="cannot share prompts"):
        LogProbEngine(tiny_model("llama"), prefix_sharing="on").shares_prefix()


def test_reference_stats_shared_equals_unshared():
    policy, ref = _model("qwen2"), tiny_model("qwen2", seed=7).double().eval()
    eng = LogProbEngine(policy)
    a = reference_stats(eng, pack(PROMPTS, RESPONSES, 3, share_prefix=True), ref, need_tokens=True)
    b = reference_stats(eng, pack(PROMPTS, RESPONSES, 3), ref, need_tokens=True)
    assert torch.allclose(a.logps, b.logps, atol=1e-10)
    assert torch.allclose(a.token_logps, b.token_logps, atol=1e-10)


@pytest.mark.parametrize("arch", ARCHES)
def test_float32_shared_and_chunked_match_unshared_unchunked(arch):
    """The float tolerance the trainer runs at: float32 log-probs and gradients."""
    m = tiny_model(arch, seed=3).eval()
    w = torch.tensor([[0.3, -1.2], [0.7, 2.0], [-0.5, 0.0]])
    s1, g1 = _grads(m, pack(PROMPTS, RESPONSES, 3, share_prefix=True), 2, w)
    s2, g2 = _grads(m, pack(PROMPTS, RESPONSES, 3), 1024, w)
    assert torch.allclose(s1.logps, s2.logps, atol=1e-5)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_bf16_head_gradients_close_to_float32():
    m = tiny_model("llama", seed=1).eval()
    packed = pack(PROMPTS, RESPONSES, pad_id=3, share_prefix=True)
    w = torch.ones(3, 2)
    _, g32 = _grads(m, packed, 4, w)
    m.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = LogProbEngine(m, 4)(**packed.tensors())
    stats, _ = policy_stats(packed, out, need_tokens=False)
    (stats.logps * w).sum().backward()
    for p, g in zip(m.parameters(), g32):
        assert p.grad.dtype == torch.float32  # master weights and their gradients stay float32
        assert torch.allclose(p.grad, g, atol=0.05 * g.abs().max().item() + 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_head_equals_the_eager_head(dtype):
    # Chunks of 5 over 9 + 13 rows: the compiled kernels see two chunk lengths (dynamic shapes).
    torch.manual_seed(0)
    h = torch.randn(22, 16, requires_grad=True)
    weight = (torch.randn(40, 16) * 0.5).requires_grad_()
    tokens = torch.randint(0, 40, (22,))
    g = torch.randn(22)
    results = []
    for fused in (False, True):
        h.grad = weight.grad = None
        out = torch.cat([engine_mod._HeadLogps.apply(h[s : s + 5], weight, None, tokens[s : s + 5], dtype, fused)
                         for s in range(0, 22, 5)])
        (out * g).sum().backward()
        results.append((out.detach(), h.grad.clone(), weight.grad.clone()))
    assert results[1][0].dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the gradient is rounded once, in either order
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=tol, rtol=tol)
    ref = torch.log_softmax(h.detach() @ weight.detach().t(), -1).gather(-1, tokens[:, None])[:, 0]
    assert torch.allclose(results[1][0], ref, atol=1e-5 if dtype == torch.float32 else 0.1)
