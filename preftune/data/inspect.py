"""`preftune inspect`: diagnostics of a preference data file before training.

Reads the file through preftune's own readers and derives the pairs ``preftune train`` would train
on (same validation, same ``pair_strategy``), then reports:

* counts: records, invalid records (each located by file, line and field), pairs, unique prompts;
* lengths of chosen vs rejected in words (and in tokens with a tokenizer), and a length-bias
  statistic: the mean log length ratio ``mean(log(len_chosen / len_rejected))`` with a normal 95% CI,
  the share of pairs whose chosen is longer, and the point-biserial correlation between the label
  (chosen = 1, rejected = 0) and length over all ``2n`` responses;
* duplicates: exact duplicate pairs, identical pairs (chosen == rejected, as validation compares
  them), near-duplicate pairs across records and near-identical chosen/rejected within a pair
  (:func:`near_duplicates`: exact Jaccard similarity of character n-gram sets of normalised text);
* truncation against ``max_length`` / ``max_prompt_length`` through ``data.tokenize_example``, the
  function training tokenises with, so the counts are the ones training would log;
* with a model: the CHES score of every pair (``data/ches.py``); with a reward model: reward margins.

Every statistic is defined in docs/inspect.md. ``inspect_data`` returns the report as a dict and
writes ``inspect.json``, ``inspect.md`` (and ``ches.jsonl``, ``rewards.jsonl``) to ``output``.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .schema import DataIssue, Text

# `preftune train`'s defaults (TrainConfig's fields; the data layer cannot import train/, a test keeps
# them equal) so that, by default, the truncation counts are the ones training would report.
TRAIN_DEFAULT_MODEL = "smollm2-135m-instruct"
TRAIN_MAX_LENGTH = 1024
TRAIN_MAX_PROMPT_LENGTH = 512
Z95 = 1.959963984540054  # two-sided 95% normal quantile
SHOWN_ISSUES = 20


class InspectConfig(BaseModel):
    """Options of `preftune inspect`; the tokenisation ones mean what they mean for `preftune train`."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    data: str = Field(..., description="preference data: .jsonl/.json/.parquet file or a saved HF dataset folder")
    split: str | None = Field(None, description="split to read from a dataset folder with several splits")
    model: str | None = Field(
        None, description="policy model (HF folder, hub id, .gguf, alias): CHES score of every pair (arXiv 2410.08847)"
    )
    reward_model: str | None = Field(
        None, description="reward / preference model folder (`preftune reward train` output): reward margins"
    )
    tokenizer: str | None = Field(
        None,
        description="tokenizer for token lengths and truncation (default: --model's, else the default model of "
        "`preftune train`); 'none' skips token statistics",
    )
    output: str = Field("runs/inspect", description="folder for inspect.json, inspect.md, ches.jsonl, rewards.jsonl")
    max_length: int = Field(TRAIN_MAX_LENGTH, gt=1, description="longest prompt + response in tokens")
    max_prompt_length: int = Field(
        TRAIN_MAX_PROMPT_LENGTH, gt=0, description="longest prompt in tokens (truncated first)"
    )
    truncation_mode: Literal["keep_end", "keep_start"] = Field(
        "keep_end", description="which end of an over-long prompt to keep"
    )
    chat_template: Literal["auto", "always", "never"] = Field(
        "auto", description="apply the tokenizer's chat template: auto = to conversations only"
    )
    pair_strategy: Literal["best_worst", "all", "adjacent"] = Field(
        "best_worst", description="how pairs are built from scored or ranked lists (as in training)"
    )
    near_duplicate_threshold: float = Field(
        0.8, gt=0, le=1, description="Jaccard similarity of character n-gram sets at or above which texts are "
        "near-duplicates"
    )
    ngram: int = Field(5, gt=0, description="character n-gram size for near-duplicates")
    top_k: int = Field(10, gt=0, description="examples listed per finding (line numbers)")
    batch_size: int = Field(8, gt=0, description="pairs per forward for CHES and reward scoring")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16: score under bf16 autocast")
    device: str | None = Field(None, description="device for the models (default: cuda when available, else cpu)")
    progress: bool = Field(True, description="show progress bars")

    @model_validator(mode="after")
    def _lengths(self) -> InspectConfig:
        if self.max_prompt_length >= self.max_length:
            raise ValueError(f"max_prompt_length ({self.max_prompt_length}) must be smaller than max_length "
                             f"({self.max_length})")
        return self

    def tokenizer_spec(self) -> str | None:
        if self.tokenizer is not None:
            return None if self.tokenizer.lower() == "none" else self.tokenizer
        return self.model or TRAIN_DEFAULT_MODEL


