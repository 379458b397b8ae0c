"""Part C unpaired objectives (KTO, BCO, unpaired APO-zero): golden values, KL-baseline and state
behaviour, parity with independent float64 formulas (loss + gradients), extreme-value stability."""

from __future__ import annotations

import pytest
import torch

from preftune.losses import PolicyStats, RefStats, get
from preftune.losses.pairwise import RunningMean

D = torch.float64


def run(name, policy, ref, state=None, **overrides):
    obj = get(name)
    extra = {} if state is None else {"state": state}
    return obj.fn(policy, ref, **obj.resolve(overrides), **extra)


def batch(lp, rf, labels, dtype=D, **inputs):
    lp = torch.as_tensor(lp, dtype=dtype).reshape(-1, 1)
    pol = PolicyStats(
        lp, torch.ones_like(lp), inputs={"labels": torch.as_tensor(labels).reshape(-1, 1), **inputs}
    )
    return pol, RefStats(torch.as_tensor(rf, dtype=dtype).reshape(-1, 1))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_golden_kto(dtype):
    # desirable ρ = 1.0 and undesirable ρ = −0.5, z0 = 0.2, λ_D = λ_U = 1 (Appendix A rows)
    p, r = batch([-10.0, -12.0], [-11.0, -11.5], [True, False], dtype)
    out = run("kto", p, r, z0=0.2)
    assert float(out.losses[0]) == pytest.approx(0.480011, abs=1e-5)
    assert float(out.losses[1]) == pytest.approx(0.482507, abs=1e-5)
    # the same z0 estimated from mismatched pairs: mean(kl − ref_kl) = 0.2
    p, r = batch(
        [-10.0, -12.0],
        [-11.0, -11.5],
        [True, False],
        dtype,
        kl_logps=torch.tensor([-5.0, -7.0], dtype=dtype),
        ref_kl_logps=torch.tensor([-5.3, -7.1], dtype=dtype),
    )
    out = run("kto", p, r)
    assert float(out.metrics["kl"]) == pytest.approx(0.2, abs=1e-6)
    assert float(out.losses[0]) == pytest.approx(0.480011, abs=1e-5)
    # labels may be (B,) as well as (B, 1); metrics carry label-conditional sums
    p.inputs["labels"] = torch.tensor([True, False])
    out = run("kto", p, r)
    chosen = out.metrics["rewards/chosen"]
    assert int((~torch.isnan(chosen)).sum()) == 1
    assert float(torch.nansum(chosen)) == pytest.approx(0.1)
    assert int((~torch.isnan(out.metrics["rewards/rejected"])).sum()) == len(chosen) - 1


def test_kto_reference_point_clamped_and_detached():
    kl = torch.tensor([-9.0, -9.0], dtype=D, requires_grad=True)
    p, r = batch(
        [-10.0, -12.0],
        [-11.0, -11.5],
        [True, False],
        kl_logps=kl,
        ref_kl_logps=torch.tensor([-8.0, -8.5], dtype=D),
    )
    p.logps.requires_grad_(True)
    out = run("kto", p, r)
    assert float(out.metrics["kl"]) == 0.0  # mean is −0.75, clamped at 0
    out.losses.sum().backward()
    assert kl.grad is None


def test_apo_zero_unpaired_and_weights():
    p, r = batch([-10.0, -12.0], [-11.0, -11.5], [True, False])
    out = run("apo_zero_unpaired", p, r, desirable_weight=2.0, undesirable_weight=0.5)
    s = torch.sigmoid(torch.tensor([0.1, -0.05], dtype=D))
    torch.testing.assert_close(out.losses, torch.stack([2.0 * (1 - s[0]), 0.5 * s[1]]))
    # the paired APO-zero is the sum of the unpaired terms of its two responses
    pp = PolicyStats(torch.tensor([[-10.0, -12.0]], dtype=D), torch.ones(1, 2, dtype=D))
    paired = get("apo_zero").fn(pp, RefStats(torch.tensor([[-11.0, -11.5]], dtype=D)), beta=0.1)
    assert float(paired.losses) == pytest.approx(float(run("apo_zero_unpaired", p, r).losses.sum()))


def test_bco_state_and_udm():
    st = RunningMean()
    p, r = batch([-10.0, -12.0, -9.0], [-11.0, -11.5, -9.5], [True, False, False])
    out = run("bco", p, r, state=st)
    rewards = torch.tensor([0.1, -0.05, 0.05], dtype=D)
    assert st.mean == pytest.approx(float(rewards.mean()))
    d = rewards.mean()
    expected = torch.stack(
        [
            -torch.log(torch.sigmoid(rewards[0] - d)),
            -torch.log(torch.sigmoid(-(rewards[1] - d))),
            -torch.log(torch.sigmoid(-(rewards[2] - d))),
        ]
    )
    torch.testing.assert_close(out.losses, expected)
    # UDM density ratios weight undesirable examples only, clamped to [0.5, 10]
    p.inputs["udm_ratio"] = torch.tensor([100.0, 100.0, 0.01], dtype=D)
    out = run("bco", p, r)  # stateless: δ = 0
    base = run("bco", batch([-10.0, -12.0, -9.0], [-11.0, -11.5, -9.5], [True, False, False])[0], r).losses
    torch.testing.assert_close(out.losses, base * torch.tensor([1.0, 10.0, 0.5], dtype=D))


