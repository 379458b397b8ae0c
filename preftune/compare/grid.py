"""Run a compare grid: every cell is one `preftune online` run (one iteration of iterative DPO) in its own
folder ``OUT/cells/<task>/<seed>/<objective>[__beta=…,lr=…]/``.

Equal budget: the cells of a group (task, seed) train on the same on-policy data. The group's first cell
samples and judges π_0's answers and builds the pairs and their π_0 reference log-probs; every later cell
of the group starts from copies of those files (its manifest lists the three phases as done, marked
``shared_from``), so the online loop resumes at training. π_0's held-out evaluation is copied the same way.
A finished cell (its ``report.md`` written last) is skipped; an unfinished one resumes from its last
finished phase.
"""

from __future__ import annotations

import gc
import json
import shutil
import time
import traceback
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from preftune.compare.config import RUN_ONLY, Cell, CompareConfig
from preftune.online import store
from preftune.online.store import IterationDir

# π_0's held-out evaluation (the .json last: the loop trusts the pair once it is there)
BASE_FILES = ("eval_base.heldout.jsonl", "eval_base.json")
# The phases of iteration 1 that do not depend on the objective: π_0's samples, their judgements, the
# pairs and the pairs' π_0 log-probs (the fixed reference).
SHARED_PHASES = ("sample", "judge", "build")
SHARED_FILES = ("samples.jsonl", "judgements.jsonl", "train_input.jsonl", "reference.safetensors")
# Online settings that may differ between the cells of a group; everything else must match for their
# samples to be shared.
CELL_OWN = ("loss", "loss_params", "beta", "learning_rate", "output", "resume", "progress", "plot", "threads")


class CellsFailed(RuntimeError):
    """Some cells raised; the grid ran the others and wrote its table and leaderboard from them."""


@dataclass
class CompareResult:
    output_dir: Path
    rows: list[dict]
    files: list[Path]


# ---------------------------------------------------------------------------------------------- output
def default_output() -> str:
    return f"runs/compare-{datetime.now():%Y%m%d-%H%M%S}"


def check_output(cfg: CompareConfig, out: Path) -> None:
    """Refuse to mix grids: a new grid needs an empty folder; ``--resume`` continues one with the same shared
    settings (objectives, tasks, seeds and sweep values may be added)."""
    path = out / "compare_config.json"
    if not path.exists():
        if out.exists() and any(out.iterdir()):
            raise ValueError(f"{out} is not empty and holds no compare grid (compare_config.json); "
                             "choose another --output")
        return
    if not cfg.resume:
        raise ValueError(f"{out} already holds a compare grid; pass --resume to continue it, or choose "
                         "another --output")
    old = store.read_json(path)
    old["base"] = {k: v for k, v in old.get("base", {}).items() if k not in RUN_ONLY}  # grids written before
    new = json.loads(json.dumps(cfg.shared()))  # as JSON reads it back (tuples → lists)
    changed = [f"{k}.{f}" for k in new for f in sorted(set(old.get(k, {})) | set(new[k]))
               if old.get(k, {}).get(f) != new[k].get(f)]
    if changed:
        raise ValueError(f"{path}: the grid was started with other shared settings ({', '.join(changed)}); "
                         "resume with the same base and objective_params, or use a new --output")


def write_config(cfg: CompareConfig, out: Path) -> None:
    store.write_json(out / "compare_config.json", {
        **cfg.shared(), "config": cfg.model_dump(mode="json"), "cells": [c.label for c in cfg.cells()]})


# ---------------------------------------------------------------------------------------------- sharing
def finished(folder: Path) -> bool:
    return (folder / "report.md").exists()


def _settings_match(a: dict, b: dict) -> bool:
    keys = (set(a) | set(b)) - set(CELL_OWN)
    return all(a.get(k) == b.get(k) for k in keys)


def share_group_files(folder: Path, siblings: list[Path], summary: dict) -> str | None:
    """Give a cell its group's π_0 evaluation and iteration-1 samples, judgements and pairs from a sibling
    that has them (same settings but the objective's). Returns the sibling's name, or None (this cell samples
    itself)."""
    ready = [s for s in siblings if s != folder and (s / "online_config.json").exists()
             and IterationDir(s, 1).manifest()["phases"].keys() >= set(SHARED_PHASES)
             and all((s / f).exists() for f in BASE_FILES)]
    source = next((s for s in ready if _settings_match(store.read_json(s / "online_config.json"), summary)), None)
    if source is None:
        return None
    if not (folder / BASE_FILES[-1]).exists():
        for f in BASE_FILES:
            _copy(source / f, folder / f)
    it, src = IterationDir(folder, 1), IterationDir(source, 1)
    if not it.done("sample"):
        for f in SHARED_FILES:
            if src.file(f).exists():
                _copy(src.file(f), it.file(f))
        phases = src.manifest()["phases"]
        # the manifest last: the loop trusts exactly the phases it lists
        store.write_json(it.manifest_path, {"t": 1, "phases": {
            p: {**phases[p], "shared_from": source.name} for p in SHARED_PHASES}})
    return source.name


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    tmp.replace(dst)


