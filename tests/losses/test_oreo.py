"""OREO's policy and value losses (METHODS.md §M7, LOSSES.md D4): the §M7(d) golden values, the stop-gradient
properties of Appendix A (∂L_V/∂θ = 0, ∂L_π/∂φ = 0), float64 parity of every actor variant, KL estimator and the
value loss (loss and gradients) against an explicit loop-by-loop reimplementation, ragged groups, step-level
states, and float32 stability."""

from __future__ import annotations

import math

import pytest
import torch

from preftune.losses import PolicyStats, RefStats, get

D = torch.float64


def run(name, policy, ref, **kw):
    obj = get(name)
    return obj.fn(policy, ref, **obj.resolve(kw))


def canonical(states=None, kl_inputs=None):
    """§M7(d): β = 0.03, ρ = (0.2, −0.1, 0.3), V = (0.4, 0.5, 0.6), R = 1 (reference log-probs 0)."""
    rho = torch.tensor([[[0.2, -0.1, 0.3]]], dtype=D, requires_grad=True)
    V = torch.tensor([[[0.4, 0.5, 0.6]]], dtype=D, requires_grad=True)
    inputs = {"values": V, "terminal_reward": torch.ones(1, 1, dtype=D), **(kl_inputs or {})}
    if states is not None:
        inputs["state_mask"] = torch.tensor([[states]])
    p = PolicyStats(rho.sum(-1), torch.full((1, 1), 3.0, dtype=D), token_logps=rho,
                    token_mask=torch.ones(1, 1, 3, dtype=torch.bool), inputs=inputs)
    return p, RefStats(torch.zeros(1, 1, dtype=D), torch.zeros(1, 1, 3, dtype=D)), rho, V


# ----------------------------------------------------------------------------------------------- golden


def test_golden_value_and_dro_policy_losses_share_their_value():
    p, r, rho, V = canonical()
    value = run("oreo_value", p, r)
    assert float(value.losses.detach()[0]) == pytest.approx(0.247554, abs=1e-5)
    policy = run("oreo", p, r, kl_coef=0.0)
    assert float(policy.losses.detach()[0]) == pytest.approx(0.247554, abs=1e-5)
    policy.losses.sum().backward()
    # ∂L_π/∂ρ = (2/3)·β·e with e = (−0.588, −0.494, −0.391)
    torch.testing.assert_close(rho.grad[0, 0], torch.tensor([-0.01176, -0.00988, -0.00782], dtype=D),
                               rtol=0, atol=1e-5)
    assert V.grad is None  # ∂L_π/∂φ = 0: the policy loss reads V with stop-gradient


def test_golden_variants():
    p, r, _, _ = canonical()
    assert float(run("oreo", p, r, kl_coef=0.0, actor_loss="single_step").losses[0]) == pytest.approx(0.057442,
                                                                                                      abs=1e-5)
    p, r, _, _ = canonical(states=[True, False, True])  # steps {1, 2}, {3}
    assert float(run("oreo", p, r, kl_coef=0.0, step_level=True).losses[0]) == pytest.approx(0.249312, abs=1e-5)
    p, r, _, _ = canonical()
    out = run("oreo", p, r, kl_coef=1.0, kl="sampled")
    assert float(out.metrics["kl"][0]) == pytest.approx(0.021573, abs=1e-5)
    assert float(out.losses[0]) == pytest.approx(0.247554 + 0.021573, abs=1e-5)


# ----------------------------------------------------------------------------------------------- properties


def test_value_loss_trains_the_critic_only():
    p, r, rho, V = canonical()
    run("oreo_value", p, r).losses.sum().backward()
    assert rho.grad is None  # ∂L_V/∂θ = 0: Φ enters with stop-gradient
    # ∂L_V/∂V_t = (2/3)·(V_t + βΦ_t − R) = (2/3)·e
    torch.testing.assert_close(V.grad[0, 0], torch.tensor([-0.588, -0.494, -0.391], dtype=D) * 2 / 3,
                               rtol=0, atol=1e-12)


