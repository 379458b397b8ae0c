"""The online loop end to end on tiny models, through the CLI: every algorithm for 2 iterations, resume,
a judge with another tokenizer, and an iteration without pairs."""

import json
import math

import pytest
from typer.testing import CliRunner

from preftune.cli import app
from preftune.online.algorithms import names
from preftune.tasks import Judgement, Task, register
from preftune.tasks.base import _REGISTRY
from preftune.testing import online_run_killed_after, save_tiny_model

TIME_KEYS = ("seconds", "gen_seconds", "judge_seconds", "train_seconds", "tokens/s", "step_time", "elapsed")


def _prompts(n, offset=0):
    return [[{"role": "user", "content": f"Say something about item {i}."}] for i in range(offset, offset + n)]


def _register(name, judge):
    if name not in _REGISTRY:
        register(Task(name, "test task", lambda: _prompts(40), lambda: _prompts(6, 100), judge))


# A graded judge a random tiny model gets varied scores on: the share of 'e' among the letters.
def _letters(prompt, response, finished=True):
    letters = [c for c in response.lower() if c.isalpha()]
    s = sum(c == "e" for c in letters) / len(letters) if letters else 0.0
    return Judgement(s, s > 0.1, {"letters": len(letters)})


_register("tiny_letters", _letters)
_register("tiny_constant", lambda prompt, response, finished=True: Judgement(0.5, False))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return str(save_tiny_model(tmp_path_factory.mktemp("m") / "tiny"))


def _run(args):
    res = CliRunner().invoke(app, ["online", *args])
    assert res.exit_code == 0, res.output + (repr(res.exception) if res.exception else "")
    return res


QUICK = ["--set", "prompts_per_iteration=4", "--set", "heldout_prompts=3", "--set", "heldout_samples=1",
         "--set", "max_new_tokens=8", "--set", "batch_size=2", "--set", "learning_rate=1e-3", "--set",
         "max_length=96", "--set", "max_prompt_length=64", "--set", "progress=false", "--set", "online_batch=2"]


def _rows(out):
    return [json.loads(x) for x in (out / "iterations.jsonl").read_text().splitlines()]


def _untimed(rows):
    return [{k: v for k, v in r.items() if not k.endswith(TIME_KEYS)} for r in rows]


# dstc writes and runs code, so it needs the code task: its 2-iteration CLI runs are in test_dstc.py.
@pytest.mark.parametrize("algorithm", [a for a in names() if a != "dstc"])
def test_every_algorithm_two_iterations(tmp_path, tiny_folder, algorithm):
    out = tmp_path / algorithm
    # A random tiny model's scores stay low on the 6-point scale: DNO's thresholds are lowered to get pairs.
    extra = ["--set", "dno_pos_min=2", "--set", "dno_margin=1"] if algorithm == "dno" else []
    _run(["--algorithm", algorithm, "--model", tiny_folder, "--task", "tiny_letters", "--iterations", "2",
          "--output", str(out), *QUICK, *extra])
    rows = _rows(out)
    assert [r["iter/t"] for r in rows] == [1, 2]
    for t, r in enumerate(rows, start=1):
        it = out / f"iter_{t:02d}"
        # MCTS-DPO writes its search trees (tests/online/test_mcts.py checks them) instead of K samples
        tree = algorithm == "mcts_dpo"
        for f in (("trees.jsonl",) if tree else ("samples.jsonl", "judgements.jsonl")) + (
                "train_input.jsonl", "manifest.json", "policy.safetensors", "heldout.jsonl"):
            assert (it / f).exists(), (algorithm, f)
        assert r["iter/pairs"] > 0 and r["train/steps"] > 0
        assert 0.0 <= r["eval/success"] <= 1.0 and math.isfinite(r["eval/kl_ref"])
        if tree:
            continue
        samples = [json.loads(x) for x in (it / "samples.jsonl").read_text().splitlines()]
        assert all(s["token_ids"] for row in samples for s in row["samples"])
    assert (out / "report.md").exists() and (out / "eval_base.json").exists()


