"""FSPO episodes (METHODS.md §M8): exact conditioned prompts, the query never in its context, users with too few
pairs, determinism, data errors, a 2-step `preftune train` on the output, and the per-user evaluation."""

import importlib.util
import json
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from preftune.cli import app
from preftune.data import DataError, load_and_validate
from preftune.data.fspo import (
    INSTRUCTION,
    FspoDataConfig,
    Shot,
    build_fspo_file,
    draw_shots,
    fspo_episodes,
    per_user_accuracy,
    render_context,
    split_users,
)

runner = CliRunner()


def _rows(users: dict[str, int]) -> list[dict]:
    """User u's i-th pair: prompt 'u-qi', chosen 'u-wi', rejected 'u-li' (text names its owner and index)."""
    return [{"prompt": f"{u}-q{i}", "chosen": f"{u}-w{i}", "rejected": f"{u}-l{i}", "user_id": u}
            for u, n in users.items() for i in range(n)]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _records(tmp_path, users):
    records, _ = load_and_validate(str(_write(tmp_path / "in.jsonl", _rows(users))), objective_shape="paired")
    return records


def test_render_context_exact_text():
    shots = [Shot("q1", "w1", "l1"), Shot([{"role": "user", "content": "q2"}], "w2", "l2")]
    assert render_context(shots) == (
        f"{INSTRUCTION}\n\n"
        "# Example 1\nQuestion: q1\nPreferred response: w1\nDispreferred response: l1\n\n"
        "# Example 2\nQuestion: q2\nPreferred response: w2\nDispreferred response: l2\n\n"
        "# New question\n")


def test_draw_shots_is_a_seeded_sample_of_the_other_pairs_in_random_order():
    pairs = [Shot(f"q{i}", f"w{i}", f"l{i}") for i in range(5)]
    got = draw_shots(pairs, 2, 3, seed=7, user="u")
    # the same generator by hand: seeded by (seed, user, query), sampling from the pool without the query
    want = random.Random("fspo-7-u-2").sample([pairs[i] for i in (0, 1, 3, 4)], 3)
    assert got == want and pairs[2] not in got
    # a duplicate of the query (same texts, another row) is never a shot either
    dup = [*pairs, Shot("q2", "w2", "l2")]
    for q in (2, 5):
        assert all(s.prompt != "q2" for s in draw_shots(dup, q, 5, seed=0, user="u"))


def test_episodes_exact_prompts_and_never_the_query(tmp_path):
    records = _records(tmp_path, {"a": 4, "b": 2, "c": 1})
    rows, stats = fspo_episodes(records, n_shots=2, seed=3)
    # c has no other pair: dropped (min_shots=1); b has one other pair: one shot; a: two of its three others
    assert stats == {"episodes": 6, "shots_used": {1: 2, 2: 4}, "dropped_users": ["c"]}
    assert [(r["user_id"], r["responses"]) for r in rows] == [
        ("a", ["a-w0", "a-l0"]), ("a", ["a-w1", "a-l1"]), ("a", ["a-w2", "a-l2"]), ("a", ["a-w3", "a-l3"]),
        ("b", ["b-w0", "b-l0"]), ("b", ["b-w1", "b-l1"])]
    assert all(r["pairs"] == [[0, 1]] for r in rows)
    for r in rows[:4]:
        q = int(r["responses"][0][-1])
        others = [i for i in range(4) if i != q]
        drawn = random.Random(f"fspo-3-a-{q}").sample(others, 2)
        blocks = "".join(f"# Example {k}\nQuestion: a-q{i}\nPreferred response: a-w{i}\n"
                         f"Dispreferred response: a-l{i}\n\n" for k, i in enumerate(drawn, 1))
        assert r["prompt"] == f"{INSTRUCTION}\n\n{blocks}# New question\na-q{q}"
        assert f"a-q{q}\nPreferred" not in r["prompt"]  # never its own pair
    assert rows[4]["prompt"] == (f"{INSTRUCTION}\n\n# Example 1\nQuestion: b-q1\nPreferred response: b-w1\n"
                                 "Dispreferred response: b-l1\n\n# New question\nb-q0")
    # min_shots=2 drops b too; min_shots=0 keeps c with no shots (the instruction and the question only)
    assert fspo_episodes(records, 2, 3, min_shots=2)[1]["dropped_users"] == ["b", "c"]
    rows0, _ = fspo_episodes(records, 2, 3, min_shots=0)
    assert rows0[-1]["prompt"] == f"{INSTRUCTION}\n\n# New question\nc-q0"


