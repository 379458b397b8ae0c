"""``json_object``: "Describe {topic} as a JSON object with the keys "a" and "b". …" — a structured format.

Why this task: a format judge of another kind than ``two_sentences`` (prose) — the answer must be
machine-readable: one JSON object, nothing else, with exactly the keys the prompt names (a pair drawn per
prompt from ``KEY_PAIRS``) and a non-empty string under each. SmolLM2-135M-Instruct knows JSON but often
adds an explanation after it, invents other keys or nests the object, or runs past ``max_new_tokens``.
Base success on the 64 held-out prompts (``MAX_NEW_TOKENS`` new tokens, the online loop's held-out decoding,
4 samples each): 16.0% [12.0, 21.0], greedy 9.4% [4.4, 19.0] (docs/tasks.md, benchmarks/task_baselines.py).

Split: by topic, the topics and split of ``keyword`` (every 5th of its 80 topics held out): 64 training
topics × 4 templates = 256 training prompts, 16 held-out topics × 4 = 64 held-out prompts. The key pair
cycles with the topic and template, so both splits see every pair.

Reading the answer (``parse_answer``): surrounding whitespace is ignored, and so is one Markdown code
fence around the whole answer ("```json … ```" or "``` … ```"; models write it by habit and a program
reads through it as easily). The rest must be one JSON value (``json.loads``, strict JSON: no comments,
no single quotes, no trailing commas). When it is not, the text from the first "{" to the last "}" is
tried: an object found that way is "embedded" in other text. Duplicate keys make the object invalid.

Judge (the keys are read from the prompt, 'with the keys "a" and "b"'):
- success, score 1: the answer ended (EOS, not cut by ``max_new_tokens``), is one JSON object (a fence
  allowed, nothing else), its keys are exactly the required ones (any order), and each value is a string
  with at least one letter or digit;
- the right keys, but other text around the object, or a value that is not a non-empty string: 0.5;
- a JSON object with other keys: ``0.2 + 0.2 · J`` where J is the Jaccard overlap of its keys with the
  required ones (0.2 none shared, below 0.4 when some are);
- ended, but no JSON object (prose, a list, an unparseable object): 0.1;
- no text, or cut by ``max_new_tokens``: 0 (not an answer).
"""

from __future__ import annotations

import json
import re
from typing import Any

from preftune.tasks.base import Judgement, Prompt, Task, prompt_text, register
from preftune.tasks.keyword import TOPICS, split_topics

MAX_NEW_TOKENS = 48  # the answer length the base rates in docs/tasks.md were measured at
NEAR_MISS, OTHER_KEYS, NOT_JSON = 0.5, 0.2, 0.1

KEY_PAIRS = (
    ("name", "fact"),
    ("title", "summary"),
    ("subject", "description"),
    ("topic", "detail"),
)

# "short" values: without them most answers ran past 48 tokens (a paragraph per value, nested objects) and
# base success on the held-out prompts was 7.0% [4.5, 10.8]; with them 16.0% [12.0, 21.0] (docs/tasks.md).
TEMPLATES = (
    'Describe {t} as a JSON object with the keys "{a}" and "{b}", each a short string. Write only the JSON.',
    'Give one fact about {t} as a JSON object with the keys "{a}" and "{b}" (short strings). '
    "Reply with the JSON only.",
    'Answer in JSON about {t}: one object with the keys "{a}" and "{b}", short string values, and no other text.',
    'Return a JSON object with the keys "{a}" and "{b}" (a few words each) that describes {t}. '
    "Output only the JSON.",
)

_KEYS_RE = re.compile(r'with the keys ((?:"[^"]+"(?:, | and |, and ))*"[^"]+")', re.IGNORECASE)
_FENCE_RE = re.compile(r"\A```[A-Za-z]*[ \t]*\n?(.*?)\n?```\Z", re.DOTALL)


def make_prompt(topic: str, template_index: int, keys: tuple[str, str]) -> Prompt:
    return [{"role": "user", "content": TEMPLATES[template_index].format(t=topic, a=keys[0], b=keys[1])}]


def _prompts(topics: list[str]) -> list[Prompt]:
    return [make_prompt(t, k, KEY_PAIRS[(TOPICS.index(t) + k) % len(KEY_PAIRS)])
            for t in topics for k in range(len(TEMPLATES))]


def train_prompts() -> list[Prompt]:
    """256 prompts on 64 topics × 4 templates, each with its pair of keys."""
    return _prompts(split_topics()[0])


def heldout_prompts() -> list[Prompt]:
    """64 prompts on the 16 held-out topics (none of them appears in a training prompt)."""
    return _prompts(split_topics()[1])


def keys_of(prompt: Prompt | str) -> tuple[str, ...]:
    """The required keys, in the prompt's order (ValueError when it does not say 'with the keys "…"')."""
    m = _KEYS_RE.search(prompt_text(prompt))
    if m is None:
        raise ValueError('json_object judge: the prompt does not say \'with the keys "a" and "b"\'')
    return tuple(re.findall(r'"([^"]+)"', m.group(1)))


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise _DuplicateKey("duplicate key")
    return dict(pairs)


def _loads(text: str) -> tuple[bool, Any]:
    try:
        return True, json.loads(text, object_pairs_hook=_no_duplicates)
    except ValueError:  # json.JSONDecodeError and _DuplicateKey
        return False, None


def parse_answer(text: str) -> tuple[str, Any]:
    """``("clean", value)`` when the answer (one fence allowed) is one JSON value, ``("embedded", dict)``
    when an object spans its first "{" to its last "}" within other text, ``("none", None)`` otherwise."""
    body = text.strip()
    fenced = _FENCE_RE.match(body)
    if fenced:
        body = fenced.group(1).strip()
    ok, value = _loads(body)
    if ok:
        return "clean", value
    i, j = text.find("{"), text.rfind("}")
    if 0 <= i < j:
        ok, value = _loads(text[i : j + 1])
        if ok and isinstance(value, dict):
            return "embedded", value
    return "none", None


def _filled(value: Any) -> bool:
    return isinstance(value, str) and any(c.isalnum() for c in value)


def judge(prompt: Prompt | str, response: str, finished: bool = True) -> Judgement:
    want = set(keys_of(prompt))
    how, value = parse_answer(response)
    is_object = isinstance(value, dict)
    details = {"keys": sorted(want), "found": sorted(value) if is_object else None, "json": how,
               "finished": finished}
    if not finished:
        return Judgement(0.0, False, {**details, "reason": "cut by max_new_tokens"})
    if not response.strip():
        return Judgement(0.0, False, {**details, "reason": "empty"})
    if not is_object:
        return Judgement(NOT_JSON, False, {**details, "reason": "no JSON object"})
    got = set(value)
    if got != want:
        overlap = len(got & want) / len(got | want)
        return Judgement(OTHER_KEYS * (1 + overlap), False, {**details, "reason": "other keys"})
    if how == "embedded":
        return Judgement(NEAR_MISS, False, {**details, "reason": "text around the object"})
    if not all(_filled(v) for v in value.values()):
        return Judgement(NEAR_MISS, False, {**details, "reason": "a value not a non-empty string"})
    return Judgement(1.0, True, {**details, "reason": "ok"})


TASK = register(
    Task(
        name="json_object",
        description="Describe an everyday topic as one JSON object with exactly the two keys the prompt "
        "names, each a non-empty string, and nothing else (a code fence allowed); the answer must end.",
        train_prompts=train_prompts,
        heldout_prompts=heldout_prompts,
        judge=judge,
        topics=TOPICS,
        constraint=keys_of,
        max_new_tokens=MAX_NEW_TOKENS,
    )
)
