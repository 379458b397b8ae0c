"""BRAIn (METHODS.md §M6): golden values of §M6(d), float64 parity of loss and gradients against the formula written
out below with plain loops (ragged lists), the gradient −Σ(α_i − b_i)∇log π_θ(y_i), the reduction to DPO (DPO-sft),
L ≥ H(α) with equality iff b = α (Appendix A), the baseline-free ablation, detached targets, stability.

Reference: α_i = exp(a_i)/Σ_j exp(a_j), a_i = r_i/τ_r + log p_i − log q_i; s_i = β_π(log π_i − log q_i);
L = −Σ_i α_i (s_i − log Σ_j exp s_j) over the valid samples of each prompt.
"""

from __future__ import annotations

import math

import pytest
import torch

from preftune.losses import PolicyStats, RefStats, get

D = torch.float64
R = [1.0, 0.2, -0.5, 0.7]


def run(policy, **overrides):
    obj = get("brain")
    return obj.fn(policy, None, **obj.resolve(overrides))


def stats(log_pi, log_q, log_p=None, scores=R, valid=None):
    t = lambda x: torch.tensor([x], dtype=D)  # noqa: E731
    v = None if valid is None else torch.tensor([valid])
    p = PolicyStats(t(log_pi), torch.ones(1, len(log_pi), dtype=D), valid=v)
    p.inputs = {"scores": t(scores), "proposal_logps": t(log_q), "prior_logps": t(log_q if log_p is None else log_p)}
    return p


def test_golden_first_case_weights_and_gradient():
    # §M6(d): K = 4, q = p, τ_r = 1, log π − log q = (0.3, −0.1, 0.2, 0.0).
    lq = [-10.0, -12.0, -9.0, -11.0]
    log_pi = torch.tensor([[a + b for a, b in zip(lq, [0.3, -0.1, 0.2, 0.0])]], dtype=D, requires_grad=True)
    p = stats(log_pi.tolist()[0], lq)
    p.logps = log_pi
    out = run(p)
    assert float(out.losses[0]) == pytest.approx(1.374567, abs=1e-5)
    (grad,) = torch.autograd.grad(out.losses.sum(), log_pi)
    torch.testing.assert_close(grad[0], torch.tensor([-0.112804, 0.015958, 0.180413, -0.083567], dtype=D),
                               atol=1e-6, rtol=0)  # b − α
    alpha = torch.tensor([0.414374, 0.186190, 0.092459, 0.306976], dtype=D)
    assert float(out.metrics["effective_sample_size"][0]) == pytest.approx(float(1 / (alpha**2).sum()), abs=1e-5)
    assert float(out.chosen_rewards[0]) == pytest.approx(0.3)  # s of the highest-target sample
    assert float(out.rejected_rewards[0]) == pytest.approx(0.2)  # s of the lowest


def test_golden_second_case_and_dpo_sft():
    p = stats([-9.8, -11.5, -9.2, -11.1], [-10.0, -12.0, -9.0, -11.0], [-10.5, -11.0, -9.5, -11.0])
    assert float(run(p, tau_r=0.5).losses[0]) == pytest.approx(1.331649, abs=1e-5)
    # DPO-sft: K = 2, argmax target, ratios (0.3, −0.1)
    p = stats([-9.7, -12.1], [-10.0, -12.0], scores=[1.0, 0.0])
    assert float(run(p, target="argmax").losses[0]) == pytest.approx(0.513015, abs=1e-5)


def _reference(log_pi, log_q, log_p, r, valid, tau, beta, baseline="self_normalised", argmax=False):
    out = []
    for b in range(log_pi.shape[0]):
        idx = [k for k in range(log_pi.shape[1]) if valid[b, k]]
        a = [float(r[b, k]) / tau + float(log_p[b, k]) - float(log_q[b, k]) for k in idx]
        if argmax:
            alpha = [1.0 if j == a.index(max(a)) else 0.0 for j in range(len(a))]
        else:
            z = sum(math.exp(x - max(a)) for x in a)
            alpha = [math.exp(x - max(a)) / z for x in a]
        s = [beta * (log_pi[b, k] - float(log_q[b, k])) for k in idx]
        if baseline == "none":
            out.append(-sum(al * si for al, si in zip(alpha, s)))
            continue
        lse = torch.logsumexp(torch.stack(s), 0)
        out.append(-sum(al * (si - lse) for al, si in zip(alpha, s)))
    return torch.stack(out)


