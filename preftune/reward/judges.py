"""Judges: one small interface that online training and evaluation call.

A judge looks at a prompt and responses and returns pointwise scores (when it has them) and pairwise
preference probabilities P(a ≻ b):

    judge.score(prompt, [r1, r2, ...]) -> [s1, s2, ...]     (pointwise judges; else NotImplementedError)
    judge.prefer(prompt, a, b)          -> P(a ≻ b)          (every judge)
    judge.compare_many(prompts, a, b)   -> [Verdict]         (batched; Verdict.winner() is "a"/"b"/"tie")

Implementations: ``TaskJudge`` (a built-in task's programmatic judge, preftune.tasks), ``FunctionJudge``
(any ``f(prompt, response) -> float | Judgement``), ``RewardModelJudge`` (a trained BT / regression
reward model or a GPM preference model), ``LLMJudge`` (a local HF chat model asked "A or B?", both
orders). ``judge_file`` labels a JSONL of responses and writes the comparisons ``preftune rank`` reads.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

Prompt = Any  # text, or chat messages [{"role", "content"}]


@dataclass
class Verdict:
    """One pairwise judgement: P(a ≻ b), the pointwise scores when the judge has them, and details."""

    prob_a: float
    score_a: float | None = None
    score_b: float | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def winner(self, tie_margin: float = 0.0) -> str:
        """ "a" if P(a ≻ b) > ½ + tie_margin, "b" if < ½ − tie_margin, else "tie"."""
        if self.prob_a > 0.5 + tie_margin:
            return "a"
        if self.prob_a < 0.5 - tie_margin:
            return "b"
        return "tie"


class Judge:
    """Base class. Subclasses implement ``score`` (pointwise) or ``compare_many`` (pairwise), or both."""

    name: str = "judge"
    pointwise: bool = False  # True: ``score`` works and preferences come from scores

    def score(self, prompt: Prompt, responses: list[str]) -> list[float]:
        raise NotImplementedError(f"{self.name} has no pointwise scores; use prefer()/compare_many()")

    def link(self, score_a: float, score_b: float) -> float:
        """P(a ≻ b) from two scores (pointwise judges). Default: hard (1, ½ on a tie, 0)."""
        return 1.0 if score_a > score_b else 0.0 if score_a < score_b else 0.5

    def compare_many(self, prompts: list[Prompt], a: list[str], b: list[str]) -> list[Verdict]:
        if not self.pointwise:
            raise NotImplementedError
        out = []
        for p, x, y in zip(prompts, a, b, strict=True):
            sa, sb = self.score(p, [x, y])
            out.append(Verdict(self.link(sa, sb), sa, sb))
        return out

    def compare(self, prompt: Prompt, a: str, b: str) -> Verdict:
        return self.compare_many([prompt], [a], [b])[0]

    def prefer(self, prompt: Prompt, a: str, b: str) -> float:
        """P(a ≻ b | prompt)."""
        return self.compare(prompt, a, b).prob_a


# ------------------------------------------------------------------------------------ programmatic


class FunctionJudge(Judge):
    """Any ``fn(prompt, response) -> float`` or ``-> Judgement`` (``.score``); higher is better.

    ``temperature`` None: hard preferences from the scores (ties → ½); a number T: σ((s_a − s_b)/T).
    """

    pointwise = True

    def __init__(self, fn: Callable[..., Any], name: str = "function", temperature: float | None = None):
        self.fn, self.name, self.temperature = fn, name, temperature

    def judge_one(self, prompt: Prompt, response: str) -> tuple[float, dict]:
        out = self.fn(prompt, response)
        if hasattr(out, "score"):
            return float(out.score), {"success": getattr(out, "success", None), **getattr(out, "details", {})}
        return float(out), {}

    def score(self, prompt: Prompt, responses: list[str]) -> list[float]:
        return [self.judge_one(prompt, r)[0] for r in responses]

    def link(self, score_a: float, score_b: float) -> float:
        if self.temperature is None:
            return super().link(score_a, score_b)
        return 1.0 / (1.0 + math.exp(-(score_a - score_b) / self.temperature))

    def compare_many(self, prompts, a, b) -> list[Verdict]:
        out = []
        for p, x, y in zip(prompts, a, b, strict=True):
            (sa, da), (sb, db) = self.judge_one(p, x), self.judge_one(p, y)
            out.append(Verdict(self.link(sa, sb), sa, sb, {"a": da, "b": db}))
        return out


class TaskJudge(FunctionJudge):
    """A built-in task's programmatic judge (``preftune.tasks``): ``Task.judge(prompt, response)``."""

    def __init__(self, task: Any, temperature: float | None = None):
        if isinstance(task, str):
            from preftune.tasks import get_task

            task = get_task(task)
        super().__init__(task.judge, name=f"task:{task.name}", temperature=temperature)
        self.task = task