def test_dro_and_pcl_agree_in_value_and_differ_in_gradient():
    a = canonical()
    b = canonical()
    la = run("oreo", a[0], a[1], kl_coef=0.0, actor_loss="dro").losses
    lb = run("oreo", b[0], b[1], kl_coef=0.0, actor_loss="pcl").losses
    torch.testing.assert_close(la, lb, rtol=0, atol=1e-15)
    la.sum().backward()
    lb.sum().backward()
    # pcl: ∂/∂ρ_i = (2β/3)·Σ_{t≤i} e_t (every earlier state's Φ holds ρ_i); dro: (2β/3)·e_i
    e = torch.tensor([-0.588, -0.494, -0.391], dtype=D)
    torch.testing.assert_close(b[2].grad[0, 0], 2 * 0.03 / 3 * e.cumsum(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(a[2].grad[0, 0], 2 * 0.03 / 3 * e, rtol=0, atol=1e-12)


def test_soft_bellman_fixed_point_zeroes_every_residual():
    # V(s_t) = R − β·Φ_t: the value loss and every actor residual vanish (single_step's too).
    g = torch.Generator().manual_seed(0)
    rho = torch.randn(2, 3, 5, generator=g, dtype=D) * 0.3
    R = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]], dtype=D)
    V = R.unsqueeze(-1) - 0.1 * rho.flip(-1).cumsum(-1).flip(-1)
    p = PolicyStats(rho.sum(-1), torch.full((2, 3), 5.0, dtype=D), token_logps=rho,
                    token_mask=torch.ones(2, 3, 5, dtype=torch.bool), inputs={"values": V, "terminal_reward": R})
    r = RefStats(torch.zeros(2, 3, dtype=D), torch.zeros(2, 3, 5, dtype=D))
    assert run("oreo_value", p, r, beta=0.1).losses.abs().max() < 1e-12
    for actor in ("dro", "pcl", "single_step", "traj"):
        assert run("oreo", p, r, beta=0.1, kl_coef=0.0, actor_loss=actor).losses.abs().max() < 1e-12, actor


def test_reward_scale_and_shift():
    p, r, _, _ = canonical()
    p.inputs["terminal_reward"] = torch.full((1, 1), 0.75, dtype=D)  # R = 2·0.75 − 0.5 = 1: the canonical value
    assert float(run("oreo_value", p, r, rew_mul=2.0, rew_add=-0.5).losses[0]) == pytest.approx(0.247554, abs=1e-5)
    # R = 0: residuals e + 1 = (0.412, 0.506, 0.609)
    p.inputs["terminal_reward"] = torch.zeros(1, 1, dtype=D)
    expected = (0.412**2 + 0.506**2 + 0.609**2) / 3
    assert float(run("oreo_value", p, r).losses[0]) == pytest.approx(expected, abs=1e-12)


def test_kl_estimators_read_their_inputs():
    pkl = torch.tensor([[[0.1, 0.2, 0.6]]], dtype=D)
    fkl = torch.tensor([[[0.3, 0.0, 0.3]]], dtype=D)
    p, r, _, _ = canonical(kl_inputs={"policy_kl": pkl})
    p.token_kl = fkl
    assert float(run("oreo", p, r, kl="full").metrics["kl"][0]) == pytest.approx(0.3)
    assert float(run("oreo", p, r, kl="forward").metrics["kl"][0]) == pytest.approx(0.2)
    p.inputs.pop("policy_kl")
    with pytest.raises(ValueError, match="policy_kl"):
        run("oreo", p, r, kl="full")
    assert float(run("oreo", p, r, kl="full", kl_coef=0.0).losses[0]) == pytest.approx(0.247554, abs=1e-5)


# ----------------------------------------------------------------------------------------------- parity


