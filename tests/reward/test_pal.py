"""PAL (METHODS.md §M11): golden values, float64 parity of rewards/losses/gradients with an explicit
reimplementation, the un-back-propagated prototype bound, few-shot adaptation of a new user, the saved model
as a judge, CLI runs and data errors, and PAL beating BT on two groups who disagree."""

import contextlib
import json
import math
from types import SimpleNamespace

import pytest
import torch

from preftune.data import DataError
from preftune.reward import pal
from preftune.reward.config import RewardConfig

# ------------------------------------------------------------------------------------------ golden (§M11(d))


def test_golden_pal_b():
    w = pal.user_weights(torch.tensor([0.5, -0.5], dtype=torch.float64))
    assert w.tolist() == pytest.approx([0.731059, 0.268941], abs=1e-6)
    g = torch.eye(2, dtype=torch.float64)[None]  # g_1 = (1, 0), g_2 = (0, 1)
    a = pal.pal_b_ideal_point(w[None], g)[0]
    assert a.tolist() == pytest.approx(w.tolist(), abs=1e-12)
    c = pal.logit_scale(torch.tensor(math.log(1 / 0.07), dtype=torch.float64))
    assert float(c) == pytest.approx(14.285714, abs=1e-5)
    e = torch.tensor([[0.9, 0.1], [0.2, 0.8]], dtype=torch.float64)
    r = pal.pal_b_rewards(e, a, c)
    assert r.tolist() == pytest.approx([13.869930, 8.036726], abs=1e-5)
    assert float(pal.pal_b_loss(r[0], r[1], -1.0)) == pytest.approx(0.002924, abs=1e-5)  # a (first) preferred
    assert float(pal.pal_b_loss(r[1], r[0], +1.0)) == pytest.approx(0.002924, abs=1e-5)  # a second, t = +1


def test_golden_position_weighting():
    losses = torch.tensor([[0.9, 0.6, 0.3, 7.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False]])  # the 4th position is padding
    assert float(pal.aggregate_positions(losses, mask, "cumulative")) == pytest.approx(0.5, abs=1e-12)
    assert float(pal.aggregate_positions(losses, mask, "mean")) == pytest.approx(0.6, abs=1e-12)
    assert float(pal.aggregate_positions(losses, mask, "only_last")) == pytest.approx(0.3, abs=1e-12)


def test_golden_pal_a():
    a = torch.tensor([0.0, 1.0], dtype=torch.float64)
    d1 = -pal.pal_a_rewards(torch.tensor([1.0, 1.0], dtype=torch.float64), a)
    d2 = -pal.pal_a_rewards(torch.tensor([0.0, 0.5], dtype=torch.float64), a)
    assert float(d1 - d2) == pytest.approx(0.5, abs=1e-12)
    assert float(pal.pal_a_loss(d1, d2, 1.0)) == pytest.approx(0.5, abs=1e-12)
    assert float(pal.pal_a_loss(d1, d2, -1.0)) == pytest.approx(1.5, abs=1e-12)


def test_golden_bound():
    p = torch.tensor([[3.0, 4.0], [0.0, 1.0]], dtype=torch.float64)  # norms 5 and 1
    assert float(pal.prototype_bound(p, 4.0, 1.0)) == pytest.approx(1.0)
    assert float(pal.prototype_bound(p, 0.5, 2.0)) == pytest.approx(2 * (4.5 + 0.5))


# ------------------------------------------------------------------------------------------ parity


