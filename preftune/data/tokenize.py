"""Tokenise an example so that prompt + response tokens are exactly the tokenisation of the whole.

Tokenising the prompt and each response separately and concatenating is the classic bug: BPE
merges across the boundary (``"? "`` + ``"A"`` vs ``"?"`` + ``" A"``) and chat templates render a
conversation differently from its parts. So each *full* text (prompt + response ``k``) is tokenised
whole, the prompt is tokenised alone, and the shared prompt is the longest common prefix of all of
them; every response is the rest of its full tokenisation. The prompt is then shared by all ``K``
responses, which is what the engine's prefix sharing needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from .derive import Example
from .schema import Text

TruncationMode = Literal["keep_end", "keep_start"]
ChatTemplateMode = Literal["auto", "always", "never"]
CHAT_TEMPLATE_MODES = ("auto", "always", "never")
TRUNCATION_MODES = ("keep_end", "keep_start")


@dataclass
class TokenizedExample:
    """Token ids of one group: the shared prompt once, then each response's continuation."""

    prompt_ids: list[int]
    response_ids: list[list[int]]
    inputs: dict[str, Any] = field(default_factory=dict)
    source: str = "<memory>"
    line: int = 0
    index: int = -1  # position in the dataset (the key of cached reference log-probs)
    prompt_truncated: bool = False
    responses_truncated: int = 0  # how many responses lost tokens to max_length
    # RDPO / R-ORPO: the rationale prompt x_rat and the rationale, a third sequence the policy scores.
    rationale_prompt_ids: list[int] | None = None
    rationale_ids: list[int] | None = None

    @property
    def truncated(self) -> bool:
        return self.prompt_truncated or self.responses_truncated > 0

    @property
    def num_tokens(self) -> int:
        """Unique tokens: the prompt once plus every response (and the rationale sequence, when there is one)."""
        side = len(self.rationale_prompt_ids) + len(self.rationale_ids) if self.rationale_ids is not None else 0
        return len(self.prompt_ids) + sum(len(r) for r in self.response_ids) + side


@dataclass(frozen=True)
class Rendered:
    """The texts to tokenise; ``templated`` texts already contain their special tokens."""

    prompt: str
    fulls: list[str]
    templated: bool


def _as_messages(text: Text, role: str) -> list[dict]:
    return text if isinstance(text, list) else [{"role": role, "content": text}]


def _uses_template(conversational: bool, mode: str, tokenizer: Any) -> bool:
    if mode not in CHAT_TEMPLATE_MODES:
        raise ValueError(f"chat_template must be one of {CHAT_TEMPLATE_MODES}, got {mode!r}")
    if mode == "never" and conversational:
        raise ValueError("chat_template='never' but the example is a conversation (chat messages)")
    use = mode == "always" or (mode == "auto" and conversational)
    if use and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "the data is conversational (or chat_template='always') but the tokenizer has no chat template"
        )
    return use


def render_example(
    prompt: Text, responses: list[Text], tokenizer: Any, chat_template: str = "auto"
) -> Rendered:
    """Prompt text and one full text per response, through the chat template where it applies.

    With the template, the prompt ends with the generation prompt (``<|im_start|>assistant\\n``) and
    each full text is the prompt messages plus the response's assistant message(s). Plain text is
    concatenated as is: the data decides the separator.
    """
    conversational = isinstance(prompt, list) or any(isinstance(r, list) for r in responses)
    if not _uses_template(conversational, chat_template, tokenizer):
        return Rendered(prompt, [prompt + r for r in responses], templated=False)
    messages = _as_messages(prompt, "user")
    prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    fulls = [
        tokenizer.apply_chat_template(messages + _as_messages(r, "assistant"), tokenize=False)
        for r in responses
    ]
    return Rendered(prompt_text, fulls, templated=True)


def _encode(tokenizer: Any, texts: list[str], templated: bool) -> list[list[int]]:
    # A template renders its own BOS/EOS; adding the tokenizer's would duplicate them. Plain text
    # gets the default special tokens, which only ever land at the start (or end) of a whole text.
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=not templated)["input_ids"]]


