"""OREO in training (METHODS.md §M7): the critic trains jointly with the policy — at initialisation both losses
equal a hand computation from the data, each network gets exactly its own loss's gradient (stop-gradients at the
model level), the critic has its own learning rate — the value loss falls on a fixed batch, policy and critic
resume together to the uninterrupted run's weights, the final critic is a token-classification folder, both
objectives run by name through the CLI, trajectories are validated with file/line/field, step-level states follow
the delimiters, and value-guided beam search finds the known best path.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from preftune.cli import app
from preftune.model.critic import (
    Candidate,
    load_critic,
    sampler,
    scorer,
    step_starts,
    value_guided_beam,
)
from preftune.train.config import TrainConfig
from preftune.train.outputs import read_metrics
from preftune.train.trainer import build_runner, train

REWARDS = [[1, 0, 1], [0, 0], [1], [1, 1, 0]]


@pytest.fixture()
def traj_file(tmp_path):
    """Four prompts with 3, 2, 1 and 3 sampled solutions of two lines each and 0/1 rewards."""
    rows = [{"prompt": f"Question {i}: add {i} and {i + 1}",
             "responses": [f"first step {j}\nso the answer is {i + j}" for j in range(len(r))],
             "scores": r} for i, r in enumerate(REWARDS)]
    path = tmp_path / "traj.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(model_dir, data, out, **kw) -> TrainConfig:
    base = dict(model=str(model_dir), data=str(data), output=str(out), loss="oreo", max_steps=2, batch_size=2,
                learning_rate=1e-3, warmup_ratio=0.0, scheduler="constant", progress=False, plot=False,
                dynamics=False, shuffle=False, critic_learning_rate=1e-3)
    base.update(kw)
    return TrainConfig(**base)


def _critic_params(runner):
    return dict(runner.base_engine.critic.named_parameters())


# ------------------------------------------------------------------------------------ the joint step


def test_first_step_losses_equal_the_hand_values(tiny_model_dir, traj_file, tmp_path):
    """At step 0 the critic is 0 (zero-initialised head) and π = π_ref (Φ = 0), so every residual is −R: both
    losses are the mean over a group's trajectories of R² (R ∈ {0, 1}: the share of correct ones)."""
    runner = build_runner(_cfg(tiny_model_dir, traj_file, tmp_path / "o", batch_size=4))
    out = runner.forward_loss(runner.train_set, [0, 1, 2, 3], grad=False)
    expected = torch.tensor([sum(r) / len(r) for r in REWARDS])
    torch.testing.assert_close(out.result.metrics["value_loss"].float(), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.result.metrics["policy_loss"].float(), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.result.losses.float(), 2 * expected, rtol=0, atol=1e-6)
    assert float(out.result.metrics["kl"].abs().max()) < 1e-6  # KL(π_θ‖π_ref) over the vocabulary: 0 at init
    assert float(out.result.metrics["value_mean"].abs().max()) == 0.0


def test_each_network_gets_only_its_own_gradient(tiny_model_dir, traj_file, tmp_path):
    from preftune.losses import get

    runner = build_runner(_cfg(tiny_model_dir, traj_file, tmp_path / "o", batch_size=4))
    fwd, engine = runner.forward, runner.base_engine
    with torch.no_grad():  # move off the initial point so every term has a gradient
        for p in engine.critic.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
        for p in engine.model.parameters():
            p.add_(torch.randn_like(p) * 0.01)

    def grads():
        engine.zero_grad(set_to_none=True)
        runner.forward_loss(runner.train_set, [0, 1, 2, 3], grad=True).result.losses.sum().backward()
        return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
                for n, p in engine.named_parameters() if p.requires_grad}

    joint = grads()
    value_loss = fwd.value_loss
    fwd.value_loss = None  # the policy loss alone
    policy_only = grads()
    fwd.obj, fwd.params = get("oreo_value"), value_loss[1]  # the value loss alone
    value_only = grads()
    is_critic = {n: n.startswith("critic.") for n in joint}
    assert sum(is_critic.values()) > 0 and not all(is_critic.values())
    for n, g in joint.items():
        own, other = (value_only, policy_only) if is_critic[n] else (policy_only, value_only)
        torch.testing.assert_close(g, own[n], rtol=1e-5, atol=1e-7, msg=n)
        assert float(other[n].abs().max()) == 0.0, n  # the other network's loss leaves it untouched
    assert max(float(g.abs().max()) for n, g in joint.items() if not is_critic[n]) > 0
    assert max(float(g.abs().max()) for n, g in joint.items() if is_critic[n]) > 0