# ------------------------------------------------------------------------------------ trained models


class RewardModelJudge(Judge):
    """A trained reward model (BT / regression: scores and σ(r_a − r_b)) or GPM model (σ(s/τ) only).

    ``user_id``: a PAL model's user (reward/pal.py; None: the users' mean mixture). ``context``: the context a
    CARM model judges under (reward/carm.py)."""

    def __init__(self, model: Any, name: str | None = None, batch_size: int = 8, user_id: Any = None,
                 context: str | None = None):
        if isinstance(model, (str, Path)):
            from preftune.reward.model import load_preference_model

            name = name or f"rm:{model}"
            model = load_preference_model(model, user_id=user_id)
        elif user_id is not None:
            model.user_id = user_id
        if context is not None:
            if not hasattr(model, "context"):
                raise ValueError(f"context={context!r}: {name or 'this model'} is not a context-aware reward model")
            model.context = context
        self.rm, self.batch_size = model, batch_size
        self.name = name or f"rm:{model.kind}"
        self.pointwise = model.kind != "gpm"

    def score(self, prompt, responses):
        if not self.pointwise:
            return super().score(prompt, responses)
        return self.rm.score(prompt, list(responses), self.batch_size).tolist()

    def compare_many(self, prompts, a, b) -> list[Verdict]:
        if not prompts:
            return []
        if not self.pointwise:
            p = self.rm.prefer_batch(list(prompts), list(a), list(b), self.batch_size).tolist()
            return [Verdict(x) for x in p]
        n = len(a)
        r = self.rm.score(list(prompts) * 2, list(a) + list(b), self.batch_size).tolist()
        return [Verdict(1.0 / (1.0 + math.exp(-(r[i] - r[n + i]))), r[i], r[n + i]) for i in range(n)]


# ------------------------------------------------------------------------------------ LLM as judge

JUDGE_TEMPLATE = (
    "You are comparing two responses to the same request. Pick the better one: the response that "
    "follows the instructions, is correct and is helpful. Ignore the order in which they are shown.\n\n"
    "[Request]\n{prompt}\n\n[Response A]\n{a}\n\n[Response B]\n{b}\n\n"
    "Which response is better? Answer with one letter: A or B."
)