def test_acceptance_command_word_limit(tmp_path, tiny_folder):
    out = tmp_path / "out"
    _run(["--algorithm", "iterative_dpo", "--model", tiny_folder, "--task", "word_limit", "--iterations", "2",
          "--output", str(out), *QUICK])
    assert len(_rows(out)) == 2


@pytest.fixture(scope="module")
def full_sppo_run(tmp_path_factory, tiny_folder):
    out = tmp_path_factory.mktemp("full") / "run"
    _run(["--algorithm", "sppo", "--model", tiny_folder, "--task", "tiny_letters", "--iterations", "2", *QUICK,
          "--output", str(out)])
    return out


@pytest.mark.parametrize("done", [("sample", "judge"), ("sample", "judge", "build", "train")])
def test_resume_after_kill_between_phases_gives_the_same_rows(tmp_path, tiny_folder, full_sppo_run, done):
    args = ["--algorithm", "sppo", "--model", tiny_folder, "--task", "tiny_letters", "--iterations", "2", *QUICK]
    # the same run "killed" in iteration 2 after the phases `done`
    cut = online_run_killed_after(full_sppo_run, tmp_path / "cut", done)
    _run([*args, "--output", str(cut), "--resume"])
    assert _untimed(_rows(cut)) == _untimed(_rows(full_sppo_run))


def test_a_finished_run_continues_with_more_iterations(tmp_path, tiny_folder, full_sppo_run):
    args = ["--algorithm", "sppo", "--model", tiny_folder, "--task", "tiny_letters", *QUICK]
    out = tmp_path / "grow"
    _run([*args, "--iterations", "1", "--output", str(out)])
    _run([*args, "--iterations", "2", "--output", str(out), "--resume"])
    assert _untimed(_rows(out)) == _untimed(_rows(full_sppo_run))  # as if started with 2 iterations
    res = CliRunner().invoke(app, ["online", *args, "--iterations", "1", "--output", str(out), "--resume"])
    assert res.exit_code != 0 and "fewer than the run has" in (res.output + repr(res.exception))


def test_fluency_tie_break_picks_the_most_natural_best_and_reuses_its_reference(tmp_path, tiny_folder):
    import torch
    from transformers import AutoModelForCausalLM

    from preftune.eval.quality import lone_list_item
    from preftune.model.reference import ReferenceCache
    from preftune.model.scoring import response_token_logps

    out = tmp_path / "flu"
    _run(["--model", tiny_folder, "--task", "tiny_letters", "--iterations", "1", "--output", str(out), *QUICK,
          "--set", "tie_break=fluency", "--set", "ref_mode=fixed", "--set", "k=4", "--set", "heldout_samples=3"])
    it = out / "iter_01"
    samples = [json.loads(x) for x in (it / "samples.jsonl").read_text().splitlines()]
    judged = [json.loads(x) for x in (it / "judgements.jsonl").read_text().splitlines()]
    pairs = [json.loads(x) for x in (it / "train_input.jsonl").read_text().splitlines()]
    assert pairs
    model = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32)
    for row, j in zip(samples, judged, strict=True):
        lps = response_token_logps(model, [row["prompt_ids"]], [[s["token_ids"] for s in row["samples"]]], 0)[0]
        want = [float((lp[:-1] if s["finished"] else lp).mean()) for s, lp in zip(row["samples"], lps)]
        assert j["fluency"] == pytest.approx(want, abs=1e-4)  # mean token log-prob under π_0, EOS left out
    for p in pairs:
        sc, flu = judged[p["prompt"]]["scores"], judged[p["prompt"]]["fluency"]
        best = [i for i, x in enumerate(sc) if x == max(sc)]
        worst = [i for i, x in enumerate(sc) if x == min(sc)]
        assert p["w"] == max(best, key=lambda i: flu[i]) and p["l"] == min(worst, key=lambda i: flu[i])
    # the fixed reference comes from the fluency pass: equal to scoring the pairs under π_0 afresh
    ref = ReferenceCache.load(it / "reference.safetensors").token_logps
    assert len(ref) == len(pairs)
    for p, got in zip(pairs, ref, strict=True):
        row = samples[p["prompt"]]
        ids = [row["samples"][p["w"]]["token_ids"], row["samples"][p["l"]]["token_ids"]]
        want = response_token_logps(model, [row["prompt_ids"]], [ids], 0)[0]
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    rows = _rows(out)
    # held-out fluency: each answer's NLL under π_0 is written next to it; the figures are their means, over
    # all answers and over the accepted ones
    for ev, path in ((json.loads((out / "eval_base.json").read_text()), out / "eval_base.heldout.jsonl"),
                     ({k[5:]: v for k, v in rows[0].items() if k.startswith("eval/")}, it / "heldout.jsonl")):
        held = [json.loads(x) for x in path.read_text().splitlines() if '"sampled"' in x]
        nll = [r["nll_base"] for r in held if r["nll_base"] is not None]
        assert ev["fluency_nll"] == pytest.approx(sum(nll) / len(nll), rel=1e-9)
        stubs = [lone_list_item(r["response"]) for r in held]
        assert ev["lone_list_rate"] == pytest.approx(sum(stubs) / len(stubs))
        ok = [r["nll_base"] for r in held if r["success"] and r["nll_base"] is not None]
        assert ("fluency_nll_success" in ev) == bool(ok)
        if ok:
            assert ev["fluency_nll_success"] == pytest.approx(sum(ok) / len(ok), rel=1e-9)
    assert rows[0]["iter/fluency_mean"] == pytest.approx(
        sum(f for j in judged for f in j["fluency"]) / sum(len(j["fluency"]) for j in judged), abs=1e-6)


