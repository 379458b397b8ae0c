"""The grid's table: one row per cell (and π_0 once per task and seed) from the cells' held-out evaluations,
and per-objective means over seeds. Written as ``table.md``, ``table.csv`` and ``table.json``; every figure is
read from the cell folders, so the table can be rebuilt at any time.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from preftune.compare.config import Cell, CompareConfig
from preftune.online import store
from preftune.online.store import IterationDir

BASE = "base"  # π_0's row (and leaderboard system): the model before training
# Columns of table.csv / table.json rows, in order.
COLUMNS = ("kind", "task", "seed", "objective", "variant", "beta", "learning_rate", "success", "success_low",
           "success_high", "n", "success_delta", "winrate_base", "judge_score", "kl", "kl_se", "len_words",
           "len_tokens", "eos_rate", "fluency_nll", "greedy_success", "chosen_logp_delta", "rejected_logp_delta",
           "unseen_logp_delta", "pairs", "steps", "train_seconds", "eval_seconds", "wall_seconds", "seeds")
# Held-out figures averaged over seeds in the means rows.
MEAN_KEYS = ("success_delta", "winrate_base", "judge_score", "kl", "len_words", "len_tokens", "eos_rate",
             "fluency_nll", "greedy_success", "chosen_logp_delta", "rejected_logp_delta", "unseen_logp_delta", "pairs",
             "steps", "train_seconds", "eval_seconds", "wall_seconds")


def _figures(ev: dict) -> dict:
    return {"success": ev.get("success"), "success_low": ev.get("success_low"),
            "success_high": ev.get("success_high"), "n": ev.get("n"), "judge_score": ev.get("task_score"),
            "kl": ev.get("kl_ref"), "kl_se": ev.get("kl_ref_se"), "len_words": ev.get("len_words"),
            "len_tokens": ev.get("len_tokens"), "eos_rate": ev.get("eos_rate"),
            "fluency_nll": ev.get("fluency_nll"), "greedy_success": ev.get("greedy_success"),
            "winrate_base": ev.get("winrate_init")}


def cell_row(cell: Cell, folder: Path, base: dict) -> dict | None:
    """A finished cell's row (None if it has not finished its evaluation)."""
    from preftune.losses import get

    it = IterationDir(folder, 1)
    m = it.manifest()["phases"]
    if "eval" not in m:
        return None
    settings = store.read_json(folder / "online_config.json")
    params = get(cell.objective).resolve(settings.get("loss_params") or {})  # the registry's defaults filled in
    ev, train = m["eval"], m.get("train", {})
    row = {"kind": "cell", "task": cell.task, "seed": cell.seed, "objective": cell.objective,
           "variant": cell.variant, "beta": params.get("beta"), "learning_rate": settings.get("learning_rate"),
           **_figures(ev), "pairs": m.get("build", {}).get("pairs"), "steps": train.get("steps"),
           "train_seconds": train.get("train_seconds", 0.0), "eval_seconds": ev.get("seconds")}
    row["wall_seconds"] = (row["train_seconds"] or 0.0) + (row["eval_seconds"] or 0.0)
    row.update(displacement(it.path / "train" / "metrics.jsonl"))
    if row["success"] is not None and base.get("success") is not None:
        row["success_delta"] = row["success"] - base["success"]
    return row


def displacement(metrics: Path) -> dict:
    """Likelihood displacement at the end of a cell's training: the per-token log-prob change since step 0 of
    the training probe's chosen and rejected answers and of unseen answers sampled from π_0 (train/dynamics.py;
    the last row of metrics.jsonl that carries them). Empty when the cell ran without dynamics."""
    keys = {"chosen_logp_delta": "dynamics/chosen_token_logp_delta",
            "rejected_logp_delta": "dynamics/rejected_token_logp_delta",
            "unseen_logp_delta": "dynamics/unseen_token_logp_delta"}
    last: dict = {}
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            row = json.loads(line)
            if keys["chosen_logp_delta"] in row:
                last = row
    return {k: last.get(v) for k, v in keys.items()} if last else {}


def base_row(task: str, seed: int, ev: dict, shared_seconds: float | None) -> dict:
    return {"kind": "base", "task": task, "seed": seed, "objective": BASE, "variant": BASE, **_figures(ev),
            "success_delta": 0.0, "wall_seconds": shared_seconds}


