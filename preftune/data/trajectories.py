"""Trajectories with terminal rewards, OREO's data (METHODS.md §M7(c); jwhj/OREO ``pcl_dataset.py``).

One record per prompt: its sampled responses (trajectories) and one reward each, every trajectory kept (a prompt
whose solutions are all correct or all wrong is data too, unlike a preference list). The reward is ``scores``
(e.g. 0/1 answer correctness), else ``labels`` (1 desirable / 0 undesirable), else, for a record of exactly one
(winner, loser) pair (a prompt/chosen/rejected row), 1 for the winner and 0 for the loser. Each record becomes
one group (``Example``) of its K trajectories with ``inputs['scores']``, the trainer's ``terminal_reward``;
the objective's ``rew_mul``/``rew_add`` map it to R. Every bad record is reported with file, line and field.
"""

from __future__ import annotations

from typing import Any

from .derive import Example
from .readers import load_records
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


def trajectory_examples(records: list[PreferenceRecord]) -> tuple[list[Example], list[DataIssue]]:
    """(one example per valid record, the issues of the others), in the data's order."""
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
        examples.append(Example(r.prompt, list(r.responses), {"scores": rewards}, r.source, r.line))
    return examples, issues


def load_trajectories(source: Any, *, split: str | None = None,
                      skip_invalid: bool = False) -> tuple[list[Example], list[DataIssue]]:
    """Read ``source`` (any reader input) into trajectory groups; raises ``DataError`` listing every problem
    (unreadable lines included) unless ``skip_invalid``, which returns the skipped records' issues instead."""
    read_issues: list[DataIssue] = []
    records = load_records(source, split=split, issues=read_issues)
    examples, issues = trajectory_examples(records)
    issues = sorted(read_issues + issues, key=lambda i: i.line)
    if issues and not skip_invalid:
        raise DataError(issues)
    return examples, issues
