"""preftune.online.generate on a tiny random model (the batched sampler of the demo and online loops)."""

import pytest
import torch

from preftune.online.generate import encode_prompts, generate
from preftune.testing import tiny_model, tiny_tokenizer

PROMPTS = [
    [{"role": "user", "content": "hello"}],
    [{"role": "user", "content": "Write a haiku about the sea. Answer in exactly three lines."}],
    [{"role": "user", "content": "yes or no?"}],
]


@pytest.fixture(scope="module")
def mt():
    tok = tiny_tokenizer()
    model = tiny_model(seed=1)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def test_seeded_sampling_is_deterministic_and_leaves_global_rng(mt):
    model, tok = mt
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a = generate(model, tok, PROMPTS, n=3, temperature=1.0, max_new_tokens=12, seed=7, batch_size=4)
    assert torch.equal(state, torch.random.get_rng_state())
    b = generate(model, tok, PROMPTS, n=3, temperature=1.0, max_new_tokens=12, seed=7, batch_size=4)
    c = generate(model, tok, PROMPTS, n=3, temperature=1.0, max_new_tokens=12, seed=8, batch_size=4)
    ids = lambda g: [[s.token_ids for s in row] for row in g.samples]  # noqa: E731
    assert ids(a) == ids(b)
    assert ids(a) != ids(c)
    assert [len(r) for r in a.samples] == [3, 3, 3]
    assert a.prompt_ids == encode_prompts(tok, PROMPTS)


def test_greedy_left_padding_same_alone_or_in_batch(mt):
    model, tok = mt
    together = generate(model, tok, PROMPTS, temperature=0, max_new_tokens=10, batch_size=3)
    for i, p in enumerate(PROMPTS):
        alone = generate(model, tok, [p], temperature=0, max_new_tokens=10)
        assert alone.samples[0][0].token_ids == together.samples[i][0].token_ids


def test_stops_at_eos_and_reports_it(mt):
    model, tok = mt
    eos = tok.eos_token_id
    # Make EOS overwhelmingly likely after the first generated token: bias the LM head.
    with torch.no_grad():
        head = model.get_output_embeddings()
        saved = head.weight.clone()
        head.weight[eos] += 50 * head.weight.abs().max()
        bias_ok = generate(model, tok, PROMPTS, temperature=0, max_new_tokens=10)
        head.weight.copy_(saved)
    for row in bias_ok.samples:
        s = row[0]
        assert s.finished and s.token_ids[-1] == eos and s.token_ids.count(eos) == 1
        assert s.num_tokens == len(s.token_ids) <= 10
    cut = generate(model, tok, PROMPTS, temperature=0, max_new_tokens=4)
    for row in cut.samples:
        s = row[0]
        assert s.finished == (eos in s.token_ids)
        assert s.num_tokens == 4 or s.finished
        assert s.text == tok.decode([t for t in s.token_ids if t != eos], skip_special_tokens=True).strip()


def test_argument_checks(mt):
    model, tok = mt
    with pytest.raises(ValueError, match="greedy"):
        generate(model, tok, PROMPTS, n=2, temperature=0)
