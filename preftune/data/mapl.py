"""MAPL's multi-level pairs (METHODS.md §M5, arXiv 2505.12845): `preftune data mapl IN OUT`.

From ordinary pairs (x, y_w, y_l) and a library of verifiable instructions (each a programmatic checker, IFEval
style: word limits, keywords, letter case, commas, the last character), two kinds of records are added:

* **intra-sample** (PARTIAL in METHODS.md): one response y = y_w under two prompts. For ``instructions`` = m
  families, every family gives an instruction y meets and one it violates, both derived from y (so the labels are
  exact); x_w = x ⊕ the m met ones, x_l = the same but with one family's (drawn) instruction swapped for its
  violated one: y meets all of x_w's and all but one of x_l's (the paper's first condition, with the hardest
  contrast). Written as ``responses`` [y, y], ``pairs`` [[0, 1]], ``pair_prompts`` [[x_w, x_l]]: the pair is y
  under x_w preferred to y under x_l (``--loss mapl_intra``).
* **inter-sample** (HIGH-LEVEL; our reading [UNVERIFIED]): x' = x ⊕ m instructions, each family's drawn from the
  ones y_w or y_l meets (a fair coin per family); the responses are ordered by how many of x''s instructions they
  meet, the original preference breaking ties (``meta.compliance``, ``meta.flipped``).

⊕ appends the instructions to the prompt's text after a blank line (to the last user message of a chat prompt).
Draws come from ``random.Random(f"{seed}:{line}:{j}")`` per pair, so a file is reproducible and independent of
record order. Families without a usable instruction for a response (e.g. ``max_words`` for a one-word reply) are
skipped for that pair; a pair with fewer than m usable families adds nothing (counted in the log).
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .schema import PreferenceRecord, Text

# Words unlikely in a reply, for keyword instructions a response does not meet (the first absent one is used).
FILLERS = ("zephyr", "quokka", "marzipan", "fjord", "xylophone", "kumquat", "nebula", "obsidian")
_WORD = re.compile(r"[A-Za-z]+")


def words(text: str) -> list[str]:
    return text.split()


def _alpha_words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


@dataclass(frozen=True)
class Instruction:
    """A verifiable instruction: ``kind`` and its argument fix both the text and the checker."""

    kind: str
    arg: Any = None

    @property
    def text(self) -> str:
        return {
            "max_words": f"Answer in at most {self.arg} words.",
            "include": f'Include the word "{self.arg}".',
            "exclude": f'Do not use the word "{self.arg}".',
            "lowercase": "Write your whole answer in lowercase letters.",
            "uppercase": "Write your whole answer in capital letters.",
            "no_commas": "Do not use any commas.",
            "end_with": f'End your answer with the character "{self.arg}".',
        }[self.kind]

    def check(self, y: str) -> bool:
        if self.kind == "max_words":
            return len(words(y)) <= self.arg
        if self.kind == "include":
            return self.arg in _alpha_words(y)
        if self.kind == "exclude":
            return self.arg not in _alpha_words(y)
        if self.kind == "lowercase":
            return y == y.lower()
        if self.kind == "uppercase":
            return y == y.upper()
        if self.kind == "no_commas":
            return "," not in y
        if self.kind == "end_with":
            return y.rstrip().endswith(self.arg)
        raise ValueError(f"unknown instruction kind {self.kind!r}")


Variants = tuple[Instruction | None, Instruction | None]  # (one y meets, one y violates)


def _keyword(y: str) -> str | None:
    """The longest word of y (≥ 3 letters; the first on ties), lowercased."""
    best = None
    for w in _alpha_words(y):
        if len(w) >= 3 and (best is None or len(w) > len(best)):
            best = w
    return best


def _filler(y: str) -> str:
    present = set(_alpha_words(y))
    return next(w for w in FILLERS if w not in present)


def _max_words(y: str) -> Variants:
    n = len(words(y))
    return Instruction("max_words", n), (Instruction("max_words", n - 1) if n >= 2 else None)


def _include(y: str) -> Variants:
    k = _keyword(y)
    return (Instruction("include", k) if k else None), Instruction("include", _filler(y))


def _exclude(y: str) -> Variants:
    k = _keyword(y)
    return Instruction("exclude", _filler(y)), (Instruction("exclude", k) if k else None)


def _case(y: str) -> Variants:
    lower, upper = Instruction("lowercase"), Instruction("uppercase")
    if y.lower() == y.upper():  # no letters: both hold, nothing to contrast
        return None, None
    met = lower if lower.check(y) else upper if upper.check(y) else None
    return met, upper if lower.check(y) else lower


def _commas(y: str) -> Variants:
    rule = Instruction("no_commas")
    return (rule, None) if rule.check(y) else (None, rule)


def _ending(y: str) -> Variants:
    s = y.rstrip()
    if not s:
        return None, None
    other = "!" if s[-1] != "!" else "?"
    return Instruction("end_with", s[-1]), Instruction("end_with", other)


FAMILIES: dict[str, Callable[[str], Variants]] = {
    "max_words": _max_words,
    "include": _include,
    "exclude": _exclude,
    "case": _case,
    "no_commas": _commas,
    "ending": _ending,
}


class MaplDataConfig(BaseModel):
    """Options of `preftune data mapl`."""

    model_config = ConfigDict(extra="forbid")

    data: str = Field(..., description="preference pairs (any layout preftune reads; text prompts and responses)")
    output: str = Field(..., description="JSONL: the original pairs, then intra- and inter-sample records")
    instructions: int = Field(2, ge=1, le=len(FAMILIES), description="added instructions per prompt (m)")
    families: list[str] = Field(list(FAMILIES), description=f"instruction families to draw from: {', '.join(FAMILIES)}")
    levels: list[str] = Field(["intra", "inter"], description="which records to add: intra, inter or both")
    keep_original: bool = Field(True, description="write the original pairs too (L = L_pair + L_intra + L_inter)")
    seed: int = Field(0, description="seed of the draws (the same seed gives the same file)")
    pair_strategy: str = Field("best_worst", description="how pairs are built from scored or ranked lists")

    def model_post_init(self, __context: Any) -> None:
        bad = [f for f in self.families if f not in FAMILIES]
        if bad:
            raise ValueError(f"families: unknown {bad}; choose from {', '.join(FAMILIES)}")
        bad = [v for v in self.levels if v not in ("intra", "inter")]
        if bad or not self.levels:
            raise ValueError(f"levels: expected intra and/or inter, got {self.levels}")


def add_instructions(prompt: Text, instructions: list[Instruction]) -> Text:
    """x ⊕ instructions: their texts after a blank line (in the last user message of a chat prompt)."""
    tail = " ".join(i.text for i in instructions)
    if isinstance(prompt, str):
        return f"{prompt}\n\n{tail}"
    messages = [dict(m) for m in prompt]
    last = max(i for i, m in enumerate(messages) if m.get("role") == "user")
    messages[last]["content"] = f"{messages[last]['content']}\n\n{tail}"
    return messages


def _usable(y: str, families: list[str], need_violation: bool) -> list[str]:
    out = []
    for f in families:
        met, violated = FAMILIES[f](y)
        if met is not None and (violated is not None or not need_violation):
            out.append(f)
    return out


def intra_row(prompt: Text, y: str, families: list[str], m: int, rng: random.Random) -> dict | None:
    """One same-response record, or None when y has fewer than m families with both variants."""
    usable = _usable(y, families, need_violation=True)
    if len(usable) < m:
        return None
    chosen = rng.sample(usable, m)
    swap = rng.randrange(m)
    met = [FAMILIES[f](y)[0] for f in chosen]
    violated = list(met)
    violated[swap] = FAMILIES[chosen[swap]](y)[1]
    x_w, x_l = add_instructions(prompt, met), add_instructions(prompt, violated)
    return {"prompt": prompt, "responses": [y, y], "pairs": [[0, 1]], "pair_prompts": [[x_w, x_l]],
            "meta": {"mapl": "intra", "instructions_w": [i.text for i in met],
                     "instructions_l": [i.text for i in violated]}}


def inter_row(prompt: Text, y_w: str, y_l: str, families: list[str], m: int, rng: random.Random) -> dict | None:
    """One instruction-augmented pair, or None when fewer than m families give both responses an instruction."""
    usable = [f for f in families if FAMILIES[f](y_w)[0] is not None and FAMILIES[f](y_l)[0] is not None]
    if len(usable) < m:
        return None
    chosen = rng.sample(usable, m)
    added = [FAMILIES[f](y_w if rng.random() < 0.5 else y_l)[0] for f in chosen]
    cw, cl = (sum(i.check(y) for i in added) for y in (y_w, y_l))
    flipped = cl > cw
    first, second = (y_l, y_w) if flipped else (y_w, y_l)
    return {"prompt": add_instructions(prompt, added), "responses": [first, second], "pairs": [[0, 1]],
            "meta": {"mapl": "inter", "instructions": [i.text for i in added],
                     "compliance": [cl, cw] if flipped else [cw, cl], "flipped": flipped}}


def mapl_rows(records: list[PreferenceRecord], cfg: MaplDataConfig) -> tuple[list[dict], dict[str, int]]:
    """(rows: originals first, then for each pair its intra and inter records; counts)."""
    from .derive import record_pairs

    originals, added = [], []
    stats = {"pairs": 0, "intra": 0, "inter": 0, "inter_flipped": 0, "skipped_intra": 0, "skipped_inter": 0}
    for r in records:
        pairs, _ = record_pairs(r, cfg.pair_strategy)
        for j, (w, lo) in enumerate(pairs):
            y_w, y_l = r.responses[w], r.responses[lo]
            if not (isinstance(y_w, str) and isinstance(y_l, str)):
                raise ValueError(f"{r.source}:{r.line}: responses: MAPL's checkers need text responses, not messages")
            stats["pairs"] += 1
            originals.append({"prompt": r.prompt, "responses": [y_w, y_l], "pairs": [[0, 1]]})
            rng = random.Random(f"{cfg.seed}:{r.line}:{j}")
            if "intra" in cfg.levels:
                row = intra_row(r.prompt, y_w, cfg.families, cfg.instructions, rng)
                stats["intra" if row else "skipped_intra"] += 1
                added += [row] if row else []
            if "inter" in cfg.levels:
                row = inter_row(r.prompt, y_w, y_l, cfg.families, cfg.instructions, rng)
                stats["inter" if row else "skipped_inter"] += 1
                stats["inter_flipped"] += bool(row and row["meta"]["flipped"])
                added += [row] if row else []
    return (originals if cfg.keep_original else []) + added, stats


def build_mapl_file(cfg: MaplDataConfig, log: Callable[[str], None] = print) -> Path:
    """Read and validate ``cfg.data`` (pairs), write the augmented file through a temporary one."""
    from .validate import load_and_validate

    records, _ = load_and_validate(cfg.data, objective_shape="paired")
    rows, stats = mapl_rows(records, cfg)
    if not rows:
        raise ValueError(f"{cfg.data}: nothing to write (no pair had {cfg.instructions} usable instruction families)")
    path = Path(cfg.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)
    log(f"{stats['pairs']} pairs: {stats['intra']} intra-sample records ({stats['skipped_intra']} pairs without "
        f"{cfg.instructions} usable families), {stats['inter']} inter-sample ({stats['inter_flipped']} flipped by "
        f"compliance, {stats['skipped_inter']} skipped)")
    return path
