"""The log-prob engine: from a batch of token lists to the per-response statistics the losses use.

The waste it avoids (DESIGN.md, "The engine"):
- prefix sharing: with ``pack(..., share_prefix=True)`` each group is one segment
  ``[prompt, r1, ..., rK]`` whose responses attend to the prompt and causally to themselves (a block
  attention mask, position ids restarting after the prompt), so the prompt runs once per group, and
  several short groups share a row (padding-free packing, rows no longer than the longest group);
- the LM head and log-softmax run only on response positions, in chunks, through a fused
  head/log-softmax autograd function that keeps only (chunk,) statistics and recomputes the chunk's
  logits in backward, so no (B, T, V) float32 tensor exists in the forward or the backward;
- reference statistics come from the same code path (adapter disabled for LoRA, a frozen copy for
  full fine-tuning, or a precomputed cache), so policy and reference see identical tokens.

The engine is an ``nn.Module`` whose forward takes only tensors, so DDP/FSDP can wrap it and the
whole computation runs through the wrapper's forward (gradient sync hooks stay correct).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from preftune.losses.base import PolicyStats, RefStats
from preftune.model import masks


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
    attention_mask: Tensor  # (N, L) padding mask, or (N, 1, L, L) bool block mask when prefix-shared
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
    position_ids: Tensor | None = None  # (N, L) when prefix-shared: responses restart after the prompt

    @property
    def shared(self) -> bool:
        return self.position_ids is not None

    @property
    def num_positions(self) -> int:
        """Positions the backbone computes (padding included): the cost of the forward."""
        return self.input_ids.numel()

    def tensors(self) -> dict[str, Tensor]:
        out = {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "pred_rows": self.pred_rows,
            "pred_pos": self.pred_pos,
            "pred_tokens": self.pred_tokens,
        }
        if self.position_ids is not None:
            out["position_ids"] = self.position_ids
        return out


def pack(
    prompt_ids: list[list[int]],
    response_ids: list[list[list[int]]],
    pad_id: int,
    device=None,
    share_prefix: bool = False,
) -> PackedBatch:
    """Lay a (B × K) group batch out for one forward (empty responses skipped).

    ``share_prefix=False``: one right-padded row ``prompt + response`` per (group, response), the
    exact layout every causal LM supports. ``share_prefix=True``: one segment ``[prompt, r1, …, rK]``
    per group with a block attention mask and restarted position ids (see ``_pack_shared``); it needs
    a model whose attention honours a 4D mask and ``position_ids`` (``prefix_sharing_supported``).
    """
    if not any(r for rs in response_ids for r in rs):
        raise ValueError("batch has no responses")
    if any(len(p) == 0 for p in prompt_ids):
        # The first response token must be predicted from something: an empty prompt has no state.
        raise ValueError("every prompt needs at least one token (add a BOS token or a chat template)")
    B = len(prompt_ids)
    K = max(len(r) for r in response_ids)
    lengths = torch.zeros(B, K)
    valid = torch.zeros(B, K, dtype=torch.bool)
    for b, responses in enumerate(response_ids):
        for k, r in enumerate(responses):
            lengths[b, k] = len(r)
            valid[b, k] = bool(r)
    build = _pack_shared if share_prefix else _pack_unshared
    ids, mask, position_ids, r_rows, r_pos, r_tok, r_slot, r_idx = build(prompt_ids, response_ids, pad_id, K)
    as_t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    pb = PackedBatch(
        ids,
        mask,
        as_t(r_rows),
        as_t(r_pos),
        as_t(r_tok),
        as_t(r_slot),
        as_t(r_idx),
        B,
        K,
        int(lengths.max().item()),
        lengths,
        valid,
        position_ids,
    )
    if device is not None:
        for name in (
            "input_ids",
            "attention_mask",
            "pred_rows",
            "pred_pos",
            "pred_tokens",
            "token_slot",
            "token_index",
            "position_ids",
        ):
            if getattr(pb, name) is not None:
                setattr(pb, name, getattr(pb, name).to(device))
    return pb


def _pack_unshared(prompt_ids, response_ids, pad_id, K):
    rows, r_rows, r_pos, r_tok, r_slot, r_idx = [], [], [], [], [], []
    for b, (p, responses) in enumerate(zip(prompt_ids, response_ids)):
        for k, r in enumerate(responses):
            if not r:
                continue
            n = len(rows)
            rows.append(p + r)
            start = len(p)
            r_rows.extend([n] * len(r))
            r_pos.extend(range(start - 1, start - 1 + len(r)))
            r_tok.extend(r)
            r_slot.extend([b * K + k] * len(r))
            r_idx.extend(range(len(r)))
    L = max(len(s) for s in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    for i, s in enumerate(rows):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask, None, r_rows, r_pos, r_tok, r_slot, r_idx


def _pack_shared(prompt_ids, response_ids, pad_id, K):
    """Segments ``[prompt, r1, …, rK]``, packed first-fit-decreasing into rows as long as the longest.

    Token q may attend to token j iff both are in the same segment, j ≤ q, and j is a prompt token
    or in q's own response: each response sees exactly ``prompt + itself``, as in its own row. The
    first token of every response is predicted from the prompt's last position (shared, so its
    gradient sums over the K responses, as it must). Position ids restart at ``len(prompt)`` for
    every response. Padding tokens are their own segment and attend only to themselves.
    """
    segs = []  # (b, tokens, positions, blocks, [(k, offset in segment, length)])
    for b, (p, responses) in enumerate(zip(prompt_ids, response_ids)):
        toks, pos, blk, resp = list(p), list(range(len(p))), [0] * len(p), []
        for k, r in enumerate(responses):
            if not r:
                continue
            resp.append((k, len(toks), len(r)))
            toks += r
            pos += range(len(p), len(p) + len(r))
            blk += [k + 1] * len(r)
        if resp:
            segs.append((b, toks, pos, blk, resp))
    L = max(len(s[1]) for s in segs)
    rows: list[list[int]] = []  # segment indices per row
    fill: list[int] = []
    for i in sorted(range(len(segs)), key=lambda i: -len(segs[i][1])):
        n = len(segs[i][1])
        r = next((j for j, f in enumerate(fill) if f + n <= L), None)
        if r is None:
            rows.append([])
            fill.append(0)
            r = len(rows) - 1
        rows[r].append(i)
        fill[r] += n
    N = len(rows)
    ids = torch.full((N, L), pad_id, dtype=torch.long)
    pos_ids = torch.zeros((N, L), dtype=torch.long)
    seg_ids = -1 - torch.arange(N * L).view(N, L)  # padding: a segment of its own
    blk_ids = torch.zeros((N, L), dtype=torch.long)
    where = {}  # segment -> (row, offset)
    for r, members in enumerate(rows):
        off = 0
        for i in members:
            _, toks, pos, blk, _ = segs[i]
            n = len(toks)
            ids[r, off : off + n] = torch.tensor(toks)
            pos_ids[r, off : off + n] = torch.tensor(pos)
            seg_ids[r, off : off + n] = i
            blk_ids[r, off : off + n] = torch.tensor(blk)
            where[i] = (r, off)
            off += n
    q, j = seg_ids[:, :, None], seg_ids[:, None, :]
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    bq, bj = blk_ids[:, :, None], blk_ids[:, None, :]
    mask = (q == j) & causal & ((bj == 0) | (bj == bq))  # (N, L, L)
    r_rows, r_pos, r_tok, r_slot, r_idx = [], [], [], [], []
    for i, (b, toks, _, _, resp) in enumerate(segs):
        row, off = where[i]
        plen = len(prompt_ids[b])
        for k, start, n in resp:
            r_rows.extend([row] * n)
            r_pos.append(off + plen - 1)
            r_pos.extend(range(off + start, off + start + n - 1))
            r_tok.extend(toks[start : start + n])
            r_slot.extend([b * K + k] * n)
            r_idx.extend(range(n))
    # Order tokens as the unshared layout does (group, response, token) so chunks see the same rows.
    order = sorted(range(len(r_slot)), key=lambda t: (r_slot[t], r_idx[t]))
    pick = lambda xs: [xs[t] for t in order]  # noqa: E731
    return ids, mask[:, None], pos_ids, pick(r_rows), pick(r_pos), pick(r_tok), pick(r_slot), pick(r_idx)


# ------------------------------------------------------------------ side sequences (RDPO's rationales)


def pack_side(prompt_ids: list[list[int]], side_ids: list[list[int]], pad_id: int, device=None) -> PackedBatch:
    """One extra sequence per group, ``prompt_ids[b] + side_ids[b]``, as B groups of one response (unshared
    rows): the rationale of each pair after its rationale prompt x_rat (METHODS.md §M3)."""
    return pack(prompt_ids, [[r] for r in side_ids], pad_id, device=device)


def _pad_cols(x: Tensor, width: int, value: int) -> Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[-1]), value=value)


def _block_mask(p: PackedBatch, width: int) -> Tensor:
    """(N, 1, width, width) bool: ``p``'s attention as a 4D mask; padding positions attend only to themselves
    (as in ``_pack_shared``), so no softmax row is empty."""
    n, length = p.input_ids.shape
    dev = p.input_ids.device
    if p.shared:
        inner = p.attention_mask.bool()
    else:  # right-padded causal rows: real tokens see the real tokens before them
        real = p.attention_mask.bool()  # (N, L)
        causal = torch.ones(length, length, dtype=torch.bool, device=dev).tril()
        inner = (causal[None] & real[:, None, :] & real[:, :, None])[:, None]
    eye = torch.eye(width, dtype=torch.bool, device=dev)
    out = eye.expand(n, 1, width, width).clone()
    out[:, :, :length, :length] |= inner
    return out


def _positions(p: PackedBatch, width: int) -> Tensor:
    if p.shared:
        return _pad_cols(p.position_ids, width, 0)
    n, _ = p.input_ids.shape
    return torch.arange(width, device=p.input_ids.device).expand(n, width).clone()  # HF's default for unshared rows


def with_side(main: PackedBatch, side: PackedBatch, pad_id: int) -> PackedBatch:
    """``main`` and ``side`` in one forward: ``main``'s rows, positions and token order unchanged, ``side``'s rows
    after them (so anything that re-packs the batch, e.g. training dynamics, still finds its tokens), its groups
    numbered after ``main``'s. A prefix-shared ``main`` turns ``side``'s rows into the same 4D block-mask form."""
    if side.K > main.K:
        raise ValueError(f"side sequences have {side.K} responses per group, more than the batch's {main.K}")
    width = max(main.input_ids.shape[1], side.input_ids.shape[1])
    ids = torch.cat([_pad_cols(main.input_ids, width, pad_id), _pad_cols(side.input_ids, width, pad_id)])
    if main.shared or side.shared:
        mask = torch.cat([_block_mask(main, width), _block_mask(side, width)])
        positions = torch.cat([_positions(main, width), _positions(side, width)])
    else:
        mask = torch.cat([_pad_cols(main.attention_mask, width, 0), _pad_cols(side.attention_mask, width, 0)])
        positions = None
    K, rows = main.K, main.input_ids.shape[0]
    side_slot = (main.B + side.token_slot // side.K) * K + side.token_slot % side.K
    grow = lambda t: torch.cat([t, t.new_zeros(t.shape[0], K - t.shape[1])], 1)  # noqa: E731  (B_side, K)
    return PackedBatch(
        ids, mask,
        torch.cat([main.pred_rows, side.pred_rows + rows]),
        torch.cat([main.pred_pos, side.pred_pos]),
        torch.cat([main.pred_tokens, side.pred_tokens]),
        torch.cat([main.token_slot, side_slot]),
        torch.cat([main.token_index, side.token_index]),
        main.B + side.B, K, max(main.T, side.T),
        torch.cat([main.lengths, grow(side.lengths)]),
        torch.cat([main.valid, grow(side.valid)]),
        positions,
    )


def split_side(
    main: PackedBatch, side: PackedBatch, out: dict[str, Tensor]
) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """The engine's output on ``with_side(main, side)`` → (``main``'s output, as if run alone; (B,) summed side
    log-probs; (B,) side token counts). Per-token outputs are (M_main + M_side,): ``main``'s tokens come first."""
    m, total = main.pred_tokens.numel(), main.pred_tokens.numel() + side.pred_tokens.numel()
    main_out = {k: v[:m] if v.dim() and v.shape[0] == total else v for k, v in out.items()}
    flat = out["token_logps"]
    logps, _, _ = scatter_stats(side, flat[m:], False)  # (B, 1)
    return main_out, logps[:, 0], side.lengths[:, 0].to(device=flat.device, dtype=flat.dtype)


