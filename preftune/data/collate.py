"""Batches of groups (B prompts x K responses) as token lists, and the orders batches are drawn in.

Collation stops at token lists: the engine decides how to lay them out (padded, packed, prefix
shared), so it, not the data layer, turns them into tensors. Only the small per-group inputs
(scores, labels, ...) and the ``valid`` mask are tensors here.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .tokenize import TokenizedExample

if TYPE_CHECKING:  # torch is imported when a batch is built, so `import preftune.data` stays light
    from torch import Tensor


@dataclass
class GroupBatch:
    """``B`` groups of ``K`` responses; ragged groups are padded with empty, invalid responses."""

    prompt_ids: list[list[int]]  # B lists
    response_ids: list[list[list[int]]]  # B x K lists ([] where not valid)
    valid: Tensor  # (B, K) bool
    inputs: dict[str, Tensor]  # (B, K) or (B,); float32, labels bool
    num_tokens: int  # unique tokens: each prompt once plus every response
    index: list[int]  # dataset positions of the groups (keys of cached reference log-probs)
    # RDPO / R-ORPO: one (x_rat, rationale) sequence per group, scored by the policy beside the batch.
    rationale_prompt_ids: list[list[int]] | None = None
    rationale_ids: list[list[int]] | None = None

    @property
    def batch_size(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_responses(self) -> int:
        return self.valid.shape[1]


def _input_tensor(name: str, values: list[Any], k: int, valid: list[list[bool]]) -> Tensor:
    """Stack one input across groups: lists become (B, K) (padding 0/False), numbers (B,)."""
    import torch

    per_response = [isinstance(v, list) for v in values]
    if any(per_response) and not all(per_response):
        raise ValueError(f"input {name!r} is per-response in some examples and per-group in others")
    if not per_response[0]:
        dtype = torch.bool if all(isinstance(v, bool) for v in values) else torch.float32
        return torch.tensor(values, dtype=dtype)  # (B,)
    flat = [x for v in values for x in v]
    dtype = torch.bool if flat and all(isinstance(x, bool) for x in flat) else torch.float32
    pad = False if dtype == torch.bool else 0.0
    if flat and isinstance(flat[0], list):  # a list per response (MODPO's margin_rewards): (B, K, n)
        pad = [0.0] * len(flat[0])
    rows = [list(v) + [pad] * (k - len(v)) for v in values]
    for name_row, v in zip(valid, values, strict=True):
        if len(v) != sum(name_row):
            raise ValueError(f"input {name!r} has {len(v)} values for {sum(name_row)} responses")
    return torch.tensor(rows, dtype=dtype)  # (B, K)


def collate(examples: list[TokenizedExample], num_responses: int | None = None) -> GroupBatch:
    """A :class:`GroupBatch` of ``examples``; ``K`` is the longest group (or ``num_responses``)."""
    import torch

    if not examples:
        raise ValueError("cannot collate an empty batch")
    k = max(len(e.response_ids) for e in examples) if num_responses is None else num_responses
    if any(len(e.response_ids) > k for e in examples):
        raise ValueError(f"an example has more than num_responses={k} responses")
    valid = [[j < len(e.response_ids) for j in range(k)] for e in examples]
    names = set(examples[0].inputs)
    for e in examples[1:]:
        if set(e.inputs) != names:
            raise ValueError(
                f"examples carry different inputs: {sorted(names)} vs {sorted(e.inputs)} "
                f"({e.source}:{e.line})"
            )
    inputs = {n: _input_tensor(n, [e.inputs[n] for e in examples], k, valid) for n in sorted(names)}
    with_rationale = [e.rationale_ids is not None for e in examples]
    if any(with_rationale) and not all(with_rationale):
        e = examples[with_rationale.index(False)]
        raise ValueError(f"{e.source}:{e.line}: rationales: missing (other examples of the batch carry one)")
    return GroupBatch(
        prompt_ids=[list(e.prompt_ids) for e in examples],
        response_ids=[[list(r) for r in e.response_ids] + [[]] * (k - len(e.response_ids)) for e in examples],
        valid=torch.tensor(valid, dtype=torch.bool),
        inputs=inputs,
        num_tokens=sum(e.num_tokens for e in examples),
        index=[e.index for e in examples],
        rationale_prompt_ids=[list(e.rationale_prompt_ids) for e in examples] if all(with_rationale) else None,
        rationale_ids=[list(e.rationale_ids) for e in examples] if all(with_rationale) else None,
    )


# --------------------------------------------------------------------------------------------
# Orders
# --------------------------------------------------------------------------------------------


def _rng(seed: int, epoch: int) -> random.Random:
    # A string seed hashes deterministically (unlike hash()), so every process and run agrees.
    return random.Random(f"preftune:{seed}:{epoch}")


def shuffled_order(n: int, seed: int, epoch: int) -> list[int]:
    """A permutation of ``range(n)``, the same for the same ``(seed, epoch)`` on every process."""
    order = list(range(n))
    _rng(seed, epoch).shuffle(order)
    return order


def length_grouped_order(
    lengths: list[int], batch_size: int, seed: int, epoch: int, mega_batch_mult: int = 8
) -> list[int]:
    """A shuffled order whose consecutive ``batch_size`` slices have similar lengths.

    As HF's length-grouped sampler: shuffle, cut into mega-batches of ``batch_size *
    mega_batch_mult``, sort each by length (longest first) — batches need little padding yet the
    order stays random across mega-batches. The longest example is moved to the front so an
    out-of-memory shows on the first step, not hours in.
    """
    if batch_size < 1 or mega_batch_mult < 1:
        raise ValueError("batch_size and mega_batch_mult must be positive")
    order = shuffled_order(len(lengths), seed, epoch)
    size = batch_size * mega_batch_mult
    megas = [sorted(order[i : i + size], key=lambda j: -lengths[j]) for i in range(0, len(order), size)]
    if megas:
        longest = max(range(len(megas)), key=lambda m: lengths[megas[m][0]])
        megas[0][0], megas[longest][0] = megas[longest][0], megas[0][0]
    return [i for mega in megas for i in mega]


def padding_tokens(order: list[int], lengths: list[int], batch_size: int) -> int:
    """Pad tokens needed when ``order`` is cut into batches padded to their longest member."""
    total = 0
    for i in range(0, len(order), batch_size):
        batch = [lengths[j] for j in order[i : i + batch_size]]
        total += max(batch) * len(batch) - sum(batch)
    return total
