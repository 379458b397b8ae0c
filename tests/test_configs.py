"""configs/: one generated recipe per policy objective, each parsed into TrainConfig."""

from pathlib import Path

import pytest
import yaml

from preftune.losses import all_objectives, get
from preftune.tools.gen_docs import render_config
from preftune.train.config import TrainConfig
from preftune.train.inputs import required_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# reward_*.yaml are RewardConfig recipes (`preftune reward train`), parsed in tests/reward.
# Hand-written recipes are compositions over an objective, not generated from the registry.
HAND_WRITTEN = {"curry_dpo": {"loss": "dpo", "curriculum": "iterative"}}
POLICY_RECIPES = sorted(
    p for p in CONFIGS.glob("*.yaml") if not p.stem.startswith("reward_") and p.stem not in HAND_WRITTEN
)


def test_one_recipe_per_policy_objective():
    have = {p.stem for p in POLICY_RECIPES}
    want = {o.name for o in all_objectives("policy")}
    assert have == want, (
        f"missing {sorted(want - have)}, extra {sorted(have - want)}: "
        "run `python -m preftune.tools.gen_docs --configs configs/`"
    )


@pytest.mark.parametrize("path", POLICY_RECIPES, ids=lambda p: p.stem)
def test_recipe_parses_into_train_config(path):
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert raw["data"] is None and raw["loss"] == path.stem
    raw["data"] = "data.jsonl"
    for field in required_config(get(path.stem)):
        raw[field] = "some/model"
    cfg = TrainConfig.model_validate(raw)
    assert cfg.objective().resolve(cfg.loss_hyperparameters()) == get(path.stem).defaults()
    assert path.read_text(encoding="utf-8") == render_config(get(path.stem)), (
        f"{path} is out of date: run `python -m preftune.tools.gen_docs --configs configs/`"
    )


@pytest.mark.parametrize("name", sorted(HAND_WRITTEN))
def test_hand_written_recipe_parses(name):
    raw = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text(encoding="utf-8"))
    assert raw["data"] is None
    cfg = TrainConfig.model_validate({**raw, "data": "data.jsonl"})
    assert {k: getattr(cfg, k) for k in HAND_WRITTEN[name]} == HAND_WRITTEN[name]
