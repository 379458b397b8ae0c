"""Conversations: the structure of chat messages is validated (each error located by file, line and the
field as the file names it), and Anthropic HH-RLHF transcripts become prompt + responses."""

import json

import pytest

from preftune.data import DataError, load_and_validate, load_records, to_pairs


def _msgs(*turns):
    """("user", "q"), ("assistant", "a") ... -> chat messages."""
    return [{"role": role, "content": content} for role, content in turns]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _located(tmp_path, row, objective_shape="paired", good=None):
    """The issues of ``row``, written on line 2 after a valid row of the same layout."""
    good = good or {"prompt": _msgs(("user", "q")), "chosen": "a", "rejected": "b"}
    path = _write(tmp_path / "d.jsonl", [good, row])
    with pytest.raises(DataError) as e:
        load_and_validate(path, objective_shape=objective_shape)
    return [str(i) for i in e.value.issues], path


ALTERNATE = "user and assistant turns must alternate"
NOT_ASSISTANT = "(a response is the assistant's reply; earlier turns belong in the prompt)"

# (id, row, field, message): one row per structural error; every row is valid apart from it.
CASES = [
    (
        "unknown_role",
        {"prompt": _msgs(("bot", "q")), "chosen": "a", "rejected": "b"},
        "prompt[0].role",
        "unknown role 'bot' (expected system, user or assistant)",
    ),
    (
        "tool_role_refused",
        {"prompt": _msgs(("user", "q"), ("tool", "42"), ("user", "so?")), "chosen": "a", "rejected": "b"},
        "prompt[1].role",
        "role 'tool' is not supported: conversations may only have system, user and assistant turns",
    ),
    (
        "tool_call_refused",
        {
            "prompt": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "", "tool_calls": [{"name": "f"}]},
                {"role": "user", "content": "and?"},
            ],
            "chosen": "a",
            "rejected": "b",
        },
        "prompt[1].tool_calls",
        "tool calls are not supported",
    ),
    (
        "system_not_first",
        {"prompt": _msgs(("user", "q"), ("system", "s")), "chosen": "a", "rejected": "b"},
        "prompt[1].role",
        "a system message must be the first turn",
    ),
    (
        "first_turn_not_user",
        {"prompt": _msgs(("system", "s"), ("assistant", "hi"), ("user", "q")), "chosen": "a", "rejected": "b"},
        "prompt[1].role",
        "the first turn (after an optional system message) must be user, not assistant",
    ),
    (
        "user_follows_user",
        {"prompt": _msgs(("user", "q"), ("user", "q again")), "chosen": "a", "rejected": "b"},
        "prompt[1].role",
        f"user follows user: {ALTERNATE}",
    ),
    (
        "prompt_ends_with_assistant",
        {"prompt": _msgs(("user", "q"), ("assistant", "a0")), "chosen": "a", "rejected": "b"},
        "prompt[1].role",
        "the prompt ends with an assistant turn; it must end with the user turn that the responses answer",
    ),
    (
        "prompt_without_user_turn",
        {"prompt": _msgs(("system", "s")), "chosen": "a", "rejected": "b"},
        "prompt",
        "no user turn (the responses need a user turn to answer)",
    ),
    (
        "chosen_is_a_user_turn",
        {"prompt": _msgs(("user", "q")), "chosen": _msgs(("user", "a")), "rejected": _msgs(("assistant", "b"))},
        "chosen[0].role",
        f"expected an assistant turn, got user {NOT_ASSISTANT}",
    ),
    (
        "rejected_holds_a_user_turn",
        {
            "prompt": _msgs(("user", "q")),
            "chosen": _msgs(("assistant", "a")),
            "rejected": _msgs(("assistant", "b"), ("user", "more"), ("assistant", "c")),
        },
        "rejected[1].role",
        f"expected an assistant turn, got user {NOT_ASSISTANT}",
    ),
    (
        "response_of_two_assistant_turns",
        {
            "prompt": _msgs(("user", "q")),
            "chosen": _msgs(("assistant", "a"), ("assistant", "a2")),
            "rejected": _msgs(("assistant", "b")),
        },
        "chosen[1].role",
        "assistant follows assistant: a response is one assistant turn",
    ),
    (
        # UltraFeedback style: the shared beginning of chosen/rejected is the prompt; the error is
        # named at its place in chosen, the column it was taken from.
        "implicit_prompt_out_of_order",
        {
            "prompt": "q",
            "chosen": _msgs(("system", "s"), ("user", "q"), ("user", "q2"), ("assistant", "a")),
            "rejected": _msgs(("system", "s"), ("user", "q"), ("user", "q2"), ("assistant", "b")),
        },
        "chosen[2].role",
        f"user follows user: {ALTERNATE}",
    ),
    (
        # Conversations that part before their last turn: the responses hold user turns, named at
        # their index in the file's conversation (the reader removed the shared first message).
        "implicit_prompt_responses_part_early",
        {
            "prompt": "q",
            "chosen": _msgs(("user", "q"), ("assistant", "a"), ("user", "q2"), ("assistant", "a2")),
            "rejected": _msgs(("user", "q"), ("assistant", "b")),
        },
        "chosen[2].role",
        f"expected an assistant turn, got user {NOT_ASSISTANT}",
    ),
    (
        # An explicit prompt that a full conversation repeats: indices follow the file.
        "full_conversation_after_explicit_prompt",
        {
            "prompt": _msgs(("user", "q")),
            "chosen": _msgs(("user", "q"), ("assistant", "a"), ("assistant", "a2")),
            "rejected": _msgs(("user", "q"), ("assistant", "b")),
        },
        "chosen[2].role",
        "assistant follows assistant: a response is one assistant turn",
    ),
]


