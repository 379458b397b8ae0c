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
    """List every objective in the registry: name, paper, data shape, reference need, what it trains, defaults."""
    from rich.console import Console
    from rich.table import Table

    from preftune.losses import all_objectives

    table = Table(title="preftune objectives")
    for col in ("name", "paper (arXiv)", "data", "reference", "trains", "norm", "defaults"):
        table.add_column(col, overflow="fold")
    for o in all_objectives():
        defaults = ", ".join(f"{k}={v}" for k, v in o.defaults().items())
        data = o.shape + (f" ({'/'.join(o.columns)})" if o.columns else "") + (
            f"; inputs: {', '.join(o.inputs)}" if o.inputs else "")
        table.add_row(o.name, f"{o.paper} ({o.arxiv or '—'})", data, o.reference, o.trains, o.normalisation,
                      defaults)
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


# ---------------------------------------------------------------- rank (owner: preftune/rank) ---
def _rank_opt(name: str, *flags: str):
    """A flag whose default and help come from RankConfig's field (one source of truth)."""
    from preftune.rank.config import RankConfig

    f = RankConfig.model_fields[name]
    default = ",".join(f.default) if name == "formats" else f.default
    return typer.Option(default, *flags, help=f.description, show_default=name != "scale")


@app.command("rank")
def rank_cmd(
    ctx: typer.Context,
    file: str = typer.Argument(..., help="JSONL of comparisons or rankings (see --help of each flag)"),
    method: str = _rank_opt("method", "--method"),
    ties: str = _rank_opt("ties", "--ties"),
    l2: float = _rank_opt("l2", "--l2"),
    bootstrap: int = _rank_opt("bootstrap", "--bootstrap"),
    ci: float = _rank_opt("ci", "--ci"),
    seed: int = _rank_opt("seed", "--seed"),
    anchor: str = _rank_opt("anchor", "--anchor"),
    anchor_rating: float = _rank_opt("anchor_rating", "--anchor-rating"),
    base: float = _rank_opt("base", "--base"),
    scale: float = _rank_opt("scale", "--scale"),
    k_factor: float = _rank_opt("k_factor", "--k-factor"),
    judge: str = _rank_opt("judge", "--judge"),
    self_comparisons: str = _rank_opt("self_comparisons", "--self-comparisons"),
    output: str = _rank_opt("output", "--output", "-o"),
    formats: str = _rank_opt("formats", "--format"),
    config: str = typer.Option(None, "--config", help="YAML RankConfig; explicit flags override it"),
) -> None:
    """Rank systems from side-by-side comparisons or rankings: Bradley-Terry, Davidson, Elo, Plackett-Luce."""
    from click.core import ParameterSource
    from pydantic import ValidationError

    from preftune.rank.api import run_rank
    from preftune.rank.config import RankConfig
    from preftune.rank.io import RankError

    given = {k: v for k, v in ctx.params.items() if k != "config" and (
        ctx.get_parameter_source(k) != ParameterSource.DEFAULT or config is None)}
    try:
        cfg = RankConfig.from_yaml(config, **given) if config else RankConfig(**given)
        run_rank(cfg)
    except ValidationError as e:
        msgs = [f"  --{'.'.join(map(str, x['loc'])).replace('_', '-')}: {x['msg']}" for x in e.errors()]
        typer.echo("invalid options:\n" + "\n".join(msgs), err=True)
        raise typer.Exit(2) from None
    except RankError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
# ------------------------------------------------------------------------------- end of rank ---


@app.command("demo", context_settings={"help_option_names": ["-h", "--help"]})
def demo_cmd(
    output: str = typer.Option(None, "--output", "-o", help="run folder (default runs/demo-<timestamp>)"),
    quick: bool = typer.Option(False, "--quick", help="tiny random model, seconds: every phase, for tests"),
    set_: list[str] = typer.Option(None, "--set", help="any DemoConfig field: --set key=value (repeatable)"),
) -> None:
    """On-policy DPO with LoRA on SmolLM2-135M-Instruct and a judged task; report before vs after."""
    from preftune.tasks.demo import DemoConfig, run_demo
    from preftune.train.config import parse_set

    with _user_errors():
        overrides = parse_set(set_ or [])
        if output is not None:
            overrides["output"] = output
        cfg = DemoConfig.quick(**overrides) if quick else DemoConfig(**overrides)
        run_demo(cfg, log=typer.echo)


