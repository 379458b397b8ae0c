"""`preftune inspect`: the length-bias statistic, the duplicate finder and the truncation counts on
constructed data (hand-computed values), the reward-margin path on a tiny reward model, and the
command end to end."""

import json
import math
import random

import pytest
import torch
from typer.testing import CliRunner

from preftune.cli import app
from preftune.data.inspect import (
    InspectConfig,
    duplicate_report,
    inspect_data,
    jaccard,
    length_bias,
    load_pairs,
    near_duplicates,
    normalise,
    reward_report,
    shingles,
)


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_defaults_are_trains():
    from preftune.data import inspect as mod
    from preftune.train.config import TrainConfig

    f = TrainConfig.model_fields
    assert mod.TRAIN_DEFAULT_MODEL == f["model"].default
    assert mod.TRAIN_MAX_LENGTH == f["max_length"].default
    assert mod.TRAIN_MAX_PROMPT_LENGTH == f["max_prompt_length"].default
    assert InspectConfig(data="x").tokenizer_spec() == f["model"].default
    assert InspectConfig(data="x", model="m").tokenizer_spec() == "m"
    assert InspectConfig(data="x", tokenizer="none").tokenizer_spec() is None
    with pytest.raises(ValueError, match="max_prompt_length"):
        InspectConfig(data="x", max_length=256)


def test_length_bias_exact():
    s = length_bias([2, 4, 8], [4, 4, 2])
    # d = ln(1/2), 0, ln 4: mean ln2/3; sd (n−1) = ln2·√(7/3); CI half-width 1.96·sd/√3
    ln2 = math.log(2)
    assert s["log_ratio_mean"] == pytest.approx(ln2 / 3)
    half = 1.959963984540054 * ln2 * math.sqrt(7 / 3) / math.sqrt(3)
    assert s["log_ratio_ci95"] == pytest.approx([ln2 / 3 - half, ln2 / 3 + half])
    assert s["share_chosen_longer"] == pytest.approx(1 / 3) and s["share_equal"] == pytest.approx(1 / 3)
    assert (s["chosen_mean"], s["rejected_mean"]) == pytest.approx((14 / 3, 10 / 3))
    # point-biserial: (M1 − M0)/σ · √(pq) with σ the population sd of all six lengths (2) and p = q = ½
    assert s["point_biserial"] == pytest.approx((14 / 3 - 10 / 3) / 2 * 0.5)
    flat = length_bias([3, 3], [3, 3])
    assert flat["log_ratio_mean"] == 0 and math.isnan(flat["point_biserial"])
    assert math.isnan(length_bias([5], [1])["log_ratio_ci95"][0])


def test_normalise_shingles_jaccard():
    assert normalise("  Héllo,   WORLD!!  ok_go ") == "héllo world ok go"
    assert normalise("ﬁne") == "fine"  # NFKC folds the ligature
    assert shingles("abcdef", 3) == {"abc", "bcd", "cde", "def"}
    assert shingles("ab", 3) == {"ab"}
    assert jaccard(shingles("abcdef", 3), shingles("abcdeg", 3)) == pytest.approx(3 / 5)


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.6, 0.8, 1.0])
def test_near_duplicates_is_exact(threshold):
    # Prefix filtering misses nothing: the same pairs as comparing every pair.
    rng = random.Random(threshold)
    base = [frozenset(rng.sample(range(40), rng.randint(1, 12))) for _ in range(30)]
    sets = base + [frozenset(list(s)[1:] + [99]) for s in base[:10]] + [base[3], base[7]]
    brute = sorted((i, j, jaccard(sets[i], sets[j])) for i in range(len(sets)) for j in range(i + 1, len(sets))
                   if jaccard(sets[i], sets[j]) >= threshold)
    assert near_duplicates(sets, threshold) == brute
    assert brute  # the test data has some