# --------------------------------------------------------------------------------------------
# Pairs
# --------------------------------------------------------------------------------------------


@dataclass
class Pair:
    """One (prompt, chosen, rejected) as training derives it, with where it came from."""

    index: int  # position among the derived pairs (the index training uses)
    source: str
    line: int
    prompt: Text
    chosen: Text
    rejected: Text

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


def load_pairs(cfg: InspectConfig) -> tuple[list[Pair], list[DataIssue], int, int]:
    """(pairs, issues, records read, valid records). Unreadable lines and invalid records are issues
    (file, line, field) rather than errors: inspection reports them and goes on with the rest."""
    from .derive import record_pairs
    from .readers import load_records
    from .validate import structural_problems

    issues: list[DataIssue] = []
    records = load_records(cfg.data, split=cfg.split, issues=issues)
    pairs: list[Pair] = []
    valid = 0
    for rec in records:
        problems = structural_problems(rec)
        if problems:
            issues += [DataIssue(rec.source, rec.line, rec.field_name(p), m) for p, m in problems]
            continue
        valid += 1
        found, issue = record_pairs(rec, cfg.pair_strategy)
        if issue is not None:
            issues.append(issue)
        for w, l in found:
            pairs.append(Pair(len(pairs), rec.source, rec.line, rec.prompt, rec.responses[w], rec.responses[l]))
    return pairs, sorted(issues, key=lambda i: i.line), len(records), valid


def text_of(t: Text) -> str:
    """Plain text of a prompt or response: chat messages' contents joined by newlines."""
    return t if isinstance(t, str) else "\n".join(str(m.get("content", "")) for m in t)


def word_count(t: Text) -> int:
    return len(text_of(t).split())


def _key(t: Any) -> str:
    return json.dumps(t, sort_keys=True, ensure_ascii=False)


# --------------------------------------------------------------------------------------------
# Lengths
# --------------------------------------------------------------------------------------------


def _mean(x: Sequence[float]) -> float:
    return sum(x) / len(x) if x else math.nan


