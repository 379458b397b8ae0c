"""The command line: options generated from the config fields (one help text per option), flags that
override a YAML recipe only when given, and `preftune losses` in every format."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path
from typing import Literal

import pytest
import typer
from pydantic import BaseModel, Field
from typer.testing import CliRunner

from preftune.cli import _HEADERS, app
from preftune.cli.options import config_command, help_text
from preftune.losses import all_objectives, get, names
from preftune.rank.config import RankConfig
from preftune.reward.config import RewardConfig
from preftune.train.config import TrainConfig

runner = CliRunner()


def _click_command(*path: str):
    cmd = typer.main.get_command(app)
    for name in path:
        cmd = cmd.commands[name]
    return cmd


# ------------------------------------------------------------------ options from config fields ---
@pytest.mark.parametrize(
    ("path", "config"),
    [(("train",), TrainConfig), (("reward", "train"), RewardConfig), (("rank",), RankConfig)],
)
def test_every_generated_option_has_its_fields_help(path, config):
    params = {p.name: p for p in _click_command(*path).params}
    generated = [n for n in params if n in config.model_fields]
    assert len(generated) >= 9, generated
    for name in generated:
        if name == "loss" and config is RewardConfig:
            continue  # the field's text plus the registry's list, checked below
        assert params[name].help == help_text(config.model_fields[name].description), name


def test_train_and_reward_train_keep_the_flags_users_know():
    for path, extra in ((("train",), ["--beta"]), (("reward", "train"), ["--eval-data"])):
        opts = {o for p in _click_command(*path).params for o in (*p.opts, *p.secondary_opts)}
        known = ["--model", "--data", "--loss", "--output", "-o", "--max-steps", "--lora", "--no-lora", "--resume"]
        assert {*known, "--skip-invalid", "--set", *extra} <= opts, path


def test_reward_loss_help_lists_the_registrys_reward_objectives():
    res = runner.invoke(app, ["reward", "train", "--help"], env={"COLUMNS": "400"})
    assert res.exit_code == 0, res.output
    line = next(x for x in res.output.splitlines() if "--loss" in x)
    reward = [o.name for o in all_objectives() if o.trains == "reward_model"]
    assert len(reward) >= 5
    assert f"({', '.join(reward)})" in line
    assert RewardConfig.model_fields["loss"].description in line


def test_help_does_not_import_torch():
    code = (
        "import sys; from typer.testing import CliRunner; from preftune.cli import app; "
        "r = [CliRunner().invoke(app, a).exit_code for a in (['--help'], ['train', '--help'], ['rank', '-h'])]; "
        "print(r, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[0,", "0,", "0]", "False"]


# ------------------------------------------------------------ flags override YAML only when given ---
def _stub(monkeypatch, module: str, **attrs):
    """Replace ``module`` (imported lazily by a command) with one holding ``attrs``."""
    monkeypatch.setitem(sys.modules, module, types.SimpleNamespace(**attrs))


def _capture(result):
    seen = []

    def run(cfg, *args, **kwargs):
        seen.append(cfg)
        return result

    return seen, run


def test_train_flags_override_the_recipe_only_when_given(tmp_path, monkeypatch):
    done = types.SimpleNamespace(steps=0, output_dir=tmp_path, model_dir=None)
    seen, fake = _capture(done)
    _stub(monkeypatch, "preftune.train.trainer", train=fake)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("loss: ipo\nbeta: 0.3\nlora: true\nmax_steps: 7\nbatch_size: 2\n", encoding="utf-8")

    assert runner.invoke(app, ["train", str(recipe), "--max-steps", "3"]).exit_code == 0
    cfg = seen.pop()
    assert (cfg.loss, cfg.beta, cfg.lora, cfg.max_steps, cfg.batch_size) == ("ipo", 0.3, True, 3, 2)

    res = runner.invoke(app, ["train", str(recipe), "--no-lora", "--loss", "dpo", "-o", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    cfg = seen.pop()
    assert (cfg.loss, cfg.beta, cfg.lora, cfg.max_steps, cfg.output) == ("dpo", 0.3, False, 7, str(tmp_path / "o"))

    # --set is applied after the flags (as before the options were generated)
    assert runner.invoke(app, ["train", str(recipe), "--max-steps", "3", "--set", "max_steps=5"]).exit_code == 0
    assert seen.pop().max_steps == 5

    # no recipe: the config's defaults
    assert runner.invoke(app, ["train", "--resume", "--skip-invalid"]).exit_code == 0
    cfg = seen.pop()
    assert (cfg.loss, cfg.resume, cfg.skip_invalid, cfg.lora) == ("dpo", True, True, False)


def test_train_invalid_flag_value_is_a_user_error(monkeypatch):
    _stub(monkeypatch, "preftune.train.trainer", train=lambda cfg: pytest.fail("trained"))
    res = runner.invoke(app, ["train", "--precision", "fp8"])
    assert res.exit_code == 2 and "fp8" in res.output
    res = runner.invoke(app, ["train", "--loss", "rm_bt"])
    assert res.exit_code == 2 and "preftune reward train" in res.output


def test_reward_train_flags_override_the_recipe_only_when_given(tmp_path, monkeypatch):
    done = types.SimpleNamespace(steps=0, output_dir=tmp_path, model_dir=None, metrics=[{"eval/loss": 0.5}])
    seen, fake = _capture(done)
    _stub(monkeypatch, "preftune.reward.trainer", train_reward=fake)
    recipe = tmp_path / "rm.yaml"
    recipe.write_text("loss: rm_gpm\ngpm_dim: 4\nlora: true\ndata: a.jsonl\n", encoding="utf-8")
    res = runner.invoke(app, ["reward", "train", str(recipe), "--eval-data", "b.jsonl", "--max-steps", "2"])
    assert res.exit_code == 0, res.output
    assert "held-out loss: 0.5000" in res.output
    cfg = seen.pop()
    assert (cfg.loss, cfg.gpm_dim, cfg.lora, cfg.data, cfg.eval_data, cfg.max_steps) == (
        "rm_gpm", 4, True, "a.jsonl", "b.jsonl", 2)


def test_rank_flags_override_the_recipe_only_when_given(tmp_path, monkeypatch):
    seen, fake = _capture(None)
    _stub(monkeypatch, "preftune.rank.api", run_rank=fake)
    recipe = tmp_path / "rank.yaml"
    recipe.write_text("method: elo\nbootstrap: 0\nk_factor: 8\nformats: [md]\n", encoding="utf-8")
    res = runner.invoke(app, ["rank", "x.jsonl", "--config", str(recipe), "--k-factor", "16"])
    assert res.exit_code == 0, res.output
    cfg = seen.pop()
    assert (cfg.method, cfg.bootstrap, cfg.k_factor, cfg.formats, cfg.file) == ("elo", 0, 16.0, ["md"], Path("x.jsonl"))
    # without a recipe: RankConfig's defaults; --format takes a comma-separated list
    assert runner.invoke(app, ["rank", "x.jsonl", "--format", "md,csv", "-o", str(tmp_path)]).exit_code == 0
    cfg = seen.pop()
    assert cfg.formats == ["md", "csv"] and cfg.bootstrap == RankConfig.model_fields["bootstrap"].default


def test_demo_flags_override_the_preset_only_when_given(monkeypatch):
    import preftune.recipes.demo as demo

    seen, fake = _capture(None)
    monkeypatch.setattr(demo, "run_demo", fake)
    res = runner.invoke(app, ["demo", "--quick", "--iterations", "1", "--set", "seed=3", "-o", "runs/x"])
    assert res.exit_code == 0, res.output
    expected = demo.demo_config(True, iterations=1, seed=3, output="runs/x")
    assert seen.pop().model_dump() == expected.model_dump()


# --------------------------------------------------------------------------- the helper itself ---
class _Toy(BaseModel):
    file: Path = Field(description="the input [one file]")
    name: str | None = Field(None, description="a name")
    mode: Literal["a", "b"] = Field("a", description="a mode")
    flag: bool = Field(True, description="a switch")
    tags: list[str] = Field(default_factory=lambda: ["x", "y"], description="tags")
    rate: float = Field(1 / 3, description="a rate")


def _toy_app(seen: list):
    toy = typer.Typer()

    @config_command(toy, "run", _Toy, "file", ("name", "-n"), "mode", "flag", ("tags", "--tag"), "rate")
    def run(extra: int = typer.Option(0, "--extra"), *, overrides: dict) -> None:
        seen.append((extra, overrides))

    @toy.callback()
    def _root() -> None:
        """Two commands so that `run` is a sub-command."""

    return toy


def test_config_command_passes_only_what_the_command_line_gives():
    seen: list = []
    toy = _toy_app(seen)
    assert runner.invoke(toy, ["run", "f.txt"]).exit_code == 0
    assert seen.pop() == (0, {"file": Path("f.txt")})
    res = runner.invoke(toy, ["run", "f.txt", "-n", "z", "--mode", "b", "--no-flag", "--tag", "p, q", "--rate", "2",
                              "--extra", "4"])
    assert res.exit_code == 0, res.output
    assert seen.pop() == (4, {"file": Path("f.txt"), "name": "z", "mode": "b", "flag": False, "tags": ["p", "q"],
                              "rate": 2.0})
    res = runner.invoke(toy, ["run", "f.txt", "--mode", "c"])
    assert res.exit_code == 2 and not seen


def test_config_command_help_shows_field_defaults_and_text():
    res = runner.invoke(_toy_app([]), ["run", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    out = res.output
    assert "the input [one file]" in out  # rich markup would eat the brackets unescaped
    assert "[default: x,y]" in out and "[default: 0.333333]" in out and "[default: flag]" in out
    assert "--no-flag" in out and "--tag" in out and "--tags" not in out


def test_config_command_refuses_what_it_cannot_express():
    class Bad(BaseModel):
        params: dict[str, float] = Field(default_factory=dict, description="d")

    with pytest.raises(TypeError, match="--set"):
        config_command(typer.Typer(), "x", Bad, "params")
    with pytest.raises(KeyError, match="no field 'nope'"):
        config_command(typer.Typer(), "x", _Toy, "nope")
    with pytest.raises(TypeError, match="overrides"):
        config_command(typer.Typer(), "x", _Toy, "name")(lambda: None)


# ------------------------------------------------------------------------------ preftune losses ---
def test_losses_piped_default_is_one_line_per_objective():
    res = runner.invoke(app, ["losses"], env={"COLUMNS": "80"})  # CliRunner's stdout is not a terminal
    assert res.exit_code == 0, res.output
    lines = res.output.rstrip("\n").split("\n")
    assert lines[0].split() == list(_HEADERS)
    every = names()
    assert len(lines) == 1 + len(every)
    firsts = [line.split()[0] for line in lines[1:]]
    assert firsts == every  # each name starts exactly one line: nothing wrapped onto a line of its own
    dpo = next(line for line in lines if line.startswith("dpo "))
    assert get("dpo").arxiv in dpo and "beta=0.1" in dpo


def test_losses_markdown_table():
    res = runner.invoke(app, ["losses", "--format", "md"])
    assert res.exit_code == 0, res.output
    lines = res.output.rstrip("\n").split("\n")
    assert lines[0] == "| " + " | ".join(_HEADERS) + " |"
    assert len(lines) == 2 + len(names())
    for line, o in zip(lines[2:], all_objectives(), strict=True):
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        assert len(cells) == len(_HEADERS)
        assert cells[0] == o.name and cells[_HEADERS.index("paper")] == o.paper


def test_losses_json_has_the_registry_fields():
    res = runner.invoke(app, ["losses", "--format", "json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert [r["name"] for r in rows] == names()
    for r in rows:
        o = get(r["name"])
        assert r["paper"] == o.paper and r["arxiv"] == o.arxiv and r["shape"] == o.shape
        assert r["reference"] == o.reference and r["trains"] == o.trains and r["normalisation"] == o.normalisation
        assert r["defaults"] == o.defaults() and r["inputs"] == list(o.inputs) and r["columns"] == list(o.columns)


def test_losses_table_when_asked():
    res = runner.invoke(app, ["losses", "--format", "table"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "preftune objectives" in res.output
    for n in names():
        assert f" {n} " in res.output, n
    assert runner.invoke(app, ["losses", "--format", "html"]).exit_code == 2
