"""preftune.reward: reward / preference models (Bradley–Terry, regression, GPM) and judges.

    from preftune.reward import RewardConfig, train_reward, load_preference_model
    result = train_reward(RewardConfig(model="smollm2-135m-instruct", data="pairs.jsonl", lora=True))
    rm = load_preference_model(result.model_dir)
    rm.score(prompts, responses); rm.prefer(prompt, a, b)

Names load on first use (PEP 562): ``import preftune.reward`` pulls in neither torch nor transformers.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "preftune.reward.config": ("RewardConfig", "load_reward_config"),
    "preftune.reward.model": ("RewardModel", "load_preference_model", "build_reward_model"),
    "preftune.reward.trainer": ("train_reward",),
    "preftune.reward.judges": (
        "Judge",
        "Verdict",
        "TaskJudge",
        "RewardModelJudge",
        "LLMJudge",
        "FunctionJudge",
        "make_judge",
        "judge_file",
        "pairwise_comparisons",
    ),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'preftune.reward' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
