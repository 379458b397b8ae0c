"""OFS-DPO (preftune.online.ofs): the chasing term's signs and stop-gradients, parity with plain DPO at
λ = 0, both modules training at their own rates, the leader swap, determinism and state round-trips."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from preftune.data.tokenize import TokenizedExample
from preftune.losses import PolicyStats, get
from preftune.model import LoraSettings, apply_lora
from preftune.model.engine import LogProbEngine, pack
from preftune.model.reference import ReferenceCache
from preftune.model.scoring import response_token_logps
from preftune.online.ofs import (
    ADAPTERS,
    MODULES,
    OFSState,
    adapter_parameters,
    ensure_slow_adapter,
    load_ofs_state_dict,
    module_stats,
    ofs_objective,
    ofs_state_dict,
    train_ofs,
)
from preftune.testing import tiny_model

N = 8
BETA = 0.1


def make_model():
    torch.manual_seed(0)
    return apply_lora(tiny_model(seed=0), LoraSettings(r=4, alpha=8))


@pytest.fixture(scope="module")
def data(tiny_tok):
    """Random token pairs and their reference (base model) token log-probs."""
    rng = random.Random(0)
    v = len(tiny_tok)
    ids = lambda lo, hi: [rng.randrange(4, v) for _ in range(rng.randint(lo, hi))]  # noqa: E731
    examples = [TokenizedExample(ids(3, 6), [ids(2, 6), ids(2, 6)], index=i) for i in range(N)]
    base = make_model()
    ref = response_token_logps(base, [e.prompt_ids for e in examples], [e.response_ids for e in examples],
                               tiny_tok.pad_token_id, adapters_off=True)
    return examples, ReferenceCache(ref)


def randomise(model, seed: int = 1) -> None:
    """Distinct non-zero weights in both modules (fresh LoRA has B = 0, where A gets no gradient)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in MODULES:
            for p in adapter_parameters(model, ADAPTERS[m]):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def adapter_vector(model, name: str) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in adapter_parameters(model, name)])


def forward_stats(model, examples, tok, idx):
    engine = LogProbEngine(model, prefix_sharing="off")
    packed = pack([examples[i].prompt_ids for i in idx], [examples[i].response_ids for i in idx], tok.pad_token_id)
    params = adapter_parameters(model, "default") + adapter_parameters(model, "slow")
    return {m: module_stats(engine, packed, ADAPTERS[m], params) for m in MODULES}


def run(model, tok, examples, cache, tmp_path, **kw):
    args = dict(beta=BETA, lr_fast=1e-3, lr_ratio=0.2, lam=0.1, swap_every=4, batch_size=4, epochs=1, seed=3,
                warmup_ratio=0.0, out_dir=tmp_path)
    args.update(kw)
    return train_ofs(model, tok, examples, cache, **args)


# ---------------------------------------------------------------------------------------------- the terms


