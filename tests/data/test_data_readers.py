"""Readers: every source kind and every layout maps onto the same records; bad bytes name their line."""

import json

import pytest

from preftune.data import DataError, load_records, split_conversations

PAIRS = [
    {"prompt": "What is 2+2?", "chosen": "4.", "rejected": "5."},
    {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."},
]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _expect_pairs(records, source):
    assert [r.prompt for r in records] == ["What is 2+2?", "Name a colour."]
    assert [r.responses for r in records] == [["4.", "5."], ["Blue.", "Seven."]]
    assert [r.pairs for r in records] == [[(0, 1)], [(0, 1)]]
    assert [r.line for r in records] == [1, 2]
    assert all(r.source == source for r in records)


# ---------------------------------------------------------------- source kinds


def test_jsonl(tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", PAIRS)
    _expect_pairs(load_records(path), str(path))


def test_jsonl_blank_lines_keep_line_numbers(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n" + json.dumps(PAIRS[0]) + "\n\n" + json.dumps(PAIRS[1]) + "\n", encoding="utf-8")
    assert [r.line for r in load_records(path)] == [2, 4]


def test_json_array_lines(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(PAIRS, indent=2), encoding="utf-8")
    records = load_records(path)
    assert [r.responses for r in records] == [["4.", "5."], ["Blue.", "Seven."]]
    # Each object's line is where it starts in the file (indent=2: "[", "{", 3 keys, "}," ...).
    assert [r.line for r in records] == [2, 7]


def test_json_compact_one_line(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(PAIRS), encoding="utf-8")
    assert [r.line for r in load_records(path)] == [1, 1]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(PAIRS), path)
    _expect_pairs(load_records(path), str(path))


def test_dataset_object_and_saved_folder(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(PAIRS)
    _expect_pairs(load_records(ds), "<dataset>")
    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": ds, "test": ds.select([1])}).save_to_disk(str(folder))
    _expect_pairs(load_records(folder), str(folder))
    test = load_records(folder, split="test")
    assert [r.prompt for r in test] == ["Name a colour."] and test[0].line == 1
    with pytest.raises(DataError, match="no split 'dev'; the dataset has test, train"):
        load_records(folder, split="dev")
    dsd = datasets.DatasetDict({"train": ds, "test": ds.select([1])})
    assert [r.prompt for r in load_records(dsd, split="test")] == ["Name a colour."]
    _expect_pairs(load_records(dsd), "<dataset>")
    single = tmp_path / "single"
    ds.save_to_disk(str(single))
    _expect_pairs(load_records(single), str(single))


def test_list_of_dicts():
    _expect_pairs(load_records(PAIRS), "<memory>")


# ---------------------------------------------------------------- read errors


def test_non_utf8_line_is_an_issue_with_its_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(
        json.dumps(PAIRS[0]).encode() + b"\n" + b'{"prompt": "caf\xe9"}\n' + json.dumps(PAIRS[1]).encode()
    )
    with pytest.raises(DataError) as e:
        load_records(path)
    assert [str(i) for i in e.value.issues] == [f"{path}:2: <line>: not valid UTF-8 (byte 0xe9 at column 16)"]
    issues = []
    records = load_records(path, issues=issues)  # collecting: the readable lines survive
    assert [r.line for r in records] == [1, 3] and len(issues) == 1


def test_json_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps(PAIRS[0]) + "\n" + '{"prompt": "x", "chosen": }\n' + "[1, 2]\n", encoding="utf-8"
    )
    with pytest.raises(DataError) as e:
        load_records(path)
    issues = e.value.issues
    assert [(i.line, i.field) for i in issues] == [(2, "<line>"), (3, "<line>")]
    assert issues[0].message == "invalid JSON: Expecting value (column 27)"
    assert issues[1].message == "expected a JSON object, got list"
    assert f"{path}:2: <line>: invalid JSON" in str(e.value)


def test_json_file_syntax_error_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"prompt": "a", "chosen": "b", "rejected": "c"},\n  {"prompt": "a" "chosen": 1}\n]')
    with pytest.raises(DataError) as e:
        load_records(path)
    (issue,) = e.value.issues
    assert issue.line == 3 and issue.message.startswith("invalid JSON: Expecting ',' delimiter")


def test_json_file_non_utf8(tmp_path):
    path = tmp_path / "bad.json"
    path.write_bytes(b'[\n{"prompt": "a"},\n{"prompt": "\xff"}\n]')
    with pytest.raises(DataError) as e:
        load_records(path)
    assert e.value.issues[0].line == 3 and "not valid UTF-8" in e.value.issues[0].message


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match=r"empty\.jsonl:0: <file>: no records"):
        load_records(path)


def test_unrecognised_layout_names_keys_and_layouts(tmp_path):
    path = _write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError) as e:
        load_records(path)
    msg = str(e.value)
    assert str(path) in msg and "keys found: answer, question" in msg
    for layout in ("prompt/responses", "chosen/rejected", "prompt/completion/label", "helpfulness"):
        assert layout in msg


