"""Check records before training: every problem in every record, each with file, line and field.

Checks run in two passes per record. The structural pass (types, emptiness, the roles and order of
conversation turns, lengths, indices, finiteness) must be clean before the shape pass asks the
derivation code whether the record gives the objective what it needs (a pair, a label, a long
enough list), so that derivation can assume well-formed records and the two can never disagree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from .derive import preference_scores, record_pairs
from .readers import is_finite_number, is_number, load_records
from .schema import DataError, DataIssue, PreferenceRecord

Shape = Literal["paired", "unpaired", "listwise"]
OverlongPrompt = Literal["error", "truncate"]
SHAPES = ("paired", "unpaired", "listwise")

Problem = tuple[str, str]  # (record path, message); turned into a DataIssue with the source's names


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


# --------------------------------------------------------------------------------------------
# Structural checks
# --------------------------------------------------------------------------------------------


# Conversations may have these roles. Tool use (a "tool"/"function"/"ipython" turn, an assistant
# turn that calls a tool) is refused rather than rendered: its turns would need their own checks
# (each result answering a call) and the chat templates render them in incompatible ways.
ROLES = ("system", "user", "assistant")
TOOL_ROLES = ("tool", "function", "ipython")


def _role_problem(role: str) -> str | None:
    if role in ROLES:
        return None
    if role in TOOL_ROLES:
        return f"role {role!r} is not supported: conversations may only have system, user and assistant turns"
    return f"unknown role {role!r} (expected system, user or assistant)"


def _check_messages(messages: list, path: str) -> list[Problem]:
    if not messages:
        return [(path, "empty (no messages)")]
    problems = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            problems.append(
                (f"{path}[{i}]", f"expected a chat message {{role, content}}, got {_type_name(m)}")
            )
            continue
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                what = "missing" if m.get(key) is None else f"expected a string, got {_type_name(m[key])}"
                problems.append((f"{path}[{i}].{key}", what))
        if isinstance(m.get("role"), str) and (msg := _role_problem(m["role"])) is not None:
            problems.append((f"{path}[{i}].role", msg))
        if m.get("tool_calls"):
            problems.append((f"{path}[{i}].tool_calls", "tool calls are not supported"))
    if not problems and not any(m["content"].strip() for m in messages):
        problems.append((path, "empty (every message is blank)"))
    return problems


def _check_text(value: Any, path: str, missing: str = "missing") -> list[Problem]:
    """A prompt or response: non-blank text or well-formed chat messages."""
    if value is None:
        return [(path, missing)]
    if isinstance(value, str):
        return [] if value.strip() else [(path, "empty")]
    if isinstance(value, list):
        return _check_messages(value, path)
    return [(path, f"expected a string or a list of chat messages, got {_type_name(value)}")]


def _prompt_turns(prompt: list, path: str = "prompt") -> list[Problem]:
    """Order of a prompt's (well-formed) messages: an optional system message first, then user and
    assistant turns alternating from a user turn, ending with the user turn the responses answer.
    The first order problem is reported (later ones usually follow from it), and the ending."""
    problems: list[Problem] = []
    previous = None  # the last user/assistant role
    for i, m in enumerate(prompt):
        role, where = m["role"], f"{path}[{i}].role"
        if role == "system":
            if i > 0:
                problems.append((where, "a system message must be the first turn"))
                break
            continue
        if previous is None and role != "user":
            problems.append((where, f"the first turn (after an optional system message) must be user, not {role}"))
            break
        if role == previous:
            problems.append((where, f"{role} follows {role}: user and assistant turns must alternate"))
            break
        previous = role
    last = f"{path}[{len(prompt) - 1}].role"
    if prompt[-1]["role"] == "assistant" and all(where != last for where, _ in problems):
        problems.append(
            (last, "the prompt ends with an assistant turn; it must end with the user turn that the responses answer")
        )
    elif previous is None and not problems:
        problems.append((path, "no user turn (the responses need a user turn to answer)"))
    return problems


def _response_turns(response: list, path: str) -> list[Problem]:
    """A response given as messages is the assistant's reply: one assistant turn."""
    for j, m in enumerate(response):
        if m["role"] != "assistant":
            return [(f"{path}[{j}].role", f"expected an assistant turn, got {m['role']} (a response is the "
                     "assistant's reply; earlier turns belong in the prompt)")]
        if j > 0:
            return [(f"{path}[{j}].role", "assistant follows assistant: a response is one assistant turn")]
    return []


