"""The one typed config of `preftune online`: YAML fills it, flags and ``--set key=value`` override it.

Fields left at None take the algorithm's value (``online/algorithms.py``), then the shared small profile
(ONLINE.md §0.5). ``resolved()`` returns the settings a run actually uses; the run folder records them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from preftune.online.algorithms import RULES, get_algorithm, names


class OnlineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), validate_assignment=True)

    # --- what to run
    algorithm: str = Field("iterative_dpo", description="online algorithm: " + ", ".join(names()))
    model: str = Field(
        "smollm2-135m-instruct",
        description="policy to improve: HF folder, hub id, .gguf, the alias smollm2-135m-instruct, or 'tiny' "
        "(a random 2-layer model, for tests)",
    )
    task: str = Field("word_limit", description="built-in task: its prompts (topic-split) and held-out judge")
    judge: str | None = Field(
        None,
        description="who judges the training samples: task:NAME, rm:PATH (reward or GPM model, any tokenizer), "
        "llm:MODEL (pairwise, both orders), self (the policy with the Self-Rewarding rubric), or lsc(JUDGE, ..., "
        "option=value) (pointwise judges summed after the LSC transform, reference rewards from π_0 samples drawn "
        "before training; reward/lsc.py); default task:<task>. Held-out success is always the task's judge",
    )
    judge_temperature: float = Field(
        0.1, ge=0, description="P_ij = σ((s_i − s_j)/T) from scalar scores (0: hard 1/½/0)"
    )
    iterations: int = Field(3, gt=0, description="iterations T (online_dpo: logging iterations)")
    output: str | None = Field(None, description="run folder (default runs/online-<algorithm>-<timestamp>)")
    resume: bool = Field(False, description="continue the run in output from its first unfinished phase")
    seed: int = Field(0, description="base seed: iteration t samples with seed + 1000·t")
    threads: int | None = Field(None, gt=0, description="torch CPU threads (default: torch's choice)")

    # --- sampling
    prompts_per_iteration: int = Field(64, gt=0, description="training prompts per iteration (disjoint splits)")
    k: int | None = Field(None, ge=2, description="samples per prompt (default 4; online_dpo 2)")
    temperature: float | None = Field(None, gt=0, description="sampling temperature (default 0.8)")
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling (default 0.95)")
    flip_pairs: float = Field(
        0.0, ge=0, lt=1, description="swap chosen and rejected in this share of each iteration's pairs (seeded, "
        "marked 'flipped' in train_input.jsonl): label noise at a known rate, for robustness studies")
    dynamics: bool = Field(
        False, description="training-dynamics metrics (likelihood displacement of a fixed probe and of unseen "
        "answers, dL/dlogp, gradient ratio; docs/dynamics.md) in each iteration's metrics.jsonl: about one "
        "training step of setup per iteration, so off unless asked (compare cells turn it on)")
    max_new_tokens: int | None = Field(
        None, gt=0, description="longest sampled response (a cut response is not an answer); default: the task's "
        "answer length (word_limit 32, keyword/json_object/two_sentences 48, arithmetic 64)")
    gen_batch_size: int = Field(
        256, gt=0, description="sequences per generate call (the fast engine's matmuls need rows: measured 9.3x "
        "the HF path at 256, 5.4x at 48, docs/benchmarks.md)")
    sampling_engine: Literal["auto", "fast", "hf"] = Field(
        "auto", description="sampler: fast (one prefill per prompt, static cache, exact top-p; Llama/Qwen2/GPT-2), "
        "hf (transformers.generate), auto (fast where supported)")
    sampling_precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="weights of the sampling copy: bf16 samples about 2x faster on CPUs with bf16 matmuls, from a "
        "rounded copy of the policy (log-probs for training and evaluation stay float32 on the sampled ids)",
    )

    # --- pairs
    rule: str | None = Field(None, description="pair rule: " + ", ".join(RULES) + " (default: the algorithm's)")
    length_penalty: float = Field(0.0, ge=0, description="max_min_p: λ per character")
    min_margin: float = Field(0.0, ge=0, description="rule all: keep pairs with s_w − s_l > this")
    tie_break: Literal["order", "fluency", "fluency_sampled"] = Field(
        "order",
        description="between samples the judge scores equally: order (the first sampled, unbiased), fluency "
        "(the higher mean token log-prob under π_0 ranks higher: chosen = the most natural of the best, rejected "
        "= the least natural of the worst; one π_0 pass over the samples, reused as the fixed reference) or "
        "fluency_sampled (the chosen drawn among the best with P ∝ exp(fluency/tie_break_temperature), the "
        "rejected as in fluency)",
    )
    tie_break_temperature: float = Field(1.0, gt=0, description="fluency_sampled: τ of the chosen's draw")
    missing_eos_penalty: float | None = Field(
        None, ge=0, description="subtract from the judge score of a sample cut by max_new_tokens (online_dpo: 1.0)"
    )

    # --- algorithm knobs
    ref_mode: Literal["fixed", "previous", "extrapolated"] | None = Field(
        None, description="reference each iteration: fixed (π_0), previous (π_t), extrapolated (APO)"
    )
    apo_alpha: float = Field(0.3, ge=0, lt=1, description="APO momentum α (0 = iterative DPO)")
    teacher_file: str | None = Field(
        None, description="DNO: JSONL {prompt, response} of teacher answers added to each prompt's candidates"
    )
    dno_replay: list[float] = Field(
        [0.3, 0.15], description="DNO: share of the pairs of iteration t−1, t−2, … replayed"
    )
    dno_pos_min: int = Field(5, ge=1, le=6, description="DNO: a positive scores at least this (6-point scale)")
    dno_margin: int = Field(2, ge=1, description="DNO: the score gap of a pair")
    dno_student_margin: int = Field(1, ge=1, description="DNO: the gap when the positive is a student sample")
    curry_stages: int | None = Field(None, gt=0, description="Curry-DPO: stages per iteration (default K − 1)")
    ofs_lr_ratio: float = Field(0.2, gt=0, lt=1, description="OFS-DPO: slow module's lr / fast module's lr")
    ofs_lambda: float = Field(0.1, ge=0, description="OFS-DPO: weight of the chasing term")
    ofs_swap_every: int = Field(8, gt=0, description="OFS-DPO: steps between leader checks")
    online_batch: int = Field(8, gt=0, description="online_dpo: prompts per optimizer step")
    mcts_simulations: int = Field(8, gt=0, description="MCTS-DPO: simulations per search (4x at the prompt)")
    mcts_depth: int = Field(2, gt=0, description="MCTS-DPO: expansion depth below the search node; past this "
                            "absolute depth one candidate runs to the end of the answer")
    mcts_branching: int = Field(2, gt=0, description="MCTS-DPO: candidate steps per expansion")
    mcts_root_branching: int | None = Field(None, gt=0, description="MCTS-DPO: candidates at the prompt "
                                            "(default mcts_branching; the code's n_init_actions)")
    mcts_breadth_limit: int = Field(4, gt=0, description="MCTS-DPO: most candidates kept per expansion")
    mcts_step_tokens: int = Field(32, gt=0, description="MCTS-DPO: longest step (a step ends at a newline or EOS)")
    mcts_w_exp: float = Field(1.0, ge=0, description="MCTS-DPO: PUCT exploration weight")
    mcts_length_penalty: float = Field(1.25, ge=0, description="MCTS-DPO: prior p = exp(Σ log π / len^this)")
    mcts_self_eval_weight: float = Field(
        1.0, ge=0, description="MCTS-DPO: weight of the policy's self-evaluation confidence in a node's value, "
        "added to the ±1 outcome of terminal steps (the code adds them: weight 1; 0 = no self-evaluation)")
    mcts_step_check_weight: float = Field(
        0.0, ge=0, description="MCTS-DPO: weight of the task's step checker (+1/−1) added to a node's value "
        "(a preftune extra, not in the paper)")
    mcts_kl_coeff: float = Field(
        0.0, ge=0, description="MCTS-DPO: r −= this · Σ(log π − log π_0) over the step (code: kl_coeff 0.02 "
        "with add_kl never on)")
    mcts_similarity_threshold: float = Field(
        0.99, gt=0, le=1, description="MCTS-DPO: drop a candidate whose hidden-state F1 to a kept one is above")
    mcts_force_terminate: bool = Field(True, description="MCTS-DPO: past mcts_depth one candidate to the end")
    mcts_rejected: Literal["lowest", "second", "random"] = Field(
        "lowest", description="MCTS-DPO: rejected child: lowest Q (choose_worst), second highest, or random")
    mcts_min_q_gap: float = Field(0.0, ge=0, description="MCTS-DPO: keep pairs with Q_w − Q_l ≥ this")
    dstc_tests: int | None = Field(None, ge=1, description="DSTC: test answers sampled per prompt (default k)")
    dstc_seconds: float = Field(2.0, gt=0, description="DSTC: wall-time limit of one sandbox run (code + test)")
    dstc_workers: int = Field(1, ge=1, description="DSTC: sandbox runs at once (each is one child process)")
    unsafe_local_exec: bool = Field(
        False, description="DSTC: run generated code even where the sandbox gets no network namespace (an audit "
        "hook is then the only network guard)")

    # --- training (each iteration is a trainer run from the current iterate)
    loss: str | None = Field(None, description="registry objective (default: the algorithm's)")
    beta: float | None = Field(None, gt=0, description="shortcut for loss_params.beta")
    loss_params: dict[str, Any] = Field(default_factory=dict, description="objective hyperparameters")
    learning_rate: float = Field(2e-4, gt=0, description="peak learning rate per iteration (LoRA)")
    epochs: float | None = Field(None, gt=0, description="passes over each iteration's pairs (default 1)")
    batch_size: int = Field(4, gt=0, description="pairs per micro-batch")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    warmup_ratio: float = Field(0.1, ge=0, le=1, description="share of each iteration's steps of warm-up")
    lora: bool = Field(True, description="LoRA adapters (reference = adapters off); false = full fine-tuning")
    lora_r: int = Field(16, gt=0, description="LoRA rank")
    lora_alpha: float = Field(32, gt=0, description="LoRA alpha")
    max_length: int = Field(192, gt=1, description="prompt + response tokens in training")
    max_prompt_length: int = Field(128, gt=0, description="prompt tokens in training")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16 autocast for training")

    # --- evaluation
    heldout_prompts: int = Field(64, ge=0, description="held-out prompts (unseen topics) evaluated every iteration")
    heldout_samples: int = Field(2, gt=0, description="sampled answers per held-out prompt")
    # One held-out decoding for every algorithm (not each one's training temperature), so that their success
    # rates compare: SPPO samples at 0.7 and online DPO at 1.0, and success moves with temperature alone.
    eval_temperature: float = Field(0.8, gt=0, description="temperature of the held-out samples")
    eval_top_p: float = Field(0.95, gt=0, le=1, description="top-p of the held-out samples")
    greedy_eval: bool = Field(True, description="also evaluate greedy answers on the held-out prompts")
    eval_batch_size: int = Field(8, gt=0, description="sequences per forward of KL and fluency")
    progress: bool = Field(True, description="progress bars")
    plot: bool = Field(True, description="write plots")

    @field_validator("algorithm")
    @classmethod
    def _known_algorithm(cls, v: str) -> str:
        try:
            get_algorithm(v)
        except KeyError as e:  # pydantic reports ValueErrors as validation errors
            raise ValueError(e.args[0]) from None
        return v

    @field_validator("rule")
    @classmethod
    def _known_rule(cls, v: str | None) -> str | None:
        if v is not None and v not in RULES:
            raise ValueError(f"unknown pair rule {v!r}; choose one of {', '.join(RULES)}")
        return v

    @model_validator(mode="after")
    def _check(self) -> OnlineConfig:
        from preftune.losses import get

        try:
            obj = get(self.resolved_loss())
        except KeyError as e:
            raise ValueError(e.args[0]) from None
        if obj.trains != "policy" or obj.shape != "paired":
            raise ValueError(f"objective '{obj.name}' is not a paired policy objective; online loops train pairs")
        obj.resolve(self.loss_hyperparameters())
        if self.max_new_tokens is None:  # the task's own answer length; the saved config shows the value used
            from preftune.tasks import get_task

            try:
                self.max_new_tokens = get_task(self.task).max_new_tokens
            except KeyError as e:
                raise ValueError(e.args[0]) from None
        if self.max_prompt_length >= self.max_length:
            raise ValueError("max_prompt_length must be smaller than max_length")
        alg = self.algo()
        if alg.shape == "fast_slow" and not self.lora:
            raise ValueError("ofs_dpo trains two LoRA modules on one base: lora must be true")
        if alg.shape == "code_tests" and self.task != "code":
            raise ValueError(f"{alg.name} writes and runs code: it needs --task code (not {self.task!r})")
        if self.resolved("ref_mode") == "extrapolated" and alg.name != "apo":
            raise ValueError("ref_mode=extrapolated is APO's reference; use --algorithm apo")
        return self

    # ------------------------------------------------------------------ resolution
    def algo(self):
        return get_algorithm(self.algorithm)

    _DEFAULTS = {"k": 4, "temperature": 0.8, "top_p": 0.95, "epochs": 1.0}

    def resolved(self, name: str):
        """A field's value, else the algorithm's override, else the shared default."""
        v = getattr(self, name)
        if v is not None:
            return v
        alg = self.algo()
        if name in alg.overrides:
            return alg.overrides[name]
        if name == "ref_mode":
            return alg.ref_mode
        if name == "rule":
            return alg.rule
        if name == "judge":
            return f"task:{self.task}"
        if name == "missing_eos_penalty":
            return 1.0 if alg.shape == "per_step" else 0.0
        return self._DEFAULTS[name]

    def resolved_loss(self) -> str:
        return self.loss or self.algo().loss

    def loss_hyperparameters(self) -> dict[str, Any]:
        params = dict(self.loss_params) if self.loss else {**self.algo().loss_params, **self.loss_params}
        if self.beta is not None:
            params["beta"] = self.beta
        return params

    def summary(self) -> dict[str, Any]:
        """Every setting the run uses, resolved (written to the run folder)."""
        out = self.model_dump(mode="json")
        for name in ("k", "temperature", "top_p", "epochs", "ref_mode", "rule", "judge", "missing_eos_penalty"):
            out[name] = self.resolved(name)
        out["loss"] = self.resolved_loss()
        out["loss_params"] = self.loss_hyperparameters()
        return out

    @property
    def output_dir(self) -> Path:
        if self.output is None:
            raise ValueError("output is unset")
        return Path(self.output)

    @classmethod
    def quick(cls, **overrides: Any) -> OnlineConfig:
        """Seconds on a tiny random model: every phase of every iteration, for tests (improves nothing)."""
        base = dict(
            model="tiny", iterations=2, prompts_per_iteration=4, heldout_prompts=3, heldout_samples=1,
            max_new_tokens=6, gen_batch_size=16, batch_size=2, learning_rate=1e-3, max_length=96,
            max_prompt_length=64, progress=False, plot=False, online_batch=2,
        )
        return cls(**{**base, **overrides})
