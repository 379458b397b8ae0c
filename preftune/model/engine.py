"""The log-prob engine: from a batch of token lists to the per-response statistics the losses use.

The waste it avoids (DESIGN.md, "The engine"):
- the LM head and log-softmax run only on response positions, in chunks, and under activation
  checkpointing per chunk, so no (B, T, V) float32 tensor exists in the forward or the backward;
- reference statistics come from the same code path (adapter disabled for LoRA, a frozen copy for
  full fine-tuning, or a precomputed cache), so policy and reference see identical tokens.

The engine is an ``nn.Module`` whose forward takes only tensors, so DDP/FSDP can wrap it and the
whole computation runs through the wrapper's forward (gradient sync hooks stay correct).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from preftune.losses.base import PolicyStats, RefStats


def split_lm(model: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(causal-LM module, backbone, LM head) of a HF causal LM, PEFT-wrapped or not."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(lm, lm.base_model_prefix)
    head = lm.get_output_embeddings()
    return lm, backbone, head


def _logits_postprocess(lm: nn.Module):
    """Model-specific logit transforms some architectures apply after the LM head."""
    cfg = lm.config
    scale = getattr(cfg, "logit_scale", None)  # Cohere multiplies
    divide = getattr(cfg, "logits_scaling", None)  # Granite divides
    softcap = getattr(cfg, "final_logit_softcapping", None)  # Gemma 2/3

    def post(logits: Tensor) -> Tensor:
        if scale is not None:
            logits = logits * scale
        if divide is not None:
            logits = logits / divide
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    return post


@dataclass
class PackedBatch:
    """Tensors for one forward: one row per (group, response), right-padded.

    ``targets`` holds, for every response token, (row, position of the token) so that the hidden
    state at ``position - 1`` predicts it. ``slot`` maps each row to its flat (b * K + k) cell.
    """

    input_ids: Tensor  # (N, L)
    attention_mask: Tensor  # (N, L)
    pred_rows: Tensor  # (M,) row of each predicted response token
    pred_pos: Tensor  # (M,) position whose hidden state predicts it
    pred_tokens: Tensor  # (M,) the token id
    token_slot: Tensor  # (M,) flat cell index b * K + k
    token_index: Tensor  # (M,) index of the token within its response
    B: int
    K: int
    T: int  # longest response
    lengths: Tensor  # (B, K) response token counts
    valid: Tensor  # (B, K)

    def tensors(self) -> dict[str, Tensor]:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "pred_rows": self.pred_rows,
            "pred_pos": self.pred_pos,
            "pred_tokens": self.pred_tokens,
        }


def pack(prompt_ids: list[list[int]], response_ids: list[list[list[int]]], pad_id: int, device=None) -> PackedBatch:
    """Lay a (B × K) group batch out as rows ``prompt + response`` (empty responses skipped)."""
    B = len(prompt_ids)
    K = max(len(r) for r in response_ids)
    rows, r_rows, r_pos, r_tok, r_slot, r_idx = [], [], [], [], [], []
    lengths = torch.zeros(B, K)
    valid = torch.zeros(B, K, dtype=torch.bool)
    for b, (p, responses) in enumerate(zip(prompt_ids, response_ids)):
        for k, r in enumerate(responses):
            if not r:
                continue
            n = len(rows)
            rows.append(p + r)
            lengths[b, k] = len(r)
            valid[b, k] = True
            start = len(p)
            r_rows.extend([n] * len(r))
            r_pos.extend(range(start - 1, start - 1 + len(r)))
            r_tok.extend(r)
            r_slot.extend([b * K + k] * len(r))
            r_idx.extend(range(len(r)))
    if not rows:
        raise ValueError("batch has no responses")
    if any(len(p) == 0 for p in prompt_ids):
        # The first response token must be predicted from something: an empty prompt has no state.
        raise ValueError("every prompt needs at least one token (add a BOS token or a chat template)")
    L = max(len(s) for s in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    for i, s in enumerate(rows):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    as_t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    pb = PackedBatch(
        ids, mask, as_t(r_rows), as_t(r_pos), as_t(r_tok), as_t(r_slot), as_t(r_idx),
        B, K, int(lengths.max().item()), lengths, valid,
    )
    if device is not None:
        for name in ("input_ids", "attention_mask", "pred_rows", "pred_pos", "pred_tokens", "token_slot", "token_index"):
            setattr(pb, name, getattr(pb, name).to(device))
    return pb


def _chunk_logps(hidden: Tensor, weight: Tensor, bias: Tensor | None, tokens: Tensor, post) -> Tensor:
    logits = torch.nn.functional.linear(hidden, weight, bias)
    logits = _at_least_fp32(post(logits))  # (C, V): log-softmax in float32 even under bf16
    return logits.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)


def _at_least_fp32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _chunk_logps_kl(
    hidden: Tensor, ref_hidden: Tensor, weight: Tensor, bias: Tensor | None, ref_weight: Tensor,
    ref_bias: Tensor | None, tokens: Tensor, post,
) -> tuple[Tensor, Tensor, Tensor]:
    logp = _at_least_fp32(post(torch.nn.functional.linear(hidden, weight, bias))).log_softmax(-1)  # (C, V)
    with torch.no_grad():
        ref_logp = _at_least_fp32(post(torch.nn.functional.linear(ref_hidden, ref_weight, ref_bias))).log_softmax(-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)  # KL(ref ‖ θ) per position
    return logp.gather(-1, tokens[:, None]).squeeze(-1), ref_logp.gather(-1, tokens[:, None]).squeeze(-1), kl


class LogProbEngine(nn.Module):
    """Wraps a causal LM; ``forward(**packed.tensors())`` returns per-token response log-probs.

    ``chunk_size`` rows of response positions go through the LM head at a time; with gradients on,
    each chunk is checkpointed so its (chunk, V) logits are recomputed in backward instead of stored.
    """

    def __init__(self, model: nn.Module, chunk_size: int = 1024):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        _, backbone, _ = split_lm(self.model)
        out = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        pred_rows: Tensor,
        pred_pos: Tensor,
        pred_tokens: Tensor,
        ref_hidden: Tensor | None = None,
        ref_head_weight: Tensor | None = None,
        ref_head_bias: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Per-token log-probs (M,) of the response tokens; with ``ref_hidden`` (M, H) from a live
        reference, also the reference log-probs and KL(ref ‖ θ) over the full vocabulary (TDPO)."""
        lm, _, head = split_lm(self.model)
        post = _logits_postprocess(lm)
        hidden = self.hidden_states(input_ids, attention_mask)
        h = hidden[pred_rows, pred_pos]  # (M, H): only response positions reach the LM head
        weight, bias = head.weight, getattr(head, "bias", None)
        grad = torch.is_grad_enabled() and h.requires_grad
        out_logps, out_ref, out_kl = [], [], []
        for s in range(0, h.shape[0], self.chunk_size):
            hc, tc = h[s : s + self.chunk_size], pred_tokens[s : s + self.chunk_size]
            if ref_hidden is None:
                fn = lambda a, b=tc: _chunk_logps(a, weight, bias, b, post)  # noqa: E731
                out_logps.append(checkpoint(fn, hc, use_reentrant=False) if grad else fn(hc))
            else:
                rc = ref_hidden[s : s + self.chunk_size]
                fn = lambda a, r=rc, b=tc: _chunk_logps_kl(  # noqa: E731
                    a, r, weight, bias, ref_head_weight, ref_head_bias, b, post
                )
                lp, rlp, kl = checkpoint(fn, hc, use_reentrant=False) if grad else fn(hc)
                out_logps.append(lp)
                out_ref.append(rlp)
                out_kl.append(kl)
        result = {"token_logps": torch.cat(out_logps)}
        if out_kl:
            result["ref_token_logps"] = torch.cat(out_ref)
            result["token_kl"] = torch.cat(out_kl)
        return result


