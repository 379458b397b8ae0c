import pytest

from preftune.tasks import all_tasks, get_task, prompt_text
from preftune.tasks import json_object as jo
from preftune.tasks import keyword as kw

P = [{"role": "user", "content": 'Describe tea as a JSON object with the keys "name" and "fact". Write only the JSON.'}]
OK = '{"name": "Tea", "fact": "Tea is made from leaves."}'


@pytest.mark.parametrize(
    "response, finished, score, success, reason",
    [
        (OK, True, 1.0, True, "ok"),
        # keys in any order; whitespace and one Markdown fence around the whole answer are fine
        ('\n  {"fact": "Tea is hot.", "name": "Tea"}  \n', True, 1.0, True, "ok"),
        ('```json\n{\n  "name": "Tea",\n  "fact": "Tea is hot."\n}\n```', True, 1.0, True, "ok"),
        ('```\n{"name": "Tea", "fact": "Tea is hot."}\n```', True, 1.0, True, "ok"),
        ('{"name": "Té", "fact": "Le thé est chaud."}', True, 1.0, True, "ok"),
        # right keys, but text around the object, or a value that is not a non-empty string
        ('Here is the JSON:\n{"name": "Tea", "fact": "Tea is hot."}', True, jo.NEAR_MISS, False,
         "text around the object"),
        ('```json\n{"name": "Tea", "fact": "Tea is hot."}\n```\nThis object has two keys.', True, jo.NEAR_MISS, False,
         "text around the object"),
        ('{"name": "Tea", "fact": ""}', True, jo.NEAR_MISS, False, "a value not a non-empty string"),
        ('{"name": "Tea", "fact": " - "}', True, jo.NEAR_MISS, False, "a value not a non-empty string"),
        ('{"name": "Tea", "fact": 3}', True, jo.NEAR_MISS, False, "a value not a non-empty string"),
        ('{"name": "Tea", "fact": {"a": "b"}}', True, jo.NEAR_MISS, False, "a value not a non-empty string"),
        # other keys: 0.2 + 0.2 × Jaccard overlap with the required keys
        ('{"name": "Tea"}', True, 0.2 + 0.2 * 1 / 2, False, "other keys"),
        ('{"name": "Tea", "fact": "Hot.", "origin": "China"}', True, 0.2 + 0.2 * 2 / 3, False, "other keys"),
        ('{"Name": "Tea", "Fact": "Hot."}', True, 0.2, False, "other keys"),  # keys are case-sensitive
        ('{"tea": {"name": "Tea", "fact": "Hot."}}', True, 0.2, False, "other keys"),  # nested
        ("{}", True, 0.2, False, "other keys"),
        # not a JSON object at all
        ("Tea is made from leaves.", True, jo.NOT_JSON, False, "no JSON object"),
        ('[{"name": "Tea", "fact": "Hot."}]', True, jo.NOT_JSON, False, "no JSON object"),
        ("{'name': 'Tea', 'fact': 'Hot.'}", True, jo.NOT_JSON, False, "no JSON object"),  # single quotes
        ('{"name": "Tea", "fact": "Hot.",}', True, jo.NOT_JSON, False, "no JSON object"),  # trailing comma
        ('{"name": "Tea", "name": "Cha", "fact": "Hot."}', True, jo.NOT_JSON, False, "no JSON object"),  # dup
        ('"Tea"', True, jo.NOT_JSON, False, "no JSON object"),
        ("", True, 0.0, False, "empty"),
        ("  \n", True, 0.0, False, "empty"),
        # cut by max_new_tokens: not an answer, even when the text so far is a whole object
        (OK, False, 0.0, False, "cut by max_new_tokens"),
        ('{"name": "Tea", "fact": "Tea is', False, 0.0, False, "cut by max_new_tokens"),
    ],
)
def test_judge_exact_scores(response, finished, score, success, reason):
    got = jo.judge(P, response, finished)
    assert got.score == pytest.approx(score, abs=1e-12)
    assert got.success is success
    assert got.details["reason"] == reason
    assert 0.0 <= got.score <= 1.0


def test_parse_answer():
    assert jo.parse_answer(OK) == ("clean", {"name": "Tea", "fact": "Tea is made from leaves."})
    assert jo.parse_answer('Sure! {"a": "b"} Done.') == ("embedded", {"a": "b"})
    assert jo.parse_answer("[1, 2]") == ("clean", [1, 2])
    assert jo.parse_answer("no json here") == ("none", None)
    assert jo.parse_answer('{"a": "b"} and {"c": "d"}') == ("none", None)  # two objects: not one answer


def test_judge_orders_failures_and_reads_the_keys_from_the_prompt():
    scores = [
        jo.judge(P, OK).score,
        jo.judge(P, "JSON: " + OK).score,  # right keys, text around
        jo.judge(P, '{"name": "Tea", "fact": "Hot.", "origin": "China"}').score,  # one key too many
        jo.judge(P, '{"name": "Tea"}').score,  # one key missing
        jo.judge(P, '{"title": "Tea"}').score,  # no key right
        jo.judge(P, "Tea is hot.").score,  # no JSON
        jo.judge(P, OK, finished=False).score,  # cut
    ]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores)
    title = 'Answer in JSON about tea: one object with the keys "title" and "summary", short string values.'
    assert jo.keys_of(title) == ("title", "summary")
    assert jo.judge(title, '{"title": "Tea", "summary": "A drink."}').success
    assert not jo.judge(title, OK).success
    assert jo.keys_of('Use the keys: with the keys "a", "b", and "c".') == ("a", "b", "c")
    assert jo.judge(P, OK).details == {"keys": ["fact", "name"], "found": ["fact", "name"], "json": "clean",
                                       "finished": True, "reason": "ok"}
    with pytest.raises(ValueError, match="with the keys"):
        jo.judge("Describe tea.", OK)


def test_split_by_topic_is_disjoint_and_deterministic():
    task = get_task("json_object")
    train, held = jo.train_prompts(), jo.heldout_prompts()
    assert len(train) == 256 and len(held) == 64
    for p in train + held:
        assert [t for t in jo.TOPICS if t in prompt_text(p)] == [task.topic_of(p)]
    train_topics = {task.topic_of(p) for p in train}
    held_topics = {task.topic_of(p) for p in held}
    assert len(train_topics) == 64 and len(held_topics) == 16
    assert not train_topics & held_topics
    assert train_topics | held_topics == set(jo.TOPICS)
    assert held_topics == set(kw.split_topics()[1])  # the keyword task's split: one held-out set for both
    assert train == jo.train_prompts() and held == jo.heldout_prompts()
    assert len({prompt_text(p) for p in train + held}) == 320
    assert all(p[0]["role"] == "user" and len(p) == 1 for p in train + held)
    assert {task.constraint_of(p) for p in train} == set(jo.KEY_PAIRS) == {task.constraint_of(p) for p in held}
    assert prompt_text(held[0]) == (
        'Describe honey bees as a JSON object with the keys "name" and "fact", each a short string. '
        "Write only the JSON."
    )


def test_registry():
    task = get_task("json_object")
    assert task.judge is jo.judge and task in all_tasks()
    assert task.topics == jo.TOPICS
