"""Curry-DPO from `preftune train` (train/curriculum.py): stage construction, the iterative run through the
CLI, the refreshed reference with LoRA, the sequential run's order, and the errors on unusable data."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

import preftune.train.curriculum as curriculum
from preftune.cli import app
from preftune.testing import write_scored_lists_jsonl
from preftune.train.config import TrainConfig
from preftune.train.outputs import read_metrics
from preftune.train.trainer import train

LN2 = math.log(2)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(model_dir, data, out, **kw) -> TrainConfig:
    base = dict(model=str(model_dir), data=str(data), output=str(out), loss="dpo", max_steps=2, batch_size=4,
                learning_rate=1e-3, warmup_ratio=0.0, progress=False, plot=False, curriculum="iterative")
    return TrainConfig(**{**base, **kw})


def _stage_rows(out):
    return [json.loads(x) for x in (out / "stages.jsonl").read_text().splitlines()]


def _curry(row):
    """Hand-built Curry-DPO pairs of a scored row: (best, worst), (best, second worst), ... as scores."""
    s = sorted(row["scores"], reverse=True)
    return [(s[0], lo) for lo in reversed(s[1:]) if s[0] > lo]


def test_stages_of_crafted_records_equal_hand_built_pairs(tmp_path):
    path = _jsonl(tmp_path / "lists.jsonl", [
        {"prompt": "p0", "responses": ["a", "b", "c", "d"], "scores": [0.2, 0.9, 0.5, 0.1]},
        {"prompt": "p1", "responses": ["e", "f", "g"], "ranking": [2, 0, 1]},  # g ≻ e ≻ f: scores 1, 0, 2
        {"prompt": "p2", "responses": ["h", "i", "j", "k"], "scores": [3, 3, 1, 0]},  # (h, i) tie: dropped
    ])
    cfg = TrainConfig(model="tiny", data=str(path), curriculum="iterative")
    stages = curriculum.build_stages(curriculum.load_ranked(str(path), cfg, tokenizer=None))
    got = [[(e.line, *e.responses) for e in st.examples] for st in stages]
    assert got == [
        [(1, "b", "d"), (2, "g", "f"), (3, "h", "k")],  # S1 = (R1, R_K)
        [(1, "b", "a"), (2, "g", "e"), (3, "h", "j")],  # S2 = (R1, R_{K-1})
        [(1, "b", "c")],  # S3: only p0 has a third non-tied pair
    ]
    assert [st.gaps for st in stages] == [pytest.approx([0.8, 2, 3]), pytest.approx([0.7, 1, 2]),
                                          pytest.approx([0.4])]


def test_cli_iterative_two_stages_writes_stage_metrics_and_model(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    data = write_scored_lists_jsonl(tmp_path / "lists.jsonl", n=8, k=3)
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["train", "--model", str(tiny_model_dir), "--data", str(data), "--loss", "dpo",
                                   "--max-steps", "2", "--batch-size", "4", "--learning-rate", "1e-3",
                                   "--output", str(out), "--set", "curriculum=iterative", "--set", "progress=false",
                                   "--set", "warmup_ratio=0", "--set", "plot=false"])
    assert res.exit_code == 0, res.output
    for s in (1, 2):
        metrics = read_metrics(out / f"stage_{s}" / "metrics.jsonl")
        assert [m["step"] for m in metrics] == [1, 2]
        # Each stage's reference is its initial model: before its first update every implicit reward is 0
        # and the DPO loss is log 2, in stage 2 too (with π_0 as reference stage 1's updates would show).
        assert metrics[0]["loss"] == pytest.approx(LN2, abs=1e-5)
        assert metrics[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    stages = _stage_rows(out)
    assert [(r["stage"], r["pairs"], r["steps"]) for r in stages] == [(1, 8, 2), (2, 8, 2)]
    for s, r in enumerate(stages):
        want = sum(w - lo for w, lo in (_curry(row)[s] for row in rows)) / len(rows)
        assert r["rating_gap_mean"] == pytest.approx(want)
        assert 0.0 <= r["initial_accuracy"] <= 1.0
    assert json.loads((out / "train_config.json").read_text())["curriculum"] == "iterative"
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(model.state_dict()[name], base.state_dict()[name])  # the trained model, not π_0


def _manual_logps(model, ex, adapters_off=False):
    """Per-token log-probs of each response by one plain forward of prompt + response (no engine)."""
    import contextlib

    out = []
    was = model.training
    model.eval()
    ctx = model.disable_adapter() if adapters_off else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        for r in ex.response_ids:
            ids = torch.tensor([ex.prompt_ids + r])
            lp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
            tok = lp[torch.arange(ids.shape[1] - 1), ids[0, 1:]]
            out.append(tok[len(ex.prompt_ids) - 1 :])
    model.train(was)
    return out


def test_lora_stage_two_reference_is_the_stage_one_model(tiny_model_dir, tmp_path, monkeypatch):
    data = write_scored_lists_jsonl(tmp_path / "lists.jsonl", n=4, k=3)
    calls = []
    real_train = curriculum.train

    def spy(cfg, **kw):
        model, examples = kw["model"], kw["train_examples"]
        peft = hasattr(model, "peft_config")
        calls.append({"model": model, "ref": kw["ref_cache"].token_logps,
                      "now": [_manual_logps(model, e) for e in examples],
                      "base": [_manual_logps(model, e, adapters_off=True) for e in examples] if peft else None})
        calls[-1]["result"] = real_train(cfg, **kw)
        return calls[-1]["result"]

    monkeypatch.setattr(curriculum, "train", spy)
    out = tmp_path / "out"
    train(_cfg(tiny_model_dir, data, out, lora=True, learning_rate=1e-2))
    assert len(calls) == 2
    assert calls[1]["model"] is calls[0]["result"].model  # stage 2 trains the stage-1 adapter on
    for c in calls:  # each stage's cached reference = its initial model's log-probs, computed directly
        for got, want in zip(c["ref"], c["now"], strict=True):
            for g, w in zip(got, want, strict=True):
                torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    # ... and in stage 2 that is not π_0 (the adapters off): stage 1 moved the model
    diff = max(float((n - b).abs().max()) for ns, bs in zip(calls[1]["now"], calls[1]["base"], strict=True)
               for n, b in zip(ns, bs, strict=True))
    assert diff > 1e-4
    sums = [[float(t.sum()) for t in per] for per in calls[1]["now"]]
    assert _stage_rows(out)[1]["initial_accuracy"] == pytest.approx(sum(c > r for c, r in sums) / len(sums))
    assert (out / "model" / "adapter_config.json").exists()


def test_sequential_trains_stage_one_then_stage_two_in_order(tiny_model_dir, tmp_path, monkeypatch):
    from preftune.train import loop

    data = write_scored_lists_jsonl(tmp_path / "lists.jsonl", n=4, k=3)
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    seen = []
    real_call = loop.PolicyForward.__call__

    def spy(self, runner, dataset, indices, grad):
        if grad:
            seen.extend((dataset.examples[i].line, tuple(dataset.examples[i].inputs["scores"])) for i in indices)
        return real_call(self, runner, dataset, indices, grad)

    monkeypatch.setattr(loop.PolicyForward, "__call__", spy)
    out = tmp_path / "out"
    result = train(_cfg(tiny_model_dir, data, out, curriculum="sequential", max_steps=None, batch_size=2))
    want = [(n, pytest.approx(_curry(row)[s])) for s in (0, 1) for n, row in enumerate(rows, start=1)]
    assert seen == want  # S1 of every prompt in data order, then S2: no shuffling, no length grouping
    assert result.steps == 4
    stages = _stage_rows(out)
    assert [(r["stage"], r["pairs"], r["first_step"], r["last_step"]) for r in stages] == [(1, 4, 1, 2), (2, 4, 3, 4)]
    assert [m["step"] for m in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert (out / "model" / "config.json").exists()


@pytest.mark.parametrize("case", ["pairs", "labels", "unpaired_loss", "resume"])
def test_unusable_input_is_a_clear_error(tiny_model_dir, tmp_path, case):
    args = ["--loss", "dpo"]
    if case == "pairs":
        data = _jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
        expect = ["d.jsonl:1", "responses", "at least 3", "scores or a ranking"]
    else:
        data = write_scored_lists_jsonl(tmp_path / "d.jsonl", n=2, k=3)
    if case == "labels":
        data = _jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "responses": ["a", "b"], "scores": [1, 0]},
                                              {"prompt": "q", "responses": ["a", "b", "c"],
                                               "labels": [True, False, False]}])
        expect = ["d.jsonl:1", "at least 3", "d.jsonl:2", "labels", "scores or a ranking"]
    elif case == "unpaired_loss":
        args = ["--loss", "kto"]
        expect = ["curriculum", "paired objective", "kto"]
    elif case == "resume":
        args = ["--loss", "dpo", "--resume"]
        expect = ["resume", "curriculum=iterative"]
    out = tmp_path / "never"
    res = CliRunner().invoke(app, ["train", "--model", str(tiny_model_dir), "--data", str(data), *args,
                                   "--output", str(out), "--set", "curriculum=iterative"])
    assert res.exit_code == 2, res.output
    for text in expect:
        assert text in res.output, (text, res.output)
    assert not out.exists()
