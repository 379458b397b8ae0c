"""The typed configuration of ``preftune rank``: one field per option, its help text lives here.

The CLI builds its flags from these fields (default and help), so flags, YAML recipes and the Python
API share one source of truth.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ELO_SCALE = 400.0 / math.log(10.0)  # rating points per natural-log unit: 400 points = 10:1 odds

Method = Literal["bt", "davidson", "elo", "pl"]
Format = Literal["md", "csv", "json", "png"]
ALL_FORMATS: tuple[str, ...] = ("md", "csv", "json", "png")


class RankConfig(BaseModel):
    """Everything ``preftune rank`` needs; ``run_rank(config)`` does the rest."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    file: Path = Field(
        description="JSONL of comparisons {'a','b','winner': a|b|tie} (optional 'judge', 'prompt', "
        "'weight') or of rankings {'ranking': [best, ..., worst]}."
    )
    method: Method = Field(
        "bt",
        description="bt: Bradley-Terry MLE (Chatbot-Arena style); davidson: BT with the Davidson tie "
        "model; elo: online Elo in file order (order-dependent); pl: Plackett-Luce for rankings.",
    )
    ties: Literal["half", "davidson"] = Field(
        "half",
        description="How BT treats ties: half = a tie is half a win each way; davidson = fit a tie "
        "parameter nu (P(tie) = nu*sqrt(pi_a*pi_b)/(pi_a+pi_b+nu*sqrt(pi_a*pi_b))).",
    )
    l2: float = Field(
        0.0,
        ge=0.0,
        description="L2 prior on natural log-strengths: adds (l2/2)*sum(theta^2) to the negative "
        "log-likelihood (= choix alpha of l2/2). Needed when the comparison graph is disconnected.",
    )
    bootstrap: int = Field(
        200, ge=0, description="Bootstrap rounds for confidence intervals (0 = no intervals)."
    )
    ci: float = Field(0.95, gt=0.0, lt=1.0, description="Confidence level of the percentile intervals.")
    seed: int = Field(0, description="Seed of the bootstrap resampling (results are reproducible).")
    anchor: str | None = Field(
        None, description="System whose rating is fixed at --anchor-rating (default: mean rating = --base)."
    )
    anchor_rating: float | None = Field(None, description="Rating given to --anchor (default: --base).")
    base: float = Field(1000.0, description="Mean rating when no anchor is given; initial Elo rating.")
    scale: float = Field(
        ELO_SCALE,
        gt=0.0,
        description="Rating points per natural-log unit of strength; 400/ln10 = 173.72 is the Elo "
        "convention (a 400-point gap = 10:1 odds).",
    )
    k_factor: float = Field(4.0, gt=0.0, description="Elo K factor (rating points moved per surprise).")
    judge: str | None = Field(None, description="Keep only comparisons whose 'judge' field equals this.")
    self_comparisons: Literal["drop", "error"] = Field(
        "drop", description="Comparisons of a system with itself: drop (with a warning) or error."
    )
    output: Path | None = Field(None, description="Folder for the leaderboard files (none = terminal only).")
    formats: list[Format] = Field(
        list(ALL_FORMATS),
        description="Files to write into --output: any of md,csv,json,png (comma-separated).",
    )
    max_iter: int = Field(200, ge=1, description="Iteration cap of the fitters (Newton / MM / L-BFGS).")

    @field_validator("formats", mode="before")
    @classmethod
    def _split_formats(cls, v: Any) -> Any:
        # The CLI passes "md,csv"; YAML and Python pass lists.
        if isinstance(v, str):
            return [p.strip() for p in v.split(",") if p.strip()]
        return v

    @model_validator(mode="after")
    def _methods_and_ties(self) -> RankConfig:
        # `--method davidson` is shorthand for `--method bt --ties davidson`; keep both spellings
        # consistent so the rest of the code reads one field.
        if self.method == "davidson" and self.ties != "davidson":
            object.__setattr__(self, "ties", "davidson")
        if self.method == "bt" and self.ties == "davidson":
            object.__setattr__(self, "method", "davidson")
        if self.method in ("elo", "pl") and self.ties == "davidson":
            raise ValueError(f"--ties davidson applies to bt only; {self.method} counts a tie as half a win")
        return self

    @property
    def anchor_value(self) -> float:
        """The rating the anchor system is pinned to."""
        return self.base if self.anchor_rating is None else self.anchor_rating

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> RankConfig:
        """Load a YAML recipe; keyword overrides (e.g. explicit CLI flags) win over the file."""
        import yaml

        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a rank config must be a mapping of option: value")
        data.update(overrides)
        return cls(**data)