def _explicit(kind, heads, items, prompt_h, user_logits, mask, weighting):
    """PAL's rewards and per-pair loss written out with elementary float64 ops (no F.normalize, softmax,
    softplus, vector_norm), for (chosen, rejected) pairs, t = −1."""
    ex = torch.exp(user_logits - user_logits.max(-1, keepdim=True).values)
    w = ex / ex.sum(-1, keepdim=True)  # (B, K)

    def mlp(seq, x):
        h = x @ seq[0].weight.T + seq[0].bias
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
        return h @ seq[2].weight.T + seq[2].bias

    e = mlp(heads.f, items)  # (B, 2, P, d)
    if kind == "pal_b":
        g = torch.stack([mlp(gk, prompt_h) for gk in heads.g], 1)  # (B, K, d)
        a = (w[:, :, None] * g).sum(1)
        a = a[:, None, None, :]
        cos = (e * a).sum(-1) / (torch.sqrt((e * e).sum(-1)) * torch.sqrt((a * a).sum(-1)))
        c = torch.minimum(torch.exp(heads.logit_scale), torch.tensor(100.0, dtype=torch.float64))
        r = c * cos
        per = torch.log(1 + torch.exp(r[:, 1] - r[:, 0]))
    else:
        a = mlp(heads.f, w @ heads.prototypes)[:, None, None, :]
        r = -torch.sqrt(((e - a) ** 2).sum(-1))
        per = torch.clamp(1 + (-r[:, 0]) - (-r[:, 1]), min=0)
    m = mask.to(torch.float64)
    n = m.sum(-1, keepdim=True)
    i = torch.cumsum(m, -1) - 1
    wts = {"cumulative": (i + 1) / (n * (n + 1) / 2), "mean": 1 / n + 0 * i,
           "only_last": (i == n - 1).to(torch.float64)}[weighting] * m
    return r, (per * wts).sum(-1)


@pytest.mark.parametrize("kind", ["pal_a", "pal_b"])
@pytest.mark.parametrize("weighting", ["cumulative", "mean", "only_last"])
def test_parity_float64_with_gradients(kind, weighting):
    torch.manual_seed(3)
    b, p, hid, d, k, users = 3, 4, 6, 5, 3, 4
    heads = pal.PALHeads(kind, hid, d, k, users).double()
    items = torch.randn(b, 2, p, hid, dtype=torch.float64, requires_grad=True)
    prompt_h = torch.randn(b, hid, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    uidx = torch.tensor([2, 0, 2])

    # Library path: PALHeads + pal_losses (what PALForward runs after the backbone).
    w = heads.weights(uidx)
    ideal, _ = heads.ideal(w, prompt_h)
    r = heads.rewards(heads.f(items), ideal)
    loss = pal.pal_losses(kind, r, mask, weighting)
    params = [items, prompt_h, *heads.parameters()]
    grads = torch.autograd.grad(loss.sum(), params, allow_unused=True)

    r2, loss2 = _explicit(kind, heads, items, prompt_h, heads.user_logits[uidx], mask, weighting)
    grads2 = torch.autograd.grad(loss2.sum(), params, allow_unused=True)
    assert torch.allclose(r, r2, atol=1e-10) and torch.allclose(loss, loss2, atol=1e-10)
    for g1, g2 in zip(grads, grads2, strict=True):
        assert (g1 is None) == (g2 is None)
        if g1 is not None:
            assert torch.allclose(g1, g2, atol=1e-9)
    # Only the users in the batch get gradient on W.
    gw = grads[2 + [n for n, _ in heads.named_parameters()].index("user_logits")]
    assert torch.count_nonzero(gw[[1, 3]]) == 0 and torch.count_nonzero(gw[[0, 2]]) > 0


# ------------------------------------------------------------------------------------------ tiny model helpers


def _cfg(tmp_path, data, **kw):
    base = dict(model=str(tmp_path / "tiny"), data=str(data), output=str(tmp_path / f"out-{kw.get('loss', 'x')}"),
                batch_size=8, max_steps=2, learning_rate=3e-4, max_length=96, max_prompt_length=48,
                progress=False, plot=False, eval_fraction=0.0, pal_head_lr=3e-3, pal_user_lr=5e-2, seed=0)
    return RewardConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def groups(tmp_path_factory):
    from preftune.reward.synthetic import two_group_pairs, write_jsonl
    from preftune.testing import save_tiny_model

    d = tmp_path_factory.mktemp("pal")
    save_tiny_model(d / "tiny")
    write_jsonl(d / "train.jsonl", two_group_pairs(16, 2, kind="keyword"))
    write_jsonl(d / "test.jsonl", two_group_pairs(8, 2, kind="keyword", heldout=True))
    write_jsonl(d / "new_user.jsonl", two_group_pairs(6, kind="keyword", new_user="newB"))
    write_jsonl(d / "new_user_test.jsonl", two_group_pairs(8, kind="keyword", heldout=True, new_user="newB"))
    return d


@pytest.fixture(scope="module")
def trained(groups):
    """PAL-B and BT trained 40 steps each on the keyword groups (seed 0), evaluated on held-out prompts."""
    from preftune.reward import train_reward

    out = {}
    for loss in ("pal_b", "rm_bt"):
        cfg = _cfg(groups, groups / "train.jsonl", loss=loss, max_steps=40, eval_data=str(groups / "test.jsonl"),
                   output=str(groups / f"run-{loss}"), loss_params={"position_weighting": "only_last"}
                   if loss == "pal_b" else {})
        out[loss] = train_reward(cfg)
    return out


def _eval_acc(result) -> float:
    return [m for m in result.metrics if "eval/rewards/accuracies" in m][-1]["eval/rewards/accuracies"]


def test_pal_beats_bt_on_disagreement_pairs(trained):
    # Every held-out pair is labelled both ways (group A and group B users): a single reward gets 1/2.
    bt, pb = _eval_acc(trained["rm_bt"]), _eval_acc(trained["pal_b"])
    assert bt == pytest.approx(0.5, abs=0.1)
    assert pb >= 0.9 and pb > bt + 0.3


def test_saved_pal_model_scores_per_user_and_judges(trained, groups):
    from preftune.reward import load_preference_model, make_judge

    model_dir = trained["pal_b"].model_dir
    files = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "pal_heads.safetensors", "pal_users.json"} <= files
    assert json.loads((model_dir / "pal_users.json").read_text())["users"] == ["A0", "A1", "B0", "B1"]
    prompt = "Describe tea."
    with_kw, plain = "Tea are old in daily life. Hope this helps, friend!", "Tea are old in daily life."
    a = load_preference_model(model_dir, user_id="A0")
    assert a.prefer(prompt, with_kw, plain) > 0.5
    assert a.prefer(prompt, plain, with_kw) == pytest.approx(1 - a.prefer(prompt, with_kw, plain), abs=1e-6)
    judge_b = make_judge(f"rm:{model_dir}?user_id=B1")
    assert judge_b.prefer(prompt, with_kw, plain) < 0.5
    # The in-memory model and the saved one score alike.
    live = pal.PALRewardModel(trained["pal_b"].model, a.tokenizer, user_id="A0")
    assert torch.allclose(live.score(prompt, [with_kw, plain]), a.score(prompt, [with_kw, plain]), atol=1e-5)
    with pytest.raises(KeyError, match="unknown user_id 'zed'"):
        load_preference_model(model_dir, user_id="zed")


