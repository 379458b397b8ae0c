"""Base-model held-out success of every built-in task, decoded as the online loop's evaluation decodes.

    OMP_NUM_THREADS=1 python benchmarks/task_baselines.py --threads 1 --out runs/task_baselines   # docs/tasks.md
    OMP_NUM_THREADS=1 python benchmarks/task_baselines.py --tasks keyword json_object --samples 4

For each task: the held-out prompts the online loop evaluates (``random.Random(seed + 1).sample`` of the
task's held-out prompts, ``--prompts`` of them), ``--samples`` answers each at the loop's held-out decoding
(``eval_temperature`` / ``eval_top_p`` of ``OnlineConfig``, sampling seed ``seed + 1``) and one greedy answer,
all at the task's answer length (``MAX_NEW_TOKENS`` below), judged by the task's judge. Reported: success
with its Wilson 95% interval (sampled and greedy), the mean judge score, the EOS rate, the failure reasons
and the success per held-out topic. Writes ``OUT.json`` (every figure) and ``OUT.md`` (the docs/tasks.md
tables), and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from collections import Counter
from pathlib import Path

from machine import cpu_name  # benchmarks/machine.py (scripts run from this folder)

# The answer length each task is run with (the online recipes' and docs/online.md's settings): word_limit
# asks for short answers (OnlineConfig's default 32); a two-sentence, keyword or JSON answer needs about 48;
# a worked arithmetic answer 64 (configs/online/mcts_dpo.yaml).
MAX_NEW_TOKENS = {"word_limit": 32, "two_sentences": 48, "arithmetic": 64, "keyword": 48, "json_object": 48}
JUDGE_KIND = {
    "word_limit": "length constraint",
    "two_sentences": "format (prose)",
    "arithmetic": "verifiable answer, step-checkable",
    "keyword": "required content",
    "json_object": "format (structured)",
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=None, help="task names (default: every built-in task)")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=64, help="held-out prompts per task (the loop's heldout_prompts)")
    ap.add_argument("--samples", type=int, default=4, help="sampled answers per prompt")
    ap.add_argument("--seed", type=int, default=0, help="the run seed: prompts and samples use seed + 1, as the loop")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="override every task's answer length")
    ap.add_argument("--out", default="runs/task_baselines", help="writes OUT.json and OUT.md")
    return ap.parse_args(argv)


def rate_text(r: dict) -> str:
    return f"{100 * r['value']:.1f}% [{100 * r['low']:.1f}, {100 * r['high']:.1f}]"


def measure(task, model, tok, args, cfg) -> dict:
    from preftune.eval.policy_eval import wilson
    from preftune.online.generate import generate

    held = task.heldout_prompts()
    prompts = random.Random(args.seed + 1).sample(held, min(args.prompts, len(held)))
    mnt = args.max_new_tokens or MAX_NEW_TOKENS.get(task.name, cfg.max_new_tokens)
    common = dict(max_new_tokens=mnt, seed=args.seed + 1, batch_size=cfg.gen_batch_size, engine=cfg.sampling_engine)
    t0 = time.perf_counter()
    sampled = generate(model, tok, prompts, n=args.samples, temperature=cfg.eval_temperature, top_p=cfg.eval_top_p,
                       **common)
    greedy = generate(model, tok, prompts, n=1, temperature=0.0, top_p=1.0, **common)
    seconds = time.perf_counter() - t0

    def judged(gens):
        return [(p, s, task.judge(p, s.text, s.finished)) for p, row in zip(gens.prompts, gens.samples, strict=True)
                for s in row]

    def rate(rows) -> dict:
        r = wilson(sum(j.success for _, _, j in rows), len(rows))
        return {"value": r.value, "low": r.low, "high": r.high, "n": r.n, "successes": sum(j.success for *_, j in rows)}

    js, gj = judged(sampled), judged(greedy)
    topics: dict[str, list] = {}
    for p, _, j in js:
        topics.setdefault(task.topic_of(p) or "?", []).append(j.success)
    return {
        "task": task.name,
        "judge_kind": JUDGE_KIND.get(task.name, "?"),
        "description": task.description,
        "max_new_tokens": mnt,
        "prompts": len(prompts),
        "samples": args.samples,
        "success": rate(js),
        "greedy": rate(gj),
        "mean_score": sum(j.score for *_, j in js) / len(js),
        "eos_rate": sum(s.finished for _, s, _ in js) / len(js),
        "failures": dict(Counter(j.details.get("reason", "?") for *_, j in js if not j.success).most_common()),
        "per_topic": {t: {"successes": sum(v), "n": len(v)} for t, v in sorted(topics.items())},
        "seconds": seconds,
        "examples": [{"prompt": p[-1]["content"], "response": s.text, "finished": s.finished, "score": j.score,
                      "reason": j.details.get("reason")} for p, s, j in js[: 4 * args.samples]],
    }


def markdown(results: list[dict], meta: dict) -> str:
    lines = [
        f"Base model `{meta['model']}`, {meta['prompts']} held-out prompts per task, {meta['samples']} samples "
        f"each at temperature {meta['eval_temperature']} / top-p {meta['eval_top_p']} (seed {meta['seed'] + 1}) "
        f"and one greedy answer; float32, {meta['threads']} thread(s), {meta['machine']}.",
        "",
        "| task | judge kind | new tokens | base success [Wilson 95%] | greedy success | mean score | EOS rate |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| `{r['task']}` | {r['judge_kind']} | {r['max_new_tokens']} | {rate_text(r['success'])} "
                     f"({r['success']['successes']}/{r['success']['n']}) | {rate_text(r['greedy'])} "
                     f"({r['greedy']['successes']}/{r['greedy']['n']}) | {r['mean_score']:.3f} | {r['eos_rate']:.2f} |")
    lines += ["", "Failure reasons of the sampled answers (count):", ""]
    for r in results:
        lines.append(f"- `{r['task']}`: " + ", ".join(f"{k} {v}" for k, v in r["failures"].items()))
    lines += ["", "Sampled success per held-out topic (successes / answers):", ""]
    for r in results:
        cells = ", ".join(f"{t.strip()} {v['successes']}/{v['n']}" for t, v in r["per_topic"].items())
        lines.append(f"- `{r['task']}`: {cells}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    from preftune.model import load_model
    from preftune.online.config import OnlineConfig
    from preftune.tasks import all_tasks, get_task

    torch.set_num_threads(args.threads)
    cfg = OnlineConfig()  # the loop's held-out decoding and sampler settings
    tasks = [get_task(n) for n in args.tasks] if args.tasks else all_tasks()
    model, tok = load_model(args.model)
    model.eval()
    results = []
    for task in tasks:
        r = measure(task, model, tok, args, cfg)
        print(f"{task.name}: {rate_text(r['success'])}, greedy {rate_text(r['greedy'])} ({r['seconds']:.0f} s)",
              flush=True)
        results.append(r)
    meta = {"model": args.model, "prompts": args.prompts, "samples": args.samples, "seed": args.seed,
            "threads": args.threads, "eval_temperature": cfg.eval_temperature, "eval_top_p": cfg.eval_top_p,
            "engine": cfg.sampling_engine, "gen_batch_size": cfg.gen_batch_size,
            "machine": cpu_name(), "torch": torch.__version__}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    md = markdown(results, meta)
    for path, text in ((out.with_suffix(".json"), json.dumps({"meta": meta, "tasks": results}, indent=1)),
                       (out.with_suffix(".md"), md)):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    print(md)


if __name__ == "__main__":
    main()
