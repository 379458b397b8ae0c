"""Per-token log-probs of given responses under a model, on the exact token ids (no re-tokenisation).

The online loop scores what it sampled (reference log-probs, π_t's log-probs for INPO, APO's
extrapolated reference) and the evaluation scores answers under the base model (KL, fluency); all of
them go through the log-prob engine here, so there is one computation of a response's log-probs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def adapters_disabled(model) -> Iterator[None]:
    """The base model: adapters off for a ``PeftModel`` or for layers PEFT adapted in place."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    if not layers:
        raise ValueError("the model has no LoRA adapters; pass a separate reference model for a full fine-tune")
    states = [m.disable_adapters for m in layers]
    try:
        for m in layers:
            m.enable_adapters(False)
        yield
    finally:
        for m, was_disabled in zip(layers, states, strict=True):
            m.enable_adapters(not was_disabled)


@torch.no_grad()
def response_token_logps(
    model,
    prompt_ids: list[list[int]],
    response_ids: list[list[list[int]]],
    pad_id: int,
    *,
    adapters_off: bool = False,
    batch_size: int = 8,
    chunk_size: int = 1024,
) -> list[list[torch.Tensor]]:
    """``out[i][k]``: float32 (len,) log-probs of response ``k`` of prompt ``i`` (empty → empty tensor).

    ``adapters_off``: score under the base of a LoRA model (the reference of LoRA training).
    """
    from preftune.model.engine import LogProbEngine, pack, scatter_stats

    engine = LogProbEngine(model, chunk_size, prefix_sharing="off")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[list[torch.Tensor]] = []
    ctx = adapters_disabled(model) if adapters_off else contextlib.nullcontext()
    try:
        with ctx:
            for s in range(0, len(prompt_ids), batch_size):
                resp = response_ids[s : s + batch_size]
                if not any(r for rs in resp for r in rs):
                    out.extend([[torch.zeros(0) for _ in rs] for rs in resp])
                    continue
                packed = pack(prompt_ids[s : s + batch_size], resp, pad_id, device=device)
                flat = engine(**packed.tensors())["token_logps"].float()
                _, tok, _ = scatter_stats(packed, flat, True)  # (B, K, T), 0 past each response
                tok = tok.cpu()
                for b, rs in enumerate(resp):
                    out.append([tok[b, k, : len(r)].clone() for k, r in enumerate(rs)])
    finally:
        model.train(was_training)
    return out
