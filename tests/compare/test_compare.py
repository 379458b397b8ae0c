"""`preftune compare` on a tiny model through the CLI: the grid's files, equal budget (the cells of a group train
on identical pairs), skipping finished cells, resuming a killed grid, the leaderboard's pairwise outcomes on a
hand-made case, and config validation."""

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from preftune.cli import app
from preftune.compare.config import Cell, CompareConfig, load_compare_config
from preftune.compare.grid import check_output, write_config
from preftune.compare.leaderboard import pairwise_outcomes, prompt_scores, write_leaderboard
from preftune.tasks import Judgement, Task, register
from preftune.tasks.base import _REGISTRY
from preftune.testing import online_run_killed_after

TASK = "compare_letters"
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "compare"
TIME_KEYS = ("seconds",)


def _prompts(n, offset=0):
    return [[{"role": "user", "content": f"Say something about item {i}."}] for i in range(offset, offset + n)]


# A graded judge a random tiny model gets varied scores on (so there are pairs): the share of 'e' among letters.
def _letters(prompt, response, finished=True):
    letters = [c for c in response.lower() if c.isalpha()]
    s = sum(c == "e" for c in letters) / len(letters) if letters else 0.0
    return Judgement(s, s > 0.1, {})


if TASK not in _REGISTRY:
    register(Task(TASK, "test task", lambda: _prompts(40), lambda: _prompts(6, 100), _letters))

BASE = dict(model="tiny", prompts_per_iteration=4, k=4, heldout_prompts=6, heldout_samples=2, max_new_tokens=8,
            gen_batch_size=16, batch_size=2, learning_rate=1e-3, max_length=96, max_prompt_length=64, threads=1)


def _yaml(tmp_path, **extra) -> Path:
    import yaml

    cfg = {"objectives": ["dpo", "simpo"], "tasks": [TASK], "seeds": [0], "rank_bootstrap": 20, "base": BASE,
           **extra}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _compare(*args, code=0):
    res = CliRunner().invoke(app, ["compare", *map(str, args)])
    assert res.exit_code == code, res.output + (repr(res.exception) if res.exception else "")
    return res.output


def _untimed(rows):
    return [{k: v for k, v in r.items() if not str(k).endswith(TIME_KEYS)} for r in rows]


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """One finished two-cell grid (dpo, simpo on one task and seed); tests copy it before changing it."""
    tmp = tmp_path_factory.mktemp("grid")
    out = tmp / "out"
    log = _compare(_yaml(tmp), "--output", out)
    return tmp / "grid.yaml", out, log


def _cell(out, objective):
    return out / "cells" / TASK / "0" / objective


