"""The fast sampling engine behind ``generate(..., engine="fast")``: one prefill per prompt, a shared
prompt cache, a preallocated per-sample cache, finished samples retired, top-p without a full sort.

Where ``transformers.generate`` spends its time on a CPU (issue 11): K copies of each prompt's
prefill, a cache that grows by concatenation, a full-vocabulary sort for top-p at every token, and
padding decoded after a sequence has ended. Here:

- **Prefill once per prompt.** A batch holds ``P`` prompts and their ``n`` samples (``B = P × n``
  rows). The prompts run through the model once; their keys and values (``(P, Hkv, Lp, d)`` per
  layer, left padded) are kept as they are and never copied per sample.
- **Shared-prefix attention.** At each decode step a row's query attends to its prompt's keys and
  to its own generated keys, with one softmax over both. The prompt part is computed for the ``n``
  samples of a prompt together, ``(P, Hkv, n·G, d) @ (P, Hkv, d, Lp)`` (``G`` query heads per KV
  head), so each prompt's keys are read once per step, not ``n`` times.
- **Static cache.** Generated keys/values go into buffers of ``(B, Hkv, max_new_tokens, d)`` per
  layer allocated once per batch, written in place at column ``t``.
- **Retirement.** A row that samples EOS leaves the batch: its cache rows are compacted away, so
  the projections, MLP and LM head of later steps run only on live rows.
- **Top-p by a top-k prefilter** (``nucleus_threshold``), exact, with a full sort only for rows
  whose top ``k`` tokens hold less than ``top_p`` of the mass.

The model's own forward runs unchanged (any architecture whose attention goes through transformers'
attention interface: Llama, Qwen2, GPT-2, Mistral, ...): the engine swaps in the attention function
``preftune_shared_prefix`` for the duration of the call and passes the cache as a keyword, so the
norms, rotary embeddings, MLPs and LM head are transformers' code.

Why no ``torch.compile`` of the decode step: with ``B = P × n`` rows per step the step is matmul
bound (a 256-row step of SmolLM2-135M is ~70 GFLOP), the per-step Python overhead of the eager
forward is a few percent, and on a 2-core CPU inductor's compile takes longer than a whole demo
sampling phase (numbers in docs/benchmarks.md, "Sampling").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

ATTENTION_NAME = "preftune_shared_prefix"
# Top-p candidates: the top 64, then the top 1024 for the rows whose nucleus is larger, then a full
# sort. SmolLM2-135M at T=0.8, top-p 0.95: 19% of rows need more than 64, none more than 1024.
TOP_K_STAGES = (64, 1024)


# ----------------------------------------------------------------------------------------- top-p


def nucleus_threshold(z: torch.Tensor, top_p: float, stages: tuple[int, ...] = TOP_K_STAGES) -> torch.Tensor:
    """Per-row logit threshold ``v*`` of the top-p nucleus: keep token ``i`` iff ``z[i] >= v*``.

    The nucleus is the set of tokens whose strictly more probable tokens hold less than ``top_p`` of
    the mass, ``{i : Σ_{j: z_j > z_i} p_j < top_p}``. It always holds the most probable token, and
    tied tokens are kept or dropped together. This is ``transformers``' ``TopPLogitsWarper`` rule (a
    token is removed when the mass sorted above it reaches ``top_p``), with its arbitrary order among
    tied tokens replaced by "all or none".

    Computation: with ``z`` sorted descending and ``c_r`` the mass before rank ``r``,
    ``r* = max{r : c_r < top_p}`` and ``v* = z_(r*)``. Since ``c`` is non-decreasing, ``r*`` lies
    within the top ``k`` whenever their mass is ``>= top_p``; then the ``k`` largest logits
    (``torch.topk``, no sort of the vocabulary) give ``v*`` exactly. Tokens past the top ``k`` cannot
    reach ``v*`` when ``v*`` is above the ``k``-th value; a row where it is not (a tie across the
    cut) or whose top ``k`` hold less than ``top_p`` goes to the next, larger ``k``, and after the
    last to a full sort. Every path computes ``c`` with ``_threshold_from_sorted`` from the same
    descending values, so the result does not depend on which path a row took.

    z: (B, V) logits already divided by the temperature; returns (B, 1) float32.
    """
    return _nucleus(z, 1.0, _logsumexp(z, 1.0), top_p, stages)[0]


def _nucleus(logits: torch.Tensor, temperature: float, lse: torch.Tensor, top_p: float, stages: tuple[int, ...]):
    """``(v*, groups)``: the threshold of ``z = logits / temperature`` (B, 1), and ``groups`` of
    ``(rows, values, ids)``: for each row, the candidates (descending ``z``, their token ids) that
    hold its whole nucleus."""
    B, V = logits.shape
    thr = torch.empty((B, 1), dtype=torch.float32, device=logits.device)
    groups = []
    rows = torch.arange(B, device=logits.device)
    for k in (*[k for k in stages if k < V], V):
        x = logits if rows.numel() == B else logits[rows]
        if k < V:
            vals, ids = torch.topk(x, k, dim=-1)  # (R, k) descending; topk of the raw logits = of z
        else:
            vals, ids = torch.sort(x, dim=-1, descending=True)
        vals = vals.float() / temperature
        t, mass = _threshold_from_sorted(vals, lse[rows], top_p)
        fits = (mass >= top_p) & (t[:, 0] > vals[:, -1]) if k < V else torch.ones_like(mass, dtype=torch.bool)
        thr[rows[fits]] = t[fits]
        groups.append((rows[fits], vals[fits], ids[fits]))
        rows = rows[~fits]
        if rows.numel() == 0:
            break
    return thr, groups


def _threshold_from_sorted(sorted_desc: torch.Tensor, lse: torch.Tensor, top_p: float):
    """``(v*, mass of the given values)`` from logits sorted descending (all of them, or the top k).

    Masses in float64 and exclusive sums by shifting the running sum (not ``cumsum - p``), so ``c`` is
    exactly non-decreasing and the same on a common prefix whatever the number of values given.
    """
    p = torch.exp(sorted_desc.double() - lse.double())  # (R, k)
    incl = torch.cumsum(p, dim=-1)
    c = torch.cat([torch.zeros_like(incl[:, :1]), incl[:, :-1]], dim=-1)  # c_r = Σ_{s<r} p_s
    last = (c < top_p).sum(dim=-1, keepdim=True) - 1  # r*; c_0 = 0 < top_p, so r* >= 0
    return sorted_desc.gather(-1, last), incl[:, -1]


def _logsumexp(logits: torch.Tensor, temperature: float, rows: int = 8) -> torch.Tensor:
    """``logsumexp(logits / temperature)`` per row in float32, (B, 1). Blocks of ``rows`` rows keep each
    block's passes in cache: ~3x faster than one ``torch.logsumexp`` over a (256, 49k) batch."""
    out = torch.empty((logits.shape[0], 1), dtype=torch.float32, device=logits.device)
    for i in range(0, logits.shape[0], rows):
        z = logits[i : i + rows].float() / temperature
        m = z.amax(dim=-1, keepdim=True)
        out[i : i + rows] = m + z.sub_(m).exp_().sum(dim=-1, keepdim=True).log_()
    return out