@pytest.mark.parametrize("leader", MODULES)
def test_chasing_signs_and_stop_gradients(data, tiny_tok, leader):
    """Leader's λ·C_lead widens g_lead − g_chase, chaser's −λ·C_chase narrows it (directional derivative
    along each term's descent direction, and one small step); each term reaches only its own module."""
    examples, cache = data
    model = make_model()
    ensure_slow_adapter(model)
    randomise(model)
    chaser = "slow" if leader == "fast" else "fast"
    params = {m: adapter_parameters(model, ADAPTERS[m]) for m in MODULES}
    lam = 0.5
    for i in range(4):  # one pair at a time: the gap's derivative along the descent direction is then signed
        stats = forward_stats(model, examples, tiny_tok, [i])
        ref = cache.batch([i], 2, False)
        terms = ofs_objective(stats, ref, beta=BETA, lam=lam, leader=leader)
        g = {m: stats[m].logps[:, 0] - stats[m].logps[:, 1] for m in MODULES}
        gap = (g[leader] - g[chaser]).sum()
        c_lead, c_chase = lam * terms.chase_lead.sum(), -lam * terms.chase_chase.sum()
        grad = lambda y, m: torch.autograd.grad(y, params[m], retain_graph=True, allow_unused=True)  # noqa: E731
        d_gap = {m: grad(gap, m) for m in MODULES}
        d_lead, d_chase = grad(c_lead, leader), grad(c_chase, chaser)
        # descent direction −∇term; its effect on the gap is −⟨∇gap, ∇term⟩
        widen = -sum((a * b).sum() for a, b in zip(d_gap[leader], d_lead, strict=True))
        narrow = -sum((a * b).sum() for a, b in zip(d_gap[chaser], d_chase, strict=True))
        assert widen > 0 and narrow < 0, (i, float(widen), float(narrow))
        # stop-gradients: C_lead gives the chaser nothing, C_chase gives the leader nothing
        assert all(x is None for x in grad(c_lead, chaser))
        assert all(x is None for x in grad(c_chase, leader))
        # each module's forward ran its own adapter only: g_m has no path to the other module
        assert all(x is None for x in grad(g[leader].sum(), chaser))
        assert all(x is None for x in grad(g[chaser].sum(), leader))
        # one small step of each term alone moves the gap the same way
        gap0 = float(gap.detach())
        for m, d, sign in ((leader, d_lead, 1), (chaser, d_chase, -1)):
            norm = torch.sqrt(sum((x * x).sum() for x in d))
            with torch.no_grad():
                saved = [p.clone() for p in params[m]]
                for p, x in zip(params[m], d, strict=True):
                    p.sub_(1e-3 * x / norm)
                s = forward_stats(model, examples, tiny_tok, [i])
                new = float((s[leader].logps[:, 0] - s[leader].logps[:, 1]
                             - s[chaser].logps[:, 0] + s[chaser].logps[:, 1]).sum())
                for p, x in zip(params[m], saved, strict=True):
                    p.copy_(x)
            assert sign * (new - gap0) > 0, (m, gap0, new)


def test_objective_values(data, tiny_tok):
    """The terms against their formulas on the same statistics (dpo from the registry)."""
    examples, cache = data
    model = make_model()
    ensure_slow_adapter(model)
    randomise(model)
    idx = list(range(N))
    with torch.no_grad():
        stats = forward_stats(model, examples, tiny_tok, idx)
    ref = cache.batch(idx, 2, False)
    terms = ofs_objective(stats, ref, beta=BETA, lam=0.3, leader="slow")
    g = {m: stats[m].logps[:, 0] - stats[m].logps[:, 1] for m in MODULES}
    g_ref = ref.logps[:, 0] - ref.logps[:, 1]
    sig = torch.sigmoid
    for m in MODULES:
        torch.testing.assert_close(terms.loss[m], -torch.log(sig(BETA * (g[m] - g_ref))))
        torch.testing.assert_close(terms.margin[m], BETA * (g[m] - g_ref))
    torch.testing.assert_close(terms.chase_lead, -torch.log(sig(BETA * (g["slow"] - g["fast"]))))
    torch.testing.assert_close(terms.chase_chase, terms.chase_lead)  # same value, different gradient paths
    expected = terms.loss["fast"].mean() + terms.loss["slow"].mean()  # ±λ·C cancel in value
    torch.testing.assert_close(terms.objective, expected)


def test_gradients_reach_both_modules(data, tiny_tok):
    """PEFT's set_adapter turns requires_grad off on the inactive adapter; the step must still give both
    modules their gradients (the fast module's forward runs first, then the switch to slow)."""
    examples, cache = data
    model = make_model()
    ensure_slow_adapter(model)
    randomise(model)
    idx = list(range(4))
    stats = forward_stats(model, examples, tiny_tok, idx)
    ofs_objective(stats, cache.batch(idx, 2, False), beta=BETA, lam=0.1, leader="fast").objective.backward()
    for m in MODULES:
        ps = adapter_parameters(model, ADAPTERS[m])
        assert all(p.grad is not None for p in ps), m
        assert all(float(p.grad.abs().sum()) > 0 for p in ps), m