def test_grid_writes_table_plots_leaderboard_and_cells_share_pairs(grid):
    cfg_path, out, log = grid
    for f in ("table.md", "table.csv", "table.json", "success_vs_kl.png", "success_vs_length.png",
              "pairwise.jsonl", "leaderboard.md", "leaderboard.json", "leaderboard.png", "compare_config.json"):
        assert (out / f).stat().st_size > 0, f
    assert (out / "success_vs_kl.png").read_bytes()[:4] == b"\x89PNG"
    dpo, simpo = _cell(out, "dpo"), _cell(out, "simpo")
    # equal budget: the second cell trained on the first one's samples, judgements, pairs and reference
    for f in ("samples.jsonl", "judgements.jsonl", "train_input.jsonl", "reference.safetensors"):
        assert (dpo / "iter_01" / f).read_bytes() == (simpo / "iter_01" / f).read_bytes(), f
    for f in ("eval_base.json", "eval_base.heldout.jsonl"):
        assert (dpo / f).read_bytes() == (simpo / f).read_bytes(), f
    m_dpo = json.loads((dpo / "iter_01" / "manifest.json").read_text())["phases"]
    m_simpo = json.loads((simpo / "iter_01" / "manifest.json").read_text())["phases"]
    assert all("shared_from" not in m_dpo[p] for p in ("sample", "judge", "build"))
    assert [m_simpo[p]["shared_from"] for p in ("sample", "judge", "build")] == ["dpo"] * 3
    assert m_dpo["build"]["pairs"] == m_simpo["build"]["pairs"] > 0
    assert m_dpo["train"]["steps"] == m_simpo["train"]["steps"] > 0
    assert "samples and pairs from dpo" in log and "sampled and judged π_0 for its group" in log
    # the table's figures are the cells' held-out evaluations; Δ is against π_0's
    table = json.loads((out / "table.json").read_text())
    base, rows = table["cells"][0], {r["variant"]: r for r in table["cells"][1:]}
    assert base["variant"] == "base" and set(rows) == {"dpo", "simpo"}
    for name, m in (("dpo", m_dpo), ("simpo", m_simpo)):
        r = rows[name]
        assert (r["success"], r["kl"], r["len_words"], r["eos_rate"]) == (
            m["eval"]["success"], m["eval"]["kl_ref"], m["eval"]["len_words"], m["eval"]["eos_rate"])
        assert r["success_delta"] == pytest.approx(m["eval"]["success"] - base["success"])
        assert r["pairs"] == m["build"]["pairs"] and r["steps"] == m["train"]["steps"]
        # compare cells log training dynamics; the row holds the last row's per-token displacement
        last = [json.loads(x) for x in (_cell(out, name) / "iter_01" / "train" / "metrics.jsonl").read_text()
                .splitlines() if "dynamics/chosen_token_logp_delta" in x][-1]
        assert r["chosen_logp_delta"] == last["dynamics/chosen_token_logp_delta"]
        assert r["unseen_logp_delta"] == last["dynamics/unseen_token_logp_delta"]
    assert rows["dpo"]["beta"] == 0.1 and rows["simpo"]["beta"] == 2.0  # registry defaults
    means = {r["variant"]: r for r in table["means"]}
    assert means["dpo"]["success"] == rows["dpo"]["success"] and means["dpo"]["seeds"] == 1
    csv_lines = (out / "table.csv").read_text().splitlines()
    assert csv_lines[0].startswith("kind,task,seed,objective,variant") and len(csv_lines) == 1 + 3 + 3
    board = json.loads((out / "leaderboard.json").read_text())
    assert {r["system"] for r in board["leaderboard"]} == {"base", "dpo", "simpo"}
    assert board["method"] == "davidson"
    # 3 systems, 3 pairs of them, 6 held-out prompts each
    assert len((out / "pairwise.jsonl").read_text().splitlines()) == 3 * 6


def test_rerun_skips_finished_cells_and_refuses_without_resume(grid, tmp_path):
    cfg_path, out, _ = grid
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    stamps = {p: p.stat().st_mtime_ns for p in copy.rglob("iter_01/*")}
    _compare(cfg_path, "--output", copy, code=2)  # an existing grid needs --resume
    log = _compare(cfg_path, "--output", copy, "--resume")
    assert log.count("finished earlier, skipped") == 2 and "start" not in log
    assert {p: p.stat().st_mtime_ns for p in copy.rglob("iter_01/*")} == stamps


@pytest.mark.parametrize("kill", ["after_build", "never_started"])
def test_killed_grid_resumes_and_finishes(grid, tmp_path, kill):
    cfg_path, out, _ = grid
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    for f in ("table.md", "table.csv", "table.json", "leaderboard.md"):
        (copy / f).unlink()
    simpo = _cell(copy, "simpo")
    shutil.rmtree(simpo)
    if kill == "after_build":  # killed in the second cell's training: pairs built, nothing trained
        online_run_killed_after(_cell(out, "simpo"), simpo, done=("sample", "judge", "build"), t=1)
        (simpo / "report.md").unlink()
    first = _cell(copy, "dpo") / "report.md"
    stamp = first.stat().st_mtime_ns
    log = _compare(cfg_path, "--output", copy, "--resume")
    assert "cell 1/2 compare_letters/0/dpo: finished earlier, skipped" in log
    assert "cell 2/2 compare_letters/0/simpo: done" in log
    assert first.stat().st_mtime_ns == stamp
    # the resumed cell trained on the same pairs as the uninterrupted one, and evaluates the same
    new, old = (json.loads((o / "table.json").read_text())["cells"] for o in (copy, out))
    assert _untimed(new) == _untimed(old)