def test_critic_has_its_own_learning_rate_group(tiny_model_dir, traj_file, tmp_path):
    runner = build_runner(_cfg(tiny_model_dir, traj_file, tmp_path / "o", critic_learning_rate=3e-4,
                               learning_rate=1e-3))
    groups = runner.opt.param_groups
    critic = {id(p) for p in runner.base_engine.critic.parameters() if p.requires_grad}
    assert [g["lr"] for g in groups] == [1e-3, 3e-4]
    assert {id(p) for p in groups[-1]["params"]} == critic
    assert not critic & {id(p) for g in groups[:-1] for p in g["params"]}
    head = runner.base_engine.critic.model.score
    assert float(head.weight.detach().abs().max()) == 0.0  # zero-initialised value head
    assert head.bias is None or not head.bias.requires_grad  # bias-free


# ------------------------------------------------------------------------------------ the value loss learns


def test_value_loss_decreases_on_a_fixed_batch(tiny_model_dir, traj_file, tmp_path):
    """oreo_value trains the critic alone (the policy is frozen, Φ = 0): V regresses to R on one fixed batch."""
    res = train(_cfg(tiny_model_dir, traj_file, tmp_path / "v", loss="oreo_value", batch_size=4, max_steps=8,
                     critic_learning_rate=3e-3))
    losses = [m["value_loss"] for m in res.metrics if "value_loss" in m]
    assert len(losses) == 8
    assert losses[0] == pytest.approx(sum(sum(r) / len(r) for r in REWARDS) / 4, abs=1e-6)
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0], losses
    # the policy did not move: its saved weights are the initial model's
    from safetensors.torch import load_file

    a = load_file(str(tiny_model_dir / "model.safetensors"))
    b = load_file(str(tmp_path / "v" / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------ resume


def test_policy_and_critic_resume_together(tiny_model_dir, traj_file, tmp_path):
    from safetensors.torch import load_file

    from preftune.testing import train_interrupted_after

    common = dict(max_steps=4, save_steps=2, critic_learning_rate=2e-3)
    train(_cfg(tiny_model_dir, traj_file, tmp_path / "full", **common))
    interrupted = _cfg(tiny_model_dir, traj_file, tmp_path / "resumed", **common)
    train_interrupted_after(interrupted, 2)
    ckpt = load_file(str(tmp_path / "resumed" / "checkpoints" / "checkpoint-0000002" / "trainable.safetensors"))
    assert any(k.startswith("critic.model.") for k in ckpt) and any(not k.startswith("critic.") for k in ckpt)
    train(interrupted.model_copy(update={"resume": True}))

    for part in ("model", "critic"):
        a = load_file(str(tmp_path / "full" / part / "model.safetensors"))
        b = load_file(str(tmp_path / "resumed" / part / "model.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=f"{part}: {k}")
    # the resumed run went on from step 2's critic, which differs from the final one
    step2 = ckpt["critic.model.score.weight"]
    assert float((load_file(str(tmp_path / "full" / "critic" / "model.safetensors"))["score.weight"]
                  - step2).abs().max()) > 1e-4
    ra, rb = read_metrics(tmp_path / "full" / "metrics.jsonl"), read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    for x, y in zip(ra, rb, strict=True):
        assert x["value_loss"] == pytest.approx(y["value_loss"], rel=1e-5)
        assert x["policy_loss"] == pytest.approx(y["policy_loss"], rel=1e-5)


# ------------------------------------------------------------------------------------ the CLI


def _cli(model, data, out, loss, *extra):
    args = ["train", "--model", str(model), "--data", str(data), "--loss", loss, "--max-steps", "2",
            "--output", str(out)]
    for kv in ("progress=false", "plot=false", "batch_size=2", "learning_rate=1e-3", "critic_learning_rate=1e-3",
               "warmup_ratio=0", *extra):
        args += ["--set", kv]
    return CliRunner().invoke(app, args)


@pytest.mark.parametrize("loss,extra", [("oreo", ()), ("oreo", ("lora=true", "loss_params.step_level=true")),
                                        ("oreo_value", ())])
def test_two_step_cli_run_saves_the_critic(loss, extra, tiny_model_dir, traj_file, tmp_path):
    from transformers import AutoModelForTokenClassification

    res = _cli(tiny_model_dir, traj_file, tmp_path / "out", loss, *extra)
    assert res.exit_code == 0, res.output + repr(res.exception)
    rows = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert all("value_loss" in r and "critic_grad_norm" in r for r in rows)
    assert ("policy_loss" in rows[0]) == (loss == "oreo")
    critic = AutoModelForTokenClassification.from_pretrained(tmp_path / "out" / "critic")
    assert critic.config.num_labels == 1
    assert float(critic.score.weight.detach().abs().max()) > 0  # trained away from its zero initialisation
    assert isinstance(load_critic(tmp_path / "out"), torch.nn.Module)


def test_next_run_starts_from_a_saved_critic(tiny_model_dir, traj_file, tmp_path):
    first = train(_cfg(tiny_model_dir, traj_file, tmp_path / "a", loss="oreo_value"))
    runner = build_runner(_cfg(tiny_model_dir, traj_file, tmp_path / "b", value_model=str(first.output_dir /
                                                                                             "critic")))
    saved = load_critic(first.output_dir)
    torch.testing.assert_close(runner.base_engine.critic.model.score.weight, saved.model.score.weight)


# ------------------------------------------------------------------------------------ data


def test_trajectory_errors_name_file_line_and_field(tiny_model_dir, tmp_path):
    from preftune.data import DataError

    path = tmp_path / "bad.jsonl"
    rows = [{"prompt": "p", "responses": ["a", "b"], "scores": [1, 0]},
            {"prompt": "p", "responses": ["a", "b"], "ranking": [1, 0]},
            {"prompt": "p", "responses": ["a", "b"], "scores": [1, float("nan")]},
            {"prompt": "p", "responses": ["a", "b"], "scores": [1]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as e:
        train(_cfg(tiny_model_dir, path, tmp_path / "o"))
    text = str(e.value)
    assert f"{path}:2: scores: missing: a trajectory needs a terminal reward" in text
    assert f"{path}:3: scores" in text and f"{path}:4: scores" in text and ":1:" not in text
    assert not (tmp_path / "o").exists()  # nothing written before the data is valid


def test_all_equal_rewards_and_single_trajectories_are_kept(tiny_model_dir, traj_file, tmp_path):
    runner = build_runner(_cfg(tiny_model_dir, traj_file, tmp_path / "o"))
    assert [len(e.response_ids) for e in runner.train_set.examples] == [3, 2, 1, 3]
    assert [e.inputs["scores"] for e in runner.train_set.examples] == [[float(x) for x in r] for r in REWARDS]


def test_step_starts_follow_the_delimiters(tiny_tok):
    ids = tiny_tok("step one\nstep two. and\nlast", add_special_tokens=False)["input_ids"]
    pieces = [tiny_tok.decode([i]) for i in ids]
    got = step_starts(ids, tiny_tok, ("\n",))
    assert [j for j, s in enumerate(got) if s] == [0, pieces.index("\n") + 1, len(ids) - 4]
    got = step_starts(ids, tiny_tok, ("\n", ". ", ".$ "))
    assert [pieces[j] for j, s in enumerate(got) if s] == ["s", "s", " a", "l"]  # ". " ends before "a"


# ------------------------------------------------------------------------------------ value-guided search


def test_beam_search_finds_the_known_best_path():
    """Steps are single tokens 1..3; a path finishes after 3 steps; the critic's value is the number of 3s. Greedy
    on value keeps the all-3 beam; the answer is [3, 3, 3] (the finished candidate of highest value)."""
    calls = []

    def expand(prefixes, n):
        calls.append(len(prefixes))
        return [[([t], len(p) + 1 == 3) for t in (1, 2, 3)[:n]] for p in prefixes]

    def score(cands: list[Candidate]):
        return [float(sum(t == 3 for t in c.ids)) for c in cands]

    best = value_guided_beam(expand, score, width=3, max_steps=20)
    assert best.ids == [3, 3, 3] and best.value == 3.0 and best.finished
    assert calls == [1, 3, 3]  # one root, then the width best unfinished beams; stops when nothing is unfinished
    assert value_guided_beam(lambda p, n: [[([1], False)] * n for _ in p], score, width=2, max_steps=4) is None


def test_beam_search_runs_on_a_tiny_policy_and_critic(tiny_model_dir, tiny_tok):
    from preftune.model import load_model
    from preftune.model.critic import new_critic

    model, _ = load_model(str(tiny_model_dir))
    critic = new_critic(model).eval()
    with torch.no_grad():
        critic.model.score.weight.normal_()
    prompt = tiny_tok("Question: 1 + 1", add_special_tokens=False)["input_ids"]
    torch.manual_seed(0)
    best = value_guided_beam(sampler(model, prompt, tiny_tok, max_step_tokens=6, max_length=40),
                             scorer(critic, prompt, tiny_tok.eos_token_id), width=2, max_steps=3)
    assert best is not None and best.finished and len(prompt) + len(best.ids) <= 40
    # the score is V at the last token, as the critic computes it on the full sequence
    seq = prompt + [5, 6, 7]
    v = critic.last_values([seq, prompt])
    logits = critic.model(input_ids=torch.tensor([seq])).logits[0, :, 0].detach()
    assert float(v[0]) == pytest.approx(float(logits[-1]), abs=1e-5)
    assert float(v[1]) == pytest.approx(float(logits[len(prompt) - 1]), abs=1e-5)


def test_value_search_cli_answers_every_prompt(tiny_model_dir, traj_file, tmp_path):
    train(_cfg(tiny_model_dir, traj_file, tmp_path / "run", loss="oreo_value"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Question 9: add 9 and 10"}) + "\n"
                       + json.dumps({"prompt": [{"role": "user", "content": "Question 3"}]}) + "\n")
    out = tmp_path / "answers.jsonl"
    res = CliRunner().invoke(app, ["value-search", str(prompts), str(tmp_path / "run" / "model"), str(tmp_path / "run"),
                                   "-o", str(out), "--width", "2", "--max-steps", "2", "--max-step-tokens", "4",
                                   "--max-length", "48", "--device", "cpu"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows][0] == "Question 9: add 9 and 10" and len(rows) == 2
    assert all(isinstance(r["answer"], str) and isinstance(r["value"], float) for r in rows)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "x"}) + "\n")
    res = CliRunner().invoke(app, ["value-search", str(bad), str(tmp_path / "run" / "model"), str(tmp_path / "run")])
    assert res.exit_code != 0 and f"{bad}:1: prompt: missing" in res.output


def _steps_file(tmp_path, rows):
    path = tmp_path / "steps.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_steps_field_places_the_step_level_states(tiny_model_dir, tmp_path):
    from preftune.data import collate
    from preftune.model.critic import state_mask

    steps = [["first step, ", "then the next ", "and done"], ["one", " two"]]
    rows = [{"prompt": "Question: count", "responses": ["".join(s) for s in steps], "scores": [1, 0], "steps": steps},
            {"prompt": "Question: again", "responses": ["a b"], "scores": [1], "steps": [["a", " b"]]}]
    runner = build_runner(_cfg(tiny_model_dir, _steps_file(tmp_path, rows), tmp_path / "o",
                               loss_params={"step_level": True}))
    ex = runner.train_set.examples[0]
    assert ex.inputs["step_chars"] == [[0.0, 12.0, 26.0], [0.0, 3.0, -1.0]]  # padded to the data set's 3 steps
    batch = collate([ex])
    got = state_mask(batch, max(len(r) for r in ex.response_ids), runner.tokenizer, runner.forward.params)
    for k, (resp_ids, offsets) in enumerate(zip(ex.response_ids, ([0, 12, 26], [0, 3]), strict=True)):
        pieces = [runner.tokenizer.decode([t]) for t in resp_ids]
        ends = [sum(len(p) for p in pieces[: j + 1]) for j in range(len(pieces))]
        want = {next(j for j, e in enumerate(ends) if e > c) for c in offsets}  # the token holding each start
        assert {j for j in range(len(resp_ids)) if got[0, k, j]} == want
    res = train(_cfg(tiny_model_dir, _steps_file(tmp_path, rows), tmp_path / "t", loss_params={"step_level": True}))
    assert res.steps == 2


def test_steps_errors_name_file_line_and_field(tiny_model_dir, tmp_path):
    from preftune.data import DataError

    rows = [{"prompt": "p", "responses": ["abc", "de"], "scores": [1, 0], "steps": [["ab", "c"], ["d", "x"]]},
            {"prompt": "p", "responses": ["abc"], "scores": [1]},
            {"prompt": "p", "responses": ["abc"], "scores": [1], "steps": [["abc"], ["d"]]}]
    path = _steps_file(tmp_path, rows)
    with pytest.raises(DataError) as e:
        train(_cfg(tiny_model_dir, path, tmp_path / "o"))
    text = str(e.value)
    assert f"{path}:1: steps[1]: the steps joined differ from responses[1] at character 1" in text
    assert f"{path}:2: steps: missing (the data's other records carry steps)" in text
    assert f"{path}:3: steps: expected one list of step strings per response (1), got 2 lists" in text