# ---------------------------------------------------------------------------------------------- running
class _CellLog:
    """A cell's online log lines go to its ``cell.log``, so the grid's own output stays one line per cell."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, msg: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(f"{msg}\n")


def run_cell(cfg: CompareConfig, cell: Cell, root: Path) -> str | None:
    """Run (or resume) one cell; returns the sibling its shared files came from (None: it made them)."""
    from preftune.online.loop import run_online

    folder = cell.folder(root)
    ocfg = cfg.cell_config(cell, output=str(folder))
    siblings = sorted(p for p in folder.parent.iterdir() if p.is_dir()) if folder.parent.exists() else []
    # one process: online_config.json records it (the global batch depends on it)
    source = share_group_files(folder, siblings, {**ocfg.summary(), "processes": 1})
    run_online(ocfg, log=_CellLog(folder / "cell.log"))
    return source


def _eta(durations: list[float], left: int) -> str:
    if not durations or not left:
        return "" if not left else "; ETA –"
    secs = sum(durations) / len(durations) * left
    return f"; ETA {secs / 60:.1f} min ({left} cell{'s' if left > 1 else ''} left)"


def _figures(folder: Path) -> str:
    ev = IterationDir(folder, 1).info("eval")
    if ev.get("success") is None:
        return ""
    return (f": success {100 * ev['success']:.1f}% [{100 * ev['success_low']:.1f}–{100 * ev['success_high']:.1f}]"
            f", KL {ev.get('kl_ref', float('nan')):.2f}")


def run_compare(cfg: CompareConfig, log=print) -> CompareResult:
    """Every cell of the grid (finished ones skipped), then the table, plots and leaderboard."""
    from preftune.compare.leaderboard import write_leaderboard
    from preftune.compare.plots import write_plots
    from preftune.compare.table import collect_rows, write_tables

    out = Path(cfg.output or default_output())
    check_output(cfg, out)
    out.mkdir(parents=True, exist_ok=True)
    write_config(cfg, out)
    cells = cfg.cells()
    unfinished = [c for c in cells if not finished(c.folder(out))]
    log(f"[compare] {len(cells)} cells ({len(cfg.objectives)} objectives × {len(cfg.tasks)} tasks × "
        f"{len(cfg.seeds)} seeds{' × sweep' if cfg.sweep else ''}), {len(cells) - len(unfinished)} finished earlier; "
        f"output {out}")
    durations: list[float] = []
    failed: list[str] = []
    for n, cell in enumerate(cells, start=1):
        head = f"[compare] cell {n}/{len(cells)} {cell.label}"
        if cell not in unfinished:
            log(f"{head}: finished earlier, skipped")
            continue
        log(f"{head}: start{_eta(durations, len(unfinished) - len(durations) - len(failed))}")
        t0 = time.perf_counter()
        try:
            source = run_cell(cfg, cell, out)
        except Exception as e:  # one objective failing (e.g. diverging) must not cost the rest of the grid
            failed.append(cell.label)
            _CellLog(cell.folder(out) / "cell.log")(traceback.format_exc())
            log(f"{head}: FAILED ({type(e).__name__}: {e}); traceback in {cell.folder(out) / 'cell.log'}")
            continue
        finally:
            gc.collect()  # the cell's model and optimizer, before the next cell loads its own
        durations.append(time.perf_counter() - t0)
        shared = f" (samples and pairs from {source})" if source else " (sampled and judged π_0 for its group)"
        log(f"{head}: done in {durations[-1]:.0f} s{shared}{_figures(cell.folder(out))}"
            f"{_eta(durations, len(unfinished) - len(durations) - len(failed))}")
    rows = collect_rows(cfg, out)
    files = write_tables(cfg, rows, out)
    files += write_plots(rows, out)
    files += write_leaderboard(cfg, out, log=log)
    log("[compare] wrote " + ", ".join(str(p) for p in files))
    if failed:
        raise CellsFailed(f"{len(failed)} cell{'s' if len(failed) > 1 else ''} failed ({', '.join(failed)}); the "
                           "table and leaderboard hold the others. Fix the cause and rerun with --resume")
    return CompareResult(out, rows, files)
