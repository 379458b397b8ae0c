"""`preftune online --judge "lsc(...)"`: one tiny iteration whose judge combines a reward model and a task by
LSC (reward/lsc.py), with reference rewards from π_0 samples drawn before training (lsc_reference.jsonl)."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from preftune.cli import app
from preftune.online.build import build_pairs
from preftune.reward.lsc import lsc_combine, quantile
from preftune.tasks import Judgement, Task, register
from preftune.tasks.base import _REGISTRY
from preftune.testing import save_tiny_model

TASK = "tiny_vowels_lsc"


def _prompts(n, offset=0):
    return [[{"role": "user", "content": f"Say something about item {i}."}] for i in range(offset, offset + n)]


def _vowels(prompt, response, finished=True):
    # A graded probability-like score a random tiny model gets varied values on; a cut answer scores 0.
    letters = [c for c in response.lower() if c.isalpha()]
    s = sum(c in "aeiou" for c in letters) / len(letters) if letters and finished else 0.0
    return Judgement(s, s > 0.3)


if TASK not in _REGISTRY:
    register(Task(TASK, "test task", lambda: _prompts(40), lambda: _prompts(6, 100), _vowels))


def test_online_iteration_with_an_lsc_judge(tmp_path):
    import torch
    from transformers import LlamaForSequenceClassification

    from preftune.model.tiny import tiny_config, tiny_tokenizer
    from preftune.reward.model import load_preference_model

    policy = save_tiny_model(tmp_path / "policy")
    tok = tiny_tokenizer()
    torch.manual_seed(3)
    cfg = tiny_config(vocab_size=len(tok))
    cfg.num_labels, cfg.pad_token_id = 1, tok.pad_token_id
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    spec = f"lsc(rm:{tmp_path / 'rm'}, task:{TASK}, m=4, q=0.85)"
    out = tmp_path / "run"
    args = ["online", "--model", str(policy), "--task", TASK, "--judge", spec, "--iterations", "1", "--output",
            str(out)]
    for kv in ("prompts_per_iteration=4", "heldout_prompts=2", "heldout_samples=1", "max_new_tokens=8", "batch_size=2",
               "learning_rate=1e-3", "max_length=96", "max_prompt_length=64", "progress=false", "online_batch=2",
               "k=4", "rule=max_min"):
        args += ["--set", kv]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output + repr(res.exception)

    rm = load_preference_model(tmp_path / "rm")
    # r^ref(x): the 0.85-quantile of the reward over 4 π_0 samples of each training prompt; the task needs none
    refs = [json.loads(x) for x in (out / "lsc_reference.jsonl").read_text().splitlines()]
    assert len(refs) == 4 and all(len(r["samples"]) == 4 for r in refs)
    by_prompt = {}
    for r in refs:
        rewards = rm.score(r["prompt"], [s["text"] for s in r["samples"]]).tolist()
        assert r["reference"][0] == pytest.approx(quantile(rewards, 0.85), abs=1e-5) and r["reference"][1] is None
        by_prompt[json.dumps(r["prompt"], sort_keys=True)] = r["reference"]
    # every sample's score is the hand-computed sum log σ(r − r^ref) + log max(task score, 1e-3)
    it = out / "iter_01"
    samples = [json.loads(x) for x in (it / "samples.jsonl").read_text().splitlines()]
    judged = [json.loads(x) for x in (it / "judgements.jsonl").read_text().splitlines()]
    want_pairs = []
    for i, (row, j) in enumerate(zip(samples, judged, strict=True)):
        texts = [s["text"] for s in row["samples"]]
        r = rm.score(row["prompt"], texts).tolist()
        t = [_vowels(row["prompt"], s["text"], s["finished"]).score for s in row["samples"]]
        want = lsc_combine([[a, b] for a, b in zip(r, t, strict=True)], by_prompt[json.dumps(row["prompt"],
                                                                                              sort_keys=True)])
        assert j["scores"] == pytest.approx(want, abs=1e-5)
        assert all(s <= 0 for s in j["scores"]) and all(math.isfinite(s) for s in j["scores"])
        want_pairs += [(i, p.w, p.l) for p in build_pairs("max_min", j["scores"])]
    # the pairs are best-of-K on the transformed scores
    got = [(p["prompt"], p["w"], p["l"]) for p in
           map(json.loads, (it / "train_input.jsonl").read_text().splitlines())]
    assert got == want_pairs and got
