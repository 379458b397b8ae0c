"""How a policy behaves on a task: success rate (95% interval), response length, KL to the reference.

KL estimate: KL(π_θ ‖ π_ref) ≈ mean over samples y ~ π_θ(·|x) of log π_θ(y|x) − log π_ref(y|x)
(the standard Monte-Carlo estimator, unbiased for the sequence-level KL; one sample can be
negative). Log-probs come from the log-prob engine (``preftune.model.engine``) on the exact token
ids that were sampled, EOS included; with a LoRA model the reference is the same model with the
adapter disabled. The standard error is the sample standard deviation over √n.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from preftune.model.scoring import adapters_disabled
from preftune.tasks import word_count  # re-exported: the demo and tests read it from here


@dataclass(frozen=True)
class Rate:
    value: float
    low: float  # Wilson 95% interval
    high: float
    n: int

    def __str__(self) -> str:
        return f"{100 * self.value:.1f}% [{100 * self.low:.1f}, {100 * self.high:.1f}] (n={self.n})"


@dataclass(frozen=True)
class Mean:
    value: float
    se: float
    n: int

    def __str__(self) -> str:
        return f"{self.value:.3g} ± {self.se:.2g}"


def wilson(successes: int, n: int, z: float = 1.959964) -> Rate:
    """Proportion with its Wilson score interval (well-behaved at 0 and 1, unlike the normal one)."""
    if n == 0:
        return Rate(float("nan"), float("nan"), float("nan"), 0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return Rate(p, low, high, n)


def mean_se(values: list[float]) -> Mean:
    n = len(values)
    if n == 0:
        return Mean(float("nan"), float("nan"), 0)
    m = sum(values) / n
    if n == 1:
        return Mean(m, float("nan"), 1)
    var = sum((v - m) ** 2 for v in values) / (n - 1)
    return Mean(m, math.sqrt(var / n), n)


@dataclass
class PolicyEval:
    """Judged samples of one policy on a prompt set (flattened over prompts × samples)."""

    success: Rate
    score: Mean
    words: Mean
    tokens: Mean
    finished: Rate
    kl: Mean | None = None

    def as_dict(self) -> dict:
        return {k: (asdict(v) if v is not None else None) for k, v in self.__dict__.items()}


def judge_generations(task, generations) -> list[list]:
    """``task.judge`` on every sample: ``judgements[i][k]``."""
    return [
        [task.judge(p, s.text, s.finished) for s in row]
        for p, row in zip(generations.prompts, generations.samples, strict=True)
    ]


def evaluate_generations(task, generations, judgements=None) -> PolicyEval:
    judgements = judgements if judgements is not None else judge_generations(task, generations)
    flat = [
        (s, j)
        for row, jrow in zip(generations.samples, judgements, strict=True)
        for s, j in zip(row, jrow, strict=True)
    ]
    return PolicyEval(
        success=wilson(sum(j.success for _, j in flat), len(flat)),
        score=mean_se([j.score for _, j in flat]),
        words=mean_se([float(word_count(s.text)) for s, _ in flat]),
        tokens=mean_se([float(s.num_tokens) for s, _ in flat]),
        finished=wilson(sum(s.finished for s, _ in flat), len(flat)),
    )


# The base model of a LoRA policy: one definition, in the model layer (the online loop scores with it too).
adapter_disabled = adapters_disabled


def sequence_log_ratios(
    model,
    prompt_ids: list[list[int]],
    response_ids: list[list[list[int]]],
    pad_id: int,
    *,
    ref_model=None,
    batch_size: int = 8,
    chunk_size: int = 1024,
) -> list[float]:
    """log π_θ(y|x) − log π_ref(y|x) for every (prompt i, response k), flattened in that order.

    ``model`` is the policy; without ``ref_model`` it must carry LoRA adapters (a ``PeftModel``, or a
    model whose layers PEFT adapted in place), and its reference is itself with the adapters off.
    Empty responses are skipped.
    """
    from preftune.model.scoring import response_token_logps

    kw = dict(batch_size=batch_size, chunk_size=chunk_size)
    policy = response_token_logps(model, prompt_ids, response_ids, pad_id, **kw)
    if ref_model is not None:
        ref = response_token_logps(ref_model, prompt_ids, response_ids, pad_id, **kw)
    else:
        ref = response_token_logps(model, prompt_ids, response_ids, pad_id, adapters_off=True, **kw)
    out = [float((p - r).sum()) for ps, rs in zip(policy, ref, strict=True)
           for p, r in zip(ps, rs, strict=True) if len(p)]
    return out


def kl_estimate(model, generations, pad_id: int, *, ref_model=None, batch_size: int = 8) -> Mean:
    """Monte-Carlo KL(π_θ ‖ π_ref) over ``generations`` sampled from ``model`` (mean ± standard error)."""
    responses = [[s.token_ids for s in row] for row in generations.samples]
    return mean_se(
        sequence_log_ratios(
            model, generations.prompt_ids, responses, pad_id, ref_model=ref_model, batch_size=batch_size
        )
    )
