import math
import statistics

import pytest
import torch

from preftune.eval.policy_eval import Mean, wilson
from preftune.eval.quality import (
    QualityEval,
    distinct_n,
    evaluate_quality,
    fluency_nll,
    lone_list_item,
    repeated_line,
    repeated_phrase,
    repeats,
    repetition_rate,
    within_tolerance,
    words,
)
from preftune.online.generate import Generations, Sample, encode_prompts
from preftune.testing import tiny_model

UNUSUAL = "- Unusual\n- Unusual\n- Unusual\n- Unusual"  # the one-shot demo's greedy answer (issue 10)
LIKE_TEA = "I like tea. I like tea. I like tea."
ORDINARY = "Tea is a drink made from leaves; tea is popular in Asia."


def test_words_fold_case_and_drop_punctuation():
    assert words("- Tea, don't  WAIT!\n1. 10 cups") == ["tea", "don't", "wait", "1", "10", "cups"]


def test_distinct_2_by_hand():
    # unusual ×4: 3 bigrams, all ("unusual", "unusual")
    assert distinct_n([UNUSUAL]) == pytest.approx(1 / 3)
    # i like tea i like tea i like tea: 8 bigrams, 3 distinct (i like, like tea, tea i)
    assert distinct_n([LIKE_TEA]) == pytest.approx(3 / 8)
    # corpus-level: (tea is)(is a)(a drink) + (tea is)(is green) = 5 bigrams, 4 distinct; no bigram
    # spans the two answers ("drink tea" would make it 6)
    assert distinct_n(["Tea is a drink.", "Tea is green."]) == pytest.approx(4 / 5)
    assert distinct_n(["Tea is tea"], n=1) == pytest.approx(2 / 3)
    assert distinct_n(["Tea", "Tea is"]) == 1.0  # a one-word answer has no bigram
    assert math.isnan(distinct_n(["Tea", ""]))
    with pytest.raises(ValueError):
        distinct_n(["a b"], n=0)


@pytest.mark.parametrize(
    "text",
    [
        UNUSUAL,
        LIKE_TEA,
        "1. Green tea\n2. Green tea",  # the same line under different list numbers
        "* **Calm.**\n* calm",  # case, emphasis and punctuation aside
        "Tea is good for you and tea is good for you.",  # a 4+ word phrase twice
        "Tea, tea, tea.",  # a one-word stutter
        "It is very very very good.",
        "Drink tea now drink tea now drink tea now",  # a three-word unit three times in a row
    ],
)
def test_repeats(text):
    assert repeats(text)


@pytest.mark.parametrize(
    "text",
    [
        ORDINARY,
        "Green tea is mild. Black tea is strong. White tea is rare.",  # "tea is" ×3, not in a row
        "- Green tea\n- Black tea\n- Herbal tea",
        "```\nprint(1)\n```",  # fences carry no word
        "The the cat sat.",  # two copies are a slip, not a loop
        "Tea is a drink.\n\n\nIt is popular.",  # blank lines do not count
        "",
    ],
)
def test_does_not_repeat(text):
    assert not repeats(text)


def test_line_and_phrase_rules_separately():
    two = "- Unusual\n- Unusual"
    assert repeated_line(two) and not repeated_phrase(two)  # "unusual unusual": 2 words only
    assert repeated_phrase(LIKE_TEA) and not repeated_line(LIKE_TEA)  # one line


@pytest.mark.parametrize(("text", "want"), [
    ("1. Sleep is essential for health.", True),
    ("- Tea is calming.\n", True),
    ("1. Tea is calming.\nIt is also cheap.", True),  # one item, then prose
    ("1. Tea.\n2. Coffee.", False),  # a real list
    ("Tea is calming.", False),
    ("Tea is calming.\n1. It is cheap.", False),  # does not open with the marker
    ("", False),
    ("1.5 litres of tea.", False),  # a number, not a marker
])
def test_lone_list_item(text, want):
    assert lone_list_item(text) is want


def test_repetition_rate_is_a_wilson_rate():
    texts = [UNUSUAL, "Tea is a drink.", LIKE_TEA, ORDINARY]
    assert repetition_rate(texts) == wilson(2, 4)


# ---------------------------------------------------------------- fluency


def _generations(tok) -> Generations:
    prompts = [
        [{"role": "user", "content": "What is tea? Answer in at most 10 words."}],
        [{"role": "user", "content": "hello"}],
    ]
    eos = tok.eos_token_id
    answers = [["Tea is a drink.", "The quick brown fox"], ["Thanks, please answer the question.", ""]]
    samples = [
        [Sample(a, tok(a, add_special_tokens=False)["input_ids"] + [eos] if a else [], True) for a in row]
        for row in answers
    ]
    samples[0][1].token_ids = samples[0][1].token_ids[:-1]  # cut by max_new_tokens: no EOS
    samples[0][1].finished = False
    return Generations(prompts, encode_prompts(tok, prompts), samples)


