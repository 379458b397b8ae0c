"""Part G reward-model objectives: golden values (Appendix A), GPM skew-symmetry, parity of the plain
functions and the registered rm_* wrappers with independent float64 formulas (loss and gradients),
TRL RewardTrainer parity, and float32 stability at extreme reward gaps.
"""

from __future__ import annotations

import pytest
import torch

from preftune.losses import PolicyStats, get, names
from preftune.losses.reward import (
    bt_reward_loss,
    gpm_loss,
    gpm_score,
    lsc_transform,
    regression_loss,
    scaled_bt_loss,
)

D = torch.float64
RC, RR = torch.tensor(1.2, dtype=D), torch.tensor(0.4, dtype=D)


def run(name, policy, **overrides):
    obj = get(name)
    return obj.fn(policy, None, **obj.resolve(overrides))


def test_golden_plain_functions():
    assert float(bt_reward_loss(RC, RR)) == pytest.approx(0.371101, abs=1e-5)
    assert float(bt_reward_loss(RC, RR, margin=0.5)) == pytest.approx(0.554355, abs=1e-5)
    assert float(scaled_bt_loss(RC, RR, torch.tensor(-2.0, dtype=D))) == pytest.approx(0.742201, abs=1e-5)
    assert float(lsc_transform(RC, RR)) == pytest.approx(-0.371101, abs=1e-5)
    vw, vl = torch.tensor([0.8, -0.6], dtype=D), torch.tensor([0.6, 0.8], dtype=D)
    assert float(gpm_score(vw, vl)) == pytest.approx(1.0, abs=1e-9)
    assert float(gpm_loss(vw, vl, tau=1.0)) == pytest.approx(0.313262, abs=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_golden_registered(dtype):
    r = torch.tensor([[1.2, 0.4]], dtype=dtype)
    one = torch.ones(1, 2, dtype=dtype)
    assert float(run("rm_bt", PolicyStats(r, one)).losses[0]) == pytest.approx(0.371101, abs=1e-5)
    m = PolicyStats(r, one, inputs={"margin": torch.tensor([0.5], dtype=dtype)})
    assert float(run("rm_bt_margin", m).losses[0]) == pytest.approx(0.554355, abs=1e-5)
    s = PolicyStats(r, one, inputs={"preference_strength": torch.tensor([2.0], dtype=dtype)})
    assert float(run("rm_bt_scaled", s).losses[0]) == pytest.approx(0.742201, abs=1e-5)
    v = torch.tensor([[[0.8, -0.6], [0.6, 0.8]]], dtype=dtype)
    g = PolicyStats(torch.zeros(1, 2, dtype=dtype), one, inputs={"gpm_embeddings": v})
    out = run("rm_gpm", g, tau=1.0)
    assert float(out.losses[0]) == pytest.approx(0.313262, abs=1e-5)
    assert float(out.metrics["preference_score"][0]) == pytest.approx(1.0, abs=1e-6)


def test_gpm_skew_symmetry_multi_block_and_eigenvalues():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 6, generator=g, dtype=D), torch.randn(7, 6, generator=g, dtype=D)
    lam = torch.rand(7, 3, generator=g, dtype=D)
    for ev in (None, lam):
        torch.testing.assert_close(gpm_score(a, b, ev), -gpm_score(b, a, ev))
        torch.testing.assert_close(gpm_score(a, a, ev), torch.zeros(7, dtype=D))
    # Block form against the explicit matrix ⟨R·v_i, v_j⟩.
    R = torch.zeros(7, 6, 6, dtype=D)
    for blk in range(3):
        R[:, 2 * blk + 1, 2 * blk] = lam[:, blk]
        R[:, 2 * blk, 2 * blk + 1] = -lam[:, blk]
    explicit = torch.einsum("bij,bj,bi->b", R, a, b)
    torch.testing.assert_close(gpm_score(a, b, lam), explicit)
    with pytest.raises(ValueError):
        gpm_score(torch.zeros(3), torch.zeros(3))


@pytest.mark.parametrize("B", [1, 7])
def test_parity_bt_family_with_gradients(B):
    g = torch.Generator().manual_seed(B)
    r = torch.randn(B, 2, generator=g, dtype=D) * 3
    m = torch.rand(B, generator=g, dtype=D)
    st = torch.randint(-3, 4, (B,), generator=g).to(D)
    one = torch.ones(B, 2, dtype=D)
    cases = [
        ("rm_bt", {}, {"center_rewards_coefficient": 0.01}, lambda x: math_bt(x, 0.0, 0.01)),
        ("rm_bt_margin", {"margin": m}, {}, lambda x: math_bt(x, m, 0.0)),
        (
            "rm_bt_scaled",
            {"preference_strength": st},
            {},
            lambda x: st.abs() * torch.log1p(torch.exp(-(x[:, 0] - x[:, 1]))),
        ),
    ]
    for name, inputs, kw, formula in cases:
        x1 = r.clone().requires_grad_(True)
        out = run(name, PolicyStats(x1, one, inputs=inputs), **kw)
        out.losses.sum().backward()
        x2 = r.clone().requires_grad_(True)
        exp = formula(x2)
        exp.sum().backward()
        torch.testing.assert_close(out.losses, exp.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-12, atol=1e-12)


