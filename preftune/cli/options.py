"""Command-line options generated from a command's typed config: one source of truth per option.

Each option's type, default and help text are read from the pydantic field of the same name, so a
flag, a YAML key and a Python keyword argument mean the same thing and say so in the same words::

    @config_command(app, "train", TrainConfig, "model", "data", "loss", ("output", "-o"), "lora")
    def train_cmd(config: str = recipe_argument(), set_: list[str] = set_option(TrainConfig), *,
                  overrides: dict) -> None:
        cfg = load_config(config, {**overrides, **parse_set(set_ or [])})

The command receives only the options given on the command line (``overrides``), so an option left
out never replaces a value from a YAML recipe or a preset. The defaults shown in ``--help`` are the
fields' defaults: what the command uses when neither the recipe nor the flag sets the option.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any, Literal, Union

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from typer.core import TyperCommand
from typer.models import ArgumentInfo

FieldSpec = str | tuple[str, ...]
_SCALARS = (str, int, float, bool)


def help_text(text: str) -> str:
    """``text`` as help: typer renders help as rich markup, where ``[...]`` would be read as a style."""
    return text.replace("[", r"\[")


def recipe_argument(example: str = "configs/") -> Any:
    """The optional YAML recipe argument of a command whose config loads from YAML."""
    return typer.Argument(None, help=f"YAML recipe (see {example}); flags and --set override it")


def set_option(config: type[BaseModel]) -> Any:
    """``--set key=value``: any field of ``config``, including those without a flag of their own."""
    return typer.Option(None, "--set", help=f"any {config.__name__} field: --set key=value (repeatable)")


@dataclass(frozen=True)
class _Flag:
    name: str  # the field's name, and the command function's parameter name
    decls: tuple[str, ...]  # "--max-steps", "--lora/--no-lora", "-o"; empty for a positional argument
    annotation: Any  # the type typer parses (Literal keeps its choices)
    is_list: bool  # a list field, given comma-separated on the command line

    def parameter(self, field: FieldInfo) -> inspect.Parameter:
        help_ = help_text(field.description or "")
        if not self.decls:  # a required field: the command's positional argument
            info = typer.Argument(..., help=help_, show_default=False)
        else:
            default = _shown_default(field)
            # The default is for --help only: the command drops every option not given on the command line.
            info = typer.Option(default, *self.decls, help=help_, show_default=default is not None)
        return inspect.Parameter(self.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=self.annotation)

    def value(self, raw: Any) -> Any:
        if self.is_list and isinstance(raw, str):
            return [p.strip() for p in raw.split(",") if p.strip()]
        return raw


def config_command(
    group: typer.Typer,
    name: str,
    config: type[BaseModel],
    *fields: FieldSpec,
    more_help: Mapping[str, Callable[[], str]] | None = None,
    **command_kwargs: Any,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register the decorated function as command ``name`` of ``group``, with one option per field
    of ``config`` named in ``fields``; the function gets the options given on the command line as its
    keyword argument ``overrides`` (field name → value), ready for ``config(**overrides)``.

    A field spec is its name (``"max_steps"`` → ``--max-steps``) or a tuple of its name and flag
    declarations: ``("output", "-o")`` adds a short flag, ``("formats", "--format")`` replaces the long
    one. A bool field gets ``--name/--no-name``; a list field is given comma-separated; a required field
    (no default) becomes a positional argument. Fields of other types (dicts, unions of several types)
    are left to ``--set``.

    ``more_help`` appends text to a flag's help that is computed only when ``--help`` is shown, e.g.
    choices read from the objective registry, whose import (torch) ``preftune --help`` should not pay.
    """
    flags = [_flag(config, spec) for spec in fields]

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        own = inspect.signature(fn, eval_str=True)
        if "overrides" not in own.parameters:
            raise TypeError(f"{fn.__name__} must take the keyword argument `overrides`")
        params = [p for n, p in own.parameters.items() if n != "overrides"]
        ctx_name = next((p.name for p in params if p.annotation is typer.Context), None)
        if ctx_name is None:
            ctx_name = "_config_command_ctx"
            params.append(inspect.Parameter(ctx_name, inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context))
        generated = [f.parameter(config.model_fields[f.name]) for f in flags]
        # Positional arguments first (typer reads them in signature order), then the config's options in
        # the order given, then the command's own options (--set, --quick ...).
        params = sorted([*params, *generated], key=lambda p: (not _is_argument(p), p not in generated))
        keeps_ctx = ctx_name in own.parameters

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            ctx = kwargs[ctx_name] if keeps_ctx else kwargs.pop(ctx_name)
            overrides = {}
            for f in flags:
                raw = kwargs.pop(f.name)
                if _given(ctx, f.name):
                    overrides[f.name] = f.value(raw)
            return fn(**kwargs, overrides=overrides)

        command.__signature__ = own.replace(parameters=[p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params])
        command.__annotations__ = {p.name: p.annotation for p in params}
        cls = type(f"{config.__name__}Command", (_HelpOnDemand,), {"more_help": dict(more_help or {})})
        group.command(name, cls=cls, **command_kwargs)(command)
        return command

    return decorate


class _HelpOnDemand(TyperCommand):
    """A command that completes some options' help only when its help is shown (see ``more_help``)."""

    more_help: dict[str, Callable[[], str]] = {}

    def format_help(self, ctx: Any, formatter: Any) -> None:
        for param in self.params:
            extra = self.more_help.get(param.name or "")
            if extra is not None and not getattr(param, "_more_help_done", False):
                param.help = f"{param.help or ''} {help_text(extra())}".strip()
                param._more_help_done = True  # type: ignore[attr-defined]
        super().format_help(ctx, formatter)


def _flag(config: type[BaseModel], spec: FieldSpec) -> _Flag:
    name, *decls = (spec,) if isinstance(spec, str) else spec
    if name not in config.model_fields:
        raise KeyError(f"{config.__name__} has no field {name!r}")
    field = config.model_fields[name]
    annotation, is_list = _cli_type(config, name, field.annotation)
    if field.is_required():
        return _Flag(name, (), annotation, is_list)
    long = "--" + name.replace("_", "-")
    if annotation is bool:
        long = f"{long}/--no-{long[2:]}"
    if not any(d.startswith("--") for d in decls):
        decls = [long, *decls]
    return _Flag(name, tuple(decls), annotation, is_list)


def _cli_type(config: type[BaseModel], name: str, annotation: Any) -> tuple[Any, bool]:
    """The type typer parses for a field, and whether it is a comma-separated list."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = members[0] if len(members) == 1 else annotation
    origin = typing.get_origin(annotation)
    if origin is Literal or annotation in _SCALARS or (isinstance(annotation, type) and issubclass(annotation, str)):
        return annotation, False
    if isinstance(annotation, type) and issubclass(annotation, PurePath):
        return annotation, False
    if origin is list:
        return str, True
    raise TypeError(f"{config.__name__}.{name} ({annotation}) has no command-line form; set it with --set")


def _shown_default(field: FieldInfo) -> Any:
    value = field.get_default(call_default_factory=True)
    if isinstance(value, float):
        return float(f"{value:.6g}")  # 400/ln10 shows as 173.718
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return value


def _given(ctx: Any, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    # Compared through the enum's own class: typer vendors click, so `click.core.ParameterSource` is another enum.
    return source is not None and source is not type(source).DEFAULT


def _is_argument(p: inspect.Parameter) -> bool:
    return isinstance(p.default, ArgumentInfo)