def test_duplicates_on_constructed_data(tmp_path):
    rows = [
        {"prompt": "Tell me a joke", "chosen": "Why did the chicken cross the road", "rejected": "No."},  # 1
        {"prompt": "Tell me a joke", "chosen": "Why did the chicken cross the road", "rejected": "No."},  # 2 = 1
        {"prompt": "tell me a JOKE!", "chosen": "why did the chicken cross the road?", "rejected": "no"},  # 3 ~ 1
        {"prompt": "Say it", "chosen": " same answer ", "rejected": "same answer"},  # 4 identical pair
        {"prompt": "Capital?", "chosen": "The capital of France is Paris.",
         "rejected": "The capital of France is Paris!"},  # 5 near-identical within the pair (J = 1)
        {"prompt": "Count", "chosen": "one two three four", "rejected": "one two three five"},  # 6: J < 0.8
    ]
    cfg = InspectConfig(data=str(_write(tmp_path / "d.jsonl", rows)), tokenizer="none")
    pairs, issues, n, valid = load_pairs(cfg)
    assert (len(pairs), issues, n, valid) == (6, [], 6, 6)
    d = duplicate_report(pairs, 0.8, 5, 10)
    assert d["exact_duplicate_pairs"] == 1 and d["exact_duplicate_groups"] == [[1, 2]]
    assert d["identical_pairs"] == 1 and d["identical_pair_lines"] == [4]
    assert d["near_duplicate_pairs"] == 1
    assert d["near_duplicate_examples"] == [{"lines": [1, 3], "jaccard": 1.0}]
    assert d["near_identical_chosen_rejected"] == 1
    assert d["near_identical_examples"] == [{"line": 5, "jaccard": 1.0}]
    # line 6: 14 5-grams each, the 11 that end by "three f" shared: J = 11 / (14 + 14 − 11)
    c, r = (shingles(normalise(t), 5) for t in ("one two three four", "one two three five"))
    assert jaccard(c, r) == pytest.approx(11 / 17)
    assert duplicate_report(pairs, 0.6, 5, 10)["near_identical_examples"][-1] == {"line": 6,
                                                                                   "jaccard": round(11 / 17, 4)}


