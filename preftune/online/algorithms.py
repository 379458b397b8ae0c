"""The online algorithms by name: each is a configuration of the one loop (``online/loop.py``).

An algorithm fixes what differs between the seed papers (ONLINE.md §1–§9): the registry objective, the
reference schedule, the pair rule, what the objective needs beyond log-probs (win rates, π_t's
log-probs), and the loop's shape (iterations of sample → judge → build → train; one optimizer step per
fresh batch for online DPO; curriculum stages for Curry-DPO; two LoRA modules for OFS-DPO). Defaults
are ONLINE.md's small profile for a 135M model on 2 cores (§0.5 and each section's (d)).

One table, like the objectives' registry: ``preftune online --help`` lists it and the config is
validated against it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

RefMode = Literal["fixed", "previous", "extrapolated"]
Shape = Literal["iterative", "per_step", "stages", "fast_slow", "tree", "code_tests"]
RULES = ("max_min", "max_random", "max_max", "random", "max_min_p", "all", "tournament", "large_margin")


@dataclass(frozen=True)
class Algorithm:
    name: str
    summary: str
    paper: str
    arxiv: str
    loss: str  # registry objective trained each iteration
    ref_mode: RefMode
    rule: str  # pair rule (ONLINE.md §0.3)
    loss_params: dict[str, Any] = field(default_factory=dict)
    shape: Shape = "iterative"
    # Inputs the loop computes for the objective: win_probs (SPPO), prev_logps (INPO).
    inputs: tuple[str, ...] = ()
    # Settings this algorithm's paper fixes differently from the shared profile (sampling, epochs).
    overrides: dict[str, Any] = field(default_factory=dict)
    notes: str = ""


_ALGORITHMS: dict[str, Algorithm] = {}


def _add(a: Algorithm) -> None:
    _ALGORITHMS[a.name] = a


_add(Algorithm(
    "iterative_dpo", "sample K, judge, best-vs-worst pair per prompt, DPO from the current iterate",
    "Iterative Preference Learning from Human Feedback / RLHF Workflow (RLHFlow)", "2312.11456",
    loss="dpo", ref_mode="previous", rule="max_min", loss_params={"beta": 0.1},
    notes="ref_mode=fixed keeps π_0 as the reference (RLHFlow run_loop.sh); previous uses π_t (run_loop2.sh). "
    "Any paired objective works through --set loss=NAME (e.g. dpo_nll for iterative RPO).",
))
_add(Algorithm(
    "online_dpo", "fresh samples every optimizer step: 2 per prompt, judged, one DPO step (OAIF)",
    "Direct Language Model Alignment from Online AI Feedback", "2402.04792",
    loss="dpo", ref_mode="fixed", rule="max_min", loss_params={"beta": 0.1}, shape="per_step",
    overrides={"k": 2, "temperature": 1.0, "top_p": 1.0},
    notes="Logs TRL's OnlineDPOTrainer names (objective/kl, objective/entropy, objective/rlhf_reward, "
    "objective/scores, objective/scores_margin, val/contain_eos_token). Ties are dropped, not trained as "
    "a preference for the first completion (TRL's ≥).",
))
_add(Algorithm(
    "sppo", "win rates P̂(y ≻ π_t) from the judge; square loss to η·(P̂ − ½) with reference π_t",
    "Self-Play Preference Optimization for Language Model Alignment", "2405.00675",
    loss="sppo", ref_mode="previous", rule="max_min", loss_params={"beta": 0.05}, inputs=("win_probs",),
    overrides={"temperature": 0.7, "top_p": 0.9},
    notes="P_ij = σ((s_i − s_j)/judge_temperature) from scalar judges, the judge's P(a ≻ b) from pairwise "
    "ones; P̂_i = (1/K)·Σ_j P_ij with the diagonal ½ included (the SPPO convention). β = 0.05 (η = 20), "
    "not the paper's 1e-3: 64-token answers of a 135M model (ONLINE.md §3(d)).",
))
_add(Algorithm(
    "dno", "DNO-Prct: large-margin pairs on a 6-point scale, optional teacher responses, replay, reference π_t",
    "Direct Nash Optimization", "2404.03715",
    loss="dno", ref_mode="previous", rule="large_margin", loss_params={"beta": 0.1},
    overrides={"temperature": 0.7, "top_p": 0.95, "epochs": 1.0},
    notes="Scores map to 1 + round(5·s) for judges in [0, 1]; positives score ≥ 5; pairs with a gap ≥ 2 "
    "(≥ 1 when the positive is a student sample and a teacher is present); 30%/15% replay of the two "
    "previous iterations' pairs.",
))
_add(Algorithm(
    "inpo", "online mirror descent: binary pairs, π_t's log-probs cached each iteration, fixed π_ref",
    "Iterative Nash Policy Optimization", "2407.00617",
    loss="inpo", ref_mode="fixed", rule="max_min", loss_params={"eta": 0.05, "tau": 0.05 / 3},
    inputs=("prev_logps",), overrides={"epochs": 2.0},
    notes="rule=tournament with a pairwise judge (knockout, then a final check). prev_logps are π_t's "
    "summed log-probs on the sampled ids, computed before the iteration's first update.",
))
_add(Algorithm(
    "apo", "Accelerated PO: iterative DPO whose reference is the Nesterov extrapolation π_t·(π_t/π_{t−1})^α",
    "Accelerated Preference Optimization for Large Language Model Alignment", "2410.06293",
    loss="dpo", ref_mode="extrapolated", rule="max_min", loss_params={"beta": 0.1},
    notes="Reference log-probs (1+α)·ℓ_t − α·ℓ_{t−1} on the sampled ids (exact for pair differences); "
    "samples come from π_t (sampling from π̂ is unconfirmed in the paper). α = 0 is iterative DPO with "
    "ref_mode=previous, bit for bit.",
))
_add(Algorithm(
    "ofs_dpo", "fast and slow LoRA modules on one base, trained on the same pairs with a chasing term",
    "Online Fast-Slow chasing DPO", "2406.05534",
    loss="dpo", ref_mode="fixed", rule="max_min", loss_params={"beta": 0.1}, shape="fast_slow",
    notes="The leader minimises DPO + λ·C_lead, the chaser DPO − λ·C_chase; the module with the lower "
    "running-mean DPO loss leads (re-checked every ofs_swap_every steps). Form and signs [UNVERIFIED]: "
    "see docs/online.md.",
))
_add(Algorithm(
    "self_rewarding", "the policy judges its own samples with the additive 0–5 rubric; DPO on best vs worst",
    "Self-Rewarding Language Models", "2401.10020",
    loss="dpo", ref_mode="previous", rule="max_min", loss_params={"beta": 0.1},
    overrides={"judge": "self", "temperature": 0.7, "top_p": 0.9},
    notes="judge=self: the current policy reads the rubric prompt and each answer; the score is the expected "
    "points under its next-token distribution over 0–5 after 'Score:' (a deterministic average of the "
    "paper's three sampled judgements). A 135M model judges poorly: measured in docs/online.md.",
))
_add(Algorithm(
    "curry_dpo", "curriculum stages per iteration: best vs worst, then best vs 2nd worst …, reference refreshed",
    "Curry-DPO: Enhancing Alignment using Curriculum Learning & Ranked Preferences", "2403.07230",
    loss="dpo", ref_mode="previous", rule="max_min", loss_params={"beta": 0.1}, shape="stages",
    notes="Stage s pairs the best sample with rank K − s + 1 (zero-gap pairs dropped); each stage is its "
    "own trainer run from the previous stage's model with that model as reference.",
))

_add(Algorithm(
    "mcts_dpo", "MCTS over answer steps with the current policy; step-level DPO pairs (highest vs lowest Q child)",
    "Monte Carlo Tree Search Boosts Reasoning via Iterative Preference Learning", "2405.00451",
    loss="dpo", ref_mode="fixed", rule="max_min", loss_params={"beta": 0.1}, shape="tree",
    overrides={"temperature": 1.0, "top_p": 1.0},
    notes="Steps are lines; node value = self-evaluation confidence (the policy, hinted with the task's "
    "reference solution) + ±1 outcome at terminal steps (YuxiXie/MCTS-DPO get_values); PUCT with the "
    "length-penalised step prior; pairs share prompt + taken steps (online/mcts.py). Needs a task with a "
    "reference solution (arithmetic).",
))

_add(Algorithm(
    "dstc", "K codes and K tests per prompt from the policy, all-against-all in a sandbox; minimax pairs of code+test",
    "DSTC: Direct Preference Learning with Only Self-Generated Tests and Code to Improve Code LMs", "2411.13611",
    loss="dpo", ref_mode="fixed", rule="max_min", loss_params={"beta": 0.1}, shape="code_tests",
    notes="Needs the code task. Pass matrix B_ij (code i + test j exits 0 in the sandbox, tasks/sandbox.py) in "
    "pass_matrix.jsonl; chosen = the code passing most tests with the strictest test it passes, rejected = the "
    "code passing fewest with the most-passed test it fails [UNVERIFIED]; each side is code and test in one "
    "block. The hidden tests judge held-out answers only (online/dstc.py, docs/dstc.md).",
))


def get_algorithm(name: str) -> Algorithm:
    try:
        return _ALGORITHMS[name]
    except KeyError:
        raise KeyError(f"unknown online algorithm {name!r}; choose one of {', '.join(names())}") from None


def names() -> list[str]:
    return list(_ALGORITHMS)


def all_algorithms() -> list[Algorithm]:
    return list(_ALGORITHMS.values())


def help_text() -> str:
    return "; ".join(f"{a.name}: {a.summary}" for a in _ALGORITHMS.values())