def test_conversation_prompt_gets_the_context_in_its_first_message(tmp_path):
    rows = [{"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"q{i}"}],
             "chosen": f"w{i}", "rejected": f"l{i}", "user_id": 5} for i in range(2)]
    records, _ = load_and_validate(str(_write(tmp_path / "c.jsonl", rows)), objective_shape="paired")
    out, _ = fspo_episodes(records, 1)
    assert out[0]["user_id"] == "5"
    assert out[0]["prompt"][1] == {"role": "user", "content": "q0"}
    assert out[0]["prompt"][0]["role"] == "system"
    assert out[0]["prompt"][0]["content"] == (
        f"{INSTRUCTION}\n\n# Example 1\nQuestion: system: be brief\nuser: q1\nPreferred response: w1\n"
        "Dispreferred response: l1\n\n# New question\nbe brief")


def test_deterministic_in_the_seed_and_independent_of_other_users(tmp_path):
    records = _records(tmp_path, {"a": 6, "b": 6})
    first, _ = fspo_episodes(records, 3, seed=1)
    assert fspo_episodes(records, 3, seed=1)[0] == first
    assert fspo_episodes(records, 3, seed=2)[0] != first
    only_a, _ = fspo_episodes(records, 3, seed=1, users=["a"])
    assert only_a == first[:6]


def test_split_users_is_seeded_and_disjoint():
    train, held = split_users(["u3", "u1", "u2", "u0"], 1, seed=0)
    want = random.Random("fspo-split-0").sample(["u0", "u1", "u2", "u3"], 1)
    assert held == want and sorted(train + held) == ["u0", "u1", "u2", "u3"]
    with pytest.raises(ValueError, match="no training user"):
        split_users(["a"], 1, 0)


def test_errors_name_file_line_and_field(tmp_path):
    rows = _rows({"a": 2})
    rows.insert(1, {"prompt": "x", "chosen": "y", "rejected": "z"})
    rows.append({"prompt": "x", "chosen": "y", "rejected": "z", "user_id": ""})
    path = _write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as e:
        build_fspo_file(FspoDataConfig(data=str(path), output=str(tmp_path / "o.jsonl")), log=lambda m: None)
    got = {(i.line, i.field) for i in e.value.issues}
    assert got == {(4, "user_id")}  # validation first: the blank id (line 4), nothing written
    assert not (tmp_path / "o.jsonl").exists()
    path = _write(tmp_path / "bad2.jsonl", rows[:3])
    with pytest.raises(DataError) as e:
        build_fspo_file(FspoDataConfig(data=str(path), output=str(tmp_path / "o.jsonl")), log=lambda m: None)
    assert [(i.source, i.line, i.field) for i in e.value.issues] == [(str(path), 2, "user_id")]
    assert "missing" in e.value.issues[0].message
    assert not (tmp_path / "o.jsonl").exists()


