"""Pluralistic preference models on two groups who disagree: BT vs PAL-A/PAL-B vs CARM (group as context).

Data: ``preftune.reward.synthetic.two_group_pairs``: every user labels the same pair of every prompt, group A
one way and group B the other (``--kind length``: A prefers the short answer, B the long one; ``keyword``: A
prefers the answer with a friendly sign-off). Held-out prompts are new topics, labelled by the same users, so
every held-out pair is a disagreement pair: a single reward (BT) orders at most half of them right; a model
that knows the user (PAL) or the group (CARM) can order all of them. After training PAL, a new group-B user
is fitted from ``--shots`` pairs (``adapt_user``: only the user's K weights train) and tested on held-out pairs.

    OMP_NUM_THREADS=1 python benchmarks/pluralistic.py --steps 60 --out runs/pluralistic

Writes ``OUT/results.json`` and prints a table: held-out pairwise accuracy with Wilson 95% intervals.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def _acc_line(name: str, rate, extra: str = "") -> str:
    return f"| {name} | {100 * rate.value:.1f}% | [{100 * rate.low:.1f}, {100 * rate.high:.1f}] | {rate.n} | {extra} |"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--kind", default="length", choices=["length", "keyword"])
    ap.add_argument("--prompts", type=int, default=24, help="training prompts (every user labels each)")
    ap.add_argument("--heldout", type=int, default=16, help="held-out prompts")
    ap.add_argument("--users", type=int, default=2, help="users per group")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--shots", type=int, default=10, help="pairs of the new user for few-shot adaptation")
    ap.add_argument("--methods", default="rm_bt,pal_b,pal_a,carm")
    ap.add_argument("--out", default="runs/pluralistic")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from preftune.eval.policy_eval import wilson
    from preftune.reward import RewardConfig, load_preference_model, train_reward
    from preftune.reward.pal import adapt_user
    from preftune.reward.synthetic import two_group_pairs, write_jsonl

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train = write_jsonl(out / "train.jsonl", two_group_pairs(args.prompts, args.users, args.kind, args.seed))
    test_rows = two_group_pairs(args.heldout, args.users, args.kind, args.seed, heldout=True)
    test = write_jsonl(out / "test.jsonl", test_rows)
    shots = two_group_pairs(args.shots, kind=args.kind, seed=args.seed + 1, new_user="newB")
    new_test = two_group_pairs(args.heldout, kind=args.kind, seed=args.seed, heldout=True, new_user="newB")
    n_test = len(test_rows)

    results: dict = {"args": vars(args), "methods": {}}
    lines = ["| model | held-out accuracy | Wilson 95% | pairs | notes |", "|---|---|---|---|---|"]
    for method in args.methods.split(","):
        t0 = time.time()
        pal = method.startswith("pal")
        cfg = RewardConfig(
            model=args.model, data=str(train), eval_data=str(test), loss=method, output=str(out / method),
            lora=True, learning_rate=5e-4, batch_size=args.batch_size, max_steps=args.steps, seed=args.seed,
            max_length=256, max_prompt_length=128, progress=False, plot=False, logging_steps=10,
            save_model=pal, pal_head_lr=1e-3, pal_user_lr=5e-2, pal_dim=128,
            loss_params={"position_weighting": "only_last"} if pal else {},
        )
        res = train_reward(cfg)
        final = {k: v for m in res.metrics for k, v in m.items() if k.startswith("eval/")}
        acc = final["eval/rewards/accuracies"]
        rate = wilson(round(acc * n_test), n_test)
        entry = {"accuracy": rate.value, "wilson": [rate.low, rate.high], "n": n_test,
                 "seconds": round(time.time() - t0, 1), "eval": final}
        note = ""
        if method == "carm":
            free = wilson(round(final["eval/context_free_acc"] * n_test), n_test)
            entry["context_free"] = {"accuracy": free.value, "wilson": [free.low, free.high]}
            note = f"without the context: {100 * free.value:.1f}% [{100 * free.low:.1f}, {100 * free.high:.1f}]"
        if pal:
            rm = load_preference_model(res.model_dir)
            pairs = [(r["prompt"], r["chosen"], r["rejected"]) for r in shots]
            fit = adapt_user(rm, "newB", pairs, epochs=20, learning_rate=5e-2, seed=args.seed)
            p = rm.prefer_batch([r["prompt"] for r in new_test], [r["chosen"] for r in new_test],
                                [r["rejected"] for r in new_test], user_id="newB")
            new = wilson(int((p > 0.5).sum()), len(new_test))
            entry["new_user"] = {"shots": args.shots, "accuracy": new.value, "wilson": [new.low, new.high],
                                 "n": new.n, "weights": fit.weights}
            note = (f"new user from {args.shots} pairs: {100 * new.value:.1f}% [{100 * new.low:.1f}, "
                    f"{100 * new.high:.1f}] (n={new.n})")
        results["methods"][method] = entry
        lines.append(_acc_line(method, rate, note))
        print(lines[-1], f"({entry['seconds']} s)", flush=True)
    results["table"] = "\n".join(lines)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(results["table"])
    return results


if __name__ == "__main__":
    main()
