"""Derive training examples from records: pairs (DPO family), lists (PRO, IRPO...) or unpaired (KTO, BCO).

An :class:`Example` is one group of the batch grid (``losses/base.py``): a prompt and its ``K``
responses in column order, plus the numeric inputs an objective may need, keyed by name — each a
list with one value per response (a ``(B, K)`` tensor after collation) or one number per group
(``(B,)``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from .schema import DataError, DataIssue, PreferenceRecord, Text

PairStrategy = Literal["best_worst", "all", "adjacent"]
Pair = tuple[int, int]


@dataclass
class Example:
    """One group: prompt, responses (column order matters: pairs are chosen, rejected) and inputs."""

    prompt: Text
    responses: list[Text]
    inputs: dict[str, Any] = field(default_factory=dict)  # name -> [one per response] or a number
    source: str = "<memory>"
    line: int = 0
    rationale: Text | None = None  # RDPO / R-ORPO: why responses[0] beats responses[1] (METHODS.md §M3)
    prompts: list[Text] | None = None  # MAPL: one prompt per response (pair_prompts), instead of ``prompt``


# --------------------------------------------------------------------------------------------
# Ordering the responses of a record
# --------------------------------------------------------------------------------------------


def preference_scores(record: PreferenceRecord) -> tuple[list[float] | None, str]:
    """Scores that order the responses (higher is better) and the field they came from.

    Scores are used as given; a ranking becomes ``K - 1 - position`` (so the best has the highest
    score); labels become 1 (desirable) / 0. ``(None, "")`` when the record has none of them.
    """
    k = record.num_responses
    if record.scores is not None:
        return [float(s) for s in record.scores], "scores"
    if record.ranking is not None:
        scores = [0.0] * k
        for position, i in enumerate(record.ranking):
            scores[i] = float(k - 1 - position)
        return scores, "ranking"
    if record.labels is not None:
        return [1.0 if label else 0.0 for label in record.labels], "labels"
    return None, ""


def _best_worst(s: list[float]) -> list[Pair]:
    # max/min return the first of tied candidates, so data order breaks ties deterministically.
    best = max(range(len(s)), key=lambda i: s[i])
    worst = min(range(len(s)), key=lambda i: s[i])
    return [(best, worst)]


def _all_pairs(s: list[float]) -> list[Pair]:
    order = _best_first(s)
    return [(w, l) for a, w in enumerate(order) for l in order[a + 1 :] if s[w] > s[l]]


def _adjacent(s: list[float]) -> list[Pair]:
    order = _best_first(s)
    return [(w, l) for w, l in zip(order, order[1:], strict=False) if s[w] > s[l]]


def _best_first(s: list[float]) -> list[int]:
    return sorted(range(len(s)), key=lambda i: -s[i])  # stable: ties keep data order


PAIR_STRATEGIES: dict[str, Callable[[list[float]], list[Pair]]] = {
    "best_worst": _best_worst,  # one pair per record: the clearest preference
    "all": _all_pairs,  # every strictly ordered pair (K(K-1)/2 at most)
    "adjacent": _adjacent,  # neighbours in the best-first order (Curry-DPO style curricula)
}


def record_pairs(
    record: PreferenceRecord, strategy: str = "best_worst"
) -> tuple[list[Pair], DataIssue | None]:
    """(winner, loser) pairs of a record, or an issue saying why it has none.

    Explicit ``pairs`` win; then scores/ranking/labels through ``strategy`` (tied responses form no
    pair); a record of two responses with no signal at all is (0 chosen, 1 rejected).
    """
    if strategy not in PAIR_STRATEGIES:
        raise ValueError(f"pair_strategy must be one of {', '.join(PAIR_STRATEGIES)}, got {strategy!r}")
    if record.pairs:
        return [tuple(p) for p in record.pairs], None
    scores, name = preference_scores(record)
    if scores is not None:
        if len(scores) < 2 or len(set(scores)) == 1:
            # One response per row is the HelpSteer2 shape: group_by_prompt merges its rows.
            msg = (
                f"no preference: all {name} equal"
                if len(scores) >= 2
                else "no preference: only one response (merge rows that share a prompt with group_by_prompt)"
            )
            return [], DataIssue(record.source, record.line, record.field_name(name), msg, kind="shape")
        return PAIR_STRATEGIES[strategy](scores), None
    if record.num_responses == 2:
        return [(0, 1)], None
    return [], DataIssue(
        record.source,
        record.line,
        "responses",
        f"no pairs, scores, ranking or labels to order {record.num_responses} responses",
        kind="shape",
    )


# --------------------------------------------------------------------------------------------
# Building examples
# --------------------------------------------------------------------------------------------


def _select(record: PreferenceRecord, idx: list[int]) -> Example:
    """The example made of responses ``idx`` of ``record``, with per-response inputs re-indexed."""
    k = record.num_responses
    inputs: dict[str, Any] = {}
    if record.scores is not None:
        inputs["scores"] = [float(record.scores[i]) for i in idx]
    if record.labels is not None:
        inputs["labels"] = [bool(record.labels[i]) for i in idx]
    if record.margin_rewards is not None:  # (K, n−1) per example → (B, K, n−1) after collation
        inputs["margin_rewards"] = [[float(x) for x in record.margin_rewards[i]] for i in idx]
    for key in ("proposal_logps", "prior_logps"):  # BRAIn's sampling-time log-probs, one per response
        if getattr(record, key) is not None:
            inputs[key] = [float(getattr(record, key)[i]) for i in idx]
    for key, value in record.attributes.items():
        if isinstance(value, list):
            if len(value) == k:  # one number per response; other lists are not inputs
                inputs[key] = [float(value[i]) for i in idx]
        else:
            inputs[key] = float(value)
    return Example(record.prompt, [record.responses[i] for i in idx], inputs, record.source, record.line)


def _finish(issues: list[DataIssue], own: bool) -> None:
    if own and issues:
        raise DataError(issues)


def to_pairs(
    records: list[PreferenceRecord],
    *,
    pair_strategy: PairStrategy = "best_worst",
    issues: list[DataIssue] | None = None,
) -> list[Example]:
    """``K = 2`` examples, column 0 chosen and column 1 rejected; see :func:`record_pairs`.

    Records without a preference raise a :class:`DataError` listing them all, or, when an
    ``issues`` list is given, are appended there and skipped.
    """
    own, issues = issues is None, [] if issues is None else issues
    out = []
    for record in records:
        pairs, issue = record_pairs(record, pair_strategy)
        if issue is not None:
            issues.append(issue)
        if record.rationales is not None and len(record.rationales) != len(pairs) and pairs:
            issues.append(DataIssue(record.source, record.line, record.field_name("rationales"),
                                    f"{len(record.rationales)} rationale(s) for the {len(pairs)} pairs that "
                                    f"pair_strategy={pair_strategy} derives: give explicit pairs", kind="shape"))
            continue
        for j, (w, l) in enumerate(pairs):
            ex = _select(record, [w, l])
            ex.rationale = record.rationales[j] if record.rationales is not None else None
            ex.prompts = list(record.pair_prompts[j]) if record.pair_prompts is not None else None
            out.append(ex)
    _finish(issues, own)
    return out


def to_unpaired(
    records: list[PreferenceRecord],
    *,
    pair_strategy: PairStrategy = "best_worst",
    issues: list[DataIssue] | None = None,
) -> list[Example]:
    """``K = 1`` examples with ``inputs["labels"] = [desirable]``.

    Records with labels give one example per response. Otherwise, as TRL's paired-to-unpaired
    conversion, every pair gives its chosen response as desirable and its rejected one as
    undesirable; a response already emitted for the record (``all``/``adjacent`` strategies put
    middle responses in several pairs) keeps its first label.
    """
    own, issues = issues is None, [] if issues is None else issues
    out = []
    for record in records:
        if record.labels is not None:
            out.extend(_select(record, [i]) for i in range(record.num_responses))
            continue
        pairs, issue = record_pairs(record, pair_strategy)
        if issue is not None:
            issues.append(issue)
        seen: set[int] = set()
        for i, label in ((i, lab) for w, l in pairs for i, lab in ((w, True), (l, False))):
            if i not in seen:
                seen.add(i)
                ex = _select(record, [i])
                ex.inputs["labels"] = [label]
                out.append(ex)
    _finish(issues, own)
    return out


def to_lists(
    records: list[PreferenceRecord], *, k: int | None = None, issues: list[DataIssue] | None = None
) -> list[Example]:
    """Examples with responses sorted best first and ``inputs["scores"]`` in that order.

    Scores come from :func:`preference_scores` (a ranking gives ``K-1 .. 0``); a two-response
    record with only a pair (or nothing, chosen first) scores 1 / 0. ``k`` keeps the best ``k``.
    Lists may be ragged; the collator pads them and marks the padding in ``valid``.
    """
    own, issues = issues is None, [] if issues is None else issues
    out = []
    for record in records:
        scores, _ = preference_scores(record)
        if scores is None:
            pairs, issue = record_pairs(record)
            if issue is not None or len(pairs) != 1 or record.num_responses != 2:
                issues.append(
                    issue
                    or DataIssue(
                        record.source,
                        record.line,
                        "pairs",
                        "pairs do not give a total order of the responses",
                        kind="shape",
                    )
                )
                continue
            scores = [0.0, 0.0]
            scores[pairs[0][0]] = 1.0
        order = _best_first(scores)[:k]
        ex = _select(record, order)
        ex.inputs["scores"] = [scores[i] for i in order]
        out.append(ex)
    _finish(issues, own)
    return out


def to_triples(records: list[PreferenceRecord], *, issues: list[DataIssue] | None = None) -> list[Example]:
    """``K = 3`` examples in TPO's column order (chosen, rejected, gold).

    From the order of :func:`preference_scores`: gold = the best response, chosen = the second best,
    rejected = the worst (a ``prompt/chosen/rejected/reference`` row ranks reference, chosen,
    rejected, so it keeps its columns). Records with fewer than three responses, or whose second
    best is not strictly better than the worst, are issues.
    """
    own, issues = issues is None, [] if issues is None else issues
    out = []
    for record in records:
        scores, name = preference_scores(record)
        if scores is None or len(scores) < 3:
            issues.append(DataIssue(record.source, record.line, "responses",
                                    "a triple needs three responses ordered by scores or a ranking "
                                    "(or the prompt/chosen/rejected/reference layout)", kind="shape"))
            continue
        order = _best_first(scores)
        gold, chosen, rejected = order[0], order[1], order[-1]
        if not scores[chosen] > scores[rejected]:
            issues.append(DataIssue(record.source, record.line, record.field_name(name),
                                    "no preference between the second-best and the worst response",
                                    kind="shape"))
            continue
        ex = _select(record, [chosen, rejected, gold])
        ex.inputs["scores"] = [scores[i] for i in (chosen, rejected, gold)]
        out.append(ex)
    _finish(issues, own)
    return out


DERIVERS: dict[str, Callable[..., list[Example]]] = {
    "paired": to_pairs,
    "unpaired": to_unpaired,
    "listwise": to_lists,
}


def derive_examples(records: list[PreferenceRecord], shape: str, **kwargs: Any) -> list[Example]:
    """Examples for an objective's data shape (the registry's ``shape``: paired, unpaired, listwise)."""
    if shape not in DERIVERS:
        raise ValueError(f"unknown data shape {shape!r}; choose from {', '.join(DERIVERS)}")
    return DERIVERS[shape](records, **kwargs)


def group_by_prompt(records: list[PreferenceRecord]) -> list[PreferenceRecord]:
    """Merge records that share a prompt into one record with all their responses.

    For rated single-response rows (HelpSteer2 lists each response of a prompt on its own row):
    the merged record's scores/labels are concatenated (kept only when every part has them) and
    per-record attributes become one value per response. Records with a ranking or pairs are
    passed through unchanged; the merged record keeps the first part's source and line.
    """
    groups: dict[str, list[PreferenceRecord]] = {}
    out: list[PreferenceRecord | str] = []
    for record in records:
        if record.ranking is not None or record.pairs is not None:
            out.append(record)
            continue
        key = json.dumps(record.prompt, sort_keys=True)
        if key not in groups:
            groups[key] = []
            out.append(key)
        groups[key].append(record)
    return [item if isinstance(item, PreferenceRecord) else _merge(groups[item]) for item in out]


def _merge(parts: list[PreferenceRecord]) -> PreferenceRecord:
    if len(parts) == 1:
        return parts[0]

    def concat(name: str) -> list | None:
        values = [getattr(p, name) for p in parts]
        return None if any(v is None for v in values) else [x for v in values for x in v]

    attributes = {}
    for key in set.intersection(*(set(p.attributes) for p in parts)):
        values = [p.attributes[key] for p in parts]
        if all(isinstance(v, list) and len(v) == p.num_responses for v, p in zip(values, parts, strict=True)):
            attributes[key] = [x for v in values for x in v]
        elif not any(isinstance(v, list) for v in values) and all(p.num_responses == 1 for p in parts):
            attributes[key] = values
    first = parts[0]
    # Column names survive the merge; per-position ones ("responses[0]") no longer point anywhere.
    origin = {k: v for k, v in first.origin.items() if "[" not in k}
    return PreferenceRecord(
        first.prompt,
        [r for p in parts for r in p.responses],
        scores=concat("scores"),
        labels=concat("labels"),
        attributes=attributes,
        source=first.source,
        line=first.line,
        origin=origin,
    )
