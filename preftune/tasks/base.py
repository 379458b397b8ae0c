"""The task interface: prompts split by topic, and a programmatic judge.

A task is data plus a pure function: ``train_prompts()`` and ``heldout_prompts()`` return chat
prompts (``[{"role": "user", "content": ...}]``), split by topic so held-out prompts are unseen,
and ``judge(prompt, response, finished=True)`` scores one response. The score is graded in [0, 1]
(1 = success; failures get smaller values that order them, so best-vs-worst pairs carry signal);
``success`` is the boolean the demo reports as a rate.

Code outside a task (synthetic data, judges) reaches it by name through ``get_task`` and this
interface only: ``topics``/``topic_of`` for what a prompt is about, ``constraint_of`` for the
per-prompt requirement the judge checks (``word_limit``: the word limit N).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Prompt = list[dict[str, Any]]


@dataclass(frozen=True)
class Judgement:
    score: float  # in [0, 1], higher is better
    success: bool
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Task:
    """A built-in task: a name, a description, topic-split prompts and a programmatic judge.

    ``judge(prompt, response, finished)``: ``finished`` says whether the response ended with EOS
    (a response cut by ``max_new_tokens`` is not an answer); text-only callers leave it True.
    """

    name: str
    description: str
    train_prompts: Callable[[], list[Prompt]]
    heldout_prompts: Callable[[], list[Prompt]]
    judge: Callable[..., Judgement]
    topics: tuple[str, ...] = ()  # every topic of the train and held-out prompts
    constraint: Callable[[Prompt], Any] | None = None  # the per-prompt requirement the judge checks
    # Step-level tasks (``arithmetic``): the reference worked solution of a prompt (the hint of MCTS-DPO's
    # self-evaluation prompt) and a check of a partial answer's steps (+1 all right, −1 one wrong, 0 none).
    solution: Callable[[Prompt], str] | None = None
    step_score: Callable[[Prompt, str], float] | None = None
    # The answer length (new tokens) the task's prompts need and its base rates were measured at: the default
    # ``max_new_tokens`` of an online run or compare cell on this task (a cut answer is never a success).
    max_new_tokens: int = 32

    def topic_of(self, prompt: Prompt | str) -> str | None:
        """The first of ``topics`` that the prompt's text mentions (None when none does)."""
        text = prompt_text(prompt)
        return next((t for t in self.topics if t in text), None)

    def constraint_of(self, prompt: Prompt | str) -> Any:
        """The requirement the judge checks for this prompt (ValueError when the prompt states none)."""
        if self.constraint is None:
            raise ValueError(f"task {self.name!r} has no per-prompt constraint")
        return self.constraint(prompt)


_REGISTRY: dict[str, Task] = {}


def register(task: Task) -> Task:
    if task.name in _REGISTRY:
        raise ValueError(f"task {task.name!r} is already registered")
    _REGISTRY[task.name] = task
    return task


def _load_builtins() -> None:
    from preftune.tasks import arithmetic, code, json_object, keyword, two_sentences, word_limit  # noqa: F401 (registers)


def get_task(name: str) -> Task:
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; built-in tasks: {', '.join(sorted(_REGISTRY))}") from None


def all_tasks() -> list[Task]:
    _load_builtins()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def word_count(text: str) -> int:
    """Whitespace-separated pieces with at least one letter or digit ("—" and "-" are not words)."""
    return sum(1 for w in text.split() if any(c.isalnum() for c in w))


def prompt_text(prompt: Prompt | str) -> str:
    """The last user message of a chat prompt (or the prompt itself when it is a string)."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else ""
