"""Whether answers are still sensible: fluency under the base model, and repetition.

A policy trained against a judge can pass it with fragments or repeated lists (the one-shot demo
answered "What is special about tea? Answer in at most 10 words." with
"- Unusual\\n- Unusual\\n- Unusual\\n- Unusual"). These measures put a number on that:

- **fluency**: the mean per-token negative log-likelihood of the sampled answers under the *base*
  model (lower = more like what the base model would write), scored on the exact sampled token ids
  through the log-prob engine;
- **distinct-2**: corpus-level share of unique word bigrams (Li et al. 2016);
- **repetition rate**: the share of answers that repeat a line or a phrase (``repeats``), with its
  Wilson 95% interval.

``within_tolerance`` states the acceptance rule of issue 10: fluency and repetition stay within
10% of the base model's.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, is_dataclass

from preftune.eval.policy_eval import Mean, Rate, mean_se, wilson

# A word: a run of letters/digits, with inner apostrophes ("don't"). Case-folded, punctuation dropped,
# so "Tea." and "tea" are one word and "- " bullets are no word at all.
_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")
# A list marker at the start of a line: "- ", "* ", "+ ", "• ", "1. ", "2) ".
_LIST_MARKER = re.compile(r"^\s*(?:[-*+•]|\d+[.)])\s+")


def words(text: str) -> list[str]:
    """The lower-cased words of ``text`` (letters/digits with inner apostrophes; punctuation dropped)."""
    return _WORD.findall(text.lower())


def _ngrams(ws: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(ws[i : i + n]) for i in range(len(ws) - n + 1)]


# ---------------------------------------------------------------- diversity


def distinct_n(texts: Iterable[str], n: int = 2) -> float:
    """Corpus-level distinct-n: unique word n-grams over all answers / total word n-grams.

    Li et al. 2016, "A Diversity-Promoting Objective Function for Neural Conversation Models"
    (NAACL, arXiv:1510.03055), §5: "the number of distinct unigrams and bigrams in generated
    responses", counted over the whole set of responses (corpus-level, not per answer). The paper
    scales by the number of generated tokens; we divide by the number of n-grams instead (the common
    implementation), so the value lies in (0, 1] and is exactly 1 when no n-gram recurs. The two differ
    by the factor (T − N(n−1)) / T for N answers of T words in total.

    N-grams are taken within each answer (none spans two answers), over ``words`` (case-folded,
    punctuation dropped). Corpus-level distinct-n falls as the corpus grows, so compare two policies on
    the same prompts with the same number of samples. NaN when no answer has ``n`` words.
    """
    if n < 1:
        raise ValueError("n must be at least 1")
    seen: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        grams = _ngrams(words(text), n)
        seen.update(grams)
        total += len(grams)
    return len(seen) / total if total else float("nan")


# ---------------------------------------------------------------- repetition

# Thresholds, chosen on crafted examples (tests/eval/test_quality.py):
# - any phrase of >= 4 words said twice is a loop ("I like tea. I like tea."); shorter phrases recur
#   in ordinary prose ("tea is" in "Tea is a drink ...; tea is popular ...");
# - a 1-3 word unit said 3+ times *in a row* is a stutter ("very very very", "tea, tea, tea"). The
#   same 2-3 words 3+ times *anywhere* is not used: ordinary answers do that ("Green tea is mild.
#   Black tea is strong. White tea is rare." has "tea is" three times).
PHRASE_MIN_WORDS = 4
STUTTER_MAX_WORDS = 3
STUTTER_MIN_COPIES = 3


def _line_key(line: str) -> tuple[str, ...]:
    return tuple(words(_LIST_MARKER.sub("", line, count=1)))


def repeated_line(text: str) -> bool:
    """A line said twice: the same words (case and punctuation aside) after stripping a list marker
    ("- ", "* ", "1. "). Lines without a word (blank, "---", code fences) do not count."""
    keys = [k for k in map(_line_key, text.splitlines()) if k]
    return len(set(keys)) < len(keys)


def repeated_phrase(text: str) -> bool:
    """A phrase of ≥ ``PHRASE_MIN_WORDS`` words said twice (anywhere, overlaps allowed), or a unit of
    1–``STUTTER_MAX_WORDS`` words said ``STUTTER_MIN_COPIES``+ times in a row."""
    ws = words(text)
    # Any repeated phrase of >= 4 words contains a repeated 4-gram, so checking 4-grams suffices.
    grams = _ngrams(ws, PHRASE_MIN_WORDS)
    if len(set(grams)) < len(grams):
        return True
    for u in range(1, STUTTER_MAX_WORDS + 1):
        for i in range(len(ws) - u * STUTTER_MIN_COPIES + 1):
            unit = ws[i : i + u]
            if all(ws[i + c * u : i + (c + 1) * u] == unit for c in range(1, STUTTER_MIN_COPIES)):
                return True
    return False


def repeats(text: str) -> bool:
    """Whether the answer repeats a line (``repeated_line``) or a phrase (``repeated_phrase``)."""
    return repeated_line(text) or repeated_phrase(text)


def lone_list_item(text: str) -> bool:
    """The answer opens a list ("1. ", "- ", …) but holds a single item: "1. Sleep is essential." A
    format habit that DPO iterates can spread (on word_limit from 13% of π_0's answers to 66%,
    docs/online.md) and that no length or repetition measure sees."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return bool(lines) and _LIST_MARKER.match(lines[0]) is not None and \
        sum(_LIST_MARKER.match(ln) is not None for ln in lines) == 1


def repetition_rate(texts: Iterable[str]) -> Rate:
    """Share of answers that ``repeats``, with its Wilson 95% interval."""
    flags = [repeats(t) for t in texts]
    return wilson(sum(flags), len(flags))


