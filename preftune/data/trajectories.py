"""Trajectories with terminal rewards, OREO's data (METHODS.md §M7(c); jwhj/OREO ``pcl_dataset.py``).

One record per prompt: its sampled responses (trajectories) and one reward each, every trajectory kept (a prompt
whose solutions are all correct or all wrong is data too, unlike a preference list). The reward is ``scores``
(e.g. 0/1 answer correctness), else ``labels`` (1 desirable / 0 undesirable), else, for a record of exactly one
(winner, loser) pair (a prompt/chosen/rejected row), 1 for the winner and 0 for the loser. Each record becomes
one group (``Example``) of its K trajectories with ``inputs['scores']``, the trainer's ``terminal_reward``;
the objective's ``rew_mul``/``rew_add`` map it to R. Every bad record is reported with file, line and field.

``steps`` (optional, METHODS.md §0 [preftune]): per response, the list of its reasoning steps as strings that
concatenate to it (text responses). It places the step-level states (``step_level``) at the steps' starts instead
of at the delimiters; the records carry it all or none. It reaches the trainer as ``inputs['step_chars']``, per
response the character offset of every step start, padded with −1 to the data set's largest step count.
"""

from __future__ import annotations

from typing import Any

from .derive import Example
from .readers import load_records, read_rows
from .schema import DataError, DataIssue, PreferenceRecord
from .validate import structural_problems


def _rewards(record: PreferenceRecord) -> tuple[list[float] | None, DataIssue | None]:
    """(one reward per response, None) or (None, the issue)."""
    if record.scores is not None:
        return [float(s) for s in record.scores], None
    if record.labels is not None:
        return [1.0 if label else 0.0 for label in record.labels], None
    if record.pairs is not None and len(record.pairs) == 1 and record.num_responses == 2:
        w, _ = record.pairs[0]
        return [1.0 if i == w else 0.0 for i in range(2)], None
    what = "a ranking" if record.ranking is not None else "pairs" if record.pairs is not None else "nothing"
    return None, DataIssue(
        record.source, record.line, record.field_name("scores"),
        f"missing: a trajectory needs a terminal reward per response (scores, e.g. 1 correct / 0 wrong, or labels); "
        f"the record has {what}", kind="shape",
    )


def _step_starts(record: PreferenceRecord, steps: Any) -> tuple[list[list[int]] | None, list[DataIssue]]:
    """Per response, the character offset of each step start; or the problems of ``steps``."""
    def issue(field: str, msg: str) -> tuple[None, list[DataIssue]]:
        return None, [DataIssue(record.source, record.line, field, msg)]

    k = record.num_responses
    if not isinstance(steps, list) or len(steps) != k:
        what = f"{len(steps)} lists" if isinstance(steps, list) else type(steps).__name__
        return issue("steps", f"expected one list of step strings per response ({k}), got {what}")
    starts = []
    for i, (per, response) in enumerate(zip(steps, record.responses, strict=True)):
        if not isinstance(response, str):
            return issue(f"steps[{i}]", "steps need a text response (not chat messages)")
        if not isinstance(per, list) or not per or not all(isinstance(x, str) and x for x in per):
            return issue(f"steps[{i}]", "expected a non-empty list of non-empty strings")
        joined = "".join(per)
        if joined != response:
            at = next((j for j, (a, b) in enumerate(zip(joined, response, strict=False)) if a != b),
                      min(len(joined), len(response)))
            return issue(f"steps[{i}]", f"the steps joined differ from {record.field_name(f'responses[{i}]')} "
                                        f"at character {at}")
        offsets, pos = [], 0
        for x in per:
            offsets.append(pos)
            pos += len(x)
        starts.append(offsets)
    return starts, []


def trajectory_examples(
    records: list[PreferenceRecord], steps: dict[int, Any] | None = None
) -> tuple[list[Example], list[DataIssue]]:
    """(one example per valid record, the issues of the others), in the data's order. ``steps``: the raw
    ``steps`` field by record line, for the records that have one."""
    steps = steps or {}
    examples, issues = [], []
    for r in records:
        problems = structural_problems(r)
        if problems:
            issues += [DataIssue(r.source, r.line, r.field_name(path), msg) for path, msg in problems]
            continue
        rewards, issue = _rewards(r)
        if issue is not None:
            issues.append(issue)
            continue
        inputs: dict[str, Any] = {"scores": rewards}
        if steps:
            if r.line not in steps:
                issues.append(DataIssue(r.source, r.line, "steps", "missing (the data's other records carry steps)"))
                continue
            starts, bad = _step_starts(r, steps[r.line])
            if bad:
                issues += bad
                continue
            inputs["step_chars"] = starts
        examples.append(Example(r.prompt, list(r.responses), inputs, r.source, r.line))
    width = max((len(o) for e in examples for o in e.inputs.get("step_chars", [])), default=0)
    for e in examples:  # one width for the data set, so every batch collates to (B, K, width)
        if "step_chars" in e.inputs:
            e.inputs["step_chars"] = [[float(c) for c in o] + [-1.0] * (width - len(o)) for o in e.inputs["step_chars"]]
    return examples, issues


def load_trajectories(source: Any, *, split: str | None = None,
                      skip_invalid: bool = False) -> tuple[list[Example], list[DataIssue]]:
    """Read ``source`` (any reader input) into trajectory groups; raises ``DataError`` listing every problem
    (unreadable lines included) unless ``skip_invalid``, which returns the skipped records' issues instead."""
    read_issues: list[DataIssue] = []
    records = load_records(source, split=split, issues=read_issues)
    _, rows = read_rows(source, split=split, issues=[])  # the raw rows again, for the text-valued steps field
    steps = {line: row["steps"] for row, line in rows if isinstance(row, dict) and row.get("steps") is not None}
    examples, issues = trajectory_examples(records, steps)
    issues = sorted(read_issues + issues, key=lambda i: i.line)
    if issues and not skip_invalid:
        raise DataError(issues)
    return examples, issues
