"""Read preference data from JSONL, JSON, Parquet, a saved HF dataset or a ``datasets.Dataset``.

Reading has two steps: *rows* (raw dicts with their line numbers; unreadable lines become
:class:`DataIssue` s, never crashes) and *layouts* (one table mapping the common flat layouts onto
:class:`PreferenceRecord`). The layout is detected once per source from the keys of all rows, so a
row that lacks a column of its file's layout is reported as a missing field, not as a new layout.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .schema import DataError, DataIssue, PreferenceRecord

Row = tuple[dict[str, Any], int]  # (raw row, 1-based line)

# Column pairs that give the chosen/rejected responses a score (UltraFeedback-binarized et al.).
PAIR_SCORE_KEYS = (
    ("score_chosen", "score_rejected"),
    ("chosen_score", "rejected_score"),
    ("chosen_rating", "rejected_rating"),
    ("chosen_reward", "rejected_reward"),
)
# The column that scores a single rated response; the first one present wins (HelpSteer2 first).
RATING_KEYS = ("helpfulness", "score", "rating", "reward")


# --------------------------------------------------------------------------------------------
# Rows: one reader per source kind, each yielding (row, line) and appending unreadable lines.
# --------------------------------------------------------------------------------------------


def jsonl_rows(path: Path, issues: list[DataIssue]) -> Iterator[Row]:
    """JSON objects of a JSONL file with their lines; unreadable lines (UTF-8, JSON, not an object) go to
    ``issues`` located by file and line. Every JSONL reader of preftune reads through here."""
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                issues.append(
                    DataIssue(
                        str(path),
                        line_no,
                        "<line>",
                        f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})",
                        kind="read",
                    )
                )
                continue
            if line_no == 1:
                text = text.lstrip("\ufeff")  # a UTF-8 byte-order mark is legal, not data
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                issues.append(
                    DataIssue(
                        str(path), line_no, "<line>", f"invalid JSON: {e.msg} (column {e.colno})", kind="read"
                    )
                )
                continue
            if not isinstance(row, dict):
                issues.append(
                    DataIssue(
                        str(path),
                        line_no,
                        "<line>",
                        f"expected a JSON object, got {type(row).__name__}",
                        kind="read",
                    )
                )
                continue
            yield row, line_no


def _json_rows(path: Path, issues: list[DataIssue]) -> Iterator[Row]:
    """A JSON array of objects; each row gets the line its object starts on."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        issues.append(
            DataIssue(str(path), line, "<file>", f"not valid UTF-8 (byte 0x{data[e.start]:02x})", kind="read")
        )
        return
    try:
        yield from _walk_json_array(text, str(path), issues)
    except json.JSONDecodeError as e:
        issues.append(
            DataIssue(str(path), e.lineno, "<file>", f"invalid JSON: {e.msg} (column {e.colno})", kind="read")
        )


def _walk_json_array(text: str, source: str, issues: list[DataIssue]) -> Iterator[Row]:
    # raw_decode element by element (rather than json.loads) so each object keeps its line number;
    # its errors carry line/column of the whole document.
    decoder, ws = json.JSONDecoder(), " \t\r\n"
    i = len(text) - len(text.lstrip(ws))
    if text[i : i + 1] != "[":
        obj = json.loads(text)  # raises a located syntax error if the document is broken
        issues.append(
            DataIssue(
                source, 1, "<file>", f"expected a JSON array of objects, got {type(obj).__name__}", kind="read"
            )
        )
        return
    i, line, counted = i + 1, 1, 0
    while True:
        i += len(text[i:]) - len(text[i:].lstrip(ws))
        if text[i : i + 1] == "]":
            return
        line += text.count("\n", counted, i)
        counted = i
        obj, i = decoder.raw_decode(text, i)
        if isinstance(obj, dict):
            yield obj, line
        else:
            issues.append(
                DataIssue(
                    source, line, "<line>", f"expected a JSON object, got {type(obj).__name__}", kind="read"
                )
            )
        i += len(text[i:]) - len(text[i:].lstrip(ws))
        sep = text[i : i + 1]
        if sep == ",":
            i += 1
        elif sep != "]":
            raise json.JSONDecodeError("expected ',' or ']' after an array element", text, i)


