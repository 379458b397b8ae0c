"""mapl_intra / mapl_inter (METHODS.md §M5): golden values of §M5(d), float64 parity of loss and gradients against
−log σ(β·(ρ_0 − ρ_1)) written out, and stability at large log-ratios."""

import math

import numpy as np
import pytest
import torch

from preftune.losses import get
from preftune.losses.base import PolicyStats, RefStats


def _stats(pol, ref):
    p = torch.tensor(pol, dtype=torch.float64, requires_grad=True)
    return PolicyStats(logps=p, lengths=torch.ones_like(p)), RefStats(logps=torch.tensor(ref, dtype=torch.float64)), p


def test_golden_intra_and_inter():
    # ℓ_θ(y|x_w) = −20.0, ℓ_ref(y|x_w) = −20.4, ℓ_θ(y|x_l) = −22.0, ℓ_ref(y|x_l) = −21.2, β = 0.1
    pol, ref, _ = _stats([[-20.0, -22.0]], [[-20.4, -21.2]])
    assert get("mapl_intra").fn(pol, ref, beta=0.1).losses.item() == pytest.approx(0.634946, abs=1e-5)
    pol, ref, _ = _stats([[1.0, -1.0]], [[0.0, 0.0]])  # ρ'_w = 1, ρ'_l = −1
    assert get("mapl_inter").fn(pol, ref, beta=0.1).losses.item() == pytest.approx(0.598139, abs=1e-5)


@pytest.mark.parametrize("name", ["mapl_intra", "mapl_inter"])
@pytest.mark.parametrize("batch", [1, 7])
def test_float64_parity_of_loss_and_gradients(name, batch):
    rng = np.random.default_rng(batch)
    lp, lr = rng.normal(-20, 3, (batch, 2)), rng.normal(-20, 3, (batch, 2))
    pol, ref, leaf = _stats(lp.tolist(), lr.tolist())
    out = get(name).fn(pol, ref, beta=0.3)
    m = 0.3 * ((lp[:, 0] - lr[:, 0]) - (lp[:, 1] - lr[:, 1]))
    np.testing.assert_allclose(out.losses.detach().numpy(), np.log1p(np.exp(-m)), atol=1e-12)
    out.losses.sum().backward()
    s = 1 / (1 + np.exp(m))  # −dL/dm
    np.testing.assert_allclose(leaf.grad.numpy(), np.stack([-0.3 * s, 0.3 * s], 1), atol=1e-12)
    np.testing.assert_allclose(out.chosen_rewards.numpy(), 0.3 * (lp[:, 0] - lr[:, 0]), atol=1e-12)


@pytest.mark.parametrize("name", ["mapl_intra", "mapl_inter"])
def test_large_ratios_stay_finite(name):
    p = torch.tensor([[1e4, -1e4], [-1e4, 1e4]], requires_grad=True)
    out = get(name).fn(PolicyStats(logps=p, lengths=torch.ones_like(p)), RefStats(logps=torch.zeros(2, 2)), beta=1.0)
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(p.grad).all()
    assert out.losses[0].item() == 0.0 and out.losses[1].item() == pytest.approx(2e4)
    assert math.isfinite(p.grad.abs().max().item())


def test_own_prompt_tokens_are_not_scored():
    # Two responses of 4 tokens; the first 2 (winner) and 1 (loser) tokens are their own prompts' instruction tokens.
    rng = np.random.default_rng(0)
    lp, lr = rng.normal(size=(1, 2, 4)), rng.normal(size=(1, 2, 4))
    tok = torch.tensor(lp, requires_grad=True)
    pol = PolicyStats(logps=tok.sum(-1), lengths=torch.full((1, 2), 4.0), token_logps=tok,
                      token_mask=torch.ones(1, 2, 4, dtype=torch.bool),
                      inputs={"prompt_tokens": torch.tensor([[2.0, 1.0]])})
    ref = RefStats(logps=torch.tensor(lr.sum(-1)), token_logps=torch.tensor(lr))
    out = get("mapl_intra").fn(pol, ref, beta=0.5)
    rw, rl = (lp - lr)[0, 0, 2:].sum(), (lp - lr)[0, 1, 1:].sum()
    assert out.losses.item() == pytest.approx(math.log1p(math.exp(-0.5 * (rw - rl))), abs=1e-12)
    out.losses.sum().backward()
    assert (tok.grad[0, 0, :2] == 0).all() and (tok.grad[0, 1, :1] == 0).all() and (tok.grad[0, :, 2:] != 0).all()