def test_sampled_fluency_tie_break_draws_the_chosen_with_the_iteration_seed(tmp_path, tiny_folder):
    """tie_break=fluency_sampled: the pairs are max_min over the judged scores with build.sampled_tiebreak
    drawn from the build phase's generator (seed + 1000·t), prompt after prompt: replayed here exactly."""
    import random

    from preftune.online.build import build_pairs, sampled_tiebreak

    out = tmp_path / "flus"
    _run(["--model", tiny_folder, "--task", "tiny_letters", "--iterations", "1", "--output", str(out), *QUICK,
          "--set", "tie_break=fluency_sampled", "--set", "tie_break_temperature=0.5", "--set", "k=4"])
    judged = [json.loads(x) for x in (out / "iter_01" / "judgements.jsonl").read_text().splitlines()]
    got = [(p["prompt"], p["w"], p["l"]) for p in
           map(json.loads, (out / "iter_01" / "train_input.jsonl").read_text().splitlines())]
    rng, want = random.Random(0 + 1000 * 1), []
    for i, j in enumerate(judged):
        tb = sampled_tiebreak(j["scores"], j["fluency"], 0.5, rng)
        want += [(i, p.w, p.l) for p in build_pairs("max_min", j["scores"], tiebreak=tb)]
    assert got == want and want


def test_existing_output_needs_resume(tmp_path, tiny_folder):
    out = tmp_path / "o"
    args = ["--model", tiny_folder, "--task", "tiny_letters", "--iterations", "1", "--output", str(out), *QUICK]
    _run(args)
    res = CliRunner().invoke(app, ["online", *args])
    assert res.exit_code == 2 and "--resume" in res.output


def test_iteration_without_pairs_is_reported_and_skipped(tmp_path, tiny_folder):
    out = tmp_path / "ties"
    _run(["--model", tiny_folder, "--task", "tiny_constant", "--iterations", "2", "--output", str(out), *QUICK])
    rows = _rows(out)
    assert [r["iter/pairs"] for r in rows] == [0, 0]
    assert all(r["train/skipped"] == "no pairs" and r["train/steps"] == 0 for r in rows)
    assert all(r["eval/kl_ref"] == pytest.approx(0.0, abs=1e-5) for r in rows)  # π carried over unchanged