def sample_next(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """One token per row of ``logits`` (B, V): greedy (first maximum) at ``temperature == 0``; else
    ``softmax(logits / temperature)`` cut to the top-p nucleus and renormalised (the order of
    ``transformers``' warpers), drawn by inverse CDF from one uniform per row from ``generator``
    (so the random stream does not depend on which top-p path a row took). Returns (B,) long."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    B, V = logits.shape
    u = torch.rand((B, 1), generator=generator, dtype=torch.float64, device=logits.device)
    lse = _logsumexp(logits, temperature)
    if top_p >= 1.0:  # the whole vocabulary, in token order
        groups = [(torch.arange(B, device=logits.device), logits.float() / temperature, None)]
        thr = torch.full((B, 1), float("-inf"), device=logits.device)
    else:
        thr, groups = _nucleus(logits, temperature, lse, top_p, TOP_K_STAGES)
    out = torch.empty(B, dtype=torch.long, device=logits.device)
    for rows, vals, ids in groups:
        p = torch.exp(vals.double() - lse[rows].double()).masked_fill_(vals < thr[rows], 0.0)  # (R, k)
        cdf = torch.cumsum(p, dim=-1)
        j = torch.searchsorted(cdf, u[rows] * cdf[:, -1:], right=True).clamp_(max=vals.shape[-1] - 1)
        out[rows] = j[:, 0] if ids is None else ids.gather(-1, j)[:, 0]
    return out


# ------------------------------------------------------------------------------ shared-prefix cache


@dataclass
class SharedPrefixCache:
    """Keys/values of one batch of ``P`` prompts × ``n`` samples, kept in float32.

    Per layer: each prompt's keys and values once, ``(P, Hkv, Lp, d)``; the generated tokens' in
    preallocated buffers of ``(R, Hkv, M, d)``, ``M = max_new_tokens - 1`` (the last sampled token is
    never fed back), one buffer row per sample still in the buffer. Live row ``b`` of the batch is
    sample ``slot[b]`` (= prompt × n + sample) and buffer row ``row[b]``. A retired sample leaves
    the batch at once (no projection, MLP or LM-head work for it); its buffer row is dropped when
    a quarter of the rows are dead (``compact``), so attention over a long generation reads the
    live samples' keys only, and the copying stays a geometric series.

    Float32 because CPU bf16 batched matmuls copy strided operands (a slice of the buffer) to
    contiguous memory first, which costs more than the matmul; float32 ones read them in place.
    """

    n: int
    prompt_mask: torch.Tensor  # (P, Lp) bool, False on padding
    max_new_tokens: int
    common: int = 0  # leading tokens shared by every prompt of the batch, prefilled once (see _prefill)
    slot: torch.Tensor = field(init=False)  # (B,) long
    row: torch.Tensor = field(init=False)  # (B,) long
    rows: int = field(init=False)  # R, buffer rows in use
    step: int = -1  # -2: the common prefix's prefill, -1: the prompts', t >= 0: feeding generated token t
    common_k: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (1, Hkv, common, d)
    common_v: dict[int, torch.Tensor] = field(default_factory=dict)
    prefix_k: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (P, Hkv, Lp, d)
    prefix_v: dict[int, torch.Tensor] = field(default_factory=dict)
    gen_k: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (≥R, Hkv, M, d)
    gen_v: dict[int, torch.Tensor] = field(default_factory=dict)
    prefix_bias: torch.Tensor = field(init=False)  # (P, 1, 1, 1, Lp) float32: 0, or -inf on padding

    def __post_init__(self):
        P = self.prompt_mask.shape[0]
        self.slot = torch.arange(P * self.n, device=self.prompt_mask.device)
        self.row, self.rows = self.slot.clone(), P * self.n
        bias = torch.zeros(self.prompt_mask.shape, dtype=torch.float32, device=self.prompt_mask.device)
        self.prefix_bias = bias.masked_fill(~self.prompt_mask, float("-inf"))[:, None, None, None, :]

    def retire(self, keep: torch.Tensor) -> None:
        """Drop the live rows where ``keep`` (B,) is False; compact the buffers when 1/4 of their rows are dead."""
        self.slot, self.row = self.slot[keep], self.row[keep]
        if 4 * self.row.numel() <= 3 * self.rows:
            cols = self.step + 1  # generated tokens already written
            for buf in (*self.gen_k.values(), *self.gen_v.values()):
                buf[: self.row.numel(), :, :cols] = buf[self.row, :, :cols]
            self.rows = self.row.numel()
            self.row = torch.arange(self.rows, device=self.row.device)


def shared_prefix_attention(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0,
                            preftune_kv: SharedPrefixCache | None = None, **kwargs):
    """Attention for ``transformers``' attention interface, registered as ``preftune_shared_prefix``.

    Prefill (``step == -1``): causal attention over left-padded prompts; keeps their keys/values.
    Decode: one query per live row attends to its prompt's keys (shared by the prompt's ``n`` rows)
    and to its own generated keys. query: (B, H, q, d); key, value: (B, Hkv, q, d) with rotary
    already applied; returns ((B, q, H, d), None) as transformers' attention functions do.
    """
    if preftune_kv is None:
        raise RuntimeError("preftune_shared_prefix attention runs only inside preftune's fast sampler")
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"the fast sampler does not support attention {name}; use engine='hf'")
    window = kwargs.get("sliding_window")
    total = preftune_kv.prompt_mask.shape[1] + preftune_kv.max_new_tokens
    if window is not None and window < total:
        raise NotImplementedError(f"sliding-window attention ({window} < {total} tokens); use engine='hf'")
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    layer = module.layer_idx
    c = preftune_kv
    if c.step < 0:
        return _prefill_attention(c, layer, query, key, value, scaling), None
    return _decode_attention(c, layer, query, key, value, scaling), None


def _prefill_attention(c: SharedPrefixCache, layer: int, q, k, v, scaling):
    P, H, L, d = q.shape
    gqa = k.shape[1] != H
    if c.step == -2:  # the common prefix: one causal sequence, kept for the prompts' pass
        c.common_k[layer], c.common_v[layer] = k, v
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa).transpose(1, 2)
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    # A pad query attends to itself at least, so no row is fully masked (a NaN there would reach the
    # pad keys of later layers, and 0 × NaN = NaN even under a -inf bias).
    allowed = (causal & c.prompt_mask[:, None, None, c.common :]) | torch.eye(L, dtype=torch.bool, device=q.device)
    if c.common:  # every prompt token also sees the shared prefix
        k = torch.cat([c.common_k.pop(layer).expand(P, -1, -1, -1), k], dim=2)
        v = torch.cat([c.common_v.pop(layer).expand(P, -1, -1, -1), v], dim=2)
        allowed = torch.cat([allowed.new_ones(P, 1, L, c.common), allowed], dim=-1)
    c.prefix_k[layer], c.prefix_v[layer] = k.float().contiguous(), v.float().contiguous()
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2)  # (P, L, H, d)


def _decode_attention(c: SharedPrefixCache, layer: int, q, k, v, scaling):
    B, H, _, d = q.shape
    Hkv = k.shape[1]
    G, n, t, R = H // Hkv, c.n, c.step, c.rows
    kp, vp = c.prefix_k[layer], c.prefix_v[layer]  # (P, Hkv, Lp, d)
    P, Lp = kp.shape[0], kp.shape[2]
    if layer not in c.gen_k:  # first decode step: this batch's static buffers
        shape = (R, Hkv, max(1, c.max_new_tokens - 1), d)
        c.gen_k[layer] = torch.zeros(shape, dtype=torch.float32, device=q.device)
        c.gen_v[layer] = torch.zeros(shape, dtype=torch.float32, device=q.device)
    kg, vg = c.gen_k[layer], c.gen_v[layer]
    kg[c.row, :, t] = k[:, :, 0].float()
    vg[c.row, :, t] = v[:, :, 0].float()
    qf = q.reshape(B, Hkv, G, d).float()
    full_grid, full_rows = B == P * n, B == R
    # The prompt part, one matmul for a prompt's n samples: (P, Hkv, n·G, d) @ (P, Hkv, d, Lp).
    q_grid = qf if full_grid else qf.new_zeros(P * n, Hkv, G, d).index_copy_(0, c.slot, qf)
    q_grid = q_grid.view(P, n, Hkv, G, d).transpose(1, 2).reshape(P, Hkv, n * G, d)
    s_pre = torch.matmul(q_grid, kp.transpose(-1, -2)).view(P, Hkv, n, G, Lp) + c.prefix_bias
    s_pre = s_pre.transpose(1, 2).reshape(P * n, Hkv, G, Lp)
    s_pre = s_pre if full_grid else s_pre[c.slot]  # (B, Hkv, G, Lp)
    # The sample's own tokens: (R, Hkv, G, d) @ (R, Hkv, d, t+1), R >= B buffer rows.
    q_rows = qf if full_rows else qf.new_zeros(R, Hkv, G, d).index_copy_(0, c.row, qf)
    s_gen = torch.matmul(q_rows, kg[:R, :, : t + 1].transpose(-1, -2))
    s_gen = s_gen if full_rows else s_gen[c.row]  # (B, Hkv, G, t+1)
    probs = torch.softmax(torch.cat([s_pre, s_gen], dim=-1).mul_(scaling), dim=-1)
    p_pre, p_gen = probs.split([Lp, t + 1], dim=-1)
    p_grid = p_pre if full_grid else p_pre.new_zeros(P * n, Hkv, G, Lp).index_copy_(0, c.slot, p_pre)
    p_grid = p_grid.view(P, n, Hkv, G, Lp).transpose(1, 2).reshape(P, Hkv, n * G, Lp)
    o_pre = torch.matmul(p_grid, vp).view(P, Hkv, n, G, d).transpose(1, 2).reshape(P * n, Hkv, G, d)
    p_rows = p_gen if full_rows else p_gen.new_zeros(R, Hkv, G, t + 1).index_copy_(0, c.row, p_gen)
    o_gen = torch.matmul(p_rows, vg[:R, :, : t + 1])
    out = (o_pre if full_grid else o_pre[c.slot]) + (o_gen if full_rows else o_gen[c.row])
    return out.to(q.dtype).reshape(B, 1, H, d)


TESTED_MODEL_TYPES = ("llama", "qwen2", "gpt2")  # greedy equals transformers.generate (tests/online)


def supports(model) -> bool:
    """Whether ``engine="auto"`` picks this engine: a decoder of a tested family that routes attention
    through transformers' attention interface (others may work with ``engine="fast"``; a feature the
    attention function lacks, such as soft-capping or a short sliding window, raises)."""
    config = getattr(model, "config", None)
    return (
        bool(getattr(model, "_supports_attention_backend", False))
        and getattr(config, "model_type", None) in TESTED_MODEL_TYPES
        and not getattr(config, "is_encoder_decoder", False)
    )


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, shared_prefix_attention)


# ------------------------------------------------------------------------------------------ engine


@torch.no_grad()
def sample_token_ids(
    model,
    prompt_ids: list[list[int]],
    *,
    n: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    seed: int,
    batch_size: int,
    stop: list[int],
    pad_id: int,
    progress: Callable[[int], None] | None = None,
) -> list[list[list[int]]]:
    """``out[i][k]``: the generated ids of sample ``k`` of prompt ``i``, cut after the first EOS.

    Prompts run longest first, ``max(1, batch_size // n)`` prompts (with all their samples) per
    batch; batch ``b`` draws from a generator seeded ``seed + b``, so the same inputs give the same
    samples and the global RNG is untouched.
    """
    _register()
    device = next(model.parameters()).device
    order = sorted(range(len(prompt_ids)), key=lambda i: (-len(prompt_ids[i]), i))
    per_batch = max(1, batch_size // n)
    stop_t = torch.tensor(stop, device=device)
    out: list[list[list[int]]] = [[] for _ in prompt_ids]
    config = model.config
    saved_attn, was_training = config._attn_implementation, model.training
    config._attn_implementation = ATTENTION_NAME
    model.eval()
    try:
        for b, start in enumerate(range(0, len(order), per_batch)):
            batch = order[start : start + per_batch]
            gen = torch.Generator(device=device).manual_seed(seed + b)
            rows = _sample_batch(model, [prompt_ids[i] for i in batch], n, temperature, top_p, max_new_tokens,
                                 gen, stop_t, pad_id, device)
            for j, i in enumerate(batch):
                out[i] = rows[j * n : (j + 1) * n]
            if progress is not None:
                progress(len(batch) * n)
    finally:
        config._attn_implementation = saved_attn
        model.train(was_training)
    return out


MIN_COMMON = 8  # a shared leading run shorter than this is prefilled with each prompt


def _prefill(model, seqs, n, max_new_tokens, pad_id, device):
    """Run the prompts of a batch once: ``(cache, last-position logits (P, V))``.

    Chat templates start every prompt with the same tokens (SmolLM2's system prompt is 31 of the
    demo's ~47 prompt tokens), so the batch's longest common prefix, when at least ``MIN_COMMON``
    tokens long, runs once as one sequence and the prompts' own tokens attend to its keys. The
    prompts' own parts are left padded, so a prompt's tokens sit at columns
    ``[common + pad, Lp)`` with positions ``0 .. len - 1`` after the shared ones.
    """
    P = len(seqs)
    common = _common_prefix_len(seqs) if P > 1 else 0
    common = common if common >= MIN_COMMON else 0
    rest = [s[common:] for s in seqs]
    L = max(len(s) for s in rest)
    ids = torch.full((P, L), pad_id, dtype=torch.long)
    mask = torch.zeros((P, L), dtype=torch.bool)
    for r, s in enumerate(rest):  # left padding: every prompt ends at column L - 1
        ids[r, L - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[r, L - len(s) :] = True
    ids, mask = ids.to(device), mask.to(device)
    full_mask = torch.cat([torch.ones((P, common), dtype=torch.bool, device=device), mask], dim=1)
    cache = SharedPrefixCache(n=n, prompt_mask=full_mask, max_new_tokens=max_new_tokens, common=common)
    if common:
        cache.step = -2
        head = torch.tensor([seqs[0][:common]], dtype=torch.long, device=device)
        model(input_ids=head, attention_mask=torch.ones_like(head), use_cache=False, logits_to_keep=1,
              position_ids=torch.arange(common, device=device)[None], preftune_kv=cache)
        cache.step = -1
    positions = common + (mask.long().cumsum(-1) - 1).clamp(min=0)
    # The 2-D masks only tell transformers that padding is handled (the attention function reads
    # ``cache``; for a custom attention function transformers builds no mask of its own).
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, logits_to_keep=1,
                   preftune_kv=cache).logits[:, -1]  # (P, V)
    return cache, logits


def _common_prefix_len(seqs: list[list[int]]) -> int:
    """Tokens shared at the start of every sequence, leaving each at least one of its own."""
    limit = min(len(s) for s in seqs) - 1
    first = seqs[0]
    k = 0
    while k < limit and all(s[k] == first[k] for s in seqs):
        k += 1
    return k


def _sample_batch(model, seqs, n, temperature, top_p, max_new_tokens, gen, stop_t, pad_id, device):
    P = len(seqs)
    cache, logits = _prefill(model, seqs, n, max_new_tokens, pad_id, device)
    lengths = torch.tensor([len(s) for s in seqs], device=device)  # (P,)
    logits = logits.repeat_interleave(n, dim=0)  # (P·n, V): the n samples of a prompt share its prefill
    tokens = torch.full((P * n, max_new_tokens), pad_id, dtype=torch.long, device=device)
    length = torch.full((P * n,), max_new_tokens, dtype=torch.long, device=device)
    for t in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_p, gen)  # (B,)
        tokens[cache.slot, t] = nxt
        done = torch.isin(nxt, stop_t)
        if t == max_new_tokens - 1:
            break
        if bool(done.any()):
            length[cache.slot[done]] = t + 1
            if bool(done.all()):
                break
            cache.retire(~done)
            nxt = nxt[~done]
        cache.step = t
        pos = lengths[cache.slot // n] + t  # (B,): the generated token's position after its prompt
        logits = model(input_ids=nxt[:, None], attention_mask=torch.ones_like(nxt[:, None]),
                       position_ids=pos[:, None], use_cache=False, preftune_kv=cache).logits[:, -1]
    tokens, length = tokens.cpu(), length.cpu()
    return [tokens[r, : length[r]].tolist() for r in range(P * n)]
