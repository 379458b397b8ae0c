"""One table of objectives. The CLI choices, config validation, ``preftune losses``, the docs table
and the parametrised tests are all driven from it."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

Shape = Literal["paired", "unpaired", "listwise"]
Reference = Literal["none", "logps", "live_logits"]
Normalisation = Literal["sum", "mean"]
# What an objective trains: a causal-LM policy (`preftune train`), a reward model (`preftune reward
# train`), or a diffusion denoiser (Python API only; `preftune train` refuses the last two).
Trains = Literal["policy", "reward_model", "diffusion"]
# TPO's response columns, in its grid order: a triple of preferred, dispreferred and gold responses.
TRIPLE_COLUMNS = ("chosen", "rejected", "gold")


@dataclass(frozen=True)
class Hyper:
    """A hyperparameter with its default and valid range (bounds inclusive unless stated)."""

    default: Any
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    help: str = ""
    choices: tuple | None = None

    def range_text(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(map(str, self.choices))
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        left = "(" if self.low_open or self.low is None else "["
        right = ")" if self.high_open or self.high is None else "]"
        return f"{left}{lo}, {hi}{right}"

    def check(self, value: Any) -> str | None:
        """Return an error text, or None when ``value`` is valid."""
        if self.choices is not None:
            return None if value in self.choices else f"must be {self.range_text()}"
        if isinstance(self.default, bool):
            return None if isinstance(value, bool) else "must be true or false"
        if isinstance(self.default, (int, float)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return f"must be a number in {self.range_text()}"
            if isinstance(self.default, int) and not isinstance(self.default, bool) and value != int(value):
                return "must be an integer"
            if math.isnan(value):
                return "must not be NaN"
            if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
                return f"must be in {self.range_text()}"
            if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
                return f"must be in {self.range_text()}"
        return None


@dataclass(frozen=True)
class Objective:
    """A registry entry: the function and everything the rest of preftune needs to know about it."""

    name: str
    fn: Callable
    summary: str
    paper: str
    arxiv: str | None
    shape: Shape
    reference: Reference
    normalisation: Normalisation
    hyperparameters: dict[str, Hyper] = field(default_factory=dict)
    inputs: tuple[str, ...] = ()  # engine/data inputs beyond sequence log-probs and lengths
    state: Callable[[], Any] | None = None  # factory of a state object (state_dict/load_state_dict)
    min_responses: int = 2  # listwise objectives that need more than two responses say so
    notes: str = ""
    trains: Trains = "policy"
    # Needs per-token log-probs of the policy AND the reference (B, K, T), not only sequence sums.
    token_level: bool = False
    # Fixed meaning of the response columns when the objective has one (TPO: TRIPLE_COLUMNS);
    # empty means the shape's convention (pairs: chosen, rejected; lists: best first).
    columns: tuple[str, ...] = ()
    # The inputs that only the data can give: one number per example in a column of that name
    # (e.g. SPPO's win_probs). The rest of ``inputs`` is derived (labels, scores) or computed by a trainer.
    required_columns: tuple[str, ...] = ()

    @property
    def needs_reference(self) -> bool:
        return self.reference != "none"

    @property
    def data_needs(self) -> str:
        """What data the objective trains on, in one phrase (error messages, docs and recipes)."""
        if self.trains == "diffusion":
            return "preference pairs of images/audio scored by denoising errors (not text data)"
        if self.columns == TRIPLE_COLUMNS:
            return (
                f"triples ({', '.join(TRIPLE_COLUMNS)}): prompt/chosen/rejected/reference rows, or lists of at "
                "least 3 responses with scores or a ranking (gold = best, chosen = second, rejected = worst)"
            )
        if self.shape == "paired":
            return (
                "preference pairs: prompt/chosen/rejected rows, or lists with scores, a ranking or pairs "
                "(pairs are derived by pair_strategy)"
            )
        if self.shape == "unpaired":
            return (
                "unpaired labelled responses: prompt/completion/label rows (pairs also work: chosen becomes "
                "desirable, rejected undesirable)"
            )
        return (
            f"ranked lists of at least {self.min_responses} responses per prompt: prompt/responses with "
            "scores or a ranking"
        )

    def defaults(self) -> dict[str, Any]:
        return {k: h.default for k, h in self.hyperparameters.items()}

    def resolve(self, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """Defaults overlaid with ``overrides``; raises ValueError naming the objective and range."""
        overrides = dict(overrides or {})
        unknown = sorted(set(overrides) - set(self.hyperparameters))
        if unknown:
            known = ", ".join(sorted(self.hyperparameters)) or "none"
            raise ValueError(f"objective '{self.name}' has no hyperparameter {', '.join(unknown)} (it takes: {known})")
        params = self.defaults()
        for k, v in overrides.items():
            err = self.hyperparameters[k].check(v)
            if err:
                raise ValueError(f"objective '{self.name}': {k}={v!r} {err}")
            params[k] = v
        return params


_REGISTRY: dict[str, Objective] = {}


def register(
    name: str,
    *,
    summary: str,
    paper: str,
    arxiv: str | None,
    shape: Shape = "paired",
    reference: Reference = "logps",
    normalisation: Normalisation = "sum",
    hyperparameters: dict[str, Hyper] | None = None,
    inputs: tuple[str, ...] = (),
    state: Callable[[], Any] | None = None,
    min_responses: int = 2,
    notes: str = "",
    trains: Trains = "policy",
    token_level: bool | None = None,
    columns: tuple[str, ...] = (),
    required_columns: tuple[str, ...] = (),
) -> Callable[[Callable], Callable]:
    """Decorator that adds a loss function to the registry under ``name``.

    ``token_level`` defaults to True for objectives with a live reference (their token KL is per token).
    ``required_columns`` must be a subset of ``inputs`` (the objective reads them from there).
    """

    def deco(fn: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"objective '{name}' registered twice")
        stray = sorted(set(required_columns) - set(inputs))
        if stray:
            raise ValueError(f"objective '{name}': required_columns {stray} are not among its inputs")
        _REGISTRY[name] = Objective(
            name=name,
            fn=fn,
            summary=summary,
            paper=paper,
            arxiv=arxiv,
            shape=shape,
            reference=reference,
            normalisation=normalisation,
            hyperparameters=dict(hyperparameters or {}),
            inputs=tuple(inputs),
            state=state,
            min_responses=min_responses,
            notes=notes,
            trains=trains,
            token_level=reference == "live_logits" if token_level is None else token_level,
            columns=tuple(columns),
            required_columns=tuple(required_columns),
        )
        return fn

    return deco


def _load_all() -> None:
    # Importing the modules runs their @register decorators; done lazily so `import preftune` stays fast.
    from preftune.losses import (  # noqa: F401
        diffusion,
        listwise,
        pairwise,
        rationale,
        reference_free,
        reward,
        selfplay,
        token,
        tree,
        unpaired,
    )


def get(name: str) -> Objective:
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown objective '{name}'.{hint} Run `preftune losses` for the list.") from None


def names(trains: Trains | None = None) -> list[str]:
    """Every objective's name, sorted; with ``trains``, only those that train that kind of model."""
    return [o.name for o in all_objectives(trains)]


def all_objectives(trains: Trains | None = None) -> list[Objective]:
    _load_all()
    return [_REGISTRY[n] for n in sorted(_REGISTRY) if trains is None or _REGISTRY[n].trains == trains]


def choices_text(trains: Trains) -> str:
    """The names of the objectives that train ``trains``, as help text: "a, b or c"."""
    found = names(trains)
    return found[0] if len(found) == 1 else ", ".join(found[:-1]) + " or " + found[-1]
