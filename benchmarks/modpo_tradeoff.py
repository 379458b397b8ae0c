"""MODPO's trade-off between two programmatic objectives as the weights w vary (METHODS.md §M1).

    python benchmarks/modpo_tradeoff.py --out benchmarks/modpo_runs                          # the real model
    python benchmarks/modpo_tradeoff.py --out /tmp/modpo_tiny --model tiny --prompts 8 --k 4 \\
        --heldout 4 --steps 2 --weights 0.5,1.0 --max-new-tokens 12                          # a smoke run

Objective 0 is the word_limit task (its judge's score; pairs are π_0 samples, best vs worst by it), the one
MODPO trains on. Objective 1 is *detail*, min(1, words / (2·limit)): it rewards answers that say more, so it
pulls against the word limit. It enters every pair as a rule margin (METHODS.md §M1(b)(iii)), scaled by
``--margin-scale`` onto the β·ρ scale. One LoRA run from π_0 per w_0 in ``--weights`` with w = (w_0, 1 − w_0)
(the authors' recipe; w_0 = 1 is DPO), then held-out decoding of every iterate (and of π_0) scored on both
objectives. Results: ``OUT/results.json`` (one row per w_0: word_limit success and score, mean detail, mean
words) and ``OUT/tradeoff.png`` (the front: success against detail, one point per w_0).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/modpo_runs")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="policy π_0 (tiny: a random 2-layer model)")
    ap.add_argument("--prompts", type=int, default=256, help="training prompts (word_limit train split)")
    ap.add_argument("--k", type=int, default=4, help="π_0 samples per training prompt")
    ap.add_argument("--heldout", type=int, default=128, help="held-out prompts decoded per iterate")
    ap.add_argument("--weights", default="0.1,0.3,0.5,0.7,0.9,1.0", help="w_0 values; w = (w_0, 1 − w_0)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: one epoch)")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--margin-scale", type=float, default=1.0, help="detail's margin = scale · detail")
    ap.add_argument("--learning-rate", type=float, default=5e-5)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def detail(prompt, response: str, task) -> float:
    """The second objective: min(1, words / (2·limit)) — the most detail needs twice the allowed words."""
    from preftune.tasks.base import word_count

    return min(1.0, word_count(response) / (2.0 * task.constraint_of(prompt)))


def load_policy(spec: str, folder: Path):
    if spec == "tiny":  # a saved random tiny model, so the trainer loads it like any folder
        from preftune.testing import save_tiny_model

        spec = str(save_tiny_model(folder / "tiny_policy"))
    from preftune.model import load_model

    model, tok = load_model(spec)
    model.generation_config.pad_token_id = tok.pad_token_id
    return spec, model, tok


def sample(model, tok, prompts, n, args, seed):
    from preftune.online.generate import generate

    return generate(model, tok, prompts, n=n, temperature=args.temperature, top_p=0.95,
                    max_new_tokens=args.max_new_tokens, seed=seed, batch_size=64)


def evaluate(model, tok, prompts, task, args) -> dict:
    gens = sample(model, tok, prompts, 1, args, args.seed + 1)
    rows = [(p, s[0]) for p, s in zip(gens.prompts, gens.samples, strict=True)]
    judged = [task.judge(p, s.text, s.finished) for p, s in rows]
    from preftune.tasks.base import word_count

    n = len(rows)
    return {"success": sum(j.success for j in judged) / n, "word_limit_score": sum(j.score for j in judged) / n,
            "detail": sum(detail(p, s.text, task) for p, s in rows) / n,
            "words": sum(word_count(s.text) for _, s in rows) / n}


def build_pairs(gens, task, scale: float) -> list:
    """Best vs worst by the word_limit judge (ties dropped); detail as the margin column."""
    from preftune.data import Example

    out = []
    for prompt, samples in zip(gens.prompts, gens.samples, strict=True):
        s0 = [task.judge(prompt, s.text, s.finished).score for s in samples]
        w = max(range(len(s0)), key=lambda i: s0[i])
        lo = min(range(len(s0)), key=lambda i: s0[i])
        if s0[w] > s0[lo] and samples[w].text != samples[lo].text:
            m = [[scale * detail(prompt, samples[i].text, task)] for i in (w, lo)]
            out.append(Example(prompt, [samples[w].text, samples[lo].text], {"margin_rewards": m}))
    return out


def plot(rows: list[dict], base: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot([r["detail"] for r in rows], [r["success"] for r in rows], "o-")
    for r in rows:
        ax.annotate(f"w0={r['w0']:g}", (r["detail"], r["success"]), fontsize=8)
    ax.plot([base["detail"]], [base["success"]], "kx", label="π_0")
    ax.set_xlabel("detail (objective 1)")
    ax.set_ylabel("word_limit success (objective 0)")
    ax.set_title("MODPO trade-off, w = (w0, 1 − w0)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    args = parse_args(argv)
    import random

    import torch

    from preftune.tasks import get_task
    from preftune.train.config import TrainConfig
    from preftune.train.trainer import train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    task = get_task("word_limit")
    spec, model, tok = load_policy(args.model, out)
    rng = random.Random(args.seed)
    train_prompts = rng.sample(task.train_prompts(), min(args.prompts, len(task.train_prompts())))
    held = random.Random(args.seed + 1).sample(task.heldout_prompts(), min(args.heldout, len(task.heldout_prompts())))
    t0 = time.perf_counter()
    pairs = build_pairs(sample(model, tok, train_prompts, args.k, args, args.seed), task, args.margin_scale)
    base = evaluate(model, tok, held, task, args)
    print(f"π_0: {base}; {len(pairs)} pairs from {len(train_prompts)} prompts ({time.perf_counter() - t0:.0f} s)")
    if not pairs:
        raise SystemExit("no pairs (every prompt's samples tied on word_limit): raise --k or --prompts")
    rows = []
    for w0 in (float(x) for x in args.weights.split(",")):
        cfg = TrainConfig(model=spec, output=str(out / f"w0_{w0:g}"), loss="modpo", beta=args.beta,
                          loss_params={"w": [w0, round(1.0 - w0, 12)]}, lora=True, learning_rate=args.learning_rate,
                          batch_size=args.batch_size, max_steps=args.steps, warmup_ratio=0.1, max_length=512,
                          max_prompt_length=256, save_model=False, plot=False, progress=False, dynamics=False,
                          seed=args.seed, ref_cache_dir=str(out / "cache" / "ref"))
        t1 = time.perf_counter()
        result = train(cfg, train_examples=pairs, tokenizer=tok)
        policy = result.model.merge_and_unload() if hasattr(result.model, "merge_and_unload") else result.model
        with torch.no_grad():
            ev = evaluate(policy.eval(), tok, held, task, args)
        last = result.metrics[-1] if result.metrics else {}
        rows.append({"w0": w0, "w": [w0, 1.0 - w0], **ev, "train_loss": last.get("loss"),
                     "train_seconds": time.perf_counter() - t1})
        print(f"w0={w0:g}: {ev}")
    report = {"model": args.model, "pairs": len(pairs), "prompts": len(train_prompts), "heldout": len(held),
              "settings": vars(args), "pi0": base, "rows": rows, "seconds": time.perf_counter() - t0}
    tmp = out / ".results.json.tmp"
    tmp.write_text(json.dumps(report, indent=1, default=str))
    tmp.replace(out / "results.json")
    plot(rows, base, out / "tradeoff.png")
    print(f"results in {out / 'results.json'}, front in {out / 'tradeoff.png'}")


if __name__ == "__main__":
    main()
