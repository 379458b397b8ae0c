"""`preftune demo`: on-policy DPO with LoRA on a task with a programmatic judge, before vs after.

Phases, top to bottom: load → held-out samples of the base model → K samples per training prompt →
judge and build best-vs-worst pairs → DPO with LoRA (the trainer) → held-out samples of the trained
policy (same seed) → KL to the base → report. Every figure in the report is computed from the
samples written next to it (``heldout_samples.jsonl``, ``pairs.jsonl``).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class DemoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(
        "smollm2-135m-instruct",
        description="model to improve (any load_model spec), or 'tiny' (random, for tests)",
    )
    task: str = Field("word_limit", description="built-in task (preftune.tasks)")
    output: str | None = Field(None, description="run folder (default runs/demo-<timestamp>)")
    seed: int = Field(0, description="seed of prompt choice, sampling and training")
    threads: int | None = Field(None, gt=0, description="torch CPU threads (default: torch's choice)")
    # --- sampling
    train_prompts: int = Field(
        64, gt=0, description="training prompts sampled from the task's training split"
    )
    k: int = Field(4, ge=2, description="responses sampled per training prompt")
    heldout_prompts: int = Field(64, gt=0, description="held-out prompts (unseen topics) for before/after")
    heldout_samples: int = Field(2, gt=0, description="responses per held-out prompt, before and after")
    temperature: float = Field(0.8, gt=0, description="sampling temperature (all phases)")
    top_p: float = Field(0.95, gt=0, le=1, description="nucleus sampling")
    max_new_tokens: int = Field(32, gt=0, description="longest response; a cut response fails the judge")
    gen_batch_size: int = Field(48, gt=0, description="sequences per generate call")
    tie_break: Literal["skip", "any"] = Field(
        "skip",
        description="prompts whose K samples all got the same score: skip them, or still pair the "
        "shortest vs the longest (any: only to exercise training on a model that never succeeds)",
    )
    # --- training
    loss: str = Field("dpo", description="objective (any paired objective of `preftune losses`)")
    beta: float = Field(0.1, gt=0, description="the objective's beta")
    learning_rate: float = Field(3e-4, gt=0, description="peak learning rate of the LoRA adapters")
    epochs: float = Field(1.0, gt=0, description="passes over the pairs (more over-optimises: see report)")
    batch_size: int = Field(4, gt=0, description="pairs per optimizer step")
    lora_r: int = Field(16, gt=0, description="LoRA rank")
    lora_alpha: float = Field(32, gt=0, description="LoRA alpha")
    max_length: int = Field(192, gt=1, description="prompt + response tokens in training")
    max_prompt_length: int = Field(128, gt=0, description="prompt tokens in training")
    kl_batch_size: int = Field(8, gt=0, description="prompts per forward of the KL estimate")
    progress: bool = Field(True, description="progress bars")
    plot: bool = Field(True, description="write plots")

    @classmethod
    def quick(cls, **overrides: Any) -> DemoConfig:
        """Seconds, on a tiny random model: exercises every phase and the report (improves nothing)."""
        base = dict(
            model="tiny",
            train_prompts=6,
            k=2,
            heldout_prompts=4,
            heldout_samples=2,
            max_new_tokens=8,
            gen_batch_size=8,
            tie_break="any",
            epochs=1,
            batch_size=2,
            learning_rate=1e-3,
            max_length=128,
            max_prompt_length=96,
        )
        return cls(**{**base, **overrides})


@dataclass
class DemoResult:
    output_dir: Path
    report: Path
    before: Any  # eval.PolicyEval
    after: Any
    pairs: int
    timings: dict[str, float] = field(default_factory=dict)


class _Timer:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    def phase(self, name: str, log):
        timer = self

        class _Ctx:
            def __enter__(self):
                log(f"[demo] {name} …")
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                dt = time.perf_counter() - self.t0
                timer.timings[name] = dt
                if exc[0] is None:
                    log(f"[demo] {name}: {dt:.1f}s")
                return False

        return _Ctx()


def run_demo(config: DemoConfig | None = None, log=print) -> DemoResult:
    import torch

    from preftune.eval.policy_eval import evaluate_generations, judge_generations, kl_estimate

    cfg = config or DemoConfig()
    from preftune.tasks import get_task

    task = get_task(cfg.task)
    out = Path(cfg.output or f"runs/demo-{datetime.now():%Y%m%d-%H%M%S}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=1))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    timer = _Timer()
    t_start = time.perf_counter()

    with timer.phase("load model", log):
        model, tokenizer = _load(cfg)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rng = random.Random(cfg.seed)
    train_prompts = rng.sample(task.train_prompts(), min(cfg.train_prompts, len(task.train_prompts())))
    heldout = random.Random(cfg.seed + 1).sample(
        task.heldout_prompts(), min(cfg.heldout_prompts, len(task.heldout_prompts()))
    )

    with timer.phase("sample held-out (base)", log):
        before_gen = _sample(
            cfg, model, tokenizer, heldout, cfg.heldout_samples, cfg.seed + 1000, "held-out, base"
        )
    before_j = judge_generations(task, before_gen)
    before = evaluate_generations(task, before_gen, before_j)
    log(f"[demo] base on held-out: success {before.success}, {before.words.value:.1f} words")

    with timer.phase("sample training prompts", log):
        train_gen = _sample(cfg, model, tokenizer, train_prompts, cfg.k, cfg.seed, "training prompts")
    with timer.phase("judge and build pairs", log):
        train_j = judge_generations(task, train_gen)
        examples, pair_rows = build_pairs(train_gen, train_j, cfg.tie_break)
        _write_jsonl(out / "pairs.jsonl", pair_rows)
    train_eval = evaluate_generations(task, train_gen, train_j)
    log(
        f"[demo] base on training prompts: success {train_eval.success}; {len(examples)} pairs "
        f"from {len(train_prompts)} prompts"
    )
    if not examples:
        raise RuntimeError(
            "no pairs: every prompt's samples got the same score (raise k or the temperature, "
            "or set tie_break=any)"
        )

    with timer.phase("train", log):
        train_result = _train(cfg, model, tokenizer, examples, out / "train")

    with timer.phase("sample held-out (trained)", log):
        after_gen = _sample(
            cfg, model, tokenizer, heldout, cfg.heldout_samples, cfg.seed + 1000, "held-out, trained"
        )
    after_j = judge_generations(task, after_gen)
    after = evaluate_generations(task, after_gen, after_j)
    with timer.phase("KL estimate", log):
        after.kl = kl_estimate(model, after_gen, pad_id, batch_size=cfg.kl_batch_size)
    before.kl = None  # the base against itself: 0 by definition
    timer.timings["total"] = time.perf_counter() - t_start

    _write_jsonl(
        out / "heldout_samples.jsonl",
        _sample_rows(before_gen, before_j, "base") + _sample_rows(after_gen, after_j, "trained"),
    )
    results = {
        "before": before.as_dict(),
        "after": after.as_dict(),
        "train_prompts_base": train_eval.as_dict(),
        "pairs": len(examples),
        "timings_s": timer.timings,
        "train_steps": train_result.steps,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plots = _plots(out, before_gen, after_gen, before, after) if cfg.plot else []
    report = _write_report(
        out,
        cfg,
        task,
        timer.timings,
        before,
        after,
        train_eval,
        examples,
        pair_rows,
        heldout,
        before_gen,
        before_j,
        after_gen,
        after_j,
        train_result,
        plots,
    )
    log(_summary(before, after, len(examples), timer.timings["total"], report))
    return DemoResult(out, report, before, after, len(examples), timer.timings)


# ---------------------------------------------------------------------------------------------- phases


def _load(cfg: DemoConfig):
    if cfg.model == "tiny":
        from preftune.model.tiny import tiny_model, tiny_tokenizer

        model, tok = tiny_model(seed=cfg.seed), tiny_tokenizer()
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
        return model, tok
    from preftune.model import load_model

    return load_model(cfg.model, dtype="float32")


def _sample(cfg: DemoConfig, model, tokenizer, prompts, n: int, seed: int, desc: str):
    from tqdm.auto import tqdm

    from preftune.online.generate import generate

    with tqdm(
        total=len(prompts) * n,
        desc=f"sample ({desc})",
        unit="seq",
        disable=not cfg.progress,
        dynamic_ncols=True,
    ) as bar:
        return generate(
            model,
            tokenizer,
            prompts,
            n=n,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            max_new_tokens=cfg.max_new_tokens,
            seed=seed,
            batch_size=cfg.gen_batch_size,
            progress=bar.update,
        )


def build_pairs(generations, judgements, tie_break: str = "skip"):
    """Best-vs-worst pair per prompt (``data.Example``: responses[0] chosen, [1] rejected).

    Best = highest score, worst = lowest; among equal scores the shorter response counts as better
    (then the shorter text, then the sample index: the choice is deterministic). Prompts whose samples
    all got the same score are skipped, unless ``tie_break="any"`` (then shortest vs longest, if the
    texts differ).
    """
    from preftune.data import Example

    examples, rows = [], []
    for i, (prompt, samples, judged) in enumerate(
        zip(generations.prompts, generations.samples, judgements, strict=True)
    ):
        ranked = sorted(
            range(len(samples)),
            key=lambda k: (-judged[k].score, samples[k].num_tokens, len(samples[k].text), k),
        )
        best, worst = ranked[0], ranked[-1]
        if judged[best].score == judged[worst].score:
            if tie_break != "any" or samples[best].text == samples[worst].text:
                continue
        chosen, rejected = samples[best].text, samples[worst].text
        examples.append(
            Example(
                prompt=prompt,
                responses=[
                    [{"role": "assistant", "content": chosen}],
                    [{"role": "assistant", "content": rejected}],
                ],
                source="demo:on-policy",
                line=i + 1,
            )
        )
        rows.append(
            {
                "prompt": prompt,
                "chosen": chosen,
                "rejected": rejected,
                "chosen_score": judged[best].score,
                "rejected_score": judged[worst].score,
                "chosen_success": judged[best].success,
                "scores": [j.score for j in judged],
            }
        )
    return examples, rows


def _train(cfg: DemoConfig, model, tokenizer, examples, out: Path):
    from preftune.train.config import TrainConfig
    from preftune.train.trainer import train

    tcfg = TrainConfig(
        model=cfg.model if cfg.model != "tiny" else "tiny (preftune.testing)",
        output=str(out),
        loss=cfg.loss,
        beta=cfg.beta,
        lora=True,
        lora_r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        learning_rate=cfg.learning_rate,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        max_length=cfg.max_length,
        max_prompt_length=cfg.max_prompt_length,
        seed=cfg.seed,
        ref_cache_dir=str(out / "ref_cache"),
        progress=cfg.progress,
        plot=cfg.plot,
        save_model=True,
        warmup_ratio=0.1,
        scheduler="linear",
    )
    return train(tcfg, train_examples=examples, tokenizer=tokenizer, model=model)


# ---------------------------------------------------------------------------------------------- outputs


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _sample_rows(gen, judgements, policy: str) -> list[dict]:
    return [
        {
            "policy": policy,
            "prompt": p,
            "k": k,
            "response": s.text,
            "tokens": s.num_tokens,
            "finished": s.finished,
            "score": j.score,
            "success": j.success,
            **j.details,
        }
        for p, row, jrow in zip(gen.prompts, gen.samples, judgements, strict=True)
        for k, (s, j) in enumerate(zip(row, jrow, strict=True))
    ]


def _plots(out: Path, before_gen, after_gen, before, after) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from preftune.eval.policy_eval import word_count

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    names, rates = ["base", "trained"], [before.success, after.success]
    vals = [100 * r.value for r in rates]
    err = [[100 * (r.value - r.low) for r in rates], [100 * (r.high - r.value) for r in rates]]
    ax1.bar(names, vals, yerr=err, capsize=6, color=["#999999", "#2a7ab0"])
    for x, v in enumerate(vals):
        ax1.text(x, v + 2, f"{v:.0f}%", ha="center")
    ax1.set_ylim(0, 105)
    ax1.set_ylabel("held-out success rate (%)")
    ax1.set_title("success (95% Wilson interval)")
    wb = [word_count(s.text) for row in before_gen.samples for s in row]
    wa = [word_count(s.text) for row in after_gen.samples for s in row]
    bins = range(0, max(wb + wa + [1]) + 3, 2)
    ax2.hist(wb, bins=bins, alpha=0.6, label="base", color="#999999")
    ax2.hist(wa, bins=bins, alpha=0.6, label="trained", color="#2a7ab0")
    ax2.set_xlabel("response length (words)")
    ax2.set_ylabel("responses")
    ax2.set_title("held-out response lengths")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(out / "before_after.png", dpi=110)
    plt.close(fig)
    return ["before_after.png"]


def _fmt_rate(r) -> str:
    return f"{100 * r.value:.1f}% [{100 * r.low:.1f}–{100 * r.high:.1f}]"


def _write_report(
    out,
    cfg,
    task,
    timings,
    before,
    after,
    train_eval,
    examples,
    pair_rows,
    heldout,
    before_gen,
    before_j,
    after_gen,
    after_j,
    train_result,
    plots,
) -> Path:
    n_ho = len(heldout) * cfg.heldout_samples
    kl = after.kl
    lines = [
        f"# preftune demo: {task.name}",
        "",
        f"{task.description} Model `{cfg.model}`; on-policy {cfg.loss.upper()} with LoRA; "
        f"{len(heldout)} held-out prompts on topics never seen in training × {cfg.heldout_samples} samples.",
        "",
        "## Results (held-out)",
        "",
        "| | base | trained |",
        "|---|---|---|",
        f"| success rate (95% CI) | {_fmt_rate(before.success)} | {_fmt_rate(after.success)} |",
        _row("mean judge score", before.score, after.score, 3),
        _row("mean length (words)", before.words, after.words, 1),
        _row("mean length (tokens)", before.tokens, after.tokens, 1),
        f"| ended with EOS | {_fmt_rate(before.finished)} | {_fmt_rate(after.finished)} |",
        f"| KL to base (nats/response) | 0 (by definition) | {kl.value:.3f} ± {kl.se:.3f} |",
        "",
    ]
    for p in plots:
        lines += [f"![{p}]({p})", ""]
    if (out / "train" / "training_curves.png").exists():
        lines += ["![training curves](train/training_curves.png)", ""]
    lines += [
        "## Timings",
        "",
        "| phase | seconds |",
        "|---|---|",
        *[f"| {k} | {v:.1f} |" for k, v in timings.items()],
        "",
        "## On-policy data",
        "",
        f"- {len(pair_rows)} best-vs-worst pairs from {cfg.train_prompts} training prompts × "
        f"{cfg.k} samples (prompts whose samples all scored the same: "
        f"{'skipped' if cfg.tie_break == 'skip' else 'still paired, shortest vs longest'}).",
        f"- base success on the training prompts: {_fmt_rate(train_eval.success)}; "
        f"chosen response succeeded in {sum(r['chosen_success'] for r in pair_rows)} of "
        f"{len(pair_rows)} pairs.",
        f"- training: {train_result.steps} optimizer steps, β={cfg.beta}, lr={cfg.learning_rate}, "
        f"{cfg.epochs} epochs, batch {cfg.batch_size}, LoRA r={cfg.lora_r} α={cfg.lora_alpha}; "
        f"metrics in `train/metrics.jsonl`.",
        "",
        "## Examples (same held-out prompt, sample 0)",
        "",
    ]
    for i in range(min(4, len(heldout))):
        q = (
            before_gen.prompts[i][-1]["content"]
            if isinstance(before_gen.prompts[i], list)
            else before_gen.prompts[i]
        )
        b, a = before_gen.samples[i][0], after_gen.samples[i][0]
        lines += [
            f"**Prompt:** {q}",
            "",
            f"- base ({_verdict(before_j[i][0])}): {_quote(b.text)}",
            f"- trained ({_verdict(after_j[i][0])}): {_quote(a.text)}",
            "",
        ]
    lines += [
        "## Where the figures come from",
        "",
        f"- Held-out prompts: {len(heldout)} of the task's held-out split (topics disjoint from training), "
        f"{n_ho} samples per policy at temperature {cfg.temperature}, top-p {cfg.top_p}, at most "
        f"{cfg.max_new_tokens} new tokens, the same seed before and after. Every sample with its judgement: "
        "`heldout_samples.jsonl`; the pairs trained on: `pairs.jsonl`; all numbers: `results.json`.",
        "- Success rate: share of samples the judge accepts; interval: Wilson score, 95%.",
        "- Lengths: mean ± standard error over samples; words as the judge counts them, tokens as "
        "generated "
        "(EOS included).",
        "- KL: mean over the trained policy's held-out samples of log π_θ(y|x) − log π_ref(y|x), both "
        "from the log-prob engine on the sampled token ids, the reference being the same model with the "
        "LoRA adapter "
        "off; ± standard error.",
        "",
        "## Settings",
        "",
        "```json",
        json.dumps(cfg.model_dump(mode="json"), indent=1),
        "```",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _row(name: str, b, a, digits: int) -> str:
    return f"| {name} | {b.value:.{digits}f} ± {b.se:.{digits}f} | {a.value:.{digits}f} ± {a.se:.{digits}f} |"


def _verdict(j) -> str:
    d = j.details
    words = f"{d['words']} words" if "words" in d else ""
    return ("✓ " if j.success else "✗ ") + ", ".join(x for x in (words, d.get("reason", "")) if x)


def _quote(text: str, limit: int = 300) -> str:
    t = " ".join(text.split())
    return "“" + (t if len(t) <= limit else t[:limit] + "…") + "”"


def _summary(before, after, pairs, total, report) -> str:
    kl = after.kl
    return "\n".join(
        [
            "",
            f"held-out success: {_fmt_rate(before.success)} → {_fmt_rate(after.success)}",
            f"mean length:      {before.words.value:.1f} → {after.words.value:.1f} words "
            f"({before.tokens.value:.1f} → {after.tokens.value:.1f} tokens)",
            f"KL to base:       {kl.value:.3f} ± {kl.se:.3f} nats/response",
            f"pairs: {pairs}; total {total / 60:.1f} min; report: {report}",
        ]
    )