def conversation_problems(record: PreferenceRecord) -> list[Problem]:
    """Turn order of the record's conversations (messages already well-formed, roles known)."""
    problems = _prompt_turns(record.prompt) if isinstance(record.prompt, list) else []
    for i, r in enumerate(record.responses):
        if isinstance(r, list):
            problems += _response_turns(r, f"responses[{i}]")
    return problems


def _score_problem(v: Any) -> str | None:
    if v is None:
        return "missing"
    if not is_number(v):
        return f"expected a number, got {_type_name(v)}"
    return None if is_finite_number(v) else f"is {v} (scores must be finite)"


def _label_problem(v: Any) -> str | None:
    # 0/1 integers are common in exported datasets and mean the same thing.
    if v is None:
        return "missing"
    return None if isinstance(v, bool) or v in (0, 1) and is_number(v) else f"expected true/false, got {v!r}"


# Per-response list fields: one value per response, each checked by its function.
PER_RESPONSE: dict[str, Callable[[Any], str | None]] = {"scores": _score_problem, "labels": _label_problem}


def _check_per_response(record: PreferenceRecord, name: str, k: int) -> list[Problem]:
    values = getattr(record, name)
    if values is None:
        return []
    if not isinstance(values, list):
        return [(name, f"expected a list with one value per response, got {_type_name(values)}")]
    if len(values) != k:
        return [(name, f"has {len(values)} values for {k} responses")]
    check = PER_RESPONSE[name]
    return [(f"{name}[{i}]", msg) for i, v in enumerate(values) if (msg := check(v)) is not None]


def _check_ranking(ranking: Any, k: int) -> list[Problem]:
    if ranking is None:
        return []
    if not isinstance(ranking, list):
        return [("ranking", f"expected a list of response indices, got {_type_name(ranking)}")]
    if len(ranking) != k:
        return [("ranking", f"has {len(ranking)} values for {k} responses")]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ranking) or sorted(ranking) != list(
        range(k)
    ):
        return [("ranking", f"{ranking} is not a permutation of 0..{k - 1}")]
    return []


def _check_pairs(pairs: Any, k: int) -> list[Problem]:
    if pairs is None:
        return []
    if not isinstance(pairs, list):
        return [("pairs", f"expected a list of [winner, loser] index pairs, got {_type_name(pairs)}")]
    problems = []
    for n, pair in enumerate(pairs):
        path = f"pairs[{n}]"
        if (
            not isinstance(pair, (list, tuple))
            or len(pair) != 2
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in pair)
        ):
            problems.append((path, f"expected [winner, loser] indices, got {pair!r}"))
        elif not all(0 <= i < k for i in pair):
            problems.append((path, f"{list(pair)} has an index out of range for {k} responses"))
        elif pair[0] == pair[1]:
            problems.append((path, f"{list(pair)} pairs a response with itself"))
    return problems


def _check_attributes(attributes: dict[str, Any]) -> list[Problem]:
    # Extra numeric columns become model inputs; a NaN there poisons a loss silently.
    problems = []
    for key, value in attributes.items():
        values = value if isinstance(value, list) else [value]
        if not all(is_finite_number(v) for v in values):
            problems.append((key, "has a value that is NaN or infinite"))
    return problems


