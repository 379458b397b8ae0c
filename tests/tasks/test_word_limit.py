import pytest

from preftune.tasks import Judgement, all_tasks, get_task, prompt_text
from preftune.tasks import word_limit as wl


def P(limit: int) -> list[dict]:
    return [{"role": "user", "content": f"What is tea? Answer in at most {limit} words."}]


@pytest.mark.parametrize(
    "response, finished, expected",
    [
        ("Tea is a drink made from leaves.", True, Judgement(1.0, True)),  # 7 words
        ("one two three", True, Judgement(1.0, True)),  # exactly the minimum
        ("one two three four five six seven eight nine ten", True, Judgement(1.0, True)),  # exactly N
        (
            "one two three four five six seven eight nine ten eleven twelve",
            True,
            Judgement(0.5 * 10 / 12, False),
        ),
        ("a " * 40, True, Judgement(0.5 * 10 / 40, False)),
        ("Yes.", True, Judgement(0.5 / 3, False)),
        ("Yes indeed", True, Judgement(0.5 * 2 / 3, False)),
        ("", True, Judgement(0.0, False)),
        ("Tea is a drink.", False, Judgement(0.0, False)),  # cut by max_new_tokens: not an answer
        ("Tea — a drink - from leaves !", True, Judgement(1.0, True)),  # dashes and "!" are not words
    ],
)
def test_judge_exact_scores(response, finished, expected):
    got = wl.judge(P(10), response, finished)
    assert got.score == pytest.approx(expected.score, abs=1e-12)
    assert got.success is expected.success
    assert 0.0 <= got.score <= 1.0


def test_judge_orders_failures_and_reads_the_limit_from_the_prompt():
    long12 = " ".join(["w"] * 12)
    assert wl.judge(P(15), long12).success
    assert not wl.judge(P(10), long12).success
    # further over the limit scores lower; an ended answer beats a cut one
    assert (
        wl.judge(P(10), "w " * 11).score
        > wl.judge(P(10), "w " * 30).score
        > wl.judge(P(10), "w " * 5, False).score
    )
    assert wl.judge(P(10), "w w w").details == {"words": 3, "limit": 10, "finished": True, "reason": "ok"}
    assert wl.judge("Say hi. Answer in at most 12 words.", "Hi there, friend!").details["limit"] == 12
    with pytest.raises(ValueError, match="at most N words"):
        wl.judge("Say hi.", "Hi")


def _topic_of(prompt) -> str:
    text = prompt_text(prompt)
    matches = [t for t in wl.TOPICS if f" {t}?" in text]
    assert len(matches) == 1, text
    return matches[0]


def test_split_by_topic_is_disjoint_and_deterministic():
    train, held = wl.train_prompts(), wl.heldout_prompts()
    assert len(train) == 240 and len(held) == 80
    train_topics = {_topic_of(p) for p in train}
    held_topics = {_topic_of(p) for p in held}
    assert not train_topics & held_topics
    assert train_topics | held_topics == set(wl.TOPICS)
    assert train == wl.train_prompts() and held == wl.heldout_prompts()
    assert len({prompt_text(p) for p in train + held}) == 320  # no duplicates
    assert {wl.limit_of(p) for p in train} == set(wl.LIMITS) == {wl.limit_of(p) for p in held}
    assert all(p[0]["role"] == "user" and len(p) == 1 for p in train + held)


def test_registry():
    task = get_task("word_limit")
    assert task.judge is wl.judge and task in all_tasks()
    with pytest.raises(KeyError, match="word_limit"):
        get_task("nope")


def test_task_interface_gives_topic_and_limit_without_the_module():
    # Judges and synthetic data reach a task by name only: topic_of/constraint_of must agree with the
    # exact topic each prompt was built from and with the limit the judge reads.
    task = get_task("word_limit")
    assert task.topics == wl.TOPICS
    for p in wl.train_prompts() + wl.heldout_prompts():
        assert task.topic_of(p) == _topic_of(p)
        assert task.constraint_of(p) == wl.limit_of(p)
    assert task.topic_of("Tell me about nothing in particular.") is None
    with pytest.raises(ValueError, match="at most N words"):
        task.constraint_of("Say hi.")


def test_word_count_is_shared_by_the_judge_and_the_evaluation():
    from preftune.eval.policy_eval import word_count as eval_word_count
    from preftune.tasks import word_count

    assert eval_word_count is word_count
    assert word_count("Tea — a drink - from leaves !") == 5
    assert wl.judge(P(10), "Tea — a drink - from leaves !").details["words"] == 5