def _parquet_rows(path: Path, issues: list[DataIssue]) -> Iterator[Row]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    for i, row in enumerate(table.to_pylist()):
        yield row, i + 1


def _dataset_rows(ds: Any) -> Iterator[Row]:
    for i, row in enumerate(ds):
        yield dict(row), i + 1


def _pick_split(dsd: Any, split: str | None, source: str) -> Any:
    """A DatasetDict's split (default ``train``); a clear error lists the splits there are."""
    name = split or "train"
    if name not in dsd:
        raise DataError(
            [
                DataIssue(
                    source,
                    0,
                    "<split>",
                    f"no split {name!r}; the dataset has {', '.join(sorted(dsd)) or 'none'}",
                    kind="read",
                )
            ]
        )
    return dsd[name]


_FILE_READERS: dict[str, Callable[[Path, list[DataIssue]], Iterator[Row]]] = {
    ".jsonl": jsonl_rows,
    ".ndjson": jsonl_rows,
    ".json": _json_rows,
    ".parquet": _parquet_rows,
}


def read_rows(source: Any, *, split: str | None = None, issues: list[DataIssue]) -> tuple[str, Iterator[Row]]:
    """``(source name, rows)`` of a path, a saved dataset folder, a Dataset(Dict) or a list of dicts."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            import datasets

            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = _pick_split(ds, split, str(path))
            return str(path), _dataset_rows(ds)
        if not path.exists():
            raise FileNotFoundError(f"no such data file or folder: {path}")
        reader = _FILE_READERS.get(path.suffix.lower())
        if reader is None:
            raise ValueError(
                f"{path}: unsupported data file type {path.suffix!r}; "
                f"use one of {', '.join(_FILE_READERS)} or a saved HF dataset folder"
            )
        return str(path), reader(path, issues)
    if isinstance(source, list):
        return "<memory>", ((dict(r), i + 1) for i, r in enumerate(source))
    if hasattr(source, "column_names") and isinstance(source.column_names, dict):  # DatasetDict
        return "<dataset>", _dataset_rows(_pick_split(source, split, "<dataset>"))
    if hasattr(source, "column_names"):  # datasets.Dataset, duck-typed so `datasets` stays unimported
        name = getattr(getattr(source, "info", None), "dataset_name", None) or "<dataset>"
        return name, _dataset_rows(source)
    raise TypeError(f"cannot read preference data from a {type(source).__name__}")


# --------------------------------------------------------------------------------------------
# Layouts: the flat formats seen in the wild, mapped onto PreferenceRecord.
# --------------------------------------------------------------------------------------------


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _numeric(v: Any) -> bool:
    """A number, or a non-empty list of numbers: the values that may become model inputs."""
    return is_number(v) or (isinstance(v, list) and bool(v) and all(is_number(x) for x in v))


def _role(message: Any) -> Any:
    return message.get("role") if isinstance(message, dict) else None


def _common_prefix(lists: list[list]) -> int:
    n = min(len(x) for x in lists)
    for i in range(n):
        if any(x[i] != lists[0][i] for x in lists[1:]):
            return i
    return n


def _split(prompt: Any, responses: list[Any], columns: list[str]) -> tuple[Any, list[Any], dict[str, str]]:
    """:func:`split_conversations`, plus ``origin`` entries naming where each moved message was in
    the source (``prompt[1]`` -> ``chosen[1]``, ``responses[0][0]`` -> ``chosen[4]``), so that
    validation names the message the file has. ``columns`` names the responses' source fields."""
    convs = [(i, r) for i, r in enumerate(responses) if isinstance(r, list)]
    if not convs:
        return prompt, responses, {}
    if isinstance(prompt, list):
        n = len(prompt)
        cuts = [n if isinstance(r, list) and r[:n] == prompt else 0 for r in responses]
        return prompt, _cut(responses, cuts), _moved(responses, cuts, columns)
    n = _common_prefix([r for _, r in convs])
    # With one response (or identical ones) the whole conversation is "shared": keep the trailing
    # assistant turns as the response, which is what was being rated.
    first, conv = convs[0]
    while n > 0 and _role(conv[n - 1]) == "assistant":
        n -= 1
    if n > 0:
        cuts = [n if isinstance(r, list) else 0 for r in responses]
        origin = {f"prompt[{j}]": f"{columns[first]}[{j}]" for j in range(n)}
        return conv[:n], _cut(responses, cuts), origin | _moved(responses, cuts, columns)
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}], responses, {}
    return prompt, responses, {}