def _check_margin_rewards(record: PreferenceRecord, k: int) -> list[Problem]:
    """MODPO's margins: one non-empty list of finite numbers per response, the same length for every response,
    and ``objective_names`` (when given) one name per column."""
    values, names = record.margin_rewards, record.objective_names
    problems: list[Problem] = []
    width = None
    if values is not None:
        if not isinstance(values, list):
            what = _type_name(values)
            return [("margin_rewards", f"expected a list with one list of numbers per response, got {what}")]
        if len(values) != k:
            return [("margin_rewards", f"has {len(values)} values for {k} responses")]
        for i, row in enumerate(values):
            path = f"margin_rewards[{i}]"
            if not isinstance(row, list) or not row:
                what = "an empty list" if isinstance(row, list) else _type_name(row)
                problems.append((path, f"expected a list of numbers (one per extra objective), got {what}"))
                continue
            problems += [(f"{path}[{j}]", msg) for j, v in enumerate(row) if (msg := _score_problem(v)) is not None]
            if width is None:
                width = len(row)
            elif len(row) != width:
                problems.append((path, f"has {len(row)} values, margin_rewards[0] has {width} "
                                       "(one per extra objective)"))
    if names is None:
        return problems
    if values is None:
        return problems + [("objective_names", "names margin_rewards columns, but the record has no margin_rewards")]
    if not isinstance(names, list) or not all(isinstance(n, str) and n.strip() for n in names):
        return problems + [("objective_names", f"expected a list of names, got {names!r}")]
    if width is not None and len(names) != width:
        problems.append(("objective_names", f"has {len(names)} names for {width} margin reward column(s)"))
    return problems


def _check_user_and_contexts(record: PreferenceRecord) -> list[Problem]:
    """``user_id`` (PAL, FSPO): a non-blank string or an integer. ``pair_contexts`` (CARM): one non-blank string
    per entry of ``pairs`` (a prompt/chosen/rejected row has one pair), so it needs the record's explicit pairs."""
    problems: list[Problem] = []
    uid = record.user_id
    if uid is not None and not (
        (isinstance(uid, str) and uid.strip()) or (isinstance(uid, int) and not isinstance(uid, bool))
    ):
        problems.append(("user_id", f"expected a non-empty string or an integer id, got {uid!r}"))
    contexts = record.pair_contexts
    if contexts is None:
        return problems
    if not isinstance(contexts, list):
        return problems + [("pair_contexts", f"expected a list with one context string per pair, got "
                                             f"{_type_name(contexts)}")]
    if not isinstance(record.pairs, list):
        return problems + [("pair_contexts", "needs explicit pairs ([winner, loser] indices): one context per pair")]
    if len(contexts) != len(record.pairs):
        return problems + [("pair_contexts", f"has {len(contexts)} contexts for {len(record.pairs)} pair(s)")]
    for i, c in enumerate(contexts):
        if not (isinstance(c, str) and c.strip()):
            problems.append((f"pair_contexts[{i}]", f"expected a non-empty string, got {c!r}"))
    return problems



def _check_pair_prompts(record: PreferenceRecord) -> list[Problem]:
    """``pair_prompts`` (MAPL, METHODS.md §M5): per entry of ``pairs``, [winner's prompt, loser's prompt], each a
    prompt (text or messages); it needs the record's explicit pairs."""
    values = record.pair_prompts
    if values is None:
        return []
    if not isinstance(values, list):
        return [("pair_prompts", f"expected a list with one [winner prompt, loser prompt] per pair, got "
                                 f"{_type_name(values)}")]
    if not isinstance(record.pairs, list):
        return [("pair_prompts", "needs explicit pairs ([winner, loser] indices): one prompt pair per pair")]
    if len(values) != len(record.pairs):
        return [("pair_prompts", f"has {len(values)} prompt pair(s) for {len(record.pairs)} pair(s)")]
    problems: list[Problem] = []
    for i, v in enumerate(values):
        if not isinstance(v, list) or len(v) != 2:
            problems.append((f"pair_prompts[{i}]", f"expected [winner prompt, loser prompt], got {v!r}"))
            continue
        problems += _check_text(v[0], f"pair_prompts[{i}][0]") + _check_text(v[1], f"pair_prompts[{i}][1]")
    return problems

