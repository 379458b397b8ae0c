"""``arithmetic``: one or two operations on a number, worked one equation per line, then ``Answer: N``.

"What is 7 + 5, then multiply by 2? Write each step as an equation on its own line, then `Answer: N` on
the next." Every intermediate step is checkable: the task carries a per-step checker (``check_steps``,
``step_score``) and the reference solution (``solution_of``, the hint of MCTS-DPO's self-evaluation
prompt), so step-level methods (online/mcts.py) have something exact to look at. Half the prompts have one
operation, half two (SmolLM2-135M-Instruct almost never gets a two-step chain right: measured below).

Split: by the start number. Every 4th start number (in a fixed order) is held out, so a held-out
prompt starts from a number no training prompt starts from (its ``topic`` is "What is N ").

Judge (the final answer only; the steps feed ``score`` to order failures, never ``success``):
- success, score 1: the answer ended (EOS) and states the right final value;
- ended, the stated answer is wrong: ``0.2 + 0.3 · (share of step lines right)``;
- ended, no answer, or two answers that disagree: ``0.1``;
- cut by ``max_new_tokens``: 0.
The answer is read robustly (``final_answer``): "Answer: N", "**Answer:** N", "answer is N", "Answer = N.",
"1,024" and "24.0"; a response without an answer line answers with the result of its last equation line
(the 135M model rarely writes the answer line: with the strict reading its base success is ~0).

Base success of SmolLM2-135M-Instruct (float32, 1 thread, temperature 0.8, top-p 0.95, 64 new tokens,
seed 0, one sample per prompt, the 64 held-out prompts): see ``BASE_SUCCESS_NOTE``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from preftune.tasks.base import Judgement, Prompt, Task, prompt_text, register

# kind -> (symbol in a worked line, function)
OPS = {
    "add": ("+", lambda a, b: a + b),
    "sub": ("-", lambda a, b: a - b),
    "mul": ("*", lambda a, b: a * b),
}
# Operation chains, (kind, operand) pairs: two of one step and two of two steps for every start number.
CHAINS = (
    (("add", 5),),
    (("mul", 2),),
    (("add", 8), ("sub", 4)),
    (("sub", 3), ("mul", 2)),
)
STARTS = tuple(range(2, 66))  # 64 start numbers; 16 held out

BASE_SUCCESS_NOTE = (
    "held-out 6/64 = 9.4% [4.4, 19.0] (Wilson 95%); failures: 21 cut by 64 tokens, 19 no answer, 18 wrong "
    "(python /work/notes/measure_arithmetic.py heldout, OMP_NUM_THREADS=1, 28 s)"
)


@dataclass(frozen=True)
class Problem:
    start: int
    ops: tuple[tuple[str, int], ...]

    def values(self) -> list[int]:
        """The chain's values: start, then after each operation."""
        out = [self.start]
        for kind, b in self.ops:
            out.append(OPS[kind][1](out[-1], b))
        return out

    @property
    def answer(self) -> int:
        return self.values()[-1]


THEN = {"add": "then add {b}", "sub": "then subtract {b}", "mul": "then multiply by {b}"}


def make_prompt(p: Problem) -> Prompt:
    (k, b), rest = p.ops[0], p.ops[1:]
    first = f"What is {p.start} {OPS[k][0]} {b}"
    if not rest:
        text = f"{first}? Write the equation on one line, then `Answer: N` on the next."
    else:
        text = (f"{first}, " + ", ".join(THEN[k2].format(b=b2) for k2, b2 in rest)
                + "? Write each step as an equation on its own line, then `Answer: N` on the next.")
    return [{"role": "user", "content": text}]


_PROBLEM_RE = re.compile(r"What is (-?\d+) ([+*-]) (\d+)((?:, then (?:add|subtract|multiply by) \d+)*)\?")
_THEN_RE = re.compile(r"then (add|subtract|multiply by) (\d+)")
_VERB = {"add": "add", "subtract": "sub", "multiply by": "mul"}
_SYM = {"+": "add", "-": "sub", "*": "mul"}


def problem_of(prompt: Prompt | str) -> Problem:
    m = _PROBLEM_RE.search(prompt_text(prompt))
    if m is None:
        raise ValueError("arithmetic judge: the prompt does not ask 'What is a op b[, then …]?'")
    ops = ((_SYM[m.group(2)], int(m.group(3))),) + tuple((_VERB[v], int(b)) for v, b in _THEN_RE.findall(m.group(4)))
    return Problem(int(m.group(1)), ops)


def solution_of(prompt: Prompt | str) -> str:
    """The reference worked solution: one line per operation, then the answer line."""
    p = problem_of(prompt)
    vals = p.values()
    lines = [f"{vals[i]} {OPS[k][0]} {b} = {vals[i + 1]}" for i, (k, b) in enumerate(p.ops)]
    return "\n".join(lines + [f"Answer: {p.answer}"])


def split_starts(heldout_every: int = 4) -> tuple[list[int], list[int]]:
    heldout = [s for i, s in enumerate(STARTS) if i % heldout_every == heldout_every - 1]
    return [s for s in STARTS if s not in heldout], heldout