def _cut(responses: list[Any], cuts: list[int]) -> list[Any]:
    return [r[c:] if c else r for r, c in zip(responses, cuts, strict=True)]


def _moved(responses: list[Any], cuts: list[int], columns: list[str]) -> dict[str, str]:
    return {
        f"responses[{i}][{j}]": f"{columns[i]}[{c + j}]"
        for i, (r, c) in enumerate(zip(responses, cuts, strict=True))
        if c
        for j in range(len(r) - c)
    }


def split_conversations(prompt: Any, responses: list[Any]) -> tuple[Any, list[Any]]:
    """Separate a shared prompt from responses given as chat messages.

    * explicit prompt messages: responses that repeat them (full conversations) lose that prefix;
    * otherwise (TRL's implicit-prompt form, UltraFeedback): the messages all responses share are
      the prompt, backed off so each response starts at its final assistant turn(s);
    * a text prompt with assistant-only responses becomes a single user message.
    """
    prompt, responses, _ = _split(prompt, responses, [f"responses[{i}]" for i in range(len(responses))])
    return prompt, responses


# Anthropic HH-RLHF (the DPO paper's dialogue data): each of chosen/rejected is a whole transcript,
# "\n\nHuman: …\n\nAssistant: …", and the two differ only in the last assistant turn.
_HH_MARKER = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}
HH_FORM = "'\\n\\nHuman: … \\n\\nAssistant: …'"


def parse_transcript(text: str) -> list[dict[str, str]] | None:
    """The turns of an HH-RLHF transcript as chat messages (Human -> user, Assistant -> assistant,
    contents stripped), or ``None`` when ``text`` does not start with a ``Human:``/``Assistant:`` turn.
    Turn order is left to validation, which reports it like any conversation's."""
    parts = _HH_MARKER.split(text)  # [before the first marker, role, content, role, content, ...]
    if len(parts) < 3 or parts[0].strip():
        return None
    return [{"role": _HH_ROLES[parts[k]], "content": parts[k + 1].strip()} for k in range(1, len(parts), 2)]


PAIR_COLUMNS = ["chosen", "rejected"]


def _pair_fields(row: dict, prompt: Any, responses: list[Any], moved: dict[str, str]) -> dict:
    out = dict(
        prompt=prompt,
        responses=responses,
        pairs=[(0, 1)],
        origin={"responses[0]": "chosen", "responses[1]": "rejected"} | moved,
    )
    for ck, rk in PAIR_SCORE_KEYS:
        if ck in row and rk in row:
            out["scores"] = [row[ck], row[rk]]
            out["origin"] |= {"scores": f"{ck}/{rk}", "scores[0]": ck, "scores[1]": rk}
            out["consumed"] = (ck, rk)
            break
    return out


def _from_pair(row: dict) -> dict:
    prompt, responses, moved = _split(row.get("prompt"), [row.get(c) for c in PAIR_COLUMNS], PAIR_COLUMNS)
    return _pair_fields(row, prompt, responses, moved)


def _from_transcripts(row: dict) -> dict:
    """chosen/rejected of a source without a prompt column: whole conversations whose shared
    beginning is the prompt. HH-RLHF text transcripts are parsed into chat messages first, so a
    chat model trains on its own template rather than on the "Human:"/"Assistant:" text format."""
    responses = [row.get(c) for c in PAIR_COLUMNS]
    reasons = {}
    if all(isinstance(r, str) for r in responses):
        parsed = [parse_transcript(r) for r in responses]
        if None in parsed:
            column = PAIR_COLUMNS[parsed.index(None)]
            reasons["prompt"] = (
                f"there is no prompt column and {column} is not an Anthropic HH transcript "
                f"({HH_FORM}) whose shared beginning would be the prompt"
            )
        else:
            responses = parsed
    prompt, responses, moved = _split(None, responses, PAIR_COLUMNS)
    if prompt is None and not reasons and all(isinstance(r, list) for r in responses):
        reasons["prompt"] = "chosen and rejected share no beginning to take as the prompt (their first turns differ)"
    return _pair_fields(row, prompt, responses, moved) | {"missing_reasons": reasons}


