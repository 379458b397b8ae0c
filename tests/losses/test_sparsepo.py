"""SparsePO (METHODS.md §M2, LOSSES.md D2): golden values of §M2(d) in float64, parity of loss and gradients with
an explicit float64 reimplementation written here with Python loops (losses, the learned mask head, MaPO's
normalisation), the common-mask halving of λ, and that neither variant is TDPO1 once its masks are not ones.
"""

from __future__ import annotations

import math

import pytest
import torch

from preftune.losses import PolicyStats, RefStats, get
from preftune.model.masks import MASK_WEIGHT_DECAY, SparseMaskNet, TokenMaskHead, mapo_mask, optimizer_groups

D = torch.float64


def run(name, policy, ref, **overrides):
    obj = get(name)
    return obj.fn(policy, ref, **obj.resolve(overrides))


# ----------------------------------------------------------------------------------------------- golden (§M2 d)

RHO = torch.tensor([[[0.5, -0.2, 0.3], [-0.4, 0.1, 0.0]]], dtype=D)  # y_w: 3 tokens, y_l: 2 (+ padding)
KL = torch.tensor([[[0.05, 0.10, 0.02], [0.08, 0.03, 0.0]]], dtype=D)
MASK = torch.tensor([[[1, 1, 1], [1, 1, 0]]], dtype=torch.bool)
M_COMMON = torch.tensor([[[1.0, 0.0, 0.5], [0.2, 0.9, 0.0]]], dtype=D)
M_KL = torch.tensor([[[0.3, 0.6, 0.0], [1.0, 0.5, 0.0]]], dtype=D)


def canonical(inputs):
    p = PolicyStats(torch.where(MASK, RHO, 0.0).sum(-1), MASK.sum(-1).to(D), token_logps=RHO, token_mask=MASK,
                    token_kl=KL, inputs=inputs)
    return p, RefStats(torch.zeros(1, 2, dtype=D), torch.zeros(1, 2, 3, dtype=D))  # ρ_t = token_logps


@pytest.mark.parametrize("name", ["sparsepo_learned", "sparsepo"])
def test_golden_learned_common_mask_halves_lambda(name):
    p, r = canonical({"token_reward_mask": M_COMMON, "token_kl_mask": M_COMMON})
    out = run(name, p, r)  # λ_u = λ_d = 0.001 configured, 0.0005 used
    assert float(out.losses[0]) == pytest.approx(0.663437, abs=1e-5)
    # U-diff 0.64, D-diff −0.017, core 0.660837, L1 = 2.6 (both responses) × 2 terms × 0.0005
    assert float(out.metrics["mask/penalty"][0]) == pytest.approx(0.0026, abs=1e-12)
    assert float(out.metrics["mask/reward_l1"][0]) == pytest.approx(2.6, abs=1e-12)
    core = -math.log(1 / (1 + math.exp(-0.1 * (0.64 + 0.017))))
    assert float(out.losses[0]) == pytest.approx(core + 0.0026, abs=1e-12)


def test_golden_learned_independent_masks():
    p, r = canonical({"token_reward_mask": M_COMMON, "token_kl_mask": M_KL})
    out = run("sparsepo_learned", p, r, masks="independent")  # λ = 0.001 unhalved
    assert float(out.losses[0]) == pytest.approx(0.667628, abs=1e-5)


def test_golden_all_ones_zero_lambda_is_tdpo1():
    ones = torch.where(MASK, 1.0, 0.0).to(D)
    p, r = canonical({"token_reward_mask": ones, "token_kl_mask": ones, "token_activation_mask": ones})
    a = run("sparsepo_learned", p, r, lambda_reward=0.0, lambda_kl=0.0).losses
    assert float(a[0]) == pytest.approx(0.646299, abs=1e-5)
    torch.testing.assert_close(a, run("tdpo1", p, r).losses, rtol=0, atol=1e-12)
    torch.testing.assert_close(run("sparsepo_mapo", p, r).losses, a, rtol=0, atol=1e-12)