def test_reward_model_judge_with_another_tokenizer(tmp_path, tiny_folder):
    import torch
    from transformers import LlamaForSequenceClassification

    from preftune.model.tiny import tiny_config, tiny_tokenizer
    from preftune.reward.model import load_preference_model

    tok = tiny_tokenizer(vocab_size=290)  # other merges: the same text tokenises differently
    torch.manual_seed(3)
    cfg = tiny_config(vocab_size=len(tok))
    cfg.num_labels, cfg.pad_token_id = 1, tok.pad_token_id
    rm_dir = tmp_path / "rm"
    LlamaForSequenceClassification(cfg).save_pretrained(rm_dir)
    tok.save_pretrained(rm_dir)
    out = tmp_path / "rmrun"
    _run(["--model", tiny_folder, "--task", "tiny_letters", "--judge", f"rm:{rm_dir}", "--iterations", "1",
          "--output", str(out), *QUICK])
    samples = [json.loads(x) for x in (out / "iter_01" / "samples.jsonl").read_text().splitlines()]
    judged = [json.loads(x) for x in (out / "iter_01" / "judgements.jsonl").read_text().splitlines()]
    rm = load_preference_model(rm_dir)
    for row, j in zip(samples, judged, strict=True):
        want = rm.score(row["prompt"], [s["text"] for s in row["samples"]]).tolist()
        assert j["scores"] == pytest.approx(want, abs=1e-5)  # the judge saw text, through its own tokenizer
    # training used the sampled ids, not a re-tokenisation
    pairs = [json.loads(x) for x in (out / "iter_01" / "train_input.jsonl").read_text().splitlines()]
    assert pairs and all(0 <= p["w"] < 4 and 0 <= p["l"] < 4 for p in pairs)


def test_demo_quick_runs_the_iterative_recipe(tmp_path):
    out = tmp_path / "demo"
    res = CliRunner().invoke(app, ["demo", "--quick", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert len(_rows(out)) == 2 and (out / "report.md").exists()
    report = (out / "report.md").read_text()
    for section in ("## Held-out, per iterate", "## Better answers, or only a higher score?", "## Settings"):
        assert section in report
    assert "held-out success (sampled)" in res.output
    settings = json.loads((out / "online_config.json").read_text())
    assert (settings["algorithm"], settings["loss"], settings["tie_break"], settings["ref_mode"]) == (
        "iterative_dpo", "dpo_nll", "fluency_sampled", "fixed")
    assert all("fluency" in json.loads(x) for x in (out / "iter_01" / "judgements.jsonl").read_text().splitlines())


def test_flip_pairs_swaps_exactly_that_share_of_the_same_pairs(tmp_path, tiny_folder):
    """flip_pairs=0.5: the same samples and pairs as an unflipped run, with chosen and rejected swapped in exactly
    round(0.5 · n) of them (marked), drawn from the flip generator only, so nothing else moves."""
    from preftune.online.loop import flip_labels

    common = ["--model", tiny_folder, "--task", "tiny_letters", "--iterations", "1", *QUICK, "--set", "k=4",
              "--set", "prompts_per_iteration=8"]
    runs = {}
    for share in ("0", "0.5"):
        out = tmp_path / f"flip{share}"
        _run([*common, "--output", str(out), "--set", f"flip_pairs={share}"])
        runs[share] = [json.loads(x) for x in (out / "iter_01" / "train_input.jsonl").read_text().splitlines()]
        assert (out / "iter_01" / "samples.jsonl").exists()
    clean, noisy = runs["0"], runs["0.5"]
    assert len(clean) == len(noisy) >= 4
    flipped = [i for i, r in enumerate(noisy) if r.get("flipped")]
    assert len(flipped) == round(0.5 * len(clean))
    for i, (c, n) in enumerate(zip(clean, noisy, strict=True)):
        want = (c["l"], c["w"], -c["margin"]) if i in flipped else (c["w"], c["l"], c["margin"])
        assert (n["w"], n["l"], n["margin"]) == want and n["prompt"] == c["prompt"]
    # the draw itself: the flip generator's sample of indices
    import random

    rows = [{"w": 0, "l": 1, "margin": 1.0} for _ in range(10)]
    assert flip_labels(rows, 0.3, random.Random(7)) == 3
    assert sorted(i for i, r in enumerate(rows) if r.get("flipped")) == sorted(random.Random(7).sample(range(10), 3))