def _common_prefix_len(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n


def prompt_token_count(prompt: Text, tokenizer: Any, chat_template: str = "auto") -> int:
    """Tokens of the prompt alone, rendered as :func:`tokenize_example` renders it."""
    rendered = render_example(prompt, [], tokenizer, chat_template)
    return len(_encode(tokenizer, [rendered.prompt], rendered.templated)[0])


def _check_lengths(max_length: int | None, max_prompt_length: int | None, truncation_mode: str) -> None:
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode must be one of {TRUNCATION_MODES}, got {truncation_mode!r}")
    if max_length is not None and max_prompt_length is not None and max_prompt_length >= max_length:
        # Otherwise a prompt at its limit leaves no room for a single response token.
        raise ValueError(
            f"max_prompt_length ({max_prompt_length}) must be smaller than max_length ({max_length})"
        )


def tokenize_example(
    example: Example,
    tokenizer: Any,
    *,
    max_length: int | None = 1024,
    max_prompt_length: int | None = 512,
    truncation_mode: TruncationMode = "keep_end",
    chat_template: ChatTemplateMode = "auto",
    add_eos: bool = True,
    rationale_template: str | None = None,
    rationale_order: str = "chosen_first",
) -> TokenizedExample:
    """Token ids with ``prompt_ids + response_ids[k] == tokenize(full text k)`` before truncation.

    Truncation is explicit, prompt first: a prompt longer than ``max_prompt_length`` keeps its end
    (``keep_end``: the question nearest the answer) or its start (``keep_start``); then each
    response keeps its start so that prompt + response fits ``max_length``. ``add_eos`` appends
    the EOS id to plain-text responses that do not end with it (templates render their own).
    An example with a ``rationale`` also gets (x_rat, rationale) ids, tokenised and truncated the same
    way (``rationale_template``/``rationale_order``: preftune/data/rationales.py).
    """
    _check_lengths(max_length, max_prompt_length, truncation_mode)
    own_prompts = getattr(example, "prompts", None)
    if own_prompts is not None:  # MAPL: each response under its own prompt
        prompt_ids, responses, own = _per_response_prompts(example, own_prompts, tokenizer, chat_template, add_eos)
    else:
        rendered = render_example(example.prompt, example.responses, tokenizer, chat_template)
        prompt_tok, *fulls = _encode(tokenizer, [rendered.prompt, *rendered.fulls], rendered.templated)
        eos = tokenizer.eos_token_id
        if add_eos and not rendered.templated and eos is not None:
            fulls = [f if f and f[-1] == eos else f + [eos] for f in fulls]
        n = _common_prefix_len([prompt_tok, *fulls])
        prompt_ids, responses = prompt_tok[:n], [f[n:] for f in fulls]

    prompt_truncated = max_prompt_length is not None and len(prompt_ids) > max_prompt_length
    if prompt_truncated:
        keep_end = truncation_mode == "keep_end"
        prompt_ids = prompt_ids[-max_prompt_length:] if keep_end else prompt_ids[:max_prompt_length]
    cut = 0
    if max_length is not None:
        budget = max_length - len(prompt_ids)
        cut = sum(len(r) > budget for r in responses)
        responses = [r[:budget] for r in responses]
    out = TokenizedExample(
        prompt_ids,
        responses,
        dict(example.inputs) if own_prompts is None else {**example.inputs, "prompt_tokens": own},
        example.source,
        example.line,
        prompt_truncated=prompt_truncated,
        responses_truncated=cut,
    )
    if getattr(example, "rationale", None) is not None:
        from .rationales import tokenize_rationale

        out.rationale_prompt_ids, out.rationale_ids, _ = tokenize_rationale(
            example, tokenizer, template=rationale_template, order=rationale_order, chat_template=chat_template,
            max_length=max_length, max_prompt_length=max_prompt_length, truncation_mode=truncation_mode,
            add_eos=add_eos)
    return out


def _per_response_prompts(example: Example, prompts: list[Text], tokenizer: Any, chat_template: str,
                          add_eos: bool) -> tuple[list[int], list[list[int]], list[float]]:
    """(shared prompt ids, responses, per response the count of its leading tokens that are its own prompt's).

    Response k is rendered after prompt k; the shared prompt is the tokens every full text and prompt begin with,
    so each response starts with the rest of its prompt (e.g. MAPL's added instructions), which the objective
    must not score (``inputs['prompt_tokens']``)."""
    if len(prompts) != len(example.responses):
        raise ValueError(f"{example.source}:{example.line}: pair_prompts: {len(prompts)} prompts for "
                         f"{len(example.responses)} responses")
    prompt_toks, fulls = [], []
    eos = tokenizer.eos_token_id
    for prompt, response in zip(prompts, example.responses, strict=True):
        rendered = render_example(prompt, [response], tokenizer, chat_template)
        p, f = _encode(tokenizer, [rendered.prompt, rendered.fulls[0]], rendered.templated)
        if add_eos and not rendered.templated and eos is not None and (not f or f[-1] != eos):
            f = f + [eos]
        prompt_toks.append(p)
        fulls.append(f)
    n = _common_prefix_len([*prompt_toks, *fulls])
    own = [float(_common_prefix_len([p, f]) - n) for p, f in zip(prompt_toks, fulls, strict=True)]
    return fulls[0][:n], [f[n:] for f in fulls], own


def tokenize_examples(examples: list[Example], tokenizer: Any, **kwargs: Any) -> list[TokenizedExample]:
    """:func:`tokenize_example` over a dataset; ``index`` is the example's position."""
    out = []
    for i, ex in enumerate(examples):
        tok = tokenize_example(ex, tokenizer, **kwargs)
        tok.index = i
        out.append(tok)
    return out


def truncation_counts(examples: list[TokenizedExample]) -> dict[str, int]:
    """How many prompts and responses were cut (for one warning line before training)."""
    return {
        "prompts": sum(e.prompt_truncated for e in examples),
        "responses": sum(e.responses_truncated for e in examples),
        "examples": sum(e.truncated for e in examples),
    }