def _check_rationales(record: PreferenceRecord) -> list[Problem]:
    """RDPO / R-ORPO (METHODS.md §M3): one non-blank rationale per entry of ``pairs``; a record without explicit
    pairs has one pair (chosen/rejected, or the best/worst derived one), so exactly one rationale."""
    values = record.rationales
    if values is None:
        return []
    if not isinstance(values, list):
        return [("rationales", f"expected a list with one rationale per pair, got {_type_name(values)}")]
    if isinstance(record.pairs, list):
        if len(values) != len(record.pairs):
            return [("rationales", f"has {len(values)} rationale(s) for {len(record.pairs)} pair(s)")]
    elif len(values) != 1:
        return [("rationales", f"has {len(values)} rationales, but a record without explicit pairs has one pair: "
                               "give one rationale, or `pairs` with one rationale each")]
    problems: list[Problem] = []
    for i, r in enumerate(values):
        problems += _check_text(r, f"rationales[{i}]")
    return problems


def _check_sample_logps(record: PreferenceRecord, k: int) -> list[Problem]:
    """BRAIn (METHODS.md §M6): ``proposal_logps`` / ``prior_logps``, one finite sequence log-probability (≤ 0) per
    response; ``prior_logps`` only beside ``proposal_logps`` (without it the prior is the proposal)."""
    problems: list[Problem] = []
    for name in ("proposal_logps", "prior_logps"):
        values = getattr(record, name)
        if values is None:
            continue
        if not isinstance(values, list):
            problems.append((name, f"expected a list with one log-probability per response, got {_type_name(values)}"))
            continue
        if len(values) != k:
            problems.append((name, f"has {len(values)} values for {k} responses"))
            continue
        for i, v in enumerate(values):
            if not is_finite_number(v):
                problems.append((f"{name}[{i}]", f"expected a finite number (a summed log-probability), got {v!r}"))
            elif v > 0:
                problems.append((f"{name}[{i}]", f"{v} is positive: a sequence log-probability is at most 0"))
    if record.prior_logps is not None and record.proposal_logps is None:
        problems.append(("prior_logps", "given without proposal_logps (the log-probs of the sampling distribution)"))
    return problems


def _all_or_none(records: list[PreferenceRecord], names: tuple[str, ...]) -> dict[int, list[DataIssue]]:
    """Fields that every record carries or none does (a batch cannot mix records with and without them)."""
    out: dict[int, list[DataIssue]] = {}
    for name in names:
        first = next((r for r in records if getattr(r, name) is not None), None)
        if first is None:
            continue
        for i, r in enumerate(records):
            if getattr(r, name) is None:
                out.setdefault(i, []).append(DataIssue(r.source, r.line, name, f"missing (the data's other records "
                                                                             f"carry {name}, e.g. line {first.line})"))
    return out


def dataset_problems(records: list[PreferenceRecord]) -> dict[int, list[DataIssue]]:
    """Fields that must agree across the whole data set, by position of the record that disagrees: every record
    carries margin_rewards or none does, with the same number of columns as the first record that has them; a
    record may omit objective_names (the data set's names hold), one that gives them gives the same names."""
    out = _all_or_none(records, ("rationales", "proposal_logps", "prior_logps"))
    first = next((r for r in records if r.margin_rewards is not None), None)
    if first is None:
        return out
    width = len(first.margin_rewards[0])
    named = next((r for r in records if r.objective_names is not None), None)
    for i, r in enumerate(records):
        bad = []
        if r.margin_rewards is None:
            bad.append(("margin_rewards", f"missing (the data's other records carry margin rewards, e.g. line "
                                          f"{first.line})"))
        elif len(r.margin_rewards[0]) != width:
            bad.append(("margin_rewards", f"{len(r.margin_rewards[0])} column(s) per response; line {first.line} "
                                          f"has {width} (every record needs the same objectives)"))
        if r.objective_names is not None and r.objective_names != named.objective_names:  # omitted: inherited
            bad.append(("objective_names", f"{r.objective_names!r} differs from line {named.line}'s "
                                           f"{named.objective_names!r} (a data-set-level field: the same on every "
                                           "record)"))
        if bad:
            out.setdefault(i, []).extend(DataIssue(r.source, r.line, r.field_name(path), msg) for path, msg in bad)
    return out