def _problems(starts: list[int]) -> list[Problem]:
    # Each start number with every chain: 4 prompts per start.
    return [Problem(s, c) for s in starts for c in CHAINS]


def train_prompts() -> list[Prompt]:
    """192 prompts: 48 start numbers × 4 operation chains."""
    return [make_prompt(p) for p in _problems(split_starts()[0])]


def heldout_prompts() -> list[Prompt]:
    """64 prompts on the 16 held-out start numbers (no training prompt starts from them)."""
    return [make_prompt(p) for p in _problems(split_starts()[1])]


TOPICS = tuple(f"What is {s} " for s in STARTS)

# ---------------------------------------------------------------------------------------------- parsing

_NUM = r"-?\d[\d,]*(?:\.\d+)?"
_ANSWER_RE = re.compile(r"answer(?:\s+is)?\s*\**\s*[:=]?\s*\**\s*\$?\s*(" + _NUM + r")", re.IGNORECASE)
_SYMBOLS = {"+": "+", "-": "-", "−": "-", "–": "-", "*": "*", "×": "*", "x": "*", "X": "*", "·": "*"}
_EQ_RE = re.compile(r"(" + _NUM + r")\s*([+\-−–*×xX·])\s*(" + _NUM + r")\s*=\s*(" + _NUM + r")")


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def final_answer(text: str) -> float | None:
    """The answer the response states: "Answer: N" and its variants ("answer is N", "**Answer:** N",
    "Answer = N."); without one, the result of its last equation line (``… = N``). None when it states none,
    or two answers that disagree."""
    found = [x for x in (_number(m) for m in _ANSWER_RE.findall(text)) if x is not None]
    if found:
        return found[-1] if len(set(found)) == 1 else None
    eqs = [m for line in text.splitlines() for m in _EQ_RE.findall(line)]
    return _number(eqs[-1][3]) if eqs else None


@dataclass(frozen=True)
class StepCheck:
    line: int  # index of the line in the response
    text: str
    arithmetic: bool  # a op b == c
    chain: bool  # a is the previous line's result (the start first) and (op, b) the prompt's next operation

    @property
    def ok(self) -> bool:
        return self.arithmetic and self.chain


def check_steps(prompt: Prompt | str, response: str) -> list[StepCheck]:
    """Every line holding an equation ``a op b = c``, checked: is it arithmetically right, and is it
    the next step of the prompt's chain (``a`` the previous line's result, the start number first; the
    prompt's operation and operand)? A line is right (``ok``) when both hold, so all right means all values right.
    Lines without an equation are not steps and are not listed."""
    p = problem_of(prompt)
    out = []
    prev: float | None = p.start  # the value the next line must start from: the previous line's result
    k = 0  # the chain step this line should be
    for i, line in enumerate(response.splitlines()):
        m = _EQ_RE.search(line)
        if m is None:
            continue
        a, sym, b, c = _number(m.group(1)), _SYMBOLS[m.group(2)], _number(m.group(3)), _number(m.group(4))
        fn = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y}[sym]
        arith = None not in (a, b, c) and abs(fn(a, b) - c) < 1e-9
        chain = False
        if k < len(p.ops):
            kind, operand = p.ops[k]
            chain = a == prev and OPS[kind][0] == sym and b == operand
        out.append(StepCheck(i, line.strip(), arith, chain))
        prev = c
        k += 1
    return out


def judge(prompt: Prompt | str, response: str, finished: bool = True) -> Judgement:
    p = problem_of(prompt)
    stated = final_answer(response)
    steps = check_steps(prompt, response)
    right = sum(s.ok for s in steps)
    details = {"answer": p.answer, "stated": stated, "finished": finished, "steps": len(steps),
               "steps_right": right}
    if not finished:
        return Judgement(0.0, False, {**details, "reason": "cut by max_new_tokens"})
    if stated is None:
        return Judgement(0.1, False, {**details, "reason": "no answer"})
    if stated != p.answer:
        share = right / max(len(p.ops), len(steps)) if steps else 0.0
        return Judgement(0.2 + 0.3 * share, False, {**details, "reason": "wrong answer"})
    return Judgement(1.0, True, {**details, "reason": "ok"})


def step_score(prompt: Prompt | str, response: str) -> float:
    """+1 when every equation line so far is right and on the chain, −1 when one is not, 0 when there is
    none yet (the optional step-check term of MCTS-DPO's node value, ``mcts_step_check_weight``)."""
    steps = check_steps(prompt, response)
    if not steps:
        return 0.0
    return 1.0 if all(s.ok for s in steps) else -1.0


TASK = register(
    Task(
        name="arithmetic",
        description="Apply a chain of 2 operations to a start number, one step per line, then 'Answer: N'.",
        train_prompts=train_prompts,
        heldout_prompts=heldout_prompts,
        judge=judge,
        topics=TOPICS,
        constraint=problem_of,
        solution=solution_of,
        step_score=step_score,
        max_new_tokens=64,
    )
)
