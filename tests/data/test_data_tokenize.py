"""Tokenisation: prompt + response tokens equal the tokenisation of the whole; truncation is exact."""

import pytest

from preftune.data import Example, tokenize_example, tokenize_examples, truncation_counts


def _msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


CONVERSATIONS = [
    # single turn
    (
        _msgs(("user", "Write a haiku about the sea.")),
        [_msgs(("assistant", "Waves fold into foam.")), _msgs(("assistant", "no"))],
    ),
    # system message
    (
        _msgs(("system", "Answer in exactly three lines."), ("user", "Which answer is better?")),
        [_msgs(("assistant", "The chosen one.")), _msgs(("assistant", "The rejected one, maybe."))],
    ),
    # multi-turn prompt, three responses (listwise), one of them plain text
    (
        _msgs(
            ("system", "Be helpful."),
            ("user", "hello"),
            ("assistant", "hello world"),
            ("user", "thanks, 1 2 3?"),
        ),
        [_msgs(("assistant", "yes")), _msgs(("assistant", "no")), "maybe true"],
    ),
    # a response of several assistant turns
    (
        _msgs(("user", "Count.")),
        [_msgs(("assistant", "0 1"), ("assistant", "2 3")), _msgs(("assistant", "10"))],
    ),
]


def _full_chat_ids(tok, prompt, response):
    response = response if isinstance(response, list) else _msgs(("assistant", response))
    text = tok.apply_chat_template(prompt + response, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("case", range(len(CONVERSATIONS)))
def test_chat_prompt_plus_response_equals_whole(tiny_tok, case):
    prompt, responses = CONVERSATIONS[case]
    tok = tokenize_example(Example(prompt, responses), tiny_tok, max_length=None, max_prompt_length=None)
    assert len(tok.response_ids) == len(responses)
    for response, ids in zip(responses, tok.response_ids, strict=True):
        assert tok.prompt_ids + ids == _full_chat_ids(tiny_tok, prompt, response)
        assert tiny_tok.eos_token_id in ids  # the template closes the assistant turn
    # The shared prompt is the whole rendered prompt (ChatML has no boundary merges).
    rendered = tiny_tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert tok.prompt_ids == tiny_tok(rendered, add_special_tokens=False)["input_ids"]
    assert tiny_tok.decode(tok.prompt_ids).endswith("<|im_start|>assistant\n")
    assert not tok.truncated


@pytest.mark.parametrize(
    ("prompt", "responses"),
    [
        ("Is it true? ", ["no", "yes"]),  # " no" is one token: the boundary merges
        ("Reply with the", ["re", " sea."]),
        ("The quick brown fox", [" jumps.", " is lazy."]),
    ],
)
def test_plain_text_prompt_plus_response_equals_whole(tiny_tok, prompt, responses):
    tok = tokenize_example(Example(prompt, responses), tiny_tok)
    eos = tiny_tok.eos_token_id
    for response, ids in zip(responses, tok.response_ids, strict=True):
        assert tok.prompt_ids + ids == tiny_tok(prompt + response)["input_ids"] + [eos]
        assert ids[-1] == eos and ids.count(eos) == 1


def test_boundary_merge_moves_the_prompt_tail_into_the_responses(tiny_tok):
    alone = tiny_tok("Is it true? ")["input_ids"]
    tok = tokenize_example(Example("Is it true? ", ["no", "yes"]), tiny_tok)
    # "? " + "no" tokenises as "?", " no": the shared prompt stops before the trailing space.
    assert tok.prompt_ids == alone[:-1]
    assert tiny_tok.convert_ids_to_tokens(tok.response_ids[0][:1]) == ["Ġno"]


def test_add_eos_not_duplicated(tiny_tok):
    tok = tokenize_example(Example("hello", [" world<|im_end|>", " world"]), tiny_tok)
    assert tok.response_ids[0] == tok.response_ids[1]
    no_eos = tokenize_example(Example("hello", [" world"]), tiny_tok, add_eos=False)
    assert no_eos.response_ids[0] == tok.response_ids[0][:-1]


def test_chat_template_modes(tiny_tok):
    plain = Example("Write a haiku.", ["Waves."])
    always = tokenize_example(plain, tiny_tok, chat_template="always")
    chat = tokenize_example(
        Example(_msgs(("user", "Write a haiku.")), [_msgs(("assistant", "Waves."))]), tiny_tok
    )
    assert always.prompt_ids == chat.prompt_ids and always.response_ids == chat.response_ids
    with pytest.raises(ValueError, match="chat_template='never' but the example is a conversation"):
        tokenize_example(Example(_msgs(("user", "hi")), ["x"]), tiny_tok, chat_template="never")
    with pytest.raises(ValueError, match="chat_template must be one of"):
        tokenize_example(plain, tiny_tok, chat_template="sometimes")


def test_no_template_on_the_tokenizer(tiny_tok):
    tok = tiny_tok.__class__(tokenizer_object=tiny_tok.backend_tokenizer, eos_token="<|im_end|>")
    tok.chat_template = None
    with pytest.raises(ValueError, match="has no chat template"):
        tokenize_example(Example(_msgs(("user", "hi")), ["x"]), tok)


def _bos_tokenizer(with_template_bos: bool):
    """The tiny tokenizer with a BOS post-processor (as Llama's) and a template rendering BOS."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    from preftune.testing import CHATML_TEMPLATE, _tokenizer_json

    backend = Tokenizer.from_str(_tokenizer_json(320))
    backend.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", backend.token_to_id("<|endoftext|>"))]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<pad>"
    )
    tok.chat_template = ("{{ bos_token }}" if with_template_bos else "") + CHATML_TEMPLATE
    return tok


def test_bos_appears_once_at_the_start():
    tok = _bos_tokenizer(with_template_bos=True)
    bos = tok.bos_token_id
    plain = tokenize_example(Example("hello", [" world", " sea"]), tok)
    assert plain.prompt_ids[0] == bos and plain.prompt_ids.count(bos) == 1
    assert all(bos not in r for r in plain.response_ids)
    chat = tokenize_example(Example(_msgs(("user", "hello")), ["world"]), tok)
    assert chat.prompt_ids[0] == bos and chat.prompt_ids.count(bos) == 1
    assert bos not in chat.response_ids[0]


# ---------------------------------------------------------------- truncation


def _long_example():
    prompt = " ".join(["the quick brown fox"] * 10)  # far longer than 12 tokens
    return Example(prompt, [" jumps over the lazy dog.", " no"])


@pytest.mark.parametrize("mode", ["keep_end", "keep_start"])
def test_prompt_truncation_exact(tiny_tok, mode):
    ex = _long_example()
    full = tokenize_example(ex, tiny_tok, max_length=None, max_prompt_length=None)
    cut = tokenize_example(ex, tiny_tok, max_length=20, max_prompt_length=12, truncation_mode=mode)
    assert len(full.prompt_ids) > 12
    expected = full.prompt_ids[-12:] if mode == "keep_end" else full.prompt_ids[:12]
    assert cut.prompt_ids == expected
    # Responses keep their start and fit the 8 tokens left.
    assert len(full.response_ids[0]) > 8 and cut.response_ids[0] == full.response_ids[0][:8]
    assert len(full.response_ids[1]) <= 8 and cut.response_ids[1] == full.response_ids[1]
    assert cut.prompt_truncated and cut.responses_truncated == 1
    assert all(len(cut.prompt_ids) + len(r) <= 20 for r in cut.response_ids)


def test_response_only_truncation(tiny_tok):
    ex = Example("hello", [" the quick brown fox jumps over the lazy dog."])
    full = tokenize_example(ex, tiny_tok, max_length=None, max_prompt_length=None)
    cut = tokenize_example(ex, tiny_tok, max_length=10, max_prompt_length=5)
    assert cut.prompt_ids == full.prompt_ids and not cut.prompt_truncated
    assert cut.response_ids[0] == full.response_ids[0][: 10 - len(full.prompt_ids)]


def test_bad_lengths(tiny_tok):
    with pytest.raises(
        ValueError, match="max_prompt_length \\(20\\) must be smaller than max_length \\(20\\)"
    ):
        tokenize_example(_long_example(), tiny_tok, max_length=20, max_prompt_length=20)
    with pytest.raises(ValueError, match="truncation_mode"):
        tokenize_example(_long_example(), tiny_tok, truncation_mode="middle")


def test_tokenize_examples_indices_and_truncation_counts(tiny_tok):
    examples = [_long_example(), Example("hi", [" a", " b"], inputs={"scores": [1.0, 0.0]}), _long_example()]
    toks = tokenize_examples(examples, tiny_tok, max_length=20, max_prompt_length=12)
    assert [t.index for t in toks] == [0, 1, 2]
    assert toks[1].inputs == {"scores": [1.0, 0.0]}
    assert truncation_counts(toks) == {"prompts": 2, "responses": 2, "examples": 2}
