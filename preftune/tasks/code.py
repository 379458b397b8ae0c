"""``code``: write one small Python function, answered in a ```python block; judged by hidden unit tests.

"Write a Python function `shift_scale_3(x)` that returns x plus 3, then multiplied by 3. Reply with only the code in
a ```python block."
Every problem has a hidden reference solution and five hidden tests (``assert f(args) == expected``, the
expected values computed from the reference). The judge never runs model code in this process: the code
and the tests run in the sandbox (``tasks/sandbox.py``).

Split: by problem family (twelve families of eight problems: 8 families = 64 training prompts, 4 families =
32 held-out prompts). A family is its function-name stem (``shift_scale_``), so a held-out prompt asks for a kind
of function no training prompt asks for; ``topics`` are the stems.

Judge (graded, METHODS.md §M10 / issue 14 item 7):
- cut by ``max_new_tokens``, empty, no ```python block (a bare ``` block counts), no function of the
  asked name in it, or code that does not compile: 0 (``reason`` says which);
- otherwise score = share of the hidden tests passed; success = all passed.
The tests first run together (one sandbox run: exit status 0 iff every assertion holds, which the code
cannot fake: ``os._exit`` is gone, ``sys.exit`` is a failure); only when that fails does each test run on
its own for the share. A test that times out (2 s wall [preftune]) fails.

Base success of SmolLM2-135M-Instruct on the held-out prompts: ``BASE_SUCCESS_NOTE``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from preftune.tasks.base import Judgement, Prompt, Task, prompt_text, register

BASE_SUCCESS_NOTE = (
    "held-out sampled 14/128 = 10.9% [6.6, 17.5] (Wilson 95%; 32 prompts x 4 at temperature 0.8 / top-p 0.95, 96 new "
    "tokens), greedy 10/32 = 31.2% [18.0, 48.6]; failures: 56 cut by 96 tokens (often after a right block, in the "
    "explanation), 38 0/5 tests; per family count_divisible_ 5/32, text_ 7/32, square_multiples_ 2/32, shift_scale_ "
    "0/32 (OMP_NUM_THREADS=1 python benchmarks/task_baselines.py --tasks code --prompts 32 --samples 4 --threads 1)"
)
TEST_SECONDS = 2.0  # wall time of one sandbox run of the hidden tests [preftune]


@dataclass(frozen=True)
class Problem:
    name: str  # the entry point
    params: str  # "x" / "xs" / "a, b"
    description: str  # "returns x plus 3."
    reference: str  # hidden reference solution (source)
    tests: tuple[str, ...]  # hidden tests: assert statements
    family: str

    @property
    def signature(self) -> str:
        return f"{self.name}({self.params})"

    # What code outside tasks/ (online/dstc.py) needs of a problem, reached through ``Task.constraint_of``.
    def tests_prompt(self, n: int = 3) -> Prompt:
        return tests_prompt(self, n)

    @staticmethod
    def extract_code(text: str) -> str | None:
        return extract_code(text)

    @staticmethod
    def assert_lines(code: str) -> str:
        return assert_lines(code)


@dataclass(frozen=True)
class Family:
    stem: str
    params: str
    # variant -> (name suffix, description, body expression of the reference, python function for expectations)
    variants: tuple[tuple[str, str, str, Callable], ...]
    inputs: tuple[tuple, ...]  # argument tuples of the five hidden tests


def _k_family(stem, params, describe, body, fn, ks, inputs) -> Family:
    return Family(stem, params, tuple((str(k), describe(k), body(k), fn(k)) for k in ks), inputs)


_NUMS = ((0,), (1,), (5,), (-3,), (12,))
_LISTS = (([3, 1, 4, 1, 5],), ([10],), ([-2, 7, 0, 9],), ([6, 6, 2],), ([8, -1, 3, 12, 5, 4],))
_LISTS2 = (([3, 1, 4, 1, 5],), ([10, -10],), ([-2, 7, 0, 9],), ([6, 6, 2],), ([8, -1, 3, 12, 5, 4],))
_STRS = (("banana",), ("never odd or even",), ("a",), ("racecar",), ("trees are tall",))
_INTS = ((0,), (7,), (12,), (45,), (-18,))
_PAIRS = ((3, 5), (10, 2), (-4, -4), (7, 0), (-6, 9))
_SENT = (("an apple",), ("the cat sat on the mat",), ("",), ("insertion",), ("state of the art",))

FAMILIES: tuple[Family, ...] = (
    # ---- training families (two steps each, or one step with a trap)
    _k_family("scale_shift_", "x", lambda k: f"returns x multiplied by {k}, then minus 1.", lambda k: f"x * {k} - 1",
              lambda k: lambda x: x * k - 1, range(2, 10), _NUMS),
    _k_family("repeat_", "s", lambda k: f"returns the string s repeated {k} times, separated by single spaces.",
              lambda k: f"' '.join([s] * {k})", lambda k: lambda s: " ".join([s] * k), range(2, 10),
              (("a",), ("ab",), ("",), ("xyz",), ("hi there",))),
    _k_family("power_", "x", lambda k: f"returns x raised to the power {k}, minus x.", lambda k: f"x ** {k} - x",
              lambda k: lambda x: x ** k - x, range(2, 10), ((0,), (1,), (2,), (-3,), (5,))),
    _k_family("count_words_", "s", lambda c: f"returns how many words of the string s start with the letter '{c}'.",
              lambda c: f"sum(w.startswith({c!r}) for w in s.split())",
              lambda c: lambda s: sum(w.startswith(c) for w in s.split()), "aeiostcr", _SENT),
    Family("list_", "xs", (
        ("spread", "returns the largest number in the list xs minus the smallest.", "max(xs) - min(xs)",
         lambda xs: max(xs) - min(xs)),
        ("even_sum", "returns the sum of the even numbers in the list xs.", "sum(x for x in xs if x % 2 == 0)",
         lambda xs: sum(x for x in xs if x % 2 == 0)),
        ("negatives", "returns how many numbers in the list xs are negative.", "sum(x < 0 for x in xs)",
         lambda xs: sum(x < 0 for x in xs)),
        ("second", "returns the second largest number in the list xs, repeats counted ([6, 6, 2] gives 6).",
         "sorted(xs)[-2]", lambda xs: sorted(xs)[-2]),
        ("ends_sum", "returns the first item of the list xs plus its last item.", "xs[0] + xs[-1]",
         lambda xs: xs[0] + xs[-1]),
        ("doubled", "returns a new list with every number of the list xs doubled.", "[2 * x for x in xs]",
         lambda xs: [2 * x for x in xs]),
        ("odd_count", "returns how many numbers in the list xs are odd.", "sum(x % 2 for x in xs)",
         lambda xs: sum(x % 2 for x in xs)),
        ("square_sum", "returns the sum of the squares of the numbers in the list xs.", "sum(x * x for x in xs)",
         lambda xs: sum(x * x for x in xs)),
    ), _LISTS2),
    _k_family("sum_above_", "xs", lambda k: f"returns the sum of the numbers in the list xs that are greater than {k}.",
              lambda k: f"sum(x for x in xs if x > {k})", lambda k: lambda xs: sum(x for x in xs if x > k),
              range(0, 8), _LISTS),
    _k_family("starts_ends_", "s",
              lambda p: f"returns True if the string s starts and ends with '{p}', and False otherwise.",
              lambda p: f"s.startswith({p!r}) and s.endswith({p!r})",
              lambda p: lambda s: s.startswith(p) and s.endswith(p), ("a", "t", "n", "s", "e", "i", "o", "r"),
              _SENT),
    Family("pair_", "a, b", (
        ("max_double", "returns the larger of the numbers a and b, multiplied by 2.", "2 * max(a, b)",
         lambda a, b: 2 * max(a, b)),
        ("min_square", "returns the square of the smaller of the numbers a and b.", "min(a, b) ** 2",
         lambda a, b: min(a, b) ** 2),
        ("sum_square", "returns the square of the sum of a and b.", "(a + b) ** 2", lambda a, b: (a + b) ** 2),
        ("diff_abs", "returns the absolute value of a minus b.", "abs(a - b)", lambda a, b: abs(a - b)),
        ("mean", "returns the average of a and b.", "(a + b) / 2", lambda a, b: (a + b) / 2),
        ("same_sign", "returns True if a and b are both positive or both negative, and False otherwise.",
         "(a > 0 and b > 0) or (a < 0 and b < 0)", lambda a, b: (a > 0 and b > 0) or (a < 0 and b < 0)),
        ("between", "returns the list of the integers from a to b, both included (an empty list when a > b).",
         "list(range(a, b + 1))", lambda a, b: list(range(a, b + 1))),
        ("square_sum", "returns the sum of the squares of a and b.", "a * a + b * b", lambda a, b: a * a + b * b),
    ), _PAIRS),
    # ---- held-out families
    _k_family("shift_scale_", "x", lambda k: f"returns x plus {k}, then multiplied by 3.", lambda k: f"(x + {k}) * 3",
              lambda k: lambda x: (x + k) * 3, range(1, 9), _NUMS),
    Family("text_", "s", (
        ("shout", "returns the string s reversed and in upper case.", "s[::-1].upper()", lambda s: s[::-1].upper()),
        ("vowels", "returns how many vowels (a, e, i, o, u, lower case) the string s has.",
         "sum(c in 'aeiou' for c in s)", lambda s: sum(c in "aeiou" for c in s)),
        ("ends", "returns the first and the last character of the string s, joined.", "s[0] + s[-1]",
         lambda s: s[0] + s[-1]),
        ("nospace", "returns the string s with every space removed.", "s.replace(' ', '')",
         lambda s: s.replace(" ", "")),
        ("words_back", "returns the words of the string s in reverse order, joined by single spaces.",
         "' '.join(s.split()[::-1])", lambda s: " ".join(s.split()[::-1])),
        ("palindrome", "returns True if the string s reads the same forwards and backwards, and False otherwise.",
         "s == s[::-1]", lambda s: s == s[::-1]),
        ("longest", "returns the longest word of the string s (the first one when several are as long).",
         "max(s.split(), key=len)", lambda s: max(s.split(), key=len)),
        ("word_count", "returns how many words the string s has.", "len(s.split())", lambda s: len(s.split())),
    ), _STRS),
    _k_family("count_divisible_", "xs", lambda k: f"returns how many numbers in the list xs are divisible by {k}.",
              lambda k: f"sum(x % {k} == 0 for x in xs)", lambda k: lambda xs: sum(x % k == 0 for x in xs),
              range(2, 10), _LISTS),
    _k_family("square_multiples_", "xs",
              lambda k: f"returns a list of the squares of the numbers in the list xs that are divisible by {k}, "
              "in the same order.", lambda k: f"[x * x for x in xs if x % {k} == 0]",
              lambda k: lambda xs: [x * x for x in xs if x % k == 0], range(2, 10), _LISTS),
)
HELDOUT_FAMILIES = ("shift_scale_", "text_", "count_divisible_", "square_multiples_")
TOPICS = tuple(f.stem for f in FAMILIES)


def _problem(fam: Family, suffix: str, description: str, body: str, fn: Callable) -> Problem:
    name = f"{fam.stem}{suffix}"
    reference = f"def {name}({fam.params}):\n    return {body}\n"
    tests = tuple(f"assert {name}({', '.join(map(repr, args))}) == {fn(*args)!r}" for args in fam.inputs)
    return Problem(name, fam.params, description, reference, tests, fam.stem)


@lru_cache(maxsize=1)
def problems() -> tuple[Problem, ...]:
    return tuple(_problem(f, *v) for f in FAMILIES for v in f.variants)


@lru_cache(maxsize=1)
def _by_name() -> dict[str, Problem]:
    return {p.name: p for p in problems()}


def make_prompt(p: Problem) -> Prompt:
    return [{"role": "user", "content": f"Write a Python function `{p.signature}` that {p.description} "
                                        "Reply with only the code in a ```python block."}]


def tests_prompt(p: Problem, n: int = 3) -> Prompt:
    """The test-writing prompt of DSTC (online/dstc.py): the same function, asked for assertions."""
    return [{"role": "user", "content": f"A Python function `{p.signature}` {p.description} Write {n} assert "
                                        f"statements that test `{p.name}`. Reply with only the asserts in a "
                                        "```python block."}]


def train_prompts() -> list[Prompt]:
    """64 prompts: the 8 training families × 8 problems."""
    return [make_prompt(p) for p in problems() if p.family not in HELDOUT_FAMILIES]


def heldout_prompts() -> list[Prompt]:
    """32 prompts of the 4 held-out families (no training prompt asks for that kind of function)."""
    return [make_prompt(p) for p in problems() if p.family in HELDOUT_FAMILIES]


_NAME_RE = re.compile(r"`([A-Za-z_]\w*)\(")


def problem_of(prompt: Prompt | str) -> Problem:
    m = _NAME_RE.search(prompt_text(prompt))
    if m is None or m.group(1) not in _by_name():
        raise ValueError("code judge: the prompt names no known function (`name(...)`)")
    return _by_name()[m.group(1)]


# ---------------------------------------------------------------------------------------------- parsing

_PY = ("python", "python3", "py")


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language tag, body) of every closed ``` fence, in order; a fence opens and closes on its own line."""
    out, lang, body = [], None, []
    for line in text.splitlines():
        s = line.strip()
        if lang is None and s.startswith("```"):
            lang, body = s[3:].strip().lower(), []
        elif lang is not None and s.startswith("```"):
            out.append((lang, "\n".join(body) + "\n"))
            lang = None
        elif lang is not None:
            body.append(line)
    return out


