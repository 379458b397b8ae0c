import math

import pytest
import torch

from preftune.eval.policy_eval import (
    adapter_disabled,
    evaluate_generations,
    kl_estimate,
    mean_se,
    sequence_log_ratios,
    wilson,
    word_count,
)
from preftune.online.generate import Generations, Sample
from preftune.testing import tiny_model


def test_wilson_and_mean_se():
    r = wilson(5, 20)
    assert r.value == 0.25 and r.n == 20
    assert r.low == pytest.approx(0.1119, abs=1e-4) and r.high == pytest.approx(0.4687, abs=1e-4)
    assert wilson(0, 10).low == 0.0 and wilson(10, 10).high == 1.0
    m = mean_se([1.0, 2.0, 3.0, 6.0])
    assert m.value == 3.0 and m.se == pytest.approx(math.sqrt(14 / 3 / 4))
    assert word_count("Tea — a drink - from leaves !") == 5


def test_evaluate_generations():
    from preftune.tasks import get_task

    task = get_task("word_limit")
    prompt = [{"role": "user", "content": "What is tea? Answer in at most 10 words."}]
    gens = Generations(
        [prompt],
        [[1, 2]],
        [[Sample("Tea is a drink.", [5, 6, 7, 2], True), Sample("w " * 12, [5] * 20, False)]],
    )
    ev = evaluate_generations(task, gens)
    assert ev.success.value == 0.5 and ev.finished.value == 0.5
    assert ev.words.value == (4 + 12) / 2 and ev.tokens.value == 12
    assert ev.score.value == 0.5


@pytest.fixture()
def lora_model():
    from preftune.model import LoraSettings, apply_lora

    torch.manual_seed(0)
    return apply_lora(tiny_model(seed=2), LoraSettings(r=4, alpha=8))


PROMPTS = [[3, 17, 40, 9], [5, 6]]
RESPONSES = [[[11, 12, 13], [14]], [[20, 21, 22, 23, 24], [7, 8]]]


def test_kl_zero_when_adapter_is_a_no_op(lora_model):
    # Fresh LoRA has B = 0: the policy equals the base model exactly.
    ratios = sequence_log_ratios(lora_model, PROMPTS, RESPONSES, pad_id=0, batch_size=1)
    assert len(ratios) == 4
    assert all(abs(r) < 1e-6 for r in ratios)


def _hand_logp(model, prompt, response) -> float:
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double().log_softmax(-1)  # (L, V)
    return sum(float(logits[len(prompt) - 1 + t, tok]) for t, tok in enumerate(response))


def test_kl_matches_hand_computation(lora_model):
    with torch.no_grad():
        for name, p in lora_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    expected = []
    for p, rs in zip(PROMPTS, RESPONSES, strict=False):
        for r in rs:
            pol = _hand_logp(lora_model, p, r)
            with lora_model.disable_adapter():
                ref = _hand_logp(lora_model, p, r)
            expected.append(pol - ref)
    assert max(abs(e) for e in expected) > 1e-3  # the adapter really changes the model
    got = sequence_log_ratios(lora_model, PROMPTS, RESPONSES, pad_id=0, batch_size=2)
    assert got == pytest.approx(expected, abs=1e-4)
    # In-place adapted layers (what the caller holds after the trainer wrapped its model) give the same.
    inner = lora_model.get_base_model()
    assert sequence_log_ratios(inner, PROMPTS, RESPONSES, pad_id=0) == pytest.approx(expected, abs=1e-4)
    with adapter_disabled(inner):
        assert sequence_log_ratios(inner, PROMPTS, RESPONSES, pad_id=0, ref_model=inner) == pytest.approx(
            [0] * 4
        )
    # kl_estimate: the mean with its standard error
    gens = Generations([None, None], PROMPTS, [[Sample("", r, True) for r in rs] for rs in RESPONSES])
    kl = kl_estimate(lora_model, gens, pad_id=0)
    assert kl.value == pytest.approx(sum(expected) / 4, abs=1e-4)
    assert kl.se == pytest.approx(mean_se(expected).se, abs=1e-4)


def test_needs_an_adapter_or_a_reference():
    with pytest.raises(ValueError, match="no LoRA adapters"):
        sequence_log_ratios(tiny_model(), PROMPTS, RESPONSES, pad_id=0)
