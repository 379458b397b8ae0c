"""MODPO (METHODS.md §M1): golden values of §M1(d), float64 parity of loss and gradients against the formula
written out below, the reduction to DPO, the hinge link, detached margins, the weight checks, stability.

The reference formula uses plain torch float64 arithmetic, not preftune's helpers:
h(y) = (1/w_0)·[β·(ℓ_θ(y) − ℓ_ref(y)) − Σ_j w_j·m_j(y)], L = −log σ(h(y_w) − h(y_l)).
"""

from __future__ import annotations

import math

import pytest
import torch

from preftune.losses import PolicyStats, RefStats, get

D = torch.float64


def run(policy, ref, **overrides):
    obj = get("modpo")
    return obj.fn(policy, ref, **obj.resolve(overrides))


def canonical(margins, dtype=D):
    """LOSSES.md's canonical pair: ρ_w = −10 − (−11) = 1.0, ρ_l = −12 − (−11.5) = −0.5."""
    p = PolicyStats(torch.tensor([[-10.0, -12.0]], dtype=dtype), torch.tensor([[5.0, 8.0]], dtype=dtype))
    if margins is not None:
        p.inputs["margin_rewards"] = torch.tensor([margins], dtype=dtype)  # (1, 2, n−1)
    return p, RefStats(torch.tensor([[-11.0, -11.5]], dtype=dtype))


GOLDEN = [  # METHODS.md §M1(d)
    ("two objectives", [0.5, 0.5], [[0.2], [0.8]], 0.341154),
    ("length as a third", [0.6, 0.3, 0.1], [[0.2, -30.0], [0.8, -60.0]], 4.461611),
    ("w=(1,0) is DPO", [1.0, 0.0], [[0.2], [0.8]], 0.620957),
]


@pytest.mark.parametrize("name,w,margins,expected", GOLDEN, ids=[g[0] for g in GOLDEN])
def test_golden(name, w, margins, expected):
    p, r = canonical(margins)
    out = run(p, r, beta=0.1, w=w)
    assert float(out.losses[0]) == pytest.approx(expected, abs=1e-5)


def test_golden_intermediates_and_logged_rewards():
    # §M1(d): h = (0.0, −0.9) for w = (0.5, 0.5); the second case's logit is −4.45.
    p, r = canonical([[0.2], [0.8]])
    out = run(p, r, w=[0.5, 0.5])
    assert float(out.chosen_rewards[0]) == pytest.approx(0.0, abs=1e-12)
    assert float(out.rejected_rewards[0]) == pytest.approx(-0.9, abs=1e-12)
    assert float(out.metrics["margin_chosen"][0]) == pytest.approx(0.1)  # w_1·m(y_w) = 0.5·0.2
    assert float(out.metrics["margin_rejected"][0]) == pytest.approx(0.4)
    p, r = canonical([[0.2, -30.0], [0.8, -60.0]])
    out = run(p, r, w=[0.6, 0.3, 0.1])
    assert float(out.chosen_rewards[0] - out.rejected_rewards[0]) == pytest.approx(-4.45, abs=1e-12)
    # hinge: relu(1 − z) with z = 0.9 (first case)
    p, r = canonical([[0.2], [0.8]])
    assert float(run(p, r, w=[0.5, 0.5], loss_type="hinge").losses[0]) == pytest.approx(0.1, abs=1e-12)


def _reference(pol, ref, m, beta, w, hinge=False):
    out = []
    for b in range(pol.shape[0]):
        h = []
        for k in range(2):
            margin = sum(w[j + 1] * m[b, k, j] for j in range(m.shape[-1]))
            h.append((beta * (pol[b, k] - ref[b, k]) - margin) / w[0])
        z = h[0] - h[1]
        out.append(torch.relu(1 - z) if hinge else torch.log1p(torch.exp(-z)))
    return torch.stack(out)