# ------------------------------------------------------------ reward, judge (owner: preftune/reward) ---
reward_app = typer.Typer(help="Reward and preference models: Bradley–Terry, regression, GPM.", no_args_is_help=True)
app.add_typer(reward_app, name="reward")


@reward_app.command("train", context_settings={"help_option_names": ["-h", "--help"]})
def reward_train_cmd(
    config: str = typer.Argument(None, help="YAML recipe (configs/reward_*.yaml); flags and --set override it"),
    model: str = typer.Option(None, "--model", help="HF folder, hub id, .gguf file or smollm2-135m-instruct"),
    data: str = typer.Option(None, "--data", help="pairs or ratings (.jsonl, .json, .parquet, dataset folder)"),
    eval_data: str = typer.Option(None, "--eval-data", help="held-out data (default: eval_fraction of --data)"),
    loss: str = typer.Option(None, "--loss", help="rm_bt, rm_bt_margin, rm_bt_scaled, rm_regression or rm_gpm"),
    output: str = typer.Option(None, "--output", "-o", help="output folder"),
    max_steps: int = typer.Option(None, "--max-steps", help="optimizer steps"),
    lora: bool = typer.Option(None, "--lora/--no-lora", help="train LoRA adapters (+ the head); saved merged"),
    resume: bool = typer.Option(None, "--resume", help="continue from the latest checkpoint in the output folder"),
    skip_invalid: bool = typer.Option(None, "--skip-invalid", help="drop invalid records instead of failing"),
    set_: list[str] = typer.Option(None, "--set", help="any RewardConfig field: --set key=value (repeatable)"),
) -> None:
    """Train a reward / preference model; reports held-out pairwise accuracy (eval/rewards/accuracies)."""
    from preftune.reward.config import load_reward_config
    from preftune.reward.trainer import train_reward
    from preftune.train.config import parse_set

    overrides = dict(model=model, data=data, eval_data=eval_data, loss=loss, output=output,
                     max_steps=max_steps, lora=lora, resume=resume, skip_invalid=skip_invalid)
    with _user_errors():
        overrides.update(parse_set(set_ or []))
        cfg = load_reward_config(config, overrides)
        result = train_reward(cfg)
    final = {k: v for row in result.metrics for k, v in row.items() if k.startswith("eval/")}
    acc = final.get("eval/rewards/accuracies")
    typer.echo(f"done: {result.steps} steps; metrics in {result.output_dir / 'metrics.jsonl'}"
               + (f"; model in {result.model_dir}" if result.model_dir else ""))
    if acc is not None:
        typer.echo(f"held-out pairwise accuracy: {acc:.4f} (eval loss {final.get('eval/loss', float('nan')):.4f})")
    elif "eval/loss" in final:
        mae = f", MAE {final['eval/mae']:.4f}" if "eval/mae" in final else ""
        typer.echo(f"held-out loss: {final['eval/loss']:.4f}{mae}")


@app.command("judge", context_settings={"help_option_names": ["-h", "--help"]})
def judge_cmd(
    file: str = typer.Argument(..., help='JSONL rows {"prompt", "responses": {system: text}} '
                               'or {"prompt", "a", "b", "model_a", "model_b"}'),
    judge: str = typer.Option(..., "--judge", "-j", help="task:NAME (built-in task), rm:PATH (reward or GPM "
                              "model folder), llm:MODEL (local chat model, asked A or B in both orders)"),
    output: str = typer.Option("comparisons.jsonl", "--output", "-o", help="comparisons (input of preftune rank)"),
    tie_margin: float = typer.Option(0.0, "--tie-margin", min=0.0, max=0.5, help="|P(a ≻ b) − ½| ≤ this: a tie"),
) -> None:
    """Judge every pair of systems per prompt; write {a, b, winner, prompt, judge} rows for `preftune rank`."""
    from preftune.reward.judges import judge_file, make_judge

    with _user_errors():
        rows = judge_file(file, output, make_judge(judge), tie_margin=tie_margin)
    wins = {w: sum(r["winner"] == w for r in rows) for w in ("a", "b", "tie")}
    typer.echo(f"{len(rows)} comparisons ({wins['a']} a, {wins['b']} b, {wins['tie']} tie) written to {output}")
# ------------------------------------------------------------------------ end of reward, judge ---


def main() -> None:
    app()


if __name__ == "__main__":
    main()