def test_a_failing_cell_leaves_the_others(grid, tmp_path, monkeypatch):
    import preftune.online.loop as loop

    cfg_path, out, _ = grid
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    shutil.rmtree(_cell(copy, "simpo"))
    real = loop.run_online

    def flaky(cfg, log=print):
        if cfg.loss == "simpo":
            raise FloatingPointError("loss is NaN")
        return real(cfg, log=log)

    monkeypatch.setattr(loop, "run_online", flaky)
    log = _compare(cfg_path, "--output", copy, "--resume", code=1)
    assert "simpo: FAILED (FloatingPointError: loss is NaN)" in log
    assert "1 cell failed (compare_letters/0/simpo)" in log and "--resume" in log
    assert "FloatingPointError" in (_cell(copy, "simpo") / "cell.log").read_text()
    rows = json.loads((copy / "table.json").read_text())["cells"]
    assert [r["variant"] for r in rows] == ["base", "dpo"]  # the table holds the cells that finished


def _heldout(path: Path, scores: dict[int, list[float]]) -> None:
    rows = [{"kind": "sampled", "prompt": p, "k": k, "score": s} for p, ss in scores.items()
            for k, s in enumerate(ss)]
    rows += [{"kind": "greedy", "prompt": p, "k": 0, "score": 99.0} for p in scores]  # never compared
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_leaderboard_pairwise_outcomes_on_a_constructed_case(tmp_path):
    # per-prompt means: base (0.5, 1.0, 0.0), dpo (0.75, 1.0, 0.0), simpo (0.25, 0.5, 0.1)
    cfg = CompareConfig(objectives=["dpo", "simpo"], tasks=[TASK], base=BASE, rank_bootstrap=0, rank_l2=0.0)
    root = tmp_path / "out"
    dpo, simpo = Cell(TASK, 0, "dpo").folder(root), Cell(TASK, 0, "simpo").folder(root)
    _heldout(dpo / "eval_base.heldout.jsonl", {0: [0.0, 1.0], 1: [1.0, 1.0], 2: [0.0, 0.0]})
    _heldout(dpo / "iter_01" / "heldout.jsonl", {0: [0.5, 1.0], 1: [1.0, 1.0], 2: [0.0, 0.0]})
    _heldout(simpo / "iter_01" / "heldout.jsonl", {0: [0.5, 0.0], 1: [0.0, 1.0], 2: [0.2, 0.0]})
    for f in (dpo, simpo):
        (f / "report.md").write_text("done")
    assert prompt_scores(dpo / "eval_base.heldout.jsonl") == {0: 0.5, 1: 1.0, 2: 0.0}
    write_leaderboard(cfg, root, log=lambda m: None)
    got = [(r["a"], r["b"], r["prompt"], r["winner"]) for r in map(json.loads, (root / "pairwise.jsonl").open())]
    p = f"{TASK}/0/"
    assert got == [("base", "dpo", p + "0", "b"), ("base", "dpo", p + "1", "tie"), ("base", "dpo", p + "2", "tie"),
                   ("base", "simpo", p + "0", "a"), ("base", "simpo", p + "1", "a"), ("base", "simpo", p + "2", "b"),
                   ("dpo", "simpo", p + "0", "a"), ("dpo", "simpo", p + "1", "a"), ("dpo", "simpo", p + "2", "b")]
    board = {r["system"]: r for r in json.loads((root / "leaderboard.json").read_text())["leaderboard"]}
    # dpo: beats base once, ties twice, beats simpo twice, loses once; base: 2 W 2 L 2 T; simpo 2 W 4 L
    assert {s: (r["wins"], r["losses"], r["ties"]) for s, r in board.items()} == {
        "dpo": (3, 1, 2), "base": (2, 2, 2), "simpo": (2, 4, 0)}
    assert [board[s]["rank"] for s in ("dpo", "base", "simpo")] == [1, 2, 3]
    # a tie within float noise of the two means is a tie
    assert pairwise_outcomes({"x": {0: 0.3}, "y": {0: 0.1 + 0.2}})[0]["winner"] == "tie"


