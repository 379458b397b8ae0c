"""Tiny offline models and tokenizers for tests, examples and CI (no download, built in milliseconds).

``tiny_tokenizer()`` trains a small byte-level BPE on a fixed corpus, so merges cross word pieces the
way real tokenizers do (which is what makes prompt/response boundary tests meaningful), and carries a
ChatML chat template like SmolLM2's. ``tiny_model(arch)`` builds a randomly initialised causal LM of a
supported architecture from a config, seeded.
"""

from __future__ import annotations

import functools
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Write a haiku about the sea. Answer in exactly three lines.",
    "Preference optimization aligns a language model with human feedback.",
    "Which answer is better? The chosen answer is helpful; the rejected one is not.",
    "Summarise the text in at most twenty words, and end with a period.",
    "user assistant system hello world thanks please answer question response",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 yes no maybe true false",
] * 4

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]


@functools.lru_cache(maxsize=4)
def _tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(vocab_size: int = 320):
    """A PreTrainedTokenizerFast with a ChatML template, EOS ``<|im_end|>`` and a pad token."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)),
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token=None,
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


ARCHES = ("llama", "qwen2", "gpt2")


def tiny_config(arch: str = "llama", vocab_size: int = 320, hidden: int = 32, layers: int = 2, heads: int = 4):
    """A small config of one of ``ARCHES``; eager-friendly sizes, tied embeddings off so the LM head is its own."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    tok = tiny_tokenizer(vocab_size)
    common = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    if arch == "llama":
        return LlamaConfig(
            hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=512,
            tie_word_embeddings=False, **common,
        )
    if arch == "qwen2":
        return Qwen2Config(
            hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=512,
            tie_word_embeddings=False, **common,
        )
    if arch == "gpt2":
        return GPT2Config(
            n_embd=hidden, n_layer=layers, n_head=heads, n_positions=512, bos_token_id=tok.eos_token_id, **common
        )
    raise ValueError(f"unknown tiny architecture {arch!r}; choose from {ARCHES}")


def tiny_model(arch: str = "llama", seed: int = 0, **kwargs):
    """A randomly initialised causal LM (float32, eval mode off) built from ``tiny_config``."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(arch, **kwargs)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
    return model


def save_tiny_model(path: str | Path, arch: str = "llama", seed: int = 0, **kwargs) -> Path:
    """Write a tiny model and its tokenizer to ``path`` as a plain HF folder (what a user would pass)."""
    path = Path(path)
    model = tiny_model(arch, seed=seed, **kwargs)
    model.save_pretrained(path)
    tiny_tokenizer(kwargs.get("vocab_size", 320)).save_pretrained(path)
    return path


def write_pairs_jsonl(path: str | Path, n: int = 16, seed: int = 0) -> Path:
    """A small ``prompt/chosen/rejected`` JSONL file of plain-text pairs."""
    import json
    import random

    rng = random.Random(seed)
    words = "the quick brown fox jumps over lazy dog answer question helpful sea haiku".split()
    path = Path(path)
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            prompt = f"Question {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(3, 8)))
            chosen = " ".join(rng.choice(words) for _ in range(rng.randint(2, 6))) + "."
            rejected = " ".join(rng.choice(words) for _ in range(rng.randint(2, 9))) + "!"
            f.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
    return path


# ---------------------------------------------------------------- built-in data of every shape
_WORDS = "the quick brown fox jumps over lazy dog answer question helpful sea haiku".split()


def _text(rng, lo: int, hi: int, end: str = ".") -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(lo, hi))) + end


def _write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    import json

    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_unpaired_jsonl(path: str | Path, n: int = 16, seed: int = 0) -> Path:
    """KTO-style ``prompt/completion/label`` rows, desirable and undesirable alternating."""
    import random

    rng = random.Random(seed)
    rows = [{"prompt": f"Question {i}: " + _text(rng, 3, 8, "?"), "completion": _text(rng, 2, 7),
             "label": i % 2 == 0}
            for i in range(n)]
    return _write_jsonl(path, rows)


def write_scored_lists_jsonl(path: str | Path, n: int = 16, k: int = 4, seed: int = 0) -> Path:
    """``prompt/responses/scores`` rows with ``k`` responses and distinct scores in [0, 1]."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        scores = rng.sample(range(1, 100), k)
        rows.append({"prompt": f"Question {i}: " + _text(rng, 3, 8, "?"),
                     "responses": [_text(rng, 2, 7, f" {j}.") for j in range(k)],
                     "scores": [s / 100 for s in scores]})
    return _write_jsonl(path, rows)


