"""``keyword``: "Write about {topic} … and use the word '{w}'." — a required-content constraint.

Why this task: its judge is of another kind than ``word_limit`` (a length) and ``two_sentences`` (a
format): the answer must contain a given word that has nothing to do with the topic (drawn per prompt
from ``WORDS``), so the model has to bend its answer around an instruction instead of writing what the
topic suggests. SmolLM2-135M-Instruct often ignores the word, echoes it in quotes ("… the word
'whistle' as you requested") or runs past ``max_new_tokens``. Base success on the 64 held-out prompts
(``MAX_NEW_TOKENS`` new tokens, the online loop's held-out decoding, 4 samples each): 21.9% [17.2, 27.3],
greedy 26.6% [17.3, 38.5] (docs/tasks.md, benchmarks/task_baselines.py).

Split: by topic. Every 5th of the 80 ``TOPICS`` (fixed order) is held out: 64 training topics × 4
templates = 256 training prompts, 16 held-out topics × 4 = 64 held-out prompts. The keyword of a prompt
cycles through ``WORDS`` with the topic and template, so both splits see every word (the split is about
what the answer is about, not about the word).

How the word is matched (``find_keyword``), decided so that the judge is exact and cannot be talked into
a pass:
- case-insensitive, on whole words: letters on either side make it another word ("candlestick" does not
  use "candle"); digits, punctuation, hyphens and apostrophes are boundaries ("purple-grey" uses
  "purple");
- inflections: the word itself, its plural with -s or -es, and its possessive ('s, s', with ' or ’) count;
  other derived forms (-ed, -ing, -ish, compounds) count as the word inside another word. Every word in
  ``WORDS`` is a noun or adjective whose plural is the word + s, so the rule is the same for all;
- a use, not a mention: an occurrence wrapped in quotation marks ('purple', "purple", “purple”) or right
  after "word"/"words" (the prompt's phrase echoed back: "the word purple") is a mention; it does not
  satisfy the instruction by itself.

Judge (the keyword is read from the prompt, "the word '{w}'"):
- success, score 1: the answer ended (EOS, not cut by ``max_new_tokens``), has at least ``MIN_WORDS``
  words and uses the keyword at least once (a use as above);
- uses the keyword but under ``MIN_WORDS`` words ("Purple!"): 0.5;
- only mentions the keyword (quoted, or "the word …"): 0.3;
- the keyword only inside another word ("candlestick", "whistled"): 0.2;
- ended, no trace of the keyword: 0.1;
- no word at all, or cut by ``max_new_tokens``: 0 (not an answer; a cut answer fails even if it used the
  word).
A word is a whitespace-separated piece with at least one letter or digit (``word_count``).
"""

from __future__ import annotations

import re

from preftune.tasks.base import Judgement, Prompt, Task, prompt_text, register, word_count

MIN_WORDS = 5  # "Purple bicycles." is not writing about bicycles
MAX_NEW_TOKENS = 48  # the answer length the base rates in docs/tasks.md were measured at
SHORT, MENTION, INSIDE, MISSING = 0.5, 0.3, 0.2, 0.1

# Everyday subjects; no topic is a substring of another, of a keyword or of a template, so
# ``Task.topic_of`` finds exactly one (a test checks every prompt).
TOPICS = (
    "the moon", "coffee", "volcanoes", "bicycles", "honey bees", "the internet", "rainbows", "sleep",
    "recycling", "chess", "penguins", "bread", "electric cars", "the ocean", "vaccines", "libraries",
    "gardening", "the heart", "earthquakes", "music lessons", "solar panels", "dinosaurs", "tea",
    "public transport", "credit cards", "snow", "the brain", "pizza", "airplanes", "forests", "email", "yoga",
    "batteries", "deserts", "football", "cheese", "rivers", "smartphones", "photosynthesis", "museums",
    "dogs", "cats", "clouds", "passwords", "bridges", "chocolate", "running", "the stock market", "glaciers",
    "vitamins", "trains", "wind turbines", "spiders", "meditation", "the printing press", "rice", "lightning",
    "savings accounts", "elephants", "the sun", "microwaves", "sharks", "maps", "umbrellas",
    "islands", "owls", "marathons", "windmills", "lighthouses", "board games", "clocks", "frogs",
    "tornadoes", "coral reefs", "castles", "postcards", "submarines", "jazz", "telescopes", "pottery",
)

# Concrete, common words unrelated to most topics; each one's plural is the word + s.
WORDS = (
    "purple", "whistle", "ladder", "pillow", "velvet", "mirror", "button", "lantern",
    "marble", "pirate", "giraffe", "trumpet", "blanket", "crayon", "tulip", "parrot",
)