@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("variant", ["soft", "argmax", "none"])
def test_parity_loss_and_gradients_ragged(batch, variant):
    g = torch.Generator().manual_seed(batch + len(variant))
    K = 5
    log_q = -torch.rand(batch, K, generator=g, dtype=D) * 30 - 1
    log_p = log_q + torch.randn(batch, K, generator=g, dtype=D)
    log_pi = (log_q + torch.randn(batch, K, generator=g, dtype=D)).requires_grad_(True)
    r = torch.randn(batch, K, generator=g, dtype=D)
    valid = torch.rand(batch, K, generator=g) > 0.3
    valid[:, :2] = True
    # invalid slots hold garbage: they must change neither loss nor gradient
    garbage = torch.where(valid, torch.zeros_like(log_q), torch.full_like(log_q, float("nan")))
    p = PolicyStats(log_pi + garbage.nan_to_num(1e30), torch.ones(batch, K, dtype=D), valid=valid,
                    inputs={"scores": r + garbage, "proposal_logps": log_q + garbage, "prior_logps": log_p})
    kw = dict(tau_r=0.7, beta_pi=0.5, target="argmax" if variant == "argmax" else "soft",
              baseline="none" if variant == "none" else "self_normalised")
    got = run(p, **kw).losses
    log_pi2 = log_pi.detach().clone().requires_grad_(True)
    want = _reference(log_pi2, log_q, log_p, r, valid, 0.7, 0.5, kw["baseline"], variant == "argmax")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    (ga,) = torch.autograd.grad(got.sum(), log_pi)
    (gb,) = torch.autograd.grad(want.sum(), log_pi2)
    torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-12)
    assert (ga[~valid] == 0).all()


def test_dpo_sft_is_dpo_with_beta_pi():
    g = torch.Generator().manual_seed(1)
    log_pi = -torch.rand(6, 2, generator=g, dtype=D) * 20
    ref = -torch.rand(6, 2, generator=g, dtype=D) * 20
    p = PolicyStats(log_pi, torch.ones(6, 2, dtype=D),
                    inputs={"scores": torch.tensor([[1.0, 0.0]] * 6, dtype=D), "proposal_logps": ref,
                            "prior_logps": ref})
    dpo = get("dpo").fn(PolicyStats(log_pi, torch.ones(6, 2, dtype=D)), RefStats(ref), beta=0.1).losses
    torch.testing.assert_close(run(p, target="argmax", beta_pi=0.1).losses, dpo)


def test_loss_is_at_least_the_target_entropy_with_equality_at_b_equal_alpha():
    lq, lp = [-10.0, -12.0, -9.0, -11.0], [-10.5, -11.0, -9.5, -11.0]
    a = torch.tensor([x / 0.5 + y - z for x, y, z in zip(R, lp, lq)], dtype=D)
    alpha = torch.softmax(a, 0)
    entropy = float(-(alpha * alpha.log()).sum())
    for shift in ([0.3, -0.1, 0.2, 0.0], [2.0, -3.0, 0.5, 1.0]):
        p = stats([x + s for x, s in zip(lq, shift)], lq, lp)
        assert float(run(p, tau_r=0.5).losses[0]) > entropy
    # π_θ = q·exp(a) (up to a constant) makes b = α: the minimum, H(α)
    p = stats([x + float(ai) + 3.0 for x, ai in zip(lq, a)], lq, lp)
    out = run(p, tau_r=0.5)
    assert float(out.losses[0]) == pytest.approx(entropy, abs=1e-12)
    assert float(out.metrics["target_entropy"][0]) == pytest.approx(entropy, abs=1e-12)


def test_targets_carry_no_gradient_and_prior_inputs_are_required():
    r = torch.tensor([R], dtype=D, requires_grad=True)
    lq = torch.tensor([[-10.0, -12.0, -9.0, -11.0]], dtype=D, requires_grad=True)
    p = PolicyStats(lq.detach() + 0.1, torch.ones(1, 4, dtype=D),
                    inputs={"scores": r, "proposal_logps": lq, "prior_logps": lq})
    p.logps.requires_grad_(True)
    out = run(p)
    grads = torch.autograd.grad(out.losses.sum(), (r, lq, p.logps), allow_unused=True)
    assert grads[0] is None and grads[1] is None and grads[2] is not None
    del p.inputs["prior_logps"]
    with pytest.raises(ValueError, match=r"needs inputs\['prior_logps'\]"):
        run(p)


def test_stability_float32():
    p = PolicyStats(torch.tensor([[-1e4, -1.0, -5e3]], requires_grad=True), torch.ones(1, 3),
                    inputs={"scores": torch.tensor([[1e3, -1e3, 0.0]]),
                            "proposal_logps": torch.tensor([[-1.0, -1e4, -2.0]]),
                            "prior_logps": torch.tensor([[-1e4, -1.0, -2.0]])})
    out = run(p)
    assert torch.isfinite(out.losses).all()
    out.losses.sum().backward()
    assert torch.isfinite(p.logps.grad).all()
