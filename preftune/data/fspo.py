"""FSPO episodes (METHODS.md §M8): few-shot-conditioned preference pairs for personalisation.

Each user is a task. For every pair (x, y_w, y_l) of a user, the prompt is prefixed with N *other* pairs of
the same user as in-context examples, so a policy trained with any paired objective (IPO on sums, `ipo_sum`,
or DPO) on the result learns to prefer what a user prefers from that user's few shots::

    records, _ = load_and_validate("prefs.jsonl", objective_shape="paired")   # records carry user_id
    rows, stats = fspo_episodes(records, n_shots=4, seed=0)                     # ordinary pair rows

The rendered context (``render_context``) is plain text, the same for every objective, so the reference sees
it too (the engine scores the reference on the same rendered prompt). Episodes are fixed (one per pair,
drawn once from ``seed``), so reference log-probs can be cached: a fresh draw per epoch is a new data file.
No model is loaded here; the implicit-reward evaluation lives in ``benchmarks/fspo_eval.py``.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .derive import record_pairs
from .schema import DataError, DataIssue, PreferenceRecord, Text

INSTRUCTION = ("Below are some of this user's past preferences between two responses. "
               "Answer the new question the way this user would prefer.")


class FspoDataConfig(BaseModel):
    """Options of `preftune data fspo`."""

    model_config = ConfigDict(extra="forbid")

    data: str = Field(..., description="preference data with a user_id on every record (any layout preftune reads)")
    output: str = Field(..., description="JSONL of few-shot-conditioned pairs (prompt/responses/pairs/user_id)")
    shots: int = Field(4, ge=1, description="in-context pairs of the same user before each example (N)")
    seed: int = Field(0, description="seed of the shot draws (the same seed gives the same file)")
    min_shots: int = Field(1, ge=0, description="drop users with fewer other pairs than this (logged)")
    eval_users: int = Field(0, ge=0, description="hold out this many users (drawn with the seed) for --eval-output")
    eval_output: str | None = Field(None, description="JSONL for the held-out users' conditioned pairs")
    pair_strategy: Literal["best_worst", "all", "adjacent"] = Field(
        "best_worst", description="how pairs are built from scored or ranked lists (as in training)")


@dataclass(frozen=True)
class Shot:
    """One labelled pair of a user: a query, or an in-context example of another query."""

    prompt: Text
    chosen: Text
    rejected: Text
    source: str = "<memory>"
    line: int = 0


def _text(value: Text) -> str:
    """Plain text of a prompt or response (a chat list becomes ``role: content`` lines)."""
    if isinstance(value, str):
        return value
    if len(value) == 1:
        return str(value[0].get("content", ""))
    return "\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in value)


def user_pairs(records: list[PreferenceRecord], pair_strategy: str = "best_worst") -> dict[str, list[Shot]]:
    """Every user's pairs in file order (record, then pair). A record without ``user_id`` or without a
    preference is an error naming its file, line and field: FSPO has no meaning for an anonymous pair."""
    issues: list[DataIssue] = []
    by_user: dict[str, list[Shot]] = {}
    for r in records:
        if r.user_id is None:
            issues.append(DataIssue(r.source, r.line, r.field_name("user_id"),
                                    "missing: FSPO groups pairs by user (give every record a user_id)"))
            continue
        pairs, issue = record_pairs(r, pair_strategy)
        if issue is not None:
            issues.append(issue)
            continue
        for w, l in pairs:
            by_user.setdefault(str(r.user_id), []).append(
                Shot(r.prompt, r.responses[w], r.responses[l], r.source, r.line))
    if issues:
        raise DataError(issues)
    return by_user


def draw_shots(pairs: list[Shot], query: int, n_shots: int, seed: int, user: str) -> list[Shot]:
    """Up to ``n_shots`` of ``pairs`` other than ``pairs[query]``, in random order (both from one generator seeded
    by (seed, user, query), so a pair's context does not depend on the other users or the file order of users).
    A pair equal in text to the query is excluded too: a duplicated row would show the answer in context."""
    q = pairs[query]
    same = (_text(q.prompt), _text(q.chosen), _text(q.rejected))
    pool = [p for i, p in enumerate(pairs)
            if i != query and (_text(p.prompt), _text(p.chosen), _text(p.rejected)) != same]
    rng = random.Random(f"fspo-{seed}-{user}-{query}")  # str seeds hash with SHA-512: stable across runs
    return rng.sample(pool, min(n_shots, len(pool)))


def render_context(shots: list[Shot]) -> str:
    """The in-context block: the instruction, then each shot as question / preferred / dispreferred."""
    blocks = [INSTRUCTION]
    for i, s in enumerate(shots, 1):
        blocks.append(f"# Example {i}\nQuestion: {_text(s.prompt)}\n"
                      f"Preferred response: {_text(s.chosen)}\nDispreferred response: {_text(s.rejected)}")
    return "\n\n".join(blocks) + "\n\n# New question\n"


def condition(prompt: Text, shots: list[Shot]) -> Text:
    """``prompt`` with the shots in front: a text prompt gets the block as a prefix; a conversation gets it at
    the start of its first message (so the chat template still sees the original turns and roles)."""
    context = render_context(shots)
    if isinstance(prompt, str):
        return context + prompt
    first = dict(prompt[0])
    first["content"] = context + str(first.get("content", ""))
    return [first, *prompt[1:]]


def split_users(users: Iterable[str], n_eval: int, seed: int) -> tuple[list[str], list[str]]:
    """(train users, held-out users), both sorted; ``n_eval`` held-out users drawn with ``seed``."""
    ordered = sorted(users)
    if n_eval >= len(ordered) and n_eval:
        raise ValueError(f"eval_users={n_eval} leaves no training user (the data has {len(ordered)} users)")
    held = set(random.Random(f"fspo-split-{seed}").sample(ordered, n_eval))
    return [u for u in ordered if u not in held], [u for u in ordered if u in held]


def episodes(by_user: dict[str, list[Shot]], users: list[str], n_shots: int, seed: int,
             min_shots: int = 1) -> tuple[list[tuple[str, Shot, list[Shot]]], dict[str, Any]]:
    """(user, query, shots) for every pair of ``users`` (users in the given order, pairs in file order), and
    stats: how many shots the episodes got (a user with fewer than N other pairs gets all of them) and which
    users were dropped for having fewer than ``min_shots`` other pairs."""
    out, used, dropped = [], Counter(), []
    for u in users:
        pairs = by_user[u]
        if len(pairs) - 1 < min_shots:
            dropped.append(u)
            continue
        for j, q in enumerate(pairs):
            shots = draw_shots(pairs, j, n_shots, seed, u)
            if len(shots) < min_shots:  # only duplicates of the query were left
                continue
            used[len(shots)] += 1
            out.append((u, q, shots))
    return out, {"episodes": len(out), "shots_used": dict(sorted(used.items())), "dropped_users": dropped}


def episode_row(user: str, query: Shot, shots: list[Shot] | None) -> dict[str, Any]:
    """A pairs-file row (native layout: prompt, responses [chosen, rejected], pairs, user_id); ``shots=None``
    gives the same pair without context (the evaluation's no-shot baseline)."""
    prompt = query.prompt if shots is None else condition(query.prompt, shots)
    return {"prompt": prompt, "responses": [query.chosen, query.rejected], "pairs": [[0, 1]], "user_id": user}


def fspo_episodes(records: list[PreferenceRecord], n_shots: int, seed: int = 0, *, users: list[str] | None = None,
                  min_shots: int = 1, pair_strategy: str = "best_worst") -> tuple[list[dict], dict[str, Any]]:
    """Rows of few-shot-conditioned pairs for ``users`` (default: all, sorted) and the stats of :func:`episodes`."""
    if n_shots < 1:
        raise ValueError(f"n_shots must be at least 1, got {n_shots}")
    by_user = user_pairs(records, pair_strategy)
    eps, stats = episodes(by_user, sorted(by_user) if users is None else users, n_shots, seed, min_shots)
    return [episode_row(u, q, s) for u, q, s in eps], stats


def per_user_accuracy(user_ids: list[str], margins: list[float]) -> dict[str, float]:
    """Per user, the share of pairs whose reward margin r(y_w) − r(y_l) is positive (a tie counts one half)."""
    hits: dict[str, list[float]] = {}
    for u, m in zip(user_ids, margins, strict=True):
        hits.setdefault(u, []).append(1.0 if m > 0 else 0.5 if m == 0 else 0.0)
    return {u: sum(h) / len(h) for u, h in sorted(hits.items())}


def _write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    """Written through a temporary file and renamed: a killed run leaves no half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)
    return path


def build_fspo_file(cfg: FspoDataConfig, log: Callable[[str], None] = print) -> list[Path]:
    """Read and validate ``cfg.data``, write the training users' episodes to ``cfg.output`` (and the held-out
    users' to ``cfg.eval_output``); nothing is written unless the data is valid."""
    from .validate import load_and_validate

    if cfg.eval_users and not cfg.eval_output:
        raise ValueError("--eval-users needs --eval-output (where the held-out users' pairs go)")
    records, _ = load_and_validate(cfg.data, objective_shape="paired")
    by_user = user_pairs(records, cfg.pair_strategy)
    train_users, eval_users = split_users(by_user, cfg.eval_users, cfg.seed)
    written = []
    for users, path, name in ((train_users, cfg.output, "train"), (eval_users, cfg.eval_output, "held-out")):
        if path is None:
            continue
        eps, stats = episodes(by_user, users, cfg.shots, cfg.seed, cfg.min_shots)
        if not eps:
            raise ValueError(f"no {name} episodes: every user has fewer than min_shots={cfg.min_shots} other pairs")
        written.append(_write_jsonl(path, [episode_row(u, q, s) for u, q, s in eps]))
        log(f"{name}: {len(users) - len(stats['dropped_users'])} users, {stats['episodes']} pairs; shots used "
            f"{stats['shots_used']} (N={cfg.shots})"
            + (f"; dropped users with < {cfg.min_shots} other pairs: {stats['dropped_users']}"
               if stats["dropped_users"] else ""))
    return written
