"""RDPO / R-ORPO and BRAIn end to end (METHODS.md §M3, §M6): the rationale rows the engine adds to a batch score
exactly what a plain HF forward of (x_rat + rationale) gives, at the right positions, without changing the pair's
log-probs (unshared and prefix-shared layouts); x_rat renders as the released loaders do; the new record fields'
errors name file, line and field; 2-step `preftune train` runs, whose first logged loss equals the formula on log-
probs from an independent forward; the data builders on a tiny model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from preftune.cli import app
from preftune.data import DataError, Example, collate, load_and_validate, tokenize_example
from preftune.data.rationales import RATIONALE_TEMPLATE, render_rationale_prompt, tokenize_rationale
from preftune.model.engine import LogProbEngine, pack, pack_side, split_side, with_side
from preftune.testing import (
    save_tiny_model,
    tiny_model,
    tiny_tokenizer,
    write_rationale_pairs_jsonl,
    write_scored_lists_jsonl,
)

D = torch.float64


def hf_logps(model, prompt: list[int], response: list[int]) -> float:
    """Σ log p(response | prompt) from one plain float64 HF forward of prompt + response (no preftune code)."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logp = logits.log_softmax(-1)
    return float(sum(logp[len(prompt) - 1 + t, tok] for t, tok in enumerate(response)))


def _examples(tok, n=3, chat=False):
    exs = []
    for i in range(n):
        prompt = [{"role": "user", "content": f"q{i} the sea?"}] if chat else f"Question {i}: the sea?"
        ex = Example(prompt, [f"a quick fox {i}.", "lazy dog" + " dog" * i + "!"])
        ex.rationale = "The first answer is better: " + "haiku " * (i + 1)
        exs.append(tokenize_example(ex, tok, max_length=96, max_prompt_length=64))
    return exs


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
@pytest.mark.parametrize("shared", [False, True], ids=["unshared", "prefix_shared"])
def test_engine_scores_the_rationale_as_a_plain_forward(shared, chat):
    model = tiny_model("llama", seed=0).double().eval()
    tok = tiny_tokenizer()
    toks = _examples(tok, chat=chat)
    batch = collate(toks)
    engine = LogProbEngine(model, chunk_size=7, prefix_sharing="on" if shared else "off")
    main = pack(batch.prompt_ids, batch.response_ids, tok.pad_token_id, share_prefix=shared)
    side = pack_side(batch.rationale_prompt_ids, batch.rationale_ids, tok.pad_token_id)
    with torch.no_grad():
        both = engine(**with_side(main, side, tok.pad_token_id).tensors())
        alone = engine(**main.tensors())
    main_out, r_logps, r_len = split_side(main, side, both)
    # The pair's tokens are untouched by the extra rows.
    torch.testing.assert_close(main_out["token_logps"], alone["token_logps"], atol=1e-10, rtol=0)
    for b, t in enumerate(toks):
        assert float(r_logps[b]) == pytest.approx(hf_logps(model, t.rationale_prompt_ids, t.rationale_ids), abs=1e-9)
        assert float(r_len[b]) == len(t.rationale_ids)


