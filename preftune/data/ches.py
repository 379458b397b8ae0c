"""CHES scores of preference pairs: which pairs are likely to displace the chosen response's likelihood.

Razin et al. 2024, "Unintentional Unalignment: Likelihood Displacement in Direct Preference
Optimization" (arXiv 2410.08847), Definition 2. With ``h_{x,z}`` the model's last hidden state
after reading ``x`` then ``z`` (the vector the LM head maps to the next token's logits)::

    s+ = Σ_{k=1..|y+|} h_{x, y+_{<k}}        s− = Σ_{k=1..|y−|} h_{x, y−_{<k}}
    CHES(x, y+, y−)    = ⟨s+, s−⟩ − ‖s+‖²
    CHES_ln(x, y+, y−) = ⟨s+/|y+|, s−/|y−|⟩ − ‖s+/|y+|‖²      (length-normalised: mean hidden states)

The sums run over exactly the positions that predict a response token (the last prompt position up
to the one before the last response token), as the authors' ``ches/ches.py`` does (it drops the
last position, "usually the hidden embedding of the EOS token"). The higher the score, the more the
two responses look alike to the model and the more a DPO step on the pair tends to lower the
chosen response's likelihood. The paper's filtering (Section 6) ranks by the length-normalised
score and keeps the lowest-scoring pairs; :func:`top_fraction` picks the highest ones to drop.

Tokens are preftune's own (``data.tokenize_example``), so the positions are the ones training
computes log-probs at.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

    from .tokenize import TokenizedExample


@dataclass
class ChesScores:
    """One score per pair, in the order of the examples given (NaN where a response has no token)."""

    raw: list[float]
    normalised: list[float]
    chosen_tokens: list[int]
    rejected_tokens: list[int]


def ches_from_sums(sum_chosen: Tensor, sum_rejected: Tensor, n_chosen: Tensor, n_rejected: Tensor
                   ) -> tuple[Tensor, Tensor]:
    """(CHES, length-normalised CHES), each (N,), from the summed hidden states (N, D) and the counts
    of summed positions (N,). Computed in float64: the raw score is a difference of two large inner
    products (|y|² · ‖h‖² each), where float32 would lose the digits that rank pairs."""
    import torch

    sp, sm = sum_chosen.double(), sum_rejected.double()
    raw = (sp * sm).sum(-1) - (sp * sp).sum(-1)
    mp = sp / n_chosen.double().unsqueeze(-1)
    mm = sm / n_rejected.double().unsqueeze(-1)
    normalised = (mp * mm).sum(-1) - (mp * mp).sum(-1)
    empty = (n_chosen == 0) | (n_rejected == 0)
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    return torch.where(empty, nan, raw), torch.where(empty, nan, normalised)


def response_positions(prompt_len: int, response_len: int) -> range:
    """Positions whose hidden state predicts a response token: ``P-1 .. P+R-2`` (none before 0: a
    first token with no prompt before it is predicted by nothing)."""
    return range(max(prompt_len - 1, 0), prompt_len + response_len - 1)


def backbone(model: Any) -> Any:
    """The decoder without its LM head (``model.model`` for Llama, ``model.transformer`` for GPT-2):
    its ``last_hidden_state`` is the causal LM's ``hidden_states[-1]`` (final norm included) without
    computing the (B, T, V) logits. A PEFT model is scored with its adapters active."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model.base_model


def _batches(examples: Sequence[TokenizedExample], batch_size: int) -> list[list[int]]:
    # Longest first, so similar lengths share a batch (little padding) and memory peaks at once.
    size = [len(e.prompt_ids) + max(len(r) for r in e.response_ids[:2]) for e in examples]
    order = sorted(range(len(examples)), key=lambda i: (-size[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _hidden_sums(model: Any, examples: list[TokenizedExample], pad_id: int, device: Any, autocast: bool
                 ) -> tuple[Tensor, Tensor]:
    """Summed hidden states (2B, D) over each response's predicting positions, and their counts (2B,);
    rows 2i and 2i+1 are example i's chosen and rejected."""
    import torch

    seqs, spans = [], []
    for e in examples:
        for r in e.response_ids[:2]:
            seqs.append(list(e.prompt_ids) + list(r))
            spans.append(response_positions(len(e.prompt_ids), len(r)))
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    pick = torch.zeros((len(seqs), width), dtype=torch.float32)
    for i, (s, span) in enumerate(zip(seqs, spans, strict=True)):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
        pick[i, span.start : span.stop] = 1.0
    # Right padding: a causal model's states at real positions do not see the pads after them.
    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
        h = backbone(model)(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
    sums = torch.einsum("bt,btd->bd", pick.to(device), h.float())  # (2B, D)
    return sums.cpu(), pick.sum(1)


def ches_scores(
    model: Any,
    examples: Sequence[TokenizedExample],
    *,
    pad_id: int = 0,
    batch_size: int = 8,
    device: Any = None,
    precision: str = "fp32",
    progress: bool = False,
) -> ChesScores:
    """CHES and length-normalised CHES of every pair (column 0 chosen, column 1 rejected).

    One no-grad forward of prompt + response per response, ``batch_size`` pairs at a time, through
    the model's decoder only; ``precision="bf16"`` runs it under bf16 autocast (the sums and scores
    stay float32/float64). The model is left in the mode it came in.
    """
    import torch
    from tqdm.auto import tqdm

    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
    if any(len(e.response_ids) < 2 for e in examples):
        raise ValueError("CHES needs pairs: every example must have a chosen and a rejected response")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    raw, norm = [math.nan] * len(examples), [math.nan] * len(examples)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for idx in tqdm(_batches(examples, batch_size), disable=not progress, desc="CHES", unit="batch",
                            dynamic_ncols=True):
                sums, counts = _hidden_sums(model, [examples[i] for i in idx], pad_id, device, precision == "bf16")
                r, n = ches_from_sums(sums[0::2], sums[1::2], counts[0::2], counts[1::2])
                for j, i in enumerate(idx):
                    raw[i], norm[i] = float(r[j]), float(n[j])
    finally:
        model.train(was_training)
    return ChesScores(
        raw, norm,
        [len(response_positions(len(e.prompt_ids), len(e.response_ids[0]))) for e in examples],
        [len(response_positions(len(e.prompt_ids), len(e.response_ids[1]))) for e in examples],
    )


def top_fraction(scores: Sequence[float], fraction: float) -> list[int]:
    """Indices of the ``floor(fraction · n)`` highest scores, highest first (ties: the earlier index
    first; NaN scores are never picked). The paper keeps the 5% lowest length-normalised scores,
    i.e. ``fraction = 0.95``."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    n_drop = math.floor(round(fraction * len(scores), 9))
    ranked = sorted((i for i, s in enumerate(scores) if not math.isnan(s)), key=lambda i: (-scores[i], i))
    return ranked[:n_drop]
