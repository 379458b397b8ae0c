"""Tiny offline models: a small byte-level BPE tokenizer and randomly initialised causal LMs, built in
milliseconds without a download. ``preftune demo --quick`` runs on them, and the tests reuse them
through ``preftune.testing``.

``tiny_tokenizer()`` trains a small byte-level BPE on a fixed corpus, so merges cross word pieces the
way real tokenizers do (which is what makes prompt/response boundary tests meaningful), and carries a
ChatML chat template like SmolLM2's. ``tiny_model(arch)`` builds a randomly initialised causal LM of a
supported architecture from a config, seeded.
"""

from __future__ import annotations

import functools

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
