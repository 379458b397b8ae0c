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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
