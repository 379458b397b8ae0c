"""A Bradley–Terry leaderboard of the grid's objectives from per-prompt pairwise outcomes.

Within a (task, seed) group every cell (and π_0) answered the same held-out prompts with the same sampling
seed. For each prompt, each two systems are compared on their mean judge score over that prompt's sampled
answers: higher wins, equal is a tie. The outcomes (``pairwise.jsonl``, the input format of `preftune rank`)
are fitted with preftune's ranking, Bradley–Terry with Davidson's tie model (a judge that gives many equal
scores makes ties common, and counting them as half-wins would understate how often systems really differ),
with bootstrap intervals.
"""

from __future__ import annotations

import math
import warnings
from itertools import combinations
from pathlib import Path

from preftune.compare.config import CompareConfig
from preftune.compare.table import BASE
from preftune.online import store


def prompt_scores(heldout: Path) -> dict[int, float]:
    """Mean judge score of each held-out prompt's sampled answers (``heldout.jsonl`` of an evaluation)."""
    sums: dict[int, list[float]] = {}
    for r in store.read_jsonl(heldout):
        if r["kind"] == "sampled":
            sums.setdefault(r["prompt"], []).append(float(r["score"]))
    return {p: sum(v) / len(v) for p, v in sorted(sums.items())}


def pairwise_outcomes(scores: dict[str, dict[int, float]], tol: float = 1e-9) -> list[dict]:
    """One comparison per prompt and pair of systems (in ``scores``' order): ``{a, b, winner, prompt}`` with
    winner a / b / tie. A prompt only one of the two answered is skipped."""
    out = []
    for a, b in combinations(scores, 2):
        for p in sorted(set(scores[a]) & set(scores[b])):
            sa, sb = scores[a][p], scores[b][p]
            winner = "tie" if math.isclose(sa, sb, rel_tol=0.0, abs_tol=tol) else "a" if sa > sb else "b"
            out.append({"a": a, "b": b, "winner": winner, "prompt": p})
    return out


def grid_outcomes(cfg: CompareConfig, root: Path) -> list[dict]:
    """Pairwise outcomes within every (task, seed) group, between π_0 and the finished cells."""
    rows = []
    cells = cfg.cells()
    for task, seed in dict.fromkeys(c.group for c in cells):
        scores: dict[str, dict[int, float]] = {}
        for c in (c for c in cells if c.group == (task, seed)):
            folder = c.folder(root)
            if BASE not in scores and (folder / "eval_base.heldout.jsonl").exists():
                scores[BASE] = prompt_scores(folder / "eval_base.heldout.jsonl")
            if (folder / "report.md").exists():
                scores[c.variant] = prompt_scores(folder / "iter_01" / "heldout.jsonl")
        for r in pairwise_outcomes(scores):
            rows.append({**r, "prompt": f"{task}/{seed}/{r['prompt']}", "task": task, "seed": seed})
    return rows


def write_leaderboard(cfg: CompareConfig, root: Path, log=print) -> list[Path]:
    """``pairwise.jsonl``, and ``leaderboard.md/.json/.png`` when at least two systems were compared."""
    from preftune.rank import RankConfig, parse_records, rank
    from preftune.rank.io import RankError, RankWarning
    from preftune.rank.report import to_json, to_markdown, write_png

    rows = grid_outcomes(cfg, root)
    path = root / "pairwise.jsonl"
    store.write_jsonl(path, rows)
    if not rows:
        log("[compare] no two finished systems share a group: no leaderboard")
        return [path]
    rcfg = RankConfig(file=path, method="davidson", bootstrap=cfg.rank_bootstrap, l2=cfg.rank_l2, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RankWarning)
        try:
            board = rank(parse_records(rows, source=str(path)), rcfg)
        except RankError as e:
            log(f"[compare] no leaderboard: {e}")
            return [path]
    notes = [str(w.message) for w in caught if issubclass(w.category, RankWarning)]
    counts = {w: sum(r["winner"] == w for r in rows) for w in ("a", "b", "tie")}
    intro = [
        f"Systems: the grid's objectives and π_0 ('{BASE}'). {len(rows)} per-prompt comparisons within each "
        f"(task, seed): for each held-out prompt, the mean judge score of two systems' sampled answers "
        f"({counts['tie']} ties, {len(rows) - counts['tie']} decided). Fitted from pairwise.jsonl "
        f"(`preftune rank {path} --method davidson --l2 {cfg.rank_l2:g} --bootstrap {cfg.rank_bootstrap}` gives the "
        "same table).", ""]
    intro += [f"Warning: {n}" for n in notes] + ([""] if notes else [])
    md, js, png = root / "leaderboard.md", root / "leaderboard.json", root / "leaderboard.png"
    text = to_markdown(board)
    head, rest = text.split("\n", 1)
    store.write_text(md, head + "\n\n" + "\n".join(intro) + rest)
    store.write_json(js, {**to_json(board), "comparisons": counts, "warnings": notes})
    write_png(board, png)
    return [path, md, js, png]