def test_bound_is_logged_not_backpropagated(groups):
    from preftune.model import load_tokenizer
    from preftune.reward.data import prepare

    def grads(bound, in_loss):
        cfg = _cfg(groups, groups / "train.jsonl", loss="pal_a",
                   loss_params={"bound": bound, "bound_in_loss": in_loss, "position_weighting": "mean"})
        tok = load_tokenizer(cfg.model)
        users: list[str] = []
        train_set, _ = prepare(cfg, tok, users=users, log=lambda *a: None)
        model = pal.build_pal_model(cfg, tok, users)
        fwd = pal.PALForward(cfg, model)
        runner = SimpleNamespace(acc=SimpleNamespace(device=torch.device("cpu"), autocast=contextlib.nullcontext),
                                 engine=fwd.engine)
        out = fwd(runner, train_set, list(range(8)), grad=True).result
        out.losses.sum().backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    active, g_active = grads(0.0, False)  # every prototype is over a bound of 0
    off, g_off = grads(1e9, False)
    assert float(active.metrics["prototype_bound"]) > 0 and float(off.metrics["prototype_bound"]) == 0
    assert not active.metrics["prototype_bound"].requires_grad
    assert g_active.keys() == g_off.keys()
    for n in g_active:
        assert torch.equal(g_active[n], g_off[n]), n
    _, g_in = grads(0.0, True)
    assert not torch.equal(g_in["heads.prototypes"], g_active["heads.prototypes"])


