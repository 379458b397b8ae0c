"""RDPO and R-ORPO with rationales (METHODS.md §M3): golden values of §M3(d), float64 parity of loss and gradients
(pair and rationale log-probs) against the formulas written out below with plain math, reductions to DPO / ORPO at
γ = 0, errors, stability.

Reference formulas (reds-lab/preference-learning-with-rationales trainers.py):
RDPO code  L = softplus(−βΔ) + softplus(−γ·ℓ_r);  paper  L = softplus(−βΔ) − γ·ℓ_r   (ℓ_r summed)
R-ORPO     L = −ℓ̄_w + β·softplus(−logodds) − γ·ℓ̄_r (simple) or + softplus(−γ·ℓ̄_r) (sigmoid),
           logodds = ℓ̄_w − log(1 − e^{ℓ̄_w}) − ℓ̄_l + log(1 − e^{ℓ̄_l}).
"""

from __future__ import annotations

import math

import pytest
import torch

from preftune.losses import PolicyStats, RefStats, get

D = torch.float64


def run(name, policy, ref=None, **overrides):
    obj = get(name)
    return obj.fn(policy, ref, **obj.resolve(overrides))


def stats(logps, lengths, r_logps, r_lengths, dtype=D):
    p = PolicyStats(torch.tensor(logps, dtype=dtype), torch.tensor(lengths, dtype=dtype))
    p.inputs = {"rationale_logps": torch.tensor(r_logps, dtype=dtype),
                "rationale_lengths": torch.tensor(r_lengths, dtype=dtype)}
    return p


def test_golden_rdpo():
    # §M3(d): Δ = 1.5, β = 0.1, ℓ_θ(r) = −40, γ = 0.01.
    p = stats([[-10.0, -11.5]], [[5.0, 5.0]], [-40.0], [20.0])
    ref = RefStats(torch.tensor([[-10.0, -10.0]], dtype=D))
    assert float(run("rdpo_rationale", p, ref, beta=0.1, gamma=0.01).losses[0]) == pytest.approx(1.533972, abs=1e-5)
    out = run("rdpo_rationale", p, ref, beta=0.1, gamma=0.01, form="paper")
    assert float(out.losses[0]) == pytest.approx(1.020957, abs=1e-5)
    assert float(out.metrics["rationale_loss"][0]) == pytest.approx(0.4, abs=1e-12)
    assert float(out.chosen_rewards[0] - out.rejected_rewards[0]) == pytest.approx(0.15, abs=1e-12)


def test_golden_rorpo_simple():
    # §M3(d): ℓ̄_w = −1, ℓ̄_l = −1.5, NLL(y_w) = 1, ℓ̄_r = −2, β = 0.1, γ = 1: logodds 0.706193, L = 3.040114.
    p = stats([[-4.0, -6.0]], [[4.0, 4.0]], [-10.0], [5.0])
    out = run("rorpo_rationale", p, beta=0.1, gamma=1.0)
    assert float(out.metrics["log_odds_ratio"][0]) == pytest.approx(0.706193, abs=1e-5)
    assert float(out.losses[0]) == pytest.approx(3.040114, abs=1e-5)


def _softplus(x):
    return math.log1p(math.exp(-abs(x))) + max(x, 0.0)


def _rdpo_ref(pol, ref, r, beta, gamma, form):
    delta = (pol[0] - ref[0]) - (pol[1] - ref[1])
    term = _softplus(-gamma * r) if form == "code" else -gamma * r
    return _softplus(-beta * delta) + term


def _rorpo_ref(pol, lens, r, r_len, beta, gamma, form):
    aw, al, ar = pol[0] / lens[0], pol[1] / lens[1], r / r_len
    odds = (aw - math.log(1 - math.exp(aw))) - (al - math.log(1 - math.exp(al)))
    term = -gamma * ar if form == "simple" else _softplus(-gamma * ar)
    return -aw + beta * _softplus(-odds) + term


def _numeric_grad(f, x, eps=1e-6):
    g = torch.zeros_like(x)
    for i in range(x.numel()):
        d = torch.zeros_like(x).view(-1)
        d[i] = eps
        g.view(-1)[i] = (f(x + d.view_as(x)) - f(x - d.view_as(x))) / (2 * eps)
    return g


