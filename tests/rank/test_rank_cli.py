"""`preftune rank` end to end: table, files, exit codes."""

from __future__ import annotations

import csv
import json

import numpy as np
from typer.testing import CliRunner

from preftune.cli import app

from ._sim import bt_battles, write_battles


def _battles(tmp_path, n=600):
    rng = np.random.default_rng(0)
    a, b, w = bt_battles(np.array([0.0, 0.5, 1.0, -0.5]), n, rng, tie_rate=0.1)
    return write_battles(tmp_path / "battles.jsonl", a, b, w, names=["base", "mid", "best", "weak"])


def test_cli_writes_all_formats(tmp_path):
    f = _battles(tmp_path)
    out = tmp_path / "out"
    res = CliRunner().invoke(
        app,
        ["rank", str(f), "--bootstrap", "50", "--anchor", "base", "--anchor-rating", "1114", "-o", str(out)],
    )
    assert res.exit_code == 0, res.output
    assert "best" in res.output and "95% CI" in res.output
    for ext in ("md", "csv", "json", "png"):
        assert (out / f"leaderboard.{ext}").stat().st_size > 0
    rows = list(csv.DictReader((out / "leaderboard.csv").open()))
    assert rows[0]["system"] == "best"
    data = json.loads((out / "leaderboard.json").read_text())
    assert data["config"]["anchor"] == "base"
    base = next(r for r in data["leaderboard"] if r["system"] == "base")
    assert base["rating"] == 1114.0
    m = np.array(data["win_prob"]["matrix"])
    np.testing.assert_allclose(m + m.T, 1.0, atol=1e-5)
    assert (out / "leaderboard.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_methods_and_formats(tmp_path):
    f = _battles(tmp_path)
    for method in ("elo", "davidson", "pl"):
        out = tmp_path / method
        res = CliRunner().invoke(
            app, ["rank", str(f), "--method", method, "--bootstrap", "10", "-o", str(out), "--format", "md"]
        )
        assert res.exit_code == 0, res.output
        assert [p.name for p in out.iterdir()] == ["leaderboard.md"]
    assert "order" in CliRunner().invoke(app, ["rank", str(f), "--method", "elo", "--bootstrap", "0"]).output


def test_cli_yaml_config_with_flag_override(tmp_path):
    f = _battles(tmp_path)
    cfg = tmp_path / "rank.yaml"
    cfg.write_text(f"file: {f}\nmethod: elo\nbootstrap: 0\n", encoding="utf-8")
    res = CliRunner().invoke(app, ["rank", str(f), "--config", str(cfg), "--method", "bt"])
    assert res.exit_code == 0, res.output
    assert "Bradley-Terry" in res.output


def test_cli_errors_exit_2(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": "x", "b": "y", "winner": "draw"}\n', encoding="utf-8")
    res = CliRunner().invoke(app, ["rank", str(bad)])
    assert res.exit_code == 2
    assert "bad.jsonl:1: field 'winner'" in res.output
    res = CliRunner().invoke(app, ["rank", str(bad), "--bootstrap", "-1"])
    assert res.exit_code == 2 and "--bootstrap" in res.output
