"""Part H diffusion objectives: golden value (Appendix A), reductions (Diffusion-DPO = DPO with β/2 on
−MSE slots; SmPO at p = (1 + 1/scale)/2 = Diffusion-DPO), parity with independent float64 formulas
(loss and gradients) and float32 stability at extreme error gaps.
"""

from __future__ import annotations

import math

import pytest
import torch

from preftune.losses import PolicyStats, RefStats, get, names
from preftune.losses.diffusion import diffusion_dpo, smpo_diffusion, smpo_soft_label

D = torch.float64


def run(name, policy, ref, **overrides):
    obj = get(name)
    return obj.fn(policy, ref, **obj.resolve(overrides))


def slots(ewt, elt, ewr, elr, **inputs):
    p = PolicyStats(-torch.stack([ewt, elt], -1), torch.ones(ewt.shape[0], 2, dtype=ewt.dtype), inputs=inputs)
    return p, RefStats(-torch.stack([ewr, elr], -1))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_golden(dtype):
    t = lambda x: torch.tensor([x], dtype=dtype)  # noqa: E731
    assert float(diffusion_dpo(t(0.1), t(0.1002), t(0.1503), t(0.15), beta=5000)) == pytest.approx(
        0.251929, abs=1e-5
    )
    p, r = slots(t(0.1), t(0.1503), t(0.1002), t(0.15))
    assert float(run("diffusion_dpo", p, r).losses[0]) == pytest.approx(0.251929, abs=1e-5)


def test_reductions():
    g = torch.Generator().manual_seed(0)
    e = [0.1 + 0.01 * torch.rand(7, generator=g, dtype=D) for _ in range(4)]
    p, r = slots(*e)
    torch.testing.assert_close(
        run("diffusion_dpo", p, r, beta=300.0).losses, run("dpo", p, r, beta=150.0).losses
    )
    half = torch.full((7,), 0.5 * (1 + 1 / 10.0), dtype=D)
    torch.testing.assert_close(
        smpo_diffusion(e[0], e[2], e[1], e[3], half, beta=300.0),
        diffusion_dpo(e[0], e[2], e[1], e[3], beta=300.0),
    )
    # Tied pairs (p = ½) contribute log 2 and no gradient.
    tied = smpo_diffusion(e[0], e[2], e[1], e[3], torch.full((7,), 0.5, dtype=D))
    torch.testing.assert_close(tied, torch.full((7,), math.log(2), dtype=D))


def test_smpo_soft_label_range():
    lo, hi = 0.11543526500463486, 0.28201571106910706
    assert float(smpo_soft_label(torch.tensor(hi), torch.tensor(lo))) == pytest.approx(math.e / (1 + math.e))
    assert float(smpo_soft_label(torch.tensor(0.2), torch.tensor(0.2))) == pytest.approx(0.5)


@pytest.mark.parametrize("B", [1, 7])
def test_parity_with_gradients(B):
    g = torch.Generator().manual_seed(B)
    e = [0.1 + 0.01 * torch.rand(B, generator=g, dtype=D) for _ in range(4)]
    pp = 0.5 + 0.23 * torch.rand(B, generator=g, dtype=D)
    for name, kw in (
        ("diffusion_dpo", {"beta": 5000.0}),
        ("smpo_diffusion", {"beta": 2000.0, "scale": 10.0}),
    ):
        th = torch.stack([e[0], e[1]], -1)
        x1 = (-th).clone().requires_grad_(True)
        out = run(
            name,
            PolicyStats(x1, torch.ones(B, 2, dtype=D), inputs={"pref_prob": pp}),
            RefStats(-torch.stack([e[2], e[3]], -1)),
            **kw,
        )
        out.losses.sum().backward()
        x2 = th.clone().requires_grad_(True)
        mult = 1.0 if name == "diffusion_dpo" else (2 * pp - 1) * 10.0
        inside = -(kw["beta"] / 2) * mult * ((x2[:, 0] - x2[:, 1]) - (e[2] - e[3]))
        exp = torch.log1p(torch.exp(-inside))
        exp.sum().backward()
        # β·Δe amplifies float64 rounding of the error differences, hence rtol 1e-9.
        torch.testing.assert_close(out.losses, exp.detach(), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(x1.grad, -x2.grad, rtol=1e-7, atol=1e-9)  # slot holds −MSE


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_extreme_float32(sign):
    ewt = torch.full((3,), 1.0, requires_grad=True)
    elt = torch.full((3,), 1.0 + sign * 4.0, requires_grad=True)
    ewr, elr = torch.ones(3), torch.ones(3)
    for fn in (
        lambda: diffusion_dpo(ewt, ewr, elt, elr),
        lambda: smpo_diffusion(ewt, ewr, elt, elr, torch.full((3,), 0.73)),
    ):
        loss = fn()  # |(β/2)·Δe| = 1e4
        g = torch.autograd.grad(loss.sum(), [ewt, elt])
        assert torch.isfinite(loss).all() and all(torch.isfinite(x).all() for x in g)


def test_registry_declarations():
    assert names(trains="diffusion") == ["diffusion_dpo", "smpo_diffusion"]
    for n in names(trains="diffusion"):
        o = get(n)
        assert o.reference == "logps" and o.shape == "paired" and "[diffusion objective]" in o.notes
    assert get("smpo_diffusion").inputs == ("pref_prob",)
