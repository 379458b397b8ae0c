"""Validation: each kind of bad record is reported with its exact file, line and field."""

import json

import pytest

from preftune.data import DataError, DataIssue, load_and_validate, load_records, validate_records
from preftune.data.schema import format_issues


def _write(path, rows):
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return path


def _issues(records, **kw):
    kw.setdefault("objective_shape", "paired")
    _, issues = (
        validate_records(records, skip_invalid=True, **kw) if _any_valid(records, kw) else (None, None)
    )
    if issues is None:
        with pytest.raises(DataError) as e:
            validate_records(records, **kw)
        issues = e.value.issues
    return [(i.line, i.field, i.message) for i in issues]


def _any_valid(records, kw):
    try:
        validate_records(records, skip_invalid=True, **kw)
        return True
    except DataError:
        return False


GOOD = {"prompt": "Why?", "chosen": "Because.", "rejected": "No."}


def test_paired_file_reports_every_bad_record(tmp_path):
    rows = [
        GOOD,  # 1
        {"prompt": "   ", "chosen": "a", "rejected": "b"},  # 2 blank prompt
        {"prompt": "p", "chosen": "a"},  # 3 missing rejected
        {"prompt": "p", "chosen": 7, "rejected": "b"},  # 4 wrong type
        {"prompt": "p", "chosen": "same ", "rejected": "same"},  # 5 identical
        {"prompt": "p", "chosen": "a", "rejected": "\n"},  # 6 blank response
        {"prompt": ["not a message"], "chosen": "a", "rejected": "b"},  # 7 malformed messages
        {"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"},  # 8 message without content
    ]
    path = _write(tmp_path / "prefs.jsonl", rows)
    with pytest.raises(DataError) as e:
        validate_records(load_records(path), objective_shape="paired")
    got = [(i.source, i.line, i.field, i.message) for i in e.value.issues]
    p = str(path)
    assert got == [
        (p, 2, "prompt", "empty"),
        (p, 3, "rejected", "missing"),
        (p, 4, "chosen", "expected a string or a list of chat messages, got int"),
        (p, 5, "rejected", "identical to chosen (a pair needs two different responses)"),
        (p, 6, "rejected", "empty"),
        (p, 7, "prompt[0]", "expected a chat message {role, content}, got str"),
        (p, 8, "prompt[0].content", "missing"),
    ]
    msg = str(e.value)
    assert msg.startswith("7 problems in the data:\n")
    assert f"  {p}:3: rejected: missing" in msg.splitlines()


def test_message_field_names_follow_the_source_columns():
    row = {
        "prompt": [{"role": "user", "content": "q"}],
        "chosen": [{"role": "assistant", "content": "a"}],
        "rejected": [{"role": "assistant", "content": 3}],
    }
    assert _issues(load_records([GOOD, row])) == [(2, "rejected[0].content", "expected a string, got int")]


def test_listwise_field_checks():
    base = {"prompt": "p", "responses": ["a", "b", "c"]}
    rows = [
        {**base, "scores": [1, 2, 3]},  # 1 fine
        {**base, "scores": [1, 2]},  # 2 length mismatch
        {**base, "scores": [1, float("nan"), 2]},  # 3 NaN
        {**base, "scores": [1, float("inf"), 2]},  # 4 inf
        {**base, "scores": [1, "2", 3]},  # 5 wrong type
        {**base, "ranking": [0, 0, 1]},  # 6 not a permutation
        {**base, "ranking": [0, 1]},  # 7 ranking length
        {**base, "pairs": [[0, 3]]},  # 8 out of range
        {**base, "pairs": [[1, 1]]},  # 9 self pair
        {**base, "labels": [True, False]},  # 10 labels length
        {**base, "labels": [True, "yes", False], "scores": [1, 2, 3]},  # 11 label type
        {"prompt": "p", "responses": ["a"], "scores": [1]},  # 12 too few for a list
        {**base, "scores": [2, 2, 2]},  # 13 no preference
        {**base},  # 14 nothing orders three responses
        {**base, "scores": [1, 2, 3], "win_probs": [0.1, float("nan"), 0.3]},  # 15 NaN input
    ]
    assert _issues(load_records(rows), objective_shape="listwise") == [
        (2, "scores", "has 2 values for 3 responses"),
        (3, "scores[1]", "is nan (scores must be finite)"),
        (4, "scores[1]", "is inf (scores must be finite)"),
        (5, "scores[1]", "expected a number, got str"),
        (6, "ranking", "[0, 0, 1] is not a permutation of 0..2"),
        (7, "ranking", "has 2 values for 3 responses"),
        (8, "pairs[0]", "[0, 3] has an index out of range for 3 responses"),
        (9, "pairs[0]", "[1, 1] pairs a response with itself"),
        (10, "labels", "has 2 values for 3 responses"),
        (11, "labels[1]", "expected true/false, got 'yes'"),
        (12, "responses", "1 responses; this objective needs lists of at least 2"),
        (13, "scores", "no preference: all scores equal"),
        (14, "scores", "missing: nothing orders the 3 responses (give scores or a ranking)"),
        (15, "win_probs", "has a value that is NaN or infinite"),
    ]