@pytest.mark.parametrize(("row", "field", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_conversation_structure_errors_are_located(tmp_path, row, field, message):
    issues, path = _located(tmp_path, row)
    assert issues == [f"{path}:2: {field}: {message}"]


def test_listwise_and_unpaired_responses_are_checked_too(tmp_path):
    good = {"prompt": "q", "responses": [_msgs(("assistant", "a")), _msgs(("assistant", "b"))]}
    row = {"prompt": "q", "responses": [_msgs(("assistant", "a")), _msgs(("system", "b"))]}
    issues, path = _located(tmp_path, row, good=good)
    assert issues == [f"{path}:2: responses[1][0].role: expected an assistant turn, got system {NOT_ASSISTANT}"]
    good = {"prompt": "q", "completion": "a", "label": True}
    row = {"prompt": _msgs(("user", "q"), ("assistant", "x")), "completion": "a", "label": False}
    issues, path = _located(tmp_path, row, objective_shape="unpaired", good=good)
    assert issues == [
        f"{path}:2: prompt[1].role: the prompt ends with an assistant turn; it must end with the user turn "
        "that the responses answer"
    ]


def test_well_formed_conversations_pass():
    rows = [
        {  # system, alternating turns, one assistant reply each
            "prompt": _msgs(("system", "s"), ("user", "q"), ("assistant", "a0"), ("user", "q2")),
            "chosen": _msgs(("assistant", "a")),
            "rejected": _msgs(("assistant", "b")),
        },
        {"prompt": _msgs(("user", "q")), "chosen": "a", "rejected": "b"},  # text replies to messages
        {"prompt": "q", "chosen": _msgs(("assistant", "a")), "rejected": _msgs(("assistant", "b"))},
    ]
    valid, issues = load_and_validate(rows, objective_shape="paired")
    assert len(valid) == 3 and issues == []


# ---------------------------------------------------------------- Anthropic HH-RLHF


def test_hh_single_turn_becomes_chat_messages(tmp_path):
    row = {
        "chosen": "\n\nHuman: What color is the sky?\n\nAssistant: It is blue.",
        "rejected": "\n\nHuman: What color is the sky?\n\nAssistant: Green, mostly.",
    }
    path = _write(tmp_path / "hh.jsonl", [row])
    records, issues = load_and_validate(path, objective_shape="paired")
    assert issues == []
    (ex,) = to_pairs(records)
    assert ex.prompt == _msgs(("user", "What color is the sky?"))
    assert ex.responses == [_msgs(("assistant", "It is blue.")), _msgs(("assistant", "Green, mostly."))]
    assert (ex.source, ex.line) == (str(path), 1)


def test_hh_multi_turn_prompt_is_every_turn_before_the_last_reply():
    shared = "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: Name a fruit.\n\nAssistant:"
    row = {"chosen": shared + " An apple.", "rejected": shared + " No.", "score_chosen": 8, "score_rejected": 2}
    (r,) = load_records([row])
    assert r.prompt == _msgs(("user", "Hi"), ("assistant", "Hello! How can I help?"), ("user", "Name a fruit."))
    assert r.responses == [_msgs(("assistant", "An apple.")), _msgs(("assistant", "No."))]
    assert r.scores == [8, 2] and r.pairs == [(0, 1)]


def test_hh_chat_template_renders_the_turns(tiny_tok):
    from preftune.data import render_example

    (r,) = load_records([{"chosen": "Human: q\n\nAssistant: yes", "rejected": "Human: q\n\nAssistant: no"}])
    rendered = render_example(r.prompt, r.responses, tiny_tok)
    assert rendered.templated
    assert rendered.prompt == tiny_tok.apply_chat_template(_msgs(("user", "q")), tokenize=False,
                                                           add_generation_prompt=True)
    assert rendered.fulls[0] == tiny_tok.apply_chat_template(_msgs(("user", "q"), ("assistant", "yes")),
                                                             tokenize=False)


def test_hh_rows_without_a_shared_prompt_are_located(tmp_path):
    good = {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"}
    rows = [
        good,
        {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: other\n\nAssistant: b"},  # 2
        {"chosen": "just text", "rejected": "\n\nHuman: q\n\nAssistant: b"},  # 3
        {  # 4: the transcripts part before their last reply
            "chosen": "\n\nHuman: q\n\nAssistant: a\n\nHuman: q2\n\nAssistant: a2",
            "rejected": "\n\nHuman: q\n\nAssistant: b\n\nHuman: q2\n\nAssistant: b2",
        },
    ]
    path = _write(tmp_path / "hh.jsonl", rows)
    with pytest.raises(DataError) as e:
        load_and_validate(path, objective_shape="paired")
    assert [str(i) for i in e.value.issues] == [
        f"{path}:2: prompt: missing: chosen and rejected share no beginning to take as the prompt "
        "(their first turns differ)",
        f"{path}:3: prompt: missing: there is no prompt column and chosen is not an Anthropic HH transcript "
        "('\\n\\nHuman: … \\n\\nAssistant: …') whose shared beginning would be the prompt",
        f"{path}:4: chosen[2].role: expected an assistant turn, got user {NOT_ASSISTANT}",
        f"{path}:4: rejected[2].role: expected an assistant turn, got user {NOT_ASSISTANT}",
    ]


def test_a_prompt_column_keeps_rows_without_a_prompt_missing():
    # The layout is decided per source: in a prompt/chosen/rejected file, a row without its prompt
    # is an omission to report, not a transcript to parse.
    hh = {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"}
    with pytest.raises(DataError) as e:
        load_and_validate([{"prompt": "p", "chosen": "a", "rejected": "b"}, hh], objective_shape="paired")
    assert [str(i) for i in e.value.issues] == ["<memory>:2: prompt: missing"]
