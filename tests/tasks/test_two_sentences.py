import pytest

from preftune.tasks import Judgement, all_tasks, get_task, prompt_text
from preftune.tasks import two_sentences as ts

P = [{"role": "user", "content": "What is special about tea? Answer in exactly two sentences."}]


@pytest.mark.parametrize(
    "response, finished, expected, reason",
    [
        ("Tea is a drink made from leaves. People enjoy it hot or cold.", True, Judgement(1.0, True), "ok"),
        # both sentences at the 3-word minimum; "!" and "?" end sentences too
        ("Tea is great! Is it good?", True, Judgement(1.0, True), "ok"),
        # closing quotes after the full stop, and a blank line between the sentences
        ('Tea is called "cha." It came from China.\n\nEnd.', True, Judgement(0.25, False), "too many sentences"),
        ('Tea is called "cha." It came from China long ago.', True, Judgement(1.0, True), "ok"),
        # abbreviations and initials do not end a sentence; a lowercase continuation does not either
        ("Dr. Smith drinks tea in the U.S. daily. It has caffeine, e.g. black tea.", True, Judgement(1.0, True), "ok"),
        ("Tea has 2.5 times less caffeine. so it is mild. Many drink it.", True, Judgement(1.0, True), "ok"),
        # failures, each branch
        ("Tea is a drink made from leaves.", True, Judgement(0.25, False), "too few sentences"),
        ("Tea is a drink. It is hot. People love it.", True, Judgement(0.25, False), "too many sentences"),
        (
            "Tea is a drink. It is hot. People love it. It is old.",
            True,
            Judgement(0.5 / 3, False),
            "too many sentences",
        ),
        ("Tea is a drink. Yes.", True, Judgement(0.5, False), "a sentence under 3 words"),
        ("Tea is a drink. It is hot and", True, Judgement(0.5, False), "last sentence unterminated"),
        ("- Tea is a drink.\n- It is hot.", True, Judgement(0.05, False), "a list, not sentences"),
        ("1. Tea is a drink. 2. It is hot.", True, Judgement(0.05, False), "a list, not sentences"),
        ("", True, Judgement(0.0, False), "no words"),
        ("... !", True, Judgement(0.0, False), "no words"),
        # cut by max_new_tokens: not an answer, even when the text so far would pass
        (
            "Tea is a drink made from leaves. People enjoy it hot or cold.",
            False,
            Judgement(0.0, False),
            "cut by max_new_tokens",
        ),
    ],
)
def test_judge_exact_scores(response, finished, expected, reason):
    got = ts.judge(P, response, finished)
    assert got.score == pytest.approx(expected.score, abs=1e-12)
    assert got.success is expected.success
    assert got.details["reason"] == reason
    assert 0.0 <= got.score <= 1.0


def test_split_sentences():
    assert ts.split_sentences("One two three. Four five six! Seven?") == ["One two three.", "Four five six!", "Seven?"]
    assert ts.split_sentences("Mr. Lee met Dr. Ng at 3.30 p.m. today.") == ["Mr. Lee met Dr. Ng at 3.30 p.m. today."]
    assert ts.split_sentences("Wait... Then go.") == ["Wait...", "Then go."]
    assert ts.split_sentences("") == []


def test_judge_orders_failures_and_reads_the_count_from_the_prompt():
    two = "Tea is a drink. It is very hot."
    one, three = "Tea is a drink.", "Tea is a drink. It is hot. People love it."
    scores = [
        ts.judge(P, two).score,
        ts.judge(P, "Tea is a drink. Yes.").score,  # near miss
        ts.judge(P, one).score,  # one off
        ts.judge(P, three + " It is old.").score,  # two off
        ts.judge(P, "- Tea is a drink.\n- It is hot.").score,  # a list
        ts.judge(P, two, finished=False).score,  # cut
    ]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores)
    assert ts.judge("Say hi. Answer in exactly three sentences.", three).success
    assert ts.judge("Say hi. Answer in exactly 1 sentence.", one).success
    assert ts.judge(P, two).details == {"sentences": 2, "required": 2, "finished": True, "reason": "ok"}
    with pytest.raises(ValueError, match="exactly N sentences"):
        ts.judge("Say hi.", two)
    with pytest.raises(ValueError, match="exactly N sentences"):
        ts.judge("Answer in exactly many sentences.", two)


def test_split_by_topic_is_disjoint_and_deterministic():
    task = get_task("two_sentences")
    train, held = ts.train_prompts(), ts.heldout_prompts()
    assert len(train) == 160 and len(held) == 80
    # every prompt mentions exactly one topic (no topic is a substring of another prompt's topic)
    for p in train + held:
        assert [t for t in ts.TOPICS if t in prompt_text(p)] == [task.topic_of(p)]
    train_topics = {task.topic_of(p) for p in train}
    held_topics = {task.topic_of(p) for p in held}
    assert len(train_topics) == 32 and len(held_topics) == 16
    assert not train_topics & held_topics
    assert train_topics | held_topics == set(ts.TOPICS)
    assert train == ts.train_prompts() and held == ts.heldout_prompts()
    assert len({prompt_text(p) for p in train + held}) == 240  # no duplicates
    assert all(p[0]["role"] == "user" and len(p) == 1 for p in train + held)
    assert all(prompt_text(p).endswith(ts.INSTRUCTION) and task.constraint_of(p) == 2 for p in train + held)


def test_registry():
    task = get_task("two_sentences")
    assert task.judge is ts.judge and task in all_tasks()
    assert task.topics == ts.TOPICS