def _prompt_as_text(prompt: Prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1:
        return str(prompt[0].get("content", ""))
    return "\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in prompt)


class LLMJudge(Judge):
    """A local HF chat model as pairwise judge, position bias cancelled by asking in both orders.

    With p₁ = P("A" | a shown as A, b as B) and p₂ = P("B" | b shown as A, a as B), each the
    next-token probability renormalised over the two labels, P(a ≻ b) = ½(p₁ + p₂). Swapping a and b
    gives exactly 1 − P. Details keep p₁, p₂ and whether the two orders agree (``consistent``).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        template: str = JUDGE_TEMPLATE,
        labels: tuple[str, str] = ("A", "B"),
        name: str | None = None,
        batch_size: int = 8,
        use_chat_template: bool | None = None,
        device: str | None = None,
    ):
        import torch

        if isinstance(model, (str, Path)):
            from preftune.model import load_model

            name = name or f"llm:{model}"
            model, tokenizer = load_model(model)
        if tokenizer is None:
            raise ValueError("LLMJudge needs the model's tokenizer")
        self.model, self.tokenizer = model, tokenizer
        self.template, self.labels, self.batch_size = template, labels, batch_size
        self.name = name or "llm"
        self.use_chat = (
            bool(getattr(tokenizer, "chat_template", None))
            if use_chat_template is None
            else use_chat_template
        )
        self.device = torch.device(device) if device else next(model.parameters()).device
        self.model.to(self.device).eval()

    def render(self, prompt: Prompt, a: str, b: str) -> str:
        text = self.template.format(prompt=_prompt_as_text(prompt), a=a, b=b)
        if self.use_chat:
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
        return text + "\nAnswer:"

    def _encode(self, text: str) -> tuple[list[int], tuple[int, int]]:
        """Context ids and the ids of the first token of each label after it (BPE-safe)."""
        special = not self.use_chat  # a rendered chat template carries its own special tokens
        ctx = self.tokenizer(text, add_special_tokens=special)["input_ids"]
        sep = "" if self.use_chat else " "
        fulls, n = [], len(ctx)
        for label in self.labels:
            full = self.tokenizer(text + sep + label, add_special_tokens=special)["input_ids"]
            k = 0
            while k < min(len(ctx), len(full)) and ctx[k] == full[k]:
                k += 1
            fulls.append(full)
            n = min(n, k)  # a label that merges with the last context token moves the cut back
        if any(n >= len(full) for full in fulls):
            raise ValueError(f"labels {self.labels} add no token after the judging prompt")
        label_ids = (fulls[0][n], fulls[1][n])
        if label_ids[0] == label_ids[1]:
            raise ValueError(f"labels {self.labels} start with the same token; choose distinguishable labels")
        return ctx[:n], label_ids

    def label_probs(self, texts: list[str]) -> list[float]:
        """P(first label) renormalised over the two labels, for each rendered judging prompt."""
        import torch

        out = []
        pad = (
            self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else self.tokenizer.eos_token_id
        )
        for s in range(0, len(texts), self.batch_size):
            enc = [self._encode(t) for t in texts[s : s + self.batch_size]]
            # Left padding with explicit positions: each row's next-token logits are those of the
            # unpadded sequence, and only the last position goes through the LM head.
            width = max(len(e[0]) for e in enc)
            ids = torch.tensor([[pad] * (width - len(e[0])) + e[0] for e in enc], device=self.device)
            mask = torch.tensor(
                [[0] * (width - len(e[0])) + [1] * len(e[0]) for e in enc], device=self.device
            )
            pos = (mask.cumsum(1) - 1).clamp(min=0)
            with torch.no_grad():
                rows = (
                    self.model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1)
                    .logits[:, -1]
                    .float()
                )  # (N, V)
            pair = torch.stack([rows[i, list(e[1])] for i, e in enumerate(enc)])  # (N, 2)
            out += torch.softmax(pair, dim=-1)[:, 0].tolist()
        return out

    def compare_many(self, prompts, a, b) -> list[Verdict]:
        n = len(a)
        texts = [self.render(p, x, y) for p, x, y in zip(prompts, a, b, strict=True)]
        texts += [self.render(p, y, x) for p, x, y in zip(prompts, a, b, strict=True)]
        probs = self.label_probs(texts)
        out = []
        for i in range(n):
            p1, p2 = probs[i], 1.0 - probs[n + i]  # p2: P("B") when a is shown second
            out.append(
                Verdict(
                    0.5 * (p1 + p2), details={"p_ab": p1, "p_ba": p2, "consistent": (p1 > 0.5) == (p2 > 0.5)}
                )
            )
        return out


# ------------------------------------------------------------------------------------ construction


def _rm_options(arg: str) -> tuple[str, dict[str, str]]:
    """``PATH?user_id=ID&context=TEXT`` → (PATH, options): a PAL user, a CARM context."""
    from urllib.parse import parse_qsl

    path, sep, query = arg.rpartition("?")
    if not sep:
        return arg, {}
    opts = dict(parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(opts) - {"user_id", "context"})
    if unknown:
        raise ValueError(f"judge spec rm:{arg!r}: unknown option(s) {', '.join(unknown)} (user_id, context)")
    return path, opts


def make_judge(spec: str, **kwargs: Any) -> Judge:
    """``task:NAME`` (built-in task), ``rm:PATH`` (reward / GPM model folder; ``rm:PATH?user_id=ID`` a PAL
    model's user, ``rm:PATH?context=TEXT`` a CARM model's context), ``llm:MODEL`` (chat model),
    ``lsc(JUDGE, JUDGE, ..., option=value)`` (pointwise judges combined by LSC, preftune.reward.lsc)."""
    if spec.strip().startswith("lsc("):
        from preftune.reward.lsc import make_lsc_judge

        return make_lsc_judge(spec, **kwargs)
    kind, _, arg = spec.partition(":")
    if not arg:
        raise ValueError(f"judge spec {spec!r}: expected task:NAME, rm:PATH, llm:MODEL or lsc(...)")
    if kind == "task":
        return TaskJudge(arg, **kwargs)
    if kind == "rm":
        path, opts = _rm_options(arg)
        return RewardModelJudge(path, name=spec, **{**opts, **kwargs})
    if kind == "llm":
        return LLMJudge(arg, name=spec, **kwargs)
    raise ValueError(f"judge spec {spec!r}: unknown kind {kind!r} (task, rm or llm)")


# ------------------------------------------------------------------------------------ files


@dataclass
class _Item:
    prompt: Prompt
    systems: list[str]
    responses: list[str]
    line: int


def read_responses(path: str | Path) -> list[_Item]:
    """Rows ``{"prompt", "responses": {system: text}}`` or ``{"prompt", "a", "b", "model_a", "model_b"}``;
    every bad row is reported (file, line, field) in one DataError."""
    from preftune.data import DataError, DataIssue, jsonl_rows

    src, items, issues = str(path), [], []
    for row, line in jsonl_rows(Path(path), issues):
        bad = []
        prompt = row.get("prompt")
        if not (isinstance(prompt, str) and prompt.strip()) and not isinstance(prompt, list):
            bad.append(("prompt", "missing" if prompt is None else "expected text or chat messages"))
        if isinstance(row.get("responses"), dict):
            systems, responses = list(row["responses"]), list(row["responses"].values())
            where = [f"responses.{s}" for s in systems]
            if len(systems) < 2:
                bad.append(("responses", f"needs at least 2 systems, got {len(systems)}"))
        elif "a" in row or "b" in row:
            systems, responses = [row.get("model_a"), row.get("model_b")], [row.get("a"), row.get("b")]
            where = ["a", "b"]
            for key, s in (("model_a", systems[0]), ("model_b", systems[1])):
                if not (isinstance(s, str) and s):
                    bad.append((key, "missing" if s is None else f"expected a system name, got {s!r}"))
            if systems[0] == systems[1] and systems[0]:
                bad.append(("model_b", f"same system as model_a ({systems[0]!r})"))
        else:
            bad.append(("responses", "missing: give responses {system: text} or a/b/model_a/model_b"))
            systems, responses, where = [], [], []
        for w, r in zip(where, responses, strict=True):
            if not isinstance(r, str):
                bad.append((w, "missing" if r is None else f"expected text, got {type(r).__name__}"))
        issues += [DataIssue(src, line, k, m) for k, m in bad]
        if not bad:
            items.append(_Item(prompt, systems, responses, line))
    if issues:
        raise DataError(issues)
    if not items:
        raise DataError([DataIssue(src, 0, "<file>", "no records (the file is empty)")])
    return items


def pairwise_comparisons(judge: Judge, items: list[_Item], tie_margin: float = 0.0) -> list[dict]:
    """Every pair of systems of every item, judged; rows in ``preftune rank``'s comparison format.

    Pointwise judges score each response once; pairwise judges see each pair (LLMJudge: in both orders).
    """
    rows: list[dict] = []
    pairs = [(it, i, j) for it in items for i, j in combinations(range(len(it.systems)), 2)]
    if judge.pointwise:
        verdicts = []
        for it in items:
            s = judge.score(it.prompt, it.responses)
            verdicts += [
                Verdict(judge.link(s[i], s[j]), s[i], s[j])
                for i, j in combinations(range(len(it.systems)), 2)
            ]
    else:
        verdicts = judge.compare_many(
            [it.prompt for it, _, _ in pairs],
            [it.responses[i] for it, i, _ in pairs],
            [it.responses[j] for it, _, j in pairs],
        )
    for (it, i, j), v in zip(pairs, verdicts, strict=True):
        row = {
            "a": it.systems[i],
            "b": it.systems[j],
            "winner": v.winner(tie_margin),
            "prompt": it.prompt,
            "judge": judge.name,
            "p_a": round(v.prob_a, 6),
            "line": it.line,
        }
        if v.score_a is not None:
            row |= {"score_a": v.score_a, "score_b": v.score_b}
        rows.append(row)
    return rows


def judge_file(
    input_path: str | Path, output_path: str | Path, judge: Judge, tie_margin: float = 0.0
) -> list[dict]:
    """Label a JSONL of responses with ``judge``; write one comparison per line (atomic) and return them."""
    rows = pairwise_comparisons(judge, read_responses(input_path), tie_margin)
    out = Path(output_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(out)
    return rows


# ------------------------------------------------------------------------------------ Self-Rewarding rubric

RUBRIC_TEMPLATE = (
    "Review the user's question and the corresponding response using the additive 5-point scoring system "
    "described below. Points are accumulated based on the satisfaction of each criterion:\n"
    "- Add 1 point if the response is relevant and provides some information related to the user's inquiry, "
    "even if it is incomplete or contains some irrelevant content.\n"
    "- Add another point if the response addresses a substantial portion of the user's question, but does not "
    "completely resolve the query or provide a direct answer.\n"
    "- Award a third point if the response answers the basic elements of the user's question in a useful way.\n"
    "- Grant a fourth point if the response is clearly written from an AI Assistant's perspective, addressing "
    "the user's question directly and comprehensively, and is well-organized and helpful.\n"
    "- Bestow a fifth point for a response that is impeccably tailored to the user's question, without "
    "extraneous information, reflecting expert knowledge.\n\n"
    "User: {prompt}\n<response>{response}</response>\n\n"
    "After examining the user's instruction and the response, conclude with the score in the format "
    "\"Score: <total points>\"."
)


class RubricJudge(Judge):
    """Self-Rewarding's additive 0–5 rubric (Yuan et al. 2024, arXiv 2401.10020, Fig. 2), read off the
    judging model's next-token distribution over the digits 0–5 after "Score: ".

    The paper samples a justification and a score three times and averages the parsed scores; the expected
    points under the model's score distribution are that average's deterministic limit, and never fail to
    parse. ``model`` may be the policy being trained (Self-Rewarding) or any local chat model.
    """

    pointwise = True

    def __init__(self, model: Any, tokenizer: Any, *, template: str = RUBRIC_TEMPLATE, name: str = "rubric",
                 batch_size: int = 8):
        self.model, self.tokenizer, self.template, self.name, self.batch_size = (
            model, tokenizer, template, name, batch_size)
        # "Score: d" for d = 0..5 after the shared "Score:" tokens: BPE may keep the space apart from the digit
        # (two tokens) or merge them (one), even within one vocabulary. A digit's probability is then
        # P(first | context) · P(second | context, first); every two-token form must share its first token.
        prefix = tokenizer("Score:", add_special_tokens=False)["input_ids"]
        conts = []
        for d in range(6):
            full = tokenizer(f"Score: {d}", add_special_tokens=False)["input_ids"]
            if full[: len(prefix)] != prefix or not 1 <= len(full) - len(prefix) <= 2:
                raise ValueError(f"RubricJudge cannot read 'Score: {d}' with this tokenizer")
            conts.append(full[len(prefix):])
        heads = {c[0] for c in conts if len(c) == 2}
        if len(heads) > 1 or len({tuple(c) for c in conts}) != 6:
            raise ValueError("RubricJudge: the scores 0–5 after 'Score:' are not distinguishable tokens")
        self.prefix, self.conts, self.head = prefix, conts, next(iter(heads), None)

    def _context(self, prompt: Prompt, response: str) -> list[int]:
        text = self.template.format(prompt=_prompt_as_text(prompt), response=response)
        if getattr(self.tokenizer, "chat_template", None):
            rendered = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                          add_generation_prompt=True)
            ids = self.tokenizer(rendered, add_special_tokens=False)["input_ids"]
        else:
            ids = self.tokenizer(text + "\n")["input_ids"]
        return list(ids) + list(self.prefix) + ([self.head] if self.head is not None else [])

    def score(self, prompt: Prompt, responses: list[str]) -> list[float]:
        import torch

        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        out: list[float] = []
        was_training = self.model.training
        self.model.eval()
        try:
            for s in range(0, len(responses), self.batch_size):
                ctx = [self._context(prompt, r) for r in responses[s : s + self.batch_size]]
                width = max(len(c) for c in ctx)
                ids = torch.tensor([[pad] * (width - len(c)) + c for c in ctx], device=device)
                mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in ctx], device=device)
                pos = (mask.cumsum(1) - 1).clamp(min=0)
                keep = 2 if self.head is not None else 1
                with torch.no_grad():
                    logp = torch.log_softmax(self.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                                                        logits_to_keep=keep).logits.float(), dim=-1)  # (N, keep, V)
                first = logp[:, 0]  # after "Score:"; with a head token, logp[:, 1] is after "Score:" + head
                scores = torch.stack([first[:, c[0]] if len(c) == 1 else first[:, c[0]] + logp[:, 1, c[1]]
                                      for c in self.conts], dim=-1)  # (N, 6) log P("Score: d" | context)
                p = torch.softmax(scores, dim=-1)  # renormalised over the six scores
                out += (p @ torch.arange(6, dtype=p.dtype, device=p.device)).tolist()
        finally:
            self.model.train(was_training)
        return out
