"""MODPO's record fields: ``margin_rewards`` (one list of floats per response) and the data-set-level
``objective_names``: read from every layout, validated with file, line and field, carried into (B, K, n) inputs."""

from __future__ import annotations

import json

import pytest

from preftune.data import DataError, collate, load_and_validate, load_records, to_pairs, tokenize_examples


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _issues(path):
    with pytest.raises(DataError) as e:
        load_and_validate(path, objective_shape="paired")
    return [str(i) for i in e.value.issues]


GOOD = {"prompt": "p", "chosen": "a", "rejected": "b", "margin_rewards": [[0.2, -3.0], [0.8, -6.0]],
        "objective_names": ["safety", "length"]}


def test_bad_margin_rewards_are_located(tmp_path):
    path = _write(tmp_path / "m.jsonl", [
        GOOD,
        {**GOOD, "margin_rewards": [[0.2, -3.0]]},  # one list for two responses
        {**GOOD, "margin_rewards": [[0.2, "x"], [0.8, -6.0]]},  # not a number
        {**GOOD, "margin_rewards": [[0.2, -3.0], [0.8]]},  # ragged
        {**GOOD, "margin_rewards": [[0.2, float("nan")], [0.8, 1.0]]},
        {**GOOD, "margin_rewards": [0.2, 0.8]},  # numbers, not lists
        {**GOOD, "objective_names": ["safety"]},  # one name for two columns
        {"prompt": "p", "chosen": "a", "rejected": "b"},  # the others carry margins
        {**GOOD, "margin_rewards": [[0.2], [0.8]], "objective_names": ["safety"]},  # another column count
    ])
    got = _issues(path)
    src = str(path)
    assert got == [
        f"{src}:2: margin_rewards: has 1 values for 2 responses",
        f"{src}:3: margin_rewards[0][1]: expected a number, got str",
        f"{src}:4: margin_rewards[1]: has 1 values, margin_rewards[0] has 2 (one per extra objective)",
        f"{src}:5: margin_rewards[0][1]: is nan (scores must be finite)",
        f"{src}:6: margin_rewards[0]: expected a list of numbers (one per extra objective), got float",
        f"{src}:6: margin_rewards[1]: expected a list of numbers (one per extra objective), got float",
        f"{src}:7: objective_names: has 1 names for 2 margin reward column(s)",
        f"{src}:8: margin_rewards: missing (the data's other records carry margin rewards, e.g. line 1)",
        f"{src}:9: margin_rewards: 1 column(s) per response; line 1 has 2 (every record needs the same objectives)",
        f"{src}:9: objective_names: ['safety'] differs from line 1's ['safety', 'length'] (a data-set-level "
        "field: the same on every record)",
    ]


def test_margin_rewards_follow_the_responses_into_the_batch(tmp_path):
    from preftune.testing import tiny_tokenizer

    # A list record whose best-worst pair is (2, 0): the margins are re-indexed with the responses.
    path = _write(tmp_path / "l.jsonl", [
        {"prompt": "q", "responses": ["x", "y", "z"], "scores": [0.1, 0.5, 0.9],
         "margin_rewards": [[1.0], [2.0], [3.0]], "objective_names": ["len"]},
        {"prompt": "r", "responses": ["c", "d"], "scores": [1.0, 0.0], "margin_rewards": [[4.0], [5.0]]},
    ])
    records, _ = load_and_validate(path, objective_shape="paired")
    assert records[0].objective_names == ["len"] and records[1].objective_names is None  # inherited
    assert "margin_rewards" not in records[0].attributes
    pairs = to_pairs(records)
    assert [e.inputs["margin_rewards"] for e in pairs] == [[[3.0], [1.0]], [[4.0], [5.0]]]
    batch = collate(tokenize_examples(pairs, tiny_tokenizer(), max_length=32, max_prompt_length=16))
    assert batch.inputs["margin_rewards"].shape == (2, 2, 1)
    assert batch.inputs["margin_rewards"][0, :, 0].tolist() == [3.0, 1.0]


def test_pair_layout_reads_margin_rewards_in_chosen_rejected_order(tmp_path):
    rec = load_records(_write(tmp_path / "p.jsonl", [GOOD]))[0]
    assert rec.margin_rewards == [[0.2, -3.0], [0.8, -6.0]] and rec.objective_names == ["safety", "length"]
