"""CARM (METHODS.md §M12): golden values, the context-blind property, the rendered prompt, eval/context_acc and
eval/context_free_acc in the trainer's eval metrics, the context-aware judge, CLI run and data errors."""

import json

import pytest
import torch

from preftune.data import DataError
from preftune.losses import PolicyStats
from preftune.reward import carm
from preftune.reward.config import RewardConfig


def test_golden_values():
    # r(x,z1,a) = 1.3, r(x,z1,b) = 0.2, r(x,z2,a) = −0.4, r(x,z2,b) = 0.9; pairs [[0,1],[1,0]] under z1, z2.
    r = torch.tensor([[1.3, 0.2], [0.9, -0.4]], dtype=torch.float64)  # (winner, loser) per item
    out = RewardConfig(loss="carm").objective().fn(PolicyStats(r, torch.zeros_like(r)), None)
    assert out.losses.tolist() == pytest.approx([0.287335, 0.241008], abs=1e-6)
    assert float(out.losses.mean()) == pytest.approx(0.264172, abs=1e-6)
    m = (r[:, 0] - r[:, 1]).tolist()
    res = carm.context_accuracy(m, ["row", "row"])
    assert res["context_acc"] == 1.0 and res["context_consistency"] == 1.0


def test_context_blind_scorer_gets_half():
    # A scorer that ignores z gives a and b the same rewards under both contexts: the reversed items disagree.
    blind = {"a": 0.7, "b": -0.1}
    margins = [blind["a"] - blind["b"], blind["b"] - blind["a"]]  # z1: a ≻ b; z2: b ≻ a
    res = carm.context_accuracy(margins, [0, 0], free_margins=margins)
    assert res["context_acc"] == 0.5 and res["context_consistency"] == 0.0 and res["context_free_acc"] == 0.5
    assert carm.context_accuracy([0.0, 0.0], [0, 0])["context_acc"] == 0.5  # ties count ½


def test_render_context():
    t = carm.DEFAULT_TEMPLATE
    assert carm.render_context("Q?", "brevity", t) == "Evaluate the response according to: brevity\n\nQ?"
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q?"}]
    out = carm.render_context(chat, "brevity", "Context: {context}")
    assert out[1]["content"] == "Context: brevity\n\nQ?" and chat[1]["content"] == "Q?"  # a copy
    assert carm.render_context("Q?", None, t) == "Q?"
    with pytest.raises(ValueError, match="context_template"):
        RewardConfig(loss="carm", context_template="no placeholder")


@pytest.fixture(scope="module")
def groups(tmp_path_factory):
    from preftune.reward.synthetic import two_group_pairs, write_jsonl
    from preftune.testing import save_tiny_model

    d = tmp_path_factory.mktemp("carm")
    save_tiny_model(d / "tiny")
    write_jsonl(d / "train.jsonl", two_group_pairs(16, 2, kind="keyword"))
    write_jsonl(d / "test.jsonl", two_group_pairs(8, 2, kind="keyword", heldout=True))
    return d


def _cfg(d, **kw):
    base = dict(model=str(d / "tiny"), data=str(d / "train.jsonl"), eval_data=str(d / "test.jsonl"), loss="carm",
                output=str(d / "out"), batch_size=8, max_steps=60, learning_rate=3e-3, max_length=128,
                max_prompt_length=64, progress=False, plot=False)
    return RewardConfig(**{**base, **kw})


def test_context_metrics_and_judge(groups):
    from preftune.reward import load_preference_model, make_judge, train_reward

    result = train_reward(_cfg(groups))
    final = [m for m in result.metrics if "eval/context_acc" in m][-1]
    # The group is the context: with it every held-out pair is ordered right; without it the same pairs,
    # labelled both ways by the two groups, give a single ordering: ½.
    assert final["eval/context_acc"] >= 0.9
    assert final["eval/context_free_acc"] == pytest.approx(0.5, abs=0.1)
    assert final["eval/context_acc"] == pytest.approx(final["eval/rewards/accuracies"])
    rm = load_preference_model(result.model_dir)
    assert rm.meta["context_template"] == carm.DEFAULT_TEMPLATE
    row = json.loads((groups / "test.jsonl").read_text().splitlines()[0])  # a group-A row: chosen has the sign-off
    prompt, kw, plain = row["prompt"], row["chosen"], row["rejected"]
    a = make_judge(f"rm:{result.model_dir}?context=user group A")
    b = make_judge(f"rm:{result.model_dir}?context=user group B")
    assert a.prefer(prompt, kw, plain) > 0.5 > b.prefer(prompt, kw, plain)
    with pytest.raises(ValueError, match="unknown option"):
        make_judge(f"rm:{result.model_dir}?persona=x")


def test_cli_two_steps_and_data_errors(groups, tmp_path):
    from typer.testing import CliRunner

    from preftune.cli import app
    from preftune.reward import train_reward

    res = CliRunner().invoke(app, [
        "reward", "train", "--model", str(groups / "tiny"), "--data", str(groups / "train.jsonl"), "--loss", "carm",
        "--max-steps", "2", "-o", str(tmp_path / "o"), "--set", "max_length=96", "--set", "max_prompt_length=48",
        "--set", "progress=false", "--set", "plot=false", "--set", "eval_fraction=0.25"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in (groups / "train.jsonl").read_text().splitlines()[:3]]
    rows[0]["pair_contexts"] = ["a", "b"]
    rows[1]["pair_contexts"] = "user group A"
    rows[2]["pair_contexts"] = [" "]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as e:
        train_reward(_cfg(groups, data=str(bad), eval_data=None, output=str(tmp_path / "x")))
    msg = str(e.value)
    assert "bad.jsonl:1: pair_contexts: has 2 contexts for 1 pair(s)" in msg
    assert "bad.jsonl:2: pair_contexts: expected a list with one context string per pair, got str" in msg
    assert "bad.jsonl:3: pair_contexts[0]: expected a non-empty string, got ' '" in msg
    lst = tmp_path / "list.jsonl"
    lst.write_text(json.dumps({"prompt": "Q", "responses": ["a", "b", "c"], "scores": [1, 2, 3],
                               "pair_contexts": ["z"]}) + "\n")
    with pytest.raises(DataError, match=r"list.jsonl:1: pair_contexts: needs explicit pairs"):
        train_reward(_cfg(groups, data=str(lst), eval_data=None, output=str(tmp_path / "y")))