def _hand_nll(model, gens) -> list[float]:
    """Per-answer mean token NLL from plain ``model(...).logits`` in float64 (empty answers skipped)."""
    out = []
    with torch.no_grad():
        for p, row in zip(gens.prompt_ids, gens.samples, strict=True):
            for s in row:
                r = s.token_ids
                if not r:
                    continue
                logp = model(input_ids=torch.tensor([p + r])).logits[0].double().log_softmax(-1)  # (L, V)
                out.append(-sum(float(logp[len(p) - 1 + t, tok]) for t, tok in enumerate(r)) / len(r))
    return out


def test_fluency_nll_matches_hand_computation(tiny_tok):
    model = tiny_model(seed=1)
    model.train()  # dropout would make the score random; fluency_nll scores in eval mode and restores
    gens = _generations(tiny_tok)
    expected = _hand_nll(model.eval(), gens)
    model.train()
    assert len(expected) == 3
    for batch_size in (1, 2):
        got = fluency_nll(model, gens, tiny_tok.pad_token_id, batch_size=batch_size)
        assert got.n == 3
        assert got.value == pytest.approx(statistics.fmean(expected), abs=1e-5)
        assert got.se == pytest.approx(statistics.stdev(expected) / math.sqrt(3), abs=1e-5)
    assert model.training


@pytest.fixture()
def lora_model():
    from preftune.model import LoraSettings, apply_lora

    torch.manual_seed(0)
    model = apply_lora(tiny_model(seed=2), LoraSettings(r=4, alpha=8))
    with torch.no_grad():  # fresh LoRA has B = 0 (a no-op); make the adapter change the model
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 3.0)
    return model


def test_fluency_with_adapters_off_is_the_base_models(lora_model, tiny_tok):
    gens = _generations(tiny_tok)
    pad = tiny_tok.pad_token_id
    base = fluency_nll(tiny_model(seed=2), gens, pad)  # the same base weights, never adapted
    assert base.value == pytest.approx(statistics.fmean(_hand_nll(tiny_model(seed=2), gens)), abs=1e-5)
    off = fluency_nll(lora_model, gens, pad)
    assert off.value == pytest.approx(base.value, abs=1e-5) and off.se == pytest.approx(base.se, abs=1e-5)
    # Layers PEFT adapted in place (what a caller holds after the trainer wrapped its model) give the same.
    assert fluency_nll(lora_model.get_base_model(), gens, pad).value == pytest.approx(base.value, abs=1e-5)
    # adapters_off=False scores the adapted model, and the adapters are back on after scoring above.
    on = fluency_nll(lora_model, gens, pad, adapters_off=False)
    assert on.value == pytest.approx(statistics.fmean(_hand_nll(lora_model, gens)), abs=1e-5)
    # A random tiny model is near-uniform (NLL ≈ log V), so the adapter moves the mean by ~1e-3 only:
    # still 100× the tolerance of the equalities above.
    assert abs(on.value - base.value) > 1e-3


def test_evaluate_quality(tiny_tok):
    gens = _generations(tiny_tok)
    model = tiny_model(seed=1)
    ev = evaluate_quality(gens, base_model=model, pad_id=tiny_tok.pad_token_id)
    texts = [s.text for row in gens.samples for s in row]
    assert ev.n == 4
    assert ev.distinct_2 == distinct_n(texts) and ev.repetition == wilson(0, 4)
    assert ev.fluency == fluency_nll(model, gens, tiny_tok.pad_token_id)
    d = ev.as_dict()
    assert d["repetition"]["n"] == 4 and d["fluency"]["n"] == 3 and d["distinct_2"] == ev.distinct_2
    plain = evaluate_quality([UNUSUAL, ORDINARY])
    assert plain.fluency is None and plain.as_dict()["fluency"] is None
    assert plain.repetition == wilson(1, 2) and plain.distinct_2 == distinct_n([UNUSUAL, ORDINARY])
    with pytest.raises(TypeError, match="token ids"):
        evaluate_quality(texts, base_model=model, pad_id=0)
    with pytest.raises(TypeError, match="one string"):
        evaluate_quality(UNUSUAL)


def _q(nll, d2, rep_k, n=100) -> QualityEval:
    return QualityEval(d2, wilson(rep_k, n), None if nll is None else Mean(nll, 0.1, n), n)


def test_within_tolerance():
    base = _q(2.0, 0.50, 5)
    ok = within_tolerance(base, _q(2.19, 0.46, 14))
    assert ok == {"fluency": True, "distinct_2": True, "repetition": True}
    bad = within_tolerance(base, _q(2.21, 0.44, 16))
    assert bad == {"fluency": False, "distinct_2": False, "repetition": False}
    # Repetition is bounded in percentage points: from 0% the trained policy may reach 10%, not 11%.
    assert within_tolerance(_q(2.0, 0.5, 0), _q(2.0, 0.5, 10))["repetition"]
    assert not within_tolerance(_q(2.0, 0.5, 0), _q(2.0, 0.5, 11))["repetition"]
    assert within_tolerance(_q(None, 0.5, 0), _q(None, 0.5, 0)) == {"distinct_2": True, "repetition": True}
    with pytest.raises(ValueError, match="only one"):
        within_tolerance(_q(None, 0.5, 0), _q(2.0, 0.5, 0))
    # No bigram to measure (NaN) is not "within tolerance".
    assert not within_tolerance(base, _q(2.0, float("nan"), 5))["distinct_2"]
