"""Part A objectives (and the already-implemented SimPO/ORPO of part B): golden values (LOSSES.md
Appendix A), property tests, parity with independent float64 formulas (loss and gradients w.r.t. the
policy log-probs) and stability at extreme log-ratios.

The reference formulas below are written from LOSSES.md with plain torch float64 arithmetic; they do
not call preftune's helpers.
"""

from __future__ import annotations

import math

import pytest
import torch

from preftune.losses import PolicyStats, RefStats, get
from preftune.losses.pairwise import BetaDPOState, RunningMean, madpo_weight

D = torch.float64

# Canonical pair of Appendix A.
LW, LL, RW, RL, NW, NL = -10.0, -12.0, -11.0, -11.5, 5.0, 8.0


def canonical(dtype=D):
    p = PolicyStats(torch.tensor([[LW, LL]], dtype=dtype), torch.tensor([[NW, NL]], dtype=dtype))
    r = RefStats(torch.tensor([[RW, RL]], dtype=dtype))
    return p, r


def run(name, policy, ref, state=None, **overrides):
    obj = get(name)
    extra = {} if state is None else {"state": state}  # state objects are not hyperparameters
    return obj.fn(policy, ref, **obj.resolve(overrides), **extra)


GOLDEN = [
    ("dpo", {}, 0.620957),
    ("cdpo", {"label_smoothing": 0.1}, 0.635957),
    ("rdpo", {"label_smoothing": 0.1}, 0.602207),
    ("ipo", {"beta": 0.1}, 22.443906),
    ("ipo_sum", {"beta": 0.1}, 12.250000),
    ("hinge", {"beta": 0.1}, 0.850000),
    ("nca_pair", {}, 1.350825),
    ("bco_pair", {}, 1.312856),
    ("apo_zero", {}, 0.962523),
    ("apo_down", {}, 0.987549),
    ("exo_pair", {"label_smoothing": 1e-3}, 2.505517),
    ("fdpo_forward_kl", {}, 0.631154),
    ("fdpo_js", {}, 0.660652),
    ("fdpo_alpha", {"alpha": 0.5}, 0.627691),
    ("simpo", {"beta": 2.0, "gamma_beta_ratio": 0.5}, 2.126928),
    ("orpo", {"beta": 0.1}, 2.104206),
    ("dpo_nll", {"alpha": 1.0}, 2.620957),
]


@pytest.mark.parametrize("name,kw,expected", GOLDEN, ids=[g[0] for g in GOLDEN])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_golden(name, kw, expected, dtype):
    p, r = canonical(dtype)
    out = run(name, p, r, **kw)
    assert out.losses.shape == (1,)
    assert float(out.losses[0]) == pytest.approx(expected, abs=1e-5)


def test_golden_orpo_odds_ratio_term():
    p, r = canonical()
    assert float(run("orpo", p, r).metrics["or_loss"][0]) == pytest.approx(1.042058, abs=1e-5)


def test_golden_bco_pair_with_fresh_state_shifts_by_batch_mean():
    # A fresh state after one batch holds the mean of that batch's rewards (0.1·1.0 and 0.1·(−0.5)).
    p, r = canonical()
    st = RunningMean()
    out = run("bco_pair", p, r, state=st)
    delta = (0.1 + -0.05) / 2
    expected = -math.log(1 / (1 + math.exp(-(0.1 - delta)))) - math.log(1 / (1 + math.exp(-(0.05 + delta))))
    assert st.mean == pytest.approx(delta)
    assert float(out.losses[0]) == pytest.approx(expected, abs=1e-9)


# ----------------------------------------------------------------------------------------------
# Properties (Appendix A list + the reductions each objective promises)
# ----------------------------------------------------------------------------------------------


def pair(delta_w, delta_l=0.0, dtype=D, lengths=(5.0, 8.0), requires_grad=False):
    lp = torch.tensor([[-10.0 + delta_w, -12.0 + delta_l]], dtype=dtype, requires_grad=requires_grad)
    return PolicyStats(lp, torch.tensor([lengths], dtype=dtype)), RefStats(
        torch.tensor([[-10.0, -12.0]], dtype=dtype)
    )


