"""The one typed config of `preftune reward train`: YAML fills it, flags and ``--set key=value`` override it.

Same conventions (and, where an option means the same thing, the same names and help) as
``preftune.train.config.TrainConfig``: the shared training loop reads both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from preftune.train.config import RunConfig

# Reward objectives that live with their models in preftune/reward (PAL, CARM) rather than in the losses
# registry, and the short names the CLI accepts for them (METHODS.md §M11, §M12).
LOCAL_ALIASES = {"pal_a": "rm_pal_a", "pal_b": "rm_pal_b", "carm": "rm_carm"}


def local_objectives() -> dict:
    from preftune.reward import carm, pal

    return {**pal.OBJECTIVES, carm.OBJECTIVE.name: carm.OBJECTIVE}


def reward_objective_names() -> list[str]:
    from preftune.losses import names

    return sorted([*names(trains="reward_model"), *LOCAL_ALIASES.values()])


def loss_help() -> str:
    """Help text of the ``loss`` option, naming the reward-model objectives (loads the registry)."""
    found = reward_objective_names()
    return f"{', '.join(found[:-1])} or {found[-1]} (pal_a, pal_b, carm: short names; see `preftune losses`)"


class RewardConfig(RunConfig):

    # --- what to train
    model: str = Field(
        "smollm2-135m-instruct",
        description="HF folder, hub id, local .gguf, or the alias smollm2-135m-instruct; "
        "loaded as AutoModelForSequenceClassification (a fresh head of num_labels outputs)",
    )
    eval_fraction: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="fraction of the training data held out for eval when eval_data is unset",
    )
    output: str = Field(
        "runs/reward",
        description="output folder: checkpoints, metrics.jsonl, plots and the final model (output/model)",
    )

    # --- objective
    loss: str = Field(
        "rm_bt",
        description="reward-model objective: a `preftune losses` entry whose trains is reward_model",
    )
    center_rewards_coefficient: float | None = Field(
        None,
        ge=0,
        description="shortcut for loss_params.center_rewards_coefficient "
        "(rm_bt, rm_bt_margin; 0.01 recommended)",
    )
    gpm_dim: int = Field(
        2,
        ge=2,
        description="rm_gpm: embedding size 2k (k rotation blocks; "
        "2 in the paper's default, 6 in its 8B model)",
    )
    attributes: list[str] = Field(
        default_factory=lambda: ["helpfulness"],
        description="rm_regression: rated columns, one head each "
        "(HelpSteer2: helpfulness, correctness, coherence, "
        "complexity, verbosity); a row missing an attribute has that head masked",
    )
    reward_attribute: str | None = Field(
        None,
        description="rm_regression: the attribute whose head is the reward for score/prefer "
        "(default: the first)",
    )
    pair_strategy: Literal["best_worst", "all", "adjacent"] = Field(
        "all",
        description="how pairs are built from scored or ranked lists "
        "(all: every ordered pair, as InstructGPT)",
    )

    # --- PAL (rm_pal_a, rm_pal_b; METHODS.md §M11)
    pal_prototypes: int = Field(2, ge=1, description="PAL: K, the number of prototypes users' weights mix")
    pal_dim: int = Field(512, ge=1, description="PAL: d, the preference space of the 2-layer GELU projectors")
    pal_ideal_point: Literal["f(Pw)", "Pw", "f(P)w"] = Field(
        "f(Pw)", description="PAL-A: how prototypes P and weights w give the ideal point"
    )
    pal_head_lr: float = Field(1e-4, gt=0, description="PAL: learning rate of the projectors f, g_k (wd 0.01)")
    pal_user_lr: float = Field(5e-3, gt=0, description="PAL: learning rate of the user weights W and prototypes P")
    pal_scale_lr: float = Field(0.1, gt=0, description="PAL-B: learning rate of the logit scale")
    freeze_backbone: bool = Field(
        False, description="PAL: keep the backbone frozen (the paper's 'Tiny' setting); only the heads train"
    )

    # --- CARM (rm_carm; METHODS.md §M12)
    context_template: str = Field(
        "Evaluate the response according to: {context}",
        description="CARM: how a pair's context is written in front of the prompt ({context} is replaced)",
    )

    # --- tokenisation
    max_length: int = Field(512, gt=1, description="longest prompt + response in tokens")
    max_prompt_length: int = Field(256, gt=0, description="longest prompt in tokens (truncated first)")

    # --- optimisation
    batch_size: int = Field(8, gt=0, description="pairs (or rated responses) per device per micro-batch")
    learning_rate: float = Field(1e-5, gt=0, description="peak AdamW learning rate (LoRA: 1e-4..1e-3)")
    seed: int = Field(
        0, description="seed for data order, the new head's initialisation, adapters and dropout"
    )
    disable_dropout: bool = Field(
        True, description="turn dropout off (rewards of a pair come from the same network)"
    )

    # --- LoRA
    lora: bool = Field(
        False, description="train LoRA adapters plus the full new head; the saved model has them merged"
    )

    # --- batching
    length_grouping: bool = Field(
        True, description="batch examples of similar length together (less padding)"
    )

    # --- bookkeeping
    save_model: bool = Field(
        True,
        description="save the final model (output/model, loadable by AutoModelForSequenceClassification)",
    )

    @field_validator("loss")
    @classmethod
    def _reward_objective(cls, v: str) -> str:
        v = LOCAL_ALIASES.get(v, v)
        if v not in reward_objective_names():
            raise ValueError(f"{v!r} is not a reward-model objective; choose {loss_help()}")
        return v

    @field_validator("attributes")
    @classmethod
    def _attributes(cls, v: list[str]) -> list[str]:
        if not v or len(set(v)) != len(v) or not all(isinstance(a, str) and a for a in v):
            raise ValueError("attributes must be a non-empty list of distinct column names")
        return v

    @model_validator(mode="after")
    def _check(self) -> RewardConfig:
        self.objective().resolve(self.loss_hyperparameters())  # range check with the objective's name
        if self.gpm_dim % 2:
            raise ValueError(f"gpm_dim must be even (2k), got {self.gpm_dim}")
        if "{context}" not in self.context_template:
            raise ValueError("context_template must contain {context}")
        if self.max_prompt_length >= self.max_length:
            raise ValueError("max_prompt_length must be smaller than max_length")
        if self.reward_attribute is not None and self.reward_attribute not in self.attributes:
            raise ValueError(
                f"reward_attribute {self.reward_attribute!r} is not one of attributes {self.attributes}"
            )
        return self

    def objective(self):
        from preftune.losses import get

        local = local_objectives()
        return local[self.loss] if self.loss in local else get(self.loss)

    def loss_hyperparameters(self) -> dict[str, Any]:
        params = dict(self.loss_params)
        if self.center_rewards_coefficient is not None:
            params["center_rewards_coefficient"] = self.center_rewards_coefficient
        return params

    @property
    def kind(self) -> str:
        """What the model outputs: ``bt`` (one reward; also CARM), ``regression`` (one per attribute), ``gpm``,
        ``pal_a`` / ``pal_b`` (per-user rewards from a PAL model, reward/pal.py)."""
        return {"rm_regression": "regression", "rm_gpm": "gpm", "rm_pal_a": "pal_a", "rm_pal_b": "pal_b"}.get(
            self.loss, "bt")

    @property
    def num_labels(self) -> int:
        return {"regression": len(self.attributes), "gpm": self.gpm_dim}.get(self.kind, 1)

    @property
    def output_dir(self) -> Path:
        return Path(self.output)


def load_reward_config(path: str | Path | None, overrides: dict[str, Any]) -> RewardConfig:
    """YAML (if given) overlaid with ``overrides`` (None values ignored), validated once."""
    from preftune.train.config import load_config

    return load_config(path, overrides, model=RewardConfig)
