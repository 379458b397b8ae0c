"""Reward-model data: the same readers, validation and tokenisation as policy training.

Pairs (rm_bt, rm_bt_margin, rm_bt_scaled, rm_gpm) come from any paired or listwise layout through
``data.load_and_validate`` + ``data.derive_examples``. Ratings (rm_regression) are one example per
rated response with the configured attributes as per-example inputs ``target:<name>`` and
``mask:<name>`` (HelpSteer2's ``prompt/response/helpfulness/correctness/...`` rows, or a
``prompt/responses/scores`` list).
"""

from __future__ import annotations

import random
from typing import Any

from preftune.data import DataError, DataIssue, Example, PreferenceRecord
from preftune.reward.config import RewardConfig


def load_reward_examples(
    path: Any, cfg: RewardConfig, tokenizer, split=None, log=print, users: list[str] | None = None,
    new_users: bool = True,
) -> list[Example]:
    """Read, validate (every problem with file, line and field) and derive the examples of ``cfg.loss``.

    PAL: ``users`` is the user table being built (ids of the training data in order of appearance; eval data
    with ``new_users=False`` must name known users). CARM: pair contexts rendered into the prompts."""
    if cfg.kind == "regression":
        return rated_examples(path, cfg, split=split, log=log)
    from preftune import data

    records, issues = data.load_and_validate(
        path,
        objective_shape="paired",
        split=split,
        skip_invalid=cfg.skip_invalid,
        tokenizer=tokenizer,
        max_prompt_length=cfg.max_prompt_length,
        chat_template=cfg.chat_template,
    )
    if issues:
        log(f"skipped {len(issues)} problem(s) in {path} (--skip-invalid); first: {issues[0]}")
    if cfg.kind in ("pal_a", "pal_b"):
        from preftune.reward.pal import user_examples

        return user_examples(records, users if users is not None else [], cfg.pair_strategy, new_users)
    if cfg.loss == "rm_carm":
        from preftune.reward.carm import context_examples

        return context_examples(records, cfg.context_template, cfg.pair_strategy)
    examples = data.derive_examples(records, "paired", pair_strategy=cfg.pair_strategy)
    return _keep_inputs(examples, cfg.objective().required_columns, cfg.loss, cfg.skip_invalid, log)


def _keep_inputs(
    examples: list[Example], needed: tuple[str, ...], loss: str, skip: bool, log
) -> list[Example]:
    """Keep only the columns the objective reads (stray numeric columns would break collation)."""
    out, issues = [], []
    for ex in examples:
        missing = [k for k in needed if not isinstance(ex.inputs.get(k), float)]
        for k in missing:
            issues.append(
                DataIssue(ex.source, ex.line, k, f"missing: {loss} needs a number per pair in column {k!r}")
            )
        if not missing:
            out.append(
                Example(ex.prompt, ex.responses, {k: ex.inputs[k] for k in needed}, ex.source, ex.line)
            )
    if issues and not skip:
        raise DataError(issues)
    if issues:
        log(f"skipped {len(issues)} pair(s) without {', '.join(needed)} (--skip-invalid); first: {issues[0]}")
    if not out:
        raise DataError(issues or [DataIssue("<data>", 0, "<file>", "no usable pairs")])
    return out


# ------------------------------------------------------------------------------------------ ratings


def _attribute(record: PreferenceRecord, name: str, i: int) -> Any:
    """The rating ``name`` of response ``i``: a scores column spelled ``name``, or a numeric column."""
    if record.scores is not None and name in (record.field_name("scores"), "scores", "score"):
        return record.scores[i] if i < len(record.scores) else None
    value = record.attributes.get(name)
    if isinstance(value, list):
        return value[i] if len(value) == record.num_responses else None
    return value if record.num_responses == 1 else None


