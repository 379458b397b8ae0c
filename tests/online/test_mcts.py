"""MCTS-DPO (online/mcts.py) and its step-checkable task (tasks/arithmetic.py): the judge and the step checker
on hand-written answers, the search on a deterministic toy (selection, backup, visits, pairs, exactly), and
the loop through the CLI (2 iterations, resume after a kill between phases)."""

import json
import math

import pytest
from typer.testing import CliRunner

from preftune.cli import app
from preftune.online.mcts import MCTS, Candidate, Node, SearchSettings, step_pairs, tree_from_rows, tree_to_rows
from preftune.tasks import get_task
from preftune.tasks.arithmetic import check_steps, final_answer, solution_of
from preftune.testing import online_run_killed_after

TASK = get_task("arithmetic")
TWO = [{"role": "user", "content": "What is 7 + 5, then multiply by 2? Write each step as an equation on its own "
        "line, then `Answer: N` on the next."}]


# ---------------------------------------------------------------------------------------------- the task


def test_judge_and_step_checker_on_hand_written_answers():
    right = "7 + 5 = 12\n12 * 2 = 24\nAnswer: 24"
    assert solution_of(TWO) == right
    j = TASK.judge(TWO, right)
    assert j.success and j.score == 1.0 and j.details["steps_right"] == 2
    # a wrong step, a right final answer: success is the final answer's
    wrong_step = "7 + 5 = 13\n12 * 2 = 24\nAnswer: 24"
    assert TASK.judge(TWO, wrong_step).success
    assert [(s.arithmetic, s.chain) for s in check_steps(TWO, wrong_step)] == [(False, True), (True, False)]
    assert TASK.step_score(TWO, wrong_step) == -1.0 and TASK.step_score(TWO, "7 + 5 = 12\n") == 1.0
    assert TASK.step_score(TWO, "Let me think.") == 0.0
    # a wrong final answer: a failure, ordered by its right steps
    j = TASK.judge(TWO, "7 + 5 = 12\n12 * 2 = 25\nAnswer: 25")
    assert not j.success and j.score == pytest.approx(0.2 + 0.3 * 0.5)
    # malformed: no number, disagreeing answers, cut by max_new_tokens
    assert TASK.judge(TWO, "I do not know.").score == 0.1
    assert final_answer("Answer: 24\nAnswer: 25") is None
    assert not TASK.judge(TWO, right, finished=False).success
    # robust readings of the answer
    for text in ("**Answer:** 24", "The answer is 24.", "Answer = 24", "answer: 24.0", "12 * 2 = 24"):
        assert final_answer(text) == 24, text
    assert final_answer("Answer: 1,024") == 1024
    assert [s.ok for s in check_steps(TWO, "7 + 5 = 12\n12 × 2 = 24")] == [True, True]


def test_heldout_prompts_start_from_numbers_no_training_prompt_starts_from():
    train = {TASK.topic_of(p) for p in TASK.train_prompts()}
    held = {TASK.topic_of(p) for p in TASK.heldout_prompts()}
    assert None not in train | held and not train & held and len(TASK.heldout_prompts()) == 64
    for p in TASK.heldout_prompts()[:8]:
        assert TASK.judge(p, solution_of(p)).success


# ---------------------------------------------------------------------------------------------- the search


class ToyEnv:
    """Children by the path of step ids: ``table[path] = [(ids, value, terminal), …]``; priors uniform."""

    def __init__(self, table):
        self.table, self.calls = table, 0

    def expand(self, node):
        self.calls += 1
        key = tuple(tuple(n.ids) for n in node.path()[1:])
        return [Candidate(list(ids), str(ids), [], v, term, term) for ids, v, term in self.table[key]]


def test_two_simulations_select_backup_and_visit_exactly():
    env = ToyEnv({(): [((1, 2), 0.5, True), ((1, 3), -1.0, True)]})
    mcts = MCTS(env, SearchSettings(simulations=2, depth=1, root_factor=1))
    root = Node([])
    mcts.search(root)
    a, b = root.children
    # sim 1: expand the root; PUCT picks A (0.5 + 1·√1/1 > −1 + 1); backup V = (0.5 − 1)/2
    # sim 2: A again (0.5 + √3/2 > −1 + √3); A.N = 2, V = (2·0.5 − 1)/3 = 0; the root counts 2 per simulation
    assert env.calls == 1
    assert (a.N, b.N, root.N) == (2, 0, 4)
    assert a.Q == 0.5 and b.Q == -1.0 and root.V == pytest.approx(0.0)
    assert mcts.choose(root) == 0 and (a.pi, b.pi) == (1.0, 0.0)


def test_backup_through_a_non_terminal_step():
    env = ToyEnv({(): [((4,), 0.2, False)], ((4,),): [((5,), 1.2, True), ((6,), -0.8, True)]})
    mcts = MCTS(env, SearchSettings(simulations=1, depth=2, root_factor=1))
    root = Node([])
    mcts.search(root)
    (x,) = root.children
    x1, x2 = x.children
    assert (x1.Q, x2.Q) == (pytest.approx(1.0), pytest.approx(-1.0))  # Q = V_parent + (v − v_parent)
    assert (x1.N, x2.N, x.N, root.N) == (1, 0, 1, 2)
    assert x.V == pytest.approx(0.0)  # (1·1.0 + 1·(−1.0)) / 2: unvisited children count once
    assert x.Q == pytest.approx(0.2) and root.V == pytest.approx(0.2)


