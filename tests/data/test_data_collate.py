"""Collation into B x K groups, and the batch orders."""

import random

import pytest
import torch

from preftune.data import (
    TokenizedExample,
    collate,
    length_grouped_order,
    load_records,
    padding_tokens,
    shuffled_order,
    to_lists,
    tokenize_examples,
)
from preftune.data.collate import GroupBatch


def _tex(prompt, responses, index, **inputs):
    return TokenizedExample(prompt, responses, inputs, index=index)


def test_collate_ragged_lists():
    a = _tex(
        [1, 2, 3], [[4, 5], [6], [7, 8, 9]], 5, scores=[3.0, 2.0, 1.0], labels=[True, False, True], margin=0.5
    )
    b = _tex([1], [[2, 3]], 9, scores=[4.0], labels=[True], margin=2.0)
    batch = collate([a, b])
    assert isinstance(batch, GroupBatch) and batch.batch_size == 2 and batch.num_responses == 3
    assert batch.prompt_ids == [[1, 2, 3], [1]]
    assert batch.response_ids == [[[4, 5], [6], [7, 8, 9]], [[2, 3], [], []]]
    assert torch.equal(batch.valid, torch.tensor([[True, True, True], [True, False, False]]))
    assert torch.equal(batch.inputs["scores"], torch.tensor([[3.0, 2.0, 1.0], [4.0, 0.0, 0.0]]))
    assert batch.inputs["scores"].dtype == torch.float32
    assert batch.inputs["labels"].dtype == torch.bool
    assert torch.equal(batch.inputs["labels"], torch.tensor([[True, False, True], [True, False, False]]))
    assert batch.inputs["margin"].shape == (2,) and batch.inputs["margin"].tolist() == [0.5, 2.0]
    assert batch.num_tokens == (3 + 2 + 1 + 3) + (1 + 2)
    assert batch.index == [5, 9]


def test_collate_fixed_k_and_errors():
    batch = collate([_tex([1], [[2]], 0)], num_responses=2)
    assert batch.valid.tolist() == [[True, False]] and batch.response_ids == [[[2], []]]
    with pytest.raises(ValueError, match="different inputs"):
        collate([_tex([1], [[2]], 0, scores=[1.0]), _tex([1], [[2]], 1)])
    with pytest.raises(ValueError, match="has 1 values for 2 responses"):
        collate([_tex([1], [[2], [3]], 0, scores=[1.0])])
    with pytest.raises(ValueError, match="empty batch"):
        collate([])


def test_pipeline_pairs_end_to_end(tiny_tok, pairs_file):
    from preftune.data import load_and_validate, to_pairs

    records, issues = load_and_validate(pairs_file, objective_shape="paired")
    toks = tokenize_examples(to_pairs(records), tiny_tok, max_length=64, max_prompt_length=32)
    batch = collate(toks[:4])
    assert batch.valid.shape == (4, 2) and bool(batch.valid.all()) and batch.inputs == {}
    assert batch.index == [0, 1, 2, 3] and issues == []
    eos = tiny_tok.eos_token_id
    assert all(r[-1] == eos for group in batch.response_ids for r in group)


def test_pipeline_lists_end_to_end(tiny_tok):
    rows = [
        {"prompt": "p", "responses": ["a", "b", "c"], "scores": [1, 3, 2], "win_probs": [0.1, 0.8, 0.4]},
        {"prompt": "q", "responses": ["x", "y"], "scores": [0, 1], "win_probs": [0.3, 0.6]},
    ]
    batch = collate(tokenize_examples(to_lists(load_records(rows)), tiny_tok))
    assert batch.valid.tolist() == [[True, True, True], [True, True, False]]
    assert batch.inputs["scores"].tolist() == [[3.0, 2.0, 1.0], [1.0, 0.0, 0.0]]
    assert torch.allclose(batch.inputs["win_probs"], torch.tensor([[0.8, 0.4, 0.1], [0.6, 0.3, 0.0]]))


# ---------------------------------------------------------------- orders


def test_shuffled_order_is_a_deterministic_permutation():
    a = shuffled_order(100, seed=1, epoch=0)
    assert sorted(a) == list(range(100)) and a != list(range(100))
    assert a == shuffled_order(100, seed=1, epoch=0)
    assert a != shuffled_order(100, seed=1, epoch=1) and a != shuffled_order(100, seed=2, epoch=0)


def test_length_grouped_order():
    rng = random.Random(0)
    lengths = [rng.randint(5, 500) for _ in range(1000)]
    order = length_grouped_order(lengths, batch_size=8, seed=3, epoch=0)
    assert sorted(order) == list(range(1000))
    assert order == length_grouped_order(lengths, batch_size=8, seed=3, epoch=0)
    assert order != length_grouped_order(lengths, batch_size=8, seed=3, epoch=1)
    assert lengths[order[0]] == max(lengths)  # the longest first: out-of-memory shows on step one
    grouped = padding_tokens(order, lengths, 8)
    random_pad = padding_tokens(shuffled_order(1000, seed=3, epoch=0), lengths, 8)
    # Uniform lengths on [5, 500]: a random batch of 8 pads ~ 8*(E[max]-E[x]) ≈ 8*195 per batch;
    # sorting within mega-batches of 64 leaves roughly 1/8 of that.
    assert grouped < 0.2 * random_pad, (grouped, random_pad)


def test_padding_tokens_counts():
    assert padding_tokens([0, 1, 2], [3, 5, 4], batch_size=2) == (5 * 2 - 8) + 0
