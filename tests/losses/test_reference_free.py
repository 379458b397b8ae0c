"""Part B reference-free objectives in reference_free.py (CPO, SLiC-HF, ASFT, TPO, TPO-L): golden values,
properties, parity with independent float64 formulas (loss + gradients) and extreme-value stability."""

from __future__ import annotations

import math

import pytest
import torch

from preftune.losses import PolicyStats, get

D = torch.float64


def run(name, policy, **overrides):
    obj = get(name)
    return obj.fn(policy, None, **obj.resolve(overrides))


def canonical(k=2, dtype=D):
    lp = [-10.0, -12.0, -10.0][:k]  # gold = a copy of the chosen, NLL 2.0
    n = [5.0, 8.0, 5.0][:k]
    return PolicyStats(torch.tensor([lp], dtype=dtype), torch.tensor([n], dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_golden_cpo_and_tpo(dtype):
    # Appendix A: CPO β=0.1 α=1 (NLL(y_w)=2) and TPO β=0.1 α=1 (NLL_gold=2) are both 2.598139.
    assert float(run("cpo", canonical(2, dtype)).losses[0]) == pytest.approx(2.598139, abs=1e-5)
    assert float(run("tpo", canonical(3, dtype)).losses[0]) == pytest.approx(2.598139, abs=1e-5)


def test_golden_derived_slic_asft():
    # SLiC: max(0, 1 − (−10) + (−12)) = 0 here; with δ = 3: 1.0, plus λ·10 = 1.0.
    assert float(run("slic_hf", canonical()).losses[0]) == pytest.approx(0.0 + 0.1 * 10.0)
    assert float(run("slic_hf", canonical(), delta=3.0).losses[0]) == pytest.approx(1.0 + 1.0)
    # ASFT: ℓ̄_w = −2, ℓ̄_l = −1.5: 2 + 0.1·(2 − log(1 − e^{−1.5}))
    expected = 2.0 + 0.1 * (2.0 - math.log(1 - math.exp(-1.5)))
    assert float(run("asft", canonical()).losses[0]) == pytest.approx(expected, abs=1e-12)


def rand(B, K, seed, dtype=D):
    g = torch.Generator().manual_seed(seed)
    n = torch.randint(1, 25, (B, K), generator=g).to(D)
    lp = -n * (0.05 + 2.0 * torch.rand(B, K, generator=g, dtype=D))
    return lp.to(dtype), n.to(dtype)


def test_properties():
    lp, n = rand(7, 3, 1)
    p3 = PolicyStats(lp, n)
    p2 = PolicyStats(lp[:, :2], n[:, :2])
    # TPO with gold = chosen is CPO
    p_gold_is_chosen = PolicyStats(torch.cat([lp[:, :2], lp[:, :1]], 1), torch.cat([n[:, :2], n[:, :1]], 1))
    torch.testing.assert_close(run("tpo", p_gold_is_chosen).losses, run("cpo", p2).losses)
    # CPO without BC term is reference-free DPO on sums; label smoothing ε = 0 is the plain sigmoid
    z = 0.1 * (lp[:, 0] - lp[:, 1])
    torch.testing.assert_close(run("cpo", p2, cpo_alpha=0.0).losses, -torch.log(torch.sigmoid(z)))
    # TPO-L with γ = 0 and α = 0 is SimPO with γ = 0 (no SFT term)
    torch.testing.assert_close(
        run("tpo_l", p3, gamma=0.0, alpha=0.0, beta=2.0).losses,
        get("simpo").fn(p2, None, beta=2.0, gamma_beta_ratio=0.0).losses,
    )
    # SLiC is zero-gradient in the calibration term once the margin δ is met
    assert (run("slic_hf", p2, lambda_reg=0.0).losses >= 0).all()


def test_shape_errors_and_bad_hyperparameters():
    with pytest.raises(ValueError, match="tpo.*K=3"):
        run("tpo", canonical(2))
    with pytest.raises(ValueError, match="tpo_l.*K=3"):
        run("tpo_l", canonical(2))
    for name, bad in [
        ("cpo", {"beta": 0.0}),
        ("cpo", {"label_smoothing": 0.5}),
        ("slic_hf", {"delta": -1.0}),
        ("asft", {"beta": -0.1}),
        ("tpo", {"alpha": -1.0}),
    ]:
        with pytest.raises(ValueError, match=f"'{name}'"):
            get(name).resolve(bad)
    assert get("tpo").min_responses == 3 and get("tpo").reference == "none"


def lsig(z):
    return -torch.log1p(torch.exp(-z))


def R_cpo(lp, n, beta=0.1, cpo_alpha=1.0, label_smoothing=0.0):
    z = beta * (lp[:, 0] - lp[:, 1])
    return -(1 - label_smoothing) * lsig(z) - label_smoothing * lsig(-z) + cpo_alpha * (-lp[:, 0] / n[:, 0])


def R_slic_hf(lp, n, delta=1.0, lambda_reg=0.1):
    return torch.clamp(delta - lp[:, 0] + lp[:, 1], min=0) - lambda_reg * lp[:, 0]


def R_asft(lp, n, beta=0.1):
    pw, pl = torch.exp(lp[:, 0] / n[:, 0]), torch.exp(lp[:, 1] / n[:, 1])
    fw, fl = torch.log(pw / (1 - pw)), torch.log(pl / (1 - pl))  # ORPO log-odds
    return -lp[:, 0] / n[:, 0] + beta * (-lsig(fw) - lsig(-fl))


def R_tpo(lp, n, beta=0.1, alpha=1.0, label_smoothing=0.0):
    z = beta * (lp[:, 0] - lp[:, 1])
    return -(1 - label_smoothing) * lsig(z) - label_smoothing * lsig(-z) + alpha * (-lp[:, 2] / n[:, 2])


def R_tpo_l(lp, n, beta=0.1, gamma=0.5, alpha=1.0, label_smoothing=0.0):
    z = beta * (lp[:, 0] / n[:, 0] - lp[:, 1] / n[:, 1]) - gamma
    return -(1 - label_smoothing) * lsig(z) - label_smoothing * lsig(-z) + alpha * (-lp[:, 2] / n[:, 2])


PARITY = {
    "cpo": (R_cpo, 2, {"beta": 0.2, "cpo_alpha": 0.7, "label_smoothing": 0.1}),
    "slic_hf": (R_slic_hf, 2, {"delta": 5.0, "lambda_reg": 0.3}),
    "asft": (R_asft, 2, {"beta": 0.4}),
    "tpo": (R_tpo, 3, {"beta": 0.2, "alpha": 0.5, "label_smoothing": 0.05}),
    "tpo_l": (R_tpo_l, 3, {"beta": 2.0, "gamma": 0.4, "alpha": 0.5, "label_smoothing": 0.05}),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("B", [1, 7])
@pytest.mark.parametrize("name", sorted(PARITY))
def test_parity(name, B, dtype):
    ref_fn, K, kw = PARITY[name]
    lp64, n64 = rand(B, K, seed=B + 40)
    v = torch.randn(B, generator=torch.Generator().manual_seed(B), dtype=D)
    lp_ref = lp64.clone().requires_grad_(True)
    expected = ref_fn(lp_ref, n64, **kw)
    (expected * v).sum().backward()
    lp_lib = lp64.to(dtype).clone().requires_grad_(True)
    out = run(name, PolicyStats(lp_lib, n64.to(dtype)), **kw)
    (out.losses * v.to(dtype)).sum().backward()
    assert out.losses.shape == (B,)
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(out.losses.detach().to(D), expected.detach(), **tol)
    torch.testing.assert_close(lp_lib.grad.to(D), lp_ref.grad, **tol)


@pytest.mark.parametrize("name", sorted(PARITY))
def test_stability_extreme_log_probs(name):
    K = PARITY[name][1]
    # sums near 0 and near −1e4, differences of ±1e4, average log-probs from −1e4 to ~0
    lp = torch.tensor([[-1e-7, -1e4, -1e-7], [-1e4, -1e-7, -1e4], [-1e4, -1e4, -1e-3]])[:, :K]
    n = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [3.0, 2000.0, 7.0]])[:, :K]
    lp = lp.clone().requires_grad_(True)
    out = run(name, PolicyStats(lp, n))
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(lp.grad).all()
