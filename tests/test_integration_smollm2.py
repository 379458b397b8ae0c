"""The real model: two training steps on SmolLM2-135M-Instruct through the command line."""

import json

import pytest
from typer.testing import CliRunner

from preftune.cli import app
from preftune.train.outputs import read_metrics

pytestmark = pytest.mark.integration


def test_two_lora_dpo_steps_on_smollm2(tmp_path):
    data = tmp_path / "pairs.jsonl"
    rows = [
        {
            "prompt": [{"role": "user", "content": "Name a primary colour. Answer in one word."}],
            "chosen": [{"role": "assistant", "content": "Red."}],
            "rejected": [{"role": "assistant", "content": "A primary colour is a colour that cannot be mixed."}],
        },
        {
            "prompt": [{"role": "user", "content": "What is 2 + 3? Answer with a number."}],
            "chosen": [{"role": "assistant", "content": "5"}],
            "rejected": [{"role": "assistant", "content": "The sum of two and three is five, which is odd."}],
        },
    ] * 2
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    res = CliRunner().invoke(
        app,
        [
            "train",
            "--model",
            "smollm2-135m-instruct",
            "--data",
            str(data),
            "--loss",
            "dpo",
            "--max-steps",
            "2",
            "--output",
            str(out),
            "--lora",
            "--set",
            "batch_size=2",
            "--set",
            "learning_rate=1e-4",
            "--set",
            "progress=false",
            "--set",
            f"ref_cache_dir={tmp_path / 'rc'}",
            "--set",
            "max_length=128",
            "--set",
            "max_prompt_length=64",
        ],
    )
    assert res.exit_code == 0, res.output
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["loss"] == pytest.approx(0.693147, abs=1e-4)  # the adapter starts as a no-op
    # chat-templated responses of a real tokenizer: a handful of tokens each, all negative log-probs
    assert rows[0]["logps/chosen"] < 0 and rows[0]["logps/rejected"] < rows[0]["logps/chosen"]
    assert (out / "model" / "adapter_config.json").exists()