def _from_triple(row: dict) -> dict:
    """TRL's TPO layout: prompt/chosen/rejected/reference. Responses keep the columns' order; the pair
    (chosen, rejected) is explicit, so pair objectives train on it exactly as on a plain pair, and the
    ranking (reference, chosen, rejected) orders the list for listwise and triple (TPO) objectives."""
    columns = ["chosen", "rejected", "reference"]
    prompt, responses, moved = _split(row.get("prompt"), [row.get(c) for c in columns], columns)
    return dict(
        prompt=prompt,
        responses=responses,
        pairs=[(0, 1)],
        ranking=[2, 0, 1],
        origin={f"responses[{i}]": c for i, c in enumerate(columns)} | moved,
    )


def _from_unpaired(row: dict) -> dict:
    prompt, responses, moved = _split(row.get("prompt"), [row.get("completion")], ["completion"])
    return dict(
        prompt=prompt,
        responses=responses,
        labels=[row.get("label")],
        origin={"responses[0]": "completion", "labels": "label", "labels[0]": "label"} | moved,
    )


def _from_rated(row: dict) -> dict:
    key = next(k for k in RATING_KEYS if k in row)
    prompt, responses, moved = _split(row.get("prompt"), [row.get("response")], ["response"])
    return dict(
        prompt=prompt,
        responses=responses,
        scores=[row.get(key)],
        consumed=(key,),
        origin={"responses[0]": "response", "scores": key, "scores[0]": key} | moved,
    )


def _from_list(row: dict) -> dict:
    prompt, responses, moved = row.get("prompt"), row.get("responses"), {}
    if isinstance(responses, list):
        columns = [f"responses[{i}]" for i in range(len(responses))]
        prompt, responses, moved = _split(prompt, responses, columns)
    pairs = row.get("pairs")
    if isinstance(pairs, list):  # JSON has no tuples; malformed entries stay for validation to report
        pairs = [tuple(p) if isinstance(p, list) else p for p in pairs]
    return dict(
        prompt=prompt,
        responses=responses,
        scores=row.get("scores"),
        ranking=row.get("ranking"),
        pairs=pairs,
        labels=row.get("labels"),
        origin=moved,
    )


@dataclass(frozen=True)
class Layout:
    """A flat layout: the keys that identify it and the function that maps a row onto a record."""

    name: str
    keys: tuple[str, ...]  # all required to detect the layout
    any_of: tuple[str, ...]  # at least one required (empty: no condition)
    consumes: tuple[str, ...]  # columns the converter reads (the rest may become attributes)
    convert: Callable[[dict], dict]
    example: str
    none_of: tuple[str, ...] = ()  # keys the source must not have


# Most specific first: detection takes the first layout whose keys the source has.
LAYOUTS: tuple[Layout, ...] = (
    Layout(
        "listwise",
        ("responses",),
        (),
        ("prompt", "responses", "scores", "ranking", "pairs", "labels"),
        _from_list,
        "prompt/responses[/scores/ranking/pairs/labels]",
    ),
    Layout(
        "triple",
        ("chosen", "rejected", "reference"),
        (),
        ("prompt", "chosen", "rejected", "reference"),
        _from_triple,
        "prompt/chosen/rejected/reference (TPO triples: the reference is the gold response)",
    ),
    # Decided per source, not per row: in a file with a prompt column, a row without one is
    # reported as missing its prompt rather than guessed from its responses.
    Layout(
        "implicit_prompt",
        ("chosen", "rejected"),
        (),
        ("chosen", "rejected"),
        _from_transcripts,
        f"chosen/rejected whole conversations, the prompt being their shared beginning (chat messages, "
        f"or Anthropic HH-RLHF text {HH_FORM})",
        none_of=("prompt",),
    ),
    Layout(
        "paired",
        ("chosen", "rejected"),
        (),
        ("prompt", "chosen", "rejected", "messages"),
        _from_pair,
        "prompt/chosen/rejected (text, messages, or full conversations)",
    ),
    Layout(
        "unpaired",
        ("prompt", "completion", "label"),
        (),
        ("prompt", "completion", "label"),
        _from_unpaired,
        "prompt/completion/label (KTO)",
    ),
    Layout(
        "rated",
        ("prompt", "response"),
        RATING_KEYS,
        ("prompt", "response"),
        _from_rated,
        f"prompt/response + a rating ({'/'.join(RATING_KEYS)}; HelpSteer2)",
    ),
)
LAYOUTS_BY_NAME = {layout.name: layout for layout in LAYOUTS}