def test_golden_mapo_loss_is_the_core_without_penalty():
    p, r = canonical({"token_activation_mask": M_COMMON})
    out = run("sparsepo_mapo", p, r)
    assert float(out.losses[0]) == pytest.approx(0.660837, abs=1e-5)
    assert float(out.metrics["mask/penalty"][0]) == 0.0


def test_golden_mapo_mask():
    # Per-token feature means of each hooked tensor, 4 tokens of one response (§M2 d).
    groups = {
        "mlp": torch.tensor([[0.2, 0.8, 0.5, 0.1], [1.0, 0.0, 0.4, 0.6]], dtype=D),
        "attn": torch.tensor([[0.3, 0.3, 0.9, 0.0]], dtype=D),
        "resid": torch.tensor([[2.0, 1.0, 3.0, 5.0]], dtype=D),
        "logits": torch.tensor([[-1.0, 0.5, 0.0, 1.5]], dtype=D),
    }
    m = mapo_mask(groups, torch.zeros(4, dtype=torch.long), 1)
    torch.testing.assert_close(m, torch.tensor([0.288690, 0.358333, 0.596429, 0.575000], dtype=D), rtol=0, atol=1e-6)


def golden_head():
    head = TokenMaskHead(3, 2, 1e-5, dropout=0.0).double()
    with torch.no_grad():
        head.layer_weight.copy_(torch.tensor([[0.4, -0.2, 0.1], [-0.3, 0.5, 0.2]]))
        head.layer_bias.copy_(torch.tensor([0.05, -0.1]))
        head.mixer.copy_(torch.tensor([0.7, 0.9]))
    return head


def test_golden_learned_mask_head():
    h = torch.tensor([[[0.5, -1.0, 2.0]], [[1.0, 1.5, -0.5]]], dtype=D)  # (L=2, M=1, d=3)
    m = golden_head()(h).detach()
    assert float(m[0]) == pytest.approx(0.292196, abs=1e-6)  # s = (0.417422, 0): the second layer is cut by ReLU
    assert float(m[0]) == pytest.approx(0.7 * 0.417422, abs=1e-6)


# ----------------------------------------------------------------------------------------------- parity


def make(B, T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B, 2), generator=g)
    mask = torch.arange(T).view(1, 1, T) < lengths.unsqueeze(-1)
    tlp = torch.where(mask, -torch.rand(B, 2, T, generator=g, dtype=D) * 3, 0.0)
    rtlp = torch.where(mask, -torch.rand(B, 2, T, generator=g, dtype=D) * 3, 0.0)
    tkl = torch.where(mask, torch.rand(B, 2, T, generator=g, dtype=D) * 0.5, 0.0)
    mu = torch.rand(B, 2, T, generator=g, dtype=D) * 1.5
    md = torch.rand(B, 2, T, generator=g, dtype=D) * 1.5
    return dict(mask=mask, lengths=lengths.to(D), tlp=tlp, rtlp=rtlp, tkl=tkl, mu=mu, md=md, g=g)


def ref_loss(tlp, rtlp, tkl, mu, md, mask, beta, lu, ld):
    """SparsePO per example, one token at a time (METHODS.md §M2 b)."""
    out = []
    for b in range(tlp.shape[0]):
        U, Dd, pen = [], [], 0.0
        for k in range(2):
            n = int(mask[b, k].sum())
            U.append(sum(mu[b, k, t] * (tlp[b, k, t] - rtlp[b, k, t]) for t in range(n)))
            Dd.append(sum(md[b, k, t] * (-tkl[b, k, t]) for t in range(n)))
            pen = pen + lu * sum(abs(mu[b, k, t]) for t in range(n)) + ld * sum(abs(md[b, k, t]) for t in range(n))
        z = beta * ((U[0] - U[1]) - (Dd[0] - Dd[1]))
        out.append(torch.log1p(torch.exp(-z)) + pen)
    return torch.stack(out)


def grads(fn, leaves):
    leaves = [x.detach().clone().requires_grad_(True) for x in leaves]
    losses = fn(*leaves)
    (losses * torch.linspace(0.5, 1.5, losses.numel(), dtype=losses.dtype)).sum().backward()
    return losses.detach(), [x.grad for x in leaves]