def write_pairs_with_inputs_jsonl(
    path: str | Path, n: int = 16, seed: int = 0, prev_logps: bool = False
) -> Path:
    """``prompt/chosen/rejected`` pairs with the numeric columns self-play and weighted objectives read:
    ``win_probs`` (one per response, SPPO), ``pair_win_prob`` (SPPO single), ``rm_margin`` (MADPO),
    ``semantic_distance`` (Sem-DPO) and, with ``prev_logps=True``, π_t's summed log-probs (INPO)."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        p = rng.uniform(0.55, 0.95)
        row = {"prompt": f"Question {i}: " + _text(rng, 3, 8, "?"), "chosen": _text(rng, 2, 6),
               "rejected": _text(rng, 2, 9, "!"), "win_probs": [p, 1 - p], "pair_win_prob": p,
               "rm_margin": rng.uniform(0.1, 3.0), "semantic_distance": rng.uniform(0.0, 1.0)}
        if prev_logps:
            row["prev_logps"] = [-rng.uniform(5, 30), -rng.uniform(5, 30)]
        rows.append(row)
    return _write_jsonl(path, rows)


def write_triples_jsonl(path: str | Path, n: int = 16, seed: int = 0) -> Path:
    """TRL's TPO layout: ``prompt/chosen/rejected/reference`` (the reference is the gold response)."""
    import random

    rng = random.Random(seed)
    rows = [{"prompt": f"Question {i}: " + _text(rng, 3, 8, "?"), "chosen": _text(rng, 2, 6),
             "rejected": _text(rng, 2, 9, "!"), "reference": "Gold: " + _text(rng, 2, 6)} for i in range(n)]
    return _write_jsonl(path, rows)


# Numeric columns of write_pairs_with_inputs_jsonl (objectives reading one of them get that file).
PAIR_INPUT_COLUMNS = ("win_probs", "pair_win_prob", "rm_margin", "semantic_distance")


def write_data_for(name: str, folder: str | Path, n: int = 16, seed: int = 0) -> Path:
    """Built-in data of the shape objective ``name`` trains on, written into ``folder``."""
    from preftune.losses import get

    obj, folder = get(name), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if obj.columns:
        return write_triples_jsonl(folder / "triples.jsonl", n, seed)
    if obj.shape == "unpaired":
        return write_unpaired_jsonl(folder / "unpaired.jsonl", n, seed)
    if obj.shape == "listwise":
        return write_scored_lists_jsonl(folder / "lists.jsonl", n, max(4, obj.min_responses), seed)
    if set(obj.inputs) & set(PAIR_INPUT_COLUMNS):
        return write_pairs_with_inputs_jsonl(folder / "pairs_inputs.jsonl", n, seed)
    return write_pairs_jsonl(folder / "pairs.jsonl", n, seed)


def save_tiny_value_model(path: str | Path, seed: int = 0, **kwargs) -> Path:
    """A tiny token-classification Llama with one label: an OREO critic V(s_t) (``value_model``)."""
    import torch
    from transformers import AutoModelForTokenClassification

    cfg = tiny_config("llama", **kwargs)
    cfg.num_labels = 1
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForTokenClassification.from_config(cfg)
    path = Path(path)
    model.save_pretrained(path)
    tiny_tokenizer(kwargs.get("vocab_size", 320)).save_pretrained(path)
    return path