def extract_code(text: str) -> str | None:
    """The first ```python (or ```py, or bare ```) block of a response; None when there is no closed block."""
    blocks = code_blocks(text)
    for lang, body in blocks:  # a python-tagged block first, else the first bare one
        if lang in _PY:
            return body
    return next((body for lang, body in blocks if not lang), None)


def assert_lines(code: str) -> str:
    """The top-level ``assert`` statements of a test block (a test that redefines the function under test would
    test itself, so everything else is dropped) [preftune]."""
    return "\n".join(line for line in code.splitlines() if line.startswith("assert "))


# ---------------------------------------------------------------------------------------------- judging


@lru_cache(maxsize=1)
def _sandbox():
    from preftune.tasks.sandbox import Limits, Sandbox

    return Sandbox(Limits(wall_seconds=TEST_SECONDS, memory_bytes=512 << 20))


def run_tests(code: str, tests: tuple[str, ...] | list[str], sandbox=None) -> list[bool]:
    """Which tests the code passes: all together first (one run), one by one only when that fails."""
    box = sandbox or _sandbox()
    if not tests:
        return []
    if box.run(code + "\n\n" + "\n".join(tests) + "\n").passed:
        return [True] * len(tests)
    if len(tests) == 1:
        return [False]
    return [r.passed for r in box.run_many([code + "\n\n" + t + "\n" for t in tests])]