def explicit(tlp, rtlp, V, R, mask, valid, states, *, beta, kl_coef, kl, actor, pkl, fkl, value=False):
    """Loop-by-loop float64: per trajectory the states, Φ at each, the residual of the variant, its stop-gradients."""
    out = []
    for b in range(tlp.shape[0]):
        per = []
        for k in range(tlp.shape[1]):
            if not valid[b, k]:
                continue
            n = int(mask[b, k].sum())
            rho = [tlp[b, k, t] - rtlp[b, k, t] for t in range(n)]
            S = [t for t in range(n) if states[b, k, t]]

            def phi(t, n=n, rho=rho):
                return sum(rho[t:n], torch.zeros((), dtype=D))

            terms = []
            for j, t in enumerate(S):
                nxt = S[j + 1] if j + 1 < len(S) else None
                phi_next = phi(nxt) if nxt is not None else torch.zeros((), dtype=D)
                v = V[b, k, t]
                if value:
                    terms.append((v + beta * phi(t).detach() - R[b, k]) ** 2)
                    continue
                v = v.detach()
                step = sum(rho[t:nxt if nxt is not None else n], torch.zeros((), dtype=D))  # Φ_t − Φ_next
                if actor == "dro":
                    e = v + beta * (step + phi_next.detach()) - R[b, k]
                elif actor in ("pcl", "traj"):
                    e = v + beta * phi(t) - R[b, k]
                else:
                    v_next = V[b, k, nxt].detach() if nxt is not None else 0.0
                    r_t = R[b, k] if nxt is None else 0.0
                    e = v - r_t - v_next + beta * step
                terms.append(e**2)
                if actor == "traj":
                    break
            loss = terms[0] if actor == "traj" and not value else sum(terms) / len(terms)
            if not value:
                if kl == "sampled":
                    kls = [torch.exp(-rho[t]) + rho[t] - 1 for t in range(n)]
                else:
                    kls = [(pkl if kl == "full" else fkl)[b, k, t] for t in range(n)]
                loss = loss + kl_coef * sum(kls) / n
            per.append(loss)
        out.append(sum(per) / len(per))
    return torch.stack(out)


def grid(B, K, T, seed, step_level):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B, K), generator=g)
    mask = torch.arange(T).view(1, 1, T) < lengths.unsqueeze(-1)
    valid = torch.ones(B, K, dtype=torch.bool)
    if K > 1:
        valid[0, -1] = False
        valid[-1, 0] = False if B > 1 else valid[-1, 0]
    mask = mask & valid.unsqueeze(-1)
    states = mask.clone()
    if step_level:  # a random subset of states, always the first token
        states = mask & (torch.rand(B, K, T, generator=g) < 0.4)
        states[..., 0] = mask[..., 0]
    leaves = dict(
        tlp=-torch.rand(B, K, T, generator=g, dtype=D) * 2,
        V=torch.randn(B, K, T, generator=g, dtype=D),
        pkl=torch.rand(B, K, T, generator=g, dtype=D),
        fkl=torch.rand(B, K, T, generator=g, dtype=D),
    )
    rtlp = -torch.rand(B, K, T, generator=g, dtype=D) * 2
    R = torch.randint(0, 2, (B, K), generator=g).to(D)
    return leaves, rtlp, R, mask, valid, states, lengths


def lib_loss(name, tlp, V, pkl, fkl, rtlp, R, mask, valid, states, lengths, **kw):
    pad = ~mask  # garbage in every masked slot: the losses must not read it
    p = PolicyStats(torch.zeros(R.shape, dtype=D), lengths.to(D), valid=valid,
                    token_logps=torch.where(pad, float("nan"), tlp), token_mask=mask,
                    token_kl=torch.where(pad, float("nan"), fkl),
                    inputs={"values": torch.where(pad, float("nan"), V),
                            "terminal_reward": torch.where(valid, R, float("nan")),
                            "state_mask": states | pad,  # states outside the mask are ignored
                            "policy_kl": torch.where(pad, float("inf"), pkl)})
    return run(name, p, RefStats(torch.zeros(R.shape, dtype=D), torch.where(pad, float("nan"), rtlp)), **kw).losses


