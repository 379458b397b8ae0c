"""LSC: the log-sigmoid-centred reward transform and the combination of several rewards by its sum.

Wang, Nagpal, Berant, Eisenstein, D'Amour, Koyejo, Veitch, "Transforming and Combining Rewards for
Aligning Large Language Models" (ICML 2024, arXiv 2402.00742); METHODS.md §M9, LOSSES.md G5.

A Bradley–Terry reward r_k(x, y) centred on a prompt's reference reward r_k^ref(x) is a logit of
P(y is good on property k | x); its log is the utility

    u_k(x, y) = log σ(r_k(x, y) − r_k^ref(x)) ≤ 0,      u(x, y) = Σ_k u_k(x, y)

(diminishing returns on one property; the sum is log P(good on every property), a logical AND that
punishes a response strong on one property and bad on another). A judge that outputs a probability p of
"good" (a task's score in [0, 1], a pass rate) enters as u_k = log max(p, floor), not re-centred.

r_k^ref(x) (``ref``): ``pi0`` — the q-quantile (linear interpolation) of r_k over m samples of the initial
policy π_0 for the prompt, computed once before training and never re-estimated from the current policy
(the paper's recipe; it reads as a high quantile of base-policy rewards, q = 0.85 here, m = 16, temperature
1 — [UNVERIFIED] in METHODS.md: the paper's exact q and m could not be read from a primary source);
``candidates`` — the q-quantile over the responses being judged for that prompt (``preftune judge`` on a
file of systems' answers, or best-of-K where the K samples are π_0's); constants — one value per reward
component (an ablation).

Judge specs (``make_judge``, ``preftune judge --judge``, ``preftune online --judge``)::

    lsc(rm:runs/helpful/model, rm:runs/harmless/model)            # two reward models, ref=pi0
    lsc(rm:runs/rm/model, task:word_limit, ref=candidates, q=0.9)  # a reward model AND a task's success
    lsc(rm:a, rm:b, ref=0.8/0)                                     # constant references

Components are any pointwise judge spec (``task:NAME``, ``rm:PATH``); options: ``ref`` (pi0 | candidates |
v1/v2/...), ``q`` (0.85), ``m`` (16), ``floor`` (1e-3), ``temperature`` (1.0) and ``top_p`` (1.0) of the π_0
samples. The judge's pointwise score is u; P(a ≻ b) = σ(u_a − u_b).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from preftune.reward.judges import Judge, TaskJudge

OPTIONS = ("ref", "q", "m", "floor", "temperature", "top_p")


# ------------------------------------------------------------------------------------ pure functions


def log_sigmoid(z: float) -> float:
    """log σ(z), stable at both ends: −log1p(e^{−z}) for z ≥ 0, z − log1p(e^{z}) otherwise."""
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def lsc_transform(reward: float, reference: float) -> float:
    """u = log σ(r − r^ref): log P(the response beats the prompt's reference) ≤ 0."""
    return log_sigmoid(reward - reference)


def log_probability(p: float, floor: float = 1e-3) -> float:
    """A judge's probability of "good" as a utility: log max(p, floor) (a floor: a failed check scores log
    floor instead of −∞, so one failure does not swamp every other property)."""
    return math.log(max(float(p), floor))


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile with linear interpolation between order statistics (numpy's default "linear" method):
    position q·(n − 1) in the sorted values."""
    if not values:
        raise ValueError("quantile of no values")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q={q} must be in [0, 1]")
    s = sorted(float(v) for v in values)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (pos - lo) * (s[hi] - s[lo])


def lsc_combine(rewards: Sequence[Sequence[float]], references: Sequence[float | None], floor: float = 1e-3
                ) -> list[float]:
    """u_i = Σ_k u_k(y_i) for K responses: ``rewards[i][k]`` the k-th component's value for response i;
    ``references[k]`` its r_k^ref, or None for a probability component (then u_k = log max(p, floor))."""
    out = []
    for row in rewards:
        if len(row) != len(references):
            raise ValueError(f"{len(row)} component values for {len(references)} references")
        out.append(sum(log_probability(v, floor) if ref is None else lsc_transform(v, ref)
                       for v, ref in zip(row, references, strict=True)))
    return out


# ------------------------------------------------------------------------------------ the judge


def prompt_key(prompt: Any) -> str:
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


@dataclass
class LSCJudge(Judge):
    """Several pointwise judges combined by the sum of LSC-transformed rewards (module docstring).

    ``components`` are pointwise judges; a ``TaskJudge`` is a probability component (its score in [0, 1]),
    any other a Bradley–Terry reward. ``ref``: ``"pi0"`` (``references`` filled by
    :meth:`set_reference_from_samples` before training), ``"candidates"``, or a list of constants (one per
    reward component)."""

    components: list[Judge]
    ref: str | list[float] = "pi0"
    q: float = 0.85
    m: int = 16
    floor: float = 1e-3
    temperature: float = 1.0
    top_p: float = 1.0
    name: str = "lsc"
    references: dict[str, list[float | None]] = field(default_factory=dict)
    pointwise = True

    def __post_init__(self) -> None:
        for c in self.components:
            if not c.pointwise:
                raise ValueError(f"lsc: {c.name} gives no pointwise scores (a GPM or LLM judge); LSC sums "
                                 "transformed per-response rewards")
        self.probability = [isinstance(c, TaskJudge) for c in self.components]
        n_reward = self.probability.count(False)
        if isinstance(self.ref, list) and len(self.ref) != n_reward:
            raise ValueError(f"lsc: ref has {len(self.ref)} constant(s) for {n_reward} reward component(s)")
        if not isinstance(self.ref, list) and self.ref not in ("pi0", "candidates"):
            raise ValueError(f"lsc: ref={self.ref!r} must be pi0, candidates or constants v1/v2/...")
        if not 0 <= self.q <= 1 or self.m < 1 or not 0 < self.floor < 1:
            raise ValueError(f"lsc: q={self.q} must be in [0, 1], m={self.m} ≥ 1, floor={self.floor} in (0, 1)")

    # -- raw component values
    def component_values(self, prompt, responses: list[str], finished: list[bool] | None = None
                         ) -> list[list[float]]:
        """``out[i][k]``: component k's raw value for response i (a task judge sees whether it ended)."""
        cols = []
        for c in self.components:
            if isinstance(c, TaskJudge) and finished is not None:
                cols.append([float(c.task.judge(prompt, r, f).score) for r, f in zip(responses, finished, strict=True)])
            else:
                cols.append([float(s) for s in c.score(prompt, list(responses))])
        return [list(row) for row in zip(*cols, strict=True)]

    def references_from(self, values: list[list[float]]) -> list[float | None]:
        """r_k^ref as the q-quantile of each reward component over ``values`` (None for probabilities)."""
        return [None if prob else quantile([row[k] for row in values], self.q)
                for k, prob in enumerate(self.probability)]

    def set_reference_from_samples(self, prompt, samples: list[str], finished: list[bool] | None = None
                                   ) -> list[float | None]:
        """ref=pi0: r^ref(x) from the π_0 samples of this prompt, stored for every later :meth:`score`."""
        refs = self.references_from(self.component_values(prompt, samples, finished))
        self.references[prompt_key(prompt)] = refs
        return refs

    def reference_for(self, prompt, values: list[list[float]]) -> list[float | None]:
        if self.ref == "candidates":
            return self.references_from(values)
        if isinstance(self.ref, list):
            it = iter(self.ref)
            return [None if prob else float(next(it)) for prob in self.probability]
        refs = self.references.get(prompt_key(prompt))
        if refs is None:
            raise ValueError("lsc ref=pi0: no π_0 reference reward for this prompt (only `preftune online` samples "
                             "π_0 before training); use ref=candidates or constants elsewhere")
        return refs

    # -- the judge interface
    def score_details(self, prompt, responses: list[str], finished: list[bool] | None = None
                      ) -> tuple[list[float], list[dict]]:
        values = self.component_values(prompt, responses, finished)
        refs = self.reference_for(prompt, values)
        u = lsc_combine(values, refs, self.floor)
        names = [c.name for c in self.components]
        details = [{"lsc": {"values": dict(zip(names, row, strict=True)),
                            "reference": dict(zip(names, refs, strict=True))}} for row in values]
        return u, details

    def score(self, prompt, responses: list[str]) -> list[float]:
        return self.score_details(prompt, responses)[0]

    def link(self, score_a: float, score_b: float) -> float:
        """P(a ≻ b) = σ(u_a − u_b)."""
        return math.exp(log_sigmoid(score_a - score_b))


# ------------------------------------------------------------------------------------ spec


def _split_top(text: str) -> list[str]:
    """Comma-separated items at parenthesis depth 0."""
    items, depth, cur = [], 0, []
    for ch in text:
        if ch == "," and depth == 0:
            items.append("".join(cur))
            cur = []
            continue
        depth += ch == "("
        depth -= ch == ")"
        cur.append(ch)
    items.append("".join(cur))
    return [i.strip() for i in items if i.strip()]


def parse_lsc_spec(spec: str) -> tuple[list[str], dict[str, Any]]:
    """``lsc(c1, c2, key=value, ...)`` → (component specs, options)."""
    s = spec.strip()
    if not (s.startswith("lsc(") and s.endswith(")")):
        raise ValueError(f"judge spec {spec!r}: expected lsc(JUDGE, JUDGE, ..., option=value)")
    comps, opts = [], {}
    for item in _split_top(s[4:-1]):
        key, eq, value = item.partition("=")
        if eq and key.strip() in OPTIONS and ":" not in key:
            key, value = key.strip(), value.strip()
            if key == "ref":
                opts[key] = value if value in ("pi0", "candidates") else [float(v) for v in value.split("/")]
            elif key == "m":
                opts[key] = int(value)
            else:
                opts[key] = float(value)
        elif eq and ":" not in item:
            raise ValueError(f"judge spec {spec!r}: unknown lsc option {key.strip()!r} (options: {', '.join(OPTIONS)})")
        else:
            comps.append(item)
    if not comps:
        raise ValueError(f"judge spec {spec!r}: lsc needs at least one component judge (task:NAME, rm:PATH)")
    return comps, opts


def make_lsc_judge(spec: str, **kwargs: Any) -> LSCJudge:
    """The judge of an ``lsc(...)`` spec; components are built by ``make_judge`` (``kwargs`` go to each)."""
    from preftune.reward.judges import make_judge

    comps, opts = parse_lsc_spec(spec)
    judges = [make_judge(c, **kwargs) for c in comps]
    for c in judges:
        if isinstance(c, LSCJudge):
            raise ValueError(f"judge spec {spec!r}: an lsc judge cannot be a component of another")
    return LSCJudge(judges, name=spec.strip(), **opts)
