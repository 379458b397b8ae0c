"""Judging K samples per prompt: scalar scores, and the pairwise matrix P the self-play methods need.

The judge sees text only (a reward model with its own tokenizer works); training keeps the sampled
token ids. Spec strings are those of ``preftune judge`` plus ``self`` (Self-Rewarding):

- ``task:NAME``: the task's programmatic judge, told whether the sample ended (a cut answer fails);
- ``rm:PATH``: a reward model (scalar) or a GPM (pairwise only);
- ``llm:MODEL``: a chat model asked "A or B" in both orders (pairwise only);
- ``self``: the current policy scores each answer with the Self-Rewarding rubric.

Scalar judges give P_ij = σ((s_i − s_j)/T); pairwise judges give P directly (both orders averaged
for LLMs) and a score per sample = its win rate against the others (diagonal included).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from preftune.online.build import preference_matrix, win_rates


@dataclass
class Judged:
    """One prompt's judgement of its K samples."""

    scores: list[float]
    P: list[list[float]] | None = None
    details: list[dict[str, Any]] = field(default_factory=list)
    fluency: list[float] | None = None  # mean token log-prob under π_0 (tie_break=fluency)


class SampleJudge:
    def __init__(self, spec: str, task, *, temperature: float, eos_penalty: float = 0.0, policy=None,
                 tokenizer=None):
        self.spec, self.task, self.temperature, self.eos_penalty = spec, task, temperature, eos_penalty
        self.calls = 0
        self.judge = None
        if spec == "self":
            from preftune.reward.judges import RubricJudge

            if policy is None:
                raise ValueError("judge=self needs the policy model")
            self.judge = RubricJudge(policy, tokenizer)
        elif not spec.startswith("task:"):
            from preftune.reward.judges import make_judge

            self.judge = make_judge(spec)
        else:
            from preftune.tasks import get_task

            self.task_judge = get_task(spec.split(":", 1)[1])

    @property
    def pointwise(self) -> bool:
        return self.judge is None or self.judge.pointwise

    def judge_prompt(self, prompt, texts: list[str], finished: list[bool], need_matrix: bool) -> Judged:
        details: list[dict[str, Any]] = [{} for _ in texts]
        P = None
        if self.judge is None:
            js = [self.task_judge.judge(prompt, t, f) for t, f in zip(texts, finished, strict=True)]
            scores = [j.score for j in js]
            details = [{"success": j.success, **j.details} for j in js]
            self.calls += len(texts)
        elif self.judge.pointwise:
            scores = [float(s) for s in self.judge.score(prompt, texts)]
            self.calls += len(texts)
        else:
            k = len(texts)
            idx = [(i, j) for i in range(k) for j in range(i + 1, k)]
            verdicts = self.judge.compare_many([prompt] * len(idx), [texts[i] for i, _ in idx],
                                               [texts[j] for _, j in idx])
            self.calls += len(idx)
            P = [[0.5] * k for _ in range(k)]
            for (i, j), v in zip(idx, verdicts, strict=True):
                P[i][j], P[j][i] = v.prob_a, 1.0 - v.prob_a
            scores = win_rates(P)
        if self.eos_penalty:
            scores = [s - (0.0 if f else self.eos_penalty) for s, f in zip(scores, finished, strict=True)]
        if P is None and need_matrix:
            P = preference_matrix(scores, self.temperature)
        return Judged(scores, P, details)
