"""`preftune reward train`: configs, data checks, BT / margin / regression training on a tiny model,
the saved folder (AutoModelForSequenceClassification), the score/prefer API, LoRA merge, resume."""

import json
from pathlib import Path

import pytest
import torch

from preftune.data import DataError
from preftune.reward import RewardConfig, load_preference_model, load_reward_config, train_reward

CONFIGS = sorted(Path(__file__).resolve().parents[2].glob("configs/reward_*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_reward_configs_parse(path):
    cfg = load_reward_config(path, {})
    assert cfg.loss.startswith("rm_")


def test_config_errors():
    with pytest.raises(ValueError, match="even"):
        RewardConfig(loss="rm_gpm", gpm_dim=3)
    with pytest.raises(ValueError):
        RewardConfig(loss="rm_gpm", center_rewards_coefficient=0.1)  # not a GPM hyperparameter
    with pytest.raises(ValueError, match="reward_attribute"):
        RewardConfig(loss="rm_regression", attributes=["a"], reward_attribute="b")
    with pytest.raises(ValueError):
        RewardConfig(lossy="rm_bt")
    assert RewardConfig(loss="rm_regression", attributes=["a", "b"]).num_labels == 2


def _cfg(tmp_path, **kw):
    base = dict(
        model=str(tmp_path / "tiny"),
        output=str(tmp_path / "out"),
        batch_size=4,
        max_steps=8,
        learning_rate=3e-3,
        max_length=64,
        max_prompt_length=32,
        progress=False,
        plot=False,
        eval_fraction=0.25,
    )
    return RewardConfig(**{**base, **kw})


@pytest.fixture()
def tiny(tmp_path):
    from preftune.testing import save_tiny_model, write_pairs_jsonl

    save_tiny_model(tmp_path / "tiny")
    return write_pairs_jsonl(tmp_path / "pairs.jsonl", n=24)


def test_bt_trains_saves_and_scores(tmp_path, tiny):
    from transformers import AutoModelForSequenceClassification

    result = train_reward(_cfg(tmp_path, data=str(tiny), max_steps=16, lora=True, learning_rate=1e-2))
    final = [m for m in result.metrics if "eval/rewards/accuracies" in m][-1]
    assert final["eval/rewards/accuracies"] >= 0.8  # chosen ends with ".", rejected with "!"
    # A plain seq-cls folder (LoRA merged), one output, pad id in the config, settings under preftune_reward.
    hf = AutoModelForSequenceClassification.from_pretrained(result.model_dir)
    assert hf.config.num_labels == 1 and hf.config.pad_token_id is not None
    assert hf.config.preftune_reward["kind"] == "bt"
    assert not (result.model_dir / "adapter_config.json").exists()
    rm = load_preference_model(result.model_dir)
    rows = [json.loads(x) for x in tiny.read_text().splitlines()[:4]]
    r = rm.score([x["prompt"] for x in rows] * 2, [x["chosen"] for x in rows] + [x["rejected"] for x in rows])
    # The saved model gives the in-memory model's rewards (same tokenisation and pooling as training).
    from preftune.reward.model import RewardModel

    live = RewardModel(result.model, rm.tokenizer, meta=rm.meta)
    assert torch.allclose(
        live.score([x["prompt"] for x in rows], [x["chosen"] for x in rows]), r[:4], atol=1e-4
    )
    p = rm.prefer(rows[0]["prompt"], rows[0]["chosen"], rows[0]["rejected"])
    assert p == pytest.approx(float(torch.sigmoid(r[0] - r[4])), abs=1e-5)
    assert rm.prefer(rows[0]["prompt"], rows[0]["rejected"], rows[0]["chosen"]) == pytest.approx(
        1 - p, abs=1e-5
    )


def test_resumed_run_equals_uninterrupted(tmp_path, tiny):
    full = train_reward(
        _cfg(tmp_path, data=str(tiny), output=str(tmp_path / "a"), max_steps=6, save_model=False)
    )
    part = _cfg(
        tmp_path, data=str(tiny), output=str(tmp_path / "b"), max_steps=6, save_steps=3, save_model=False
    )
    from preftune.reward.trainer import build_reward_runner

    runner = build_reward_runner(part)
    for _ in range(3):
        runner.train_step()
        runner.step += 1
    runner.save_checkpoint()
    resumed = train_reward(part.model_copy(update={"resume": True}))
    assert resumed.steps == 6
    a = {n: p for n, p in full.model.named_parameters()}
    for n, p in resumed.model.named_parameters():
        assert torch.allclose(p, a[n], atol=1e-6), n


def test_margin_column_required_and_used(tmp_path, tiny):
    with pytest.raises(DataError, match=r"pairs.jsonl:1: margin: missing"):
        train_reward(_cfg(tmp_path, data=str(tiny), loss="rm_bt_margin"))
    rows = [json.loads(x) | {"margin": 1.0} for x in tiny.read_text().splitlines()]
    path = tmp_path / "margin.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = train_reward(_cfg(tmp_path, data=str(path), loss="rm_bt_margin", max_steps=2, save_model=False))
    assert result.steps == 2


def test_regression_on_ratings_with_masked_attributes(tmp_path):
    from preftune.testing import save_tiny_model

    save_tiny_model(tmp_path / "tiny")
    rows = []
    for i in range(16):
        good = i % 2 == 0
        row = {
            "prompt": f"Question {i}: the fox",
            "response": "helpful answer." if good else "no!",
            "helpfulness": 4 if good else 0,
        }
        if i % 4:  # a quarter of the rows lack the second rating: that head is masked there
            row["verbosity"] = 1 if good else 3
        rows.append(row)
    path = tmp_path / "rated.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _cfg(
        tmp_path,
        data=str(path),
        loss="rm_regression",
        attributes=["helpfulness", "verbosity"],
        max_steps=30,
        learning_rate=1e-2,
    )
    result = train_reward(cfg)
    final = [m for m in result.metrics if "eval/loss" in m][-1]
    first = result.metrics[0]["loss"]
    assert final["eval/loss"] < first
    rm = load_preference_model(result.model_dir)
    assert rm.kind == "regression" and list(rm.model.config.id2label.values()) == ["helpfulness", "verbosity"]
    s = rm.attribute_scores("Question 99: the fox", ["helpful answer.", "no!"])
    assert s["helpfulness"][0] > s["helpfulness"][1]
    assert rm.prefer("Question 99: the fox", "helpful answer.", "no!") > 0.5

    # A missing attribute everywhere is a clear error naming the columns found.
    with pytest.raises(DataError, match="attribute not found"):
        train_reward(_cfg(tmp_path, data=str(path), loss="rm_regression", attributes=["correctness"]))
    # HelpSteer2-Preference stage 2: BT starting from the regression model's helpfulness head.
    stage2 = _cfg(tmp_path, model=str(result.model_dir), data=None, loss="rm_bt", output=str(tmp_path / "s2"))
    from preftune.reward.model import build_reward_model

    m = build_reward_model(stage2, rm.tokenizer)
    assert m.config.num_labels == 1
    assert torch.allclose(m.score.weight[0], rm.model.score.weight[0].cpu())
