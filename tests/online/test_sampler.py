"""Exactness of the fast sampling engine (preftune.online.sampler) on tiny random models, float32.

Greedy decoding must equal ``transformers.generate`` token for token; sampled tokens must follow the
model's softmax (chi-square) and the top-p nucleus exactly; the cache tricks (one prefill per
prompt, a shared system-prompt prefix, retired samples, compacted buffers) must not change a logit.
"""

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

import preftune.online.sampler as sampler
from preftune.online.generate import encode_prompts, eos_ids, generate
from preftune.online.sampler import nucleus_threshold, sample_next, sample_token_ids
from preftune.testing import ARCHES, tiny_model, tiny_tokenizer

SYSTEM = {"role": "system", "content": "Preference optimization aligns a language model with human feedback."}
USER = ["hello", "Write a haiku about the sea. Answer in exactly three lines.", "yes or no?", "0 1 2 3 4 5"]
PROMPTS = [[{"role": "user", "content": u}] for u in USER]
SYSTEM_PROMPTS = [[SYSTEM, {"role": "user", "content": u}] for u in USER]  # a 58-token common prefix


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _model(arch: str, tok, seed: int = 1):
    model = tiny_model(arch, seed=seed).eval()  # GPT-2 has dropout; generate() itself runs in eval mode
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


@pytest.fixture(scope="module")
def llama(tok):
    return _model("llama", tok)


@pytest.fixture(scope="module")
def sharp(tok):
    """The tiny Llama with its LM head scaled up: a random init's next-token softmax is nearly uniform
    over 320 tokens, which no frequency test could tell from its neighbours."""
    model = _model("llama", tok)
    with torch.no_grad():
        model.lm_head.weight.mul_(25.0)
    return model


def _ids(gens):
    return [[s.token_ids for s in row] for row in gens.samples]


def _hf_greedy_alone(model, tok, prompts, max_new_tokens, stop):
    """transformers.generate on each prompt alone (no padding): the reference."""
    out = []
    for ids in encode_prompts(tok, prompts):
        x = torch.tensor([ids])
        with torch.no_grad():
            y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                               max_new_tokens=max_new_tokens, eos_token_id=stop, pad_token_id=tok.pad_token_id,
                               top_p=None, top_k=None, temperature=None)
        new = y[0, len(ids) :].tolist()
        cut = next((i + 1 for i, t in enumerate(new) if t in stop), len(new))
        out.append([new[:cut]])
    return out


# ------------------------------------------------------------------------------------------ greedy


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("prompts", [PROMPTS, SYSTEM_PROMPTS], ids=["plain", "system_prompt"])
def test_greedy_equals_transformers_generate(tok, arch, prompts):
    """Batched fast greedy = transformers.generate on each prompt alone, with samples ending at
    different steps (a frequent token added to the stop set), so retirement runs mid-batch."""
    model = _model(arch, tok)
    stop = eos_ids(tok, model)
    free = _hf_greedy_alone(model, tok, prompts, 24, stop)
    # Add a stop token that cuts the greedy outputs at different steps (greedy outputs with a larger stop
    # set are the same outputs cut at the first stop), so rows retire mid-batch.
    def cuts(x):
        return {next((i for i, t in enumerate(r[0]) if t == x), 24) for r in free}

    extra = next(x for r in free for x in r[0] if len(cuts(x)) > 1)
    model.generation_config.eos_token_id = [tok.eos_token_id, extra]
    stop = eos_ids(tok, model)
    ref = _hf_greedy_alone(model, tok, prompts, 24, stop)
    lengths = {len(r[0]) for r in ref}
    assert len(lengths) > 1 and min(lengths) < 24, "the test needs samples that end at different steps"
    fast = generate(model, tok, prompts, temperature=0, max_new_tokens=24, engine="fast", batch_size=8)
    assert _ids(fast) == ref
    for row, r in zip(fast.samples, ref, strict=True):
        assert row[0].finished == (r[0][-1] in stop)


def test_greedy_does_not_depend_on_the_batch(tok, llama):
    together = generate(llama, tok, SYSTEM_PROMPTS + PROMPTS, temperature=0, max_new_tokens=12, engine="fast",
                        batch_size=16)
    for bs in (1, 3):
        split = generate(llama, tok, SYSTEM_PROMPTS + PROMPTS, temperature=0, max_new_tokens=12, engine="fast",
                         batch_size=bs)
        assert _ids(split) == _ids(together)


