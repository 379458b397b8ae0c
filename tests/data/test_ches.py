"""CHES (Razin et al. 2024, Definition 2) on a tiny model against a hand computation from a plain
``model(..., output_hidden_states=True)`` forward; the top-fraction rule."""

import json
import math

import pytest
import torch

from preftune.data import Example, tokenize_example
from preftune.data.ches import ches_from_sums, ches_scores, response_positions, top_fraction

PAIRS = [
    ("Write a haiku about the sea.", " The sea is calm.", " The quick brown fox jumps over the lazy dog."),
    ("Which answer is better?", " yes", " no maybe"),
    ("Summarise the text.", " The chosen answer is helpful.", " The chosen answer is helpful!"),
]


@pytest.fixture(scope="module")
def tiny():
    from preftune.testing import tiny_model, tiny_tokenizer

    return tiny_model("llama", seed=3), tiny_tokenizer()


def _hand(model, prompt_ids, response_ids):
    """Σ of hidden_states[-1] over the positions predicting each response token, by hand."""
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        h = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0].double()  # (T, D)
    p = len(prompt_ids)
    # token k of the response (k = 0..R-1) sits at position p + k and is predicted by position p + k - 1
    return sum(h[p + k - 1] for k in range(len(response_ids))), len(response_ids)


def test_ches_equals_hand_computation(tiny):
    model, tok = tiny
    examples = [tokenize_example(Example(p, [c, r]), tok, max_length=None, max_prompt_length=None)
                for p, c, r in PAIRS]
    got = ches_scores(model, examples, pad_id=tok.pad_token_id, batch_size=2)
    for i, e in enumerate(examples):
        sp, np_ = _hand(model, e.prompt_ids, e.response_ids[0])
        sm, nm = _hand(model, e.prompt_ids, e.response_ids[1])
        raw = float(sp @ sm - sp @ sp)
        ln = float((sp / np_) @ (sm / nm) - (sp / np_) @ (sp / np_))
        assert got.raw[i] == pytest.approx(raw, rel=1e-4, abs=1e-3)
        assert got.normalised[i] == pytest.approx(ln, rel=1e-4, abs=1e-5)
        assert (got.chosen_tokens[i], got.rejected_tokens[i]) == (np_, nm)
    # Batching (right padding, longest first) changes nothing: one pair at a time gives the same.
    alone = ches_scores(model, examples, pad_id=tok.pad_token_id, batch_size=1)
    assert alone.normalised == pytest.approx(got.normalised, rel=1e-5, abs=1e-6)
    # bf16 autocast is close (scores are a difference of large products: a loose check)
    bf = ches_scores(model, examples, pad_id=tok.pad_token_id, precision="bf16")
    assert all(math.isfinite(x) for x in bf.normalised)


def test_identical_responses_score_zero_and_formula():
    # y+ = y− gives ⟨s, s⟩ − ‖s‖² = 0 exactly
    s = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    m = torch.tensor([[1.0, 2.0], [1.0, 1.0]])
    raw, ln = ches_from_sums(s, m, torch.tensor([2.0, 1.0]), torch.tensor([2.0, 4.0]))
    assert raw.tolist() == [0.0, (3 - 1) - 10]
    # pair 2: mean+ = (3, −1), mean− = (0.25, 0.25): 0.75 − 0.25 − 10
    assert ln.tolist() == [0.0, pytest.approx(0.5 - 10)]
    raw, ln = ches_from_sums(s, m, torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0]))
    assert math.isnan(raw[0]) and math.isnan(ln[0]) and raw[1] == -8


def test_response_positions():
    assert list(response_positions(3, 2)) == [2, 3]
    assert list(response_positions(0, 2)) == [0]  # the first token has nothing before it


def test_top_fraction():
    scores = [0.5, 3.0, math.nan, 3.0, -1.0, 2.0, 0.0, 1.0, 4.0, -2.0]
    assert top_fraction(scores, 0.3) == [8, 1, 3]  # ties: earlier index first
    assert top_fraction(scores, 0.25) == [8, 1]  # floor(2.5)
    assert top_fraction(scores, 0.95) == [8, 1, 3, 5, 7, 0, 6, 4, 9]  # NaN never dropped
    assert top_fraction([1.0] * 380, 0.95) == list(range(361))  # the paper keeps 19 of 380 (5%)
    with pytest.raises(ValueError, match="fraction"):
        top_fraction(scores, 1.0)


def test_ches_filter_drops_the_top_pairs(tiny_model_dir, pairs_file, tmp_path):
    """`train --set ches_filter=0.25` drops exactly the 4 of 16 pairs with the highest length-normalised
    CHES under the initial weights, lists them in the run folder and trains on the other 12."""
    from preftune.data import load_records, to_pairs, tokenize_examples
    from preftune.model import load_model
    from preftune.train.config import TrainConfig
    from preftune.train.trainer import train

    cfg = TrainConfig(model=str(tiny_model_dir), data=str(pairs_file), output=str(tmp_path / "out"), loss="dpo",
                      max_steps=1, batch_size=4, progress=False, plot=False, save_model=False, ches_filter=0.25,
                      ref_cache_dir=str(tmp_path / "rc"), max_length=64, max_prompt_length=32)
    model, tok = load_model(tiny_model_dir)
    examples = tokenize_examples(to_pairs(load_records(pairs_file)), tok, max_length=64, max_prompt_length=32)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # where training will score them
    scores = ches_scores(model.to(device), examples, pad_id=tok.pad_token_id, device=device)
    expected = sorted(range(16), key=lambda i: -scores.normalised[i])[:4]

    result = train(cfg)
    rows = [json.loads(x) for x in (result.output_dir / "ches_dropped.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == expected
    assert [r["line"] for r in rows] == [i + 1 for i in expected]  # one pair per line in this file
    assert [r["ches_ln"] for r in rows] == pytest.approx([scores.normalised[i] for i in expected], rel=1e-5)

    from preftune.train.trainer import build_runner

    runner = build_runner(cfg.model_copy(update={"output": str(tmp_path / "out2")}))
    kept = runner.train_set.examples
    assert [e.line for e in kept] == [i + 1 for i in range(16) if i not in expected]
    assert [e.index for e in kept] == list(range(12))


def test_ches_filter_config():
    from preftune.train.config import TrainConfig

    assert TrainConfig(ches_filter=0.95).ches_filter == 0.95
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError):
            TrainConfig(ches_filter=bad)
    with pytest.raises(ValueError, match="paired objective"):
        TrainConfig(ches_filter=0.5, loss="kto")
