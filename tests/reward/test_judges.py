"""Judges: programmatic (task), reward model, LLM-as-judge (mechanics and exact symmetry), and
`preftune judge` writing comparisons that `preftune rank` reads."""

import json

import pytest
import torch

from preftune.reward.judges import FunctionJudge, LLMJudge, TaskJudge, Verdict, judge_file, make_judge


@pytest.fixture(scope="module")
def llm():
    from preftune.testing import tiny_model, tiny_tokenizer

    return LLMJudge(tiny_model("llama", seed=1), tiny_tokenizer(), batch_size=3)


def test_llm_judge_symmetry_and_mechanics(llm):
    prompts = ["Write a haiku about the sea.", "Which answer is better?"]
    a, b = ["The sea is calm.", "yes"], ["The quick brown fox jumps.", "no maybe"]
    v = llm.compare_many(prompts, a, b)
    w = llm.compare_many(prompts, b, a)
    for x, y in zip(v, w, strict=True):
        assert 0 < x.prob_a < 1
        assert x.prob_a + y.prob_a == pytest.approx(1.0, abs=1e-5)  # swapping a and b gives 1 − P
        assert x.details["p_ab"] == pytest.approx(1 - y.details["p_ba"], abs=1e-5)
    # p_ab is the next-token probability of "A" over {"A", "B"} after the judging prompt, computed unbatched.
    text = llm.render(prompts[0], a[0], b[0])
    ids, (ia, ib) = llm._encode(text)
    with torch.no_grad():
        logits = llm.model(input_ids=torch.tensor([ids])).logits[0, -1]
    expect = torch.softmax(logits[[ia, ib]], -1)[0].item()
    assert v[0].details["p_ab"] == pytest.approx(expect, abs=1e-5)
    assert llm.tokenizer.decode([ia]).strip() == "A" and llm.tokenizer.decode([ib]).strip() == "B"


def test_task_judge_and_verdicts():
    judge = make_judge("task:word_limit")
    assert isinstance(judge, TaskJudge) and judge.pointwise
    prompt = [{"role": "user", "content": "What is special about tea? Answer in at most 10 words."}]
    good, bad = "Tea is calming and has many flavours.", " ".join(["word"] * 30) + "."
    assert judge.score(prompt, [good, bad])[0] == 1.0
    assert judge.prefer(prompt, good, bad) == 1.0 and judge.prefer(prompt, bad, good) == 0.0
    assert judge.compare(prompt, good, good).winner() == "tie"
    soft = FunctionJudge(lambda p, r: len(r), temperature=10.0)
    assert 0.5 < soft.prefer("q", "long answer", "short") < 1
    assert Verdict(0.55).winner(tie_margin=0.1) == "tie"
    with pytest.raises(ValueError, match="unknown kind"):
        make_judge("oracle:x")


def test_judge_file_feeds_rank(tmp_path, llm):
    from preftune.rank.io import read_preferences

    src = tmp_path / "responses.jsonl"
    prompt = "What is special about tea? Answer in at most 10 words."
    rows = [
        {
            "prompt": prompt,
            "responses": {
                "short": "Tea is calming and warm.",
                "long": " ".join(["tea"] * 20),
                "empty": "Yes.",
            },
        },
        {
            "prompt": prompt,
            "a": "Tea is nice to drink.",
            "b": " ".join(["tea"] * 14),
            "model_a": "short",
            "model_b": "long",
        },
    ]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = judge_file(src, tmp_path / "cmp.jsonl", make_judge("task:word_limit"))
    assert len(out) == 4 and {r["judge"] for r in out} == {"task:word_limit"}
    assert [r["winner"] for r in out if {r["a"], r["b"]} == {"short", "long"}] == ["a", "a"]
    data = read_preferences(tmp_path / "cmp.jsonl", judge="task:word_limit")
    assert sorted(data.names) == ["empty", "long", "short"] and len(data.comparisons) == 4
    # A pairwise judge (LLM) through the same path.
    out = judge_file(src, tmp_path / "llm.jsonl", llm)
    assert all(r["winner"] in ("a", "b", "tie") and 0 < r["p_a"] < 1 for r in out)


def test_judge_file_reports_bad_rows(tmp_path):
    from preftune.data import DataError

    src = tmp_path / "bad.jsonl"
    src.write_text(
        '{"prompt": "q", "responses": {"only": "x"}}\n'
        '{"prompt": "q", "a": "x", "b": 3, "model_a": "m"}\nnot json\n'
    )
    with pytest.raises(DataError) as e:
        judge_file(src, tmp_path / "o.jsonl", make_judge("task:word_limit"))
    msg = str(e.value)
    assert "bad.jsonl:1: responses: needs at least 2" in msg
    assert "bad.jsonl:2: model_b: missing" in msg and "bad.jsonl:2: b: expected text" in msg
    assert "bad.jsonl:3: <line>: invalid JSON" in msg


def test_cli_reward_train_and_judge(tmp_path):
    from typer.testing import CliRunner

    from preftune.cli import app
    from preftune.testing import save_tiny_model, write_pairs_jsonl

    save_tiny_model(tmp_path / "tiny")
    pairs = write_pairs_jsonl(tmp_path / "pairs.jsonl", n=12)
    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "reward",
            "train",
            "--model",
            str(tmp_path / "tiny"),
            "--data",
            str(pairs),
            "--max-steps",
            "2",
            "-o",
            str(tmp_path / "rm"),
            "--set",
            "max_length=64",
            "--set",
            "max_prompt_length=32",
            "--set",
            "progress=false",
            "--set",
            "plot=false",
            "--set",
            "eval_fraction=0.25",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "held-out pairwise accuracy" in res.output
    bad = runner.invoke(
        app,
        [
            "reward",
            "train",
            "--model",
            str(tmp_path / "tiny"),
            "--data",
            str(pairs),
            "--set",
            "gpm_dim=3",
            "--loss",
            "rm_gpm",
        ],
    )
    assert bad.exit_code == 2 and "even" in bad.output
    src = tmp_path / "r.jsonl"
    src.write_text(json.dumps({"prompt": "Question 1: fox", "responses": {"x": "fox.", "y": "fox!"}}) + "\n")
    res = runner.invoke(
        app,
        ["judge", str(src), "--judge", f"rm:{tmp_path / 'rm' / 'model'}", "-o", str(tmp_path / "c.jsonl")],
    )
    assert res.exit_code == 0, res.output
    row = json.loads((tmp_path / "c.jsonl").read_text())
    assert row["a"] == "x" and row["b"] == "y" and row["winner"] in ("a", "b", "tie") and "score_a" in row
