"""The one typed config of `preftune compare`: a grid of objectives × tasks × seeds (× a small sweep of
beta and learning_rate), each cell a one-iteration iterative-DPO online run at the same budget.

YAML fills it, ``--set key=value`` overrides it (``--set base.max_new_tokens=48`` reaches the shared online
settings). Only pydantic and the online config are imported here, so ``preftune --help`` stays fast; the
objective registry is read when a config is validated.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from preftune.online.config import OnlineConfig

# What a compare cell is (one iteration of iterative DPO from π_0, with π_0 as the reference): the grid
# sets these, so that every cell runs the same procedure and only the objective differs.
CELL_FIXED: dict[str, Any] = {"algorithm": "iterative_dpo", "iterations": 1, "ref_mode": "fixed"}
# Set per cell by the grid, never in ``base``.
GRID_KEYS = ("task", "seed", "loss", "loss_params", "beta", "output", "resume")
# A grid's cells show no progress bars and write no per-cell plots unless ``base`` asks for them, and log the
# training dynamics (likelihood displacement per objective: the comparison's own question) unless told not to.
# base settings that change how a run is shown or how fast it goes, not what it computes.
RUN_ONLY = ("threads", "progress", "plot")
CELL_DEFAULTS: dict[str, Any] = {"progress": False, "plot": False, "dynamics": True}


class Sweep(BaseModel):
    """A small hyper-parameter sweep: every objective runs at every listed value (beta only where the
    objective has a beta)."""

    model_config = ConfigDict(extra="forbid")

    beta: list[float] | None = Field(None, min_length=1, description="beta values (objectives without a beta "
                                     "run once, at their registry default)")
    learning_rate: list[float] | None = Field(None, min_length=1, description="peak learning rates")

    @field_validator("beta", "learning_rate")
    @classmethod
    def _positive_unique(cls, v: list[float] | None) -> list[float] | None:
        if v is None:
            return v
        if any(x <= 0 for x in v):
            raise ValueError(f"every value must be > 0, got {v}")
        if len(set(v)) != len(v):
            raise ValueError(f"values repeat: {v}")
        return v


@dataclass(frozen=True)
class Cell:
    """One run of the grid: an objective (at one sweep point) on one task with one seed."""

    task: str
    seed: int
    objective: str
    beta: float | None = None  # a sweep value (None: the objective's default or objective_params)
    learning_rate: float | None = None  # a sweep value (None: base's learning rate)

    @property
    def variant(self) -> str:
        """The objective with its sweep point: ``dpo`` or ``dpo__beta=0.1,lr=0.0002``; a leaderboard system."""
        point = [f"beta={self.beta:g}"] if self.beta is not None else []
        point += [f"lr={self.learning_rate:g}"] if self.learning_rate is not None else []
        return self.objective + ("__" + ",".join(point) if point else "")

    @property
    def group(self) -> tuple[str, int]:
        """Cells of one group train on the same samples, judgements and pairs."""
        return self.task, self.seed

    def folder(self, root: Path) -> Path:
        return root / "cells" / self.task / str(self.seed) / self.variant

    @property
    def label(self) -> str:
        return f"{self.task}/{self.seed}/{self.variant}"


class CompareConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    objectives: list[str] = Field(default_factory=list, description="paired policy objectives to compare "
                                  "(`preftune losses`); each runs at its registry defaults")
    tasks: list[str] = Field(["word_limit"], min_length=1, description="built-in tasks (prompts and judge)")
    seeds: list[int] = Field([0], min_length=1, description="seeds: each draws its own prompts, samples and "
                             "held-out prompts, shared by every objective")
    sweep: Sweep | None = Field(None, description="optional sweep: {beta: [...], learning_rate: [...]}")
    objective_params: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="hyperparameters of an objective instead of its registry defaults: "
        "{simpo: {gamma_beta_ratio: 0.3}}")
    base: dict[str, Any] = Field(
        default_factory=dict, description="online settings shared by every cell (any `preftune online` field "
        "but " + ", ".join((*CELL_FIXED, *GRID_KEYS)) + "): model, lora, prompts_per_iteration, k, "
        "max_new_tokens, heldout_prompts, learning_rate, epochs, ...")
    output: str | None = Field(None, description="grid folder (default runs/compare-<timestamp>)")
    resume: bool = Field(False, description="continue the grid in output: finished cells are kept, an unfinished "
                         "one resumes, cells added to the lists run")
    rank_bootstrap: int = Field(200, ge=0, description="bootstrap rounds of the leaderboard's intervals")
    rank_l2: float = Field(0.01, ge=0, description="L2 prior of the leaderboard fit (keeps an objective that won "
                           "or lost every comparison finite)")

    @field_validator("objectives", "tasks", "seeds")
    @classmethod
    def _unique(cls, v: list) -> list:
        dup = sorted({str(x) for x in v if v.count(x) > 1})
        if dup:
            raise ValueError(f"listed twice: {', '.join(dup)}")
        return v

    @field_validator("objectives")
    @classmethod
    def _paired_objectives(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError(f"list at least one objective; a compare cell trains any of: {', '.join(comparable())}")
        problems = [p for p in (objective_problem(name) for name in v) if p]
        if problems:
            raise ValueError("; ".join(problems) + f". Objectives a compare cell trains: {', '.join(comparable())}")
        return v

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, v: list[str]) -> list[str]:
        from preftune.tasks import all_tasks

        known = [t.name for t in all_tasks()]
        unknown = [t for t in v if t not in known]
        if unknown:
            raise ValueError(f"unknown task{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                             f"tasks: {', '.join(known)}")
        return v

    @field_validator("base")
    @classmethod
    def _shared_only(cls, v: dict[str, Any]) -> dict[str, Any]:
        grid = [k for k in v if k in GRID_KEYS]
        if grid:
            raise ValueError(f"{', '.join(grid)} {'is' if len(grid) == 1 else 'are'} set by the grid, not base: use "
                             "tasks, seeds, objectives, objective_params, sweep and output")
        fixed = [k for k in v if k in CELL_FIXED and v[k] != CELL_FIXED[k]]
        if fixed:
            raise ValueError(f"a compare cell is one iteration of iterative_dpo with π_0 as the reference "
                             f"({', '.join(f'{k}={x}' for k, x in CELL_FIXED.items())}); base sets "
                             f"{', '.join(f'{k}={v[k]}' for k in fixed)}")
        unknown = sorted(set(v) - set(OnlineConfig.model_fields))
        if unknown:
            raise ValueError(f"unknown online setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                             "(`preftune online --help` lists them)")
        try:  # a bad value (max_new_tokens: 0) is named here, with the line of base
            OnlineConfig(**{**CELL_DEFAULTS, **v, **CELL_FIXED})
        except ValueError as e:
            raise ValueError(_first_error(e)) from None
        return v

    @field_validator("objective_params")
    @classmethod
    def _known_params(cls, v: dict[str, dict[str, Any]], info: ValidationInfo) -> dict[str, dict[str, Any]]:
        from preftune.losses import get

        listed = info.data.get("objectives")
        if listed is None:  # objectives failed its own check
            return v
        stray = sorted(set(v) - set(listed))
        if stray:
            raise ValueError(f"names objectives not in objectives: {', '.join(stray)}")
        for name, params in v.items():
            get(name).resolve(params)  # unknown hyperparameters and out-of-range values, with the objective named
        return v

    @model_validator(mode="after")
    def _cells_valid(self) -> CompareConfig:
        # Every distinct cell setting once: an out-of-range beta or a bad base value fails here, before
        # anything runs, with the objective named.
        seen = set()
        for cell in self.cells():
            key = (cell.objective, cell.beta, cell.learning_rate)
            if key in seen:
                continue
            seen.add(key)
            try:
                self.cell_config(cell)
            except ValueError as e:
                raise ValueError(f"cell {cell.variant}: {_first_error(e)}") from None
        return self

    # ------------------------------------------------------------------ the grid
    def cells(self) -> list[Cell]:
        """Every cell, grouped: task, then seed, then objective, then sweep point (a group's cells run in a row)."""
        sweep = self.sweep or Sweep()
        out = []
        for task, seed, name in product(self.tasks, self.seeds, self.objectives):
            betas = sweep.beta if sweep.beta and _has_beta(name) else [None]
            for beta, lr in product(betas, sweep.learning_rate or [None]):
                out.append(Cell(task, seed, name, beta, lr))
        return out

    def cell_config(self, cell: Cell, output: str | None = None) -> OnlineConfig:
        """The online run of a cell: base's shared settings, the cell's objective, task and seed."""
        spec = {**CELL_DEFAULTS, **self.base, **CELL_FIXED, "task": cell.task, "seed": cell.seed,
                "loss": cell.objective, "loss_params": dict(self.objective_params.get(cell.objective, {})),
                "output": output, "resume": True}
        if cell.beta is not None:
            spec["beta"] = cell.beta
        if cell.learning_rate is not None:
            spec["learning_rate"] = cell.learning_rate
        return OnlineConfig(**spec)

    def shared(self) -> dict[str, Any]:
        """What every cell's run depends on besides its own coordinates: a resumed grid must keep it. How the
        run is shown and how many threads it uses change no result, so a resume may change them."""
        base = {k: v for k, v in self.base.items() if k not in RUN_ONLY}
        return {"base": base, "objective_params": self.objective_params}


# ---------------------------------------------------------------------------------------------- objectives
def objective_problem(name: str) -> str | None:
    """Why ``name`` cannot be a compare cell's objective, or None. A cell trains (chosen, rejected) pairs of
    sampled token ids with π_0's log-probs as the reference: an objective that reads anything else from its
    data (win rates, reward-model margins, ...) has nothing to read."""
    from preftune.losses import get
    from preftune.train.inputs import PROVIDERS

    try:
        obj = get(name)
    except KeyError:
        return f"unknown objective {name!r}"
    if obj.trains != "policy":
        return f"{name!r} trains a {obj.trains.replace('_', ' ')}, not a policy"
    if obj.shape != "paired" or obj.columns:
        return f"{name!r} is {obj.shape}, not paired: a compare cell trains (chosen, rejected) pairs"
    computed = {k for p in PROVIDERS if not p.config for k in p.keys}
    missing = [k for k in obj.inputs if k not in computed]
    if missing:
        return f"{name!r} reads {', '.join(missing)} from its data, which a compare cell's pairs do not carry"
    return None


def comparable() -> list[str]:
    """The objectives a compare cell can train."""
    from preftune.losses import all_objectives

    return [o.name for o in all_objectives("policy") if objective_problem(o.name) is None]


def _has_beta(name: str) -> bool:
    from preftune.losses import get

    return "beta" in get(name).hyperparameters


def _first_error(e: ValueError) -> str:
    errors = getattr(e, "errors", None)
    if callable(errors):  # a pydantic ValidationError: its messages without the class banner
        return "; ".join(f"{'.'.join(map(str, x['loc'])) + ': ' if x['loc'] else ''}"
                         f"{x['msg'].removeprefix('Value error, ')}" for x in errors())
    return str(e)


# ---------------------------------------------------------------------------------------------- loading
def load_compare_config(path: str | None, overrides: dict[str, Any]) -> CompareConfig:
    """YAML (if given) overlaid with ``overrides``; a validation error names the file, line and field."""
    from pydantic import ValidationError

    from preftune.train.config import load_config

    try:
        return load_config(path, overrides, model=CompareConfig)
    except ValidationError as e:
        lines = _key_lines(path) if path else {}
        problems = []
        for x in e.errors():
            loc = tuple(x["loc"])
            line = next((lines[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in lines), None)
            where = f"{path}:{line}: " if line else f"{path}: " if path else ""
            field = f"field '{'.'.join(map(str, loc))}': " if loc else ""
            problems.append(f"{where}{field}{x['msg'].removeprefix('Value error, ')}")
        raise ValueError("invalid compare config:\n  " + "\n  ".join(problems)) from None


def _key_lines(path: str) -> dict[tuple, int]:
    """1-based line of every key (and list item) of a YAML file, by its path of keys and indices."""
    import yaml

    try:
        root = yaml.compose(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    out: dict[tuple, int] = {}

    def walk(node, prefix: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = prefix + (k.value,)
                out[key] = k.start_mark.line + 1
                walk(v, key)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                out[prefix + (i,)] = v.start_mark.line + 1
                walk(v, prefix + (i,))

    walk(root, ())
    return out
