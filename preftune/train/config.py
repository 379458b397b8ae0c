"""The one typed config of `preftune train`: YAML fills it, flags and ``--set key=value`` override it.

Every option's help text lives on its field; the CLI and the docs read it from here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class RunConfig(BaseModel):
    """Options every training command shares (policy and reward-model training): data access,
    optimisation, LoRA shape and bookkeeping. One definition, one help text each."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    data: str | None = Field(None, description="training data: .jsonl/.json/.parquet file or a saved HF dataset folder")
    split: str | None = Field(
        None, description="split to read from a dataset folder with several splits (default: train)"
    )
    eval_data: str | None = Field(
        None, description="held-out data in the same formats; its metrics are logged as eval/*"
    )
    loss_params: dict[str, Any] = Field(
        default_factory=dict, description="objective hyperparameters (see `preftune losses`)"
    )
    truncation_mode: Literal["keep_end", "keep_start"] = Field(
        "keep_end", description="which end of an over-long prompt to keep"
    )
    chat_template: Literal["auto", "always", "never"] = Field(
        "auto", description="apply the tokenizer's chat template: auto = to conversations only"
    )
    skip_invalid: bool = Field(False, description="drop invalid records (reported with a count) instead of failing")
    max_steps: int | None = Field(None, gt=0, description="optimizer steps; overrides epochs")
    epochs: float = Field(1.0, gt=0, description="passes over the training data when max_steps is unset")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    warmup_ratio: float = Field(0.1, ge=0, le=1, description="share of steps of linear warm-up")
    scheduler: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="learning-rate decay after warm-up"
    )
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping norm (null: no clipping)")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16 = autocast with float32 master weights and losses"
    )
    lora_r: int = Field(16, gt=0, description="LoRA rank")
    lora_alpha: float = Field(32, gt=0, description="LoRA scaling alpha")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout")
    lora_target: str | list[str] = Field("all-linear", description="modules to adapt")
    logging_steps: int = Field(1, gt=0, description="log metrics every N optimizer steps")
    eval_steps: int | None = Field(None, gt=0, description="evaluate every N steps (and at the end)")
    save_steps: int | None = Field(None, gt=0, description="checkpoint every N steps")
    save_total_limit: int = Field(2, gt=0, description="checkpoints kept (oldest deleted)")
    resume: bool = Field(False, description="continue from the latest checkpoint in output")
    shuffle: bool = Field(
        True, description="shuffle the training examples every epoch; false keeps the data's order (a curriculum) "
        "and ignores length_grouping"
    )
    plot: bool = Field(True, description="write training curves as PNG at the end")
    progress: bool = Field(True, description="show a live progress bar")