def test_sweep_cells_and_folders(tmp_path):
    cfg = CompareConfig(objectives=["dpo", "slic_hf"], tasks=[TASK], seeds=[0, 1], base=BASE,
                        sweep={"beta": [0.1, 0.3], "learning_rate": [1e-3]})
    got = [c.label for c in cfg.cells()]
    assert got == [f"{TASK}/{s}/{v}" for s in (0, 1) for v in ("dpo__beta=0.1,lr=0.001", "dpo__beta=0.3,lr=0.001",
                                                                  "slic_hf__lr=0.001")]  # slic_hf has no beta
    c = cfg.cells()[1]
    assert c.folder(tmp_path) == tmp_path / "cells" / TASK / "0" / "dpo__beta=0.3,lr=0.001"
    run = cfg.cell_config(c, output="x")
    assert (run.algorithm, run.iterations, run.ref_mode, run.loss, run.beta, run.learning_rate, run.seed) == (
        "iterative_dpo", 1, "fixed", "dpo", 0.3, 1e-3, 0)
    assert run.max_new_tokens == 8 and run.progress is False  # base, and the grid's quiet default


@pytest.mark.parametrize("fields, message", [
    ({"objectives": ["dpo", "dpoo"]}, "unknown objective 'dpoo'. Objectives a compare cell trains: adpo,"),
    ({"objectives": ["kto"]}, "'kto' is unpaired, not paired"),
    ({"objectives": ["madpo"]}, "'madpo' reads rm_margin from its data"),
    ({"objectives": ["rm_bt"]}, "'rm_bt' trains a reward model, not a policy"),
    ({"objectives": []}, "list at least one objective"),
    ({"objectives": ["dpo", "dpo"]}, "listed twice: dpo"),
    ({"tasks": ["nope"]}, "unknown task 'nope'; tasks: "),
    ({"base": {**BASE, "loss": "ipo"}}, "loss is set by the grid, not base"),
    ({"base": {**BASE, "iterations": 3}}, "a compare cell is one iteration of iterative_dpo"),
    ({"base": {**BASE, "max_new_tokns": 3}}, "unknown online setting max_new_tokns"),
    ({"base": {**BASE, "max_new_tokens": 0}}, "max_new_tokens: Input should be greater than 0"),
    ({"objective_params": {"dpo": {"beta": -1}}}, "objective 'dpo': beta=-1 must be in (0, inf)"),
    ({"objective_params": {"dpo": {"gamma": 1}}}, "objective 'dpo' has no hyperparameter gamma"),
    ({"objective_params": {"ipo": {"beta": 1}}}, "names objectives not in objectives: ipo"),
    ({"sweep": {"beta": [0.1, -0.1]}}, "every value must be > 0"),
])
def test_config_errors_name_field_and_line(tmp_path, fields, message):
    path = _yaml(tmp_path, **fields)
    with pytest.raises(ValueError) as e:
        load_compare_config(str(path), {})
    assert message in str(e.value)
    key = next(iter(fields))
    lines = path.read_text().splitlines()
    line = 1 + next(i for i, x in enumerate(lines) if x.startswith(f"{key}:"))
    if key == "sweep":  # the error is in sweep.beta: its own line
        line = 1 + next(i for i, x in enumerate(lines) if x.strip().startswith("beta:"))
    assert f"{path}:{line}: field '{key}" in str(e.value)


def test_cli_error_and_resume_with_other_shared_settings_refused(tmp_path):
    out = _compare(_yaml(tmp_path, objectives=["dpo", "kto"]), "--output", tmp_path / "o", code=2)
    assert "grid.yaml:1: field 'objectives'" in out and "'kto' is unpaired" in out
    folder = tmp_path / "o"
    write_config(CompareConfig(objectives=["dpo"], tasks=[TASK], base=BASE, output=str(folder)), folder)
    grown = CompareConfig(objectives=["dpo", "ipo"], tasks=[TASK], base=BASE, output=str(folder), resume=True)
    check_output(grown, folder)  # objectives may be added
    changed = CompareConfig(objectives=["dpo"], tasks=[TASK], base={**BASE, "max_new_tokens": 9},
                            output=str(folder), resume=True)
    with pytest.raises(ValueError, match=r"other shared settings \(base.max_new_tokens\)"):
        check_output(changed, folder)
    # threads, progress bars and plots change no result: a resume may change them
    check_output(CompareConfig(objectives=["dpo"], tasks=[TASK], base={**BASE, "threads": 2, "progress": True},
                               output=str(folder), resume=True), folder)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="holds no compare grid"):
        check_output(CompareConfig(objectives=["dpo"], tasks=[TASK], base=BASE), tmp_path / "other")


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_recipes_parse(path):
    cfg = load_compare_config(str(path), {})
    assert cfg.cells() and all(cfg.cell_config(c).loss == c.objective for c in cfg.cells())