def collect_rows(cfg: CompareConfig, root: Path) -> list[dict]:
    """π_0's row then its cells' rows, per (task, seed) group, for the cells of ``cfg`` that finished."""
    rows = []
    cells = cfg.cells()
    for group in dict.fromkeys(c.group for c in cells):
        members = [c for c in cells if c.group == group]
        folders = [c.folder(root) for c in members]
        have = [f for f in folders if (f / "eval_base.json").exists()]
        if not have:
            continue
        base = store.read_json(have[0] / "eval_base.json")
        rows.append(base_row(*group, base, _shared_seconds(folders)))
        for c, f in zip(members, folders, strict=True):
            r = cell_row(c, f, base)
            if r is not None:
                rows.append(r)
    return rows


def _shared_seconds(folders: list[Path]) -> float | None:
    """The group's shared work, done once: π_0's sampling and judging (the cell that did it holds the
    manifest entries without ``shared_from``)."""
    for f in folders:
        m = IterationDir(f, 1).manifest()["phases"]
        if "sample" in m and "shared_from" not in m["sample"]:
            return (m["sample"].get("gen_seconds") or 0.0) + (m.get("judge", {}).get("judge_seconds") or 0.0)
    return None


def mean_rows(rows: list[dict]) -> list[dict]:
    """Per task and variant (π_0 included): figures averaged over seeds; success pooled over every held-out
    answer of every seed, with its Wilson interval."""
    from preftune.eval.policy_eval import wilson

    out = []
    for key in dict.fromkeys((r["task"], r["variant"]) for r in rows):
        rs = [r for r in rows if (r["task"], r["variant"]) == key]
        n = sum(r["n"] or 0 for r in rs)
        hits = round(sum((r["success"] or 0.0) * (r["n"] or 0) for r in rs))
        rate = wilson(hits, n)
        row = {"kind": "mean", "task": key[0], "seed": "mean", "objective": rs[0]["objective"], "variant": key[1],
               "beta": rs[0].get("beta"), "learning_rate": rs[0].get("learning_rate"), "success": rate.value,
               "success_low": rate.low, "success_high": rate.high, "n": n, "seeds": len(rs)}
        for k in MEAN_KEYS:
            vals = [r[k] for r in rs if _finite(r.get(k))]
            row[k] = sum(vals) / len(vals) if vals else None
        out.append(row)
    return out


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# ---------------------------------------------------------------------------------------------- writing
def _pct(v, lo=None, hi=None) -> str:
    if not _finite(v):
        return "–"
    return f"{100 * v:.1f}" + (f" [{100 * lo:.1f}–{100 * hi:.1f}]" if _finite(lo) and _finite(hi) else "")


def _num(v, digits=2, signed=False) -> str:
    return f"{v:{'+' if signed else ''}.{digits}f}" if _finite(v) else "–"


MD_HEAD = ("| task | seed | objective | beta | lr | success % (95% CI) | Δ vs π_0 (pts) | win % vs π_0 | judge score | "
           "KL to π_0 | "
           "words | tokens | EOS % | fluency NLL | greedy % | Δ logp/tok chosen | rejected | unseen | pairs | steps | "
           "train s | wall s |")


def _lr(v) -> str:
    return f"{v:g}" if _finite(v) else "–"


def _md_row(r: dict) -> str:
    return (f"| {r['task']} | {r['seed']} | {r['variant'] if r['kind'] != 'base' else 'π_0 (base)'} | "
            f"{_num(r.get('beta'), 3) if r.get('beta') is not None else '–'} | "
            f"{_lr(r.get('learning_rate'))} | "
            f"{_pct(r['success'], r['success_low'], r['success_high'])} | "
            f"{_num(100 * r['success_delta'], 1, True) if _finite(r.get('success_delta')) else '–'} | "
            f"{_pct(r.get('winrate_base'))} | "
            f"{_num(r.get('judge_score'), 3)} | {_num(r.get('kl'))} | {_num(r.get('len_words'), 1)} | "
            f"{_num(r.get('len_tokens'), 1)} | {_pct(r.get('eos_rate'))} | {_num(r.get('fluency_nll'), 3)} | "
            f"{_pct(r.get('greedy_success'))} | {_num(r.get('chosen_logp_delta'), 2, True)} | "
            f"{_num(r.get('rejected_logp_delta'), 2, True)} | {_num(r.get('unseen_logp_delta'), 2, True)} | "
            f"{_num(r.get('pairs'), 0)} | {_num(r.get('steps'), 0)} | "
            f"{_num(r.get('train_seconds'), 0)} | {_num(r.get('wall_seconds'), 0)} |")