@pytest.fixture(scope="module")
def word_tok():
    """A word-level tokenizer: one token per space-separated word, EOS appended to plain text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "</s>", *"abcdefghijklmnopqrstuvwxyz"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="</s>", unk_token="[UNK]")


def test_truncation_counts(tmp_path, word_tok):
    rows = [
        {"prompt": "a b c", "chosen": " d e", "rejected": " f g h"},  # 3 | 3, 4 tokens (EOS): fits 8
        {"prompt": "a b c d e f", "chosen": " g h i", "rejected": " j k l m n"},  # prompt 6 > 4 -> 4; 4 ok, 6 > 4
        {"prompt": "a b", "chosen": " c d e f g h i", "rejected": " j"},  # 8 > 6 cut; 2 ok
    ]
    cfg = InspectConfig(data=str(_write(tmp_path / "t.jsonl", rows)), max_length=8, max_prompt_length=4,
                        output=str(tmp_path / "out"), progress=False)
    report = inspect_data(cfg, tokenizer=word_tok, log=lambda m: None)
    t = report["truncation"]
    counts = (t["pairs_truncated"], t["prompts_truncated"], t["chosen_truncated"], t["rejected_truncated"])
    assert counts == (2, 1, 1, 1)
    assert t["truncated_lines"] == [2, 3]
    assert t["prompt_tokens"]["max"] == 6 and t["longest_sequence_tokens"]["max"] == 12  # 6 + 6
    tokens = report["lengths"]["tokens"]
    assert (tokens["chosen_mean"], tokens["rejected_mean"]) == pytest.approx((15 / 3, 12 / 3))  # [3,4,8], [4,6,2]
    # the training path's own counters agree
    from preftune.data import load_records, to_pairs, tokenize_examples, truncation_counts

    cut = tokenize_examples(to_pairs(load_records(cfg.data)), word_tok, max_length=8, max_prompt_length=4)
    assert truncation_counts(cut) == {"prompts": 1, "responses": 2, "examples": 2}


@pytest.fixture(scope="module")
def tiny_rm_dir(tmp_path_factory):
    from transformers import AutoModelForSequenceClassification

    from preftune.testing import tiny_config, tiny_tokenizer

    cfg = tiny_config("llama")
    cfg.num_labels = 1
    torch.manual_seed(5)
    model = AutoModelForSequenceClassification.from_config(cfg)
    path = tmp_path_factory.mktemp("tiny-rm")
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_reward_margins(tmp_path, tiny_rm_dir):
    from preftune.reward import load_preference_model
    from preftune.testing import write_pairs_jsonl

    rm = load_preference_model(tiny_rm_dir)
    cfg = InspectConfig(data=str(write_pairs_jsonl(tmp_path / "p.jsonl", n=6)), tokenizer="none", progress=False,
                        batch_size=4, top_k=3)
    pairs, *_ = load_pairs(cfg)
    summary, rows = reward_report(rm, pairs, cfg, [0.0] * len(pairs))
    expect = [float(rm.score(p.prompt, [p.chosen])[0] - rm.score(p.prompt, [p.rejected])[0]) for p in pairs]
    assert [r["margin"] for r in rows] == pytest.approx(expect, abs=1e-5)
    assert summary["share_disagree"] == sum(m < 0 for m in expect) / 6
    assert summary["margin"]["mean"] == pytest.approx(sum(expect) / 6, abs=1e-5)
    worst = sorted(range(6), key=lambda i: expect[i])[:3]
    assert [e["line"] for e in summary["most_disagreeing"]] == [i + 1 for i in worst]


def test_cli_end_to_end(tmp_path, tiny_model_dir, tiny_rm_dir):
    from preftune.data import load_records, to_pairs, tokenize_examples
    from preftune.data.ches import ches_scores
    from preftune.model import load_model
    from preftune.testing import write_pairs_jsonl

    data = write_pairs_jsonl(tmp_path / "pairs.jsonl", n=12)
    rows = data.read_text().splitlines()
    _write(data, rows + [rows[0], json.dumps({"prompt": "q", "chosen": "", "rejected": "x"})])
    out = tmp_path / "report"
    res = CliRunner().invoke(app, ["inspect", str(data), "--model", str(tiny_model_dir), "--reward-model",
                                   str(tiny_rm_dir), "-o", str(out), "--max-length", "48", "--max-prompt-length",
                                   "16", "--set", "progress=false", "--set", "device=cpu"])
    assert res.exit_code == 0, res.output
    assert "# preftune inspect" in res.output and "## CHES" in res.output and "## Reward model" in res.output
    report = json.loads((out / "inspect.json").read_text())
    assert report["counts"] == {"records": 14, "valid_records": 13, "issues": 1, "pairs": 13, "prompts": 13,
                                "unique_prompts": 12}
    assert report["issues"] == [f"{data}:14: chosen: empty"]
    assert report["duplicates"]["exact_duplicate_groups"] == [[1, 13]]
    assert (out / "inspect.md").read_text().startswith("# preftune inspect")
    ches = [json.loads(x) for x in (out / "ches.jsonl").read_text().splitlines()]
    assert [c["line"] for c in ches] == list(range(1, 14))
    model, tok = load_model(tiny_model_dir)
    cut = tokenize_examples(to_pairs(load_records(str(data))[:13]), tok, max_length=48, max_prompt_length=16)
    want = ches_scores(model, cut, pad_id=tok.pad_token_id)
    assert [c["ches_ln"] for c in ches] == pytest.approx(want.normalised, rel=1e-5)
    top = report["ches"]["top_by_ches_ln"][0]
    assert top["ches_ln"] == pytest.approx(max(want.normalised), rel=1e-5)
    assert len((out / "rewards.jsonl").read_text().splitlines()) == 13
    assert not list(out.glob(".*.tmp"))


def test_cli_errors(tmp_path):
    res = CliRunner().invoke(app, ["inspect", str(tmp_path / "missing.jsonl"), "--tokenizer", "none"])
    assert res.exit_code == 2 and "missing.jsonl" in res.output
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "q", "chosen": "", "rejected": "x"}, "{oops"])
    res = CliRunner().invoke(app, ["inspect", str(bad), "--tokenizer", "none", "-o", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert f"{bad}:1: chosen: empty" in res.output and f"{bad}:2: <line>: invalid JSON" in res.output