def test_cli_builds_train_and_held_out_files(tmp_path):
    src = _write(tmp_path / "in.jsonl", _rows({"a": 3, "b": 3, "c": 3}))
    out, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    args = ["data", "fspo", str(src), str(out), "--shots", "2", "--seed", "4", "--eval-users", "1",
            "--eval-output", str(held)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    train_rows = [json.loads(x) for x in out.read_text().splitlines()]
    held_rows = [json.loads(x) for x in held.read_text().splitlines()]
    held_user = split_users(["a", "b", "c"], 1, 4)[1]
    assert {r["user_id"] for r in held_rows} == set(held_user) and len(held_rows) == 3
    assert {r["user_id"] for r in train_rows} == {"a", "b", "c"} - set(held_user) and len(train_rows) == 6
    assert "shots used {2: 6}" in res.output
    first = out.read_bytes()
    assert runner.invoke(app, args).exit_code == 0 and out.read_bytes() == first  # deterministic


def test_two_step_train_on_the_builders_output(tmp_path, tiny_model_dir):
    from preftune.reward.synthetic import two_group_pairs

    src = _write(tmp_path / "groups.jsonl", two_group_pairs(n_prompts=3, users_per_group=1))
    out = tmp_path / "fspo.jsonl"
    assert runner.invoke(app, ["data", "fspo", str(src), str(out), "--shots", "2"]).exit_code == 0
    args = ["train", "--model", str(tiny_model_dir), "--data", str(out), "--loss", "ipo_sum", "--max-steps", "2",
            "--output", str(tmp_path / "run"), "--batch-size", "2"]
    for kv in ("progress=false", "plot=false", "save_model=false", "max_length=512", "max_prompt_length=448",
               "warmup_ratio=0", f"ref_cache_dir={tmp_path}/rc"):
        args += ["--set", kv]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    steps = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "loss" in s][-1] == 2


def test_golden_conditioned_pair_ipo_sum_and_dpo():
    """§M8(d): the conditioned canonical pair (ρ_c = 1.0 / −0.5 on sums) is an ordinary pair to the registry:
    IPO on sums, τ = 0.5: (1.5 − 1/(2·0.5))² = 0.25; DPO, β = 0.1: −logσ(0.15) = 0.620957."""
    import torch

    from preftune.losses import PolicyStats, RefStats, get

    d = torch.float64
    p = PolicyStats(torch.tensor([[-10.0, -12.0]], dtype=d), torch.tensor([[5.0, 8.0]], dtype=d))
    r = RefStats(torch.tensor([[-11.0, -11.5]], dtype=d))
    for name, kw, want in (("ipo_sum", {"beta": 0.5}, 0.25), ("dpo", {"beta": 0.1}, 0.620957)):
        obj = get(name)
        assert float(obj.fn(p, r, **obj.resolve(kw)).losses[0]) == pytest.approx(want, abs=1e-6)


def test_per_user_accuracy_by_hand():
    acc = per_user_accuracy(["a", "a", "b", "b", "b"], [0.3, -0.1, 0.0, 2.0, 1.0])
    assert acc == {"a": 0.5, "b": pytest.approx(2.5 / 3)}


def _eval_module():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "fspo_eval.py"
    spec = importlib.util.spec_from_file_location("fspo_eval", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_implicit_reward_accuracy_known_answer(tmp_path, tiny_model_dir):
    """The policy equals the reference: every implicit reward is 0, every margin 0, every accuracy one half;
    with a policy whose log-probs are the reference's plus 1 per token of 'w' responses, chosen wins."""
    from preftune.model import load_model

    mod = _eval_module()
    records = _records(tmp_path, {"a": 3, "b": 2})
    policy, tok = load_model(str(tiny_model_dir))
    res = mod.evaluate(policy, policy, tok, records, users=["a", "b"], n_shots=2, beta=0.1, seed=0)
    assert res["with_shots"] == {"a": 0.5, "b": 0.5} and res["without_shots"] == {"a": 0.5, "b": 0.5}
    assert res["pairs"] == {"a": 3, "b": 2}
    margins = mod.implicit_margins(lambda rows: [[1.0, 0.0] for _ in rows], lambda rows: [[0.0, 0.0] for _ in rows],
                                   [{"responses": ["w", "l"]}] * 2, beta=0.5)
    assert margins == [0.5, 0.5]
