"""The one record type every reader produces, and the error type every data check reports through.

A :class:`PreferenceRecord` holds one prompt and the ``K`` responses written for it, plus whatever
preference signal the data carries (scores, a ranking, explicit pairs, unpaired labels). Pairs,
lists and unpaired examples are all *derived* from records (``derive.py``), so a reader never has
to know which objective will train on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Message = dict[str, Any]
Text = str | list[Message]  # plain text, or chat messages [{"role": ..., "content": ...}, ...]

# How many issues a DataError prints; all of them stay in ``.issues``.
MAX_PRINTED_ISSUES = 50


@dataclass
class PreferenceRecord:
    """One prompt with ``K`` responses and its preference signal (DESIGN.md, "Data model").

    Readers are lenient: a missing or mistyped field is stored as found (``None`` for missing) so
    that :func:`preftune.data.validate_records` can report every problem at once, with the name
    the field had in the file (``origin`` maps record paths such as ``"responses[0]"`` to the
    source's column, e.g. ``"chosen"``).
    """

    prompt: Text | None
    responses: list[Text | None]
    scores: list[float] | None = None  # one per response, higher is better
    ranking: list[int] | None = None  # response indices, best first
    pairs: list[tuple[int, int]] | None = None  # (winner, loser) indices
    labels: list[bool] | None = None  # one per response: desirable / undesirable
    # MODPO's margins (METHODS.md §M1): one list per response, one float per extra objective, the same
    # count in every record; ``objective_names`` names those columns (dataset-level: equal on every record).
    margin_rewards: list[list[float]] | None = None
    objective_names: list[str] | None = None
    # RDPO / R-ORPO (METHODS.md §M3): one rationale per pair (why the winner is preferred), aligned with ``pairs``,
    # or a single one for a record whose one pair is derived (a prompt/chosen/rejected row's ``rationale``).
    rationales: list[Text] | None = None
    # BRAIn (METHODS.md §M6): per response, the summed log-prob under the proposal q that sampled it and under
    # the prior p (the SFT model), both recorded at sampling time.
    proposal_logps: list[float] | None = None
    prior_logps: list[float] | None = None
    # Who gave the preference (METHODS.md §0; PAL §M11, FSPO §M8): a string (or an integer id), one per record.
    user_id: str | int | None = None
    # The context / criterion each pair was judged under (METHODS.md §M12, CARM): one string per ``pairs`` entry.
    pair_contexts: list[str] | None = None
    # MAPL intra-sample pairs (METHODS.md §M5): per ``pairs`` entry, [prompt of the winner, prompt of the loser], for
    # one response under two prompts (data/mapl.py); the winner and the loser are scored each under its own prompt.
    pair_prompts: list[list[Text]] | None = None
    # Extra numeric columns: a number per record, or a list with one number per response
    # (HelpSteer2's other ratings, win probabilities, judge scores...). Derivation carries them
    # into ``Example.inputs`` under the same key.
    attributes: dict[str, Any] = field(default_factory=dict)
    source: str = "<memory>"
    line: int = 0  # 1-based line in JSONL/JSON; row index + 1 for Parquet and datasets
    origin: dict[str, str] = field(default_factory=dict)
    # Why a field is missing, when the reader knows (e.g. the prompt of a row without a prompt
    # column whose chosen and rejected share no beginning); validation adds it to "missing".
    missing_reasons: dict[str, str] = field(default_factory=dict)

    @property
    def num_responses(self) -> int:
        return len(self.responses) if isinstance(self.responses, list) else 0

    def field_name(self, path: str) -> str:
        """The name of a record field as the source spelled it (``responses[1]`` -> ``rejected``).

        The longest mapped prefix wins, so message paths follow the messages a reader moved:
        ``responses[1][0].role`` -> ``rejected[3].role`` when the reader took the first three
        messages of ``rejected`` as the prompt.
        """
        if path in self.origin:
            return self.origin[path]
        end = len(path)
        while (end := path.rfind("]", 0, end)) != -1:
            if (head := path[: end + 1]) in self.origin:
                return self.origin[head] + path[end + 1 :]
        return path


@dataclass(frozen=True)
class DataIssue:
    """One problem in one record, located well enough to fix it in an editor."""

    source: str
    line: int
    field: str
    message: str
    # What kind of problem: "read" (an unreadable line or file), "layout" (no known layout),
    # "record" (a bad value), "shape" (the record lacks what the objective trains on: a pair, a
    # label, a long enough list). Callers add the objective's data needs only to the last two.
    kind: str = field(default="record", compare=False)

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.field}: {self.message}"


class DataError(Exception):
    """Raised with *every* issue found; the message lists the first ``MAX_PRINTED_ISSUES``."""

    def __init__(self, issues: list[DataIssue]):
        self.issues = list(issues)
        super().__init__(format_issues(self.issues))

    @property
    def about_shape(self) -> bool:
        """True when an issue says the data lacks the objective's layout or shape (not a bad value)."""
        return any(issue.kind in ("layout", "shape") for issue in self.issues)


def format_issues(issues: list[DataIssue], limit: int = MAX_PRINTED_ISSUES) -> str:
    """One issue as ``path:line: field: message``; several as ``N problems in the data:`` and a
    line each (so a single problem leads with where it is)."""
    n = len(issues)
    if n == 1:
        return str(issues[0])
    head = f"{n} problems in the data:"
    lines = [f"  {issue}" for issue in issues[:limit]]
    if n > limit:
        lines.append(f"  ... and {n - limit} more")
    return "\n".join([head, *lines])