def judge(prompt: Prompt | str, response: str, finished: bool = True) -> Judgement:
    p = problem_of(prompt)
    details = {"function": p.name, "finished": finished, "tests": len(p.tests)}
    if not finished:
        return Judgement(0.0, False, {**details, "reason": "cut by max_new_tokens"})
    if not response.strip():
        return Judgement(0.0, False, {**details, "reason": "empty"})
    code = extract_code(response)
    if code is None:
        return Judgement(0.0, False, {**details, "reason": "no code block"})
    if not re.search(rf"^\s*def\s+{re.escape(p.name)}\s*\(", code, re.MULTILINE):
        return Judgement(0.0, False, {**details, "reason": "no function of that name"})
    try:
        compile(code, "<answer>", "exec")  # compiling runs nothing
    except (SyntaxError, ValueError):
        return Judgement(0.0, False, {**details, "reason": "syntax error"})
    passed = run_tests(code, p.tests)
    n = sum(passed)
    reason = "ok" if n == len(p.tests) else f"{n}/{len(p.tests)} tests passed"
    return Judgement(n / len(p.tests), n == len(p.tests), {**details, "passed": n, "reason": reason})


TASK = register(
    Task(
        name="code",
        description="Write one small Python function in a ```python block; hidden unit tests run in a sandbox.",
        train_prompts=train_prompts,
        heldout_prompts=heldout_prompts,
        judge=judge,
        topics=TOPICS,
        constraint=problem_of,  # the hidden reference and tests stay with the judge: no ``solution`` hint
        max_new_tokens=96,
    )
)
