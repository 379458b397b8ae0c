"""Input validation: every problem names file, line and field; graph problems name the groups."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from preftune.rank import RankConfig, rank, read_preferences
from preftune.rank.io import RankDataError, RankError, RankWarning


def _write(tmp_path, lines, name="in.jsonl"):
    p = tmp_path / name
    p.write_text(
        "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n", encoding="utf-8"
    )
    return p


def _cfg(path, **kw):
    kw.setdefault("bootstrap", 0)
    return RankConfig(file=path, **kw)


def test_reads_comparisons_with_optional_fields_and_blank_lines(tmp_path):
    p = _write(
        tmp_path,
        [
            {"a": "x", "b": "y", "winner": "a", "judge": "gpt", "prompt": "hi"},
            "",
            {"a": "y", "b": "x", "winner": "tie", "weight": 2.5},
        ],
    )
    d = read_preferences(p)
    assert d.names == ["x", "y"] and len(d.comparisons) == 2
    np.testing.assert_array_equal(d.comparisons.line, [1, 3])
    np.testing.assert_array_equal(d.comparisons.weight, [1.0, 2.5])
    assert len(read_preferences(p, judge="gpt").comparisons) == 1


def test_unknown_winner_names_file_line_field(tmp_path):
    p = _write(tmp_path, [{"a": "x", "b": "y", "winner": "a"}, {"a": "x", "b": "y", "winner": "model_a"}])
    with pytest.raises(RankDataError) as e:
        read_preferences(p)
    assert f"{p}:2: field 'winner': unknown value 'model_a'" in str(e.value)


def test_every_bad_record_is_reported(tmp_path):
    p = _write(
        tmp_path,
        [
            {"a": "x", "winner": "a"},
            {"a": "x", "b": 3.5, "winner": "b"},
            {"a": "x", "b": "y", "winner": "a", "weight": -1},
            [1, 2],
            {"ranking": ["x", ["y", "z"]]},
            {"ranking": ["x", "x"]},
            {"foo": 1},
        ],
    )
    with pytest.raises(RankDataError) as e:
        read_preferences(p)
    msg = str(e.value)
    for needle in (
        ":1: field 'b': missing",
        ":2: field 'b': expected a system name",
        ":3: field 'weight'",
        ":4: expected a JSON object",
        ":5: field 'ranking[1]': ties inside a ranking",
        ":6: field 'ranking': system 'x' appears more than once",
        ":7: expected fields",
    ):
        assert needle in msg, needle
    assert len(e.value.problems) == 7


def test_self_comparisons_dropped_with_warning_or_error(tmp_path):
    p = _write(
        tmp_path,
        [
            {"a": "x", "b": "x", "winner": "a"},
            {"a": "x", "b": "y", "winner": "a"},
            {"a": "y", "b": "x", "winner": "a"},
        ],
    )
    with pytest.warns(RankWarning, match=r"dropped 1 self-comparison.*line\(s\) 1"):
        d = read_preferences(p)
    assert len(d.comparisons) == 2
    with pytest.raises(RankDataError, match=r":1: fields 'a'/'b': a system compared with itself"):
        read_preferences(p, self_comparisons="error")


def test_empty_file(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n\n", encoding="utf-8")
    with pytest.raises(RankDataError, match=r"empty.jsonl: the file is empty"):
        read_preferences(p)


def test_json_error_names_line(tmp_path):
    p = _write(tmp_path, [{"a": "x", "b": "y", "winner": "a"}, '{"a": "x", "b": "y", "winner": }'])
    with pytest.raises(RankDataError, match=r"in.jsonl:2: invalid JSON at column \d+"):
        read_preferences(p)


def test_non_utf8_names_line(tmp_path):
    p = tmp_path / "latin.jsonl"
    p.write_bytes(b'{"a": "x", "b": "y", "winner": "a"}\n{"a": "caf\xe9", "b": "y", "winner": "a"}\n')
    with pytest.raises(RankDataError, match=r"latin.jsonl:2: not valid UTF-8 \(byte 0xe9 at column 11\)"):
        read_preferences(p)


def test_missing_file():
    with pytest.raises(RankError, match="cannot read"):
        read_preferences("/nonexistent/file.jsonl")


def test_disconnected_graph_lists_components(tmp_path):
    recs = [
        {"a": "a1", "b": "a2", "winner": "a"},
        {"a": "a2", "b": "a1", "winner": "a"},
        {"a": "b1", "b": "b2", "winner": "a"},
        {"a": "b2", "b": "b1", "winner": "tie"},
    ]
    p = _write(tmp_path, recs)
    with pytest.raises(RankError, match=r"disconnected: 2 groups.*\{a1, a2\} \| \{b1, b2\}.*--l2"):
        rank(read_preferences(p), _cfg(p))
    with pytest.warns(RankWarning, match="disconnected"):
        board = rank(read_preferences(p), _cfg(p, l2=0.1))
    assert np.all(np.isfinite(board.rating))


def test_undefeated_system_needs_prior(tmp_path):
    recs = [
        {"a": "top", "b": "x", "winner": "a"},
        {"a": "x", "b": "y", "winner": "a"},
        {"a": "y", "b": "x", "winner": "a"},
    ]
    p = _write(tmp_path, recs)
    with pytest.raises(RankError, match=r"infinite; groups from undefeated to winless: \{top\} \| \{x, y\}"):
        rank(read_preferences(p), _cfg(p))
    with pytest.warns(RankWarning):
        board = rank(read_preferences(p), _cfg(p, l2=0.5))
    assert board.rows()[0]["system"] == "top"


def test_rankings_need_pl_and_unknown_anchor(tmp_path):
    p = _write(tmp_path, [{"ranking": ["x", "y", "z"]}, {"ranking": ["z", "y", "x"]}])
    with pytest.raises(RankError, match="--method pl"):
        rank(read_preferences(p), _cfg(p, method="bt"))
    with pytest.raises(RankError, match="--anchor 'nope' is not a system"):
        rank(read_preferences(p), _cfg(p, method="pl", anchor="nope"))


def test_config_validation():
    with pytest.raises(ValueError):
        RankConfig(file="x", method="glicko")
    with pytest.raises(ValueError, match="davidson applies to bt only"):
        RankConfig(file="x", method="elo", ties="davidson")
    assert RankConfig(file="x", formats="md, png").formats == ["md", "png"]
    assert RankConfig(file="x", method="davidson").ties == "davidson"


def test_rank_imports_without_heavy_libraries():
    import subprocess

    code = (
        "import sys, preftune.rank as r; r.rank; r.run_rank; import preftune.rank.report; "
        "bad = [m for m in ('transformers', 'accelerate', 'datasets') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