# -------------------------------------------------------------------------------- the distribution


def _next_probs(model, ids, temperature=1.0):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
    return torch.softmax(logits / temperature, -1).numpy()


def _chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson's chi-square, tokens with expected count < 5 pooled into one bin."""
    expected = probs * counts.sum()
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    return float(chisquare(obs[keep], exp[keep] * obs[keep].sum() / exp[keep].sum()).pvalue)


def test_sampled_tokens_follow_the_softmax(tok, sharp):
    """First token (from the prefill) and second token (from the shared-prefix decode step) of 6000
    samples at T=1, top-p 1 against the model's softmax; and the same counts against the softmax at
    T=1.3, which the test must reject (it can fail)."""
    n = 6000
    prompt = SYSTEM_PROMPTS[1]
    ids = encode_prompts(tok, [prompt])[0]
    g = generate(sharp, tok, [prompt], n=n, temperature=1.0, top_p=1.0, max_new_tokens=2, seed=3, engine="fast",
                 batch_size=n)
    first = np.array([s.token_ids[0] for s in g.samples[0]])
    V = len(tok)
    counts = np.bincount(first, minlength=V)
    p1 = _next_probs(sharp, ids)
    assert _chi2_pvalue(counts, p1) > 1e-3
    assert _chi2_pvalue(counts, _next_probs(sharp, ids, temperature=1.3)) < 1e-6
    # Second token given the most frequent first token.
    a = int(np.argmax(counts))
    second = np.array([s.token_ids[1] for s in g.samples[0] if s.token_ids[0] == a and len(s.token_ids) > 1])
    assert len(second) > 300
    p2 = _next_probs(sharp, ids + [a])
    assert _chi2_pvalue(np.bincount(second, minlength=V), p2) > 1e-3


def test_top_p_samples_only_the_nucleus_in_proportion(tok, sharp):
    n, T, top_p = 6000, 0.7, 0.6
    prompt = PROMPTS[0]
    ids = encode_prompts(tok, [prompt])[0]
    g = generate(sharp, tok, [prompt], n=n, temperature=T, top_p=top_p, max_new_tokens=1, seed=5, engine="fast",
                 batch_size=n)
    counts = np.bincount([s.token_ids[0] for s in g.samples[0]], minlength=len(tok))
    p = _next_probs(sharp, ids, temperature=T)
    keep = _brute_force_nucleus(torch.tensor(p)[None], top_p)[0].numpy()
    assert 1 < keep.sum() < len(p)
    assert counts[~keep].sum() == 0
    assert _chi2_pvalue(counts[keep], p[keep] / p[keep].sum()) > 1e-3


# ------------------------------------------------------------------------------------------- top-p


def _brute_force_nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Token i is kept iff the tokens strictly more probable than it hold less than top_p: (B, V) bool."""
    p = probs.double()
    above = (p[:, None, :] > p[:, :, None]).double()  # (B, i, j): p_j > p_i
    return (above * p[:, None, :]).sum(-1) < top_p


def _logit_rows(V: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    randn = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    tie_at_cut = torch.full((1, V), -30.0)
    tie_at_cut[0, :40] = 0.0  # 40 equal tokens around any cut: the rank order inside the tie is arbitrary
    return {
        "normal": randn(6, V),
        "peaked": 8 * randn(6, V),
        "flat": 0.05 * randn(6, V),  # nucleus beyond every top-k stage: the full sort
        "ties": torch.randint(0, 4, (6, V), generator=gen).float(),
        "uniform": torch.zeros(2, V),
        "one_hot": torch.nn.functional.one_hot(torch.tensor([3, 7]), V).float() * 50,
        "tie_across_k": tie_at_cut,
    }


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 0.95, 0.999])
def test_nucleus_threshold_keeps_exactly_the_nucleus(top_p):
    V = 700
    gen = torch.Generator().manual_seed(0)
    for name, z in _logit_rows(V, gen).items():
        # Small stages (8, 32) so every path runs: top-8, top-32, and the full sort.
        kept = z >= nucleus_threshold(z, top_p, stages=(8, 32))
        assert torch.equal(kept, _brute_force_nucleus(torch.softmax(z.double(), -1), top_p)), name
        assert kept.any(-1).all()
        # Tied logits are kept or dropped together.
        for row, keep in zip(z, kept, strict=True):
            assert not (set(row[keep].tolist()) & set(row[~keep].tolist())), name


def test_nucleus_threshold_agrees_with_transformers_top_p():
    """Same kept set as transformers' TopPLogitsWarper on logits without ties (given float64 logits:
    its float32 cumulative sum over 5000 tokens is off by more than a flat row's boundary gap)."""
    from transformers import TopPLogitsWarper

    gen = torch.Generator().manual_seed(1)
    quantiles = torch.erfinv(torch.linspace(-0.999, 0.999, 5000)) * 2**0.5  # distinct normal quantiles
    z = torch.stack([quantiles[torch.randperm(5000, generator=gen)] * s for s in (0.3, 1.0, 3.0, 10.0)
                     for _ in range(8)])
    assert all(row.unique().numel() == row.numel() for row in z)
    for top_p in (0.3, 0.8, 0.95):
        hf = TopPLogitsWarper(top_p)(None, z.double()) > float("-inf")
        assert torch.equal(z >= nucleus_threshold(z, top_p), hf)


