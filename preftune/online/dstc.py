"""DSTC: preference pairs from the policy's own code and tests (METHODS.md §M10, arXiv 2411.13611).

Each iteration, for every training prompt x (a ``code`` task problem with a fixed entry point):

1. sample K code answers to x and M test answers to the test-writing prompt of the same problem
   (``tasks.code.tests_prompt``), from the current policy;
2. run every code against every test in the sandbox (``tasks/sandbox.py``): B_ij = 1 iff code i with test j
   appended exits 0 within the limits (a timeout, a crash, a blocked action are 0); the matrix is kept in
   ``pass_matrix.jsonl`` of the iteration folder (the record field ``meta.pass_matrix`` of METHODS.md §0);
3. minimax selection (``select``) of a chosen (code, test) and a rejected (code, test);
4. y_w = code⁺ ⊕ test⁺, y_l = code⁻ ⊕ test⁻ (``concatenate``: one ```python block, the code, a blank line,
   the asserts), the prompt being x; DPO from the current iterate.

Only the policy's own tests build pairs. The task's hidden tests judge the held-out evaluation, and on the
training samples they are *logged* (``hidden_success``, ``chosen_hidden_success``, ``rejected_hidden_success``:
how often the self-test selection picked a right code), never read by the selection.

[preftune] choices: a code is a candidate only when its answer has a closed code block defining the entry
point that compiles; a test is the top-level ``assert`` lines of its answer's block (a test that redefines the
function would test itself); invalid codes and tests are rows and columns of zeros and are never selected;
identical codes are never paired; ties go to the lowest index.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from preftune.online import store

SKIP_REASONS = ("fewer than 2 valid codes", "no valid test", "no pass-count gap", "no test the chosen code passes",
                "no test the rejected code fails", "identical codes")


@dataclass(frozen=True)
class Selection:
    """The chosen (code ``w``, test ``tw``) and the rejected (code ``l``, test ``tl``), or why there is none."""

    w: int | None = None
    tw: int | None = None
    l: int | None = None  # noqa: E741 (the loop's name for the rejected side)
    tl: int | None = None
    p: tuple[int, ...] = ()  # tests each code passes
    q: tuple[int, ...] = ()  # codes that pass each test
    skipped: str | None = None

    @property
    def ok(self) -> bool:
        return self.skipped is None


def select(B: list[list[int]], valid_codes: list[bool] | None = None, valid_tests: list[bool] | None = None,
           codes: list[str | None] | None = None) -> Selection:
    """Minimax selection on the pass matrix B (codes × tests) [UNVERIFIED — METHODS.md §M10(b)3's reading].

    p_i = Σ_j B_ij, q_j = Σ_i B_ij over valid codes and tests. Chosen code i⁺ = argmax p; chosen test
    j⁺ = argmin_{j: B_{i⁺j} = 1} q_j (the strictest test the best code passes); rejected code i⁻ = argmin p;
    rejected test j⁻ = argmax_{j: B_{i⁻j} = 0} q_j (the most widely passed test the worst code fails). Ties →
    lowest index. None when p_{i⁺} = p_{i⁻}, a needed set is empty, or the two codes are identical.
    """
    n = len(B)
    m = len(B[0]) if n else 0
    vc = valid_codes if valid_codes is not None else [True] * n
    vt = valid_tests if valid_tests is not None else [True] * m
    p = tuple(sum(B[i][j] for j in range(m) if vt[j]) if vc[i] else 0 for i in range(n))
    q = tuple(sum(B[i][j] for i in range(n) if vc[i]) if vt[j] else 0 for j in range(m))
    cand = [i for i in range(n) if vc[i]]
    tests = [j for j in range(m) if vt[j]]
    if len(cand) < 2:
        return Selection(p=p, q=q, skipped=SKIP_REASONS[0])
    if not tests:
        return Selection(p=p, q=q, skipped=SKIP_REASONS[1])
    w = min(cand, key=lambda i: (-p[i], i))
    lo = min(cand, key=lambda i: (p[i], i))
    if p[w] == p[lo]:
        return Selection(p=p, q=q, skipped=SKIP_REASONS[2])
    passed = [j for j in tests if B[w][j]]
    failed = [j for j in tests if not B[lo][j]]
    if not passed:
        return Selection(p=p, q=q, skipped=SKIP_REASONS[3])
    if not failed:
        return Selection(p=p, q=q, skipped=SKIP_REASONS[4])
    if codes is not None and _norm(codes[w]) == _norm(codes[lo]):
        return Selection(p=p, q=q, skipped=SKIP_REASONS[5])
    tw = min(passed, key=lambda j: (q[j], j))
    tl = min(failed, key=lambda j: (-q[j], j))
    return Selection(w, tw, lo, tl, p, q)


def _norm(code: str | None) -> str:
    return "\n".join(line.rstrip() for line in (code or "").strip().splitlines())


def concatenate(code: str, test: str) -> str:
    """One response: the code and its test in one ```python block [UNVERIFIED: the paper concatenates code and
    test; the exact layout (order, separator) is preftune's]."""
    return f"```python\n{code.strip()}\n\n{test.strip()}\n```"


def valid_code(code: str | None, name: str) -> bool:
    if not code or not re.search(rf"^\s*def\s+{re.escape(name)}\s*\(", code, re.MULTILINE):
        return False
    try:
        compile(code, "<code>", "exec")  # compiling runs nothing
    except (SyntaxError, ValueError):
        return False
    return True


def valid_test(test: str | None) -> bool:
    if not test:
        return False
    try:
        compile(test, "<test>", "exec")
    except (SyntaxError, ValueError):
        return False
    return True


def pass_matrix(codes: list[str | None], tests: list[str | None], sandbox) -> tuple[list[list[int]], dict]:
    """B_ij for every valid (code, test): one sandbox run of ``code + test`` each (cached by source); invalid
    rows and columns are 0 without a run. Also the count of each run status."""
    jobs = [(i, j) for i, c in enumerate(codes) if c is not None for j, t in enumerate(tests) if t is not None]
    results = sandbox.run_many([codes[i] + "\n\n" + tests[j] + "\n" for i, j in jobs])
    B = [[0] * len(tests) for _ in codes]
    statuses: dict[str, int] = {}
    for (i, j), r in zip(jobs, results, strict=True):
        B[i][j] = int(r.passed)
        statuses[r.status] = statuses.get(r.status, 0) + 1
    return B, statuses


# ---------------------------------------------------------------------------------------------- the loop's phases


def _sandbox(cfg):
    from preftune.tasks import Limits, Sandbox

    return Sandbox(Limits(wall_seconds=cfg.dstc_seconds, memory_bytes=512 << 20,
                          unsafe_local_exec=cfg.unsafe_local_exec), workers=cfg.dstc_workers)


def _extract(problem, text: str, finished: bool, kind: str) -> str | None:
    """The code (or the assert lines) of an answer; None when the answer is not usable."""
    if not finished:
        return None
    block = problem.extract_code(text)
    if kind == "code":
        return block if valid_code(block, problem.name) else None
    tests = problem.assert_lines(block or "")
    return tests if valid_test(tests) else None


def dstc_phases(run, it, t: int, done: set[str]) -> None:
    """Iteration t's ``sample`` (codes: samples.jsonl, tests: test_samples.jsonl), ``judge`` (the pass matrices:
    pass_matrix.jsonl) and ``build`` (train_input.jsonl with the pairs' ids, and reference log-probs)."""
    from preftune.data import Example
    from preftune.data.tokenize import tokenize_example
    from preftune.online.generate import generations_from_rows, generations_to_rows
    cfg = run.cfg
    prompts = run.prompts_for(t)
    problems = [run.task.constraint_of(p) for p in prompts]  # code task: tasks.code.Problem
    k, m = run.k, cfg.dstc_tests or run.k
    temp, top_p = cfg.resolved("temperature"), cfg.resolved("top_p")
    code_path, test_path = it.file("samples.jsonl"), it.file("test_samples.jsonl")
    if "sample" not in done:
        t0 = time.perf_counter()
        codes = run.sample(prompts, k, cfg.seed + 1000 * t, temp, top_p, f"iteration {t} code")
        tests = run.sample([pr.tests_prompt() for pr in problems], m, cfg.seed + 1000 * t + 500, temp,
                           top_p, f"iteration {t} tests")
        secs = time.perf_counter() - t0

        def write() -> None:
            store.write_jsonl(code_path, generations_to_rows(codes))
            store.write_jsonl(test_path, generations_to_rows(tests))
            toks = [s.num_tokens for g in (codes, tests) for row in g.samples for s in row]
            fin = [s.finished for g in (codes, tests) for row in g.samples for s in row]
            it.finish("sample", {"prompts": len(prompts), "gen_tokens": sum(toks), "gen_seconds": secs,
                                 "eos_rate": _mean(fin), "len_mean": _mean(toks), "codes": k, "tests": m})

        run.procs.on_main(write)
    if not run.procs.is_main:
        return
    codes = generations_from_rows(store.read_jsonl(code_path))
    tests = generations_from_rows(store.read_jsonl(test_path))
    matrix_path = it.file("pass_matrix.jsonl")
    if "judge" not in done:
        t0 = time.perf_counter()
        box = _sandbox(cfg)
        rows = []
        for i, (pr, crow, trow) in enumerate(zip(problems, codes.samples, tests.samples, strict=True)):
            cs = [_extract(pr, s.text, s.finished, "code") for s in crow]
            ts = [_extract(pr, s.text, s.finished, "test") for s in trow]
            B, statuses = pass_matrix(cs, ts, box)
            # logged only: the hidden tests never reach the selection below
            hidden = [run.task.judge(prompts[i], s.text, s.finished).success for s in crow]
            rows.append({"prompt": i, "function": pr.name, "codes": cs, "tests": ts, "pass_matrix": B,
                         "statuses": statuses, "hidden_success": hidden})
        store.write_jsonl(matrix_path, rows)
        p_share = [sum(r) / max(1, len(r)) for row in rows for r in row["pass_matrix"]]
        top = [max(sum(r) for r in row["pass_matrix"]) / max(1, m) for row in rows]
        it.finish("judge", {
            "judge_calls": box.runs, "judge_seconds": time.perf_counter() - t0, "score_mean": _mean(p_share),
            "score_top1": _mean(top),
            "valid_codes": _mean([c is not None for row in rows for c in row["codes"]]),
            "valid_tests": _mean([x is not None for row in rows for x in row["tests"]]),
            "success": _mean([h for row in rows for h in row["hidden_success"]]),
            **{f"runs_{k}": v for k, v in _sum_dicts([row["statuses"] for row in rows]).items()}})
    if "build" not in done:
        rows = store.read_jsonl(matrix_path)
        out, skipped = [], {}
        chosen_hidden, rejected_hidden = [], []
        for row in rows:
            cs, ts = row["codes"], row["tests"]
            sel = select(row["pass_matrix"], [c is not None for c in cs], [x is not None for x in ts], cs)
            row["selected"] = {"w": sel.w, "tw": sel.tw, "l": sel.l, "tl": sel.tl, "p": list(sel.p),
                               "q": list(sel.q), "skipped": sel.skipped}
            if not sel.ok:
                skipped[sel.skipped] = skipped.get(sel.skipped, 0) + 1
                continue
            prompt = prompts[row["prompt"]]
            y_w, y_l = concatenate(cs[sel.w], ts[sel.tw]), concatenate(cs[sel.l], ts[sel.tl])
            tok = tokenize_example(Example(prompt, [[{"role": "assistant", "content": y}] for y in (y_w, y_l)]),
                                   run.policy.tokenizer, max_length=cfg.max_length,
                                   max_prompt_length=cfg.max_prompt_length)
            chosen_hidden.append(row["hidden_success"][sel.w])
            rejected_hidden.append(row["hidden_success"][sel.l])
            out.append({"prompt": row["prompt"], "prompt_ids": tok.prompt_ids, "chosen_ids": tok.response_ids[0],
                        "rejected_ids": tok.response_ids[1], "chosen": y_w, "rejected": y_l,
                        "margin": (sel.p[sel.w] - sel.p[sel.l]) / max(1, m), "selected": row["selected"]})
        store.write_jsonl(it.file("pass_matrix.jsonl"), rows)  # now with each prompt's selection
        info = {"pairs": len(out), "prompts_without_pair": len(rows) - len(out),
                **{"skipped_" + k.replace(" ", "_"): v for k, v in skipped.items()},
                "train_hidden_success": it.info("judge").get("success"),
                "margin_mean": _mean([o["margin"] for o in out]),
                "len_chosen": _mean([len(o["chosen_ids"]) for o in out]),
                "len_rejected": _mean([len(o["rejected_ids"]) for o in out]),
                "chosen_hidden_success": _mean(chosen_hidden), "rejected_hidden_success": _mean(rejected_hidden)}
        if out:
            run._reference(it, t, run.examples(None, out), out)
        else:
            run.log(f"[online] iteration {t}: DSTC found no pair ({_reasons(skipped)}); training is skipped")
        store.write_jsonl(it.file("train_input.jsonl"), out)
        it.finish("build", info)


def _reasons(skipped: dict[str, int]) -> str:
    return ", ".join(f"{v} × {k}" for k, v in skipped.items()) or "no prompts"


def _sum_dicts(ds: list[dict]) -> dict:
    out: dict = {}
    for d in ds:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def _mean(xs) -> float | None:
    xs = [float(x) for x in xs]
    return sum(xs) / len(xs) if xs else None