def test_rationale_sequence_is_the_released_x_rat_then_the_rationale():
    tok = tiny_tokenizer()
    ex = Example("Why is the sea blue?", ["Light scatters.", "No idea!"])
    ex.rationale = "It explains the physics."
    x = render_rationale_prompt(ex.prompt, *ex.responses)
    assert x == ('Given the prompt:\nWhy is the sea blue?\nWhich of the following assistant\'s response is more '
                 'preferable and strictly follows with the prompt question?\nResponse above:"Light scatters."\nor\n'
                 'Response below:"No idea!"?\n')
    assert RATIONALE_TEMPLATE.count("{") == 3
    prompt_ids, r_ids, _ = tokenize_rationale(ex, tok, max_length=None, max_prompt_length=None)
    assert tok.decode(prompt_ids + r_ids, skip_special_tokens=True).endswith(x + "It explains the physics.")
    assert r_ids[-1] == tok.eos_token_id  # plain text: EOS appended, as for a response
    # random order: a fixed coin per pair; some pairs swap, and a swapped x_rat shows the rejected response first.
    orders = [render_rationale_prompt(f"p{i}", "good", "bad", order="random").index('"good"')
              < render_rationale_prompt(f"p{i}", "good", "bad", order="random").index('"bad"') for i in range(40)]
    assert 5 < sum(orders) < 35
    # Chat data: x_rat is a user turn and the rationale the assistant's, through the template.
    ex_chat = Example([{"role": "user", "content": "Why?"}], ["A.", "B."])
    ex_chat.rationale = "Because."
    p_ids, r_ids, _ = tokenize_rationale(ex_chat, tok, max_length=None, max_prompt_length=None)
    text = tok.decode(p_ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>user\nGiven the prompt:\nWhy?") and text.endswith("<|im_start|>assistant\n")


# ------------------------------------------------------------------------------------------------ validation


def _write(tmp_path, rows, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def _issues(path, shape="paired"):
    with pytest.raises(DataError) as e:
        load_and_validate(str(path), objective_shape=shape)
    return [str(i) for i in e.value.issues]


PAIR = {"prompt": "p", "chosen": "a", "rejected": "b"}


def test_rationale_errors_name_file_line_and_field(tmp_path):
    p = _write(tmp_path, [
        {**PAIR, "rationale": "fine"},
        {**PAIR, "rationale": "  "},
        {**PAIR, "rationale": 3},
        {**PAIR, "rationales": ["x", "y"]},
        {**PAIR, "rationales": "not a list"},
        PAIR,
    ])
    got = _issues(p)
    assert f"{p}:2: rationale: empty" in got
    assert f"{p}:3: rationale: expected a string or a list of chat messages, got int" in got
    assert f"{p}:4: rationales: has 2 rationale(s) for 1 pair(s)" in got  # a chosen/rejected row is one pair
    assert f"{p}:5: rationales: expected a list with one rationale per pair, got str" in got
    assert f"{p}:6: rationales: missing (the data's other records carry rationales, e.g. line 1)" in got
    assert not any(g.startswith(f"{p}:1:") for g in got)
    lists = _write(tmp_path, [
        {"prompt": "p", "responses": ["a", "b", "c"], "pairs": [[0, 1], [0, 2]], "rationales": ["x", "y"]},
        {"prompt": "p", "responses": ["a", "b", "c"], "pairs": [[0, 1], [0, 2]], "rationales": ["only one"]},
    ], "lists.jsonl")
    assert _issues(lists) == [f"{lists}:2: rationales: has 1 rationale(s) for 2 pair(s)"]


def test_sample_logps_errors_name_file_line_and_field(tmp_path):
    row = {"prompt": "p", "responses": ["a", "b", "c"], "scores": [1, 2, 3]}
    p = _write(tmp_path, [
        {**row, "proposal_logps": [-1.0, -2.0, -3.0]},
        {**row, "proposal_logps": [-1.0, -2.0]},
        {**row, "proposal_logps": [-1.0, 0.5, -3.0]},
        {**row, "proposal_logps": [-1.0, "x", -3.0], "prior_logps": [-1.0, -1.0, None]},
        {**row, "prior_logps": [-1.0, -2.0, -3.0]},
        row,
    ])
    got = _issues(p, "listwise")
    assert f"{p}:2: proposal_logps: has 2 values for 3 responses" in got
    assert f"{p}:3: proposal_logps[1]: 0.5 is positive: a sequence log-probability is at most 0" in got
    assert f"{p}:4: proposal_logps[1]: expected a finite number (a summed log-probability), got 'x'" in got
    assert f"{p}:4: prior_logps[2]: expected a finite number (a summed log-probability), got None" in got
    assert f"{p}:5: prior_logps: given without proposal_logps (the log-probs of the sampling distribution)" in got
    assert f"{p}:6: proposal_logps: missing (the data's other records carry proposal_logps, e.g. line 1)" in got


def test_rationale_objective_refuses_pairs_without_rationales(tmp_path, models_root):
    from preftune.testing import write_pairs_jsonl

    data = write_pairs_jsonl(tmp_path / "pairs.jsonl", 4)
    res = _train(models_root["policy"], "rdpo_rationale", data, tmp_path / "out")
    assert res.exit_code != 0
    assert f"{data}:1: rationales: missing; objective 'rdpo_rationale' needs a rationale per pair" in res.output


# ------------------------------------------------------------------------------------------------ CLI runs


@pytest.fixture(scope="module")
def models_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("rationale_brain")
    return {"policy": save_tiny_model(root / "policy", seed=0), "root": root}


def _train(model, loss, data, out, *extra):
    args = ["train", "--model", str(model), "--data", str(data), "--loss", loss, "--max-steps", "2",
            "--output", str(out), "--batch-size", "4"]
    for kv in ("progress=false", "plot=false", "save_model=false", "max_length=96", "max_prompt_length=64",
               "learning_rate=1e-3", "warmup_ratio=0", "shuffle=false", f"ref_cache_dir={out}-rc", *extra):
        args += ["--set", kv]
    return CliRunner().invoke(app, args)


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _tokenized_pairs(path, tok):
    from preftune.data import to_pairs

    records, _ = load_and_validate(str(path), objective_shape="paired")
    return [tokenize_example(e, tok, max_length=96, max_prompt_length=64) for e in to_pairs(records)]


@pytest.mark.parametrize("loss", ["rdpo_rationale", "rorpo_rationale"])
def test_two_step_cli_run_and_first_loss_by_hand(loss, models_root, tmp_path):
    from transformers import AutoModelForCausalLM

    data = write_rationale_pairs_jsonl(tmp_path / "pairs.jsonl", 4)
    out = tmp_path / "out"
    res = _train(models_root["policy"], loss, data, out)
    assert res.exit_code == 0, res.output + repr(res.exception)
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    # Step 1 (the 4 examples in data order, before any update): the formula on an independent forward.
    model = AutoModelForCausalLM.from_pretrained(models_root["policy"], dtype=torch.float64).eval()
    tok = tiny_tokenizer()
    losses, r_sum = [], []
    for t in _tokenized_pairs(data, tok):
        lw, ll = (hf_logps(model, t.prompt_ids, r) for r in t.response_ids)
        lr = hf_logps(model, t.rationale_prompt_ids, t.rationale_ids)
        r_sum.append(lr)
        if loss == "rdpo_rationale":  # policy = reference at step 1: Δ = 0
            losses.append(math.log(2) - math.log(1 / (1 + math.exp(-0.1 * lr))))
        else:
            aw, al = lw / len(t.response_ids[0]), ll / len(t.response_ids[1])
            odds = (aw - math.log1p(-math.exp(aw))) - (al - math.log1p(-math.exp(al)))
            losses.append(-aw + 0.1 * math.log1p(math.exp(-odds)) - 1.0 * lr / len(t.rationale_ids))
    assert rows[0]["loss"] == pytest.approx(sum(losses) / 4, rel=1e-4)
    assert rows[0]["rationale_logps"] == pytest.approx(sum(r_sum) / 4, rel=1e-4)


def test_brain_two_step_cli_run_and_first_loss_by_hand(models_root, tmp_path):
    from transformers import AutoModelForCausalLM

    from preftune.data import to_lists

    data = write_scored_lists_jsonl(tmp_path / "lists.jsonl", 4, 4, sample_logps=True)
    out = tmp_path / "out"
    res = _train(models_root["policy"], "brain", data, out, "loss_params.tau_r=0.5")
    assert res.exit_code == 0, res.output + repr(res.exception)
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    model = AutoModelForCausalLM.from_pretrained(models_root["policy"], dtype=torch.float64).eval()
    tok = tiny_tokenizer()
    records, _ = load_and_validate(str(data), objective_shape="listwise")
    total = 0.0
    for e in to_lists(records):
        t = tokenize_example(e, tok, max_length=96, max_prompt_length=64)
        lpi = torch.tensor([hf_logps(model, t.prompt_ids, r) for r in t.response_ids], dtype=D)
        lq, lp = (torch.tensor(e.inputs[k], dtype=D) for k in ("proposal_logps", "prior_logps"))
        alpha = torch.softmax(torch.tensor(e.inputs["scores"], dtype=D) / 0.5 + lp - lq, 0)
        total += float(-(alpha * torch.log_softmax(lpi - lq, 0)).sum())
    assert rows[0]["loss"] == pytest.approx(total / 4, rel=1e-4)
    assert 1.0 <= rows[0]["effective_sample_size"] <= 4.0


# ------------------------------------------------------------------------------------------------ builders


def test_annotate_rationales_writes_trainable_pairs(models_root, tmp_path):
    from preftune.model import load_model
    from preftune.online.annotate import annotate_rationales
    from preftune.testing import write_pairs_jsonl

    src = write_pairs_jsonl(tmp_path / "pairs.jsonl", 3)
    loaded = load_model(str(models_root["policy"]))
    out = annotate_rationales(str(src), str(tmp_path / "rat.jsonl"), "llm:tiny", max_new_tokens=8, loaded=loaded,
                              log=lambda m: None)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    srcs = [json.loads(line) for line in src.read_text().splitlines()]
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == [
        (s["prompt"], s["chosen"], s["rejected"]) for s in srcs]
    assert all(isinstance(r["rationale"], str) for r in rows)


def test_brain_samples_record_the_trainers_log_probs(models_root, tmp_path):
    from preftune.model import load_model
    from preftune.online.annotate import sample_brain_data

    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"Describe the sea {i} in at most 5 words."} for i in range(2)]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = load_model(str(models_root["policy"]))
    out = sample_brain_data(str(prompts), str(tmp_path / "brain.jsonl"), "tiny", "task:word_limit", k=3,
                            max_new_tokens=6, loaded=loaded, log=lambda m: None)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and all(len(r["responses"]) == len(r["scores"]) == 3 for r in rows)
    assert all(r["prior_logps"] == r["proposal_logps"] for r in rows)
    # The recorded log-probs are those of the tokens training scores: an HF forward of the tokenised record.
    model = loaded[0].double().eval()
    tok = loaded[1]
    t = tokenize_example(Example(rows[0]["prompt"], rows[0]["responses"]), tok, max_length=1024,
                         max_prompt_length=512)
    for k, r in enumerate(t.response_ids):
        assert rows[0]["proposal_logps"][k] == pytest.approx(hf_logps(model, t.prompt_ids, r), abs=1e-4)
    records, _ = load_and_validate(str(out), objective_shape="listwise")  # valid BRAIn data
    assert records[0].proposal_logps == rows[0]["proposal_logps"]


