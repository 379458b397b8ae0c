"""Small synthetic preference sets: a cyclic (rock–paper–scissors) tournament, word_limit pairs, and two
user groups who disagree (``two_group_pairs``: PAL and CARM, benchmarks/pluralistic.py).

``cyclic_pairs`` is a preference set no scalar reward can fit: every item beats the next ``(n−1)/2``
items around a circle, so every item wins exactly half its comparisons. A Bradley–Terry model's
best fit gives every item the same reward (P = ½ on every pair; at most 2/3 of RPS pairs can be
ordered right by any scalar), while GPM's rotation score s = ⟨R v_i, v_j⟩ fits it exactly.

``word_limit_pairs`` builds reward-model training pairs for the built-in ``word_limit`` task
without sampling a model: for each prompt a response the task's programmatic judge accepts and one
it rejects (too long — often just over the limit — or too short), both built from the same
vocabulary of the prompt's topic; the judge labels which is chosen.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

RPS = ("rock", "paper", "scissors")


def cyclic_pairs(items: tuple[str, ...] = RPS, prompt: str = "Pick one:", repeats: int = 1) -> list[dict]:
    """``prompt/chosen/rejected`` rows of the circular tournament on ``items`` (odd count).

    Item i+d beats item i for d = 1 … (n−1)/2 (mod n): for RPS, paper ≻ rock, scissors ≻ paper,
    rock ≻ scissors.
    """
    n = len(items)
    if n < 3 or n % 2 == 0:
        raise ValueError("a regular cyclic tournament needs an odd number (≥ 3) of items")
    rows = []
    for _ in range(repeats):
        for i in range(n):
            for d in range(1, (n - 1) // 2 + 1):
                rows.append(
                    {"prompt": prompt, "chosen": " " + items[(i + d) % n], "rejected": " " + items[i]}
                )
    return rows


_FILLER = (
    "it",
    "is",
    "a",
    "very",
    "useful",
    "part",
    "of",
    "daily",
    "life",
    "for",
    "many",
    "people",
    "and",
    "it",
    "has",
    "a",
    "long",
    "history",
    "that",
    "most",
    "people",
    "find",
    "quite",
    "interesting",
    "because",
    "it",
    "changes",
    "how",
    "we",
    "live",
    "work",
    "and",
    "learn",
    "every",
    "single",
    "day",
    "in",
    "small",
    "ways",
    "that",
    "add",
    "up",
    "over",
    "time",
)


def _answer(topic: str, words: int, rng: random.Random) -> str:
    head = topic[0].upper() + topic[1:]
    body = [rng.choice(_FILLER) for _ in range(max(0, words - len(topic.split())))]
    return " ".join([head, *body])[:10_000] + "."


def word_limit_pairs(n: int = 160, seed: int = 0, heldout: bool = False) -> list[dict]:
    """``prompt/chosen/rejected`` rows for ``word_limit`` prompts, labelled by the task's judge.

    Compliant: 3 … N words. Non-compliant: N+1 … N+8 words (60%), 2N … 3N words (25%) or 1–2 words
    (15%). The pair is kept only if the judge says the chosen response succeeds and the rejected fails.
    """
    from preftune.tasks import get_task

    task = get_task("word_limit")
    rng = random.Random(seed)
    prompts = task.heldout_prompts() if heldout else task.train_prompts()
    rng.shuffle(prompts)
    rows = []
    for prompt in prompts[:n]:
        limit = task.constraint_of(prompt)
        topic = task.topic_of(prompt) or "it"
        good = _answer(topic, rng.randint(max(3, len(topic.split()) + 1), limit), rng)
        u = rng.random()
        bad_words = (
            rng.randint(limit + 1, limit + 8)
            if u < 0.6
            else rng.randint(2 * limit, 3 * limit)
            if u < 0.85
            else 0
        )
        bad = _answer(topic, bad_words, rng) if bad_words else rng.choice(["Yes.", "Maybe.", "It depends."])
        jg, jb = task.judge(prompt, good), task.judge(prompt, bad)
        if jg.success and not jb.success:
            rows.append(
                {
                    "prompt": prompt,
                    "chosen": [{"role": "assistant", "content": good}],
                    "rejected": [{"role": "assistant", "content": bad}],
                    "chosen_score": jg.score,
                    "rejected_score": jb.score,
                }
            )
    return rows


# ------------------------------------------------------------------------------------------ two groups

TOPICS = (
    "tea", "rivers", "bicycles", "volcanoes", "owls", "bread", "chess", "glaciers", "kites", "bees", "maps",
    "clocks", "deserts", "violins", "comets", "gardens", "trains", "coral", "paper", "lighthouses", "wolves",
    "cheese", "bridges", "tides", "ink", "caves", "pianos", "salt", "islands", "lanterns", "moss", "rain",
    "castles", "honey", "puzzles", "storms", "ferns", "canals", "mirrors", "whales", "orchards", "candles",
    "marbles", "forests", "tunnels", "pottery", "sails", "meteors", "quilts", "harbors", "seeds", "thunder",
    "windmills", "pebbles", "letters", "markets", "ladders", "snow", "mushrooms", "compasses",
)
GROUP_CONTEXTS = {"A": "user group A", "B": "user group B"}
SIGN_OFF = " Hope this helps, friend!"


def _two_answers(topic: str, kind: str, rng: random.Random) -> tuple[str, str]:
    """(what group A prefers, what group B prefers) for one prompt."""
    head = topic[0].upper() + topic[1:]
    first = f"{head} are {rng.choice(['useful', 'common', 'old', 'popular', 'simple'])} in daily life."
    if kind == "length":  # A: one short sentence; B: the same sentence and three more
        more = " ".join(
            f"{head} {rng.choice(['have', 'show', 'need', 'shape'])} "
            + " ".join(rng.choice(_FILLER) for _ in range(rng.randint(6, 9))) + "."
            for _ in range(3)
        )
        return first, f"{first} {more}"
    if kind == "keyword":  # A: the answer with a friendly sign-off; B: the plain answer
        return first + SIGN_OFF, first
    raise ValueError(f"kind must be 'length' or 'keyword', got {kind!r}")


def two_group_pairs(
    n_prompts: int = 24, users_per_group: int = 3, kind: str = "length", seed: int = 0, heldout: bool = False,
    new_user: str | None = None,
) -> list[dict]:
    """Pairs from two groups of users who disagree on every prompt (deterministic in ``seed``).

    ``kind="length"``: group A prefers the short answer, group B the long one; ``"keyword"``: A prefers the
    answer ending with a friendly sign-off, B the plain one. Every user labels the same pair of every prompt,
    so each pair appears once per user with the label of the user's group: no single reward orders more than
    half of them right, a model that knows the user can order all. Rows: prompt/chosen/rejected, ``user_id``
    (``A0``, ``B2``, ...), ``group``, and ``pair_contexts`` (the group as CARM's context). Train prompts use
    the first 40 topics, held-out ones (``heldout``) the other 20. ``new_user``: rows of one extra user of
    group B named so (few-shot adaptation).
    """
    rng = random.Random(f"{seed}-{kind}-{heldout}")
    topics = list(TOPICS[40:] if heldout else TOPICS[:40])
    rng.shuffle(topics)
    asks = ("Tell me about {t}.", "What should I know about {t}?", "Describe {t}.", "Explain {t} to me.")
    prompts = [(rng.choice(asks).format(t=topics[i % len(topics)]), topics[i % len(topics)])
               for i in range(n_prompts)]
    users = [(f"{g}{i}", g) for g in "AB" for i in range(users_per_group)]
    if new_user is not None:
        users = [(new_user, "B")]
    rows = []
    for prompt, topic in prompts:
        a, b = _two_answers(topic, kind, rng)
        for uid, g in users:
            chosen, rejected = (a, b) if g == "A" else (b, a)
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "user_id": uid, "group": g,
                         "pair_contexts": [GROUP_CONTEXTS[g]]})
    return rows


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path