# ---------------------------------------------------------------- fluency


def _has_adapters(model) -> bool:
    if hasattr(model, "disable_adapter"):  # a PeftModel
        return True
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # no peft installed: nothing can carry a PEFT adapter
        return False
    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def fluency_nll(
    base_model,
    generations,
    pad_id: int,
    *,
    batch_size: int = 8,
    adapters_off: bool = True,
    chunk_size: int = 1024,
) -> Mean:
    """Mean per-token NLL of the sampled answers under the base model, mean ± standard error.

    Each answer is scored on its exact sampled token ids (EOS included when it was reached) after its
    prompt's ids: its NLL is −(1/|y|) Σ_t log p_base(y_t | x, y_<t), the mean over its own tokens; the
    result is the mean of these per-answer values over answers (so long and short answers weigh the
    same), with the standard error over answers. Empty answers have no token to score and are skipped
    (``Mean.n`` counts the scored ones).

    ``base_model``: a separate base model (used as is), or the trained model itself when it carries
    LoRA adapters (a ``PeftModel`` or layers PEFT adapted in place): with ``adapters_off`` its adapters
    are disabled for the scoring, which is the base model without a second copy of the weights.
    ``adapters_off=False`` scores under the model as it is. ``batch_size`` counts prompts (with all
    their samples) per forward. Log-probs come from ``preftune.model.engine`` (the same code as the
    KL estimate and training), summed in float64.
    """
    from preftune.model.scoring import response_token_logps

    responses = [[x.token_ids for x in row] for row in generations.samples]
    token_logps = response_token_logps(
        base_model, generations.prompt_ids, responses, pad_id,
        adapters_off=adapters_off and _has_adapters(base_model), batch_size=batch_size, chunk_size=chunk_size,
    )
    per_answer = [-float(t.double().sum()) / len(t) for row in token_logps for t in row if len(t)]
    return mean_se(per_answer)


# ---------------------------------------------------------------- bundle and acceptance rule


@dataclass
class QualityEval:
    """Quality of one set of answers (flattened over prompts × samples)."""

    distinct_2: float  # corpus-level distinct-2 (``distinct_n``)
    repetition: Rate  # share of answers that ``repeats``
    fluency: Mean | None = None  # ``fluency_nll`` under the base model, when a model was given
    n: int = 0  # answers

    def as_dict(self) -> dict:
        return {k: (asdict(v) if is_dataclass(v) else v) for k, v in self.__dict__.items()}


def evaluate_quality(
    answers,
    *,
    base_model=None,
    pad_id: int | None = None,
    batch_size: int = 8,
    adapters_off: bool = True,
) -> QualityEval:
    """Distinct-2, repetition rate and (with ``base_model``) fluency of ``answers``.

    ``answers``: a ``Generations`` (its texts, flattened prompt by prompt, and its token ids for
    fluency) or a list of answer texts. Fluency needs the sampled token ids, so ``base_model`` requires
    a ``Generations`` and ``pad_id``; see ``fluency_nll`` for ``base_model`` and ``adapters_off``.
    """
    generations = answers if hasattr(answers, "samples") else None
    if generations is not None:
        texts = [s.text for row in generations.samples for s in row]
    elif isinstance(answers, str):
        raise TypeError("answers must be a list of texts or a Generations, not one string")
    else:
        texts = list(answers)
    fluency = None
    if base_model is not None:
        if generations is None:
            raise TypeError("fluency scores the sampled token ids: pass a Generations, not texts")
        if pad_id is None:
            raise ValueError("fluency needs pad_id (the tokenizer's pad id, or its EOS id)")
        fluency = fluency_nll(base_model, generations, pad_id, batch_size=batch_size, adapters_off=adapters_off)
    return QualityEval(distinct_n(texts, 2), repetition_rate(texts), fluency, len(texts))


def within_tolerance(base: QualityEval, trained: QualityEval, rel: float = 0.10) -> dict[str, bool]:
    """Issue 10's rule, "fluency and repetition stay within 10% of the base model's", per measure.

    - ``fluency``: trained NLL ≤ (1 + rel) × base NLL. NLL is on a ratio scale (a 10% higher per-token
      NLL is perplexity to the power 1.1), so a relative bound is meaningful. Present only when both
      evaluations measured fluency; a ValueError when only one did (the comparison would be silent).
    - ``distinct_2``: trained ≥ (1 − rel) × base (higher is more diverse).
    - ``repetition``: trained rate ≤ base rate + rel, i.e. at most 10 *percentage points* more answers
      that repeat. A relative bound (≤ 1.1 × base) is not used: a base rate is usually near zero, where it is
      all sampling noise (2% of 200 answers is 4; 1.1× allows 4.4, so one more repeating answer fails)
      and at 0 it forbids any repetition at all. 10 points allows a few more repeating answers than the
      base gives, not a collapse to repeated lists across a large share of answers.

    Compare evaluations of the same prompts, sample count and decoding (greedy or sampled):
    corpus-level distinct-2 depends on the number of answers.
    """
    if not 0 <= rel < 1:
        raise ValueError("rel must be in [0, 1)")
    out: dict[str, bool] = {}
    if (base.fluency is None) != (trained.fluency is None):
        raise ValueError("fluency was measured for only one of base and trained; measure both or neither")
    if base.fluency is not None and trained.fluency is not None:
        out["fluency"] = trained.fluency.value <= (1 + rel) * base.fluency.value
    out["distinct_2"] = trained.distinct_2 >= (1 - rel) * base.distinct_2
    out["repetition"] = trained.repetition.value <= base.repetition.value + rel
    return out  # a NaN (nothing to measure) compares False: not shown to be within tolerance