def verdict(means: list[dict]) -> list[str]:
    """Per task, the variant with the highest pooled success, and the others whose interval overlaps its
    interval (not told apart at this number of held-out answers)."""
    lines = []
    for task in dict.fromkeys(r["task"] for r in means):
        rs = [r for r in means if r["task"] == task and r["kind"] == "mean" and r["variant"] != BASE
              and _finite(r["success"])]
        if not rs:
            continue
        best = max(rs, key=lambda r: (r["success"], -(r["kl"] or 0.0)))
        close = [r["variant"] for r in rs if r is not best and r["success_high"] >= best["success_low"]]
        interval = _pct(best["success"], best["success_low"], best["success_high"])
        delta = _num(100 * (best["success_delta"] or 0.0), 1, True)
        text = (f"- **{task}**: highest held-out success: **{best['variant']}** {interval}% ({delta} pts vs π_0, "
                f"KL {_num(best['kl'])})")
        text += (f"; not separable from it at this size (intervals overlap): {', '.join(close)}" if close else
                 "; its interval is clear of every other objective's")
        base = next((r for r in means if r["task"] == task and r["variant"] == BASE), None)
        if base is not None and _finite(base["success_high"]) and base["success_high"] >= best["success_low"]:
            text += f"; nor from π_0 ({_pct(base['success'], base['success_low'], base['success_high'])}%)"
        lines.append(text + ".")
    return lines


def to_markdown(cfg: CompareConfig, rows: list[dict], means: list[dict]) -> str:
    sep = "|" + "---|" * (MD_HEAD.count("|") - 1)
    parts = ["# Objective comparison", "",
             f"{len(cfg.objectives)} objectives × {len(cfg.tasks)} tasks × {len(cfg.seeds)} seeds"
             f"{' × sweep ' + str(cfg.sweep.model_dump(exclude_none=True)) if cfg.sweep else ''}; every cell of a "
             "(task, seed) trains on the same π_0 samples, judgements and pairs (one iteration of iterative DPO "
             "from π_0, π_0 as the reference) for the same number of steps, and is evaluated on the same held-out "
             "prompts (topics never trained on). Leaderboard: leaderboard.md.", ""]
    parts += ["## Verdict", "", *verdict(means), "", "## Means over seeds", "",
              MD_HEAD.replace("| seed ", "| seeds "), sep]
    parts += [_md_row({**r, "seed": r.get("seeds", 1)}) for r in sorted(
        means, key=lambda r: (r["task"], r["variant"] != BASE, -(r["success"] or 0.0)))]
    parts += ["", "## Cells", "", MD_HEAD, sep, *[_md_row(r) for r in rows], "",
              "success: share of sampled held-out answers the task's judge accepts (95% Wilson interval); Δ: "
              "against π_0 on the same prompts and sampling seed; win % vs π_0: share of answers the judge scores "
              "above π_0's answer to the same prompt and sample seed, ties ½; judge score: mean task score; KL to "
              "π_0: mean "
              "over the sampled answers of log π(y) − log π_0(y); words/tokens: mean answer length; EOS: share of "
              "answers that ended before max_new_tokens; fluency NLL: mean per-token NLL of the answers' text "
              "under π_0 (lower reads more natural); greedy: success of the greedy answers; Δ logp/tok: change "
              "since step 0, at the end of training, of "
              "the mean per-token log-prob of a fixed probe of training pairs' chosen and rejected answers and of "
              "unseen answers sampled from π_0 (likelihood displacement when chosen < 0; docs/dynamics.md); "
              "train s / wall s: the "
              "cell's own training / training + evaluation seconds (π_0's row: its group's shared sampling and "
              "judging, done once). docs/compare.md explains each column.", ""]
    return "\n".join(parts)


def _clean(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def write_tables(cfg: CompareConfig, rows: list[dict], root: Path) -> list[Path]:
    means = mean_rows(rows)
    md, csv_path, js = root / "table.md", root / "table.csv", root / "table.json"
    store.write_text(md, to_markdown(cfg, rows, means))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    for r in [*rows, *means]:
        w.writerow({k: _clean(r.get(k)) for k in COLUMNS})
    store.write_text(csv_path, buf.getvalue())
    store.write_json(js, {"cells": [{k: _clean(v) for k, v in r.items()} for r in rows],
                          "means": [{k: _clean(v) for k, v in r.items()} for r in means],
                          "config": cfg.model_dump(mode="json")})
    return [md, csv_path, js]