def test_min_responses_for_lists():
    rows = [
        {"prompt": "p", "responses": ["a", "b", "c"], "scores": [1, 2, 3]},
        {"prompt": "p", "responses": ["a", "b"], "scores": [1, 2]},
    ]
    assert _issues(load_records(rows), objective_shape="listwise", min_responses=3) == [
        (2, "responses", "2 responses; this objective needs lists of at least 3")
    ]


def test_paired_shape_needs_a_derivable_pair():
    rows = [
        {"prompt": "p", "responses": ["a", "b"]},  # 1 two responses: chosen first
        {"prompt": "p", "responses": ["a", "b", "c"]},  # 2 nothing orders three
        {"prompt": "p", "responses": ["a", "b", "c"], "scores": [1, 1, 1]},  # 3 all equal
        {"prompt": "p", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]},  # 4 fine
    ]
    assert _issues(load_records(rows)) == [
        (2, "responses", "no pairs, scores, ranking or labels to order 3 responses"),
        (3, "scores", "no preference: all scores equal"),
    ]


def test_unpaired_shape():
    rows = [
        {"prompt": "p", "completion": "a", "label": True},
        {"prompt": "p", "completion": "a", "label": 1},  # 0/1 integers are labels too
        {"prompt": "p", "completion": "a", "label": "good"},
        {"prompt": "p", "completion": "a"},
    ]
    assert _issues(load_records(rows), objective_shape="unpaired") == [
        (3, "label", "expected true/false, got 'good'"),
        (4, "label", "missing"),
    ]
    # A single response with no label column at all.
    assert _issues(load_records([{"prompt": "p", "responses": ["a"]}]), objective_shape="unpaired") == [
        (1, "labels", "missing (an unpaired example needs a desirable/undesirable label)")
    ]
    # Pairs are valid unpaired data (chosen desirable, rejected undesirable).
    assert _issues(load_records([GOOD]), objective_shape="unpaired") == []


def test_helpsteer_single_responses_are_not_pairs():
    rows = [{"prompt": "p", "response": "r", "helpfulness": 3}]
    msg = "no preference: only one response (merge rows that share a prompt with group_by_prompt)"
    assert _issues(load_records(rows)) == [(1, "helpfulness", msg)]


def test_skip_invalid_returns_kept_records_and_issue_count(tmp_path):
    rows = [
        GOOD,
        {"prompt": "", "chosen": "a", "rejected": "b"},
        GOOD,
        {"prompt": "p", "chosen": "x", "rejected": "x"},
    ]
    records = load_records(_write(tmp_path / "d.jsonl", rows))
    valid, issues = validate_records(records, objective_shape="paired", skip_invalid=True)
    assert [r.line for r in valid] == [1, 3] and [i.line for i in issues] == [2, 4]


def test_skip_invalid_with_nothing_valid_is_still_an_error():
    with pytest.raises(DataError, match="no valid records left"):
        validate_records(
            load_records([{"prompt": "", "chosen": "a", "rejected": "b"}]),
            objective_shape="paired",
            skip_invalid=True,
        )


def test_empty_records_is_an_error():
    with pytest.raises(DataError, match="no records"):
        validate_records([], objective_shape="paired")


