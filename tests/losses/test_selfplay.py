"""Part E self-play objectives: golden values (Appendix A), properties (INPO with π_t = π_ref is IPO-sum,
DNO is DPO, sppo_hard = 2 × soft SPPO at P̂ = (1, 0)), parity with independent float64 formulas (loss
and gradients), TRL parity for sppo_hard, and float32 stability at extreme log-ratios.
"""

from __future__ import annotations

import pytest
import torch

from preftune.losses import PolicyStats, RefStats, get

D = torch.float64


def run(name, policy, ref, **overrides):
    obj = get(name)
    return obj.fn(policy, ref, **obj.resolve(overrides))


def canonical(dtype=D, **inputs):
    p = PolicyStats(torch.tensor([[-10.0, -12.0]], dtype=dtype), torch.tensor([[5.0, 8.0]], dtype=dtype))
    p.inputs.update({k: torch.tensor(v, dtype=dtype) for k, v in inputs.items()})
    return p, RefStats(torch.tensor([[-11.0, -11.5]], dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_golden(dtype):
    p, r = canonical(dtype, win_probs=[[0.7, 0.3]], prev_logps=[[-10.5, -11.8]])
    assert float(run("sppo_hard", p, r, beta=0.1).losses[0]) == pytest.approx(36.25, abs=1e-3)
    assert float(run("sppo", p, r, beta=1e-3).losses[0]) == pytest.approx(
        39700.625, abs=1e-3 if dtype == D else 1e-2
    )
    assert float(run("inpo", p, r, tau=0.01, eta=0.1).losses[0]) == pytest.approx(
        17.8084, abs=1e-5 if dtype == D else 1e-4
    )


def rand(B, seed, dtype=D, scale=5.0):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, 2, generator=g, dtype=D) * 20 * scale
    ref = lp + torch.randn(B, 2, generator=g, dtype=D) * scale
    prev = lp + torch.randn(B, 2, generator=g, dtype=D) * scale
    wp = torch.rand(B, 2, generator=g, dtype=D)
    pw = torch.rand(B, generator=g, dtype=D)
    return lp.to(dtype), ref.to(dtype), prev.to(dtype), wp.to(dtype), pw.to(dtype)


@pytest.mark.parametrize("B", [1, 7])
def test_inpo_with_prev_equal_ref_is_ipo_sum(B):
    lp, ref, _, _, _ = rand(B, B)
    p = PolicyStats(lp, torch.ones(B, 2), inputs={"prev_logps": ref})
    a = run("inpo", p, RefStats(ref), tau=0.02, eta=0.3).losses
    b = run("ipo_sum", p, RefStats(ref), beta=0.3).losses
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("B", [1, 7])
def test_dno_is_dpo_and_sppo_hard_is_twice_soft(B):
    lp, ref, _, _, _ = rand(B, 10 + B)
    p = PolicyStats(lp, torch.ones(B, 2), inputs={"win_probs": torch.tensor([[1.0, 0.0]] * B, dtype=D)})
    torch.testing.assert_close(
        run("dno", p, RefStats(ref), beta=0.2).losses, run("dpo", p, RefStats(ref), beta=0.2).losses
    )
    torch.testing.assert_close(
        run("sppo_hard", p, RefStats(ref), beta=0.05).losses,
        2 * run("sppo", p, RefStats(ref), beta=0.05).losses,
    )


def test_inpo_rejects_tau_above_eta():
    p, r = canonical(prev_logps=[[-10.5, -11.8]])
    with pytest.raises(ValueError, match="tau"):
        run("inpo", p, r, tau=0.5, eta=0.1)


# ------------------------------------------------------------------------------------------- parity


def f_sppo(lp, ref, wp, beta):
    eta = 1 / beta
    return 0.5 * (
        (lp[:, 0] - ref[:, 0] - eta * (wp[:, 0] - 0.5)) ** 2
        + (lp[:, 1] - ref[:, 1] - eta * (wp[:, 1] - 0.5)) ** 2
    )


def f_sppo_single(lp, ref, pw, beta):
    eta = 1 / beta
    return 0.5 * (
        (lp[:, 0] - ref[:, 0] - eta * (pw - 0.5)) ** 2 + (lp[:, 1] - ref[:, 1] + eta * (pw - 0.5)) ** 2
    )


def f_sppo_hard(lp, ref, beta):
    return (lp[:, 0] - ref[:, 0] - 0.5 / beta) ** 2 + (lp[:, 1] - ref[:, 1] + 0.5 / beta) ** 2


def f_dno(lp, ref, beta):
    z = beta * ((lp[:, 0] - ref[:, 0]) - (lp[:, 1] - ref[:, 1]))
    return torch.log1p(torch.exp(-z))


def f_inpo(lp, ref, prev, tau, eta):
    h = (
        (lp[:, 0] - lp[:, 1])
        - tau / eta * (ref[:, 0] - ref[:, 1])
        - (eta - tau) / eta * (prev[:, 0] - prev[:, 1])
    )
    return (h - 1 / (2 * eta)) ** 2


CASES = [
    ("sppo", {"beta": 0.01}, lambda lp, ref, prev, wp, pw: f_sppo(lp, ref, wp, 0.01)),
    ("sppo_single", {"beta": 0.01}, lambda lp, ref, prev, wp, pw: f_sppo_single(lp, ref, pw, 0.01)),
    ("sppo_hard", {"beta": 0.1}, lambda lp, ref, prev, wp, pw: f_sppo_hard(lp, ref, 0.1)),
    ("dno", {"beta": 0.1}, lambda lp, ref, prev, wp, pw: f_dno(lp, ref, 0.1)),
    ("inpo", {"tau": 0.05, "eta": 0.2}, lambda lp, ref, prev, wp, pw: f_inpo(lp, ref, prev, 0.05, 0.2)),
]


@pytest.mark.parametrize("name,kw,formula", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("B", [1, 7])
def test_parity_loss_and_gradients(name, kw, formula, B):
    lp, ref, prev, wp, pw = rand(B, 100 + B, scale=0.1)
    inputs = {"win_probs": wp, "pair_win_prob": pw, "prev_logps": prev}
    w = torch.linspace(0.5, 1.5, B, dtype=D)
    x1 = lp.clone().requires_grad_(True)
    out = run(name, PolicyStats(x1, torch.ones(B, 2, dtype=D), inputs=inputs), RefStats(ref), **kw)
    (out.losses * w).sum().backward()
    x2 = lp.clone().requires_grad_(True)
    expected = formula(x2, ref, prev, wp, pw)
    (expected * w).sum().backward()
    torch.testing.assert_close(out.losses, expected.detach(), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-12, atol=1e-9)
    assert out.chosen_rewards.shape == (B,) and not out.chosen_rewards.requires_grad


def test_sppo_hard_matches_trl():
    pytest.importorskip("trl")
    import inspect

    from trl.trainer import dpo_trainer

    src = inspect.getsource(dpo_trainer)
    # TRL 1.16: winner (ρ_w − 0.5/β)², loser (ρ_l + 0.5/β)², summed, no ½.
    assert "(chosen_logratios - 0.5 / self.beta) ** 2" in src
    assert "(rejected_logratios + 0.5 / self.beta) ** 2" in src
    lp, ref, _, _, _ = rand(7, 5)
    rho = lp - ref
    trl_form = (rho[:, 0] - 0.5 / 0.1) ** 2 + (rho[:, 1] + 0.5 / 0.1) ** 2
    torch.testing.assert_close(
        run("sppo_hard", PolicyStats(lp, torch.ones(7, 2)), RefStats(ref)).losses, trl_form
    )


@pytest.mark.parametrize("name", [c[0] for c in CASES])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_extreme_log_ratios_float32(name, sign):
    B = 3
    lp = torch.tensor([[-1.0, -1.0 - sign * 1e4]] * B).requires_grad_(True)
    ref = torch.tensor([[-1.0, -1.0]] * B)
    inputs = {
        "win_probs": torch.tensor([[0.9, 0.1]] * B),
        "pair_win_prob": torch.full((B,), 0.8),
        "prev_logps": ref,
    }
    out = run(name, PolicyStats(lp, torch.ones(B, 2), inputs=inputs), RefStats(ref))
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(lp.grad).all()


def test_registry_declarations():
    assert get("sppo").inputs == ("win_probs",)
    assert get("sppo_single").inputs == ("pair_win_prob",)
    assert get("inpo").inputs == ("prev_logps",)
    assert get("sppo_hard").inputs == () and get("dno").inputs == ()
    for n in ("sppo", "sppo_single", "sppo_hard", "dno", "inpo"):
        assert get(n).reference == "logps" and get(n).shape == "paired"
