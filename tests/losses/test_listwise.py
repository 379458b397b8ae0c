"""Part F listwise objectives (+ K-ary NCA/InfoNCA/EXO and listwise ADPO) and Curry-DPO's construction:
properties (PRO n = 2, reductions to the pairwise forms), parity with independent float64 per-list
implementations (loss and gradients) on ragged lists, masked slots full of NaN, and float32 stability.
"""

from __future__ import annotations

import math

import pytest
import torch

from preftune.losses import PolicyStats, RefStats, get
from preftune.losses.listwise import CurryPair, curriculum_order, curry_pairs

D = torch.float64
LISTWISE = ["pro", "irpo_ranking", "nca_k", "infonca_k", "exo_k", "adpo_list"]


def run(name, policy, ref, **overrides):
    obj = get(name)
    return obj.fn(policy, ref, **obj.resolve(overrides))


def lsig(z):
    return -torch.nn.functional.softplus(-z)


# ------------------------------------------------------------------------ independent per-list formulas


def ref_pro(logps, lengths, scores, sft_weight, reward_temperature):
    n = len(logps)
    order = sorted(range(n), key=lambda i: (-float(scores[i]), i))
    s = [logps[i] / max(float(lengths[i]), 1.0) for i in order]
    r = [float(scores[i]) for i in order]
    loss = torch.zeros((), dtype=D)
    for k in range(n - 1):
        if reward_temperature:
            t = {j: r[k] - r[j] for j in range(k + 1, n)}
            t[k] = max(t.values())
        else:
            t = {j: 1.0 for j in range(k, n)}
        terms = torch.stack([s[j] * t[j] for j in range(k, n)])
        loss = loss + torch.logsumexp(terms, 0) - s[k] * t[k]
    return loss + sft_weight * (n - 1) ** 2 * (-logps[order[0]])


def ref_irpo(logps, rlogps, rel, beta):
    n = len(logps)
    r = [logps[i] - rlogps[i] for i in range(n)]
    loss = torch.zeros((), dtype=D)
    for i in range(n):
        w = (2.0 ** float(rel[i]) - 1) / math.log2(1 + (i + 1))
        if n < 2:
            continue
        lse = torch.logsumexp(torch.stack([beta * (r[j] - r[i]) for j in range(n) if j != i]), 0) - math.log(
            n - 1
        )
        loss = loss - w * lsig(-lse)
    return loss / n


def softmax_list(xs):
    m = max(float(x) for x in xs)
    e = [torch.exp(torch.as_tensor(x, dtype=D) - m) for x in xs]
    tot = sum(e)
    return [x / tot for x in e]


def ref_nca(logps, rlogps, scores, beta, temp):
    n = len(logps)
    q = softmax_list([float(s) / temp for s in scores])
    r = [beta * (logps[i] - rlogps[i]) for i in range(n)]
    return -sum(q[i] * lsig(r[i]) for i in range(n)) - sum(lsig(-r[i]) for i in range(n)) / n


def ref_infonca(logps, rlogps, scores, beta, temp):
    n = len(logps)
    q = softmax_list([float(s) / temp for s in scores])
    r = torch.stack([beta * (logps[i] - rlogps[i]) for i in range(n)])
    logp = r - torch.logsumexp(r, 0)
    return -sum(q[i] * logp[i] for i in range(n))


def ref_exo(logps, rlogps, scores, beta, beta_r):
    n = len(logps)
    r = torch.stack([beta * (logps[i] - rlogps[i]) for i in range(n)])
    logp = r - torch.logsumexp(r, 0)
    t = torch.tensor([float(s) / beta_r for s in scores], dtype=D)
    logt = t - torch.logsumexp(t, 0)
    return sum(torch.exp(logp[i]) * (logp[i] - logt[i]) for i in range(n))


def ref_adpo(logps, rlogps, scores, tau, beta_r):
    n = len(logps)
    sc = torch.tensor([float(s) for s in scores], dtype=D)
    std = sc.std(unbiased=True) if n > 1 else torch.zeros((), dtype=D)
    z = (sc - sc.mean()) / (std + 1e-8)
    q = torch.softmax(z / beta_r, 0)
    a = torch.stack([(logps[i] - rlogps[i]) / tau for i in range(n)])
    return -(q * (a - torch.logsumexp(a, 0))).sum()