def test_sample_next_greedy_and_generator():
    z = torch.randn(5, 50, generator=torch.Generator().manual_seed(2))
    assert torch.equal(sample_next(z, 0.0, 0.9, None), z.argmax(-1))
    a = sample_next(z, 1.0, 0.9, torch.Generator().manual_seed(4))
    b = sample_next(z, 1.0, 0.9, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    keep = z >= nucleus_threshold(z, 0.9)
    assert keep.gather(-1, a[:, None]).all()


# ----------------------------------------------------------------------------- cache and retirement


def test_decode_logits_equal_a_fresh_forward_through_retirement(tok, sharp, monkeypatch):
    """Every logit row the sampler draws from equals the model's forward on that sample's prompt and
    tokens so far, while samples end at different steps (retired rows, buffers compacted)."""
    prompts = SYSTEM_PROMPTS[:3]
    n, steps = 3, 20  # two CHUNK blocks of generated keys
    seen = []
    real = sampler.sample_next
    monkeypatch.setattr(sampler, "sample_next", lambda logits, *a: (seen.append(logits.clone()), real(logits, *a))[1])
    buffer_rows = []
    retire = sampler.SharedPrefixCache.retire
    monkeypatch.setattr(sampler.SharedPrefixCache, "retire",
                        lambda self, keep: (retire(self, keep), buffer_rows.append(self.rows))[0])
    prompt_ids = encode_prompts(tok, prompts)
    # Frequent stop tokens: most samples end within a few steps, some run to the end.
    with torch.no_grad():
        first = sharp(input_ids=torch.tensor([prompt_ids[0]])).logits[0, -1].topk(8).indices.tolist()
    stop = [tok.eos_token_id, *first[3:8]]  # ~20% of the first step's mass
    out = sample_token_ids(sharp, prompt_ids, n=n, temperature=1.0, top_p=1.0, max_new_tokens=steps, seed=0,
                           batch_size=64, stop=stop, pad_id=tok.pad_token_id)
    lengths = [len(s) for row in out for s in row]
    assert min(lengths) < steps // 2 and max(lengths) == steps  # rows retired early and late
    assert min(buffer_rows) < len(prompts) * n  # the generated-token buffers were compacted
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompt_ids[i]), i))  # the engine's slot order
    slots = [(i, k) for i in order for k in range(n)]
    for t, logits in enumerate(seen):
        live = [(i, k) for i, k in slots if len(out[i][k]) > t]
        assert logits.shape[0] == len(live)
        for r, (i, k) in enumerate(live):
            ids = prompt_ids[i] + out[i][k][:t]
            with torch.no_grad():
                ref = sharp(input_ids=torch.tensor([ids])).logits[0, -1]
            torch.testing.assert_close(logits[r], ref, atol=2e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ the public interface


def test_seeded_and_leaves_the_global_rng(tok, llama):
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    kw = dict(n=3, temperature=1.0, top_p=0.9, max_new_tokens=12, batch_size=6, engine="fast")
    a = generate(llama, tok, PROMPTS, seed=7, **kw)
    assert torch.equal(state, torch.random.get_rng_state())
    b = generate(llama, tok, PROMPTS, seed=7, **kw)
    c = generate(llama, tok, PROMPTS, seed=8, **kw)
    assert _ids(a) == _ids(b)
    assert _ids(a) != _ids(c)
    assert a.prompt_ids == encode_prompts(tok, PROMPTS)
    assert a.settings["engine"] == "fast"


@pytest.mark.parametrize("engine", ["fast", "hf"])
def test_parts_merge_into_the_whole_run(tok, llama, engine):
    """Data-parallel sampling: parts (r, N) draw every N-th batch with its whole-run seed, so merged they are
    the whole run's samples token for token, for any N (3 parts here leave the third one batch)."""
    from preftune.online.generate import merge_parts

    prompts = PROMPTS + SYSTEM_PROMPTS[:3]
    kw = dict(n=2, temperature=1.0, top_p=0.9, max_new_tokens=6, batch_size=4, seed=3, engine=engine)
    whole = generate(llama, tok, prompts, **kw)
    for world in (2, 3):
        parts = [generate(llama, tok, prompts, part=(r, world), **kw) for r in range(world)]
        assert all(any(s is None for row in p.samples for s in row) for p in parts)  # each drew a share only
        merged = merge_parts(parts[::-1])
        assert _ids(merged) == _ids(whole) and merged.texts() == whole.texts()
        assert merged.finished() == whole.finished() and merged.prompt_ids == whole.prompt_ids
    with pytest.raises(ValueError, match="drawn by no part"):
        merge_parts(parts[:2])
    with pytest.raises(ValueError, match="part must be"):
        generate(llama, tok, prompts, part=(2, 2), **kw)


def test_eos_kept_and_finished(tok):
    """With every other token a stop token, samples end at all steps: the stop id is the last id,
    appears nowhere before it, ``finished`` says whether it was reached, the text leaves it out."""
    model = _model("llama", tok)
    model.generation_config.eos_token_id = list(range(0, len(tok), 2))
    stop = set(eos_ids(tok, model))
    g = generate(model, tok, PROMPTS, n=8, temperature=1.0, top_p=0.95, max_new_tokens=4, engine="fast", seed=1)
    samples = [s for row in g.samples for s in row]
    assert {s.num_tokens for s in samples} == {1, 2, 3, 4}
    assert any(s.finished for s in samples) and not all(s.finished for s in samples)
    for s in samples:
        assert s.finished == (s.token_ids[-1] in stop)
        assert not stop & set(s.token_ids[:-1])
        assert s.num_tokens == 4 or s.finished
        body = s.token_ids[:-1] if s.finished else s.token_ids
        assert s.text == tok.decode(body, skip_special_tokens=True).strip()


def test_engine_choice_and_the_model_left_as_found(tok, llama):
    llama.train()
    before = llama.config._attn_implementation
    g = generate(llama, tok, PROMPTS[:1], temperature=0, max_new_tokens=3)
    assert g.settings["engine"] == "fast"  # "auto" on a tested architecture
    assert llama.config._attn_implementation == before and llama.training
    assert not any("forward" in vars(m) for m in llama.modules())  # oneDNN linears unhooked
    assert generate(llama, tok, PROMPTS[:1], temperature=0, max_new_tokens=3, engine="hf").settings["engine"] == "hf"
    with pytest.raises(ValueError, match="engine"):
        generate(llama, tok, PROMPTS[:1], engine="vllm")


def test_bf16_weights(tok):
    """A bf16 copy (the loop's sampling_precision: bf16) samples with EOS handling and the same
    greedy tokens as transformers.generate on the same bf16 weights for the first steps."""
    model = _model("llama", tok).to(torch.bfloat16)
    stop = eos_ids(tok, model)
    ref = _hf_greedy_alone(model, tok, PROMPTS, 4, stop)
    fast = generate(model, tok, PROMPTS, temperature=0, max_new_tokens=4, engine="fast")
    assert _ids(fast) == ref
    g = generate(model, tok, PROMPTS, n=2, temperature=0.8, top_p=0.95, max_new_tokens=6, engine="fast")
    assert all(1 <= s.num_tokens <= 6 for row in g.samples for s in row)
