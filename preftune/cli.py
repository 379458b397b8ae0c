"""The `preftune` command line. Thin: each command parses its typed config and calls the library."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="preftune",
    help="Learning from preferences: DPO-family training, preference models and ranking.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """preftune: learning from preferences."""


@app.command("losses")
def losses_cmd() -> None:
    """List every objective in the registry: name, paper, data shape, reference need, defaults."""
    from rich.console import Console
    from rich.table import Table

    from preftune.losses import all_objectives

    table = Table(title="preftune objectives")
    for col in ("name", "paper (arXiv)", "data", "reference", "norm", "defaults"):
        table.add_column(col, overflow="fold")
    for o in all_objectives():
        defaults = ", ".join(f"{k}={v}" for k, v in o.defaults().items())
        table.add_row(o.name, f"{o.paper} ({o.arxiv or '—'})", o.shape, o.reference, o.normalisation, defaults)
    Console().print(table)


@app.command("train", context_settings={"help_option_names": ["-h", "--help"]})
def train_cmd(
    config: str = typer.Argument(None, help="YAML recipe (see configs/); flags and --set override it"),
    model: str = typer.Option(None, "--model", help="HF folder, hub id, .gguf file or smollm2-135m-instruct"),
    data: str = typer.Option(None, "--data", help="training data (.jsonl, .json, .parquet or dataset folder)"),
    loss: str = typer.Option(None, "--loss", help="objective name (see `preftune losses`)"),
    beta: float = typer.Option(None, "--beta", help="the objective's beta"),
    output: str = typer.Option(None, "--output", "-o", help="output folder"),
    max_steps: int = typer.Option(None, "--max-steps", help="optimizer steps"),
    lora: bool = typer.Option(None, "--lora/--no-lora", help="train LoRA adapters"),
    resume: bool = typer.Option(None, "--resume", help="continue from the latest checkpoint in the output folder"),
    skip_invalid: bool = typer.Option(None, "--skip-invalid", help="drop invalid records instead of failing"),
    set_: list[str] = typer.Option(None, "--set", help="any config field: --set key=value (repeatable)"),
) -> None:
    """Train a policy on preference data with any registered objective."""
    from preftune.train.config import load_config, parse_set
    from preftune.train.trainer import train

    overrides = dict(model=model, data=data, loss=loss, beta=beta, output=output, max_steps=max_steps,
                     lora=lora, resume=resume, skip_invalid=skip_invalid)
    with _user_errors():
        overrides.update(parse_set(set_ or []))
        cfg = load_config(config, overrides)
        result = train(cfg)
    typer.echo(f"done: {result.steps} steps; metrics in {result.output_dir / 'metrics.jsonl'}"
               + (f"; model in {result.model_dir}" if result.model_dir else ""))


class _user_errors:
    """Turn expected user errors (bad config, bad data, missing files) into one clear message and
    exit code 2, without a traceback; anything else is a bug and keeps its traceback."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None:
            return False
        from pydantic import ValidationError

        from preftune.data import DataError

        if isinstance(exc, ValidationError):
            lines = []
            for e in exc.errors():
                where = ".".join(str(x) for x in e["loc"]) or "config"
                lines.append(f"  {where}: {e['msg'].removeprefix('Value error, ')}")
            typer.echo("invalid configuration:\n" + "\n".join(lines), err=True)
        elif isinstance(exc, (DataError, FileNotFoundError, ValueError, KeyError)):
            msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            typer.echo(f"error: {msg}", err=True)
        else:
            return False
        raise typer.Exit(2)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