def structural_problems(record: PreferenceRecord) -> list[Problem]:
    """Types, blank text, conversation structure, per-response lengths, index ranges and finiteness."""
    reason = record.missing_reasons.get("prompt")
    problems = _check_text(record.prompt, "prompt", f"missing: {reason}" if reason else "missing")
    responses = record.responses
    if not isinstance(responses, list):
        problems.append(
            (
                "responses",
                "missing"
                if responses is None
                else f"expected a list of responses, got {_type_name(responses)}",
            )
        )
        return problems
    for i, r in enumerate(responses):
        problems += _check_text(r, f"responses[{i}]")
    if not problems:  # order is only meaningful once every message is well-formed
        problems += conversation_problems(record)
    k = len(responses)
    for name in PER_RESPONSE:
        problems += _check_per_response(record, name, k)
    problems += _check_ranking(record.ranking, k)
    problems += _check_pairs(record.pairs, k)
    problems += _check_attributes(record.attributes)
    problems += _check_margin_rewards(record, k)
    problems += _check_rationales(record) + _check_sample_logps(record, k)
    problems += _check_user_and_contexts(record) + _check_pair_prompts(record)
    return problems


# --------------------------------------------------------------------------------------------
# Shape checks: does the record give the objective what it needs?
# --------------------------------------------------------------------------------------------


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        return a.strip() == b.strip()
    return a == b


def _paired(record: PreferenceRecord, min_responses: int) -> list[DataIssue]:
    pairs, issue = record_pairs(record)
    if issue is not None:
        return [issue]
    return [
        DataIssue(
            record.source,
            record.line,
            record.field_name(f"responses[{l}]"),
            f"identical to {record.field_name(f'responses[{w}]')} (a pair needs two different responses)",
        )
        for j, (w, l) in enumerate(pairs)
        if _same(record.responses[w], record.responses[l])
        and not (record.pair_prompts and j < len(record.pair_prompts))  # one response under two prompts (MAPL)
    ]


def _unpaired(record: PreferenceRecord, min_responses: int) -> list[DataIssue]:
    if record.labels is not None:
        return []
    if record.num_responses < 2:
        return [
            DataIssue(
                record.source,
                record.line,
                record.field_name("labels"),
                "missing (an unpaired example needs a desirable/undesirable label)",
                kind="shape",
            )
        ]
    return _paired(record, min_responses)


def _listwise(record: PreferenceRecord, min_responses: int) -> list[DataIssue]:
    k = record.num_responses
    if k < min_responses:
        return [
            DataIssue(
                record.source,
                record.line,
                "responses",
                f"{k} responses; this objective needs lists of at least {min_responses}",
                kind="shape",
            )
        ]
    scores, name = preference_scores(record)
    if scores is None:
        return (
            []
            if k == 2 and len(record.pairs or [(0, 1)]) == 1
            else [
                DataIssue(
                    record.source,
                    record.line,
                    "scores",
                    f"missing: nothing orders the {k} responses (give scores or a ranking)",
                    kind="shape",
                )
            ]
        )
    if len(set(scores)) == 1:
        return [
            DataIssue(
                record.source,
                record.line,
                record.field_name(name),
                f"no preference: all {name} equal",
                kind="shape",
            )
        ]
    return []


SHAPE_CHECKS: dict[str, Callable[[PreferenceRecord, int], list[DataIssue]]] = {
    "paired": _paired,
    "unpaired": _unpaired,
    "listwise": _listwise,
}