def assert_parity(lib, ref, leaves, atol=1e-10):
    l1, g1 = grads(lib, leaves)
    l2, g2 = grads(ref, leaves)
    torch.testing.assert_close(l1, l2, rtol=0, atol=atol)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=atol)


def policy(d, tlp, tkl, inputs):
    return PolicyStats(torch.zeros(tlp.shape[:2], dtype=D), d["lengths"], token_logps=tlp, token_mask=d["mask"],
                       token_kl=tkl, inputs=inputs)


@pytest.mark.parametrize("B", [1, 7])
def test_parity_learned_independent(B):
    d = make(B, seed=B)
    ref = RefStats(torch.zeros(B, 2, dtype=D), d["rtlp"])

    def lib(tlp, tkl, mu, md):
        p = policy(d, tlp, tkl, {"token_reward_mask": mu, "token_kl_mask": md})
        return run("sparsepo_learned", p, ref, beta=0.8, lambda_reward=0.01, lambda_kl=0.02, masks="independent").losses

    def explicit(tlp, tkl, mu, md):
        return ref_loss(tlp, d["rtlp"], tkl, mu, md, d["mask"], 0.8, 0.01, 0.02)

    assert_parity(lib, explicit, [d["tlp"], d["tkl"], d["mu"], d["md"]])


@pytest.mark.parametrize("B", [1, 7])
def test_parity_learned_common(B):
    d = make(B, seed=10 + B)
    ref = RefStats(torch.zeros(B, 2, dtype=D), d["rtlp"])

    def lib(tlp, tkl, m):
        p = policy(d, tlp, tkl, {"token_reward_mask": m, "token_kl_mask": m})
        return run("sparsepo_learned", p, ref, beta=0.8, lambda_reward=0.01, lambda_kl=0.02).losses

    def explicit(tlp, tkl, m):  # one mask on both terms; each λ halved
        return ref_loss(tlp, d["rtlp"], tkl, m, m, d["mask"], 0.8, 0.005, 0.01)

    assert_parity(lib, explicit, [d["tlp"], d["tkl"], d["mu"]])


