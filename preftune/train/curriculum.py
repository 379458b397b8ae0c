"""Curry-DPO from ranked or scored lists (Pattnaik et al. 2024, arXiv 2403.07230; ONLINE.md §9, LOSSES F3).

Each record with ≥ 3 responses and scores or a ranking gives its best response against every other one
(``curry_pairs``; zero-gap pairs dropped), easy → hard by rating gap; stage s holds every prompt's s-th
easiest pair (``curriculum_order``): S1 = (R1, R_K), S2 = (R1, R_{K−1}), … A prompt with fewer pairs leaves
the later stages.

- ``iterative``: one trainer run per stage from the previous stage's model, whose log-probs on the stage's
  pairs are the stage's reference, computed just before the stage (LoRA: the same adapter trains on).
  :func:`train_stages` is this loop; the online loop's Curry-DPO calls it too.
- ``sequential`` (the paper's non-iterative variant): one run over S1 ⧺ S2 ⧺ … in that order, unshuffled,
  with the initial model π_0 as the reference.

Logged per stage (``stages.jsonl`` and the console): pairs, the mean rating gap (score difference; a ranking
counts positions) and ``initial_accuracy``, the share of the stage's pairs on which the stage's initial model
gives the chosen response the higher summed log-probability. DPO's ``rewards/accuracies`` of that model
against its own reference would be 0 by construction (every implicit reward is 0 before the stage trains), so
the model's own ordering of each pair is what is measured; it should fall from S1 to S_last when the
curriculum runs easy → hard. Difficulty is the rating gap only: LOSSES F3 mentions the SFT model's log-prob
gap as an ordering the paper also studies but gives no definition to implement.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from preftune.train.config import TrainConfig
from preftune.train.trainer import TrainResult, build_runner, run_to_end, train

NEEDS = "curriculum needs lists of at least 3 responses ordered by scores or a ranking"


@dataclass
class Stage:
    """One curriculum stage: (chosen, rejected) groups and each pair's rating gap."""

    examples: list  # data.Example, or data.TokenizedExample once tokenised
    gaps: list[float]


def build_stages(records) -> list[Stage]:
    """Curry-DPO stages of (chosen, rejected) examples from records with ≥ 3 scored or ranked responses."""
    from preftune.data import preference_scores
    from preftune.data.derive import _select  # one example from chosen responses, inputs re-indexed
    from preftune.losses.listwise import curriculum_order, curry_pairs

    scores = [preference_scores(r)[0] for r in records]
    order = curriculum_order([curry_pairs(s) for s in scores])
    return [Stage([_select(records[g], [w, lo]) for g, w, lo in stage],
                  [scores[g][w] - scores[g][lo] for g, w, lo in stage]) for stage in order]


def load_ranked(path: str, cfg: TrainConfig, tokenizer, split=None, log=print) -> list:
    """Validated records for a curriculum: every bad one reported with file, line and field."""
    from preftune import data

    try:  # every problem at once: the validator's and the labelled lists (labels do not rank)
        records, issues = data.load_and_validate(
            path, objective_shape="listwise", split=split, skip_invalid=True, min_responses=3,
            tokenizer=tokenizer, max_prompt_length=cfg.max_prompt_length, chat_template=cfg.chat_template,
        )
        issues += [data.DataIssue(r.source, r.line, r.field_name("labels"),
                                  "labels do not rank the responses (give scores or a ranking)", kind="shape")
                   for r in records if data.preference_scores(r)[1] == "labels"]
        if issues and not cfg.skip_invalid:
            raise data.DataError(sorted(issues, key=lambda i: i.line))
    except data.DataError as e:
        if e.about_shape:
            e.args = (f"{e}\n{NEEDS}",)
        raise
    records = [r for r in records if data.preference_scores(r)[1] != "labels"]
    if issues:
        log(f"skipped {len(issues)} problem(s) in {path} (--skip-invalid); first: {issues[0]}")
    if not records:
        raise ValueError(f"{path}: no usable records; {NEEDS}")
    return records


def train_stages(stages: Sequence[Stage], configs: Sequence[TrainConfig], model, tokenizer, *,
                 eval_examples=None, log=print) -> tuple[list[TrainResult], list[dict]]:
    """Curry-DPO's iterative variant on tokenised stages: one trainer run per stage (``configs[s]``), each
    from the previous stage's model. That model's log-probs on the stage's pairs (and on ``eval_examples``)
    are the stage's reference, computed here before the stage: the reference is refreshed per stage. A
    LoRA model keeps training its adapter; a full fine-tune's untouched policy at the stage's start is the
    reference. Returns each stage's result and its log row (the last result's ``model`` is the final one)."""
    from preftune.model.reference import ReferenceCache

    results, rows = [], []
    for s, (stage, cfg) in enumerate(zip(stages, configs, strict=True), start=1):
        ref = _logps(model, tokenizer, stage.examples, cfg)
        eval_ref = ReferenceCache(_logps(model, tokenizer, eval_examples, cfg)) if eval_examples else None
        row = stage_row(s, stage, ref)
        log(_describe(row))
        result = train(cfg, train_examples=stage.examples, eval_examples=eval_examples, tokenizer=tokenizer,
                       model=model, ref_cache=ReferenceCache(ref), eval_ref_cache=eval_ref)
        model = result.model
        results.append(result)
        rows.append({**row, "steps": result.steps})
    return results, rows


