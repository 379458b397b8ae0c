"""``two_sentences``: "… Answer in exactly two sentences." on everyday questions.

Why this task: a format instruction, not a length limit, that SmolLM2-135M-Instruct rarely follows.
Sampled at temperature 0.8 / top-p 0.95 with 48 new tokens, most of its ended answers are one
sentence, some run on and are cut by ``max_new_tokens``, a few are lists; exactly two complete
sentences is rare. Stopping earlier does not help (one sentence fails), so a policy has to learn the
instruction itself: a second, short sentence, then EOS.

Measured on the base model (``load_model("smollm2-135m-instruct")``, float32, 2 CPU threads), on
the first 64 held-out and the first 64 training prompts, Wilson 95% intervals:

- sampled (n = 4, temperature 0.8, top-p 0.95, 48 new tokens, seed 0, batch 48): held-out 7.8%
  [5.1, 11.8] (20/256), training 10.2% [7.0, 14.5] (26/256). Held-out failures: 180 one sentence
  (ended), 48 cut by ``max_new_tokens``, 6 lists, 1 unterminated, 1 three sentences;
- greedy (temperature 0, n = 1, 48 new tokens): held-out 10.9% [5.4, 20.9] (7/64), training 4.7%
  [1.6, 12.9] (3/64).

The templates were picked by measurement: "What is a common misconception about …?" (36%) and
"How would you explain … to a child?" (20%) invite two sentences by themselves and were left out.
The command (``python - <<'EOF'`` … ``EOF``)::

    from preftune.eval.policy_eval import wilson
    from preftune.model import load_model
    from preftune.online.generate import generate
    from preftune.tasks import get_task

    task = get_task("two_sentences")
    model, tok = load_model("smollm2-135m-instruct")
    for prompts in (task.heldout_prompts()[:64], task.train_prompts()[:64]):
        for kw in (dict(n=4, temperature=0.8, top_p=0.95), dict(n=1, temperature=0.0)):
            g = generate(model, tok, prompts, max_new_tokens=48, seed=0, batch_size=48, **kw)
            js = [task.judge(p, s.text, s.finished) for p, row in zip(prompts, g.samples) for s in row]
            print(wilson(sum(j.success for j in js), len(js)))

Judge (N = 2 is read from the prompt, "exactly N sentences" with N written as a word or digits):
- success, score 1: the response ended (EOS, not cut by ``max_new_tokens``), is prose (no list),
  has exactly N sentences, each of at least 3 words, and the last one ends with . ! or ?;
- exactly N sentences but one under 3 words, or the last one unterminated: 0.5 (a near miss);
- n ≠ N sentences (ended, prose): ``0.5 / (1 + |n − N|)`` (0.25 one off, lower further off);
- a list (a line starting with "-", "*", "•", "1." or "1)"): 0.05 (not sentences at all);
- no word at all, or cut by ``max_new_tokens``: 0 (not an answer).

Sentences: the text is split into whitespace-separated tokens; a token ending in . ! or ? (then
optionally closing quotes or brackets) ends a sentence unless it is a known abbreviation ("Dr.",
"e.g.", initials like "U.S.") or the next token starts with a lowercase letter. Pieces without a
word (a letter or digit) are not sentences. A word is a whitespace-separated piece with at least one
letter or digit (``word_count``).
"""

from __future__ import annotations

import re

from preftune.tasks.base import Judgement, Prompt, Task, prompt_text, register, word_count

MIN_WORDS = 3  # per sentence: "Yes. No." is not a two-sentence answer
NEAR_MISS = 0.5
LIST_SCORE = 0.05

# Everyday subjects (the templates read well with singular, plural and mass nouns alike; no topic
# is a substring of another, so ``Task.topic_of`` finds exactly one). The split is by subject, so a
# held-out question is about something no training prompt mentions.
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
    "solar panels",
    "dinosaurs",
    "public transport",
    "snow",
    "pizza",
    "airplanes",
    "forests",
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
    "clouds",
    "passwords",
    "bridges",
    "chocolate",
    "glaciers",
    "vitamins",
    "trains",
    "spiders",
    "meditation",
    "lightning",
    "elephants",
    "maps",
)

TEMPLATES = (
    "What is special about {t}?",
    "Why should people care about {t}?",
    "What should a beginner know about {t}?",
    "What is one interesting fact about {t}?",
    "How are people's lives affected by {t}?",
)

INSTRUCTION = "Answer in exactly two sentences."

_NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5}
_COUNT_RE = re.compile(r"exactly (\w+) sentences?\b", re.IGNORECASE)
_ENDS_SENTENCE = re.compile(r"[.!?][\"'”’)\]]*$")
_INITIALS = re.compile(r"^(?:[A-Za-z]\.){2,}$")  # "U.S.", "e.g.", "W.B."
_ABBREVIATIONS = frozenset({"mr.", "mrs.", "ms.", "dr.", "prof.", "st.", "mt.", "jr.", "sr.", "vs.", "approx."})
_LIST_LINE = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s")


def make_prompt(topic: str, template_index: int) -> Prompt:
    question = TEMPLATES[template_index].format(t=topic)
    return [{"role": "user", "content": f"{question} {INSTRUCTION}"}]


def split_topics(heldout_every: int = 3) -> tuple[list[str], list[str]]:
    """(train topics, held-out topics): every ``heldout_every``-th topic, in a fixed order, is held out."""
    heldout = [t for i, t in enumerate(TOPICS) if i % heldout_every == heldout_every - 1]
    train = [t for t in TOPICS if t not in heldout]
    return train, heldout


def _prompts(topics: list[str]) -> list[Prompt]:
    return [make_prompt(topic, k) for topic in topics for k in range(len(TEMPLATES))]


def train_prompts() -> list[Prompt]:
    """160 prompts on 32 topics × 5 question templates."""
    return _prompts(split_topics()[0])


def heldout_prompts() -> list[Prompt]:
    """80 prompts on the 16 held-out topics (none of them appears in a training prompt)."""
    return _prompts(split_topics()[1])


def sentences_of(prompt: Prompt | str) -> int:
    """N of "exactly N sentences" in the prompt (ValueError when the prompt does not say it)."""
    m = _COUNT_RE.search(prompt_text(prompt))
    if m is not None:
        word = m.group(1).lower()
        if word.isdigit():
            return int(word)
        if word in _NUMBERS:
            return _NUMBERS[word]
    raise ValueError("two_sentences judge: the prompt does not say 'exactly N sentences'")


def _ends_sentence(token: str, next_token: str | None) -> bool:
    if not _ENDS_SENTENCE.search(token):
        return False
    bare = token.rstrip("\"'”’)]")
    if bare.lower() in _ABBREVIATIONS or _INITIALS.match(bare):
        return False
    return next_token is None or not next_token[0].islower()


def split_sentences(text: str) -> list[str]:
    """The sentences of ``text`` by the rule in the module docstring (pieces without a word dropped)."""
    tokens = text.split()
    out, current = [], []
    for i, token in enumerate(tokens):
        current.append(token)
        if _ends_sentence(token, tokens[i + 1] if i + 1 < len(tokens) else None):
            out.append(" ".join(current))
            current = []
    if current:
        out.append(" ".join(current))
    return [s for s in out if word_count(s) > 0]


def is_list(text: str) -> bool:
    """Any line that starts with a bullet or a number marker ("- ", "* ", "• ", "1. ", "1) ")."""
    return any(_LIST_LINE.match(line) for line in text.splitlines())


def judge(prompt: Prompt | str, response: str, finished: bool = True) -> Judgement:
    want = sentences_of(prompt)
    sentences = split_sentences(response)
    n = len(sentences)
    details = {"sentences": n, "required": want, "finished": finished}
    if not finished:
        return Judgement(0.0, False, {**details, "reason": "cut by max_new_tokens"})
    if n == 0:
        return Judgement(0.0, False, {**details, "reason": "no words"})
    if is_list(response):
        return Judgement(LIST_SCORE, False, {**details, "reason": "a list, not sentences"})
    if n != want:
        reason = "too few sentences" if n < want else "too many sentences"
        return Judgement(NEAR_MISS / (1 + abs(n - want)), False, {**details, "reason": reason})
    if not _ENDS_SENTENCE.search(sentences[-1]):
        return Judgement(NEAR_MISS, False, {**details, "reason": "last sentence unterminated"})
    if min(word_count(s) for s in sentences) < MIN_WORDS:
        return Judgement(NEAR_MISS, False, {**details, "reason": f"a sentence under {MIN_WORDS} words"})
    return Judgement(1.0, True, {**details, "reason": "ok"})


TASK = register(
    Task(
        name="two_sentences",
        description="Answer an everyday question in exactly two complete sentences (prose, not a list); "
        "the answer must end.",
        train_prompts=train_prompts,
        heldout_prompts=heldout_prompts,
        judge=judge,
        topics=TOPICS,
        constraint=sentences_of,
        max_new_tokens=48,
    )
)