@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("hinge", [False, True])
def test_parity_loss_and_gradients(batch, hinge):
    g = torch.Generator().manual_seed(batch + 10 * hinge)
    pol = (torch.randn(batch, 2, generator=g, dtype=D) * 5 - 20).requires_grad_(True)
    ref = torch.randn(batch, 2, generator=g, dtype=D) * 5 - 20
    m = torch.randn(batch, 2, 3, generator=g, dtype=D)
    w, beta = [0.4, 0.3, -0.2, 0.5], 0.25
    p = PolicyStats(pol, torch.full((batch, 2), 7.0, dtype=D), inputs={"margin_rewards": m})
    got = run(p, RefStats(ref), beta=beta, w=w, loss_type="hinge" if hinge else "sigmoid").losses
    pol2 = pol.detach().clone().requires_grad_(True)
    want = _reference(pol2, ref, m, beta, w, hinge)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    (ga,) = torch.autograd.grad(got.sum(), pol)
    (gb,) = torch.autograd.grad(want.sum(), pol2)
    torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-10)


def test_reduces_to_dpo_and_margins_are_detached():
    g = torch.Generator().manual_seed(3)
    pol = torch.randn(5, 2, generator=g, dtype=D) - 10
    ref = RefStats(torch.randn(5, 2, generator=g, dtype=D) - 10)
    m = torch.randn(5, 2, 2, generator=g, dtype=D, requires_grad=True)
    p = PolicyStats(pol, torch.ones(5, 2, dtype=D), inputs={"margin_rewards": m})
    dpo = get("dpo").fn(PolicyStats(pol, torch.ones(5, 2, dtype=D)), ref, beta=0.3).losses
    torch.testing.assert_close(run(p, ref, beta=0.3, w=[1.0, 0.0, 0.0]).losses, dpo)
    # no margin columns and w unset: DPO as well
    torch.testing.assert_close(run(PolicyStats(pol, torch.ones(5, 2, dtype=D)), ref, beta=0.3).losses, dpo)
    p = PolicyStats(pol.clone().requires_grad_(True), p.lengths, inputs={"margin_rewards": m})
    run(p, ref, w=[0.5, 0.3, 0.2]).losses.sum().backward()
    assert m.grad is None  # the margins come from frozen models: nothing flows into them
    # β and w_0 act only through β/w_0 on the log-ratio term: (β, w) and (2β, 2w) give the same loss
    torch.testing.assert_close(run(p, ref, beta=0.1, w=[0.5, 0.3, 0.2]).losses,
                               run(p, ref, beta=0.2, w=[1.0, 0.6, 0.4]).losses)


def test_weight_checks():
    p, r = canonical([[0.2], [0.8]])
    with pytest.raises(ValueError, match=r"w has 3 weight\(s\) but the data carries 1 margin"):
        run(p, r, w=[0.5, 0.3, 0.2])
    with pytest.raises(ValueError, match="w_0=0.0 must be > 0"):
        run(p, r, w=[0.0, 1.0])
    with pytest.raises(ValueError, match="set loss_params.w to 2 weights"):
        run(p, r)
    with pytest.raises(ValueError, match="must be a list of finite numbers"):
        run(p, r, w=["a", 1.0])


def test_config_checks_weights_and_warns_on_a_small_kl_weight():
    from pydantic import ValidationError

    from preftune.train.config import TrainConfig

    with pytest.raises(ValidationError, match="w_0=-1.0 must be > 0"):
        TrainConfig(loss="modpo", loss_params={"w": [-1.0, 1.0]})
    with pytest.warns(UserWarning, match=r"β/w_0 = 0.02"):
        TrainConfig(loss="modpo", loss_params={"w": [5.0, 1.0]})
    with pytest.raises(ValidationError, match="objective 'dpo' takes none"):
        TrainConfig(loss="dpo", margin_models=["some/rm"])


def test_stability_float32():
    p = PolicyStats(torch.tensor([[-1e4, 0.0], [0.0, -1e4]], requires_grad=True), torch.ones(2, 2),
                    inputs={"margin_rewards": torch.tensor([[[1e3], [-1e3]], [[-1e3], [1e3]]])})
    out = run(p, RefStats(torch.zeros(2, 2)), w=[0.5, 0.5])
    assert torch.isfinite(out.losses).all()
    out.losses.sum().backward()
    assert torch.isfinite(p.logps.grad).all()
    assert math.isfinite(float(out.losses.detach().sum()))