REF = {
    "pro": lambda lp, rl, ln, sc: ref_pro(lp, ln, sc, 0.05, True),  # the paper's temperatures (default)
    "irpo_ranking": lambda lp, rl, ln, sc: ref_irpo(lp, rl, sc, 1.0),
    "nca_k": lambda lp, rl, ln, sc: ref_nca(lp, rl, sc, 0.01, 1e-4),
    "infonca_k": lambda lp, rl, ln, sc: ref_infonca(lp, rl, sc, 0.01, 1e-4),
    "exo_k": lambda lp, rl, ln, sc: ref_exo(lp, rl, sc, 0.5, 0.5),
    "adpo_list": lambda lp, rl, ln, sc: ref_adpo(lp, rl, sc, 0.8, 0.5),
}


def ragged(B, K, seed, dtype=D, garbage=True):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(B, K, generator=g, dtype=D) * 30 - 1
    ref = logps + torch.randn(B, K, generator=g, dtype=D) * 3
    lengths = torch.randint(1, 20, (B, K), generator=g).to(D)
    scores = torch.randint(0, 5, (B, K), generator=g).to(D) + torch.rand(B, K, generator=g, dtype=D) * 0.5
    n = torch.randint(1, K + 1, (B,), generator=g)
    n[0] = K
    if B > 1:
        n[1] = 2 if K >= 2 else 1
    valid = torch.zeros(B, K, dtype=torch.bool)
    for b in range(B):  # valid slots scattered, not only a prefix
        valid[b, torch.randperm(K, generator=g)[: int(n[b])]] = True
    if garbage:
        nan = torch.tensor(float("nan"), dtype=D)
        logps, ref, lengths, scores = (torch.where(valid, x, nan) for x in (logps, ref, lengths, scores))
    return logps.to(dtype), ref.to(dtype), lengths.to(dtype), scores.to(dtype), valid