def test_unknown_extension(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported data file type '.csv'"):
        load_records(path)


# ---------------------------------------------------------------- layouts


def test_pair_layout_with_chat_messages():
    row = {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "chosen": [{"role": "assistant", "content": "Hello."}],
        "rejected": [{"role": "assistant", "content": "Go away."}],
    }
    (r,) = load_records([row])
    assert r.prompt == row["prompt"]
    assert r.responses == [row["chosen"], row["rejected"]] and r.pairs == [(0, 1)]


def test_text_prompt_with_message_responses_becomes_a_user_turn():
    row = {
        "prompt": "Hi",
        "chosen": [{"role": "assistant", "content": "Hello."}],
        "rejected": [{"role": "assistant", "content": "No."}],
    }
    (r,) = load_records([row])
    assert r.prompt == [{"role": "user", "content": "Hi"}]
    assert r.responses == [
        [{"role": "assistant", "content": "Hello."}],
        [{"role": "assistant", "content": "No."}],
    ]


def test_explicit_prompt_with_full_conversations_is_stripped():
    prompt = [{"role": "user", "content": "Hi"}]
    row = {
        "prompt": prompt,
        "chosen": prompt + [{"role": "assistant", "content": "Hello."}],
        "rejected": prompt + [{"role": "assistant", "content": "No."}],
    }
    (r,) = load_records([row])
    assert r.prompt == prompt
    assert r.responses == [
        [{"role": "assistant", "content": "Hello."}],
        [{"role": "assistant", "content": "No."}],
    ]


def test_implicit_prompt_multiturn_ultrafeedback_style():
    shared = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"},
    ]
    chosen = shared + [{"role": "assistant", "content": "good"}]
    rejected = shared + [{"role": "assistant", "content": "bad"}]
    row = {
        "prompt": "u2",
        "chosen": chosen,
        "rejected": rejected,
        "messages": chosen,
        "score_chosen": 8.0,
        "score_rejected": 3.5,
    }
    (r,) = load_records([row])
    assert r.prompt == shared
    assert r.responses == [
        [{"role": "assistant", "content": "good"}],
        [{"role": "assistant", "content": "bad"}],
    ]
    assert r.scores == [8.0, 3.5] and r.pairs == [(0, 1)]
    assert r.attributes == {}  # the score columns became scores, not extra inputs


def test_implicit_prompt_without_prompt_column():
    chosen = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    rejected = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]
    (r,) = load_records([{"chosen": chosen, "rejected": rejected}])
    assert r.prompt == chosen[:1] and r.responses == [chosen[1:], rejected[1:]]


def test_split_conversations_identical_keeps_final_assistant_turn():
    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert split_conversations(None, [conv, conv]) == (conv[:1], [conv[1:], conv[1:]])


def test_listwise_layout_and_extra_numeric_columns():
    row = {
        "prompt": "p",
        "responses": ["a", "b", "c"],
        "scores": [1, 3, 2],
        "ranking": [1, 2, 0],
        "pairs": [[1, 0]],
        "win_probs": [0.2, 0.7, 0.5],
        "judge_margin": 1.5,
        "note": "text",
        "flags": [True],
    }
    (r,) = load_records([row])
    assert r.responses == ["a", "b", "c"] and r.scores == [1, 3, 2] and r.ranking == [1, 2, 0]
    assert r.pairs == [(1, 0)]
    assert r.attributes == {"win_probs": [0.2, 0.7, 0.5], "judge_margin": 1.5}


def test_unpaired_kto_layout():
    rows = [
        {"prompt": "p", "completion": "good", "label": True},
        {"prompt": "p", "completion": "bad", "label": False},
    ]
    records = load_records(rows)
    assert [(r.responses, r.labels) for r in records] == [(["good"], [True]), (["bad"], [False])]
    assert records[0].field_name("labels") == "label"


def test_helpsteer_layout(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {
            "prompt": "p",
            "response": "r",
            "helpfulness": 3,
            "correctness": 4,
            "coherence": 4,
            "complexity": 1,
            "verbosity": 2,
        }
    ]
    path = tmp_path / "hs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    (r,) = load_records(path)
    assert r.responses == ["r"] and r.scores == [3]
    assert r.attributes == {"correctness": 4, "coherence": 4, "complexity": 1, "verbosity": 2}
    assert r.field_name("scores") == "helpfulness"


def test_shape_hint_forces_a_layout():
    # Both layouts' keys are present; detection prefers listwise, the hint picks the pair layout.
    row = {"prompt": "p", "responses": ["x"], "chosen": "a", "rejected": "b"}
    assert load_records([row])[0].responses == ["x"]
    assert load_records([row], shape_hint="paired")[0].responses == ["a", "b"]
    with pytest.raises(ValueError, match="unknown layout 'nope'"):
        load_records([row], shape_hint="nope")


def test_missing_column_in_some_rows_is_kept_for_validation():
    records = load_records([PAIRS[0], {"prompt": "p", "chosen": "c"}])
    assert records[1].responses == ["c", None]
