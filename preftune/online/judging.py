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
                 tokenizer=None, reference_prompts=None, sampling: dict | None = None, reference_file=None):
        """``reference_prompts``, ``sampling`` (generate's max_new_tokens, seed, batch_size, engine) and
        ``reference_file``: an ``lsc(..., ref=pi0)`` judge's reference rewards, from π_0 samples of every
        training prompt drawn here, at construction, while ``policy`` is still π_0."""
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
        if getattr(self.judge, "ref", None) == "pi0":  # LSC: r^ref(x) from π_0, once, before training
            lsc_pi0_reference(self.judge, policy, tokenizer, list(reference_prompts or []), sampling or {},
                              reference_file)

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
        elif hasattr(self.judge, "score_details"):  # LSC: task components see whether a sample ended
            scores, details = self.judge.score_details(prompt, texts, finished)
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


def lsc_pi0_reference(judge, model, tokenizer, prompts: list, sampling: dict, path=None) -> None:
    """An LSC judge's r_k^ref(x) for every prompt: the q-quantile of each reward over ``judge.m`` samples of
    ``model`` (π_0), seeded ``sampling['seed'] + 777`` (no training iteration uses that seed). Rows
    {prompt, reference, samples} in ``path``; a resumed run reads them back and samples only new prompts, so
    its references are those of the uninterrupted run."""
    import copy
    from pathlib import Path

    from preftune.online import store
    from preftune.online.generate import generate
    from preftune.reward.lsc import prompt_key

    path = Path(path) if path is not None else None
    rows = {prompt_key(r["prompt"]): r for r in store.read_jsonl(path)} if path and path.exists() else {}
    todo = list({prompt_key(p): p for p in prompts if prompt_key(p) not in rows}.values())
    if todo:
        if model is None:
            raise ValueError("lsc ref=pi0 needs the initial policy to sample from")
        from preftune.model import is_peft_model

        sampler = copy.deepcopy(model).merge_and_unload() if is_peft_model(model) else model  # LoRA: B = 0, π_0
        gens = generate(sampler, tokenizer, todo, n=judge.m, temperature=judge.temperature, top_p=judge.top_p,
                        max_new_tokens=sampling.get("max_new_tokens", 64), seed=sampling.get("seed", 0) + 777,
                        batch_size=sampling.get("batch_size", 16), engine=sampling.get("engine", "auto"))
        for prompt, samples in zip(gens.prompts, gens.samples, strict=True):
            refs = judge.set_reference_from_samples(prompt, [s.text for s in samples], [s.finished for s in samples])
            rows[prompt_key(prompt)] = {"prompt": prompt, "reference": refs,
                                        "samples": [{"text": s.text, "finished": s.finished} for s in samples]}
        if path is not None:
            store.write_jsonl(path, list(rows.values()))
    for key, row in rows.items():
        judge.references[key] = row["reference"]
