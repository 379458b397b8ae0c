"""LSC (METHODS.md §M9, LOSSES.md G5): the transform and its golden values, the quantile reference, the
combined judge's order against the hand-computed sum, best-of-K pairs on transformed scores, spec parsing."""

from __future__ import annotations

import math

import pytest

from preftune.online.build import build_pairs
from preftune.reward.judges import FunctionJudge, TaskJudge, make_judge
from preftune.reward.lsc import LSCJudge, lsc_combine, lsc_transform, parse_lsc_spec, quantile


def _table(values):
    """A judge scoring each response by a fixed table (response text → value)."""
    return FunctionJudge(lambda prompt, response: values[response], name="table")


def test_transform_hand_computed():
    # LOSSES.md Appendix A: log σ(1.2 − 0.4) = −log(1 + e^{−0.8})
    assert lsc_transform(1.2, 0.4) == pytest.approx(-0.371101, abs=1e-6)
    assert lsc_transform(1.2, 0.4) == pytest.approx(-math.log1p(math.exp(-0.8)), abs=1e-15)
    assert lsc_transform(-50.0, 0.0) == pytest.approx(-50.0, abs=1e-15)  # log σ(z) ≈ z far below 0, no overflow
    assert lsc_transform(800.0, 0.0) == 0.0  # and → 0 far above


def test_golden_values():
    # METHODS.md §M9(d): r_h^ref = 0.8, r_s^ref = 0
    u = lsc_combine([[1.2, -0.5], [0.4, 1.0], [2.5, -2.0]], [0.8, 0.0])
    assert u == pytest.approx([-1.487092, -1.226277, -2.294714], abs=1e-6)
    u_a, u_b = lsc_combine([[4.0, -2.0], [1.0, 0.5]], [0.8, 0.0])
    assert (u_a, u_b) == (pytest.approx(-2.166881, abs=1e-6), pytest.approx(-1.072216, abs=1e-6))
    assert 4.0 - 2.0 > 1.0 + 0.5 and u_b > u_a  # the raw sum prefers the one-sided A, LSC prefers B
    values = [0.1, 0.9, -0.3, 1.4, 0.5, 0.2, 1.1, 0.7]
    assert quantile(values, 0.85) == pytest.approx(1.09, abs=1e-12)  # linear interpolation, not "lower" (0.9)
    assert quantile(values, 0.0) == -0.3 and quantile(values, 1.0) == 1.4 and quantile([2.0], 0.85) == 2.0


def test_properties():
    refs = [0.3, -1.0]
    rows = [[x, y] for x in (-5.0, 0.0, 2.0, 9.0) for y in (-3.0, 0.5, 4.0)]
    u = lsc_combine(rows, refs)
    assert all(v <= 0 for v in u)
    assert lsc_combine([[60.0, 60.0]], refs)[0] == pytest.approx(0.0, abs=1e-20)
    # a common shift of r_k and r_k^ref leaves every u (so the ranking) unchanged
    shifted = lsc_combine([[a + 7.0, b - 2.0] for a, b in rows], [refs[0] + 7.0, refs[1] - 2.0])
    assert shifted == pytest.approx(u, abs=1e-12)
    # a probability component enters as log p, not re-centred; 0 is floored
    assert lsc_combine([[1.2, 0.5], [1.2, 0.0]], [0.8, None], floor=1e-3) == pytest.approx(
        [lsc_transform(1.2, 0.8) + math.log(0.5), lsc_transform(1.2, 0.8) + math.log(1e-3)])


def test_combined_judge_orders_responses_by_the_hand_computed_sum():
    helpful = {"a": 1.2, "b": 0.4, "c": 2.5, "A": 4.0, "B": 1.0}
    safe = {"a": -0.5, "b": 1.0, "c": -2.0, "A": -2.0, "B": 0.5}
    judge = LSCJudge([_table(helpful), _table(safe)], ref=[0.8, 0.0])
    u = judge.score("q", ["a", "b", "c"])
    assert u == pytest.approx([-1.487092, -1.226277, -2.294714], abs=1e-6)
    assert sorted(range(3), key=lambda i: -u[i]) == [1, 0, 2]
    # best-of-K pair construction on the transformed scores: chosen = argmax u, rejected = argmin u
    pairs = build_pairs("max_min", u)
    assert [(p.w, p.l) for p in pairs] == [(1, 2)] and pairs[0].margin == pytest.approx(-1.226277 + 2.294714, abs=1e-6)
    # the one-sided pair: raw sums would choose A over B; LSC chooses B, and P(B ≻ A) = σ(u_B − u_A)
    u = judge.score("q", ["A", "B"])
    assert [(p.w, p.l) for p in build_pairs("max_min", u)] == [(1, 0)]
    assert judge.prefer("q", "B", "A") == pytest.approx(1 / (1 + math.exp(-(-1.072216 + 2.166881))), abs=1e-6)
    # ref=candidates: each reward's reference is its q-quantile over the responses judged together
    cand = LSCJudge([_table(helpful), _table(safe)], ref="candidates", q=0.5)
    u = cand.score("q", ["a", "b", "c"])
    assert u == pytest.approx(lsc_combine([[1.2, -0.5], [0.4, 1.0], [2.5, -2.0]], [1.2, -0.5]), abs=1e-12)


