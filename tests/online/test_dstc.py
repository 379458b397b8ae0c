"""DSTC (online/dstc.py, METHODS.md §M10): minimax selection on constructed pass matrices, the pass matrix of
real code in the sandbox, and the loop through the CLI (a tiny random model: no usable code, no pairs, reported;
then the same run with crafted samples so that pairs are built and trained)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from preftune.cli import app
from preftune.online.dstc import SKIP_REASONS, concatenate, pass_matrix, select
from preftune.tasks.sandbox import Limits, Sandbox

# ---------------------------------------------------------------------------------------------- selection


def test_golden_matrix_of_methods_m10d():
    """Rows c_0 (1,1,0), c_1 (1,1,1), c_2 (0,1,0), c_3 (0,0,0): p = (2,3,1,0), q = (2,3,1);
    chosen = (code 1, test 2), rejected = (code 3, test 1)."""
    s = select([[1, 1, 0], [1, 1, 1], [0, 1, 0], [0, 0, 0]])
    assert (s.p, s.q) == ((2, 3, 1, 0), (2, 3, 1))
    assert (s.w, s.tw, s.l, s.tl) == (1, 2, 3, 1) and s.ok


def test_ties_go_to_the_lowest_index():
    # codes 0 and 1 both pass 2 tests; 2 and 3 both pass 0; tests 0 and 1 are passed by 2 codes each
    s = select([[1, 1], [1, 1], [0, 0], [0, 0]])
    assert (s.w, s.tw, s.l, s.tl) == (0, 0, 2, 0)


def test_strictest_passed_and_most_passed_failed_test():
    B = [[1, 0, 1, 1],   # p = 3: passes tests 0, 2, 3 whose q are 3, 1, 2 -> strictest passed: test 2
         [1, 0, 0, 1],   # p = 2
         [1, 1, 0, 0]]   # p = 2 ... rejected = argmin p, lowest index = code 1; it fails tests 1, 2 (q 1, 1) -> 1
    s = select(B)
    assert s.q == (3, 1, 1, 2)
    assert (s.w, s.tw, s.l, s.tl) == (0, 2, 1, 1)


@pytest.mark.parametrize("B, valid_codes, valid_tests, codes, reason", [
    ([[1, 1], [1, 1]], None, None, None, "no pass-count gap"),
    ([[0, 0], [0, 0]], None, None, None, "no pass-count gap"),
    ([[1, 0], [0, 0]], [True, False], None, None, "fewer than 2 valid codes"),
    ([[1, 0], [0, 0]], None, [False, False], None, "no valid test"),
    ([[1, 1], [0, 0]], None, None, ["def f(): return 1\n", "def f(): return 1   \n"], "identical codes"),
])
def test_skips(B, valid_codes, valid_tests, codes, reason):
    s = select(B, valid_codes, valid_tests, codes)
    assert not s.ok and s.skipped == reason and reason in SKIP_REASONS


def test_invalid_rows_and_columns_are_never_selected():
    # code 2 is invalid (its zeros must not make it the rejected one); test 0 is invalid (its ones do not count)
    B = [[1, 1, 1], [1, 0, 1], [0, 0, 0]]
    s = select(B, [True, True, False], [False, True, True])
    assert s.p == (2, 1, 0) and s.q == (0, 1, 2)
    assert (s.w, s.tw, s.l, s.tl) == (0, 1, 1, 1)


def test_pass_matrix_in_the_sandbox_and_concatenation():
    codes = ["def f(x):\n    return x + 1\n", "def f(x):\n    return x - 1\n", None,
             "def f(x):\n    while True:\n        pass\n"]
    tests = ["assert f(1) == 2", "assert f(0) == 1\nassert f(5) == 6", "assert f(2) == 1", None]
    B, statuses = pass_matrix(codes, tests, Sandbox(Limits(wall_seconds=0.5), workers=2))
    assert B == [[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert statuses == {"passed": 3, "failed": 3, "timeout": 3}  # 3 valid codes × 3 valid tests
    s = select(B, [c is not None for c in codes], [t is not None for t in tests], codes)
    assert (s.w, s.tw, s.l, s.tl) == (0, 0, 3, 0)
    assert concatenate(codes[0], tests[0]) == "```python\ndef f(x):\n    return x + 1\n\nassert f(1) == 2\n```"


# ---------------------------------------------------------------------------------------------- the loop

QUICK = ["--model", "tiny", "--task", "code", "--iterations", "2", "--set", "prompts_per_iteration=3",
         "--set", "heldout_prompts=2", "--set", "heldout_samples=1", "--set", "max_new_tokens=8", "--set", "k=2",
         "--set", "batch_size=2", "--set", "learning_rate=1e-3", "--set", "max_length=400",
         "--set", "max_prompt_length=200", "--set", "progress=false", "--set", "plot=false",
         "--set", "dstc_seconds=1.0", "--set", "greedy_eval=false"]


def _run(args):
    res = CliRunner().invoke(app, ["online", "--algorithm", "dstc", *QUICK, *args])
    assert res.exit_code == 0, res.output + (repr(res.exception) if res.exception else "")
    return res.output


def _rows(out):
    return [json.loads(x) for x in (out / "iterations.jsonl").read_text().splitlines()]


def test_tiny_random_model_runs_and_reports_no_pairs(tmp_path):
    out = tmp_path / "run"
    log = _run(["--output", str(out)])
    rows = _rows(out)
    assert [r["iter/t"] for r in rows] == [1, 2]
    for t, r in enumerate(rows, start=1):
        it = out / f"iter_{t:02d}"
        for f in ("samples.jsonl", "test_samples.jsonl", "pass_matrix.jsonl", "train_input.jsonl",
                  "policy.safetensors", "heldout.jsonl"):
            assert (it / f).exists(), f
        assert r["iter/pairs"] == 0 and r["train/skipped"] == "no pairs"
        assert r["iter/prompts_without_pair"] == 3 and r["iter/skipped_fewer_than_2_valid_codes"] == 3
        matrices = [json.loads(x) for x in (it / "pass_matrix.jsonl").read_text().splitlines()]
        assert [(len(m["pass_matrix"]), len(m["pass_matrix"][0])) for m in matrices] == [(2, 2)] * 3  # K × M
        assert all(m["selected"]["skipped"] for m in matrices)
    assert "DSTC found no pair" in log


ARGS = {"x": "1", "s": "'ab'", "xs": "[1, 2]", "n": "4", "a, b": "1, 2"}


def test_crafted_samples_build_pairs_and_train(tmp_path, monkeypatch):
    """The sampler replaced by fixed answers per prompt: codes (the reference, one returning 'no') and tests
    (`!= 'no'`, `== 'never'`), so B = [[1, 0], [0, 0]]: chosen = (code 0, test 0); the rejected code fails both
    tests and the more widely passed one is test 0 (q = (1, 0)), so rejected = (code 1, test 0)."""
    from preftune.online import loop
    from preftune.online.generate import Generations, Sample, encode_prompts
    from preftune.tasks import code as task_code

    def fake_sample(self, prompts, n, seed, temperature, top_p, desc):
        tok = self.policy.tokenizer
        rows = []
        for p in prompts:
            text = p[-1]["content"]
            pr = task_code.problem_of(text)
            call = f"{pr.name}({ARGS[pr.params]})"
            if "assert statements" in text:  # the test-writing prompt
                answers = [f"```python\nassert {call} != 'no'\n```", f"```python\nassert {call} == 'never'\n```"]
            else:
                wrong = f"def {pr.name}({pr.params}):\n    return 'no'\n"
                answers = [f"```python\n{pr.reference}```", f"```python\n{wrong}```"]
            rows.append([Sample(a, tok(a, add_special_tokens=False)["input_ids"][:24] + [tok.eos_token_id], True)
                         for a in answers[:n]])
        return Generations(prompts, encode_prompts(tok, prompts), rows)

    monkeypatch.setattr(loop.OnlineRun, "sample", fake_sample)
    out = tmp_path / "run"
    _run(["--output", str(out), "--iterations", "1"])
    it = out / "iter_01"
    matrices = [json.loads(x) for x in (it / "pass_matrix.jsonl").read_text().splitlines()]
    assert [m["pass_matrix"] for m in matrices] == [[[1, 0], [0, 0]]] * 3
    pairs = [json.loads(x) for x in (it / "train_input.jsonl").read_text().splitlines()]
    assert len(pairs) == 3
    for p, m in zip(pairs, matrices, strict=True):
        sel = p["selected"]
        assert (sel["w"], sel["tw"], sel["l"], sel["tl"], sel["p"], sel["q"]) == (0, 0, 1, 0, [1, 0], [1, 0])
        assert p["chosen"] == concatenate(m["codes"][0], m["tests"][0])
        assert p["rejected"] == concatenate(m["codes"][1], m["tests"][0]) and "return 'no'" in p["rejected"]
        hidden = task_code.problem_of(f"`{m['function']}(").tests
        assert not any(h in p["chosen"] + p["rejected"] for h in hidden)  # the hidden tests build no pair
    row = _rows(out)[0]
    assert row["iter/pairs"] == 3 and row["train/steps"] > 0
    assert row["iter/chosen_hidden_success"] == 1.0 and row["iter/rejected_hidden_success"] == 0.0
    assert row["eval/success"] == 1.0  # held-out answers are the references too, judged by the hidden tests
