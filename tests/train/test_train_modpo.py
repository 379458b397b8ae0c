"""`preftune train --loss modpo` on a tiny Llama, 2 steps: margins from the data, from a reward model and from
another policy's implicit DPO reward (METHODS.md §M1). At step 1 the policy is the reference (ρ = 0), so
the loss is known in closed form from the margins: mean softplus((w_1/w_0)·(m(y_w) − m(y_l)))."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from preftune.cli import app
from preftune.testing import save_tiny_model, write_pairs_jsonl

W = [0.5, 0.5]
N = 8


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import LlamaForSequenceClassification

    from preftune.model.tiny import tiny_config, tiny_tokenizer

    root = tmp_path_factory.mktemp("modpo")
    tok = tiny_tokenizer()
    torch.manual_seed(5)
    cfg = tiny_config(vocab_size=len(tok))
    cfg.num_labels, cfg.pad_token_id = 1, tok.pad_token_id
    LlamaForSequenceClassification(cfg).save_pretrained(root / "rm")
    tok.save_pretrained(root / "rm")
    return {"policy": save_tiny_model(root / "policy", seed=0), "other": save_tiny_model(root / "other", seed=1),
            "rm": root / "rm", "root": root}


def _train(models, data, out, *extra):
    args = ["train", "--model", str(models["policy"]), "--data", str(data), "--loss", "modpo", "--max-steps", "2",
            "--output", str(out), "--batch-size", str(N)]
    for kv in ("progress=false", "plot=false", "save_model=false", "max_length=64", "max_prompt_length=32",
               "learning_rate=1e-3", "warmup_ratio=0", "dynamics=false", f"ref_cache_dir={out}-cache/ref",
               f"loss_params.w={json.dumps(W)}", *extra):
        args += ["--set", kv]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    return rows, res.output


def _expected(margin_pairs):
    k = W[1] / W[0]
    return sum(math.log1p(math.exp(k * (mw - ml))) for mw, ml in margin_pairs) / len(margin_pairs)


def test_explicit_margin_rewards(models, tmp_path):
    import random

    rng = random.Random(0)
    rows = [json.loads(x) for x in write_pairs_jsonl(tmp_path / "p.jsonl", n=N).read_text().splitlines()]
    for r in rows:
        r["margin_rewards"] = [[rng.uniform(-1, 1)], [rng.uniform(-1, 1)]]
        r["objective_names"] = ["other"]
    data = tmp_path / "m.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got, _ = _train(models, data, tmp_path / "out")
    want = _expected([(r["margin_rewards"][0][0], r["margin_rewards"][1][0]) for r in rows])
    assert got[0]["loss"] == pytest.approx(want, abs=1e-4)
    assert got[0]["loss"] != pytest.approx(math.log(2), abs=1e-3)  # the margins moved it away from DPO's log 2


def test_margins_from_a_reward_model_are_scored_once_and_cached(models, tmp_path):
    from preftune.reward.model import load_preference_model

    data = write_pairs_jsonl(tmp_path / "p.jsonl", n=N)
    out = tmp_path / "out"
    got, log = _train(models, data, out, f"margin_models=[{models['rm']}]")
    assert "margin rewards: rm:rm (reward model) on 8 examples" in log
    rm = load_preference_model(models["rm"])
    pairs = [json.loads(x) for x in data.read_text().splitlines()]
    r = [rm.score(p["prompt"], [p["chosen"], p["rejected"]]).tolist() for p in pairs]
    assert got[0]["loss"] == pytest.approx(_expected(r), abs=1e-4)
    cached = list((tmp_path / "out-cache" / "margins").glob("*.json"))
    flat = [x for row in json.loads(cached[0].read_text()) for x in row]
    assert len(cached) == 1 and flat == pytest.approx([x for row in r for x in row], abs=1e-6)
    config = json.loads((out / "train_config.json").read_text())
    assert config["margin_models"] == [str(models["rm"])]
    again, log = _train(models, data, tmp_path / "out", f"margin_models=[{models['rm']}]", "resume=false",
                        f"ref_cache_dir={out}-cache/ref", f"output={tmp_path / 'out2'}")
    assert "margin rewards: rm:rm cache hit" in log
    assert again[0]["loss"] == pytest.approx(got[0]["loss"], abs=1e-6)


def test_margins_from_another_policys_implicit_reward(models, tmp_path):
    from preftune.data import load_records, to_pairs, tokenize_examples
    from preftune.model import load_model
    from preftune.model.scoring import response_token_logps

    data = write_pairs_jsonl(tmp_path / "p.jsonl", n=N)
    got, log = _train(models, data, tmp_path / "out", f"margin_models=[{models['other']}]", "margin_beta=0.5")
    assert "implicit reward, β=0.5" in log
    other, tok = load_model(models["other"])
    ref, _ = load_model(models["policy"])
    toks = tokenize_examples(to_pairs(load_records(data)), tok, max_length=64, max_prompt_length=32)
    prompts, responses = [t.prompt_ids for t in toks], [t.response_ids for t in toks]
    lo, lr = (response_token_logps(m, prompts, responses, tok.pad_token_id) for m in (other, ref))
    r = [[0.5 * float(a.sum() - b.sum()) for a, b in zip(x, y, strict=True)] for x, y in zip(lo, lr, strict=True)]
    assert got[0]["loss"] == pytest.approx(_expected(r), abs=1e-4)


def test_weights_must_match_the_margin_columns_before_anything_is_written(models, tmp_path):
    data = write_pairs_jsonl(tmp_path / "p.jsonl", n=N)
    out = tmp_path / "never"
    args = ["train", "--model", str(models["policy"]), "--data", str(data), "--loss", "modpo", "--output", str(out),
            "--set", f"margin_models=[{models['rm']}]", "--set", "loss_params.w=[0.5,0.3,0.2]",
            "--set", f"ref_cache_dir={tmp_path}/c/ref", "--set", "progress=false"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    assert "w has 3 weight(s) but the data carries 1 margin reward column(s)" in res.output
    assert not out.exists()
