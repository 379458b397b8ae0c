"""docs/objectives.md and README's objectives table are generated from the registry; they must match it."""

from pathlib import Path

import pytest

from preftune.losses import names
from preftune.tools.gen_docs import README_END, README_START, main, readme_block, render_docs

ROOT = Path(__file__).resolve().parents[2]
NOTES = ROOT / "docs" / "objectives_notes.md"


def test_objectives_md_matches_the_registry():
    current = (ROOT / "docs" / "objectives.md").read_text(encoding="utf-8")
    assert current == render_docs(NOTES), (
        "docs/objectives.md is out of date: run `python -m preftune.tools.gen_docs > docs/objectives.md`"
    )


def test_readme_objectives_table_matches_the_registry():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert README_START in text and README_END in text, "README.md lost its objectives table markers"
    block = README_START + text.split(README_START, 1)[1].split(README_END, 1)[0] + README_END
    assert block == readme_block(), (
        "README's objectives table is out of date: run `python -m preftune.tools.gen_docs --readme README.md`"
    )


def test_every_objective_has_a_section_and_the_trl_notes_are_appended():
    doc = render_docs(NOTES)
    for n in names():
        assert f"### `{n}`" in doc
    assert "Where TRL and the papers differ" in doc and "SparsePO" in doc


def test_the_tool_reads_paths_from_arguments_or_the_current_directory(tmp_path, monkeypatch, capsys):
    # Paths never come from the installed package's location: from the root it prints the page...
    monkeypatch.chdir(ROOT)
    main([])
    assert capsys.readouterr().out == render_docs(NOTES)
    # ...elsewhere it refuses without --notes, and --readme/--configs write where they are told.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="objectives_notes.md"):
        main([])
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\nOBJECTIVES_TABLE_PLACEHOLDER\n\nend\n", encoding="utf-8")
    main(["--readme", str(readme), "--configs", "cfg"])
    assert readme.read_text(encoding="utf-8") == f"# x\n\n{readme_block()}\n\nend\n"
    assert {p.stem for p in (tmp_path / "cfg").glob("*.yaml")} == set(names(trains="policy"))
    assert not list(tmp_path.rglob("*.tmp"))