def test_build_takes_the_most_visited_path_and_pairs_share_the_prefix():
    env = ToyEnv({(): [((1, 2), 0.5, False), ((1, 3), -0.5, False)],
                  ((1, 2),): [((7, 8), 1.5, True), ((9,), -1.5, True)],
                  ((1, 3),): [((7,), 0.0, True), ((8,), 0.0, True)]})
    root = MCTS(env, SearchSettings(simulations=3, depth=2, root_factor=1)).build(Node([]))
    assert root.selected == 0 and root.children[0].selected == 0
    pairs, stats = step_pairs(root, [100, 101])
    assert stats == {"skipped_identical": 0, "dropped_gap": 0, "depths": 2}
    p0, p1 = pairs
    # depth 0: the shared first token joins the prompt; depth 1: prompt + the taken step
    assert (p0.prompt_ids, p0.chosen_ids, p0.rejected_ids) == ([100, 101, 1], [2], [3])
    assert (p1.prompt_ids, p1.chosen_ids, p1.rejected_ids) == ([100, 101, 1, 2], [7, 8], [9])
    assert p0.q_w > p0.q_l and p1.q_w > p1.q_l
    # the tree survives a round trip through trees.jsonl
    again = tree_from_rows(json.loads(json.dumps(tree_to_rows(root))))
    assert step_pairs(again, [100, 101])[0] == pairs
    # a Q-gap threshold drops small gaps
    assert len(step_pairs(root, [100, 101], min_q_gap=2.5)[0]) == 1


def test_identical_candidates_are_skipped_and_counted():
    env = ToyEnv({(): [((1, 2), 1.0, True), ((1, 2), -1.0, True)]})
    root = MCTS(env, SearchSettings(simulations=2, depth=1, root_factor=1)).build(Node([]))
    pairs, stats = step_pairs(root, [0])
    assert pairs == [] and stats["skipped_identical"] == 1


def test_rejected_choice_lowest_or_second():
    env = ToyEnv({(): [((1,), 1.0, True), ((2,), -1.0, True), ((3,), 0.5, True)]})
    root = MCTS(env, SearchSettings(simulations=4, depth=1, root_factor=1)).build(Node([]))
    assert step_pairs(root, [0])[0][0].rejected_ids == [2]
    assert step_pairs(root, [0], rejected="second")[0][0].rejected_ids == [3]


# ---------------------------------------------------------------------------------------------- the loop

QUICK = ["--set", "prompts_per_iteration=3", "--set", "heldout_prompts=2", "--set", "heldout_samples=1",
         "--set", "max_new_tokens=10", "--set", "mcts_step_tokens=4", "--set", "batch_size=2", "--set",
         "learning_rate=1e-3", "--set", "max_length=128", "--set", "max_prompt_length=96", "--set", "progress=false",
         "--set", "plot=false", "--set", "mcts_simulations=2"]
TIME_KEYS = ("seconds", "gen_seconds", "judge_seconds", "train_seconds", "tokens/s", "step_time", "elapsed")


def _run(args):
    res = CliRunner().invoke(app, ["online", *args])
    assert res.exit_code == 0, res.output + (repr(res.exception) if res.exception else "")


def _rows(out):
    return [{k: v for k, v in json.loads(x).items() if not k.endswith(TIME_KEYS)}
            for x in (out / "iterations.jsonl").read_text().splitlines()]


ARGS = ["--algorithm", "mcts_dpo", "--model", "tiny", "--task", "arithmetic", "--iterations", "2", *QUICK]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mcts") / "run"
    _run([*ARGS, "--output", str(out)])
    return out


def test_two_iterations_through_the_cli(full_run):
    rows = _rows(full_run)
    assert [r["iter/t"] for r in rows] == [1, 2]
    for t, r in enumerate(rows, start=1):
        it = full_run / f"iter_{t:02d}"
        for f in ("trees.jsonl", "train_input.jsonl", "reference.safetensors", "policy.safetensors", "heldout.jsonl"):
            assert (it / f).exists(), f
        assert r["iter/pairs"] > 0 and r["train/steps"] > 0 and r["iter/tree_size_mean"] >= 2
        for k in ("iter/pairs_per_prompt", "iter/pairs_skipped_identical", "iter/self_evals"):
            assert k in r, k
        assert math.isfinite(r["eval/kl_ref"])
        pairs = [json.loads(x) for x in (it / "train_input.jsonl").read_text().splitlines()]
        assert all(p["chosen_ids"] != p["rejected_ids"] and p["chosen_ids"][0] != p["rejected_ids"][0]
                   for p in pairs)


@pytest.mark.parametrize("done", [("sample",), ("sample", "judge"), ("sample", "judge", "build", "train")])
def test_resume_after_kill_between_phases_gives_the_same_rows(tmp_path, full_run, done):
    cut = online_run_killed_after(full_run, tmp_path / "cut", done)
    _run([*ARGS, "--output", str(cut), "--resume"])
    assert _rows(cut) == _rows(full_run)
