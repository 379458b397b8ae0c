"""MAPL's data builder (METHODS.md §M5, preftune/data/mapl.py): exact intra- and inter-sample records on constructed
pairs, the instruction checkers, pair_prompts validation (file, line, field), per-response prompts at tokenisation,
and `preftune data mapl` followed by a 2-step `preftune train --loss mapl_intra`."""

import json

import pytest
from typer.testing import CliRunner

from preftune.cli import app
from preftune.data import load_and_validate
from preftune.data.mapl import Instruction, MaplDataConfig, mapl_rows


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    ("instruction", "meets", "violates"),
    [
        (Instruction("max_words", 3), "one two three", "one two three four"),
        (Instruction("include", "apple"), "An Apple, please.", "a pineapple"),
        (Instruction("exclude", "apple"), "a pineapple", "apple pie"),
        (Instruction("lowercase"), "all small 12", "One capital"),
        (Instruction("uppercase"), "LOUD!", "Loud"),
        (Instruction("no_commas"), "a b c", "a, b"),
        (Instruction("end_with", "."), "Done.  ", "Done!"),
    ],
)
def test_checkers(instruction, meets, violates):
    assert instruction.check(meets) and not instruction.check(violates)


def _records(tmp_path):
    rows = [{"prompt": "Describe the sea.", "chosen": "The sea is vast", "rejected": "WATER"}]
    return load_and_validate(_write(tmp_path / "p.jsonl", rows), objective_shape="paired")[0]


def test_intra_record_is_one_response_under_a_met_and_a_violated_prompt(tmp_path):
    cfg = MaplDataConfig(data="-", output="-", instructions=1, families=["max_words"], levels=["intra"])
    rows, stats = mapl_rows(_records(tmp_path), cfg)
    assert rows == [
        {"prompt": "Describe the sea.", "responses": ["The sea is vast", "WATER"], "pairs": [[0, 1]]},
        {"prompt": "Describe the sea.", "responses": ["The sea is vast", "The sea is vast"], "pairs": [[0, 1]],
         "pair_prompts": [["Describe the sea.\n\nAnswer in at most 4 words.",
                           "Describe the sea.\n\nAnswer in at most 3 words."]],
         "meta": {"mapl": "intra", "instructions_w": ["Answer in at most 4 words."],
                  "instructions_l": ["Answer in at most 3 words."]}},
    ]
    assert stats["intra"] == 1 and stats["skipped_intra"] == 0


def test_intra_with_two_families_violates_exactly_one(tmp_path):
    cfg = MaplDataConfig(data="-", output="-", instructions=2, families=["max_words", "include"], levels=["intra"],
                         keep_original=False, seed=3)
    (row,), _ = mapl_rows(_records(tmp_path), cfg)
    met = set(row["meta"]["instructions_w"])
    assert met == {"Answer in at most 4 words.", 'Include the word "vast".'}
    swapped = set(row["meta"]["instructions_l"]) - met
    assert swapped in ({"Answer in at most 3 words."}, {'Include the word "zephyr".'})
    assert len(set(row["meta"]["instructions_l"]) & met) == 1


def test_inter_record_orders_by_compliance_then_the_original_preference(tmp_path):
    # max_words: the instruction comes from y_w (at most 4 words: both comply, original order) or from y_l
    # (at most 1 word: only "WATER" complies, so the pair flips).
    cfg = MaplDataConfig(data="-", output="-", instructions=1, families=["max_words"], levels=["inter"],
                         keep_original=False)
    seen = set()
    for seed in range(12):
        (row,), _ = mapl_rows(_records(tmp_path), cfg.model_copy(update={"seed": seed}))
        if row["meta"]["instructions"] == ["Answer in at most 4 words."]:
            assert row["responses"] == ["The sea is vast", "WATER"] and row["meta"]["compliance"] == [1, 1]
            assert row["prompt"] == "Describe the sea.\n\nAnswer in at most 4 words." and not row["meta"]["flipped"]
        else:
            assert row["meta"]["instructions"] == ["Answer in at most 1 words."]
            assert row["responses"] == ["WATER", "The sea is vast"] and row["meta"]["compliance"] == [1, 0]
            assert row["meta"]["flipped"]
        seen.add(row["meta"]["flipped"])
    assert seen == {True, False}  # both outcomes drawn over the seeds