def length_bias(chosen: Sequence[int], rejected: Sequence[int]) -> dict[str, Any]:
    """Length statistics of ``n`` pairs (lengths ≥ 1).

    ``log_ratio_mean`` = mean of ``d_i = ln(chosen_i / rejected_i)`` (0: no bias; > 0: chosen longer;
    exp of it is the geometric-mean length ratio) with the normal 95% CI ``mean ± 1.96 · sd/√n``
    (``sd`` with ``n − 1``); ``point_biserial`` = Pearson correlation between the label (1 chosen,
    0 rejected) and length over the ``2n`` responses (NaN when every length is equal).
    """
    import numpy as np

    n = len(chosen)
    if n == 0:
        return {"n": 0}
    c, r = np.asarray(chosen, dtype=float), np.asarray(rejected, dtype=float)
    d = np.log(c) - np.log(r)
    mean = float(d.mean())
    half = Z95 * float(d.std(ddof=1)) / math.sqrt(n) if n > 1 else math.nan
    return {
        "n": n,
        "chosen_mean": float(c.mean()),
        "rejected_mean": float(r.mean()),
        "chosen_median": float(np.median(c)),
        "rejected_median": float(np.median(r)),
        "share_chosen_longer": float((c > r).mean()),
        "share_equal": float((c == r).mean()),
        "log_ratio_mean": mean,
        "log_ratio_ci95": [mean - half, mean + half],
        "point_biserial": pearson(np.r_[np.ones(n), np.zeros(n)], np.r_[c, r]),
    }


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation; NaN when either side is constant."""
    import numpy as np

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    dx, dy = x - x.mean(), y - y.mean()
    den = math.sqrt(float((dx * dx).sum()) * float((dy * dy).sum()))
    return float((dx * dy).sum()) / den if den > 0 else math.nan


def _summary(x: Sequence[float]) -> dict[str, float]:
    import numpy as np

    if not len(x):
        return {}
    a = np.asarray(x, dtype=float)
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "max": float(a.max())}


# --------------------------------------------------------------------------------------------
# Duplicates
# --------------------------------------------------------------------------------------------

_NON_WORD = re.compile(r"[\W_]+")


def normalise(text: str) -> str:
    """NFKC, case-folded, every run of characters that are not letters or digits made one space, stripped."""
    return _NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def shingles(text: str, n: int) -> frozenset[str]:
    """Character ``n``-grams of ``text`` (already normalised); a text shorter than ``n`` is one shingle."""
    if len(text) < n:
        return frozenset([text])
    return frozenset(text[i : i + n] for i in range(len(text) - n + 1))


def jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b)


def near_duplicates(sets: Sequence[frozenset], threshold: float) -> list[tuple[int, int, float]]:
    """Every pair ``(i, j, J)`` with ``i < j`` and Jaccard ``J(sets[i], sets[j]) ≥ threshold``, exactly.

    All-pairs similarity join with prefix filtering (Bayardo et al. 2007): with the elements of every
    set in one global order (rarest first), two sets with ``J ≥ t`` share an element within the first
    ``|s| − ⌈t·|s|⌉ + 1`` of each; a size filter (``|small| ≥ t·|large|``) prunes more, and every
    candidate is verified with the exact Jaccard. No pair above the threshold is missed.
    """
    freq = Counter(x for s in sets for x in s)
    rank = {x: k for k, x in enumerate(sorted(freq, key=lambda x: (freq[x], x)))}
    ordered = [sorted(s, key=rank.__getitem__) for s in sets]
    index: dict[str, list[int]] = {}
    found = []
    for i in sorted(range(len(sets)), key=lambda i: (len(sets[i]), i)):
        size = len(sets[i])
        prefix = size - math.ceil(threshold * size - 1e-9) + 1
        candidates = set()
        for x in ordered[i][:prefix]:
            for j in index.get(x, ()):
                if len(sets[j]) >= threshold * size - 1e-9:
                    candidates.add(j)
            index.setdefault(x, []).append(i)
        for j in candidates:
            sim = jaccard(sets[i], sets[j])
            if sim >= threshold:
                found.append((min(i, j), max(i, j), sim))
    return sorted(found)


def duplicate_report(pairs: Sequence[Pair], threshold: float, n: int, top_k: int) -> dict[str, Any]:
    """Exact duplicates, identical pairs, near-duplicate pairs and near-identical chosen/rejected."""
    from .validate import _same  # validation's own rule for "chosen == rejected"

    groups: dict[str, list[int]] = {}
    for p in pairs:
        groups.setdefault(_key([p.prompt, p.chosen, p.rejected]), []).append(p.index)
    dup_groups = [g for g in groups.values() if len(g) > 1]
    identical = [p.index for p in pairs if _same(p.chosen, p.rejected)]

    # Near-duplicates across records: one representative per exact group (its first pair).
    reps = [g[0] for g in groups.values()]
    norm = {i: [normalise(text_of(t)) for t in (pairs[i].prompt, pairs[i].chosen, pairs[i].rejected)] for i in reps}
    sets = [shingles("\n".join(norm[i]), n) for i in reps]
    near = [(reps[a], reps[b], s) for a, b, s in near_duplicates(sets, threshold)]

    within = []
    for p in pairs:
        if p.index in identical:
            continue
        _, c, r = norm.get(p.index) or [normalise(text_of(t)) for t in (p.prompt, p.chosen, p.rejected)]
        s = jaccard(shingles(c, n), shingles(r, n))
        if s >= threshold:
            within.append((p.index, s))

    def line(i: int) -> int:
        return pairs[i].line

    return {
        "rule": f"normalised text (NFKC, case-folded, non-alphanumeric runs -> one space); character {n}-gram "
                f"sets; Jaccard >= {threshold}",
        "exact_duplicate_pairs": sum(len(g) - 1 for g in dup_groups),
        "exact_duplicate_groups": [[line(i) for i in g] for g in dup_groups[:top_k]],
        "identical_pairs": len(identical),
        "identical_pair_lines": [line(i) for i in identical[:top_k]],
        "near_duplicate_pairs": len(near),
        "near_duplicate_examples": [
            {"lines": [line(a), line(b)], "jaccard": round(s, 4)}
            for a, b, s in sorted(near, key=lambda t: (-t[2], t[0], t[1]))[:top_k]
        ],
        "near_identical_chosen_rejected": len(within),
        "near_identical_examples": [
            {"line": line(i), "jaccard": round(s, 4)} for i, s in sorted(within, key=lambda t: (-t[1], t[0]))[:top_k]
        ],
    }


# --------------------------------------------------------------------------------------------
# Tokens and truncation
# --------------------------------------------------------------------------------------------


def tokenize_pairs(pairs: Sequence[Pair], tokenizer: Any, cfg: InspectConfig, truncate: bool) -> list:
    """``TokenizedExample`` per pair through ``data.tokenize_example``, as training tokenises;
    ``truncate=False`` gives the full lengths."""
    from .derive import Example
    from .tokenize import tokenize_example

    out = []
    for p in pairs:
        try:
            tok = tokenize_example(
                Example(p.prompt, [p.chosen, p.rejected], source=p.source, line=p.line), tokenizer,
                max_length=cfg.max_length if truncate else None,
                max_prompt_length=cfg.max_prompt_length if truncate else None,
                truncation_mode=cfg.truncation_mode, chat_template=cfg.chat_template,
            )
        except ValueError as e:
            raise ValueError(f"{p.where}: {e}") from None
        tok.index = p.index
        out.append(tok)
    return out


def truncation_report(full: Sequence, cut: Sequence, pairs: Sequence[Pair], cfg: InspectConfig) -> dict[str, Any]:
    """How many prompts and responses ``tokenize_example`` cuts at these limits (``full``: the same pairs
    untruncated; a response is cut when it lost tokens)."""
    chosen = [len(c.response_ids[0]) < len(f.response_ids[0]) for f, c in zip(full, cut, strict=True)]
    rejected = [len(c.response_ids[1]) < len(f.response_ids[1]) for f, c in zip(full, cut, strict=True)]
    prompt = [c.prompt_truncated for c in cut]
    anything = [p or c or r for p, c, r in zip(prompt, chosen, rejected, strict=True)]
    return {
        "max_length": cfg.max_length,
        "max_prompt_length": cfg.max_prompt_length,
        "truncation_mode": cfg.truncation_mode,
        "pairs_truncated": sum(anything),
        "prompts_truncated": sum(prompt),
        "chosen_truncated": sum(chosen),
        "rejected_truncated": sum(rejected),
        "truncated_lines": [pairs[i].line for i, a in enumerate(anything) if a][: cfg.top_k],
        "prompt_tokens": _summary([len(f.prompt_ids) for f in full]),
        "longest_sequence_tokens": _summary([len(f.prompt_ids) + max(map(len, f.response_ids)) for f in full]),
    }


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def _device(cfg: InspectConfig) -> str:
    if cfg.device is not None:
        return cfg.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _ranked(scores: Sequence[float], pairs: Sequence[Pair], top_k: int, highest: bool, **extra: Sequence) -> list:
    order = sorted((i for i, s in enumerate(scores) if not math.isnan(s)),
                   key=lambda i: (-scores[i] if highest else scores[i], i))
    return [{"line": pairs[i].line, "index": pairs[i].index, **{k: v[i] for k, v in extra.items()}}
            for i in order[:top_k]]


def ches_report(model: Any, tokenizer: Any, cut: Sequence, pairs: Sequence[Pair], cfg: InspectConfig
                ) -> tuple[dict[str, Any], list[dict]]:
    """(summary, per-pair rows) of CHES on the tokens training would see (truncated as configured)."""
    from .ches import ches_scores

    # Any id will do for padding: right padding sits after every position that is read.
    pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    device = _device(cfg)
    model.to(device)
    s = ches_scores(model, cut, pad_id=pad, batch_size=cfg.batch_size, device=device,
                    precision=cfg.precision, progress=cfg.progress)
    rows = [{"index": p.index, "source": p.source, "line": p.line, "ches": s.raw[k], "ches_ln": s.normalised[k],
             "chosen_tokens": s.chosen_tokens[k], "rejected_tokens": s.rejected_tokens[k]}
            for k, p in enumerate(pairs)]
    summary = {
        "definition": "CHES = <S+, S-> - ||S+||^2 with S = sum of last hidden states at the positions predicting "
                      "each response token; ches_ln uses the means S/|y| (Razin et al. 2024, arXiv 2410.08847)",
        "ches": _summary([x for x in s.raw if not math.isnan(x)]),
        "ches_ln": _summary([x for x in s.normalised if not math.isnan(x)]),
        "undefined": sum(math.isnan(x) for x in s.normalised),
        "top_by_ches_ln": _ranked(s.normalised, pairs, cfg.top_k, True, ches_ln=s.normalised, ches=s.raw),
        "top_by_ches": _ranked(s.raw, pairs, cfg.top_k, True, ches=s.raw, ches_ln=s.normalised),
    }
    return summary, rows


def reward_report(rm: Any, pairs: Sequence[Pair], cfg: InspectConfig, word_log_ratio: Sequence[float]
                  ) -> tuple[dict[str, Any], list[dict]]:
    """Margins ``r(chosen) − r(rejected)`` under a reward model (GPM: ``logit P(chosen ≻ rejected)``);
    the reward model disagrees with a pair when its margin is negative."""
    import torch
    from tqdm.auto import tqdm

    margins: list[float] = []
    block = 32 * cfg.batch_size
    for s in tqdm(range(0, len(pairs), block), disable=not cfg.progress, desc="rewards", dynamic_ncols=True):
        part = pairs[s : s + block]
        prompts, a, b = [p.prompt for p in part], [p.chosen for p in part], [p.rejected for p in part]
        if rm.kind == "gpm":
            prob = rm.prefer_batch(prompts, a, b, batch_size=cfg.batch_size).double()
            margins += torch.logit(prob).tolist()
        else:
            r = rm.score(prompts + prompts, a + b, batch_size=cfg.batch_size)
            margins += (r[: len(part)] - r[len(part) :]).tolist()
    n = len(margins)
    mean = _mean(margins)
    sd = float(torch.tensor(margins, dtype=torch.float64).std()) if n > 1 else math.nan
    summary = {
        "kind": rm.kind,
        "margin": _summary(margins),
        "margin_ci95": [mean - Z95 * sd / math.sqrt(n), mean + Z95 * sd / math.sqrt(n)] if n > 1 else None,
        "share_disagree": sum(m < 0 for m in margins) / n if n else math.nan,
        "share_tie": sum(m == 0 for m in margins) / n if n else math.nan,
        "margin_vs_word_log_ratio": pearson(margins, word_log_ratio) if n > 1 else math.nan,
        "most_disagreeing": _ranked(margins, pairs, cfg.top_k, False, margin=margins),
    }
    rows = [{"index": p.index, "source": p.source, "line": p.line, "margin": m} for p, m in zip(pairs, margins,
                                                                                               strict=True)]
    return summary, rows


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def inspect_data(cfg: InspectConfig, *, model: Any = None, tokenizer: Any = None, reward_model: Any = None,
                 log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Run every diagnostic; write the report files to ``cfg.output``; return the report.

    The models are passed in, loaded by the caller (the data layer loads no model): ``tokenizer`` for
    token lengths and truncation, ``model`` (a causal LM, with its ``tokenizer``) for CHES,
    ``reward_model`` (a ``preftune.reward.RewardModel``) for margins. The command line loads them from
    ``cfg.model``, ``cfg.tokenizer_spec()`` and ``cfg.reward_model``.
    """
    import numpy as np

    from .schema import DataError

    if model is not None and tokenizer is None:
        raise ValueError("CHES needs the model's tokenizer")
    pairs, issues, n_records, n_valid = load_pairs(cfg)
    if not pairs:
        raise DataError(issues + [DataIssue(cfg.data, 0, "<file>", "no pairs to inspect")])
    log(f"{cfg.data}: {n_records} records, {len(pairs)} pairs" + (f", {len(issues)} issue(s)" if issues else ""))
    words_c, words_r = [word_count(p.chosen) for p in pairs], [word_count(p.rejected) for p in pairs]
    report: dict[str, Any] = {
        "data": cfg.data,
        "settings": cfg.model_dump(mode="json"),
        "counts": {
            "records": n_records,
            "valid_records": n_valid,
            "issues": len(issues),
            "pairs": len(pairs),
            "prompts": len({_key([p.source, p.line]) for p in pairs}),
            "unique_prompts": len({_key(p.prompt) for p in pairs}),
        },
        "issues": [str(i) for i in issues[:SHOWN_ISSUES]],
        "lengths": {"words": length_bias(words_c, words_r),
                    "prompt_words": _summary([word_count(p.prompt) for p in pairs])},
        "duplicates": duplicate_report(pairs, cfg.near_duplicate_threshold, cfg.ngram, cfg.top_k),
    }
    files: dict[str, list[dict]] = {}
    if tokenizer is not None:
        full = tokenize_pairs(pairs, tokenizer, cfg, truncate=False)
        cut = tokenize_pairs(pairs, tokenizer, cfg, truncate=True)
        report["lengths"]["tokens"] = length_bias([len(f.response_ids[0]) for f in full],
                                                  [len(f.response_ids[1]) for f in full])
        report["truncation"] = truncation_report(full, cut, pairs, cfg)
        if model is not None:
            report["ches"], files["ches.jsonl"] = ches_report(model, tokenizer, cut, pairs, cfg)
    if reward_model is not None:
        ratio = (np.log(words_c) - np.log(words_r)).tolist()
        report["reward"], files["rewards.jsonl"] = reward_report(reward_model, pairs, cfg, ratio)

    report = _finite(report)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    md = render_markdown(report)
    _write(out / "inspect.json", json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    _write(out / "inspect.md", md)
    for name, rows in files.items():
        _write(out / name, "".join(json.dumps(_finite(r), ensure_ascii=False) + "\n" for r in rows))
    report["files"] = [str(out / n) for n in ["inspect.json", "inspect.md", *files]]
    return report


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)  # never a half-written report


