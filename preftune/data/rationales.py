"""The rationale prompt x_rat of RDPO / R-ORPO (METHODS.md §M3) and the tokens of (x_rat, rationale).

The released loaders (reds-lab/preference-learning-with-rationales ``dataloader.py``, the general and specific
rationale sets) put the rationale after a user turn that restates the prompt and shows both responses, the
chosen one first, and ask which is preferable; the rationale is the assistant's reply. preftune renders that
turn from ``RATIONALE_TEMPLATE`` (``{prompt}``, ``{first}``, ``{second}``) and tokenises (x_rat, r) exactly as a
(prompt, response) pair, through the chat template when the pair itself goes through it. ``order="random"``
[preftune] shows the chosen response second for about half of the pairs (a fixed choice per pair), against the
position shortcut METHODS.md §M3(e) warns of; the default keeps the released chosen-first order.
"""

from __future__ import annotations

import zlib
from typing import Any

from .derive import Example
from .schema import Text

RATIONALE_TEMPLATE = (
    "Given the prompt:\n{prompt}\n"
    "Which of the following assistant's response is more preferable and strictly follows with the prompt "
    'question?\nResponse above:"{first}"\nor\nResponse below:"{second}"?\n'
)
RATIONALE_ORDERS = ("chosen_first", "random")


def as_text(value: Text) -> str:
    """Plain text of a prompt or response: a single message's content, else ``role: content`` lines."""
    if isinstance(value, str):
        return value
    if len(value) == 1:
        return str(value[0].get("content", ""))
    return "\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in value)


def chosen_first(prompt: Text, chosen: Text, rejected: Text, order: str) -> bool:
    """Whether x_rat shows the chosen response first: always for ``chosen_first``; for ``random``, a coin
    fixed by the pair's text (the same on every process, epoch and run)."""
    if order not in RATIONALE_ORDERS:
        raise ValueError(f"rationale_order must be one of {RATIONALE_ORDERS}, got {order!r}")
    if order == "chosen_first":
        return True
    key = "\x00".join(as_text(t) for t in (prompt, chosen, rejected)).encode()
    return zlib.crc32(key) % 2 == 0


def render_rationale_prompt(
    prompt: Text, chosen: Text, rejected: Text, template: str | None = None, order: str = "chosen_first"
) -> str:
    """x_rat: ``template`` (default ``RATIONALE_TEMPLATE``) with the prompt and the two responses filled in."""
    first, second = (chosen, rejected) if chosen_first(prompt, chosen, rejected, order) else (rejected, chosen)
    try:
        return (template or RATIONALE_TEMPLATE).format(prompt=as_text(prompt), first=as_text(first),
                                                       second=as_text(second))
    except (KeyError, IndexError) as e:
        raise ValueError(f"rationale_template: unknown placeholder {e} (use {{prompt}}, {{first}}, {{second}}; "
                         "write literal braces as {{ and }})") from None


def rationale_example(example: Example, template: str | None, order: str, templated: bool) -> Example:
    """The (x_rat, rationale) pair of a paired example as an example of one response: chat messages when the
    pair goes through the chat template (x_rat a user turn, the rationale the assistant's), plain text else."""
    x_rat = render_rationale_prompt(example.prompt, example.responses[0], example.responses[1], template, order)
    r = as_text(example.rationale)
    if templated:
        return Example([{"role": "user", "content": x_rat}], [[{"role": "assistant", "content": r}]],
                       source=example.source, line=example.line)
    return Example(x_rat, [r], source=example.source, line=example.line)


def tokenize_rationale(example: Example, tokenizer: Any, *, template: str | None = None,
                       order: str = "chosen_first", chat_template: str = "auto", **lengths: Any):
    """(x_rat token ids, rationale token ids, truncated?) tokenised as ``tokenize_example`` tokenises a pair
    (``lengths``: max_length, max_prompt_length, truncation_mode, add_eos)."""
    from .tokenize import _uses_template, tokenize_example

    conversational = isinstance(example.prompt, list) or any(isinstance(r, list) for r in example.responses)
    templated = _uses_template(conversational, chat_template, tokenizer)
    tok = tokenize_example(rationale_example(example, template, order, templated), tokenizer,
                           chat_template="always" if templated else "never", **lengths)
    return tok.prompt_ids, tok.response_ids[0], tok.truncated
