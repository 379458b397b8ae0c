"""Online DPO (OAIF, ONLINE.md §2): fresh samples for every optimizer step.

An iteration is a logging unit of ``prompts_per_iteration`` prompts taken ``online_batch`` at a time:
for each batch, 2 samples per prompt from the current policy, the judge picks (ties dropped, not given
to the first completion as TRL's ≥ does), and one optimizer step of the objective against the fixed
reference π_0. One trainer (optimizer and schedule) serves the whole iteration. TRL's
``OnlineDPOTrainer`` metric names are logged, computed on the trained pairs:
``objective/kl`` (mean of ℓ_θ − ℓ_ref over chosen and rejected), ``objective/entropy`` (mean of −ℓ_θ),
``objective/non_score_reward`` (−β·KL), ``objective/rlhf_reward`` (score + non_score_reward),
``objective/scores``, ``objective/scores_margin``, ``val/contain_eos_token``, ``beta``.
"""

from __future__ import annotations

import math
import time

from preftune.online import store


def run_per_step(run, it, t: int) -> None:
    from preftune.model.reference import ReferenceCache
    from preftune.online.build import build_pairs
    from preftune.online.generate import generations_to_rows
    from preftune.train.trainer import build_runner

    cfg = run.cfg
    prompts = run.prompts_for(t)
    B = cfg.online_batch
    batches = [prompts[s : s + B] for s in range(0, len(prompts), B)]
    beta = float(cfg.loss_hyperparameters().get("beta", 0.1))
    runner = None
    samples_rows, judge_rows, pair_rows, history = [], [], [], []
    t0 = time.perf_counter()
    gen_secs = 0.0
    for step, batch in enumerate(batches):
        g0 = time.perf_counter()
        gens = run.sample(batch, run.k, cfg.seed + 1000 * t + step, cfg.resolved("temperature"),
                          cfg.resolved("top_p"), f"iteration {t} step {step + 1}/{len(batches)}")
        gen_secs += time.perf_counter() - g0
        judged = [run.judge.judge_prompt(p, [s.text for s in row], [s.finished for s in row], False)
                  for p, row in zip(gens.prompts, gens.samples, strict=True)]
        rows = []
        for i, j in enumerate(judged):
            for p in build_pairs("max_min", j.scores, lengths=[s.num_tokens for s in gens.samples[i]]):
                rows.append({"prompt": i, "w": p.w, "l": p.l, "margin": p.margin, "step": step})
        samples_rows += [{**r, "step": step} for r in generations_to_rows(gens)]
        judge_rows += [{"scores": j.scores, "details": j.details, "step": step} for j in judged]
        pair_rows += rows
        flat_scores = [s for j in judged for s in j.scores]
        eos = sum(s.finished for row in gens.samples for s in row) / max(1, sum(len(r) for r in gens.samples))
        if not rows:
            history.append({"step": step + 1, "skipped": 1.0, "objective/scores": _mean(flat_scores),
                            "val/contain_eos_token": eos})
            continue
        examples = run.examples(gens, rows)
        ref = ReferenceCache(run.policy.token_logps([e.prompt_ids for e in examples],
                                                    [e.response_ids for e in examples], "init"))
        if runner is None:
            tcfg = run.train_config(it.path / "train", t, steps_override=len(batches))
            runner = build_runner(tcfg, train_examples=examples, tokenizer=run.policy.tokenizer,
                                  model=run.policy.model, ref_cache=ref)
        metrics = runner.step_on(examples, ref)
        kl = (metrics.get("rewards/chosen", 0.0) + metrics.get("rewards/rejected", 0.0)) / (2 * beta)
        entropy = -(metrics.get("logps/chosen", 0.0) + metrics.get("logps/rejected", 0.0)) / 2
        scores = _mean(flat_scores)
        metrics.update({
            "objective/kl": kl, "objective/entropy": entropy, "objective/non_score_reward": -beta * kl,
            "objective/rlhf_reward": scores - beta * kl, "objective/scores": scores,
            "objective/scores_margin": _mean([r["margin"] for r in rows]), "val/contain_eos_token": eos,
            "beta": beta, "pairs": float(len(rows)),
        })
        history.append({"step": step + 1, **metrics})
    store.write_jsonl(it.file("samples.jsonl"), samples_rows)
    store.write_jsonl(it.file("judgements.jsonl"), judge_rows)
    store.write_jsonl(it.file("train_input.jsonl"), pair_rows)
    store.write_jsonl(it.file("steps.jsonl"), history)
    tokens = [len(s["token_ids"]) for r in samples_rows for s in r["samples"]]
    it.finish("sample", {"prompts": len(prompts), "gen_tokens": sum(tokens), "gen_seconds": gen_secs,
                         "eos_rate": _mean([s["finished"] for r in samples_rows for s in r["samples"]]),
                         "len_mean": _mean(tokens)})
    it.finish("judge", {"judge_calls": sum(len(r["scores"]) for r in judge_rows),
                        "score_mean": _mean([s for r in judge_rows for s in r["scores"]])})
    it.finish("build", {"pairs": len(pair_rows), "margin_mean": _mean([r["margin"] for r in pair_rows]),
                        "ties_dropped": len(prompts) - len(pair_rows)})
    trained = [h for h in history if "loss" in h]
    means = {}
    for k in (trained[-1] if trained else {}):
        vals = [h[k] for h in trained if isinstance(h.get(k), float) and math.isfinite(h[k])]
        if vals and k != "step":
            means[k] = sum(vals) / len(vals)
    run.policy.save_state(it.file("policy.safetensors"))
    it.finish("train", {"steps": len(trained), "train_seconds": time.perf_counter() - t0 - gen_secs, **means})


def _mean(xs) -> float:
    xs = [float(x) for x in xs]
    return sum(xs) / len(xs) if xs else float("nan")