def test_dpo_properties():
    beta = 0.1
    p, r = pair(0.0)
    assert float(run("dpo", p, r).losses) == pytest.approx(math.log(2), abs=1e-12)
    for d in (-7.0, -0.3, 0.0, 2.5, 40.0):
        p, r = pair(d, requires_grad=True)
        loss = run("dpo", p, r, beta=beta).losses.sum()
        loss.backward()
        # ∂L/∂Δ = −β σ(−βΔ); Δ moves one-for-one with ℓ_θ(y_w)
        assert float(p.logps.grad[0, 0]) == pytest.approx(-beta / (1 + math.exp(beta * d)), abs=1e-12)
        pn, rn = pair(-d)
        diff = float(run("dpo", *pair(d), beta=beta).losses) - float(run("dpo", pn, rn, beta=beta).losses)
        assert diff == pytest.approx(-beta * d, abs=1e-10)


def rand_pairs(B, seed, dtype=D):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 30, (B, 2), generator=g).to(dtype)
    lp = -lengths * (0.2 + 2.5 * torch.rand(B, 2, generator=g, dtype=dtype))
    rf = lp + 3.0 * torch.randn(B, 2, generator=g, dtype=dtype)
    return PolicyStats(lp, lengths), RefStats(rf)


@pytest.mark.parametrize(
    "name,kw",
    [
        ("cdpo", {"label_smoothing": 0.0}),
        ("rdpo", {"label_smoothing": 0.0}),
        ("fdpo_alpha", {"alpha": 0.0}),
        ("ld_dpo", {"alpha": 1.0}),
        ("rpo_liu2024", {"eta": 0.0}),
        ("adpo", {"tau": 10.0}),
        ("beta_dpo", {}),  # state=None ⇒ plain DPO with β0
    ],
)
def test_reductions_to_dpo(name, kw):
    p, r = rand_pairs(7, 0)
    if name == "ld_dpo":
        p, r = with_tokens(p, r, seed=1)
    expected = run("dpo", p, r, beta=0.1).losses
    torch.testing.assert_close(run(name, p, r, **kw).losses, expected, rtol=1e-12, atol=1e-12)


def test_reweighted_objectives_reduce_to_dpo_at_unit_weight():
    p, r = rand_pairs(7, 3)
    dpo = run("dpo", p, r).losses
    p.inputs["semantic_distance"] = torch.zeros(7, dtype=D)
    torch.testing.assert_close(run("sem_dpo", p, r).losses, dpo)
    # MADPO with w_max = w_min = 1 is DPO whatever the margin.
    p.inputs["rm_margin"] = torch.randn(7, dtype=D) * 3
    torch.testing.assert_close(run("madpo", p, r, w_max=1.0, w_min=1.0).losses, dpo)