def detect_layout(keys: Iterable[str], source: str = "<data>") -> Layout:
    """The first layout whose keys are all present; a DataError naming the keys found otherwise."""
    keys = set(keys)
    for layout in LAYOUTS:
        if (
            set(layout.keys) <= keys
            and (not layout.any_of or keys & set(layout.any_of))
            and not keys & set(layout.none_of)
        ):
            return layout
    accepted = "; ".join(f"{layout.name}: {layout.example}" for layout in LAYOUTS)
    raise DataError(
        [
            DataIssue(
                source,
                0,
                "<layout>",
                f"unrecognised layout; keys found: {', '.join(sorted(keys)) or 'none'}; "
                f"layouts accepted: {accepted}",
                kind="layout",
            )
        ]
    )


# Record fields any layout may carry under their own names (responses in the layout's order: chosen, rejected).
RECORD_COLUMNS = ("margin_rewards", "objective_names", "user_id", "pair_contexts", "rationales", "proposal_logps",
                  "prior_logps", "pair_prompts")


def row_to_record(row: dict, layout: Layout, source: str, line: int) -> PreferenceRecord:
    """Map one raw row onto a record; numeric columns the layout does not read become attributes."""
    fields = layout.convert(row)
    fields |= {k: row[k] for k in RECORD_COLUMNS if k in row}
    if "rationale" in row and "rationales" not in row:  # one pair's rationale (the released data sets' column)
        fields["rationales"] = [row["rationale"]]
        fields["origin"] = {**fields.get("origin", {}), "rationales": "rationale", "rationales[0]": "rationale"}
    consumed = set(layout.consumes) | set(fields.pop("consumed", ())) | set(RECORD_COLUMNS) | {"rationale"}
    attributes = {k: v for k, v in row.items() if k not in consumed and _numeric(v)}
    return PreferenceRecord(**fields, attributes=attributes, source=source, line=line)


def load_records(
    source: Any,
    *,
    split: str | None = None,
    shape_hint: str | None = None,
    issues: list[DataIssue] | None = None,
) -> list[PreferenceRecord]:
    """Read every record of ``source`` (path, saved dataset folder, Dataset, DatasetDict, or list of dicts).

    ``shape_hint`` names a layout from :data:`LAYOUTS` to use instead of detecting one by keys.
    Unreadable lines (bad UTF-8, JSON syntax) raise one :class:`DataError` listing all of them; pass
    an ``issues`` list to collect them there instead and get the readable records (for
    ``skip_invalid``). An empty source is an error either way.
    """
    own = issues is None
    issues = [] if own else issues
    before = len(issues)
    name, rows = read_rows(source, split=split, issues=issues)
    rows = list(rows)
    if own and len(issues) > before:
        raise DataError(issues)
    if not rows:
        if len(issues) == before:
            raise DataError([DataIssue(name, 0, "<file>", "no records (the source is empty)", kind="read")])
        raise DataError(issues)
    if shape_hint is not None:
        if shape_hint not in LAYOUTS_BY_NAME:
            raise ValueError(f"unknown layout {shape_hint!r}; choose from {', '.join(LAYOUTS_BY_NAME)}")
        layout = LAYOUTS_BY_NAME[shape_hint]
    else:
        layout = detect_layout({k for row, _ in rows for k in row}, name)
    return [row_to_record(row, layout, name, line) for row, line in rows]


def is_finite_number(v: Any) -> bool:
    """A real number that is neither NaN nor infinite (bools are not numbers here)."""
    return is_number(v) and math.isfinite(v)
