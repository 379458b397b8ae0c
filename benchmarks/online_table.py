"""The algorithm × iteration table of docs/online.md: every online algorithm on the real model, per task.

    python benchmarks/online_table.py --task word_limit --out benchmarks/online_runs     # run (resumable)
    python benchmarks/online_table.py --task word_limit --out benchmarks/online_runs --table-only

Each cell is one `preftune online` run in its own folder (``OUT/TASK/CELL``); a rerun skips finished cells
and resumes unfinished ones (``resume=True``). ``one_shot`` is the one-shot pipeline at the same number of
sampled training responses: one iteration over iterations × prompts_per_iteration prompts. The table
(markdown, printed and written to ``OUT/TASK/table.md``) has one row per algorithm and iterate: held-out
success with its Wilson interval, greedy success, KL to π_0, mean length, fluency NLL under π_0,
repetition, and the cumulative wall time.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

CELLS: dict[str, dict] = {
    "iterative_dpo_fixed": dict(algorithm="iterative_dpo", ref_mode="fixed"),
    "iterative_dpo_previous": dict(algorithm="iterative_dpo", ref_mode="previous"),
    "online_dpo": dict(algorithm="online_dpo"),
    "sppo": dict(algorithm="sppo"),
    "dno": dict(algorithm="dno"),
    "inpo": dict(algorithm="inpo"),
    "apo": dict(algorithm="apo"),
    "ofs_dpo": dict(algorithm="ofs_dpo"),
    "self_rewarding": dict(algorithm="self_rewarding"),
    "curry_dpo": dict(algorithm="curry_dpo"),
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="word_limit")
    ap.add_argument("--out", default="benchmarks/online_runs")
    ap.add_argument("--cells", default=",".join(["one_shot", *CELLS]), help="comma-separated cell names")
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=64, help="prompts per iteration")
    ap.add_argument("--heldout", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="key=value for every cell")
    ap.add_argument("--table-only", action="store_true")
    return ap.parse_args(argv)


def cell_config(name: str, args):
    from preftune.online.config import OnlineConfig
    from preftune.train.config import parse_set

    common = dict(task=args.task, heldout_prompts=args.heldout, progress=False, resume=True,
                  threads=args.threads, **parse_set(args.sets))
    if name == "one_shot":
        spec = dict(algorithm="iterative_dpo", iterations=1, prompts_per_iteration=args.iterations * args.prompts)
    else:
        spec = dict(CELLS[name], iterations=args.iterations, prompts_per_iteration=args.prompts)
    return OnlineConfig(**{**common, **spec, "output": str(Path(args.out) / args.task / name)})


BASE_FILES = ("eval_base.json", "eval_base.heldout.jsonl")
# the settings π_0's held-out evaluation depends on
EVAL_KEYS = ("model", "task", "seed", "heldout_prompts", "heldout_samples", "greedy_eval", "eval_temperature",
             "eval_top_p", "max_new_tokens", "sampling_engine", "sampling_precision", "gen_batch_size", "precision")


def share_base_eval(folder: Path, root: Path, summary: dict) -> None:
    """Give a new cell π_0's held-out evaluation from a finished one. Every cell of a task shares the model,
    held-out prompts, samples, seed and sampler, so π_0's evaluation is the same in each (the loop skips
    it when ``eval_base.json`` is there); computing it once saves minutes per cell."""
    if (folder / BASE_FILES[0]).exists():
        return
    for other in sorted(root.iterdir()) if root.exists() else []:
        if other == folder or not all((other / f).exists() for f in (*BASE_FILES, "online_config.json")):
            continue
        theirs = json.loads((other / "online_config.json").read_text())
        if all(theirs.get(k) == summary.get(k) for k in EVAL_KEYS):
            folder.mkdir(parents=True, exist_ok=True)
            for f in reversed(BASE_FILES):  # the .json last: the loop trusts the pair once it is there
                tmp = folder / (f + ".tmp")
                shutil.copyfile(other / f, tmp)
                tmp.replace(folder / f)
            return


def run_cell(name: str, args) -> None:
    from preftune.online.loop import run_online

    cfg = cell_config(name, args)
    done = Path(cfg.output) / "report.md"
    if done.exists():
        print(f"[{name}] finished earlier: {done}")
        return
    share_base_eval(Path(cfg.output), Path(cfg.output).parent, cfg.summary())
    t0 = time.perf_counter()
    run_online(cfg, log=lambda m: print(f"[{name}] {m}", flush=True))
    print(f"[{name}] {time.perf_counter() - t0:.0f} s", flush=True)


def _pct(e, key, lo, hi) -> str:
    if e.get(key) is None:
        return "–"
    return f"{100 * e[key]:.1f} [{100 * e[lo]:.1f}–{100 * e[hi]:.1f}]"


def table(args) -> str:
    root = Path(args.out) / args.task
    head = ["| algorithm | iterate | success % (95% CI) | greedy % | KL to π_0 | words | fluency NLL | distinct-2 | "
            "repeats % | pairs | minutes |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for name in args.cells.split(","):
        folder = root / name
        if not (folder / "eval_base.json").exists():
            continue
        base = json.loads((folder / "eval_base.json").read_text())
        its = [json.loads(x) for x in (folder / "iterations.jsonl").read_text().splitlines()] \
            if (folder / "iterations.jsonl").exists() else []
        minutes = 0.0
        for t, e, pairs in [(0, base, None)] + [
                (r["iter/t"], {k[5:]: v for k, v in r.items() if k.startswith("eval/")}, r.get("iter/pairs"))
                for r in its]:
            if t:
                minutes += (its[t - 1].get("iter/seconds") or 0) / 60
            if t == 0 and rows and name != "one_shot":
                continue  # π_0 is the same for every cell: listed once
            rows.append(
                f"| {name if t <= 1 else ''} | π_{t} | {_pct(e, 'success', 'success_low', 'success_high')} | "
                f"{_pct(e, 'greedy_success', 'greedy_low', 'greedy_high')} | {e.get('kl_ref', 0):.2f} | "
                f"{e.get('len_words', float('nan')):.1f} | {e.get('fluency_nll', float('nan')):.3f} | "
                f"{e.get('distinct2', float('nan')):.3f} | {100 * e.get('repeat_rate', float('nan')):.1f} | "
                f"{pairs if pairs is not None else '–'} | {minutes:.1f} |")
    return "\n".join(head + rows)


def main(argv=None) -> None:
    args = parse_args(argv)
    if not args.table_only:
        for name in args.cells.split(","):
            run_cell(name, args)
    md = table(args)
    out = Path(args.out) / args.task / "table.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"<!-- {platform.processor() or platform.machine()}; python benchmarks/online_table.py "
                   f"--task {args.task} -->\n{md}\n")
    print(md)


if __name__ == "__main__":
    main()
