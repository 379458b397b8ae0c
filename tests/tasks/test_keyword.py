import pytest

from preftune.tasks import all_tasks, get_task, prompt_text
from preftune.tasks import keyword as kw

P = [{"role": "user", "content": "Write about tea in two or three sentences and use the word 'purple'."}]
OK = "Tea leaves turn a deep purple colour when they are dried slowly."


@pytest.mark.parametrize(
    "response, finished, score, success, reason",
    [
        (OK, True, 1.0, True, "ok"),
        # case, punctuation around the word, plural, possessives (both apostrophes), hyphenated compounds
        ("PURPLE tea is rare but very tasty.", True, 1.0, True, "ok"),
        ("Some teas are purple, some are green.", True, 1.0, True, "ok"),
        ("I drank tea with two purples on the side.", True, 1.0, True, "ok"),
        ("The purple's shade in tea is lovely.", True, 1.0, True, "ok"),
        ("The purple’s shade in tea is lovely.", True, 1.0, True, "ok"),
        ("My tea cup has a purple-grey glaze on it.", True, 1.0, True, "ok"),
        ("(purple) tea is made in a few places.", True, 1.0, True, "ok"),
        # a use next to a mention still uses it
        ("The word 'purple' fits: purple tea is rare and prized.", True, 1.0, True, "ok"),
        # failures, each branch
        ("Purple tea!", True, kw.SHORT, False, "under 5 words"),
        ("Here is tea with the word 'purple' in it.", True, kw.MENTION, False, "keyword only mentioned"),
        ('Tea is a drink, "Purple" as you asked.', True, kw.MENTION, False, "keyword only mentioned"),
        ("Tea is a drink; I used the word purple here.", True, kw.MENTION, False, "keyword only mentioned"),
        ("Tea is a drink; “purple” as you requested.", True, kw.MENTION, False, "keyword only mentioned"),
        ("Tea leaves look purpled after drying them.", True, kw.INSIDE, False, "keyword inside another word"),
        ("Ultrapurple light dries the tea leaves fast.", True, kw.INSIDE, False, "keyword inside another word"),
        ("Tea is made from the leaves of a shrub.", True, kw.MISSING, False, "keyword missing"),
        ("Tea leaves look purplish after drying.", True, kw.MISSING, False, "keyword missing"),  # no "purple" in it
        ("", True, 0.0, False, "no words"),
        ("... !", True, 0.0, False, "no words"),
        # cut by max_new_tokens: not an answer, even when the text so far would pass
        (OK, False, 0.0, False, "cut by max_new_tokens"),
    ],
)
def test_judge_exact_scores(response, finished, score, success, reason):
    got = kw.judge(P, response, finished)
    assert got.score == pytest.approx(score, abs=1e-12)
    assert got.success is success
    assert got.details["reason"] == reason
    assert 0.0 <= got.score <= 1.0


@pytest.mark.parametrize(
    "text, word, found",
    [
        ("a 'pirates' tale", "pirate", "mention"),  # the closing quote read as the plural possessive's apostrophe
        ("Pirates' ships are big", "pirate", "use"),
        ("The pirate’s hat", "pirate", "use"),
        ("two whistles blew", "whistle", "use"),
        ("candlestick makers", "candle", "inside"),
        ("he whistled", "whistle", "inside"),
        ("Whistle2 blew", "whistle", "use"),  # digits are boundaries
        ("the words: mirror", "mirror", "mention"),
        ("a sword mirror", "mirror", "use"),  # "sword" is not "word"
        ("", "mirror", "missing"),
    ],
)
def test_find_keyword(text, word, found):
    assert kw.find_keyword(text, word) == found


def test_judge_orders_failures_and_reads_the_word_from_the_prompt():
    scores = [
        kw.judge(P, OK).score,
        kw.judge(P, "Purple tea!").score,  # used, too short
        kw.judge(P, "Here is tea with the word 'purple' in it.").score,  # mentioned
        kw.judge(P, "Tea leaves look purpled after drying them.").score,  # inside another word
        kw.judge(P, "Tea is made from the leaves of a shrub.").score,  # missing
        kw.judge(P, OK, finished=False).score,  # cut
    ]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores)
    assert kw.judge("Describe tea briefly, using the word 'Ladder'.", "A ladder helps you pick tea leaves.").success
    assert not kw.judge("Describe tea briefly, using the word 'ladder'.", OK).success
    assert kw.judge(P, OK).details == {"keyword": "purple", "found": "use", "words": 12, "finished": True,
                                       "reason": "ok"}
    with pytest.raises(ValueError, match="the word"):
        kw.judge("Write about tea.", OK)


def test_words_and_topics_are_fit_for_the_rules():
    assert len(set(kw.WORDS)) == len(kw.WORDS) == 16
    # the plural rule (word + s) holds for every keyword; none is inside another keyword or a topic
    assert all(w.isalpha() and w.islower() and not w.endswith(("s", "x", "y", "ch", "sh")) for w in kw.WORDS)
    for w in kw.WORDS:
        assert not any(w in other for other in kw.WORDS if other != w)
        assert not any(w in t or t in w for t in kw.TOPICS)


def test_split_by_topic_is_disjoint_and_deterministic():
    task = get_task("keyword")
    train, held = kw.train_prompts(), kw.heldout_prompts()
    assert len(train) == 256 and len(held) == 64
    # every prompt mentions exactly one topic (no topic is inside another, a keyword or a template)
    for p in train + held:
        assert [t for t in kw.TOPICS if t in prompt_text(p)] == [task.topic_of(p)]
    train_topics = {task.topic_of(p) for p in train}
    held_topics = {task.topic_of(p) for p in held}
    assert len(train_topics) == 64 and len(held_topics) == 16
    assert not train_topics & held_topics
    assert train_topics | held_topics == set(kw.TOPICS)
    assert train == kw.train_prompts() and held == kw.heldout_prompts()
    assert len({prompt_text(p) for p in train + held}) == 320  # no duplicates
    assert all(p[0]["role"] == "user" and len(p) == 1 for p in train + held)
    # the word is read back exactly; both splits ask for every word, a topic for 4 different ones
    assert {task.constraint_of(p) for p in train} == set(kw.WORDS) == {task.constraint_of(p) for p in held}
    for topic in held_topics:
        assert len({task.constraint_of(p) for p in held if task.topic_of(p) == topic}) == 4
    assert prompt_text(held[0]) == "Write about honey bees in two or three sentences and use the word 'purple'."


def test_registry():
    task = get_task("keyword")
    assert task.judge is kw.judge and task in all_tasks()
    assert task.topics == kw.TOPICS