def test_pair_prompts_errors_name_file_line_and_field(tmp_path):
    from preftune.data import DataError

    rows = [
        {"prompt": "p", "responses": ["y", "y"], "pairs": [[0, 1]], "pair_prompts": [["a", "b"]]},
        {"prompt": "p", "responses": ["y", "y"], "pairs": [[0, 1]], "pair_prompts": [["a"]]},
        {"prompt": "p", "responses": ["y", "z"], "pairs": [[0, 1]], "pair_prompts": [["a", "b"], ["c", "d"]]},
        {"prompt": "p", "responses": ["y", "z"], "pairs": [[0, 1]], "pair_prompts": [["a", " "]]},
    ]
    path = _write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_and_validate(path, objective_shape="paired")
    text = str(err.value)
    assert "bad.jsonl:2" in text and "pair_prompts[0]" in text and "expected [winner prompt, loser prompt]" in text
    assert "bad.jsonl:3" in text and "has 2 prompt pair(s) for 1 pair(s)" in text
    assert "bad.jsonl:4" in text and "pair_prompts[0][1]" in text
    assert "bad.jsonl:1" not in text  # the same response twice is a pair when its prompts differ


def test_each_response_is_tokenised_after_its_own_prompt():
    from preftune.data import Example, tokenize_example
    from preftune.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    ex = Example("Q?", ["yes", "yes"], prompts=["Q? Be brief.", "Q? Be long."])
    out = tokenize_example(ex, tok, chat_template="never")
    for prompt, ids, own in zip(ex.prompts, out.response_ids, out.inputs["prompt_tokens"], strict=True):
        full = tok(prompt + "yes")["input_ids"] + [tok.eos_token_id]
        assert out.prompt_ids + ids == full  # the whole (own prompt, response) sequence
        assert out.prompt_ids + ids[: int(own)] == tok(prompt)["input_ids"][: len(out.prompt_ids) + int(own)]
        assert int(own) > 0


def test_build_then_train_two_steps(tmp_path):
    from preftune.testing import save_tiny_model

    rows = [{"prompt": f"Question {i}?", "chosen": f"A fine answer number {i}.", "rejected": f"NO {i}"}
            for i in range(4)]
    src = _write(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "mapl.jsonl"
    res = CliRunner().invoke(app, ["data", "mapl", str(src), str(out), "--seed", "1"])
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 12 and sum("pair_prompts" in r for r in lines) == 4
    model = save_tiny_model(tmp_path / "m", "llama", seed=0)
    for loss in ("mapl_intra", "dpo"):
        args = ["train", "--model", str(model), "--data", str(out), "--loss", loss, "--max-steps", "2",
                "--output", str(tmp_path / loss)]
        for kv in ("progress=false", "plot=false", "save_model=false", "batch_size=2", "max_length=96",
                   "max_prompt_length=64", "learning_rate=1e-3", "warmup_ratio=0", f"ref_cache_dir={tmp_path}/rc"):
            args += ["--set", kv]
        res = CliRunner().invoke(app, args)
        if loss == "dpo":  # other objectives would score the added instructions as response tokens: refused
            assert res.exit_code == 2 and "pair_prompts" in res.output and "mapl_intra" in res.output, res.output
            continue
        assert res.exit_code == 0, res.output
        first = json.loads((tmp_path / loss / "metrics.jsonl").read_text().splitlines()[0])
        assert first["loss"] == pytest.approx(0.693147, abs=1e-5)  # π_θ = π_ref at step 1