TEMPLATES = (
    "Write about {t} in two or three sentences and use the word '{w}'.",
    "Tell me something interesting about {t} in a few sentences. Use the word '{w}' in your answer.",
    "Describe {t} briefly, using the word '{w}'.",
    "Write a short paragraph about {t} that includes the word '{w}'.",
)

_KEYWORD_RE = re.compile(r"the word '([^'\s]+)'", re.IGNORECASE)
_LETTER = r"[^\W\d_]"  # a letter of any script: what makes a longer word
_SUFFIXES = r"(?:es|s|['’]s|s['’])?"
_QUOTES = "'\"“”‘’`"
_AFTER_WORD = re.compile(r"\bwords?\s*[:,]?\s*$", re.IGNORECASE)


def make_prompt(topic: str, template_index: int, word: str) -> Prompt:
    return [{"role": "user", "content": TEMPLATES[template_index].format(t=topic, w=word)}]


def split_topics(heldout_every: int = 5) -> tuple[list[str], list[str]]:
    """(train topics, held-out topics): every ``heldout_every``-th topic, in a fixed order, is held out."""
    heldout = [t for i, t in enumerate(TOPICS) if i % heldout_every == heldout_every - 1]
    train = [t for t in TOPICS if t not in heldout]
    return train, heldout


def _prompts(topics: list[str]) -> list[Prompt]:
    # The keyword cycles with the topic's position in TOPICS and the template, so a topic's 4 prompts ask
    # for 4 different words.
    return [make_prompt(t, k, WORDS[(len(TEMPLATES) * TOPICS.index(t) + k) % len(WORDS)])
            for t in topics for k in range(len(TEMPLATES))]


def train_prompts() -> list[Prompt]:
    """256 prompts on 64 topics × 4 templates, each with its keyword."""
    return _prompts(split_topics()[0])


def heldout_prompts() -> list[Prompt]:
    """64 prompts on the 16 held-out topics (none of them appears in a training prompt)."""
    return _prompts(split_topics()[1])


def keyword_of(prompt: Prompt | str) -> str:
    """The required word, lowercased (ValueError when the prompt does not say "the word '…'")."""
    m = _KEYWORD_RE.search(prompt_text(prompt))
    if m is None:
        raise ValueError("keyword judge: the prompt does not say \"the word '…'\"")
    return m.group(1).lower()


def _is_mention(text: str, start: int, end: int) -> bool:
    """Quoted ('purple', "purple's") or right after "word(s)": the word named, not used."""
    before, after = text[:start], text[end:]
    # the closing quote may have been read as the plural possessive's apostrophe ('pirates')
    closed = (after[:1] != "" and after[0] in _QUOTES) or text[end - 1] in _QUOTES
    quoted = before[-1:] != "" and before[-1] in _QUOTES and closed
    return quoted or _AFTER_WORD.search(before.rstrip(_QUOTES + " ")) is not None


def find_keyword(text: str, word: str) -> str:
    """How ``text`` holds ``word``: "use", "mention", "inside" (only within longer words) or "missing"."""
    w = re.escape(word)
    whole = re.compile(rf"(?<!{_LETTER}){w}{_SUFFIXES}(?!{_LETTER})", re.IGNORECASE)
    found = list(whole.finditer(text))
    if any(not _is_mention(text, m.start(), m.end()) for m in found):
        return "use"
    if found:
        return "mention"
    return "inside" if re.search(w, text, re.IGNORECASE) else "missing"


def judge(prompt: Prompt | str, response: str, finished: bool = True) -> Judgement:
    word = keyword_of(prompt)
    words = word_count(response)
    how = find_keyword(response, word)
    details = {"keyword": word, "found": how, "words": words, "finished": finished}
    if not finished:
        return Judgement(0.0, False, {**details, "reason": "cut by max_new_tokens"})
    if words == 0:
        return Judgement(0.0, False, {**details, "reason": "no words"})
    if how == "use":
        if words < MIN_WORDS:
            return Judgement(SHORT, False, {**details, "reason": f"under {MIN_WORDS} words"})
        return Judgement(1.0, True, {**details, "reason": "ok"})
    reason, score = {"mention": ("keyword only mentioned", MENTION), "inside": ("keyword inside another word",
                     INSIDE), "missing": ("keyword missing", MISSING)}[how]
    return Judgement(score, False, {**details, "reason": reason})


TASK = register(
    Task(
        name="keyword",
        description="Write a few sentences about an everyday topic that use a given unrelated word "
        "(whole word, plural or possessive; quoting it is not using it); the answer must end.",
        train_prompts=train_prompts,
        heldout_prompts=heldout_prompts,
        judge=judge,
        topics=TOPICS,
        constraint=keyword_of,
        max_new_tokens=MAX_NEW_TOKENS,
    )
)