def test_data_commands(models_root, tmp_path):
    from preftune.testing import write_pairs_jsonl

    runner = CliRunner()
    src = write_pairs_jsonl(tmp_path / "pairs.jsonl", 2)
    res = runner.invoke(app, ["data", "rationales", str(src), str(tmp_path / "rat.jsonl"), "--model",
                              f"llm:{models_root['policy']}", "--max-new-tokens", "4", "--kind", "specific"])
    assert res.exit_code == 0, res.output
    assert len((tmp_path / "rat.jsonl").read_text().splitlines()) == 2
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Name a colour in at most 3 words."}) + "\n")
    args = ["data", "brain", str(prompts), str(tmp_path / "brain.jsonl"), "--model", str(models_root["policy"]),
            "--k", "2", "--max-new-tokens", "4"]
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "--judge is required" in res.output
    res = runner.invoke(app, [*args, "--judge", "task:word_limit"])
    assert res.exit_code == 0, res.output
    row = json.loads((tmp_path / "brain.jsonl").read_text())
    assert sorted(row) == ["prior_logps", "prompt", "proposal_logps", "responses", "scores"]
    prompts.write_text('{"text": "no prompt"}\n')
    res = runner.invoke(app, [*args, "--judge", "task:word_limit"])
    assert res.exit_code == 2 and f"{prompts}:1: prompt: missing" in res.output