def _chunk_logps(hidden: Tensor, weight: Tensor, bias: Tensor | None, tokens: Tensor, post) -> Tensor:
    logits = torch.nn.functional.linear(hidden, weight, bias)
    logits = _at_least_fp32(post(logits))  # (C, V): log-softmax in float32 even under bf16
    return logits.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)


def _at_least_fp32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _chunk_logps_kl(
    hidden: Tensor,
    ref_hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    ref_weight: Tensor,
    ref_bias: Tensor | None,
    tokens: Tensor,
    post,
    policy_kl: bool = False,
) -> tuple[Tensor, ...]:
    logp = _at_least_fp32(post(torch.nn.functional.linear(hidden, weight, bias))).log_softmax(-1)  # (C, V)
    with torch.no_grad():
        ref_logp = _at_least_fp32(post(torch.nn.functional.linear(ref_hidden, ref_weight, ref_bias))).log_softmax(-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)  # KL(ref ‖ θ) per position
    out = (logp.gather(-1, tokens[:, None]).squeeze(-1), ref_logp.gather(-1, tokens[:, None]).squeeze(-1), kl)
    if policy_kl:  # OREO's regulariser: KL(θ ‖ ref) per position as well
        out += ((logp.exp() * (logp - ref_logp)).sum(-1),)
    return out