def rated_examples(path: Any, cfg: RewardConfig, split=None, log=print) -> list[Example]:
    """One K=1 example per rated response; inputs ``target:<a>`` (rating, 0 when absent) and ``mask:<a>``."""
    from preftune.data import load_records
    from preftune.data.readers import is_finite_number
    from preftune.data.validate import structural_problems

    read_issues: list[DataIssue] = []
    records = load_records(path, split=split, issues=read_issues)
    issues = list(read_issues)
    found: set[str] = set()
    out: list[Example] = []
    for rec in records:
        problems = [
            DataIssue(rec.source, rec.line, rec.field_name(p), m) for p, m in structural_problems(rec)
        ]
        rows = []
        for i in range(rec.num_responses if not problems else 0):
            inputs, rated = {}, 0
            for a in cfg.attributes:
                v = _attribute(rec, a, i)
                if v is not None and not is_finite_number(v):
                    problems.append(
                        DataIssue(rec.source, rec.line, a, f"expected a finite number, got {v!r}")
                    )
                    v = None
                ok = v is not None
                found |= {a} if ok else set()
                rated += ok
                inputs[f"target:{a}"], inputs[f"mask:{a}"] = float(v) if ok else 0.0, float(ok)
            if not rated:
                problems.append(
                    DataIssue(rec.source, rec.line, "/".join(cfg.attributes), "missing: no rating")
                )
            rows.append(Example(rec.prompt, [rec.responses[i]], inputs, rec.source, rec.line))
        issues += problems
        if not problems:
            out.extend(rows)
    absent = [a for a in cfg.attributes if a not in found]
    if absent and records:
        cols = sorted({*records[0].attributes, records[0].field_name("scores")} - {"scores"})
        raise DataError(
            [
                DataIssue(
                    records[0].source,
                    0,
                    a,
                    f"attribute not found in any record; numeric columns found: {', '.join(cols) or 'none'}",
                )
                for a in absent
            ]
        )
    if issues and not cfg.skip_invalid:
        raise DataError(issues)
    if issues:
        log(f"skipped {len(issues)} problem(s) in {path} (--skip-invalid); first: {issues[0]}")
    if not out:
        raise DataError(issues or [DataIssue(str(path), 0, "<file>", "no rated responses")])
    return out


# ------------------------------------------------------------------------------------------ splits


def prepare(cfg: RewardConfig, tokenizer, train_examples=None, eval_examples=None, log=print, users=None):
    """(train TokenizedSet, eval TokenizedSet or None): the held-out split as the policy trainer makes it.
    PAL: ``users`` (a list) receives the user table's ids."""
    from preftune.train.data_prep import tokenize_all

    if train_examples is None:
        if cfg.data is None:
            raise ValueError("no training data: pass --data PATH (or data: in the config)")
        train_examples = load_reward_examples(cfg.data, cfg, tokenizer, split=cfg.split, log=log, users=users)
    if eval_examples is None and cfg.eval_data is not None:
        eval_examples = load_reward_examples(cfg.eval_data, cfg, tokenizer, log=log, users=users, new_users=False)
    elif eval_examples is None and cfg.eval_fraction > 0 and len(train_examples) > 1:
        # Split by record, not by pair: the pairs of one prompt stay on one side (no leak into eval).
        keys = [(e.source, e.line) if e.line > 0 else ("<example>", i) for i, e in enumerate(train_examples)]
        groups = sorted(set(keys))
        random.Random(cfg.seed).shuffle(groups)
        held = set(groups[: max(1, int(round(cfg.eval_fraction * len(groups))))])
        if len(held) < len(groups):
            eval_examples = [e for e, k in zip(train_examples, keys, strict=True) if k in held]
            train_examples = [e for e, k in zip(train_examples, keys, strict=True) if k not in held]
    train_set = tokenize_all(train_examples, tokenizer, cfg, "train", log)
    eval_set = tokenize_all(eval_examples, tokenizer, cfg, "eval", log) if eval_examples else None
    if cfg.loss == "rm_carm" and eval_set is not None:  # eval/context_free_acc rescores on the bare prompts
        from preftune.reward.carm import context_free_prompt_ids

        eval_set.context_free_prompt_ids = context_free_prompt_ids(eval_examples, tokenizer, cfg)
    return train_set, eval_set