def math_bt(x, m, c):
    z = x[:, 0] - x[:, 1] - m
    return torch.log1p(torch.exp(-z)) + c * (x[:, 0] + x[:, 1]) ** 2


def test_bt_matches_trl_reward_trainer_batch_loss():
    pytest.importorskip("trl")
    import inspect

    from trl.trainer import reward_trainer

    src = inspect.getsource(reward_trainer.RewardTrainer.compute_loss)
    assert 'logsigmoid(rewards_chosen - rewards_rejected - inputs["margin"]).mean()' in src
    assert "torch.mean((rewards_chosen + rewards_rejected) ** 2)" in src
    g = torch.Generator().manual_seed(3)
    rc, rr, m = (torch.randn(9, generator=g, dtype=D) for _ in range(3))
    trl_loss = -torch.nn.functional.logsigmoid(rc - rr - m).mean() + 0.01 * torch.mean((rc + rr) ** 2)
    torch.testing.assert_close(bt_reward_loss(rc, rr, m, 0.01).mean(), trl_loss)


@pytest.mark.parametrize("B,K", [(1, 1), (7, 3)])
def test_parity_regression_ragged(B, K):
    g = torch.Generator().manual_seed(B + K)
    pred = torch.randn(B, K, generator=g, dtype=D)
    tgt = torch.rand(B, K, generator=g, dtype=D) * 4
    valid = torch.rand(B, K, generator=g) > 0.3
    valid[:, 0] = True
    x1 = torch.where(valid, pred, float("nan")).requires_grad_(True)
    out = run(
        "rm_regression",
        PolicyStats(
            x1,
            torch.ones(B, K, dtype=D),
            valid=valid,
            inputs={"targets": torch.where(valid, tgt, float("nan"))},
        ),
    )
    out.losses.sum().backward()
    x2 = pred.clone().requires_grad_(True)
    exp = torch.stack(
        [
            sum((x2[b, a] - tgt[b, a]) ** 2 for a in range(K) if valid[b, a]) / int(valid[b].sum())
            for b in range(B)
        ]
    )
    exp.sum().backward()
    torch.testing.assert_close(out.losses, exp.detach())
    torch.testing.assert_close(x1.grad, torch.where(valid, x2.grad, 0.0))
    torch.testing.assert_close(regression_loss(pred[:, 0], tgt[:, 0]), (pred[:, 0] - tgt[:, 0]) ** 2)


@pytest.mark.parametrize("normalize", [True, False])
def test_parity_gpm_with_gradients(normalize):
    g = torch.Generator().manual_seed(11)
    v = torch.randn(7, 2, 4, generator=g, dtype=D)
    m = torch.rand(7, generator=g, dtype=D)
    x1 = v.clone().requires_grad_(True)
    out = run(
        "rm_gpm",
        PolicyStats(
            torch.zeros(7, 2, dtype=D), torch.ones(7, 2, dtype=D), inputs={"gpm_embeddings": x1, "margin": m}
        ),
        tau=0.1,
        normalize=normalize,
    )
    out.losses.sum().backward()
    x2 = v.clone().requires_grad_(True)
    a, b = x2[:, 0], x2[:, 1]
    if normalize:
        a, b = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
    s = (a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]) + (a[:, 2] * b[:, 3] - a[:, 3] * b[:, 2])
    exp = torch.log1p(torch.exp(-(s - m) / 0.1))
    exp.sum().backward()
    torch.testing.assert_close(out.losses, exp.detach())
    torch.testing.assert_close(x1.grad, x2.grad)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_extreme_reward_gaps_float32(sign):
    r = torch.tensor([[sign * 5e3, -sign * 5e3]] * 3, requires_grad=True)
    one = torch.ones(3, 2)
    inputs = {"margin": torch.zeros(3), "preference_strength": torch.full((3,), 3.0)}
    for name in ("rm_bt", "rm_bt_margin", "rm_bt_scaled"):
        out = run(name, PolicyStats(r, one, inputs=inputs))
        (g,) = torch.autograd.grad(out.losses.sum(), r)
        assert torch.isfinite(out.losses).all() and torch.isfinite(g).all(), name
    v = torch.tensor([[[1e4, 0.0], [0.0, -sign * 1e4]]] * 3, requires_grad=True)
    out = run("rm_gpm", PolicyStats(torch.zeros(3, 2), one, inputs={"gpm_embeddings": v}), normalize=False)
    (g,) = torch.autograd.grad(out.losses.sum(), v)
    assert torch.isfinite(out.losses).all() and torch.isfinite(g).all()
    assert torch.isfinite(lsc_transform(torch.tensor(-1e4), torch.tensor(1e4)))


def test_registry_declarations():
    assert names(trains="reward_model") == ["rm_bt", "rm_bt_margin", "rm_bt_scaled", "rm_gpm", "rm_regression"]
    for n in names(trains="reward_model"):
        o = get(n)
        assert o.reference == "none" and "[reward-model objective]" in o.notes
    assert get("rm_bt_margin").required_columns == ("margin",)
    assert get("rm_bt_scaled").required_columns == ("preference_strength",)
    assert get("rm_regression").shape == "unpaired" and get("rm_regression").min_responses == 1
    assert get("rm_gpm").inputs == ("gpm_embeddings",)