@pytest.mark.parametrize("name", LISTWISE)
@pytest.mark.parametrize("B,K", [(1, 2), (1, 5), (7, 4), (7, 6)])
def test_parity_ragged_with_nan_in_masked_slots(name, B, K):
    logps, ref, lengths, scores, valid = ragged(B, K, seed=B * 10 + K)
    x = logps.clone().requires_grad_(True)
    w = torch.linspace(0.5, 1.5, B, dtype=D)
    p = PolicyStats(x, lengths, valid=valid, inputs={"scores": scores})
    out = run(name, p, RefStats(ref))
    (out.losses * w).sum().backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(x.grad).all()
    assert torch.all(x.grad[~valid] == 0)
    # Independent per-list computation on the valid slots only.
    x2 = torch.where(valid, logps, 0.0).clone().requires_grad_(True)
    expected = []
    for b in range(B):
        idx = [i for i in range(K) if valid[b, i]]
        expected.append(
            REF[name](
                [x2[b, i] for i in idx],
                [ref[b, i] for i in idx],
                [lengths[b, i] for i in idx],
                [scores[b, i] for i in idx],
            )
        )
    expected = torch.stack([torch.as_tensor(e, dtype=D) for e in expected])
    (expected * w).sum().backward()
    torch.testing.assert_close(out.losses, expected.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("B,K", [(1, 3), (7, 5)])
def test_parity_pro_plain_plackett_luce(B, K):
    # reward_temperature=False (T ≡ 1): the Plackett–Luce NLL of the ranking, no longer the default.
    logps, ref, lengths, scores, valid = ragged(B, K, seed=77 + B)
    x = logps.clone().requires_grad_(True)
    out = run(
        "pro",
        PolicyStats(x, lengths, valid=valid, inputs={"scores": scores}),
        None,
        reward_temperature=False,
        sft_weight=0.1,
    )
    out.losses.sum().backward()
    x2 = torch.where(valid, logps, 0.0).clone().requires_grad_(True)
    exp = []
    for b in range(B):
        idx = [i for i in range(K) if valid[b, i]]
        exp.append(
            ref_pro(
                [x2[b, i] for i in idx], [lengths[b, i] for i in idx], [scores[b, i] for i in idx], 0.1, False
            )
        )
    exp = torch.stack(exp)
    exp.sum().backward()
    torch.testing.assert_close(out.losses, exp.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-10, atol=1e-10)


def test_irpo_explicit_positions_and_ablations():
    logps, ref, lengths, scores, valid = ragged(3, 4, seed=5, garbage=False)
    valid[:] = True
    pos = torch.tensor([[4, 3, 2, 1]] * 3, dtype=D)
    p = PolicyStats(logps, lengths, inputs={"scores": scores, "positions": pos})
    rev = PolicyStats(logps.flip(-1), lengths, inputs={"scores": scores.flip(-1)})
    torch.testing.assert_close(
        run("irpo_ranking", p, RefStats(ref)).losses, run("irpo_ranking", rev, RefStats(ref.flip(-1))).losses
    )
    a = run(
        "irpo_ranking",
        PolicyStats(logps, lengths, inputs={"scores": scores}),
        RefStats(ref),
        gain="none",
        discount="linear",
    )
    assert torch.isfinite(a.losses).all()


# ------------------------------------------------------------------------------------------ properties


@pytest.mark.parametrize("B", [1, 7])
def test_pro_two_responses_without_temperatures_is_logsigmoid_of_avg_logp_gap(B):
    logps, _, lengths, scores, _ = ragged(B, 2, seed=B, garbage=False)
    p = PolicyStats(logps, lengths, inputs={"scores": scores})
    out = run("pro", p, None, sft_weight=0.0, reward_temperature=False).losses
    s = logps / lengths
    best = scores.argmax(-1)
    s1, s2 = s.gather(-1, best[:, None])[:, 0], s.gather(-1, (1 - best)[:, None])[:, 0]
    torch.testing.assert_close(out, -lsig(s1 - s2), rtol=1e-12, atol=1e-12)
    out_sft = run("pro", p, None, sft_weight=0.3, reward_temperature=False).losses
    torch.testing.assert_close(out_sft, -lsig(s1 - s2) + 0.3 * (-logps.gather(-1, best[:, None])[:, 0]))


def test_pro_is_order_invariant_given_scores():
    logps, _, lengths, scores, _ = ragged(4, 5, seed=9, garbage=False)
    perm = torch.tensor([3, 0, 4, 1, 2])
    a = run("pro", PolicyStats(logps, lengths, inputs={"scores": scores}), None).losses
    b = run(
        "pro", PolicyStats(logps[:, perm], lengths[:, perm], inputs={"scores": scores[:, perm]}), None
    ).losses
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("B", [1, 7])
def test_k2_reductions_to_pairwise_objectives(B):
    lp = -torch.rand(B, 2, dtype=D) * 20
    ref = lp + torch.randn(B, 2, dtype=D)
    onehot = {"scores": torch.tensor([[1.0, 0.0]] * B, dtype=D)}
    p = PolicyStats(lp, torch.ones(B, 2, dtype=D), inputs=onehot)
    torch.testing.assert_close(
        run("infonca_k", p, RefStats(ref), beta=0.1).losses, run("dpo", p, RefStats(ref), beta=0.1).losses
    )
    torch.testing.assert_close(
        run("nca_k", p, RefStats(ref), beta=0.1).losses, run("nca_pair", p, RefStats(ref), beta=0.1).losses
    )
    eps = 1e-3
    tgt = {"scores": torch.tensor([[math.log(1 - eps), math.log(eps)]] * B, dtype=D)}
    pe = PolicyStats(lp, torch.ones(B, 2, dtype=D), inputs=tgt)
    torch.testing.assert_close(
        run("exo_k", pe, RefStats(ref), beta=0.1, beta_r=1.0).losses,
        run("exo_pair", pe, RefStats(ref), beta=0.1, label_smoothing=eps).losses,
    )


def test_single_valid_response_gives_zero_loss_and_gradient():
    lp = torch.tensor([[-3.0, float("nan"), float("nan")]], dtype=D, requires_grad=True)
    valid = torch.tensor([[True, False, False]])
    for name in LISTWISE:
        p = PolicyStats(
            lp,
            torch.tensor([[2.0, 1.0, 1.0]], dtype=D),
            valid=valid,
            inputs={"scores": torch.tensor([[1.0, 0, 0]], dtype=D)},
        )
        out = run(
            name,
            p,
            RefStats(torch.tensor([[-2.0, 0.0, 0.0]], dtype=D)),
            **({"sft_weight": 0.0} if name == "pro" else {}),
        )
        (g,) = torch.autograd.grad(out.losses.sum(), lp, allow_unused=True)
        assert torch.isfinite(out.losses).all(), name
        if name in ("pro", "infonca_k", "exo_k", "adpo_list", "irpo_ranking"):
            assert float(out.losses.detach()[0]) == pytest.approx(0.0, abs=1e-12), name
        assert g is None or torch.isfinite(g).all(), name


# ------------------------------------------------------------------------------------------ stability


@pytest.mark.parametrize("name", LISTWISE)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_extreme_log_ratios_float32(name, sign):
    B, K = 3, 4
    lp = torch.tensor([[-1.0, -1.0 - sign * 1e4, -5.0, -1.0 + sign * 1e4]] * B)
    lp = torch.where(lp > 0, -lp, lp).requires_grad_(True)
    ref = torch.full((B, K), -1.0)
    valid = torch.tensor([[True, True, True, False]] * B)
    scores = torch.tensor([[3.0, 1.0, 2.0, 0.0]] * B)
    p = PolicyStats(lp, torch.full((B, K), 2.0), valid=valid, inputs={"scores": scores})
    for kwargs in [{}] + ([{"reward_temperature": False}] if name == "pro" else []):  # PRO: both forms
        lp.grad = None
        out = run(name, p, RefStats(ref), **kwargs)
        out.losses.sum().backward()
        assert torch.isfinite(out.losses).all() and torch.isfinite(lp.grad).all(), kwargs


# ------------------------------------------------------------------------------------------ Curry-DPO


def test_curry_pairs_best_vs_rest_easy_to_hard():
    pairs = curry_pairs([7.0, 9.0, 3.0, 5.0])
    assert pairs == [CurryPair(1, 2, -6.0), CurryPair(1, 3, -4.0), CurryPair(1, 0, -2.0)]


def test_curry_pairs_drop_ties_and_all_pairs():
    assert curry_pairs([5.0, 5.0, 1.0]) == [CurryPair(0, 2, -4.0)]
    allp = curry_pairs([1.0, 3.0, 2.0], strategy="all_pairs")
    assert {(p.winner, p.loser) for p in allp} == {(1, 0), (1, 2), (2, 0)}
    assert [p.difficulty for p in allp] == sorted(p.difficulty for p in allp)
    assert curry_pairs([2.0, 2.1], tie_eps=0.5) == []
    with pytest.raises(ValueError):
        curry_pairs([1.0, 2.0], strategy="nope")


def test_curriculum_order_stages():
    per_prompt = [curry_pairs([7.0, 9.0, 3.0, 5.0]), curry_pairs([1.0, 2.0]), curry_pairs([4.0, 1.0, 3.0])]
    stages = curriculum_order(per_prompt, iterative=True)
    assert stages == [[(0, 1, 2), (1, 1, 0), (2, 0, 1)], [(0, 1, 3), (2, 0, 2)], [(0, 1, 0)]]
    flat = curriculum_order(per_prompt, iterative=False)
    assert flat == [[item for s in stages for item in s]]
    assert curriculum_order([]) == []


def test_registry_declarations():
    for n in LISTWISE:
        o = get(n)
        assert o.shape == "listwise" and "scores" in o.inputs
    assert get("pro").reference == "none"
    assert get("irpo_ranking").reference == "logps"
