"""Leaderboard output: a rich table in the terminal, Markdown / CSV / JSON files, and a PNG of the
ratings with their intervals (matplotlib, Agg backend — no display needed)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from preftune.rank.api import Leaderboard

_COLUMNS = ("rank", "system", "rating", "ci_low", "ci_high", "wins", "losses", "ties", "comparisons")


def _num(x: float | None, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if float(x).is_integer() and digits == 0:
        return f"{int(x)}"
    return f"{x:.{digits}f}"


def _count(x: float) -> str:
    return f"{int(x)}" if float(x).is_integer() else f"{x:.2f}"  # weighted data gives fractions


def title(board: Leaderboard) -> str:
    cfg = board.config
    text = f"{board.method}: {board.info['summary']}"
    if board.method == "elo":
        text += f" — K={cfg.k_factor:g}, ratings depend on record order"
    if "tie_nu" in board.info:
        text += f" — tie parameter ν={board.info['tie_nu']:.3f}"
    return text


def caption(board: Leaderboard) -> str:
    cfg = board.config
    anchor = f"{cfg.anchor} fixed at {cfg.anchor_value:g}" if cfg.anchor else f"mean rating {cfg.base:g}"
    ci = f"{cfg.ci:.0%} bootstrap CI, {cfg.bootstrap} rounds, seed {cfg.seed}" if cfg.bootstrap else "no CI"
    return (
        f"{board.info['records']} records, {board.info['systems']} systems · scale {cfg.scale:.2f}/nat, "
        f"{anchor} · {ci}"
    )


def print_leaderboard(board: Leaderboard, console) -> None:
    """Rating, CI, wins/losses/ties and comparisons per system, best first."""
    from rich.table import Table

    for note in board.info.get("warnings", []):
        console.print(f"[yellow]warning:[/yellow] {note}", highlight=False)
    table = Table(title=title(board), caption=caption(board))
    for col in (
        "#",
        "system",
        "rating",
        "95% CI" if board.config.ci == 0.95 else f"{board.config.ci:.0%} CI",
        "W",
        "L",
        "T",
        "n",
    ):
        table.add_column(col, justify="left" if col == "system" else "right", overflow="fold")
    for r in board.rows():
        ci = "—" if r["ci_low"] is None else f"{_num(r['ci_low'])} … {_num(r['ci_high'])}"
        table.add_row(
            str(r["rank"]),
            r["system"],
            _num(r["rating"]),
            ci,
            _count(r["wins"]),
            _count(r["losses"]),
            _count(r["ties"]),
            _count(r["comparisons"]),
        )
    console.print(table)


def to_markdown(board: Leaderboard) -> str:
    lines = [
        f"# Leaderboard — {title(board)}",
        "",
        caption(board),
        "",
        "| # | system | rating | CI low | CI high | W | L | T | n |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in board.rows():
        lines.append(
            f"| {r['rank']} | {r['system']} | {_num(r['rating'])} | {_num(r['ci_low'])} | "
            f"{_num(r['ci_high'])} | {_count(r['wins'])} | {_count(r['losses'])} | "
            f"{_count(r['ties'])} | {_count(r['comparisons'])} |"
        )
    return "\n".join(lines) + "\n"


def to_json(board: Leaderboard) -> dict:
    """Rows, the predicted win-probability matrix (rows/cols in leaderboard order) and the config."""
    order = board.order
    names = [board.names[i] for i in order]
    out = {
        "method": board.method,
        "title": title(board),
        "info": {k: v for k, v in board.info.items() if k != "written"},
        "config": json.loads(board.config.model_dump_json()),
        "leaderboard": board.rows(),
        "win_prob": {"systems": names, "matrix": board.win_prob[order][:, order].round(6).tolist()},
    }
    if board.tie_prob is not None:
        out["tie_prob"] = {"systems": names, "matrix": board.tie_prob[order][:, order].round(6).tolist()}
    return _clean(out)


def _clean(obj):
    """NaN (a system absent from every bootstrap round) is not JSON; write null."""
    if isinstance(obj, float):
        return None if math.isnan(obj) else obj
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    return obj


def write_png(board: Leaderboard, path: Path) -> None:
    """Horizontal dot-and-whisker plot, best at the top."""
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only; never open a window
    import matplotlib.pyplot as plt

    rows = board.rows()[::-1]
    y = range(len(rows))
    fig, ax = plt.subplots(figsize=(7, max(2.0, 0.28 * len(rows) + 1.2)))
    ratings = [r["rating"] for r in rows]
    if rows and rows[0]["ci_low"] is not None:
        lo = [r["rating"] - r["ci_low"] if r["ci_low"] is not None else 0 for r in rows]
        hi = [r["ci_high"] - r["rating"] if r["ci_high"] is not None else 0 for r in rows]
        ax.errorbar(ratings, list(y), xerr=[lo, hi], fmt="o", capsize=3, color="tab:blue", ecolor="gray")
    else:
        ax.plot(ratings, list(y), "o", color="tab:blue")
    ax.set_yticks(list(y), [r["system"] for r in rows])
    ax.set_xlabel("rating")
    ax.set_title(
        f"{board.method} ratings" + (f" ({board.config.ci:.0%} CI)" if board.config.bootstrap else "")
    )
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write_md(board: Leaderboard, path: Path) -> None:
    path.write_text(to_markdown(board), encoding="utf-8")


def _write_csv(board: Leaderboard, path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=_COLUMNS)
        w.writeheader()
        w.writerows(board.rows())


def _write_json(board: Leaderboard, path: Path) -> None:
    path.write_text(json.dumps(to_json(board), indent=2), encoding="utf-8")


WRITERS = {"md": _write_md, "csv": _write_csv, "json": _write_json, "png": write_png}


def write_reports(board: Leaderboard, folder: str | Path, formats: list[str]) -> list[Path]:
    """Write leaderboard.{md,csv,json,png} (the chosen ones) into ``folder``; returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        path = folder / f"leaderboard.{fmt}"
        WRITERS[fmt](board, path)
        written.append(path)
    return written
