"""docs/objectives.md and README's objectives table are generated from the registry; they must match it."""

from pathlib import Path

from preftune.losses import names
from preftune.losses.docs import README_END, README_START, readme_block, render_docs

ROOT = Path(__file__).resolve().parents[2]


def test_objectives_md_matches_the_registry():
    current = (ROOT / "docs" / "objectives.md").read_text(encoding="utf-8")
    assert current == render_docs(), (
        "docs/objectives.md is out of date: run `python -m preftune.losses.docs > docs/objectives.md`"
    )


def test_readme_objectives_table_matches_the_registry():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert README_START in text and README_END in text, "README.md lost its objectives table markers"
    block = README_START + text.split(README_START, 1)[1].split(README_END, 1)[0] + README_END
    assert block == readme_block(), (
        "README's objectives table is out of date: run `python -m preftune.losses.docs --readme README.md`"
    )


def test_every_objective_has_a_section_and_the_trl_notes_are_appended():
    doc = render_docs()
    for n in names():
        assert f"### `{n}`" in doc
    assert "Where TRL and the papers differ" in doc and "SparsePO" in doc
