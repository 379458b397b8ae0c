"""The ``code`` task (tasks/code.py): split, problems, and the judge on crafted answers (run in the sandbox)."""

from __future__ import annotations

import pytest

from preftune.tasks import code as c
from preftune.tasks import get_task
from preftune.tasks.sandbox import Limits, Sandbox

TASK = get_task("code")
P = c.make_prompt(c._by_name()["shift_scale_3"])  # x plus 3, then multiplied by 3; tests x = 0, 1, 5, -3, 12


@pytest.fixture(autouse=True)
def quick_sandbox(monkeypatch):
    """A short wall time, so the infinite-loop answer costs ~3 s, not ~12 s."""
    box = Sandbox(Limits(wall_seconds=0.5, memory_bytes=512 << 20), workers=2)
    monkeypatch.setattr(c, "_sandbox", lambda: box)


def fenced(code: str) -> str:
    return f"Here you go:\n```python\n{code}\n```\nIt adds 3 and multiplies."


@pytest.mark.parametrize("response, finished, score, reason", [
    (fenced("def shift_scale_3(x):\n    return (x + 3) * 3"), True, 1.0, "ok"),
    ("```py\ndef shift_scale_3(x):\n    y = x + 3\n    return 3 * y\n```", True, 1.0, "ok"),
    ("```\ndef shift_scale_3(x):\n    return 3 * (x + 3)\n```", True, 1.0, "ok"),  # a bare fence counts
    # operator precedence: x + 9 is right only where x + 9 == 3x + 9, i.e. x = 0
    (fenced("def shift_scale_3(x):\n    return x + 3 * 3"), True, 1 / 5, "1/5 tests passed"),
    # right for x >= 0 only (4 of the 5 inputs)
    (fenced("def shift_scale_3(x):\n    return (abs(x) + 3) * 3"), True, 4 / 5, "4/5 tests passed"),
    (fenced("def shift_scale_3(x):\n    return 'nine'"), True, 0.0, "0/5 tests passed"),
    (fenced("def shift_scale_3(x):\n    while True:\n        pass"), True, 0.0, "0/5 tests passed"),
    (fenced("def shift_scale_3(x)\n    return (x + 3) * 3"), True, 0.0, "syntax error"),
    (fenced("def add_then_triple(x):\n    return (x + 3) * 3"), True, 0.0, "no function of that name"),
    ("def shift_scale_3(x):\n    return (x + 3) * 3", True, 0.0, "no code block"),
    ("```python\ndef shift_scale_3(x):\n    return (x + 3) * 3", True, 0.0, "no code block"),  # never closed
    (fenced("def shift_scale_3(x):\n    return (x + 3) * 3"), False, 0.0, "cut by max_new_tokens"),
    ("   \n", True, 0.0, "empty"),
])
def test_judge_on_crafted_answers(response, finished, score, reason):
    j = TASK.judge(P, response, finished)
    assert j.score == pytest.approx(score, abs=1e-12)
    assert j.details["reason"] == reason
    assert j.success is (score == 1.0)


def test_code_cannot_fake_a_pass():
    """An answer that exits early, or rewrites the test outcome, passes nothing."""
    early = fenced("import sys\ndef shift_scale_3(x):\n    return 0\nsys.exit(0)")
    assert TASK.judge(P, early).score == 0.0
    hush = fenced("import os\ndef shift_scale_3(x):\n    return 0\nos._exit(0)")
    assert TASK.judge(P, hush).score == 0.0


def test_split_and_problems():
    train, held = TASK.train_prompts(), TASK.heldout_prompts()
    assert (len(train), len(held)) == (64, 32)
    train_topics = {TASK.topic_of(p) for p in train}
    held_topics = {TASK.topic_of(p) for p in held}
    assert held_topics == set(c.HELDOUT_FAMILIES) and not train_topics & held_topics
    assert None not in train_topics
    assert len({c.problem_of(p).name for p in train + held}) == 96
    assert train == TASK.train_prompts()  # deterministic
    # the hidden tests: five per problem, expected values from the reference
    p = c.problem_of(P)
    assert p.tests[3] == "assert shift_scale_3(-3) == 0"
    assert "```python" in P[0]["content"] and "`shift_scale_3(x)`" in P[0]["content"]


def test_every_reference_passes_its_tests():
    box = Sandbox(Limits(wall_seconds=5.0), workers=2)
    src = [q.reference + "\n" + "\n".join(q.tests) + "\n" for q in c.problems()]
    assert [r.status for r in box.run_many(src)] == ["passed"] * 96


def test_extraction_helpers():
    assert c.extract_code("x\n```text\nno\n```\n```python\nyes\n```") == "yes\n"
    assert c.extract_code("no block") is None
    block = "def f(x):\n    return x\nassert f(1) == 1\n    assert nested\nprint(f(2))\nassert f(2) == 2"
    assert c.assert_lines(block) == "assert f(1) == 1\nassert f(2) == 2"
    tp = c.tests_prompt(c.problem_of(P))[0]["content"]
    assert "assert" in tp and "`shift_scale_3(x)`" in tp