class TrainConfig(RunConfig):

    # --- what to train
    model: str = Field(
        "smollm2-135m-instruct", description="HF folder, hub id, local .gguf, or the alias smollm2-135m-instruct"
    )
    eval_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="fraction of the training data held out for eval when eval_data is unset"
    )
    output: str = Field(
        "runs/preftune", description="output folder: checkpoints, metrics.jsonl, plots and the final model"
    )

    # --- objective
    loss: str = Field("dpo", description="objective name from `preftune losses`")
    beta: float | None = Field(None, description="shortcut for loss_params.beta")
    pair_strategy: Literal["best_worst", "all", "adjacent"] = Field(
        "best_worst", description="how pairs are built from scored or ranked lists"
    )
    rationale_template: str | None = Field(
        None,
        description="RDPO/R-ORPO: the user turn x_rat before each pair's rationale, with {prompt}, {first} and "
        "{second} (null: the released 'Response above / Response below' question, preftune/data/rationales.py)",
    )
    rationale_order: Literal["chosen_first", "random"] = Field(
        "chosen_first",
        description="RDPO/R-ORPO: chosen_first shows the chosen response first in x_rat (the released order); "
        "random shows it second for about half the pairs (a fixed coin per pair) against a position shortcut",
    )
    curriculum: Literal["off", "iterative", "sequential"] = Field(
        "off",
        description="Curry-DPO (arXiv 2403.07230) on lists of >= 3 scored or ranked responses, for a paired "
        "objective: the best response against each other one, in stages easy to hard by rating gap (S1 = best "
        "vs worst, S2 = best vs second worst, ...; ties dropped). iterative: one run per stage (epochs/max_steps "
        "per stage) from the previous stage's model, which is also its reference (output/stage_N/); "
        "sequential: one run over S1, S2, ... in that order, unshuffled, reference the initial model. "
        "Per-stage pairs, mean rating gap and initial accuracy in output/stages.jsonl",
    )
    ches_filter: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="drop this fraction of the training pairs with the highest length-normalised CHES score under "
        "the initial policy before training (Razin et al., arXiv 2410.08847: such pairs displace the chosen "
        "likelihood; the paper keeps the lowest 5%, i.e. 0.95); the dropped pairs are listed in "
        "output/ches_dropped.jsonl (docs/inspect.md)",
    )

    # --- tokenisation
    max_length: int = Field(1024, gt=1, description="longest prompt + response in tokens")
    max_prompt_length: int = Field(512, gt=0, description="longest prompt in tokens (truncated first)")

    # --- optimisation
    batch_size: int = Field(4, gt=0, description="prompts (groups) per device per micro-batch")
    learning_rate: float = Field(5e-6, gt=0, description="peak AdamW learning rate")
    seed: int = Field(0, description="seed for data order, initialisation of adapters and dropout")
    disable_dropout: bool = Field(True, description="turn dropout off so policy and reference see the same network")

    # --- reference
    reference: Literal["auto", "live", "precompute", "none"] = Field(
        "auto",
        description="auto: precompute when the objective needs only reference log-probs, live for live logits; "
        "none is allowed only for reference-free objectives",
    )
    ref_cache_dir: str | None = Field(
        None, description="where precomputed reference log-probs are cached (default ~/.cache/preftune/ref)"
    )
    token_rm_model: str | None = Field(
        None,
        description="TGDPO: the frozen token-level reward policy (HF folder or id, same tokenizer), e.g. a "
        "DPO-trained model; its per-token log-probs guide the token weights",
    )
    value_model: str | None = Field(
        None,
        description="OREO: the initial critic V(s_t), a token-classification folder with one label (e.g. a previous "
        "run's output/critic); unset: a copy of the initial model with a zero-initialised value head (the authors' "
        "default). The critic trains with the policy (loss oreo) or alone (oreo_value) and is saved to output/critic",
    )
    critic_learning_rate: float = Field(
        5e-6, gt=0, description="OREO: the critic's peak learning rate, its own parameter group (the same schedule "
        "shape, betas and weight decay as the policy's); 5e-6 is train_oreo.sh's for a fully trained critic, which "
        "it is here also when the policy trains LoRA adapters"
    )
    margin_models: list[str] = Field(
        default_factory=list,
        description="MODPO: models whose rewards become margin columns after the data's margin_rewards, scored "
        "once before training and cached: a reward-model folder (its reward r(x, y)) or a policy folder / LoRA "
        "adapter (its implicit DPO reward margin_beta·(log π − log π_ref), π_ref = model)",
    )
    margin_beta: float | None = Field(
        None, gt=0, description="MODPO: β of implicit-reward margin models (default: the loss's beta)"
    )

    # --- LoRA
    lora: bool = Field(False, description="train LoRA adapters; the reference is the base model with adapters off")
    merge_lora: bool = Field(False, description="also save merged full weights in output/merged")

    # --- engine
    logits_chunk: int = Field(1024, gt=0, description="response positions per LM-head chunk")
    gradient_checkpointing: bool = Field(
        False,
        description="keep only each decoder layer's input and recompute the layer in backward (transformers' "
        "activation checkpointing, non-reentrant): far less activation memory for about one extra forward",
    )
    engine: Literal["auto", "plain"] = Field(
        "auto",
        description="auto: compile, attention implementation and activation_memory_budget chosen for this device, "
        "precision and model from measurements (the choice and its reason are logged; docs/benchmarks.md); plain: "
        "exactly the options below. Both compute the same step; an option set explicitly always wins",
    )
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = Field(
        None,
        description="transformers attention implementation for the policy (unset: the engine choice, else "
        "transformers' default, sdpa); with compile on CPU, eager lets inductor fuse the attention math",
    )
    compile: bool | None = Field(
        None,
        description="torch.compile each decoder layer (inductor fuses the norm, rotary, activation and residual "
        "element-wise work; one compile of ~10 s per new shape class, then reused by every layer) and the LM "
        "head's log-softmax and its gradient (one pass over each logits chunk instead of 4-6); unset: the engine "
        "choice (engine=plain: off)",
    )
    activation_memory_budget: float | None = Field(
        None,
        gt=0,
        le=1,
        description="with compile: share of a compiled layer's activations kept for backward; AOTAutograd's "
        "partitioner recomputes the rest in backward, cheapest FLOPs per byte first (attention probabilities, "
        "norms, casts, then projections). 1 = keep all it would (torch's default), lower = less memory for a "
        "little recompute; the same ops run again, so the numbers do not change. Unset: the engine choice",
    )
    checkpoint_every_n_layers: int = Field(
        1, ge=1, description="with gradient_checkpointing: recompute only every n-th decoder layer (memory/speed dial)"
    )
    length_grouping: bool = Field(True, description="batch prompts of similar length together (less padding)")
    prefix_sharing: Literal["auto", "on", "off"] = Field(
        "auto",
        description="run each prompt once per group, its responses attending to it through a block attention "
        "mask (several short groups share a row); auto: use it when a one-off check on a tiny batch shows the "
        "model gives the unshared log-probs that way, else fall back to one row per response; on: fail instead",
    )

    # --- bookkeeping
    save_model: bool = Field(True, description="save the final model with save_pretrained")

    # --- training dynamics (train/dynamics.py, docs/dynamics.md)
    dynamics: bool = Field(
        True,
        description="log training dynamics (dynamics/* in metrics.jsonl) every dynamics_steps steps: the change "
        "since step 0 of the log-probs of a fixed probe of training responses and of unseen responses sampled "
        "from the initial policy, dL/dlogp of chosen and rejected, and the ratio of the gradient norms that flow "
        "through them; off under FSDP2 and DeepSpeed",
    )
    dynamics_steps: int = Field(25, gt=0, description="measure dynamics every N optimizer steps (and at the last)")
    dynamics_probe: int = Field(
        8, ge=0, description="training examples in the fixed probe (the first N of the training data; 0: none)"
    )
    dynamics_unseen: int = Field(
        8, ge=0, description="unseen responses sampled once from the initial policy, one per probe prompt (0: none)"
    )
    dynamics_unseen_tokens: int = Field(32, gt=0, description="at most this many tokens per unseen response")

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, v: str) -> str:
        from preftune.losses import get

        get(v)  # raises KeyError with suggestions
        return v

    @model_validator(mode="after")
    def _check_objective(self) -> TrainConfig:
        from preftune.train.inputs import needs_live_reference, required_config

        obj = self.objective()
        if obj.trains == "reward_model":
            raise ValueError(f"'{obj.name}' trains a reward model: use `preftune reward train`")
        if obj.trains == "diffusion":
            raise ValueError(
                f"'{obj.name}' operates on denoising errors of a diffusion model; use the Python API "
                "(preftune.losses.get(name).fn)"
            )
        obj.resolve(self.loss_hyperparameters())  # range check with the objective's name in the error
        if "margin_rewards" in obj.inputs:
            self._check_margins(obj)
        elif self.margin_models:
            raise ValueError(f"margin_models give MODPO's margin rewards; objective '{obj.name}' takes none")
        for name in required_config(obj):
            if getattr(self, name) is None:
                raise ValueError(f"objective '{obj.name}' needs {name}: {type(self).model_fields[name].description}")
        if needs_live_reference(obj) and self.reference == "precompute" and not self.lora:
            raise ValueError(
                f"objective '{obj.name}' evaluates the reference on pairs built during training "
                "(KTO's mismatched pairs): use reference=auto or live, or lora=true"
            )
        if "kl_logps" in obj.inputs and self.batch_size < 2:
            # The KL baseline pairs prompt i with the completion of example i-1 of the same micro-batch; with
            # one example that is its own completion and z0 collapses to max(0, ρ_i). TRL refuses it too.
            raise ValueError(
                f"objective '{obj.name}' estimates its KL baseline from mismatched pairs within a micro-batch: "
                f"batch_size must be at least 2 (got {self.batch_size}); use grad_accum for a small memory footprint"
            )
        if self.reference == "none" and obj.needs_reference:
            raise ValueError(f"objective '{obj.name}' needs a reference model; reference=none is not allowed")
        if self.max_prompt_length >= self.max_length:
            raise ValueError("max_prompt_length must be smaller than max_length")
        if self.curriculum != "off":
            self._check_curriculum(obj)
        if self.ches_filter is not None and (obj.shape != "paired" or obj.columns or self.curriculum != "off"):
            raise ValueError(f"ches_filter scores (chosen, rejected) pairs: it needs a paired objective such as dpo "
                             f"and curriculum=off, not '{obj.name}' ({obj.data_needs}), curriculum={self.curriculum}")
        return self

    def _check_curriculum(self, obj) -> None:
        if obj.shape != "paired" or obj.columns:
            raise ValueError(f"curriculum={self.curriculum} trains on (chosen, rejected) pairs: it needs a paired "
                             f"objective such as dpo, not '{obj.name}' ({obj.data_needs})")
        if self.resolved_reference() == "live":
            raise ValueError(f"curriculum={self.curriculum} hands each stage precomputed reference log-probs; "
                             f"objective '{obj.name}' needs a live reference")
        if self.resume and self.curriculum == "iterative":
            raise ValueError("resume: curriculum=iterative runs one training per stage and cannot resume; "
                             "rerun it, or use curriculum=sequential (one run)")

    def _check_margins(self, obj) -> None:
        """MODPO's weights: numbers with w_0 > 0 (their count is checked against the data's margin columns when
        the data is read); a warning when the effective KL weight β/w_0 is very small (METHODS.md §M1(e))."""
        import warnings

        from preftune.losses.pairwise import MODPO_KL_FLOOR, modpo_weights

        params = obj.resolve(self.loss_hyperparameters())
        if params.get("w") is None:
            return
        w = params["w"] if isinstance(params["w"], (list, tuple)) else [params["w"]]
        w0, _ = modpo_weights(w, len(w) - 1)
        if params["beta"] / w0 < MODPO_KL_FLOOR:
            warnings.warn(f"objective '{obj.name}': effective KL weight β/w_0 = {params['beta'] / w0:.3g} is below "
                          f"{MODPO_KL_FLOOR}: the policy may drift far from the reference", stacklevel=2)

    def objective(self):
        from preftune.losses import get

        return get(self.loss)

    def loss_hyperparameters(self) -> dict[str, Any]:
        params = dict(self.loss_params)
        if self.beta is not None:
            params["beta"] = self.beta
        return params

    def resolved_reference(self) -> str:
        obj = self.objective()
        if not obj.needs_reference:
            return "none"
        if obj.reference == "live_logits":
            return "live"
        if self.reference == "auto" and _needs_live(obj):
            return "live"
        if self.reference == "auto":
            return "precompute"
        return self.reference

    @property
    def output_dir(self) -> Path:
        return Path(self.output)


def _needs_live(obj) -> bool:
    from preftune.train.inputs import needs_live_reference

    return needs_live_reference(obj)


def parse_set(items: list[str]) -> dict[str, Any]:
    """``["a.b=1", "lora=true"]`` → nested dict with YAML-typed values."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def load_config(path: str | Path | None, overrides: dict[str, Any], model: type[BaseModel] | None = None):
    """YAML (if given) overlaid with ``overrides`` (None values ignored), validated once as ``model``
    (default TrainConfig; every command's typed config loads the same way)."""
    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{p}: the top level must be a mapping of option: value")
        data.update(loaded)
    for k, v in overrides.items():
        if v is None:
            continue
        if isinstance(v, dict) and isinstance(data.get(k), dict):
            data[k] = {**data[k], **v}
        else:
            data[k] = v
    return (model or TrainConfig).model_validate(data)