def test_unpaired_errors():
    pp = PolicyStats(torch.zeros(2, 2), torch.ones(2, 2), inputs={"labels": torch.tensor([True, False])})
    with pytest.raises(ValueError, match="kto.*K=1"):
        run("kto", pp, RefStats(torch.zeros(2, 2)))
    p, r = batch([-1.0], [-1.0], [True])
    del p.inputs["labels"]
    with pytest.raises(ValueError, match="bco.*labels"):
        run("bco", p, r)
    for name, bad in [
        ("kto", {"beta": 0.0}),
        ("kto", {"z0": -1.0}),
        ("kto", {"desirable_weight": -1.0}),
        ("bco", {"beta": -1.0}),
        ("apo_zero_unpaired", {"beta": 0.0}),
    ]:
        with pytest.raises(ValueError, match=f"'{name}'"):
            get(name).resolve(bad)
    assert all(
        get(n).shape == "unpaired" and get(n).min_responses == 1 for n in ("kto", "bco", "apo_zero_unpaired")
    )


def sig(z):
    return 1 / (1 + torch.exp(-z))


def R_kto(lp, rf, lab, inputs, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0):
    rho = lp - rf
    z0 = torch.clamp((inputs["kl_logps"] - inputs["ref_kl_logps"]).mean(), min=0).detach()
    return torch.where(
        lab,
        desirable_weight * (1 - sig(beta * (rho - z0))),
        undesirable_weight * (1 - sig(beta * (z0 - rho))),
    )


def R_bco(lp, rf, lab, inputs, beta=0.1):
    r = beta * (lp - rf)
    d = r.mean().detach()  # fresh state: δ = this batch's mean reward
    return torch.where(lab, -torch.log(sig(r - d)), -torch.log(sig(-(r - d))))


def R_apo(lp, rf, lab, inputs, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0):
    r = beta * (lp - rf)
    return torch.where(lab, desirable_weight * (1 - sig(r)), undesirable_weight * sig(r))


PARITY = {
    "kto": (R_kto, {"beta": 0.3, "desirable_weight": 1.2, "undesirable_weight": 0.8}, False),
    "bco": (R_bco, {"beta": 0.3}, True),
    "apo_zero_unpaired": (R_apo, {"beta": 0.3, "desirable_weight": 1.2, "undesirable_weight": 0.8}, False),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("B", [1, 7])
@pytest.mark.parametrize("name", sorted(PARITY))
def test_parity(name, B, dtype):
    ref_fn, kw, stateful = PARITY[name]
    g = torch.Generator().manual_seed(B + 50)
    lp64 = -30 * torch.rand(B, generator=g, dtype=D)
    rf64 = lp64 + 4 * torch.randn(B, generator=g, dtype=D)
    lab = torch.rand(B, generator=g) < 0.5
    kl = -30 * torch.rand(B, generator=g, dtype=D)
    inputs = {"kl_logps": kl, "ref_kl_logps": kl - 1.0 + torch.randn(B, generator=g, dtype=D)}
    lp_ref = lp64.clone().requires_grad_(True)
    expected = ref_fn(lp_ref, rf64, lab, inputs, **kw)
    v = torch.randn(B, generator=g, dtype=D)
    (expected * v).sum().backward()
    lp_lib = lp64.to(dtype).clone().requires_grad_(True)
    pol = PolicyStats(
        lp_lib.unsqueeze(1),
        torch.ones(B, 1, dtype=dtype),
        inputs={"labels": lab, **{k: t.to(dtype) for k, t in inputs.items()}},
    )
    out = run(
        name, pol, RefStats(rf64.to(dtype).unsqueeze(1)), state=RunningMean() if stateful else None, **kw
    )
    (out.losses * v.to(dtype)).sum().backward()
    assert out.losses.shape == (B,)
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(out.losses.detach().to(D), expected.detach(), **tol)
    torch.testing.assert_close(lp_lib.grad.to(D), lp_ref.grad, **tol)


@pytest.mark.parametrize("stateful", [False, True])
@pytest.mark.parametrize("name", sorted(PARITY))
def test_stability_extreme_log_ratios(name, stateful):
    lp = torch.tensor([-1e-3, -2e4, -1e-3, -2e4], requires_grad=True)
    rf = torch.tensor([-1e4, -1e4, -1e4, -1e4])
    lab = torch.tensor([True, True, False, False])
    inputs = {
        "labels": lab,
        "kl_logps": torch.tensor([-1e-3, -2e4, 0.0, -1.0]),
        "ref_kl_logps": torch.full((4,), -1e4),
    }
    pol = PolicyStats(lp.unsqueeze(1), torch.ones(4, 1), inputs=inputs)
    state = RunningMean() if (stateful and name == "bco") else None
    out = run(name, pol, RefStats(rf.unsqueeze(1)), state=state)
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(lp.grad).all()
