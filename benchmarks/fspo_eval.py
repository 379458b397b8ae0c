"""FSPO evaluation: per-user held-out preference accuracy of a policy's implicit reward, with and without shots.

The implicit reward of a trained policy is r(x, y) = β·(log π(y|x) − log π_ref(y|x)) (summed response log-probs).
For every pair of a held-out user, the pair is scored twice on the same model: with the user's few shots in
front of the prompt (``preftune.data.fspo``, the training format) and on the bare prompt. A pair is right when
r(y_w) > r(y_l) (a tie counts one half). A policy that learnt to personalise from shots gains accuracy from them.

    preftune data fspo prefs.jsonl train.jsonl --shots 4 --eval-users 2 --eval-output held.jsonl
    preftune train --model M --data train.jsonl --loss ipo_sum -o runs/fspo
    python benchmarks/fspo_eval.py --policy runs/fspo/model --ref M --data prefs.jsonl --users B1,A0 --shots 4

``--data`` is the raw file with user_id (the held-out users' pairs and shots are drawn from it with ``--seed``,
as the builder drew them). Prints a table and writes ``--out`` (JSON) when given.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

Scorer = Callable[[list[dict]], list[list[float]]]  # rows -> per row [ℓ(chosen), ℓ(rejected)]


def summed_logps(model: Any, tokenizer: Any, max_length: int = 2048, max_prompt_length: int = 1792,
                 batch_size: int = 8) -> Scorer:
    """A scorer: summed response log-probs of each row's two responses given its prompt under ``model``."""
    from preftune.data import Example, tokenize_example
    from preftune.model.scoring import response_token_logps

    def score(rows: list[dict]) -> list[list[float]]:
        toks = [tokenize_example(Example(r["prompt"], list(r["responses"])), tokenizer, max_length=max_length,
                                 max_prompt_length=max_prompt_length) for r in rows]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        out = response_token_logps(model, [t.prompt_ids for t in toks], [t.response_ids for t in toks], pad,
                                   batch_size=batch_size)
        return [[float(x.sum()) for x in row] for row in out]

    return score


def implicit_margins(policy: Scorer, ref: Scorer, rows: list[dict], beta: float) -> list[float]:
    """β·[(ℓ_θ(y_w) − ℓ_ref(y_w)) − (ℓ_θ(y_l) − ℓ_ref(y_l))] per row (responses [chosen, rejected])."""
    return [beta * ((p[0] - r[0]) - (p[1] - r[1])) for p, r in zip(policy(rows), ref(rows), strict=True)]


def evaluate(policy_model: Any, ref_model: Any, tokenizer: Any, records: list, users: list[str], n_shots: int,
             beta: float = 0.1, seed: int = 0, **score_kwargs: Any) -> dict[str, Any]:
    """Per-user accuracy of the implicit reward on ``users``' pairs with their shots and without."""
    from preftune.data.fspo import episode_row, episodes, per_user_accuracy, user_pairs

    eps, stats = episodes(user_pairs(records), users, n_shots, seed)
    policy, ref = summed_logps(policy_model, tokenizer, **score_kwargs), summed_logps(ref_model, tokenizer,
                                                                                         **score_kwargs)
    ids = [u for u, _, _ in eps]
    result: dict[str, Any] = {"beta": beta, "n_shots": n_shots, "shots_used": stats["shots_used"]}
    for name, shots in (("with_shots", True), ("without_shots", False)):
        rows = [episode_row(u, q, s if shots else None) for u, q, s in eps]
        result[name] = per_user_accuracy(ids, implicit_margins(policy, ref, rows, beta))
    result["pairs"] = {u: ids.count(u) for u in result["with_shots"]}
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", required=True, help="the trained policy (a folder or model spec)")
    ap.add_argument("--ref", required=True, help="the reference it was trained against")
    ap.add_argument("--data", required=True, help="raw preference data with user_id")
    ap.add_argument("--users", required=True, help="held-out user ids, comma-separated")
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from preftune.data import load_and_validate
    from preftune.model import load_model

    records, _ = load_and_validate(args.data, objective_shape="paired")
    policy, tok = load_model(args.policy)
    ref, _ = load_model(args.ref)
    res = evaluate(policy, ref, tok, records, [u.strip() for u in args.users.split(",") if u.strip()],
                   args.shots, beta=args.beta, seed=args.seed)
    print("| user | pairs | with shots | without shots |\n|---|---|---|---|")
    for u, n in res["pairs"].items():
        print(f"| {u} | {n} | {100 * res['with_shots'][u]:.1f}% | {100 * res['without_shots'][u]:.1f}% |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2), encoding="utf-8")
    return res


if __name__ == "__main__":
    main()