def record_issues(
    record: PreferenceRecord,
    *,
    objective_shape: Shape,
    min_responses: int = 2,
    tokenizer: Any = None,
    max_prompt_length: int | None = None,
    overlong_prompt: OverlongPrompt = "truncate",
    chat_template: str = "auto",
) -> list[DataIssue]:
    """Every issue of one record (structural first; shape and length only when structure is sound)."""
    problems = structural_problems(record)
    if problems:
        return [DataIssue(record.source, record.line, record.field_name(path), msg) for path, msg in problems]
    issues = SHAPE_CHECKS[objective_shape](record, min_responses)
    if tokenizer is not None and max_prompt_length is not None and overlong_prompt == "error":
        from .tokenize import prompt_token_count

        n = prompt_token_count(record.prompt, tokenizer, chat_template)
        if n > max_prompt_length:
            issues.append(
                DataIssue(
                    record.source,
                    record.line,
                    record.field_name("prompt"),
                    f"{n} tokens, longer than max_prompt_length={max_prompt_length}",
                )
            )
    return issues


def validate_records(
    records: list[PreferenceRecord],
    *,
    objective_shape: Shape,
    min_responses: int = 2,
    tokenizer: Any = None,
    max_prompt_length: int | None = None,
    overlong_prompt: OverlongPrompt = "truncate",
    chat_template: str = "auto",
    skip_invalid: bool = False,
) -> tuple[list[PreferenceRecord], list[DataIssue]]:
    """``(valid records, issues)``; raises :class:`DataError` with all issues unless ``skip_invalid``.

    With ``skip_invalid`` the bad records are dropped and their issues returned so the caller can
    report a count. No records at all (or none valid) is always an error.
    """
    if objective_shape not in SHAPES:
        raise ValueError(f"objective_shape must be one of {SHAPES}, got {objective_shape!r}")
    if overlong_prompt not in ("error", "truncate"):
        raise ValueError(f"overlong_prompt must be 'error' or 'truncate', got {overlong_prompt!r}")
    if not records:
        raise DataError([DataIssue("<data>", 0, "<file>", "no records")])
    valid, issues = [], []
    found_by_record = []
    for record in records:
        found_by_record.append(record_issues(
            record,
            objective_shape=objective_shape,
            min_responses=min_responses,
            tokenizer=tokenizer,
            max_prompt_length=max_prompt_length,
            overlong_prompt=overlong_prompt,
            chat_template=chat_template,
        ))
    # Data-set-level agreement, among the structurally sound records only (a malformed field is reported once).
    sound = [i for i, found in enumerate(found_by_record) if not any(f.kind == "record" for f in found)]
    for j, extra in dataset_problems([records[i] for i in sound]).items():
        found_by_record[sound[j]] += extra
    for record, found in zip(records, found_by_record, strict=True):
        issues += found
        if not found:
            valid.append(record)
    if issues and not skip_invalid:
        raise DataError(issues)
    if not valid:
        raise DataError(issues + [DataIssue(records[0].source, 0, "<file>", "no valid records left")])
    return valid, issues


def load_and_validate(
    source: Any,
    *,
    objective_shape: Shape,
    split: str | None = None,
    shape_hint: str | None = None,
    skip_invalid: bool = False,
    **checks: Any,
) -> tuple[list[PreferenceRecord], list[DataIssue]]:
    """Read and validate in one go; with ``skip_invalid`` unreadable lines are skipped too.

    ``checks`` are :func:`validate_records`' keyword arguments (``min_responses``, ``tokenizer``...).
    """
    read_issues: list[DataIssue] = []
    records = load_records(source, split=split, shape_hint=shape_hint, issues=read_issues)
    if read_issues and not skip_invalid:
        # Report unreadable lines together with the problems of the readable ones.
        try:
            validate_records(records, objective_shape=objective_shape, **checks)
        except DataError as e:
            raise DataError(sorted(read_issues + e.issues, key=lambda i: i.line)) from None
        raise DataError(read_issues)
    valid, issues = validate_records(
        records, objective_shape=objective_shape, skip_invalid=skip_invalid, **checks
    )
    return valid, sorted(read_issues + issues, key=lambda i: i.line)
