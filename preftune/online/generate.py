"""Batched sampling from a causal LM: chat-templated prompts, left padding, seeded, EOS-aware.

Every online loop (and the demo) samples K responses per prompt, judges them and trains on the
result, so what comes back is more than text: the exact generated token ids (scoring them again
with the log-prob engine needs the tokens that were sampled, not a re-tokenisation of the text),
the token count, and whether the model ended its turn (EOS) or was cut by ``max_new_tokens``.

Determinism: batch ``i`` runs under ``torch.manual_seed(seed + i)`` inside a forked RNG, so the
same prompts, seed and ``batch_size`` give the same samples, and the caller's RNG is untouched.
Data-parallel sampling splits the same batches: process ``r`` of ``N`` runs ``part=(r, N)``, the
batches ``i`` with ``i % N == r``, each with the seed it has in a whole run, and ``merge_parts`` of
the N results is the whole run's ``Generations``, token for token, whatever ``N``.
Left padding with an explicit attention mask makes a prompt's greedy output the same alone or in a
batch (a test checks it).

Two engines give the same interface: ``"hf"`` (``transformers.generate``, one call per batch) and
``"fast"`` (``preftune.online.sampler``: each prompt prefilled once and shared by its ``n`` samples,
a preallocated cache, finished samples retired, top-p without a full-vocabulary sort). ``"auto"``,
the default, is ``"fast"`` for models whose attention goes through transformers' attention
interface and ``"hf"`` otherwise. The two draw differently from the same seed (same distribution,
different random streams); each is deterministic on its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

Text = str | list[dict[str, Any]]


@dataclass
class Sample:
    """One generated response."""

    text: str  # decoded, special tokens removed, stripped
    token_ids: list[int]  # generated ids, the EOS id included when reached
    finished: bool  # EOS reached (not cut by max_new_tokens)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class Generations:
    """``samples[i][k]``: sample ``k`` of prompt ``i``; ``prompt_ids[i]``: the prompt's tokens."""

    prompts: list[Text]
    prompt_ids: list[list[int]]
    samples: list[list[Sample]]
    settings: dict[str, Any] = field(default_factory=dict)

    def texts(self) -> list[list[str]]:
        return [[s.text for s in row] for row in self.samples]

    def num_tokens(self) -> list[list[int]]:
        return [[s.num_tokens for s in row] for row in self.samples]

    def finished(self) -> list[list[bool]]:
        return [[s.finished for s in row] for row in self.samples]


def encode_prompts(tokenizer, prompts: list[Text], chat_template: str = "auto") -> list[list[int]]:
    """Prompt token ids rendered as the data layer renders them for training (same template)."""
    out = []
    for p in prompts:
        conversational = isinstance(p, list)
        use = chat_template == "always" or (chat_template == "auto" and conversational)
        if use:
            messages = p if isinstance(p, list) else [{"role": "user", "content": p}]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(p)["input_ids"]
        out.append(list(ids))
    return out