def test_overlong_prompt_error_mode(tiny_tok):
    from preftune.data import prompt_token_count

    long_prompt = "the quick brown fox " * 20
    records = load_records([GOOD, {"prompt": long_prompt, "chosen": "a", "rejected": "b"}])
    n = prompt_token_count(long_prompt, tiny_tok)
    assert n > 30
    kw = dict(objective_shape="paired", tokenizer=tiny_tok, max_prompt_length=30)
    valid, issues = validate_records(records, **kw)  # default: truncation handles it
    assert len(valid) == 2 and issues == []
    assert _issues(records, overlong_prompt="error", **kw) == [
        (2, "prompt", f"{n} tokens, longer than max_prompt_length=30")
    ]


def test_load_and_validate_merges_read_and_record_issues(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(
        json.dumps(GOOD).encode() + b"\n{oops\n" + b'{"prompt": "", "chosen": "a", "rejected": "b"}\n'
    )
    with pytest.raises(DataError) as e:
        load_and_validate(path, objective_shape="paired")
    assert [(i.line, i.field) for i in e.value.issues] == [(2, "<line>"), (3, "prompt")]
    valid, issues = load_and_validate(path, objective_shape="paired", skip_invalid=True)
    assert [r.line for r in valid] == [1] and len(issues) == 2


def test_error_message_is_capped_but_issues_are_kept():
    issues = [DataIssue("f.jsonl", i, "prompt", "empty") for i in range(1, 121)]
    err = DataError(issues)
    lines = str(err).splitlines()
    assert lines[0] == "120 problems in the data:"
    assert lines[1] == "  f.jsonl:1: prompt: empty" and lines[50] == "  f.jsonl:50: prompt: empty"
    assert lines[-1] == "  ... and 70 more" and len(lines) == 52
    assert len(err.issues) == 120
    # One problem is one line that leads with where it is.
    assert format_issues(issues[:1]) == "f.jsonl:1: prompt: empty"


# ---------------------------------------------------------------- errors through `preftune train`'s path


def _prepare_error(path, loss="dpo"):
    """The message `preftune train` prints for this data (train.data_prep.prepare, as the CLI calls it)."""
    from preftune.losses import get
    from preftune.testing import tiny_tokenizer
    from preftune.train.config import TrainConfig
    from preftune.train.data_prep import prepare

    with pytest.raises(DataError) as e:
        prepare(TrainConfig(data=str(path), loss=loss), get(loss), tiny_tokenizer())
    return str(e.value)


def test_bad_json_line_leads_the_message(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"prompt": "x", "chosen": }\n')
    # The problem first; no "objective 'dpo' needs ..." preamble or trailer for a broken line.
    assert _prepare_error(path) == f"{path}:2: <line>: invalid JSON: Expecting value (column 27)"


def test_bad_utf8_line_leads_the_message(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"prompt": "caf\xe9"}\n')
    assert _prepare_error(path) == f"{path}:2: <line>: not valid UTF-8 (byte 0xe9 at column 16)"


def test_several_problems_list_each_without_the_objective_hint(tmp_path):
    path = _write(tmp_path / "d.jsonl", [GOOD, "{oops", {"prompt": "", "chosen": "a", "rejected": "b"}])
    assert _prepare_error(path).splitlines() == [
        "2 problems in the data:",
        f"  {path}:2: <line>: invalid JSON: Expecting property name enclosed in double quotes (column 2)",
        f"  {path}:3: prompt: empty",
    ]


def test_objective_needs_trail_a_wrong_layout_or_shape(tmp_path):
    from preftune.losses import get

    needs = f"objective 'dpo' needs {get('dpo').data_needs}"
    path = _write(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}])
    msg = _prepare_error(path).splitlines()
    assert msg[0].startswith(f"{path}:0: <layout>: unrecognised layout; keys found: answer, question")
    assert msg[1:] == [needs]
    path = _write(tmp_path / "kto.jsonl", [{"prompt": "p", "completion": "a", "label": True}])
    assert _prepare_error(path).splitlines() == [
        f"{path}:1: label: no preference: only one response (merge rows that share a prompt with group_by_prompt)",
        needs,
    ]