def _finite(x: Any) -> Any:
    """NaN and infinities become null: JSON has no NaN."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------


def _f(x: Any, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) >= 1e4 or (x != 0 and abs(x) < 1e-3) else f"{x:.{digits}f}"
    return str(x)


def _lines(xs: Sequence[int]) -> str:
    return ", ".join(map(str, xs)) if xs else "—"


def _length_rows(name: str, s: dict) -> list[str]:
    if not s.get("n"):
        return []
    ci = s["log_ratio_ci95"]
    return [f"| {name} | {_f(s['chosen_mean'], 1)} | {_f(s['rejected_mean'], 1)} | {_f(s['share_chosen_longer'])} "
            f"| {_f(s['log_ratio_mean'])} [{_f(ci[0])}, {_f(ci[1])}] | {_f(s['point_biserial'])} |"]


def render_markdown(r: dict[str, Any]) -> str:
    """The report as Markdown (what the command prints and writes to inspect.md)."""
    c, d = r["counts"], r["duplicates"]
    out = [f"# preftune inspect: {r['data']}", "",
           f"{c['records']} records ({c['valid_records']} valid, {c['issues']} issue(s)), {c['pairs']} pairs, "
           f"{c['unique_prompts']} unique prompts of {c['prompts']}.", ""]
    if r["issues"]:
        out += ["Issues (first shown):", "", *[f"- {i}" for i in r["issues"]], ""]
    out += ["## Lengths", "",
            "| unit | chosen mean | rejected mean | share chosen longer | mean ln(chosen/rejected) [95% CI] "
            "| point-biserial r |", "|---|---|---|---|---|---|",
            *_length_rows("words", r["lengths"]["words"]), *_length_rows("tokens", r["lengths"].get("tokens", {})),
            ""]
    out += ["## Duplicates", "", f"Rule: {d['rule']}.", "",
            f"- exact duplicate pairs (extra copies): {d['exact_duplicate_pairs']}; groups (lines): "
            + ("; ".join(_lines(g) for g in d["exact_duplicate_groups"]) or "—"),
            f"- identical pairs (chosen == rejected; `preftune train` refuses them): {d['identical_pairs']}; "
            f"lines: {_lines(d['identical_pair_lines'])}",
            f"- near-duplicate pairs across records: {d['near_duplicate_pairs']}; "
            + ("; ".join(f"{a}~{b} ({_f(e['jaccard'])})" for e in d["near_duplicate_examples"]
                         for a, b in [e["lines"]]) or "—"),
            f"- near-identical chosen/rejected: {d['near_identical_chosen_rejected']}; "
            + (", ".join(f"{e['line']} ({_f(e['jaccard'])})" for e in d["near_identical_examples"]) or "—"), ""]
    t = r.get("truncation")
    if t:
        pt, lt = t["prompt_tokens"], t["longest_sequence_tokens"]
        out += ["## Truncation", "",
                f"At max_length={t['max_length']}, max_prompt_length={t['max_prompt_length']} "
                f"({t['truncation_mode']}): {t['pairs_truncated']} pairs cut — {t['prompts_truncated']} prompts, "
                f"{t['chosen_truncated']} chosen, {t['rejected_truncated']} rejected; "
                f"lines: {_lines(t['truncated_lines'])}.",
                f"Prompt tokens: mean {_f(pt.get('mean'), 1)}, p95 {_f(pt.get('p95'), 1)}, max {_f(pt.get('max'), 0)}; "
                f"prompt + longer response: p95 {_f(lt.get('p95'), 1)}, max {_f(lt.get('max'), 0)}.",
                ""]
    else:
        out += ["## Truncation", "", "Skipped: no tokenizer (--tokenizer none).", ""]
    ch = r.get("ches")
    if ch:
        out += ["## CHES (likelihood displacement risk)", "",
                f"{ch['definition']}. Higher = more likely to lower the chosen response's likelihood under DPO.", "",
                f"ches_ln: mean {_f(ch['ches_ln'].get('mean'))}, p50 {_f(ch['ches_ln'].get('p50'))}, "
                f"p95 {_f(ch['ches_ln'].get('p95'))}, max {_f(ch['ches_ln'].get('max'))}; "
                f"ches: mean {_f(ch['ches'].get('mean'))}, max {_f(ch['ches'].get('max'))}.", "",
                "| line | ches_ln | ches |", "|---|---|---|",
                *[f"| {e['line']} | {_f(e['ches_ln'])} | {_f(e['ches'])} |" for e in ch["top_by_ches_ln"]], ""]
    rw = r.get("reward")
    if rw:
        ci = rw["margin_ci95"] or [None, None]
        out += ["## Reward model", "",
                f"Margin r(chosen) − r(rejected): mean {_f(rw['margin'].get('mean'))} [{_f(ci[0])}, {_f(ci[1])}], "
                f"p50 {_f(rw['margin'].get('p50'))}; the reward model disagrees with {_f(rw['share_disagree'])} of "
                f"pairs (ties {_f(rw['share_tie'])}); correlation of margin with ln word ratio "
                f"{_f(rw['margin_vs_word_log_ratio'])}.", "",
                "| line | margin |", "|---|---|",
                *[f"| {e['line']} | {_f(e['margin'])} |" for e in rw["most_disagreeing"]], ""]
    return "\n".join(out)