@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("name,form", [("rdpo_rationale", "code"), ("rdpo_rationale", "paper"),
                                       ("rorpo_rationale", "simple"), ("rorpo_rationale", "sigmoid")])
def test_parity_loss_and_gradients(batch, name, form):
    g = torch.Generator().manual_seed(batch * 7 + len(form))
    lens = torch.randint(2, 30, (batch, 2), generator=g).to(D)
    pol = -(torch.rand(batch, 2, generator=g, dtype=D) * 3 + 0.05) * lens  # ℓ̄ in (−3.05, −0.05)
    ref = pol.detach() + torch.randn(batch, 2, generator=g, dtype=D)
    r_len = torch.randint(5, 60, (batch,), generator=g).to(D)
    r = -(torch.rand(batch, generator=g, dtype=D) * 3 + 0.1) * r_len
    beta, gamma = 0.3, 0.05

    def total_ref(pol_, r_):
        out = 0.0
        for b in range(batch):
            pb, rb = pol_[b].tolist(), float(r_[b])
            if name == "rdpo_rationale":
                out += _rdpo_ref(pb, ref[b].tolist(), rb, beta, gamma, form)
            else:
                out += _rorpo_ref(pb, lens[b].tolist(), rb, float(r_len[b]), beta, gamma, form)
        return out

    pol_t, r_t = pol.clone().requires_grad_(True), r.clone().requires_grad_(True)
    p = PolicyStats(pol_t, lens, inputs={"rationale_logps": r_t, "rationale_lengths": r_len})
    out = run(name, p, RefStats(ref) if name == "rdpo_rationale" else None, beta=beta, gamma=gamma, form=form)
    assert float(out.losses.sum().detach()) == pytest.approx(total_ref(pol, r), rel=1e-12, abs=1e-12)
    g_pol, g_r = torch.autograd.grad(out.losses.sum(), (pol_t, r_t))
    torch.testing.assert_close(g_pol, _numeric_grad(lambda x: total_ref(x, r), pol), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(g_r, _numeric_grad(lambda x: total_ref(pol, x), r), rtol=1e-6, atol=1e-8)


def test_gamma_zero_is_dpo_and_orpo_and_rationales_are_required():
    g = torch.Generator().manual_seed(0)
    lens = torch.full((5, 2), 6.0, dtype=D)
    pol = -torch.rand(5, 2, generator=g, dtype=D) * 12 - 0.5
    ref = RefStats(pol + torch.randn(5, 2, generator=g, dtype=D))
    p = PolicyStats(pol, lens, inputs={"rationale_logps": torch.full((5,), -30.0, dtype=D),
                                       "rationale_lengths": torch.full((5,), 10.0, dtype=D)})
    dpo = get("dpo").fn(PolicyStats(pol, lens), ref, beta=0.2).losses
    torch.testing.assert_close(run("rdpo_rationale", p, ref, beta=0.2, gamma=0.0, form="paper").losses, dpo)
    # the code form at γ = 0 adds the constant log 2 (−log σ(0))
    torch.testing.assert_close(run("rdpo_rationale", p, ref, beta=0.2, gamma=0.0).losses, dpo + math.log(2))
    orpo = get("orpo").fn(PolicyStats(pol, lens), None, beta=0.2).losses
    torch.testing.assert_close(run("rorpo_rationale", p, beta=0.2, gamma=0.0).losses, orpo)
    with pytest.raises(ValueError, match="needs inputs rationale_logps, rationale_lengths"):
        run("rdpo_rationale", PolicyStats(pol, lens), ref)
    assert get("rdpo_rationale").needs_reference and not get("rorpo_rationale").needs_reference


@pytest.mark.parametrize("name", ["rdpo_rationale", "rorpo_rationale"])
def test_stability_float32(name):
    pol = torch.tensor([[-1e4, -1.0], [-1.0, -1e4]], requires_grad=True)
    r = torch.tensor([-1e4, -1e-3], requires_grad=True)
    p = PolicyStats(pol, torch.tensor([[3.0, 3.0], [3.0, 3.0]]),
                    inputs={"rationale_logps": r, "rationale_lengths": torch.tensor([4.0, 4.0])})
    out = run(name, p, RefStats(torch.zeros(2, 2)) if name == "rdpo_rationale" else None)
    assert torch.isfinite(out.losses).all()
    out.losses.sum().backward()
    assert torch.isfinite(pol.grad).all() and torch.isfinite(r.grad).all()
