import json

from preftune.online.generate import Generations, Sample
from preftune.tasks import get_task
from preftune.tasks.demo import DemoConfig, build_pairs, run_demo


def _gens():
    p1 = [{"role": "user", "content": "What is tea? Answer in at most 10 words."}]
    p2 = [{"role": "user", "content": "What is rice? Answer in at most 10 words."}]
    p3 = [{"role": "user", "content": "What are maps? Answer in at most 10 words."}]
    rows = [
        [
            Sample("w " * 30, [1] * 40, False),
            Sample("Tea is a drink.", [1] * 6, True),
            Sample("w " * 14, [1] * 20, True),
            Sample("Tea is a hot drink.", [1] * 7, True),
        ],
        [Sample("w " * 30, [1] * 40, False), Sample("v " * 31, [1] * 40, False)],  # all score 0
        [Sample("Maps show places.", [1] * 5, True), Sample("Maps show places.", [1] * 5, True)],
    ]
    return Generations([p1, p2, p3], [[1], [1], [1]], rows)


def test_build_pairs_best_vs_worst_and_skips_ties():
    task = get_task("word_limit")
    gens = _gens()
    judged = [
        [task.judge(p, s.text, s.finished) for s in row]
        for p, row in zip(gens.prompts, gens.samples, strict=False)
    ]
    examples, rows = build_pairs(gens, judged)
    assert len(examples) == 1  # prompts 2 and 3: every sample scored the same
    ex = examples[0]
    # best: success, the shorter of the two successes; worst: the cut one (score 0)
    assert ex.responses == [
        [{"role": "assistant", "content": "Tea is a drink."}],
        [{"role": "assistant", "content": ("w " * 30)}],
    ]
    assert ex.prompt == gens.prompts[0]
    assert rows[0]["chosen_score"] == 1.0 and rows[0]["rejected_score"] == 0.0 and rows[0]["chosen_success"]
    # tie_break="any": prompt 2 is paired (texts differ), prompt 3 still not (identical texts)
    examples, _ = build_pairs(gens, judged, tie_break="any")
    assert len(examples) == 2


def test_quick_demo_writes_the_report(tmp_path):
    out = tmp_path / "demo"
    res = run_demo(DemoConfig.quick(output=str(out), progress=False), log=lambda *_: None)
    report = (out / "report.md").read_text()
    for section in (
        "# preftune demo: word_limit",
        "## Results (held-out)",
        "## Timings",
        "## On-policy data",
        "## Examples (same held-out prompt, sample 0)",
        "## Where the figures come from",
        "## Settings",
        "success rate (95% CI)",
        "mean length (words)",
        "mean length (tokens)",
        "KL to base",
        "before_after.png",
        "train/training_curves.png",
    ):
        assert section in report, section
    for f in (
        "before_after.png",
        "results.json",
        "heldout_samples.jsonl",
        "pairs.jsonl",
        "demo_config.json",
        "train/training_curves.png",
        "train/metrics.jsonl",
    ):
        assert (out / f).exists(), f
    results = json.loads((out / "results.json").read_text())
    assert results["before"]["success"]["n"] == 4 * 2 == res.before.success.n
    assert results["after"]["kl"]["n"] == 8
    assert res.pairs == results["pairs"] > 0
    assert {"load model", "KL estimate", "total"} <= set(res.timings)
    lines = (out / "heldout_samples.jsonl").read_text().splitlines()
    assert len(lines) == 16


def test_cli_demo_quick(tmp_path):
    from typer.testing import CliRunner

    from preftune.cli import app

    out = tmp_path / "cli-demo"
    res = CliRunner().invoke(
        app,
        ["demo", "--quick", "--output", str(out), "--set", "heldout_prompts=2", "--set", "progress=false"],
    )
    assert res.exit_code == 0, res.output
    assert "held-out success:" in res.output and (out / "report.md").exists()
    assert json.loads((out / "demo_config.json").read_text())["heldout_prompts"] == 2
    bad = CliRunner().invoke(app, ["demo", "--quick", "--set", "k=1"])
    assert bad.exit_code == 2