@pytest.mark.parametrize("B", [1, 7])
def test_parity_mapo_and_its_mask_is_detached(B):
    d = make(B, seed=20 + B)
    ref = RefStats(torch.zeros(B, 2, dtype=D), d["rtlp"])

    def lib(tlp, tkl, m):
        return run("sparsepo_mapo", policy(d, tlp, tkl, {"token_activation_mask": m}), ref, beta=0.3).losses

    def explicit(tlp, tkl, m):
        return ref_loss(tlp, d["rtlp"], tkl, m.detach(), m.detach(), d["mask"], 0.3, 0.0, 0.0)

    l1, g1 = grads(lib, [d["tlp"], d["tkl"], d["mu"]])
    l2, g2 = grads(explicit, [d["tlp"], d["tkl"], d["mu"]])
    torch.testing.assert_close(l1, l2, rtol=0, atol=1e-10)
    torch.testing.assert_close(g1[0], g2[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(g1[1], g2[1], rtol=0, atol=1e-10)
    assert g1[2] is None  # stop-gradient: the reference's activations are data


def explicit_head(h, ln_w, ln_b, W, b, c, eps):
    """TokenMaskHead one position and one layer at a time: LayerNorm with the biased variance."""
    L, M, H = h.shape
    out = []
    for m in range(M):
        acc = 0.0
        for li in range(L):
            x = h[li, m]
            mu = sum(x[i] for i in range(H)) / H
            var = sum((x[i] - mu) ** 2 for i in range(H)) / H
            z = [(x[i] - mu) / torch.sqrt(var + eps) * ln_w[i] + ln_b[i] for i in range(H)]
            s = torch.relu(sum(W[li, i] * z[i] for i in range(H)) + b[li])
            acc = acc + c[li] * s
        out.append(torch.relu(acc))
    return torch.stack(out)


def test_parity_learned_head_and_its_gradients():
    g = torch.Generator().manual_seed(3)
    L, M, H = 3, 8, 4
    h = torch.randn(L, M, H, generator=g, dtype=D)
    head = TokenMaskHead(H, L, 1e-5, dropout=0.0, init_std=0.5).double()
    with torch.no_grad():
        head.norm.weight.copy_(1 + 0.3 * torch.randn(H, generator=g, dtype=D))
        head.norm.bias.copy_(0.2 * torch.randn(H, generator=g, dtype=D))
        head.layer_bias.copy_(0.3 * torch.randn(L, generator=g, dtype=D))
        head.mixer.copy_(torch.tensor([0.5, -1.5, 0.4], dtype=D))
        # drawn here, not by the head's own init from the global RNG: the case must not depend on what ran first
        head.layer_weight.copy_(0.5 * torch.randn(head.layer_weight.shape, generator=g, dtype=D))
    params = [head.norm.weight, head.norm.bias, head.layer_weight, head.layer_bias, head.mixer]
    w = torch.linspace(0.5, 1.5, M, dtype=D)
    (head(h) * w).sum().backward()
    got = [p.grad.clone() for p in params]
    leaves = [p.detach().clone().requires_grad_(True) for p in params]
    ref = explicit_head(h, *leaves, 1e-5)
    torch.testing.assert_close(head(h), ref.detach(), rtol=0, atol=1e-12)
    assert 0 < int((ref == 0).sum()) < M  # the case has both cut and passing positions
    (ref * w).sum().backward()
    for a, leaf in zip(got, leaves, strict=True):
        torch.testing.assert_close(a, leaf.grad, rtol=0, atol=1e-12)


def test_mask_net_common_and_independent_outputs_and_weight_decay_groups():
    h = torch.randn(2, 3, 4)
    common = SparseMaskNet(4, 2, 1e-5, independent=True, reward=True, kl=False)
    assert set(common(h)) == {"token_reward_mask"}
    net = SparseMaskNet(4, 2, 1e-5, independent=False)
    out = net(h)
    assert out["token_reward_mask"] is out["token_kl_mask"]
    other = torch.nn.Parameter(torch.zeros(2))
    groups = optimizer_groups([other, *net.parameters()], net)
    head = net.heads["common"]
    assert groups[0]["params"] == [other]
    assert groups[1] == {"params": [head.layer_weight, head.mixer], "weight_decay": MASK_WEIGHT_DECAY}
    assert {id(p) for p in groups[2]["params"]} == {id(head.norm.weight), id(head.norm.bias), id(head.layer_bias)}
    assert groups[2]["weight_decay"] == 0.0


def explicit_minmax(x, slot):
    out = torch.empty_like(x)
    for s in set(slot.tolist()):
        idx = [i for i in range(len(slot)) if slot[i] == s]
        vals = [x[i] for i in idx]
        lo, hi = min(vals), max(vals)
        for i in idx:
            out[i] = 1.0 if hi == lo else (x[i] - lo) / (hi - lo)
    return out


def test_parity_mapo_mask_ragged_responses():
    g = torch.Generator().manual_seed(5)
    slot = torch.tensor([0, 0, 0, 1, 1, 3, 4, 4, 4, 4])  # slot 2 empty; slot 3 one token
    M = len(slot)
    groups = {"mlp": torch.randn(3, M, generator=g, dtype=D), "attn": torch.randn(6, M, generator=g, dtype=D),
              "resid": torch.randn(8, M, generator=g, dtype=D), "logits": torch.randn(1, M, generator=g, dtype=D)}
    groups["attn"][2, 6:] = 0.7  # one constant tensor on response 4: all ones there
    got = mapo_mask(groups, slot, 5)
    want = torch.stack([torch.stack([explicit_minmax(t, slot) for t in v]).mean(0) for v in groups.values()]).mean(0)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert float(got[5]) == 1.0  # a one-token response is not masked out
    for s in (0, 1, 4):  # every tensor has one 0 and one 1 per response: the mean stays in [0, 1]
        sel = got[slot == s]
        assert float(sel.min()) >= 0 and float(sel.max()) <= 1
    single = {"resid": groups["resid"][:1]}
    one = mapo_mask(single, slot, 5)
    for s in (0, 1, 4):
        assert float(one[slot == s].min()) == 0.0 and float(one[slot == s].max()) == 1.0


# ----------------------------------------------------------------------------------------------- properties


def test_not_tdpo1_when_masks_are_not_ones():
    d = make(5, seed=40)
    p = policy(d, d["tlp"], d["tkl"], {"token_reward_mask": d["mu"], "token_kl_mask": d["mu"],
                                       "token_activation_mask": d["md"]})
    ref = RefStats(torch.where(d["mask"], d["rtlp"], 0.0).sum(-1), d["rtlp"])
    p.logps = torch.where(d["mask"], d["tlp"], 0.0).sum(-1)
    tdpo = run("tdpo1", p, ref).losses
    learned = run("sparsepo_learned", p, ref, lambda_reward=0.0, lambda_kl=0.0).losses
    mapo = run("sparsepo_mapo", p, ref).losses
    assert float((learned - tdpo).abs().min()) > 1e-3 and float((mapo - tdpo).abs().min()) > 1e-3
    torch.testing.assert_close(run("sparsepo", p, ref).losses, run("sparsepo_learned", p, ref).losses)


def test_common_mask_halves_both_lambdas_only_when_both_terms_are_masked():
    d = make(3, seed=41)
    p = policy(d, d["tlp"], d["tkl"], {"token_reward_mask": d["mu"], "token_kl_mask": d["mu"]})
    ref = RefStats(torch.zeros(3, 2, dtype=D), d["rtlp"])
    l1 = torch.where(d["mask"], d["mu"], 0.0).sum((-2, -1))
    kw = dict(lambda_reward=0.01, lambda_kl=0.03)
    common = run("sparsepo_learned", p, ref, **kw).metrics["mask/penalty"]
    indep = run("sparsepo_learned", p, ref, masks="independent", **kw).metrics["mask/penalty"]
    reward_only = run("sparsepo_learned", p, ref, mask_kl=False, **kw).metrics["mask/penalty"]
    torch.testing.assert_close(common, 0.5 * 0.04 * l1, rtol=0, atol=1e-12)
    torch.testing.assert_close(indep, 0.04 * l1, rtol=0, atol=1e-12)
    torch.testing.assert_close(reward_only, 0.01 * l1, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["sparsepo_learned", "sparsepo_mapo", "sparsepo"])
def test_extreme_log_ratios_float32_and_padding_garbage(name):
    B, T = 3, 4
    mask = torch.ones(B, 2, T, dtype=torch.bool)
    mask[:, 1, -1] = False
    tlp = torch.zeros(B, 2, T)
    tlp[:, 1] = -2500.0  # |Δ| ≈ 1e4
    tlp = torch.where(mask, tlp, float("nan")).requires_grad_(True)
    kl = torch.where(mask, torch.full((B, 2, T), 1e3), float("inf")).requires_grad_(True)
    m = torch.where(mask, 0.5, float("nan"))
    inputs = {"token_reward_mask": m, "token_kl_mask": m, "token_activation_mask": m}
    p = PolicyStats(torch.zeros(B, 2), mask.sum(-1).float(), token_logps=tlp, token_mask=mask, token_kl=kl,
                    inputs=inputs)
    out = run(name, p, RefStats(torch.zeros(B, 2), torch.zeros(B, 2, T)))
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all()
    assert torch.isfinite(tlp.grad).all() and torch.all(tlp.grad[~mask] == 0)
    assert torch.isfinite(kl.grad).all()


def test_registry_declarations():
    for n in ("sparsepo", "sparsepo_learned", "sparsepo_mapo"):
        assert get(n).reference == "live_logits" and get(n).token_level and get(n).normalisation == "sum"
    assert get("sparsepo").fn is get("sparsepo_learned").fn
    assert get("sparsepo").hyperparameters == get("sparsepo_learned").hyperparameters
    assert get("sparsepo_learned").inputs == ("token_reward_mask", "token_kl_mask")
    assert get("sparsepo_mapo").inputs == ("token_activation_mask",)
    assert get("sparsepo_mapo").hyperparameters.keys() == {"beta"}