def eos_ids(tokenizer, model=None) -> list[int]:
    """Token ids that end a turn: the tokenizer's EOS plus the model's generation-config EOS."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif isinstance(gen_eos, (list, tuple)):
        ids.update(int(i) for i in gen_eos)
    if not ids:
        raise ValueError("the tokenizer has no EOS token: generation could never end a turn")
    return sorted(ids)


ENGINES = ("auto", "fast", "hf")


def resolve_engine(model, engine: str = "auto") -> str:
    """``"auto"`` -> ``"fast"`` when the model's attention goes through transformers' attention
    interface (the fast engine swaps its own attention function in there), else ``"hf"``."""
    if engine != "auto":
        return engine
    from preftune.online.sampler import supports

    return "fast" if supports(model) else "hf"


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[Text],
    *,
    n: int = 1,
    temperature: float = 0.7,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
    seed: int = 0,
    batch_size: int = 16,
    chat_template: str = "auto",
    progress: Callable[[int], None] | None = None,
    engine: str = "auto",
    part: tuple[int, int] = (0, 1),
) -> Generations:
    """Sample ``n`` responses for each prompt (``temperature=0``: greedy, then ``n`` must be 1).

    ``batch_size`` counts sequences (prompt × sample) per batch (``"fast"`` keeps a prompt's ``n``
    samples in one batch: ``max(1, batch_size // n)`` prompts). ``progress(k)`` is called after each
    batch with the number of sequences it produced (e.g. a tqdm ``update``). ``engine``: ``"auto"``,
    ``"fast"`` or ``"hf"`` (see the module docstring). ``part=(r, N)``: only the batches ``i`` with
    ``i % N == r``; the other samples are ``None`` (``merge_parts`` fills them from the other parts).
    """
    if n < 1:
        raise ValueError("n must be at least 1")
    if temperature < 0:
        raise ValueError("temperature must be >= 0")
    if temperature == 0 and n > 1:
        raise ValueError("greedy decoding (temperature=0) gives n identical samples; use n=1")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    rank, parts = part
    if not 0 <= rank < parts:
        raise ValueError(f"part must be (r, N) with 0 <= r < N, got {part}")
    prompt_ids = encode_prompts(tokenizer, prompts, chat_template)
    stop = eos_ids(tokenizer, model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    settings = dict(
        n=n,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        seed=seed,
        batch_size=batch_size,
        engine=resolve_engine(model, engine),
    )
    if settings["engine"] == "fast":
        from preftune.online.sampler import sample_token_ids

        ids = sample_token_ids(model, prompt_ids, n=n, temperature=temperature, top_p=top_p,
                               max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size, stop=stop,
                               pad_id=pad_id, progress=progress, part=part)
        samples = [[_to_sample(t, stop, tokenizer) for t in row] if row is not None else [None] * n for row in ids]
        return Generations(list(prompts), prompt_ids, samples, settings)
    device = next(model.parameters()).device
    # Flattened (prompt, sample) jobs, longest prompts together so padding stays small.
    jobs = [(i, k) for i in range(len(prompts)) for k in range(n)]
    order = sorted(range(len(jobs)), key=lambda j: (-len(prompt_ids[jobs[j][0]]), j))
    results: list[list[Sample | None]] = [[None] * n for _ in prompts]
    was_training = model.training
    model.eval()
    try:
        for b, start in enumerate(range(0, len(order), batch_size)):
            if b % parts != rank:
                continue
            batch = [jobs[j] for j in order[start : start + batch_size]]
            seqs = [prompt_ids[i] for i, _ in batch]
            L = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
            mask = torch.zeros((len(seqs), L), dtype=torch.long)
            for r, s in enumerate(seqs):  # left padding: every prompt ends at column L - 1
                ids[r, L - len(s) :] = torch.tensor(s, dtype=torch.long)
                mask[r, L - len(s) :] = 1
            with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
                torch.manual_seed(seed + b)
                out = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    do_sample=temperature > 0,
                    temperature=temperature if temperature > 0 else None,
                    top_p=top_p if temperature > 0 else None,
                    top_k=None,
                    max_new_tokens=max_new_tokens,
                    eos_token_id=stop,
                    pad_token_id=pad_id,
                )
            new = out[:, L:].cpu()  # (rows, ≤ max_new_tokens)
            for r, (i, k) in enumerate(batch):
                results[i][k] = _to_sample(new[r].tolist(), stop, tokenizer)
            if progress is not None:
                progress(len(batch))
    finally:
        model.train(was_training)
    return Generations(list(prompts), prompt_ids, results, settings)  # type: ignore[arg-type]


def _to_sample(tokens: list[int], stop: list[int], tokenizer) -> Sample:
    """Cut at the first EOS (kept in the ids: it was sampled and is part of y) or keep all."""
    for t, tok in enumerate(tokens):
        if tok in stop:
            ids = tokens[: t + 1]
            return Sample(tokenizer.decode(ids[:-1], skip_special_tokens=True).strip(), ids, True)
    return Sample(tokenizer.decode(tokens, skip_special_tokens=True).strip(), tokens, False)


def merge_parts(parts: list[Generations]) -> Generations:
    """The whole run's ``Generations`` from those of ``part=(0, N)`` … ``(N−1, N)`` (in any order): each
    sample from the part that drew it."""
    first = parts[0]
    samples = [list(row) for row in first.samples]
    for g in parts[1:]:
        if g.prompt_ids != first.prompt_ids:
            raise ValueError("merge_parts: the parts were sampled for different prompts")
        for i, row in enumerate(g.samples):
            for k, s in enumerate(row):
                if s is not None:
                    if samples[i][k] is not None:
                        raise ValueError(f"merge_parts: sample {k} of prompt {i} was drawn by two parts")
                    samples[i][k] = s
    missing = [(i, k) for i, row in enumerate(samples) for k, s in enumerate(row) if s is None]
    if missing:
        raise ValueError(f"merge_parts: {len(missing)} samples drawn by no part (first: prompt {missing[0][0]})")
    return Generations(first.prompts, first.prompt_ids, samples, first.settings)


def generations_to_rows(gens: Generations) -> list[dict]:
    """One JSON row per prompt, token ids included (what a resumed run and the trainer read back)."""
    return [
        {
            "prompt": p,
            "prompt_ids": ids,
            "samples": [{"text": s.text, "token_ids": s.token_ids, "finished": s.finished} for s in row],
        }
        for p, ids, row in zip(gens.prompts, gens.prompt_ids, gens.samples, strict=True)
    ]


def generations_from_rows(rows: list[dict], settings: dict | None = None) -> Generations:
    return Generations(
        [r["prompt"] for r in rows],
        [r["prompt_ids"] for r in rows],
        [[Sample(s["text"], s["token_ids"], s["finished"]) for s in r["samples"]] for r in rows],
        settings or {},
    )
