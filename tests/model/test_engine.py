"""The engine's log-probs and gradients equal a naive full-logits computation, per architecture."""

import pytest
import torch

from preftune.model.engine import LogProbEngine, live_reference_inputs, pack, policy_stats
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


def _model(arch):
    m = tiny_model(arch, seed=1).double()
    m.eval()  # no dropout: both computations must see the same network
    return m


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("chunk", [1, 4, 1024])
def test_logps_and_grads_match_naive(arch, chunk):
    m = _model(arch)
    packed = pack(PROMPTS, RESPONSES, pad_id=3)
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
    for ge, p in zip(g_engine, m.parameters()):
        assert torch.allclose(ge, p.grad, atol=1e-10)


def test_live_reference_kl_matches_full_vocabulary():
    policy, ref = _model("llama"), tiny_model("llama", seed=7).double().eval()
    packed = pack(PROMPTS, RESPONSES, pad_id=3)
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