def test_fdpo_alpha_limits():
    p, r = rand_pairs(7, 4)
    dpo = run("dpo", p, r).losses
    torch.testing.assert_close(run("fdpo_alpha", p, r, alpha=1e-5).losses, dpo, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(run("fdpo_alpha", p, r, alpha=1.0).losses, run("fdpo_forward_kl", p, r).losses)


def test_exo_small_eps_limit_and_eps_zero_rejected():
    p, r = rand_pairs(7, 5)
    eps = 1e-9
    z = 0.1 * ((p.logps[:, 0] - r.logps[:, 0]) - (p.logps[:, 1] - r.logps[:, 1]))
    s, sm = torch.sigmoid(z), torch.sigmoid(-z)
    limit = s * torch.log(s) + sm * (torch.log(sm) - math.log(eps))
    torch.testing.assert_close(run("exo_pair", p, r, label_smoothing=eps).losses, limit, rtol=1e-7, atol=1e-7)
    with pytest.raises(ValueError, match=r"exo_pair.*label_smoothing.*\(0, 0\.5\)"):
        get("exo_pair").resolve({"label_smoothing": 0.0})


def test_simpo_gamma0_unit_lengths_is_reference_free_dpo():
    p, r = rand_pairs(7, 6)
    p1 = PolicyStats(p.logps, torch.ones_like(p.lengths))
    zero_ref = RefStats(torch.zeros_like(p.logps))
    torch.testing.assert_close(
        run("simpo", p1, None, beta=0.3, gamma_beta_ratio=0.0).losses,
        run("dpo", p1, zero_ref, beta=0.3).losses,
    )


def test_adpo_soft_label():
    p, r = rand_pairs(7, 7)
    # q = 0.5 makes the loss symmetric in the pair order and minimal at a1 = a2.
    p.inputs["soft_label"] = torch.full((7,), 0.5, dtype=D)
    swapped = PolicyStats(p.logps.flip(1), p.lengths.flip(1), inputs=dict(p.inputs))
    torch.testing.assert_close(
        run("adpo", p, r).losses, run("adpo", swapped, RefStats(r.logps.flip(1))).losses
    )
    # q ∈ (0, 1) is cDPO with ε = 1 − q.
    p.inputs["soft_label"] = torch.full((7,), 0.9, dtype=D)
    torch.testing.assert_close(
        run("adpo", p, r, tau=10.0).losses, run("cdpo", p, r, label_smoothing=0.1).losses
    )


def test_madpo_weight_shape():
    h = torch.linspace(-20, 20, 4001, dtype=D)
    w = madpo_weight(h, 2.0, 0.5, 1.0)
    pos = w[h >= 0]
    assert (pos[1:] <= pos[:-1]).all(), "w must be monotone non-increasing for ĥ ≥ 0"
    assert (w[h < 0] <= 2.0).all() and (w >= 0.5).all(), "w must be bounded (capped for ĥ < 0)"
    assert float(madpo_weight(torch.tensor([-1e-9], dtype=D), 2.0, 0.5, 1.0)) == pytest.approx(
        float(madpo_weight(torch.tensor([0.0], dtype=D), 2.0, 0.5, 1.0)), abs=1e-8
    ), "w must be continuous at 0"
    assert float(w[h >= 0][0]) > 1.0 and float(w[-1]) < 1.0  # amplifies hard, damps easy pairs
    # weights are detached: the gradient is w·∂DPO, nothing flows into the RM margin
    p, r = rand_pairs(3, 8)
    p = PolicyStats(p.logps.clone().requires_grad_(True), p.lengths)
    p.inputs["rm_margin"] = torch.tensor([-1.0, 0.5, 5.0], dtype=D, requires_grad=True)
    run("madpo", p, r).losses.sum().backward()
    assert p.inputs["rm_margin"].grad is None


def test_bco_pair_running_mean_state():
    st = RunningMean()
    p1, r1 = rand_pairs(4, 9)
    p2, r2 = rand_pairs(6, 10)
    run("bco_pair", p1, r1, state=st)
    out2 = run("bco_pair", p2, r2, state=st)
    all_rewards = torch.cat(
        [0.1 * (p1.logps - r1.logps).reshape(-1), 0.1 * (p2.logps - r2.logps).reshape(-1)]
    )
    assert st.mean == pytest.approx(float(all_rewards.mean()), abs=1e-12)  # cumulative, count-weighted
    assert st.count == 20
    assert float(out2.metrics["delta"]) == pytest.approx(st.mean)
    # resume: a restored state gives the same δ and losses as the uninterrupted one
    st2 = RunningMean()
    st2.load_state_dict(st.state_dict())
    p3, r3 = rand_pairs(5, 11)
    torch.testing.assert_close(
        run("bco_pair", p3, r3, state=st).losses, run("bco_pair", p3, r3, state=st2).losses
    )
    # evaluation mode reads δ without updating it
    st.training = False
    before = st.state_dict()
    run("bco_pair", p3, r3, state=st)
    assert st.state_dict() == before


def test_beta_dpo_state_filtering_and_resume():
    p, r = rand_pairs(10, 12)
    st = BetaDPOState(seed=123)
    out = run("beta_dpo", p, r, state=st, filter_ratio=0.2)
    kept = out.metrics["kept"]
    assert int(kept.sum()) == 8
    # dropped pairs contribute nothing, kept ones are scaled so that mean over B = mean over kept
    assert (out.losses[kept == 0] == 0).all()
    beta_b = float(out.metrics["beta_batch"])
    delta = (p.logps[:, 0] - r.logps[:, 0]) - (p.logps[:, 1] - r.logps[:, 1])
    dpo_b = -torch.log(torch.sigmoid(beta_b * delta))
    assert float(out.losses.mean()) == pytest.approx(float(dpo_b[kept.bool()].mean()), rel=1e-10)
    # the EMA was updated before use (first step: M0 = 0.1·mean, σ = 0.1·std)
    assert st.m0 == pytest.approx(0.1 * float(delta.mean()))
    assert st.sigma == pytest.approx(0.1 * float(delta.std()))
    # same seed ⇒ same draws; restored state ⇒ same continuation
    st_a, st_b = BetaDPOState(seed=5), BetaDPOState(seed=5)
    a1 = run("beta_dpo", p, r, state=st_a).losses
    b1 = run("beta_dpo", p, r, state=st_b).losses
    torch.testing.assert_close(a1, b1)
    st_c = BetaDPOState(seed=999)
    st_c.load_state_dict(st_a.state_dict())
    p2, r2 = rand_pairs(10, 13)
    torch.testing.assert_close(
        run("beta_dpo", p2, r2, state=st_a).losses, run("beta_dpo", p2, r2, state=st_c).losses
    )


def test_beta_dpo_no_filter_no_adaptation_is_dpo_and_b1_is_safe():
    p, r = rand_pairs(7, 14)
    out = run("beta_dpo", p, r, state=BetaDPOState(), a=0.0, filter_ratio=0.0)
    torch.testing.assert_close(out.losses, run("dpo", p, r).losses)
    p1, r1 = rand_pairs(1, 15)  # B = 1: std undefined, σ = 0 ⇒ uniform sampling, no NaN
    out = run("beta_dpo", p1, r1, state=BetaDPOState())
    assert torch.isfinite(out.losses).all()


@pytest.mark.parametrize(
    "name,bad",
    [
        ("dpo", {"beta": -1.0}),
        ("dpo", {"beta": 0.0}),
        ("cdpo", {"label_smoothing": 0.5}),
        ("exo_pair", {"label_smoothing": 0.7}),
        ("fdpo_alpha", {"alpha": 1.5}),
        ("ld_dpo", {"alpha": -0.1}),
        ("beta_dpo", {"filter_ratio": 1.0}),
        ("madpo", {"w_max": 0.5}),
        ("adpo", {"tau": 0.0}),
        ("rpo_liu2024", {"sft_normalisation": "token"}),
        ("nca_pair", {"gamma": 1.0}),
    ],
)
def test_bad_hyperparameters_name_objective_and_range(name, bad):
    with pytest.raises(ValueError, match=name):
        get(name).resolve(bad)


# ----------------------------------------------------------------------------------------------
# Parity with independent float64 formulas (loss and gradient w.r.t. the policy log-probs)
# ----------------------------------------------------------------------------------------------


def lsig(z):
    return -torch.log1p(torch.exp(-z))  # naive, fine in float64 at the magnitudes used here


def sig(z):
    return 1.0 / (1.0 + torch.exp(-z))


def ref_logratios(lp, rf):
    return lp[:, 0] - rf[:, 0], lp[:, 1] - rf[:, 1]


def R_dpo(lp, n, rf, inputs, beta=0.1):
    w, l = ref_logratios(lp, rf)
    return -lsig(beta * (w - l))


def R_cdpo(lp, n, rf, inputs, beta=0.1, label_smoothing=0.1):
    w, l = ref_logratios(lp, rf)
    z = beta * (w - l)
    return -(1 - label_smoothing) * lsig(z) - label_smoothing * lsig(-z)


def R_rdpo(lp, n, rf, inputs, beta=0.1, label_smoothing=0.1):
    w, l = ref_logratios(lp, rf)
    z, e = beta * (w - l), label_smoothing
    return ((1 - e) * -lsig(z) - e * -lsig(-z)) / (1 - 2 * e)


def R_ipo(lp, n, rf, inputs, beta=0.1):
    w, l = ref_logratios(lp, rf)
    return (w / n[:, 0] - l / n[:, 1] - 1 / (2 * beta)) ** 2


def R_ipo_sum(lp, n, rf, inputs, beta=0.1):
    w, l = ref_logratios(lp, rf)
    return (w - l - 1 / (2 * beta)) ** 2


def R_hinge(lp, n, rf, inputs, beta=0.1):
    w, l = ref_logratios(lp, rf)
    return torch.clamp(1 - beta * (w - l), min=0)


def R_dpo_nll(lp, n, rf, inputs, beta=0.1, alpha=1.0):
    return R_dpo(lp, n, rf, inputs, beta) + alpha * (-lp[:, 0] / n[:, 0])


def R_rpo_liu2024(lp, n, rf, inputs, beta=0.1, eta=1.0, sft_normalisation="mean"):
    sft = -lp[:, 0] / n[:, 0] if sft_normalisation == "mean" else -lp[:, 0]
    return R_dpo(lp, n, rf, inputs, beta) + eta * beta * sft


def R_simpo(lp, n, rf, inputs, beta=2.0, gamma_beta_ratio=0.5, label_smoothing=0.0, sft_weight=0.0):
    z = beta * (lp[:, 0] / n[:, 0] - lp[:, 1] / n[:, 1]) - beta * gamma_beta_ratio
    return -(1 - label_smoothing) * lsig(z) - label_smoothing * lsig(-z) + sft_weight * (-lp[:, 0] / n[:, 0])


def R_orpo(lp, n, rf, inputs, beta=0.1):
    pw, pl = torch.exp(lp[:, 0] / n[:, 0]), torch.exp(lp[:, 1] / n[:, 1])
    log_or = torch.log(pw / (1 - pw)) - torch.log(pl / (1 - pl))
    return -lp[:, 0] / n[:, 0] + beta * -lsig(log_or)


def R_fdpo(psi):
    def f(lp, n, rf, inputs, beta=0.1, **kw):
        w, l = ref_logratios(lp, rf)
        return -lsig(beta * (psi(w, **kw) - psi(l, **kw)))

    return f


R_fdpo_forward_kl = R_fdpo(lambda r: -torch.exp(-r))
R_fdpo_js = R_fdpo(lambda r: torch.log(2 * torch.exp(r) / (1 + torch.exp(r))))
R_fdpo_alpha = R_fdpo(lambda r, alpha=0.5: (1 - torch.exp(r) ** (-alpha)) / alpha)


def R_exo_pair(lp, n, rf, inputs, beta=0.1, label_smoothing=1e-3):
    w, l = ref_logratios(lp, rf)
    # KL(p_θ || p_rh) over the two responses, p_θ = softmax(β ρ)
    logits = torch.stack([beta * w, beta * l], 1)
    p = torch.softmax(logits, 1)
    target = torch.tensor([1 - label_smoothing, label_smoothing], dtype=D)
    return (p * (torch.log(p) - torch.log(target))).sum(1)


def R_nca_pair(lp, n, rf, inputs, beta=0.1):
    w, l = ref_logratios(lp, rf)
    return -lsig(beta * w) - 0.5 * lsig(-beta * w) - 0.5 * lsig(-beta * l)


def R_bco_pair(lp, n, rf, inputs, beta=0.1):  # stateless: δ = 0
    w, l = ref_logratios(lp, rf)
    return -lsig(beta * w) - lsig(-beta * l)


def R_apo_zero(lp, n, rf, inputs, beta=0.1):
    w, l = ref_logratios(lp, rf)
    return 1 - sig(beta * w) + sig(beta * l)


def R_apo_down(lp, n, rf, inputs, beta=0.1):
    w, l = ref_logratios(lp, rf)
    return sig(beta * w) + 1 - sig(beta * (w - l))


def R_madpo(lp, n, rf, inputs, beta=0.1, w_max=2.0, w_min=0.5, margin_scale=1.0):
    h = inputs["rm_margin"].detach()
    wt = torch.where(
        h < 0,
        torch.full_like(h, w_max),
        w_min + (w_max - w_min) * torch.exp(-torch.clamp(h, min=0) / margin_scale),
    )
    return wt * R_dpo(lp, n, rf, inputs, beta)


def R_sem_dpo(lp, n, rf, inputs, beta=0.1, alpha=1.0):
    return torch.exp(-alpha * inputs["semantic_distance"].detach()) * R_dpo(lp, n, rf, inputs, beta)


def R_adpo(lp, n, rf, inputs, tau=10.0):
    w, l = ref_logratios(lp, rf)
    q = inputs.get("soft_label", torch.ones_like(w))
    z = (w - l) / tau
    return -(q * lsig(z) + (1 - q) * lsig(-z))


PARITY = {
    "dpo": (R_dpo, {"beta": 0.3}),
    "cdpo": (R_cdpo, {"beta": 0.2, "label_smoothing": 0.15}),
    "rdpo": (R_rdpo, {"beta": 0.2, "label_smoothing": 0.2}),
    "ipo": (R_ipo, {"beta": 0.25}),
    "ipo_sum": (R_ipo_sum, {"beta": 0.05}),
    "hinge": (R_hinge, {"beta": 0.3}),
    "dpo_nll": (R_dpo_nll, {"beta": 0.2, "alpha": 0.7}),
    "rpo_liu2024": (R_rpo_liu2024, {"beta": 0.2, "eta": 0.5}),
    "simpo": (R_simpo, {"beta": 2.5, "gamma_beta_ratio": 0.3, "label_smoothing": 0.1, "sft_weight": 0.2}),
    "orpo": (R_orpo, {"beta": 0.2}),
    "fdpo_forward_kl": (R_fdpo_forward_kl, {"beta": 0.1}),
    "fdpo_js": (R_fdpo_js, {"beta": 0.5}),
    "fdpo_alpha": (R_fdpo_alpha, {"beta": 0.2, "alpha": 0.3}),
    "exo_pair": (R_exo_pair, {"beta": 0.2, "label_smoothing": 0.01}),
    "nca_pair": (R_nca_pair, {"beta": 0.2}),
    "bco_pair": (R_bco_pair, {"beta": 0.2}),
    "apo_zero": (R_apo_zero, {"beta": 0.2}),
    "apo_down": (R_apo_down, {"beta": 0.2}),
    "madpo": (R_madpo, {"beta": 0.2, "w_max": 3.0, "w_min": 0.3, "margin_scale": 2.0}),
    "sem_dpo": (R_sem_dpo, {"beta": 0.2, "alpha": 2.0}),
    "adpo": (R_adpo, {"tau": 4.0}),
}


def parity_inputs(B, seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 25, (B, 2), generator=g).to(D)
    lp = -lengths * (0.1 + 2.0 * torch.rand(B, 2, generator=g, dtype=D))
    rf = lp + 2.0 * torch.randn(B, 2, generator=g, dtype=D)
    inputs = {
        "rm_margin": 3.0 * torch.randn(B, generator=g, dtype=D),
        "semantic_distance": 2.0 * torch.rand(B, generator=g, dtype=D),
        "soft_label": torch.rand(B, generator=g, dtype=D),
    }
    return lp, lengths, rf, inputs


def check_parity(name, ref_fn, kw, B, seed, dtype, lib_call=None):
    lp64, n64, rf64, in64 = parity_inputs(B, seed)
    v = torch.randn(B, generator=torch.Generator().manual_seed(seed + 1000), dtype=D)
    # reference, float64 autograd
    lp_ref = lp64.clone().requires_grad_(True)
    expected = ref_fn(lp_ref, n64, rf64, in64, **kw)
    (expected * v).sum().backward()
    # library, in `dtype`
    lp_lib = lp64.to(dtype).clone().requires_grad_(True)
    pol = PolicyStats(lp_lib, n64.to(dtype), inputs={k: t.to(dtype) for k, t in in64.items()})
    out = (lib_call or (lambda p, r: run(name, p, r, **kw)))(pol, RefStats(rf64.to(dtype)))
    (out.losses * v.to(dtype)).sum().backward()
    assert out.losses.shape == (B,)
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(out.losses.detach().to(D), expected.detach(), **tol)
    torch.testing.assert_close(lp_lib.grad.to(D), lp_ref.grad, **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("B", [1, 7])
@pytest.mark.parametrize("name", sorted(PARITY))
def test_parity(name, B, dtype):
    ref_fn, kw = PARITY[name]
    check_parity(name, ref_fn, kw, B, seed=B * 17, dtype=dtype)


def test_parity_bco_pair_with_state():
    # δ = mean of this batch's rewards (fresh state), detached in the reference too.
    B, beta = 7, 0.2

    def ref_fn(lp, n, rf, inputs, beta=beta):
        w, l = ref_logratios(lp, rf)
        delta = (beta * torch.cat([w, l])).mean().detach()
        return -lsig(beta * w - delta) - lsig(-(beta * l - delta))

    check_parity(
        "bco_pair",
        ref_fn,
        {"beta": beta},
        B,
        3,
        torch.float64,
        lib_call=lambda p, r: run("bco_pair", p, r, beta=beta, state=RunningMean()),
    )


@pytest.mark.parametrize("B", [1, 7])
def test_parity_beta_dpo_without_filtering(B):
    # filter_ratio = 0 keeps every pair, so the draw does not matter; β_b follows the formula.
    beta, a = 0.1, 0.6

    def ref_fn(lp, n, rf, inputs):
        w, l = ref_logratios(lp, rf)
        m = (w - l).detach()
        m0 = 0.1 * m.mean()  # first EMA step from 0 with γ = 0.9
        beta_b = torch.clamp(beta * (1 + a * (m.mean() - m0)), min=1e-3)
        return -lsig(beta_b * (w - l))

    check_parity(
        "beta_dpo",
        ref_fn,
        {},
        B,
        21,
        torch.float64,
        lib_call=lambda p, r: run("beta_dpo", p, r, beta=beta, a=a, filter_ratio=0.0, state=BetaDPOState()),
    )


# --- LD-DPO: per-token inputs ------------------------------------------------------------------


def with_tokens(p, r, seed, T=12):
    """Give a pair batch per-token log-probs consistent with its sums (random lengths ≤ T)."""
    g = torch.Generator().manual_seed(seed)
    B = p.batch_size
    lengths = torch.randint(1, T + 1, (B, 2), generator=g)
    mask = torch.arange(T).expand(B, 2, T) < lengths.unsqueeze(-1)
    tok = -torch.rand(B, 2, T, generator=g, dtype=D) * 3 * mask
    rtok = -torch.rand(B, 2, T, generator=g, dtype=D) * 3 * mask
    pol = PolicyStats(tok.sum(-1), lengths.to(D), token_logps=tok, token_mask=mask)
    return pol, RefStats(rtok.sum(-1), token_logps=rtok)


def R_ld(tok, mask, rtok, alpha, beta):
    B = tok.shape[0]
    out = []
    for b in range(B):
        lw, ll = int(mask[b, 0].sum()), int(mask[b, 1].sum())
        lp_ = min(lw, ll)
        vals = []
        for k, n in ((0, lw), (1, ll)):
            pol = tok[b, k, :lp_].sum() + alpha * tok[b, k, lp_:n].sum()
            rf = rtok[b, k, :lp_].sum() + alpha * rtok[b, k, lp_:n].sum()
            vals.append(pol - rf)
        out.append(-torch.log(sig(beta * (vals[0] - vals[1]))))
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("B", [1, 7])
def test_parity_ld_dpo(B, dtype):
    p, r = with_tokens(*rand_pairs(B, 30), seed=B)
    alpha, beta = 0.3, 0.2
    tok_ref = p.token_logps.clone().requires_grad_(True)
    expected = R_ld(tok_ref, p.token_mask, r.token_logps, alpha, beta)
    expected.sum().backward()
    tok_lib = p.token_logps.to(dtype).clone().requires_grad_(True)
    pol = PolicyStats(tok_lib.sum(-1), p.lengths.to(dtype), token_logps=tok_lib, token_mask=p.token_mask)
    out = run(
        "ld_dpo",
        pol,
        RefStats(r.logps.to(dtype), token_logps=r.token_logps.to(dtype)),
        alpha=alpha,
        beta=beta,
    )
    out.losses.sum().backward()
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(out.losses.detach().to(D), expected.detach(), **tol)
    torch.testing.assert_close(tok_lib.grad.to(D), tok_ref.grad, **tol)
    # tokens beyond the longer response's own length get no gradient; tail tokens get α·(shared gradient)
    assert (tok_lib.grad[~p.token_mask] == 0).all()


def test_ld_dpo_requires_token_logps():
    p, r = rand_pairs(2, 1)
    with pytest.raises(ValueError, match="ld_dpo"):
        run("ld_dpo", p, r)


# ----------------------------------------------------------------------------------------------
# Stability at extreme log-ratios (float32, |Δ| = 1e4): finite losses and gradients
# ----------------------------------------------------------------------------------------------

STABILITY = sorted(PARITY) + ["ld_dpo", "beta_dpo", "bco_pair_state"]


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("name", STABILITY)
def test_stability_extreme_log_ratios(name, sign):
    B, T = 4, 6
    lengths = torch.full((B, 2), float(T))
    # Δ = ±1e4 through ρ_w = ±1e4 and ρ_l = ∓... mixed signs per row
    rw = sign * torch.tensor([1e4, -1e4, 1e4, 0.0])
    rl = sign * torch.tensor([-1e4, 1e4, 0.0, 1e4])
    ref = torch.full((B, 2), -1e4)
    lp = torch.stack([ref[:, 0] + rw, ref[:, 1] + rl], 1).clamp(max=-1e-3)
    lp = lp.clone().requires_grad_(True)
    inputs = {
        "rm_margin": torch.tensor([-1e4, 0.0, 1e4, 3.0]),
        "semantic_distance": torch.tensor([0.0, 2.0, 1.0, 0.5]),
        "soft_label": torch.tensor([1.0, 0.0, 0.5, 0.9]),
    }
    kw = {}
    if name == "ld_dpo":
        mask = torch.ones(B, 2, T, dtype=torch.bool)
        tok = (lp.unsqueeze(-1) / T).expand(B, 2, T)
        pol = PolicyStats(lp, lengths, token_logps=tok, token_mask=mask, inputs=inputs)
        rs = RefStats(ref, token_logps=(ref.unsqueeze(-1) / T).expand(B, 2, T))
    else:
        pol, rs = PolicyStats(lp, lengths, inputs=inputs), RefStats(ref)
    if name == "beta_dpo":
        kw = {"state": BetaDPOState()}
    if name == "bco_pair_state":
        name, kw = "bco_pair", {"state": RunningMean()}
    out = run(name, pol, rs, **kw)
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all(), out.losses
    assert torch.isfinite(lp.grad).all(), lp.grad