def test_few_shot_adaptation_changes_only_the_new_user(trained, groups):
    from preftune.reward import load_preference_model
    from preftune.reward.synthetic import two_group_pairs

    rm = load_preference_model(trained["pal_b"].model_dir)
    before = {k: v.clone() for k, v in rm.model.state_dict().items()}
    pairs = [(r["prompt"], r["chosen"], r["rejected"]) for r in two_group_pairs(6, kind="keyword", new_user="newB")]
    test = [(r["prompt"], r["chosen"], r["rejected"])
            for r in two_group_pairs(8, kind="keyword", heldout=True, new_user="newB")]
    res = pal.adapt_user(rm, "newB", pairs, epochs=20, learning_rate=0.2, seed=1)
    after = rm.model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        if k == "heads.user_logits":
            assert torch.equal(after[k][:-1], v) and after[k].shape[0] == v.shape[0] + 1
        else:
            assert torch.equal(after[k], v), k
    assert rm.model.users[-1] == "newB" and res.losses[-1] < res.losses[0]
    held = lambda uid: float((rm.prefer_batch(*zip(*test), user_id=uid) > 0.5).float().mean())  # noqa: E731
    # The population mean (no user) sits between the groups; the fitted user prefers as group B does.
    assert held("newB") >= 0.9 and held("newB") > held("A0") + 0.5
    assert res.accuracy_after >= 0.9
    with pytest.raises(ValueError, match="already in the model"):
        pal.adapt_user(rm, "newB", pairs)


# ------------------------------------------------------------------------------------------ CLI and data


def _cli(args):
    from typer.testing import CliRunner

    from preftune.cli import app

    return CliRunner().invoke(app, args)


@pytest.mark.parametrize("loss", ["pal_a", "pal_b"])
def test_cli_two_steps_then_adapt_and_judge(groups, tmp_path, loss):
    out = tmp_path / loss
    res = _cli(["reward", "train", "--model", str(groups / "tiny"), "--data", str(groups / "train.jsonl"),
                "--loss", loss, "--max-steps", "2", "-o", str(out), "--set", "max_length=96", "--set",
                "max_prompt_length=48", "--set", "progress=false", "--set", "plot=false", "--set",
                "eval_fraction=0.25"])
    assert res.exit_code == 0, res.output
    assert "held-out pairwise accuracy" in res.output
    assert json.loads((out / "reward_config.json").read_text())["loss"] == f"rm_{loss}"
    res = _cli(["reward", "adapt", str(out / "model"), "--data", str(groups / "new_user.jsonl"), "--epochs", "2",
                "-o", str(tmp_path / "adapted")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "adapted" / "pal_users.json").read_text())["users"][-1] == "newB"
    src = tmp_path / "responses.jsonl"
    src.write_text(json.dumps({"prompt": "Describe tea.", "a": "Tea is old.", "b": "Tea is old. Hope this helps, "
                               "friend!", "model_a": "x", "model_b": "y"}) + "\n")
    res = _cli(["judge", str(src), "--judge", f"rm:{tmp_path / 'adapted'}?user_id=newB", "-o",
                str(tmp_path / "cmp.jsonl")])
    assert res.exit_code == 0, res.output
    row = json.loads((tmp_path / "cmp.jsonl").read_text())
    assert row["judge"].endswith("?user_id=newB") and 0 <= row["p_a"] <= 1


def test_data_errors_name_file_line_and_field(groups, tmp_path):
    from preftune.reward import train_reward

    rows = [json.loads(x) for x in (groups / "train.jsonl").read_text().splitlines()[:4]]
    del rows[1]["user_id"]
    rows[2]["user_id"] = ""
    rows[3]["user_id"] = ["A0"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as e:
        train_reward(_cfg(groups, bad, loss="pal_a", output=str(tmp_path / "o")))
    msg = str(e.value)
    assert "bad.jsonl:3: user_id: expected a non-empty string or an integer id, got ''" in msg
    assert "bad.jsonl:4: user_id: expected a non-empty string or an integer id, got ['A0']" in msg
    rows[2]["user_id"], rows[3]["user_id"] = "A0", "A0"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"bad.jsonl:2: user_id: missing: PAL needs"):
        train_reward(_cfg(groups, bad, loss="pal_a", output=str(tmp_path / "o")))
    # Eval users must be users of the training data.
    ev = tmp_path / "ev.jsonl"
    ev.write_text(json.dumps({**rows[0], "user_id": "stranger"}) + "\n")
    with pytest.raises(DataError, match=r"ev.jsonl:1: user_id: 'stranger' is not a user of the training data"):
        train_reward(_cfg(groups, groups / "train.jsonl", loss="pal_a", eval_data=str(ev),
                          output=str(tmp_path / "o")))


def test_configs_parse():
    from pathlib import Path

    from preftune.reward.config import load_reward_config

    root = Path(__file__).resolve().parents[2] / "configs"
    assert load_reward_config(root / "reward_pal_a.yaml", {}).loss == "rm_pal_a"
    assert load_reward_config(root / "reward_pal_b.yaml", {}).kind == "pal_b"
