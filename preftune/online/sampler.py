"""The fast sampling engine behind ``generate(..., engine="fast")``: one prefill per prompt, a shared
prompt cache, a preallocated cache for generated tokens, finished samples retired, top-p without a
full-vocabulary sort.

Where ``transformers.generate`` spends its time on a CPU (issue 11): ``n`` copies of each prompt's
prefill, a cache that grows by concatenation, a full-vocabulary sort for top-p at every token, and
padding decoded after a sequence has ended. Here:

- **Prefill once per prompt**, and the batch's common leading tokens (a chat template's system
  prompt) once per batch. A batch holds ``P`` prompts and their ``n`` samples (``B = P × n`` rows).
- **Shared-prefix attention.** At each decode step a row's query attends to its prompt's keys and
  to its own generated keys, one softmax over both. The prompt part runs for a prompt's ``n``
  samples together, ``(P, Hkv, n·G, d) @ (P, Hkv, d, Lp)`` (``G`` query heads per KV head), so a
  prompt's keys are stored and read once, not ``n`` times.
- **Static cache.** Generated keys/values go into buffers allocated once per batch and written in
  place (``SharedPrefixCache``).
- **Retirement.** A row that samples EOS leaves the batch, so the projections, MLP and LM head of
  later steps run on live rows only; the caches are compacted when a quarter of their rows are dead.
- **Top-p by a top-k prefilter** (``nucleus_threshold``), exact, with a full sort only for rows
  whose top ``k`` tokens hold less than ``top_p`` of the mass.

The model's own forward runs unchanged (any architecture whose attention goes through transformers'
attention interface: Llama, Qwen2, GPT-2, Mistral, ...): the engine swaps in the attention function
``preftune_shared_prefix`` for the duration of the call and passes the cache as a keyword, so the
embeddings, norms, rotary embeddings, MLPs and LM head are transformers' code.

No ``torch.compile``: with ``B = P × n`` rows the decode step is matmul bound, and compiling the
norms and MLPs of SmolLM2-135M cost ~5 s of CPU (~18 s of wall time on the shared 2-core host) for
no measurable gain per step (docs/benchmarks.md, "Sampling").
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
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


CHUNK = 16  # generated-token cache columns per block (see SharedPrefixCache)


@dataclass
class SharedPrefixCache:
    """Keys/values of one batch of ``P`` prompts × ``n`` samples, in the model's dtype, preallocated.

    The prompts' keys (transposed) and values, ``(Pg, Hkv, d, Lp)`` and ``(Pg, Hkv, Lp, d)`` per layer,
    once per prompt. Live row ``b`` of the batch is sequence ``seq[b]`` (= prompt × n + sample, the
    output's index), slot ``slot[b]`` of the ``Pg × ng`` grid the prompt part of attention runs on,
    and row ``row[b]`` of the generated-token buffers.

    Generated tokens' keys/values live in blocks of ``CHUNK`` steps, ``(C, R, Hkv, CHUNK, d)`` with
    ``C = ceil((max_new_tokens - 1) / CHUNK)``: the blocks written so far are one contiguous tensor,
    which CPU bf16 batched matmuls read in place (a slice of a ``(.., M, d)`` buffer is first copied
    whole), at the price of attending to up to ``CHUNK - 1`` masked columns.

    A sample that samples EOS leaves the batch at once (no projection, MLP or LM-head work). Its grid
    slot and buffer row stay until a quarter of the buffer rows are dead; ``retire`` then compacts
    the buffers and re-packs the grid to the prompts still live, so attention late in a long
    generation reads the live samples' keys only, and the copying stays a geometric series.
    """

    n: int
    prompt_mask: torch.Tensor  # (P, Lp) bool, False on padding
    max_new_tokens: int
    common: int = 0  # leading tokens shared by every prompt of the batch, prefilled once (see _prefill)
    step: int = -1  # -2: the common prefix's prefill, -1: the prompts', t >= 0: feeding generated token t
    seq: torch.Tensor = field(init=False)  # (B,) long
    slot: torch.Tensor = field(init=False)  # (B,) long
    row: torch.Tensor = field(init=False)  # (B,) long
    grid_width: int = field(init=False)  # ng
    rows: int = field(init=False)  # R
    common_k: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (1, Hkv, common, d)
    common_v: dict[int, torch.Tensor] = field(default_factory=dict)
    prefix_k: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (Pg, Hkv, d, Lp)
    prefix_v: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (Pg, Hkv, Lp, d)
    gen_k: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (C, ≥R, Hkv, CHUNK, d)
    gen_v: dict[int, torch.Tensor] = field(default_factory=dict)
    prefix_bias: torch.Tensor = field(init=False)  # (Pg, 1, 1, 1, Lp) float32: 0, or -inf on padding

    def __post_init__(self):
        P, device = self.prompt_mask.shape[0], self.prompt_mask.device
        self.seq = torch.arange(P * self.n, device=device)
        self.slot, self.row = self.seq.clone(), self.seq.clone()
        self.grid_width, self.rows = self.n, P * self.n
        bias = torch.zeros(self.prompt_mask.shape, dtype=torch.float32, device=device)
        self.prefix_bias = bias.masked_fill(~self.prompt_mask, float("-inf"))[:, None, None, None, :]

    def retire(self, keep: torch.Tensor) -> None:
        """Drop the live rows where ``keep`` (B,) is False; compact when 1/4 of the buffer rows are dead."""
        self.seq, self.slot, self.row = self.seq[keep], self.slot[keep], self.row[keep]
        B = self.seq.numel()
        if 4 * B > 3 * self.rows:
            return
        blocks = -(-(self.step + 1) // CHUNK)  # blocks holding the generated tokens fed so far
        for buf in (*self.gen_k.values(), *self.gen_v.values()):
            buf[:blocks, :B] = buf[:blocks, self.row]
        self.rows, self.row = B, torch.arange(B, device=self.row.device)
        # Re-pack the grid: live prompts only (rows stay in slot order, so each prompt's rows are adjacent).
        prompt = self.slot // self.grid_width
        live, counts = torch.unique_consecutive(prompt, return_counts=True)
        first = torch.cumsum(counts, 0) - counts
        rank = torch.arange(B, device=prompt.device) - torch.repeat_interleave(first, counts)
        self.grid_width = int(counts.max())
        self.slot = torch.repeat_interleave(torch.arange(live.numel(), device=prompt.device), counts)
        self.slot = self.slot * self.grid_width + rank
        for store in (self.prefix_k, self.prefix_v):
            for layer, x in store.items():
                store[layer] = x[live]
        self.prefix_bias = self.prefix_bias[live]


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
    c.prefix_k[layer], c.prefix_v[layer] = k.transpose(-1, -2).contiguous(), v.contiguous()
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2)  # (P, L, H, d)


def _decode_attention(c: SharedPrefixCache, layer: int, q, k, v, scaling):
    B, H, _, d = q.shape
    Hkv = k.shape[1]
    G, n, t, R = H // Hkv, c.grid_width, c.step, c.rows
    kp_t, vp = c.prefix_k[layer], c.prefix_v[layer]  # (Pg, Hkv, d, Lp), (Pg, Hkv, Lp, d)
    P, Lp = vp.shape[0], vp.shape[2]
    if layer not in c.gen_k:  # first decode step: this batch's static buffers (zeros: no stray NaN)
        shape = (-(-max(1, c.max_new_tokens - 1) // CHUNK), R, Hkv, CHUNK, d)
        c.gen_k[layer], c.gen_v[layer] = k.new_zeros(shape), v.new_zeros(shape)
    blocks = t // CHUNK + 1
    kg, vg = c.gen_k[layer][:blocks, :R], c.gen_v[layer][:blocks, :R]  # (blocks, R, Hkv, CHUNK, d)
    kg[t // CHUNK, c.row, :, t % CHUNK] = k[:, :, 0]
    vg[t // CHUNK, c.row, :, t % CHUNK] = v[:, :, 0]
    qg = q.reshape(B, Hkv, G, d)
    full_grid, full_rows = B == P * n, B == R
    # The prompt part, one matmul for a prompt's n samples: (Pg, Hkv, n·G, d) @ (Pg, Hkv, d, Lp).
    q_grid = qg if full_grid else qg.new_zeros(P * n, Hkv, G, d).index_copy_(0, c.slot, qg)
    q_grid = q_grid.view(P, n, Hkv, G, d).transpose(1, 2).reshape(P, Hkv, n * G, d)
    s_pre = torch.matmul(q_grid, kp_t).view(P, Hkv, n, G, Lp).float() + c.prefix_bias
    s_pre = s_pre.transpose(1, 2).reshape(P * n, Hkv, G, Lp)
    s_pre = s_pre if full_grid else s_pre[c.slot]  # (B, Hkv, G, Lp)
    # The sample's own tokens, block by block: (blocks, R, Hkv, G, d) @ (blocks, R, Hkv, d, CHUNK).
    q_rows = qg if full_rows else qg.new_zeros(R, Hkv, G, d).index_copy_(0, c.row, qg)
    s_gen = torch.matmul(q_rows.expand(blocks, R, Hkv, G, d), kg.transpose(-1, -2))
    s_gen = s_gen.permute(1, 2, 3, 0, 4).reshape(R, Hkv, G, blocks * CHUNK).float()
    s_gen = s_gen if full_rows else s_gen[c.row]  # (B, Hkv, G, blocks·CHUNK)
    s_gen[..., t + 1 :] = float("-inf")  # columns not written yet
    probs = torch.softmax(torch.cat([s_pre, s_gen], dim=-1).mul_(scaling), dim=-1).to(q.dtype)
    p_pre, p_gen = probs.split([Lp, blocks * CHUNK], dim=-1)
    p_grid = p_pre if full_grid else p_pre.new_zeros(P * n, Hkv, G, Lp).index_copy_(0, c.slot, p_pre)
    p_grid = p_grid.view(P, n, Hkv, G, Lp).transpose(1, 2).reshape(P, Hkv, n * G, Lp)
    o_pre = torch.matmul(p_grid, vp).view(P, Hkv, n, G, d).transpose(1, 2).reshape(P * n, Hkv, G, d)
    p_rows = p_gen if full_rows else p_gen.new_zeros(R, Hkv, G, blocks * CHUNK).index_copy_(0, c.row, p_gen)
    p_rows = p_rows.view(R, Hkv, G, blocks, CHUNK).permute(3, 0, 1, 2, 4)  # (blocks, R, Hkv, G, CHUNK)
    o_gen = torch.matmul(p_rows, vg).sum(0)  # (R, Hkv, G, d)
    out = (o_pre if full_grid else o_pre[c.slot]) + (o_gen if full_rows else o_gen[c.row])
    return out.reshape(B, 1, H, d)


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
    part: tuple[int, int] = (0, 1),
) -> list[list[list[int]] | None]:
    """``out[i][k]``: the generated ids of sample ``k`` of prompt ``i``, cut after the first EOS.

    Prompts run longest first, ``max(1, batch_size // n)`` prompts (with all their samples) per
    batch; batch ``b`` draws from a generator seeded ``seed + b``, so the same inputs give the same
    samples and the global RNG is untouched. ``part=(r, N)``: only the batches ``b`` with
    ``b % N == r`` (``out[i]`` is None for the prompts of the others).
    """
    _register()
    device = next(model.parameters()).device
    order = sorted(range(len(prompt_ids)), key=lambda i: (-len(prompt_ids[i]), i))
    per_batch = max(1, batch_size // n)
    stop_t = torch.tensor(stop, device=device)
    out: list[list[list[int]] | None] = [None for _ in prompt_ids]
    config = model.config
    saved_attn, was_training = config._attn_implementation, model.training
    config._attn_implementation = ATTENTION_NAME
    model.eval()
    try:
        with _onednn_linears(model, rows=min(per_batch, len(order)) * n):
            for b, start in enumerate(range(0, len(order), per_batch)):
                if b % part[1] != part[0]:
                    continue
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


@contextlib.contextmanager
def _onednn_linears(model, rows: int) -> Iterator[None]:
    """float32 ``nn.Linear`` layers on CPU through oneDNN with a prepacked weight, for the call.

    torch runs float32 ``F.linear`` on CPU through MKL's sgemm and bf16 through oneDNN. On the AMD
    EPYC host of docs/benchmarks.md MKL's float32 GEMMs of SmolLM2's shapes run at 70–80 GFLOP/s on
    one core, oneDNN's at ~170 (the same float32 arithmetic; outputs differ by summation order
    only). The packed weights are a copy (+4 bytes per parameter while sampling), made once per call.
    Nothing changes where the ops are missing, or for bf16, GPU or non-``nn.Linear`` layers.
    """
    ops = getattr(torch.ops, "mkldnn", None)
    usable = (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
    )
    swapped = []
    if usable:
        for module in model.modules():
            w = getattr(module, "weight", None)
            if type(module) is torch.nn.Linear and w.dtype == torch.float32 and w.device.type == "cpu":
                packed = ops._reorder_linear_weight(w.detach(), rows)
                bias = None if module.bias is None else module.bias.detach()
                module.forward = functools.partial(_packed_linear, packed, bias, module.out_features)
                swapped.append(module)
    try:
        yield
    finally:
        for module in swapped:
            del module.forward  # back to nn.Linear.forward


def _packed_linear(packed: torch.Tensor, bias: torch.Tensor | None, out_features: int, x: torch.Tensor):
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), packed, bias, "none", [], "")
    return y.view(*x.shape[:-1], out_features)


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
        tokens[cache.seq, t] = nxt
        done = torch.isin(nxt, stop_t)
        if t == max_new_tokens - 1:
            break
        if bool(done.any()):
            length[cache.seq[done]] = t + 1
            if bool(done.all()):
                break
            cache.retire(~done)
            nxt = nxt[~done]
        cache.step = t
        pos = lengths[cache.seq // n] + t  # (B,): the generated token's position after its prompt
        logits = model(input_ids=nxt[:, None], attention_mask=torch.ones_like(nxt[:, None]),
                       position_ids=pos[:, None], use_cache=False, preftune_kv=cache).logits[:, -1]
    tokens, length = tokens.cpu(), length.cpu()
    return [tokens[r, : length[r]].tolist() for r in range(P * n)]