def scatter_stats(
    packed: PackedBatch, flat: Tensor, need_tokens: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Sum flat per-token values (M,) into (B, K) sequences; optionally also lay them out (B, K, T)."""
    B, K = packed.B, packed.K
    seq = torch.zeros(B * K, dtype=flat.dtype, device=flat.device).index_add(0, packed.token_slot, flat)
    if not need_tokens:
        return seq.view(B, K), None, None
    grid = torch.zeros(B * K, max(packed.T, 1), dtype=flat.dtype, device=flat.device)
    grid = grid.index_put((packed.token_slot, packed.token_index), flat)
    mask = torch.zeros(B * K, max(packed.T, 1), dtype=torch.bool, device=flat.device)
    mask[packed.token_slot, packed.token_index] = True
    return seq.view(B, K), grid.view(B, K, -1), mask.view(B, K, -1)


def policy_stats(
    packed: PackedBatch,
    out: dict[str, Tensor],
    *,
    need_tokens: bool,
    inputs: dict[str, Tensor] | None = None,
) -> tuple[PolicyStats, RefStats | None]:
    """Assemble PolicyStats (and RefStats from live reference outputs, when present)."""
    device = out["token_logps"].device
    logps, tok, mask = scatter_stats(packed, out["token_logps"], need_tokens)
    token_kl = None
    ref = None
    if "token_kl" in out:
        _, token_kl, _ = scatter_stats(packed, out["token_kl"], True)
        ref_logps, ref_tok, _ = scatter_stats(packed, out["ref_token_logps"], True)
        ref = RefStats(ref_logps, ref_tok)
    stats = PolicyStats(
        logps=logps,
        lengths=packed.lengths.to(device),
        valid=packed.valid.to(device),
        token_logps=tok,
        token_mask=mask,
        token_kl=token_kl,
        inputs={k: v.to(device) for k, v in (inputs or {}).items()},
    )
    return stats, ref


@torch.no_grad()
def reference_stats(
    engine: LogProbEngine, packed: PackedBatch, ref_model: nn.Module | None, need_tokens: bool
) -> RefStats:
    """Reference log-probs through the same engine: ``ref_model`` if given, else the engine's own
    model with its LoRA adapter disabled (no second copy of the weights)."""
    if ref_model is not None:
        ref_engine = LogProbEngine(ref_model, engine.chunk_size)
        out = ref_engine(**packed.tensors())
    else:
        with engine.model.disable_adapter():
            out = engine(**packed.tensors())
    logps, tok, _ = scatter_stats(packed, out["token_logps"], need_tokens)
    return RefStats(logps, tok)


@torch.no_grad()
def live_reference_inputs(engine: LogProbEngine, packed: PackedBatch, ref_model: nn.Module | None) -> dict[str, Tensor]:
    """Reference hidden states at the response positions and the reference LM head, for objectives
    that need full-vocabulary reference distributions (TDPO, SparsePO). Only (M, H) is kept, never
    reference logits for the whole batch."""
    model = ref_model if ref_model is not None else engine.model
    ctx = engine.model.disable_adapter() if ref_model is None else contextlib.nullcontext()
    with ctx:
        hidden = LogProbEngine(model).hidden_states(packed.input_ids, packed.attention_mask)
    _, _, head = split_lm(model)
    return {
        "ref_hidden": hidden[packed.pred_rows, packed.pred_pos],
        "ref_head_weight": head.weight.detach(),
        "ref_head_bias": None if getattr(head, "bias", None) is None else head.bias.detach(),
    }