# ---------------------------------------------------------------------------------------------- training


def hand_dpo_step(model, tok, examples, cache, idx, lr):
    """One plain-DPO AdamW step of the single 'default' adapter, as the trainer does it."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0, fused=True)
    engine = LogProbEngine(model, prefix_sharing="auto")
    packed = pack([examples[i].prompt_ids for i in idx], [examples[i].response_ids for i in idx],
                  tok.pad_token_id, share_prefix=engine.shares_prefix())
    flat = engine(**packed.tensors())["token_logps"].float()
    from preftune.model.engine import scatter_stats

    logps, _, _ = scatter_stats(packed, flat, False)
    stats = PolicyStats(logps=logps, lengths=packed.lengths, valid=packed.valid)
    loss = get("dpo").fn(stats, cache.batch(idx, 2, False), beta=BETA).losses.mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


@pytest.mark.parametrize("module", MODULES)
def test_lambda_zero_is_plain_dpo(data, tiny_tok, tmp_path, module):
    """λ = 0: after one step each module equals one plain-DPO step with its own learning rate."""
    examples, cache = data
    model = make_model()
    res = run(model, tiny_tok, examples, cache, tmp_path, lam=0.0, batch_size=N, lr_ratio=0.5)
    assert res.steps == 1
    hand = make_model()
    order = random.Random(3).sample(range(N), N)  # train_ofs's data order for seed 3
    hand_dpo_step(hand, tiny_tok, examples, cache, order, lr=1e-3 if module == "fast" else 5e-4)
    got, want = adapter_vector(model, ADAPTERS[module]), adapter_vector(hand, "default")
    assert float((want - adapter_vector(make_model(), "default")).abs().max()) > 1e-4  # the step moved it
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_slow_moves_less_and_first_step_metrics(data, tiny_tok, tmp_path):
    examples, cache = data
    model = make_model()
    start = adapter_vector(model, "default")
    res = run(model, tiny_tok, examples, cache, tmp_path, epochs=3, lr_ratio=0.2)
    assert res.steps == 6
    moved = {m: float((adapter_vector(model, ADAPTERS[m]) - start).norm()) for m in MODULES}
    assert 0 < moved["slow"] < 0.4 * moved["fast"], moved
    # Step 1: both modules are the fresh adapter (B = 0), i.e. the reference: h = 0 everywhere.
    first = res.history[0]
    for k in ("loss/fast", "loss/slow", "chase/lead", "chase/chase"):
        assert first[k] == pytest.approx(math.log(2), abs=1e-6), k
    # (accuracies count margins > 0: at h = 0 ± rounding they are not meaningful, so not checked here)
    for k in ("prob_gap", "rewards/margins/fast", "rewards/margins/slow"):
        assert first[k] == pytest.approx(0.0, abs=1e-6), k
    assert first["lr/fast"] == pytest.approx(1e-3) and first["lr/slow"] == pytest.approx(2e-4)
    # Later steps: the modules differ, and the training pairs are preferred more than at the start.
    last = res.history[-1]
    assert last["prob_gap"] > 0
    assert last["loss/fast"] < math.log(2)
    # metrics.jsonl is the history, written whole (no temporary files left behind)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == res.history
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_deterministic(data, tiny_tok, tmp_path):
    examples, cache = data
    runs = []
    for k in range(2):
        model = make_model()
        res = run(model, tiny_tok, examples, cache, tmp_path / str(k), epochs=2)
        runs.append((res.history, ofs_state_dict(model)))
    assert runs[0][0] == runs[1][0]
    assert runs[0][1].keys() == runs[1][1].keys()
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])


def test_state_swap_rule():
    s = OFSState()
    assert not s.record({"fast": 1.0, "slow": 0.0}, 3)  # not a check step
    assert not s.record({"fast": 1.0, "slow": 2.0}, 3)
    assert s.record({"fast": 1.0, "slow": 0.5}, 3)  # means over 3 steps: fast 1.0 > slow 0.833
    assert (s.leader, s.swaps, s.step) == ("slow", 1, 3)
    for _ in range(3):  # the window is the last 3 steps only; a tie keeps the leader
        s.record({"fast": 0.5, "slow": 0.5}, 3)
    assert (s.leader, s.swaps) == ("slow", 1)
    for _ in range(3):
        s.record({"fast": 0.4, "slow": 0.5}, 3)
    assert (s.leader, s.swaps, s.leader_adapter) == ("fast", 2, "default")
    assert OFSState.from_dict(json.loads(json.dumps(s.as_dict()))) == s


def test_leader_swaps_when_its_running_loss_is_higher(data, tiny_tok, tmp_path):
    """Give the slow module a lower DPO loss (a few plain-DPO steps on it alone); with the fast module
    leading, the first check makes slow the leader, and it is the active adapter on return."""
    examples, cache = data
    model = make_model()
    ensure_slow_adapter(model)
    model.set_adapter("slow")
    for _ in range(3):
        hand_dpo_step(model, tiny_tok, examples, cache, list(range(N)), lr=1e-2)
    model.set_adapter("default")
    res = run(model, tiny_tok, examples, cache, tmp_path / "a", swap_every=1, batch_size=N, lr_fast=1e-6)
    row = res.history[0]
    assert row["loss/slow"] < row["loss/fast"]
    assert row["leader"] == 0 and row["swaps"] == 1
    assert (res.state.leader, res.state.swaps) == ("slow", 1)
    assert model.active_adapter == "slow"
    # Next iteration: both modules continue (slow is not re-copied from fast) and slow keeps the lead.
    slow_before = adapter_vector(model, "slow")
    assert not ensure_slow_adapter(model)
    assert torch.equal(adapter_vector(model, "slow"), slow_before)
    res2 = run(model, tiny_tok, examples, cache, tmp_path / "b", swap_every=1, batch_size=N, lr_fast=1e-6,
               state=res.state)
    assert res2.history[0]["leader"] == 1 and res2.state.swaps == 1 and res2.state.step == 2


def test_state_dict_round_trip(data, tiny_tok, tmp_path):
    examples, cache = data
    model = make_model()
    run(model, tiny_tok, examples, cache, tmp_path, epochs=2)
    sd = ofs_state_dict(model)
    assert {k.split(".", 1)[0] for k in sd} == {"fast", "slow"}
    fast = torch.cat([v.flatten() for k, v in sorted(sd.items()) if k.startswith("fast.")])
    slow = torch.cat([v.flatten() for k, v in sorted(sd.items()) if k.startswith("slow.")])
    assert not torch.equal(fast, slow)
    # into a fresh policy (only the 'default' adapter, as after a resume)
    fresh = make_model()
    load_ofs_state_dict(fresh, sd)
    got = ofs_state_dict(fresh)
    assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)
    # and back over changed weights
    randomise(model, seed=5)
    load_ofs_state_dict(model, sd)
    assert all(torch.equal(ofs_state_dict(model)[k], sd[k]) for k in sd)
    with pytest.raises(ValueError, match="no 'slow.' weights"):
        load_ofs_state_dict(fresh, {k: v for k, v in sd.items() if k.startswith("fast.")})


def test_bad_input(data, tiny_tok, tmp_path):
    examples, cache = data
    with pytest.raises(TypeError, match="PeftModel"):
        run(tiny_model(seed=0), tiny_tok, examples, cache, tmp_path)
    with pytest.raises(ValueError, match="reference cache holds"):
        run(make_model(), tiny_tok, examples[:4], cache, tmp_path)
    with pytest.raises(ValueError, match="swap_every=0"):
        run(make_model(), tiny_tok, examples, cache, tmp_path, swap_every=0)
