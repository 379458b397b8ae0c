"""Every policy objective trains by name: a 2-step `preftune train --loss NAME` on a tiny Llama and built-in
data of the objective's shape writes metrics.jsonl; data of the wrong shape is a clear error (exit 2)."""

import json
import math

import pytest
from typer.testing import CliRunner

from preftune.cli import app
from preftune.losses import all_objectives, get
from preftune.testing import (
    save_tiny_model,
    save_tiny_value_model,
    write_data_for,
    write_pairs_jsonl,
    write_unpaired_jsonl,
)

POLICY = [o.name for o in all_objectives() if o.trains == "policy"]


@pytest.fixture(scope="module")
def aux(tmp_path_factory):
    """Models shared by the whole module: the policy, a token-level reward policy, a critic."""
    root = tmp_path_factory.mktemp("objectives")
    return {
        "model": save_tiny_model(root / "policy", "llama", seed=0),
        "token_rm_model": save_tiny_model(root / "token_rm", "llama", seed=1),
        "value_model": save_tiny_value_model(root / "critic", seed=2),
        "root": root,
    }


def _train(aux, name, data, out, *extra):
    args = [
        "train",
        "--model",
        str(aux["model"]),
        "--data",
        str(data),
        "--loss",
        name,
        "--max-steps",
        "2",
        "--output",
        str(out),
    ]
    for kv in (
        "progress=false",
        "plot=false",
        "save_model=false",
        "batch_size=2",
        "max_length=64",
        "max_prompt_length=32",
        "learning_rate=1e-3",
        "warmup_ratio=0",
        f"ref_cache_dir={out}-rc",
        *extra,
    ):
        args += ["--set", kv]
    return CliRunner().invoke(app, args)


def test_every_policy_objective_is_listed():
    assert len(POLICY) >= 45 and "dpo" in POLICY and "rm_bt" not in POLICY and "diffusion_dpo" not in POLICY


@pytest.mark.parametrize("name", POLICY)
def test_two_step_train_by_name(name, aux, tmp_path):
    from preftune.train.inputs import required_config

    data = write_data_for(name, tmp_path / "data", n=8)
    extra = [f"{f}={aux[f]}" for f in required_config(get(name))]
    out = tmp_path / "out"
    res = _train(aux, name, data, out, *extra)
    assert res.exit_code == 0, res.output + repr(res.exception)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in rows), rows


@pytest.mark.parametrize(
    ("name", "writer", "needs"),
    [
        ("dpo", write_unpaired_jsonl, "preference pairs"),  # one labelled response per prompt: no pair
        ("pro", write_unpaired_jsonl, "ranked lists"),  # one response per prompt is no list
        ("tpo", write_pairs_jsonl, "triples (chosen, rejected, gold)"),  # two responses, no gold
    ],
)
def test_wrong_shape_says_what_the_objective_needs(name, writer, needs, aux, tmp_path):
    out = tmp_path / "never"
    res = _train(aux, name, writer(tmp_path / "d.jsonl", n=4), out)
    assert res.exit_code == 2, res.output
    assert f"objective '{name}' needs {needs}" in res.output
    assert "d.jsonl:1" in res.output  # and still located
    assert not out.exists()


def test_missing_data_column_is_named(aux, tmp_path):
    res = _train(aux, "madpo", write_pairs_jsonl(tmp_path / "p.jsonl", n=4), tmp_path / "never")
    assert res.exit_code == 2
    assert "objective 'madpo' needs the column(s) rm_margin" in res.output


def test_required_models_and_non_policy_objectives_are_refused(aux, tmp_path):
    pairs = write_pairs_jsonl(tmp_path / "p.jsonl", n=4)
    res = _train(aux, "tgdpo", pairs, tmp_path / "a")
    assert res.exit_code == 2 and "needs token_rm_model" in res.output
    res = _train(aux, "rm_bt", pairs, tmp_path / "b")
    assert res.exit_code == 2 and "'rm_bt' trains a reward model: use `preftune reward train`" in res.output
    res = _train(aux, "diffusion_dpo", pairs, tmp_path / "c")
    assert res.exit_code == 2 and "denoising errors of a diffusion model" in res.output


def test_inpo_reads_prev_logps_from_the_data(aux, tmp_path):
    from preftune.testing import write_pairs_with_inputs_jsonl

    data = write_pairs_with_inputs_jsonl(tmp_path / "d.jsonl", n=8, prev_logps=True)
    res = _train(aux, "inpo", data, tmp_path / "out")
    assert res.exit_code == 0, res.output
    first = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[0])
    # π_θ = π_ref at step 0 and π_t ≠ π_ref: h ≠ 0, so the loss is not (1/(2η))², its value at h = 0
    eta = get("inpo").defaults()["eta"]
    assert abs(first["loss"] - (1 / (2 * eta)) ** 2) > 1e-3


def test_triples_keep_trl_columns_and_pairs_stay_pairs(tmp_path):
    from preftune.data import load_records, to_pairs, to_triples
    from preftune.testing import write_scored_lists_jsonl, write_triples_jsonl

    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "c", "rejected": "r", "reference": "g"}) + "\n")
    recs = load_records(path)
    assert [e.responses for e in to_triples(recs)] == [["c", "r", "g"]]
    assert [e.responses for e in to_pairs(recs)] == [["c", "r"]]  # the explicit pair wins for pair objectives
    lists = load_records(write_scored_lists_jsonl(tmp_path / "l.jsonl", n=3, k=4))
    for rec, ex in zip(lists, to_triples(lists), strict=True):
        best_first = sorted(range(4), key=lambda i: -rec.scores[i])
        assert ex.responses == [
            rec.responses[best_first[1]],
            rec.responses[best_first[-1]],
            rec.responses[best_first[0]],
        ]
    assert len(load_records(write_triples_jsonl(tmp_path / "w.jsonl", n=2))[0].responses) == 3


REWARD = [o.name for o in all_objectives() if o.trains == "reward_model"]


def _reward_data(name: str, folder) -> tuple:
    """Data of the reward objective's shape and the extra --set flags it needs."""
    rows = [json.loads(x) for x in write_pairs_jsonl(folder / "pairs.jsonl", n=8).read_text().splitlines()]
    extra: list[str] = []
    if name == "rm_bt_margin":
        rows = [r | {"margin": 1.0 + i % 3} for i, r in enumerate(rows)]
    elif name == "rm_bt_scaled":
        rows = [r | {"preference_strength": 1 + i % 3} for i, r in enumerate(rows)]
    elif name == "rm_regression":  # HelpSteer2-style rated rows, one response each
        rows = [{"prompt": r["prompt"], "response": r["chosen"], "helpfulness": i % 5} for i, r in enumerate(rows)]
        extra = ["attributes=[helpfulness]"]
    path = folder / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, extra


@pytest.mark.parametrize("name", REWARD)
def test_two_step_reward_train_by_name(name, aux, tmp_path):
    """Part G objectives train with `preftune reward train --loss NAME` (not `preftune train`)."""
    data, extra = _reward_data(name, tmp_path)
    out = tmp_path / "out"
    args = ["reward", "train", "--model", str(aux["model"]), "--data", str(data), "--loss", name,
            "--max-steps", "2", "--output", str(out)]
    for kv in ("progress=false", "plot=false", "save_model=false", "batch_size=2", "max_length=64",
               "max_prompt_length=32", "eval_fraction=0", *extra):
        args += ["--set", kv]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in rows), rows