def train_curriculum(cfg: TrainConfig, *, eval_examples=None, tokenizer=None, model=None, log=None) -> TrainResult:
    """``preftune train`` with ``curriculum`` on: stages from ``cfg.data``, then the iterative or the
    sequential run; ``output/stages.jsonl`` and the final model in ``output/model``."""
    from preftune.model.reference import ReferenceCache
    from preftune.train import data_prep

    main = os.environ.get("RANK", "0") == "0"
    log = log or (print if main else (lambda *a, **k: None))
    if cfg.data is None:
        raise ValueError("no training data: pass --data PATH (or data: in the config)")
    if tokenizer is None:
        from preftune.model import load_tokenizer

        tokenizer = load_tokenizer(cfg.model)
    records = load_ranked(cfg.data, cfg, tokenizer, split=cfg.split, log=log)
    if eval_examples is None and cfg.eval_data is not None:
        eval_examples = data_prep.load_examples(cfg.eval_data, cfg.objective(), cfg, tokenizer, log=log)
    elif eval_examples is None and cfg.eval_fraction > 0:  # held-out prompts: all their pairs evaluate
        idx = list(range(len(records)))
        random.Random(cfg.seed).shuffle(idx)
        held = set(idx[: max(1, int(round(cfg.eval_fraction * len(idx))))])
        eval_examples = [e for st in build_stages([records[i] for i in sorted(held)]) for e in st.examples]
        records = [r for i, r in enumerate(records) if i not in held]
    stages = [Stage(data_prep.tokenize_all(st.examples, tokenizer, cfg, f"stage_{s}", log).examples, st.gaps)
              for s, st in enumerate(build_stages(records), start=1)]
    evals = data_prep.tokenize_all(eval_examples, tokenizer, cfg, "eval", log).examples if eval_examples else None
    if model is None:
        from preftune.model import load_model

        model, _ = load_model(cfg.model, dtype="float32", attn_implementation=cfg.attn_implementation)
    if torch.cuda.is_available():  # the references are computed where the model trains
        model.to(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    out = cfg.output_dir
    plain = {"curriculum": "off", "eval_data": None, "eval_fraction": 0.0}

    if cfg.curriculum == "iterative":
        if main:
            _write(out / "train_config.json", json.dumps(cfg.model_dump(mode="json"), indent=1))
        configs = [cfg.model_copy(update={**plain, "output": str(out / f"stage_{s}"), "save_model": False})
                   for s in range(1, len(stages) + 1)]
        results, rows = train_stages(stages, configs, model, tokenizer, eval_examples=evals, log=log)
        model = results[-1].model
        metrics = [{"stage": r["stage"], **m} for r, res in zip(rows, results, strict=True) for m in res.metrics]
        steps, model_dir = sum(r.steps for r in results), None
        if cfg.save_model:
            model_dir = out / "model"
            if main:
                from preftune.model import save_final

                save_final(model, tokenizer, model_dir, merge_lora=cfg.merge_lora, overwrite=True)
    else:  # sequential: one run, stage order kept, reference π_0 (also every stage's initial model here)
        examples = [e for st in stages for e in st.examples]
        ref = _logps(model, tokenizer, examples, cfg)
        rows, start = [], 0
        per_step = cfg.batch_size * cfg.grad_accum * int(os.environ.get("WORLD_SIZE", 1))
        for s, st in enumerate(stages, start=1):
            end = start + len(st.examples)
            rows.append({**stage_row(s, st, ref[start:end]), "first_step": start // per_step + 1,
                         "last_step": -(-end // per_step)})  # of the first epoch; later epochs repeat it
            log(_describe(rows[-1]))
            start = end
        run_cfg = cfg.model_copy(update={"shuffle": False, "eval_data": None, "eval_fraction": 0.0})
        eval_ref = ReferenceCache(_logps(model, tokenizer, evals, cfg)) if evals else None
        result = run_to_end(build_runner(run_cfg, train_examples=examples, eval_examples=evals, tokenizer=tokenizer,
                                         model=model, ref_cache=ReferenceCache(ref), eval_ref_cache=eval_ref))
        model, metrics, steps, model_dir = result.model, result.metrics, result.steps, result.model_dir
    if main:
        _write(out / "stages.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return TrainResult(out, model_dir, steps, metrics, model)


def stage_row(s: int, stage: Stage, ref_logps) -> dict:
    """The stage's log row; ``ref_logps``: the stage's initial model's per-token log-probs of its pairs."""
    sums = [[float(t.sum()) for t in per] for per in ref_logps]
    n = len(stage.examples)
    return {"stage": s, "pairs": n, "rating_gap_mean": sum(stage.gaps) / n if n else None,
            "initial_accuracy": sum(c > r for c, r in sums) / n if n else None}


def _describe(row: dict) -> str:
    return (f"[curriculum] stage {row['stage']}: {row['pairs']} pairs, mean rating gap "
            f"{row['rating_gap_mean']:.4g}, initial accuracy {row['initial_accuracy']:.3f}")


def _logps(model, tokenizer, examples, cfg: TrainConfig) -> list[list[torch.Tensor]]:
    """Per-token log-probs of each example's responses under ``model`` as it is now (adapters on)."""
    from preftune.model.scoring import response_token_logps

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
        return response_token_logps(model, [e.prompt_ids for e in examples], [e.response_ids for e in examples],
                                    pad, batch_size=cfg.batch_size, chunk_size=cfg.logits_chunk)


def _write(path: Path, text: str) -> None:
    """Through a temporary file and a rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
