"""Part D token-level objectives: golden values (LOSSES.md Appendix A), property tests (TDPO1 → DPO,
SparsePO → TDPO1, TDPO2's stop-gradient), parity with independent float64 formulas written here per
example with Python loops (loss and gradients), padding garbage, and stability at extreme log-ratios.
"""

from __future__ import annotations

import math

import pytest
import torch

from preftune.losses import PolicyStats, RefStats, get
from preftune.losses.token import oreo_value_loss

D = torch.float64


def run(name, policy, ref, **overrides):
    obj = get(name)
    return obj.fn(policy, ref, **obj.resolve(overrides))


def lsig(z):
    return -math.log1p(math.exp(-z)) if z > 0 else z - math.log1p(math.exp(z))


def make(B, K=2, T=6, seed=0, dtype=D, scale=1.0):
    """Random consistent token stats: sequence logps are the masked token sums."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B, K), generator=g)
    mask = torch.arange(T).view(1, 1, T) < lengths.unsqueeze(-1)
    tlp = -torch.rand(B, K, T, generator=g, dtype=D) * 3 * scale
    rtlp = -torch.rand(B, K, T, generator=g, dtype=D) * 3 * scale
    tkl = torch.rand(B, K, T, generator=g, dtype=D) * 0.5
    tlp, rtlp, tkl = (torch.where(mask, x, 0.0) for x in (tlp, rtlp, tkl))
    return dict(
        mask=mask, tlp=tlp.to(dtype), rtlp=rtlp.to(dtype), tkl=tkl.to(dtype), lengths=lengths.to(dtype), g=g
    )


def stats(d, inputs=None, leaf=True):
    """Build PolicyStats/RefStats whose logps are differentiable functions of the token leaves."""
    tlp = d["tlp"].clone().requires_grad_(leaf)
    tkl = d["tkl"].clone().requires_grad_(leaf)
    logps = torch.where(d["mask"], tlp, 0.0).sum(-1)
    p = PolicyStats(
        logps, d["lengths"], token_logps=tlp, token_mask=d["mask"], token_kl=tkl, inputs=inputs or {}
    )
    r = RefStats(torch.where(d["mask"], d["rtlp"], 0.0).sum(-1), d["rtlp"])
    return p, r, tlp, tkl


# ----------------------------------------------------------------------------------------------- golden


def canonical_kl(kw=0.3, kl=0.6, dtype=D):
    p = PolicyStats(
        torch.tensor([[-10.0, -12.0]], dtype=dtype),
        torch.tensor([[5.0, 8.0]], dtype=dtype),
        token_kl=torch.tensor([[[0.1, 0.2, 0.0, 9.0], [0.25, 0.35, 0.0, 9.0]]], dtype=dtype),
        token_mask=torch.tensor([[[1, 1, 1, 0], [1, 1, 0, 0]]], dtype=torch.bool),
    )
    r = RefStats(torch.tensor([[-11.0, -11.5]], dtype=dtype))
    return p, r


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name,kw,expected", [("tdpo1", {}, 0.634946), ("tdpo2", {"alpha": 0.5}, 0.627924)])
def test_golden_tdpo(name, kw, expected, dtype):
    p, r = canonical_kl(dtype=dtype)  # SeqKL = 0.3 / 0.6 (the 9.0 sits in padding)
    out = run(name, p, r, **kw)
    assert float(out.losses[0]) == pytest.approx(expected, abs=1e-5)
    assert float(out.metrics["seq_kl/chosen"][0]) == pytest.approx(0.3)


# ----------------------------------------------------------------------------------------------- properties


@pytest.mark.parametrize("B", [1, 7])
def test_tdpo1_with_zero_kl_equals_dpo(B):
    d = make(B, seed=B)
    d["tkl"] = torch.zeros_like(d["tkl"])
    p, r, _, _ = stats(d)
    a = run("tdpo1", p, r).losses
    b = run("dpo", p, r).losses
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("B", [1, 7])
def test_sparsepo_unit_masks_zero_lambda_equals_tdpo1(B):
    d = make(B, seed=10 + B)
    ones = torch.ones_like(d["tlp"])
    p, r, _, _ = stats(d, {"token_reward_mask": ones, "token_kl_mask": ones})
    a = run("sparsepo", p, r, lambda_reward=0.0, lambda_kl=0.0).losses
    b = run("tdpo1", p, r).losses
    torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    c = run("sparsepo", p, r, mask_reward=False, mask_kl=False).losses
    torch.testing.assert_close(c, b, rtol=0, atol=1e-10)


def test_tdpo2_stop_gradient_on_chosen_kl_only():
    d = make(5, seed=3)
    p, r, _, tkl = stats(d)
    run("tdpo2", p, r).losses.sum().backward()
    assert torch.count_nonzero(tkl.grad[:, 0]) == 0
    assert torch.count_nonzero(tkl.grad[:, 1]) > 0
    p, r, _, tkl = stats(d)
    run("tdpo1", p, r).losses.sum().backward()
    assert torch.count_nonzero(tkl.grad[:, 0]) > 0


def test_tgdpo_alpha_zero_equals_dpo():
    d = make(7, seed=4)
    p, r, _, _ = stats(d, {"token_rm_logps": torch.randn(7, 2, 6, dtype=D)})
    torch.testing.assert_close(
        run("tgdpo", p, r, alpha=0.0).losses, run("dpo", p, r).losses, rtol=0, atol=1e-12
    )


def test_oreo_zero_residual_at_soft_bellman_fixed_point():
    # With V(s_t) = R − β·Σ_{i≥t} ρ_i the policy residual vanishes; only the KL term (kl_coef=0) remains.
    d = make(3, K=1, seed=5)
    rho = torch.where(d["mask"], d["tlp"] - d["rtlp"], 0.0)
    R = torch.tensor([[1.0], [0.0], [1.0]], dtype=D)
    beta = 0.03
    to_go = rho.flip(-1).cumsum(-1).flip(-1)
    V = R.unsqueeze(-1) - beta * to_go
    p, r, _, _ = stats(d, {"values": V, "terminal_reward": R})
    assert run("oreo", p, r, beta=beta, kl_coef=0.0).losses.abs().max() < 1e-12
    assert oreo_value_loss(V, rho, d["mask"], R, beta).abs().max() < 1e-12


# ----------------------------------------------------------------------------------------------- parity


def ref_tdpo(tlp, rtlp, tkl, mask, beta, alpha=None):
    out = []
    for b in range(tlp.shape[0]):
        rho, kl = [], []
        for k in range(2):
            n = int(mask[b, k].sum())
            rho.append(sum(tlp[b, k, t] - rtlp[b, k, t] for t in range(n)))
            kl.append(sum(tkl[b, k, t] for t in range(n)))
        u = rho[0] - rho[1]
        delta = kl[1] - kl[0] if alpha is None else alpha * (kl[1] - kl[0].detach())
        out.append(torch.nn.functional.softplus(-(beta * (u - delta))))
    return torch.stack(out)


def ref_sparsepo(tlp, rtlp, tkl, mu, md, mask, beta, lu, ld):
    out = []
    for b in range(tlp.shape[0]):
        s_u, s_d, pen = [], [], 0.0
        for k in range(2):
            n = int(mask[b, k].sum())
            s_u.append(sum(mu[b, k, t] * (tlp[b, k, t] - rtlp[b, k, t]) for t in range(n)))
            s_d.append(sum(md[b, k, t] * (-tkl[b, k, t]) for t in range(n)))
            pen = (
                pen
                + lu * sum(mu[b, k, t].abs() for t in range(n))
                + ld * sum(md[b, k, t].abs() for t in range(n))
            )
        z = beta * ((s_u[0] - s_u[1]) - (s_d[0] - s_d[1]))
        out.append(torch.nn.functional.softplus(-z) + pen)
    return torch.stack(out)


def ref_tgdpo(tlp, rtlp, rmlp, mask, beta, alpha):
    out = []
    for b in range(tlp.shape[0]):
        terms = []
        for k, sign in ((0, 1.0), (1, -1.0)):
            n = int(mask[b, k].sum())
            s = 0.0
            for t in range(n):
                rhat = (beta * (rmlp[b, k, t] - rtlp[b, k, t])).detach()
                s = s + beta * (1 + sign * alpha * rhat) * (tlp[b, k, t] - rtlp[b, k, t])
            terms.append(s)
        out.append(torch.nn.functional.softplus(-(terms[0] - terms[1])))
    return torch.stack(out)


def ref_oreo(tlp, rtlp, V, R, mask, valid, beta, kl_coef):
    out = []
    for b in range(tlp.shape[0]):
        per = []
        for k in range(tlp.shape[1]):
            if not valid[b, k]:
                continue
            n = int(mask[b, k].sum())
            rho = [tlp[b, k, t] - rtlp[b, k, t] for t in range(n)]
            acc, kl = 0.0, 0.0
            for t in range(n):
                future = sum(rho[i] for i in range(t + 1, n)) if t + 1 < n else torch.zeros((), dtype=D)
                res = V[b, k, t].detach() + beta * rho[t] + beta * future.detach() - R[b, k]
                acc = acc + res**2
                kl = kl + torch.exp(-rho[t]) + rho[t] - 1
            per.append(acc / n + kl_coef * kl / n)
        out.append(sum(per) / len(per))
    return torch.stack(out)


def grads(loss_fn, leaves):
    leaves = [x.detach().clone().requires_grad_(True) for x in leaves]
    losses = loss_fn(*leaves)
    w = torch.linspace(0.5, 1.5, losses.numel(), dtype=losses.dtype)
    (losses * w).sum().backward()
    return losses.detach(), [x.grad for x in leaves]


def assert_parity(lib, ref, leaves, atol=1e-10):
    l1, g1 = grads(lib, leaves)
    l2, g2 = grads(ref, leaves)
    torch.testing.assert_close(l1, l2, rtol=0, atol=atol)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=atol)


@pytest.mark.parametrize("B", [1, 7])
@pytest.mark.parametrize("alpha", [None, 0.5])
def test_parity_tdpo(B, alpha):
    d = make(B, seed=20 + B)
    mask, rtlp = d["mask"], d["rtlp"]
    name = "tdpo1" if alpha is None else "tdpo2"
    kw = {} if alpha is None else {"alpha": alpha}

    def lib(tlp, tkl):
        p = PolicyStats(torch.where(mask, tlp, 0.0).sum(-1), d["lengths"], token_mask=mask, token_kl=tkl)
        return run(name, p, RefStats(torch.where(mask, rtlp, 0.0).sum(-1)), beta=0.3, **kw).losses

    assert_parity(lib, lambda tlp, tkl: ref_tdpo(tlp, rtlp, tkl, mask, 0.3, alpha), [d["tlp"], d["tkl"]])


@pytest.mark.parametrize("B", [1, 7])
def test_parity_sparsepo(B):
    d = make(B, seed=30 + B)
    mask, rtlp, g = d["mask"], d["rtlp"], d["g"]
    mu0 = torch.rand(B, 2, 6, generator=g, dtype=D) * 1.5
    md0 = torch.rand(B, 2, 6, generator=g, dtype=D) * 1.5

    def lib(tlp, tkl, mu, md):
        p = PolicyStats(
            torch.zeros(B, 2, dtype=D),
            d["lengths"],
            token_logps=tlp,
            token_mask=mask,
            token_kl=tkl,
            inputs={"token_reward_mask": mu, "token_kl_mask": md},
        )
        return run(
            "sparsepo",
            p,
            RefStats(torch.zeros(B, 2, dtype=D), rtlp),
            beta=0.8,
            lambda_reward=0.01,
            lambda_kl=0.02,
            masks="independent",  # two masks, λ as given (a common mask halves them: test_sparsepo.py)
        ).losses

    def ref(tlp, tkl, mu, md):
        return ref_sparsepo(tlp, rtlp, tkl, mu, md, mask, 0.8, 0.01, 0.02)

    assert_parity(lib, ref, [d["tlp"], d["tkl"], mu0, md0])


@pytest.mark.parametrize("B", [1, 7])
def test_parity_tgdpo(B):
    d = make(B, seed=40 + B)
    mask, rtlp = d["mask"], d["rtlp"]
    rm = -torch.rand(B, 2, 6, generator=d["g"], dtype=D) * 3

    def lib(tlp):
        p = PolicyStats(
            torch.zeros(B, 2, dtype=D),
            d["lengths"],
            token_logps=tlp,
            token_mask=mask,
            inputs={"token_rm_logps": rm},
        )
        return run("tgdpo", p, RefStats(torch.zeros(B, 2, dtype=D), rtlp), beta=0.5, alpha=0.7).losses

    assert_parity(lib, lambda tlp: ref_tgdpo(tlp, rtlp, rm, mask, 0.5, 0.7), [d["tlp"]])


@pytest.mark.parametrize("B,K", [(1, 1), (7, 3)])
def test_parity_oreo_ragged(B, K):
    d = make(B, K=K, seed=50 + B)
    mask, rtlp, g = d["mask"], d["rtlp"], d["g"]
    V = torch.randn(B, K, 6, generator=g, dtype=D)
    R = torch.randint(0, 2, (B, K), generator=g).to(D)
    valid = torch.ones(B, K, dtype=torch.bool)
    if K > 1:
        valid[:, -1] = False
        valid[0, 1] = False
    garbage_tlp = torch.where(valid.unsqueeze(-1), d["tlp"], float("nan"))

    def lib(tlp, values):
        p = PolicyStats(
            torch.zeros(B, K, dtype=D),
            d["lengths"],
            valid=valid,
            token_logps=tlp,
            token_mask=mask,
            inputs={"values": values, "terminal_reward": torch.where(valid, R, float("nan"))},
        )
        return run("oreo", p, RefStats(torch.zeros(B, K, dtype=D), rtlp), beta=0.1, kl_coef=0.05,
                   kl="sampled").losses

    def ref(tlp, values):
        return ref_oreo(tlp, rtlp, values, R, mask, valid, 0.1, 0.05)

    l1, (gt1, gv1) = grads(lib, [garbage_tlp, V])
    l2, (gt2, gv2) = grads(ref, [d["tlp"], V])
    torch.testing.assert_close(l1, l2, rtol=0, atol=1e-10)
    torch.testing.assert_close(gt1, gt2, rtol=0, atol=1e-10)  # also: exactly 0 (not NaN) at masked slots
    assert gv1 is None or torch.all(gv1 == 0)  # values enter through a stop-gradient


def finite_or_none(g):
    return g is None or bool(torch.isfinite(g).all())


def test_padding_garbage_is_ignored():
    d = make(4, seed=60)
    pad = ~d["mask"]
    nan_tlp = torch.where(pad, float("nan"), d["tlp"])
    nan_kl = torch.where(pad, float("inf"), d["tkl"])
    ones = torch.ones_like(d["tlp"])
    inputs = {
        "token_reward_mask": torch.where(pad, float("nan"), ones),
        "token_kl_mask": ones,
        "token_rm_logps": nan_tlp,
    }
    for name in ("tdpo1", "tdpo2", "sparsepo", "tgdpo"):
        tlp = nan_tlp.clone().requires_grad_(True)
        kl = nan_kl.clone().requires_grad_(True)
        p = PolicyStats(
            torch.where(d["mask"], tlp, 0.0).sum(-1),
            d["lengths"],
            token_logps=tlp,
            token_mask=d["mask"],
            token_kl=kl,
            inputs=inputs,
        )
        r = RefStats(
            torch.where(d["mask"], d["rtlp"], 0.0).sum(-1), torch.where(pad, float("nan"), d["rtlp"])
        )
        out = run(name, p, r)
        out.losses.sum().backward()
        assert torch.isfinite(out.losses).all(), name
        assert torch.isfinite(tlp.grad).all() and finite_or_none(kl.grad), name
        assert torch.all(tlp.grad[pad] == 0), name


# ----------------------------------------------------------------------------------------------- stability


@pytest.mark.parametrize("name", ["tdpo1", "tdpo2", "sparsepo", "tgdpo", "oreo"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_extreme_log_ratios_float32(name, sign):
    B, T = 3, 4
    mask = torch.ones(B, 2, T, dtype=torch.bool)
    # Per-token log-ratios of −2500 on one response → |Δ| = 1e4 at the sequence level.
    tlp = torch.zeros(B, 2, T)
    tlp[:, 1 if sign > 0 else 0] = -2500.0
    rtlp = torch.zeros(B, 2, T)
    tlp = tlp.clone().requires_grad_(True)
    kl = torch.full((B, 2, T), 1e3).requires_grad_(True)
    ones = torch.ones(B, 2, T)
    inputs = {
        "token_reward_mask": ones,
        "token_kl_mask": ones,
        "token_rm_logps": torch.full((B, 2, T), -5.0),
        "values": torch.full((B, 2, T), 1e3),
        "terminal_reward": torch.ones(B, 2),
        "policy_kl": torch.full((B, 2, T), 1e3),
    }
    p = PolicyStats(
        tlp.sum(-1),
        torch.full((B, 2), float(T)),
        token_logps=tlp,
        token_mask=mask,
        token_kl=kl,
        inputs=inputs,
    )
    r = RefStats(rtlp.sum(-1), rtlp)
    out = run(name, p, r)
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all()
    assert torch.isfinite(tlp.grad).all() and finite_or_none(kl.grad)


def test_missing_token_stats_raise_clear_errors():
    p = PolicyStats(torch.zeros(1, 2), torch.ones(1, 2))
    r = RefStats(torch.zeros(1, 2))
    with pytest.raises(ValueError, match="token_kl"):
        run("tdpo1", p, r)
    with pytest.raises(ValueError, match="per-token"):
        run("tgdpo", p, r)


def test_registry_declarations():
    for n in ("tdpo1", "tdpo2", "sparsepo"):
        assert get(n).reference == "live_logits"
    assert set(get("sparsepo").inputs) == {"token_reward_mask", "token_kl_mask"}
    assert get("tgdpo").inputs == ("token_rm_logps",)
    assert get("oreo").shape == "listwise" and get("oreo").min_responses == 1  # a prompt's trajectories
    assert set(get("oreo").inputs) == {"values", "terminal_reward", "state_mask", "policy_kl"}
    assert get("oreo").reference == "live_logits"  # KL(π_θ‖π_ref) over the vocabulary (tests/losses/test_oreo.py)
    assert lsig(0.0) == pytest.approx(-math.log(2))
