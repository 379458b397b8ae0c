"""``word_limit``: "… Answer in at most N words." on everyday questions.

Why this task: SmolLM2-135M-Instruct, sampled at temperature 0.8 / top-p 0.95, keeps to the limit
only sometimes (measured: 23% of 48 held-out samples, 30% of 96 training samples; about 11% at
N = 10 and 45% at N = 15 with 64 new tokens): it likes to explain. The judge is exact, and the fix
(short, complete answers) is something a few dozen LoRA DPO steps on best-vs-worst pairs can learn.

Judge (N is read from the prompt):
- success, score 1: the response ended (EOS, not cut by ``max_new_tokens``) and 3 ≤ words ≤ N;
- ended but too long: ``0.5 · N / words`` (in (0, 0.5): the further over, the worse);
- ended but under 3 words: ``0.5 · words / 3`` (a bare "Yes." is not an answer);
- cut by ``max_new_tokens``: 0 (not an answer at all).
A word is a whitespace-separated piece with at least one letter or digit ("—" and "-" are not).
"""

from __future__ import annotations

import re

from preftune.tasks.base import Judgement, Prompt, Task, prompt_text, register, word_count

MIN_WORDS = 3
LIMITS = (10, 12, 15)

# Everyday subjects (the templates read well with singular and plural alike). The split is by
# subject, so a held-out question is about something no training prompt mentions.
TOPICS = (
    "the moon",
    "coffee",
    "volcanoes",
    "bicycles",
    "honey bees",
    "the internet",
    "rainbows",
    "sleep",
    "recycling",
    "chess",
    "penguins",
    "bread",
    "electric cars",
    "the ocean",
    "vaccines",
    "libraries",
    "gardening",
    "the heart",
    "earthquakes",
    "music lessons",
    "solar panels",
    "dinosaurs",
    "tea",
    "public transport",
    "credit cards",
    "snow",
    "the brain",
    "pizza",
    "airplanes",
    "forests",
    "email",
    "yoga",
    "batteries",
    "deserts",
    "football",
    "cheese",
    "rivers",
    "smartphones",
    "photosynthesis",
    "museums",
    "dogs",
    "cats",
    "clouds",
    "passwords",
    "bridges",
    "chocolate",
    "running",
    "the stock market",
    "glaciers",
    "vitamins",
    "trains",
    "wind turbines",
    "spiders",
    "meditation",
    "the printing press",
    "rice",
    "lightning",
    "savings accounts",
    "elephants",
    "the sun",
    "microwaves",
    "sharks",
    "maps",
    "umbrellas",
)

TEMPLATES = (
    "What is special about {t}?",
    "Why should people care about {t}?",
    "How are people's lives affected by {t}?",
    "What is one interesting fact about {t}?",
    "What should a beginner know about {t}?",
)

_LIMIT_RE = re.compile(r"at most (\d+) words", re.IGNORECASE)


def make_prompt(topic: str, template_index: int, limit: int) -> Prompt:
    question = TEMPLATES[template_index].format(t=topic)
    return [{"role": "user", "content": f"{question} Answer in at most {limit} words."}]


def split_topics(heldout_every: int = 4) -> tuple[list[str], list[str]]:
    """(train topics, held-out topics): every ``heldout_every``-th topic, in a fixed order, is held out."""
    heldout = [t for i, t in enumerate(TOPICS) if i % heldout_every == heldout_every - 1]
    train = [t for t in TOPICS if t not in heldout]
    return train, heldout


def _prompts(topics: list[str]) -> list[Prompt]:
    out = []
    for ti, topic in enumerate(topics):
        for k in range(len(TEMPLATES)):
            out.append(make_prompt(topic, k, LIMITS[(ti + k) % len(LIMITS)]))
    return out


def train_prompts() -> list[Prompt]:
    """240 prompts on 48 topics × 5 question templates, limits cycling over 10/12/15 words."""
    return _prompts(split_topics()[0])


def heldout_prompts() -> list[Prompt]:
    """80 prompts on the 16 held-out topics (none of them appears in a training prompt)."""
    return _prompts(split_topics()[1])


def limit_of(prompt: Prompt | str) -> int:
    m = _LIMIT_RE.search(prompt_text(prompt))
    if m is None:
        raise ValueError("word_limit judge: the prompt does not say 'at most N words'")
    return int(m.group(1))


def judge(prompt: Prompt | str, response: str, finished: bool = True) -> Judgement:
    limit = limit_of(prompt)
    words = word_count(response)
    details = {"words": words, "limit": limit, "finished": finished}
    if not finished:
        return Judgement(0.0, False, {**details, "reason": "cut by max_new_tokens"})
    if words > limit:
        return Judgement(0.5 * limit / words, False, {**details, "reason": "too long"})
    if words < MIN_WORDS:
        return Judgement(0.5 * words / MIN_WORDS, False, {**details, "reason": "too short"})
    return Judgement(1.0, True, {**details, "reason": "ok"})


TASK = register(
    Task(
        name="word_limit",
        description="Answer an everyday question in at most N words (N in 10/12/15); the answer must end.",
        train_prompts=train_prompts,
        heldout_prompts=heldout_prompts,
        judge=judge,
        topics=TOPICS,
        constraint=limit_of,
    )
)
