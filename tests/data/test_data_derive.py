"""Derivation of pairs, lists and unpaired examples from records."""

import pytest

from preftune.data import (
    DataError,
    PreferenceRecord,
    derive_examples,
    group_by_prompt,
    load_records,
    to_lists,
    to_pairs,
    to_unpaired,
)


def _rec(responses, **kw):
    return PreferenceRecord("p", list(responses), **kw)


def _pairs(examples):
    return [tuple(e.responses) for e in examples]


def test_chosen_rejected_layout_gives_chosen_first():
    records = load_records(
        [{"prompt": "p", "chosen": "c", "rejected": "r", "score_chosen": 2, "score_rejected": 2}]
    )
    # Explicit pair wins even though the scores tie; the scores travel along as inputs.
    (ex,) = to_pairs(records)
    assert ex.responses == ["c", "r"] and ex.inputs == {"scores": [2.0, 2.0]}


def test_two_responses_without_scores():
    assert _pairs(to_pairs([_rec("ab")])) == [("a", "b")]


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        ("best_worst", [("b", "d")]),
        # best-first order is b, a, c, d (the a~c tie keeps data order) and the tie gives no pair
        ("all", [("b", "a"), ("b", "c"), ("b", "d"), ("a", "d"), ("c", "d")]),
        ("adjacent", [("b", "a"), ("c", "d")]),
    ],
)
def test_pair_strategies_with_scores(strategy, expected):
    record = _rec("abcd", scores=[2.0, 5.0, 2.0, 1.0])
    examples = to_pairs([record], pair_strategy=strategy)
    assert _pairs(examples) == expected
    assert all(e.inputs["scores"][0] > e.inputs["scores"][1] for e in examples)


def test_ranking_orders_like_scores():
    record = _rec("abc", ranking=[2, 0, 1])  # c best, b worst
    assert _pairs(to_pairs([record], pair_strategy="all")) == [("c", "a"), ("c", "b"), ("a", "b")]


def test_explicit_pairs_one_example_each_and_inputs_reindexed():
    record = _rec(
        "abc", pairs=[(2, 0), (1, 0)], attributes={"win_probs": [0.1, 0.5, 0.9], "margin": 3, "bad": [1, 2]}
    )
    examples = to_pairs([record], pair_strategy="all")
    assert _pairs(examples) == [("c", "a"), ("b", "a")]
    # Per-response lists follow their responses; per-record numbers stay numbers; other lists are dropped.
    assert [e.inputs for e in examples] == [
        {"win_probs": [0.9, 0.1], "margin": 3.0},
        {"win_probs": [0.5, 0.1], "margin": 3.0},
    ]


def test_all_equal_scores_is_an_issue():
    records = [_rec("ab", scores=[1, 2]), _rec("abc", scores=[3, 3, 3], line=7, source="f.jsonl")]
    with pytest.raises(DataError, match="f.jsonl:7: scores: no preference: all scores equal"):
        to_pairs(records)
    issues = []
    assert _pairs(to_pairs(records, issues=issues)) == [("b", "a")] and len(issues) == 1


def test_unknown_strategy():
    with pytest.raises(ValueError, match="pair_strategy must be one of best_worst, all, adjacent"):
        to_pairs([_rec("ab")], pair_strategy="random")


def test_unpaired_from_labels_and_from_pairs():
    labelled = _rec(["x"], labels=[False])
    paired = _rec("abc", scores=[1, 3, 2])
    examples = to_unpaired([labelled, paired])
    assert [(e.responses, e.inputs["labels"]) for e in examples] == [
        (["x"], [False]),
        (["b"], [True]),
        (["a"], [False]),
    ]
    # With "all" the pairs are (b, c), (b, a), (c, a): the middle response c is first seen as a loser
    # and keeps that label.
    examples = to_unpaired([paired], pair_strategy="all")
    assert [(e.responses[0], e.inputs["labels"][0]) for e in examples] == [
        ("b", True),
        ("c", False),
        ("a", False),
    ]


def test_lists_sorted_best_first_with_scores():
    record = _rec(
        "abc", scores=[0.5, 2.0, 1.0], labels=[False, True, True], attributes={"judge_scores": [5, 9, 7]}
    )
    (ex,) = to_lists([record])
    assert ex.responses == ["b", "c", "a"]
    assert ex.inputs == {
        "scores": [2.0, 1.0, 0.5],
        "labels": [True, True, False],
        "judge_scores": [9.0, 7.0, 5.0],
    }
    (top2,) = to_lists([record], k=2)
    assert top2.responses == ["b", "c"] and top2.inputs["scores"] == [2.0, 1.0]


def test_lists_from_ranking_and_from_pairs():
    (ex,) = to_lists([_rec("abc", ranking=[1, 2, 0])])
    assert ex.responses == ["b", "c", "a"] and ex.inputs["scores"] == [2.0, 1.0, 0.0]
    (ex,) = to_lists(load_records([{"prompt": "p", "chosen": "c", "rejected": "r"}]))
    assert ex.responses == ["c", "r"] and ex.inputs["scores"] == [1.0, 0.0]


def test_derive_examples_dispatch():
    records = [_rec("ab", scores=[0, 1])]
    assert _pairs(derive_examples(records, "paired")) == [("b", "a")]
    assert len(derive_examples(records, "unpaired")) == 2
    assert derive_examples(records, "listwise")[0].responses == ["b", "a"]
    with pytest.raises(ValueError, match="unknown data shape"):
        derive_examples(records, "tree")


def test_group_by_prompt_merges_helpsteer_rows():
    rows = [
        {"prompt": "p1", "response": "a", "helpfulness": 1, "correctness": 2},
        {"prompt": "p2", "response": "x", "helpfulness": 3, "correctness": 3},
        {"prompt": "p1", "response": "b", "helpfulness": 4, "correctness": 1},
    ]
    merged = group_by_prompt(load_records(rows))
    assert [(r.prompt, r.responses, r.scores, r.line) for r in merged] == [
        ("p1", ["a", "b"], [1, 4], 1),
        ("p2", ["x"], [3], 2),
    ]
    assert merged[0].attributes == {"correctness": [2, 1]}
    (ex,) = to_pairs(merged[:1])
    assert ex.responses == ["b", "a"] and ex.inputs == {"scores": [4.0, 1.0], "correctness": [1.0, 2.0]}