def _lse(logits: Tensor) -> Tensor:
    return _at_least_fp32(logits).logsumexp(-1)


def _head_grad(logits: Tensor, lse: Tensor, g: Tensor, tokens: Tensor, dtype: torch.dtype) -> Tensor:
    """g·(onehot − softmax) in ``dtype``, computed in at least float32."""
    p = (_at_least_fp32(logits) - lse[:, None]).exp()
    onehot = torch.arange(logits.shape[-1], device=logits.device)[None, :] == tokens[:, None]
    return ((onehot.to(p.dtype) - p) * g[:, None].to(p.dtype)).to(dtype)


@functools.cache
def _fused(fn):
    """``fn`` (``_lse`` or ``_head_grad``) through torch.compile: one kernel instead of 4–6 passes over the
    (C, V) chunk; compiled on first use, dynamic in the chunk length."""
    return torch.compile(fn, dynamic=True)


class _HeadLogps(torch.autograd.Function):
    """log softmax(h Wᵀ + b)[token] for one chunk, saving only h, W and the (C,) log-normaliser.

    Equal to ``checkpoint(_chunk_logps)`` (the logits are recomputed in backward either way) but the
    backward is written out: ∂logp/∂logits = onehot − softmax, one (C, V) buffer instead of the
    several that autograd's log-softmax/gather backward allocates. Matmuls run in ``dtype`` (the
    autocast dtype, else the inputs'), the normaliser and the log-probs in at least float32.
    """

    @staticmethod
    def forward(
        ctx, h: Tensor, weight: Tensor, bias: Tensor | None, tokens: Tensor, dtype: torch.dtype, fused: bool = False
    ) -> Tensor:
        with torch.autocast(h.device.type, enabled=False):
            hc, wc = h.to(dtype), weight.to(dtype)
            bc = bias.to(dtype) if bias is not None else None
            logits = torch.nn.functional.linear(hc, wc, bc)  # (C, V) in the matmul dtype
            if fused:
                lse = _fused(_lse)(logits)
            else:
                logits = _at_least_fp32(logits)
                lse = logits.logsumexp(-1)  # (C,)
            out = _at_least_fp32(logits.gather(-1, tokens[:, None]).squeeze(-1)) - lse
        ctx.save_for_backward(hc, wc, bc, tokens, lse)
        ctx.in_dtypes = (h.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.fused = fused
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        hc, wc, bc, tokens, lse = ctx.saved_tensors
        h_dt, w_dt, b_dt = ctx.in_dtypes
        with torch.autocast(hc.device.type, enabled=False):
            logits = torch.nn.functional.linear(hc, wc, bc)  # (C, V)
            if ctx.fused:
                d = _fused(_head_grad)(logits, lse, g, tokens, wc.dtype)
            else:
                logits = _at_least_fp32(logits)
                g = g.to(logits.dtype)
                d = logits.sub_(lse[:, None]).exp_().mul_(-g[:, None])  # −g·softmax, in place
                d.scatter_add_(-1, tokens[:, None], g[:, None])  # + g·onehot
                d = d.to(wc.dtype)
            grad_h = d @ wc if ctx.needs_input_grad[0] else None
            grad_w = d.t() @ hc if ctx.needs_input_grad[1] else None
            grad_b = d.sum(0) if bc is not None and ctx.needs_input_grad[2] else None
        return (
            None if grad_h is None else grad_h.to(h_dt),
            None if grad_w is None else grad_w.to(w_dt),
            None if grad_b is None else grad_b.to(b_dt),
            None,
            None,
            None,
        )


def _compute_dtype(h: Tensor, weight: Tensor) -> torch.dtype:
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(h.dtype, weight.dtype)


def _attention_mask_for(model: nn.Module, mask: Tensor, like: Tensor) -> Tensor:
    """A bool (N, 1, L, L) block mask as the attention implementation wants it: ``sdpa`` takes bool
    (True = attend); ``eager`` adds the mask to the scores, so it gets 0 / most-negative floats."""
    if mask.dim() != 4 or mask.dtype != torch.bool:
        return mask
    if getattr(model.config, "_attn_implementation", "eager") == "sdpa":
        return mask
    dt = like.dtype if like.dtype == torch.float64 else torch.float32
    return torch.zeros(mask.shape, dtype=dt, device=mask.device).masked_fill_(~mask, torch.finfo(dt).min)


class LogProbEngine(nn.Module):
    """Wraps a causal LM; ``forward(**packed.tensors())`` returns per-token response log-probs.

    ``chunk_size`` rows of response positions go through the LM head at a time; with gradients on,
    only the hidden states of a chunk are kept and its (chunk, V) logits are recomputed in backward.

    ``prefix_sharing``: ``"on"`` packs prefix-shared (``pack(..., share_prefix=True)``) and fails if
    the model cannot; ``"off"`` always uses the unshared layout; ``"auto"`` checks once, on a tiny
    batch, that the shared layout gives the unshared log-probs for this model and attention
    implementation, and falls back to unshared otherwise. ``shares_prefix()`` says which was chosen
    (``prefix_sharing_reason`` says why).

    ``fused_head``: the LM head's log-normaliser and its gradient run as two torch.compile'd kernels
    (reading the chunk's logits once, in the matmul dtype) instead of 4–6 float32 passes over them.
    """

    def __init__(
        self, model: nn.Module, chunk_size: int = 1024, prefix_sharing: str = "auto", fused_head: bool = False
    ):
        super().__init__()
        self.fused_head = fused_head
        if prefix_sharing not in ("auto", "on", "off"):
            raise ValueError(f"prefix_sharing must be auto, on or off, not {prefix_sharing!r}")
        self.model = model
        self.chunk_size = chunk_size
        self.prefix_sharing = prefix_sharing
        self._shares: bool | None = None
        self.prefix_sharing_reason = ""
        # SparsePO's learned mask network (model/masks.py), set by the trainer: a submodule, so the optimizer,
        # DDP and checkpoints see its parameters; it runs inside forward on ``ref_layer_hidden``.
        self.token_masks: nn.Module | None = None
        # OREO's critic (model/critic.py), set by the trainer like ``token_masks``: V(s_t) at every response
        # position of the same packed batch, returned as ``values``; ``policy_kl`` adds KL(θ ‖ ref) per position
        # (``policy_kl``) to a live-reference forward.
        self.critic: nn.Module | None = None
        self.policy_kl = False

    @property
    def _no_split_modules(self) -> list[str] | None:
        """The wrapped model's decoder-layer classes: accelerate's FSDP auto-wrap reads this from the module
        it prepares (the engine), so each layer becomes its own FSDP unit, gathered only while it runs."""
        lm, _, _ = split_lm(self.model)
        return getattr(lm, "_no_split_modules", None)

    def shares_prefix(self) -> bool:
        """Whether batches for this engine should be packed with ``share_prefix=True`` (decided once)."""
        if self._shares is None:
            if self.prefix_sharing == "off":
                self._shares, self.prefix_sharing_reason = False, "prefix_sharing=off"
            else:
                ok, why = prefix_sharing_supported(self.model, self.chunk_size)
                if not ok and self.prefix_sharing == "on":
                    raise ValueError(f"prefix_sharing=on, but this model cannot share prompts: {why}")
                self._shares, self.prefix_sharing_reason = ok, why
        return self._shares

    def hidden_states(
        self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None, all_layers: bool = False
    ):
        """The backbone's last hidden states (N, L, H); with ``all_layers`` also HF's ``hidden_states`` tuple."""
        lm, backbone, _ = split_lm(self.model)
        emb = lm.get_input_embeddings().weight
        kwargs = {} if position_ids is None else {"position_ids": position_ids}
        if all_layers:
            kwargs["output_hidden_states"] = True
        out = backbone(
            input_ids=input_ids, attention_mask=_attention_mask_for(lm, attention_mask, emb), use_cache=False, **kwargs
        )
        last = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return (last, out.hidden_states) if all_layers else last

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
        position_ids: Tensor | None = None,
        ref_layer_hidden: Tensor | None = None,
        ref_activation_mask: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Per-token log-probs (M,) of the response tokens; with ``ref_hidden`` (M, H) from a live
        reference, also the reference log-probs and KL(ref ‖ θ) over the full vocabulary (TDPO).
        SparsePO: ``ref_layer_hidden`` (L, M, H), the reference's every-block hidden states, go through
        ``token_masks`` (with gradient: the network trains) to (M,) ``token_reward_mask``/``token_kl_mask``;
        ``ref_activation_mask`` (M,), MaPO's mask from the reference pass, is returned as ``token_activation_mask``."""
        lm, _, head = split_lm(self.model)
        post = _logits_postprocess(lm)
        plain = all(
            getattr(lm.config, a, None) is None for a in ("logit_scale", "logits_scaling", "final_logit_softcapping")
        )
        hidden = self.hidden_states(input_ids, attention_mask, position_ids)
        h = hidden[pred_rows, pred_pos]  # (M, H): only response positions reach the LM head
        weight, bias = head.weight, getattr(head, "bias", None)
        grad = torch.is_grad_enabled() and h.requires_grad
        out_logps, out_ref, out_kl, out_pkl = [], [], [], []
        for s in range(0, h.shape[0], self.chunk_size):
            hc, tc = h[s : s + self.chunk_size], pred_tokens[s : s + self.chunk_size]
            if ref_hidden is None and plain:
                out_logps.append(_HeadLogps.apply(hc, weight, bias, tc, _compute_dtype(hc, weight), self.fused_head))
            elif ref_hidden is None:
                fn = lambda a, b=tc: _chunk_logps(a, weight, bias, b, post)  # noqa: E731
                out_logps.append(checkpoint(fn, hc, use_reentrant=False) if grad else fn(hc))
            else:
                rc = ref_hidden[s : s + self.chunk_size]
                fn = lambda a, r=rc, b=tc: _chunk_logps_kl(  # noqa: E731
                    a, r, weight, bias, ref_head_weight, ref_head_bias, b, post, self.policy_kl
                )
                lp, rlp, kl, *pkl = checkpoint(fn, hc, use_reentrant=False) if grad else fn(hc)
                out_logps.append(lp)
                out_ref.append(rlp)
                out_kl.append(kl)
                out_pkl += pkl
        result = {"token_logps": torch.cat(out_logps)}
        if out_kl:
            result["ref_token_logps"] = torch.cat(out_ref)
            result["token_kl"] = torch.cat(out_kl)
        if out_pkl:
            result["policy_kl"] = torch.cat(out_pkl)
        if self.critic is not None:
            result["values"] = self.critic(input_ids, attention_mask, pred_rows, pred_pos, position_ids)
        if ref_layer_hidden is not None:
            if self.token_masks is None:
                raise ValueError("ref_layer_hidden given but the engine has no token_masks network")
            result.update(self.token_masks(ref_layer_hidden))
        if ref_activation_mask is not None:
            result[masks.ACTIVATION_KEY] = ref_activation_mask
        return result


# A small fixed batch for the prefix-sharing check: ragged prompts, K = 2 and 3, an empty response.
_PROBE_PROMPTS = [[5, 9, 2, 7, 11], [4, 8, 3]]
_PROBE_RESPONSES = [[[6, 1, 10], [12, 13, 14, 15]], [[9, 9], [], [7, 3, 5, 1, 2]]]


@torch.no_grad()
def prefix_sharing_supported(model: nn.Module, chunk_size: int = 1024, atol: float = 1e-3) -> tuple[bool, str]:
    """Run a tiny batch both ways; the shared layout is usable iff it gives the unshared log-probs.

    This catches attention implementations that ignore a 4D mask (flash-attention kernels, some
    custom models), models without ``position_ids``, and anything else that would silently change
    the numbers; it costs one forward over 25 tokens.
    """
    lm, _, _ = split_lm(model)
    impl = getattr(lm.config, "_attn_implementation", None)
    if "sliding_attention" in (getattr(lm.config, "layer_types", None) or []):
        # A custom 4D mask replaces the model's own, sliding window included; the tiny check below
        # is shorter than any window and could not see the difference.
        return False, f"{type(lm).__name__} uses sliding-window attention layers"
    was_training = model.training
    model.eval()  # dropout off for the comparison
    try:
        v = int(lm.config.vocab_size)
        prompts = [[t % v for t in p] for p in _PROBE_PROMPTS]
        responses = [[[t % v for t in r] for r in rs] for rs in _PROBE_RESPONSES]
        eng = LogProbEngine(model, chunk_size, prefix_sharing="off")
        dev = next(model.parameters()).device
        ref = eng(**pack(prompts, responses, 0, device=dev).tensors())["token_logps"]
        got = eng(**pack(prompts, responses, 0, device=dev, share_prefix=True).tensors())["token_logps"]
    except Exception as e:  # noqa: BLE001 - any failure means "use the exact fallback"
        return False, f"shared layout failed on {type(lm).__name__} ({impl} attention): {type(e).__name__}: {e}"
    finally:
        model.train(was_training)
    err = float((got.float() - ref.float()).abs().max())
    if err > atol:
        return False, f"{type(lm).__name__} ({impl} attention) ignores the block mask (max |Δ logp| = {err:.2g})"
    return True, f"{type(lm).__name__} ({impl} attention): shared = unshared (max |Δ logp| = {err:.1g})"


def scatter_stats(packed: PackedBatch, flat: Tensor, need_tokens: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
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
    # SparsePO's masks, OREO's critic values and KL(θ ‖ ref): (M,) → (B, K, T)
    for key in (*masks.LEARNED_KEYS, masks.ACTIVATION_KEY, "values", "policy_kl"):
        if key in out:
            stats.inputs[key] = scatter_stats(packed, out[key], True)[1]
    return stats, ref


@torch.no_grad()
def reference_stats(
    engine: LogProbEngine, packed: PackedBatch, ref_model: nn.Module | None, need_tokens: bool
) -> RefStats:
    """Reference log-probs through the same engine: ``ref_model`` if given (a model, or a ``LogProbEngine``
    around one: a sharded reference is sharded as an engine, so its whole forward runs through the
    engine), else the engine's own model with its LoRA adapter disabled (no second copy of the weights)."""
    if isinstance(ref_model, LogProbEngine):
        out = ref_model(**packed.tensors())
    elif ref_model is not None:
        ref_engine = LogProbEngine(ref_model, engine.chunk_size, prefix_sharing="off")
        out = ref_engine(**packed.tensors())
    else:
        with engine.model.disable_adapter():
            out = engine(**packed.tensors())
    logps, tok, _ = scatter_stats(packed, out["token_logps"], need_tokens)
    return RefStats(logps, tok)


@torch.no_grad()
def live_reference_inputs(
    engine: LogProbEngine,
    packed: PackedBatch,
    ref_model: nn.Module | None,
    *,
    layer_hidden: bool = False,
    activation_mask: bool = False,
) -> dict[str, Tensor]:
    """Reference hidden states at the response positions and the reference LM head, for objectives
    that need full-vocabulary reference distributions (TDPO, SparsePO). Only (M, H) is kept, never
    reference logits for the whole batch. From the same pass, for SparsePO: ``layer_hidden`` adds
    ``ref_layer_hidden`` (L, M, H), every block's output (HF ``hidden_states[1:]``), the learned masks'
    input; ``activation_mask`` adds MaPO's ``ref_activation_mask`` (M,) (model/masks.py)."""
    model = ref_model if ref_model is not None else engine.model
    ctx = engine.model.disable_adapter() if ref_model is None else contextlib.nullcontext()
    lm, backbone, head = split_lm(model)
    rec = masks.record_activations(backbone) if activation_mask else contextlib.nullcontext()
    with ctx, rec as acts:
        got = LogProbEngine(model).hidden_states(packed.input_ids, packed.attention_mask, packed.position_ids,
                                                 all_layers=layer_hidden)
    hidden, layers = got if layer_hidden else (got, None)
    at = (packed.pred_rows, packed.pred_pos)
    out = {
        "ref_hidden": hidden[at],
        "ref_head_weight": head.weight.detach(),
        "ref_head_bias": None if getattr(head, "bias", None) is None else head.bias.detach(),
    }
    if layer_hidden:
        out["ref_layer_hidden"] = torch.stack([h[at] for h in layers[1:]])
    if activation_mask:
        groups = {g: torch.stack([a[at] for a in acts[g]]) for g in ("mlp", "attn", "resid")}
        groups["logits"] = _logit_means(out["ref_hidden"], head, _logits_postprocess(lm), engine.chunk_size)[None]
        out["ref_activation_mask"] = masks.mapo_mask(groups, packed.token_slot, packed.B * packed.K)
    return out


def _logit_means(hidden: Tensor, head: nn.Module, post, chunk: int) -> Tensor:
    """(M,) mean over the vocabulary of the LM logits at each position (MaPO's logits group), by chunks."""
    bias = getattr(head, "bias", None)
    return torch.cat([
        _at_least_fp32(post(torch.nn.functional.linear(hidden[s : s + chunk], head.weight, bias))).mean(-1)
        for s in range(0, hidden.shape[0], chunk)
    ])