def test_task_component_is_a_probability_and_pi0_needs_references():
    task = TaskJudge("word_limit")
    prompt = [{"role": "user", "content": "What is special about tea? Answer in at most 10 words."}]
    good, bad = "Tea is calming and has many flavours.", " ".join(["word"] * 30) + "."
    rm = _table({good: 0.3, bad: 2.0})
    judge = LSCJudge([rm, task], ref="pi0", floor=1e-3)
    with pytest.raises(ValueError, match="no π_0 reference reward for this prompt"):
        judge.score(prompt, [good, bad])
    refs = judge.set_reference_from_samples(prompt, [good, bad, good, good])  # rewards 0.3, 2.0, 0.3, 0.3
    assert refs == [pytest.approx(quantile([0.3, 2.0, 0.3, 0.3], 0.85)), None]
    u, details = judge.score_details(prompt, [good, bad])
    s_good, s_bad = task.score(prompt, [good, bad])
    assert s_good == 1.0 and s_bad < 1.0
    want = [lsc_transform(0.3, refs[0]) + math.log(max(s_good, 1e-3)), lsc_transform(2.0, refs[0])
            + math.log(max(s_bad, 1e-3))]
    assert u == pytest.approx(want, abs=1e-12)
    assert details[0]["lsc"]["values"] == {"table": 0.3, "task:word_limit": 1.0}


def test_spec_parsing():
    comps, opts = parse_lsc_spec("lsc(rm:runs/a, task:word_limit, ref=0.8/0, q=0.9, m=8, floor=0.01)")
    assert comps == ["rm:runs/a", "task:word_limit"]
    assert opts == {"ref": [0.8, 0.0], "q": 0.9, "m": 8, "floor": 0.01}
    judge = make_judge("lsc(task:word_limit, task:two_sentences, ref=candidates)")
    assert isinstance(judge, LSCJudge) and judge.pointwise and judge.probability == [True, True]
    assert judge.name == "lsc(task:word_limit, task:two_sentences, ref=candidates)"
    with pytest.raises(ValueError, match="unknown lsc option 'k'"):
        make_judge("lsc(task:word_limit, k=3)")
    with pytest.raises(ValueError, match="at least one component"):
        make_judge("lsc(ref=candidates)")
    with pytest.raises(ValueError, match=r"ref has 1 constant\(s\) for 2 reward component\(s\)"):
        LSCJudge([_table({}), _table({})], ref=[0.5])
    with pytest.raises(ValueError, match="cannot be a component of another"):
        make_judge("lsc(lsc(task:word_limit), task:word_limit)")


def test_preftune_judge_file_with_an_lsc_spec(tmp_path):
    import json

    from preftune.reward.judges import judge_file

    src = tmp_path / "responses.jsonl"
    prompt = "What is special about tea? Answer in exactly two sentences, in at most 10 words."
    src.write_text(json.dumps({"prompt": prompt, "responses": {"x": "Tea is warm. It calms.", "y": "Tea."}}) + "\n")
    judge = make_judge("lsc(task:word_limit, task:two_sentences, ref=candidates)")
    rows = judge_file(src, tmp_path / "c.jsonl", judge)
    (row,) = rows
    sx = [TaskJudge(t).score(prompt, ["Tea is warm. It calms.", "Tea."]) for t in ("word_limit", "two_sentences")]
    u = [math.log(max(sx[0][i], 1e-3)) + math.log(max(sx[1][i], 1e-3)) for i in range(2)]
    assert (row["score_a"], row["score_b"]) == (pytest.approx(u[0]), pytest.approx(u[1]))
    assert row["winner"] == ("a" if u[0] > u[1] else "b" if u[1] > u[0] else "tie")