@pytest.mark.parametrize("B,K", [(1, 1), (7, 3)])
@pytest.mark.parametrize("step_level", [False, True])
@pytest.mark.parametrize("actor", ["dro", "pcl", "single_step", "traj"])
@pytest.mark.parametrize("kl", ["full", "sampled", "forward"])
def test_parity_policy_loss(B, K, step_level, actor, kl):
    leaves, rtlp, R, mask, valid, states, lengths = grid(B, K, 6, seed=B * 10 + K, step_level=step_level)
    kw = dict(beta=0.2, kl_coef=0.05)
    names = ["tlp", "V", "pkl", "fkl"]

    def lib(tlp, V, pkl, fkl):
        return lib_loss("oreo", tlp, V, pkl, fkl, rtlp, R, mask, valid, states, lengths, **kw, kl=kl,
                        actor_loss=actor, step_level=step_level)

    def ref(tlp, V, pkl, fkl):
        return explicit(tlp, rtlp, V, R, mask, valid, states, **kw, kl=kl, actor=actor, pkl=pkl, fkl=fkl)

    l1, g1 = grads(lib, [leaves[n] for n in names])
    l2, g2 = grads(ref, [leaves[n] for n in names])
    torch.testing.assert_close(l1, l2, rtol=0, atol=1e-10)
    for n, a, b in zip(names, g1, g2, strict=True):
        a = torch.zeros_like(leaves[n]) if a is None else a
        b = torch.zeros_like(leaves[n]) if b is None else b
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=n)
    assert g1[1] is None or torch.all(g1[1] == 0)  # ∂L_π/∂V = 0


@pytest.mark.parametrize("B,K", [(1, 1), (7, 3)])
@pytest.mark.parametrize("step_level", [False, True])
def test_parity_value_loss(B, K, step_level):
    leaves, rtlp, R, mask, valid, states, lengths = grid(B, K, 6, seed=100 + B, step_level=step_level)

    def lib(tlp, V):
        return lib_loss("oreo_value", tlp, V, leaves["pkl"], leaves["fkl"], rtlp, R, mask, valid, states, lengths,
                        beta=0.2, step_level=step_level)

    def ref(tlp, V):
        return explicit(tlp, rtlp, V, R, mask, valid, states, beta=0.2, kl_coef=0.0, kl="sampled", actor="dro",
                        pkl=None, fkl=None, value=True)

    l1, (gt1, gv1) = grads(lib, [leaves["tlp"], leaves["V"]])
    l2, (gt2, gv2) = grads(ref, [leaves["tlp"], leaves["V"]])
    torch.testing.assert_close(l1, l2, rtol=0, atol=1e-10)
    torch.testing.assert_close(gv1, gv2, rtol=0, atol=1e-10)
    assert gt1 is None or torch.all(gt1 == 0)  # ∂L_V/∂θ = 0


def grads(fn, leaves):
    leaves = [x.detach().clone().requires_grad_(True) for x in leaves]
    losses = fn(*leaves)
    w = torch.linspace(0.5, 1.5, losses.numel(), dtype=losses.dtype)
    (losses * w).sum().backward()
    return losses.detach(), [x.grad for x in leaves]


# ----------------------------------------------------------------------------------------------- stability


@pytest.mark.parametrize("name", ["oreo", "oreo_value"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_extreme_log_ratios_float32(name, sign):
    B, K, T = 2, 2, 4
    tlp = torch.full((B, K, T), -2500.0 * sign).requires_grad_(True)
    V = torch.full((B, K, T), 1e3).requires_grad_(True)
    inputs = {"values": V, "terminal_reward": torch.ones(B, K), "policy_kl": torch.full((B, K, T), 1e3)}
    p = PolicyStats(tlp.sum(-1), torch.full((B, K), float(T)), token_logps=tlp,
                    token_mask=torch.ones(B, K, T, dtype=torch.bool), inputs=inputs)
    out = run(name, p, RefStats(torch.zeros(B, K), torch.zeros(B, K, T)), kl="sampled") if name == "oreo" else \
        run(name, p, RefStats(torch.zeros(B, K), torch.zeros(B, K, T)))
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all()
    for g in (tlp.grad, V.grad):
        assert g is None or torch.isfinite(g).all()


def test_registry_entries():
    oreo, value = get("oreo"), get("oreo_value")
    assert oreo.reference == "live_logits" and value.reference == "logps"
    assert oreo.defaults()["beta"] == 0.03 and oreo.defaults()["kl_coef"] == 0.01  # train_oreo.sh
    assert oreo.defaults()["actor_loss"] == "dro" and oreo.defaults()["kl"] == "full"
    assert set(value.hyperparameters) <= set(oreo.hyperparameters)  # the joint step passes oreo's on
    assert math.isclose(value.defaults()["beta"], 0.03)
