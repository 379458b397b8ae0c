"""The `preftune` command line. Thin: each command parses its typed config and calls the library."""

from __future__ import annotations

from typing import Any, Literal

import typer

from preftune.cli.options import config_command, recipe_argument, set_option
from preftune.online.config import OnlineConfig
from preftune.rank.config import RankConfig
from preftune.reward.config import RewardConfig
from preftune.train.config import TrainConfig

app = typer.Typer(
    name="preftune",
    help="Learning from preferences: DPO-family training, preference models and ranking.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root() -> None:
    """preftune: learning from preferences."""


# --------------------------------------------------------------------------------------- losses ---
# Short columns first: cut to an 80-column terminal, a plain line still shows name to arXiv id.
_HEADERS = ("name", "trains", "reference", "norm", "arXiv", "data", "paper", "defaults")
_PLAIN_TITLE = 60  # characters of the paper title in the plain format (the full title: md or json)
_TABLE_WIDTH = 120  # narrower terminals get the plain format by default: the table would fold every cell


@app.command("losses")
def losses_cmd(
    fmt: Literal["table", "plain", "md", "json"] = typer.Option(
        None,
        "--format",
        help="table: for a wide terminal, long cells folded; plain: one line per objective, aligned; "
        "md: a Markdown table; json: a list of objects "
        f"(default: table on a terminal at least {_TABLE_WIDTH} columns wide, plain otherwise)",
        show_default=False,
    ),
) -> None:
    """List every objective in the registry: name, paper, data shape, reference need, what it trains, defaults."""
    from rich.console import Console

    from preftune.losses import all_objectives

    rows = [_objective_row(o) for o in all_objectives()]
    cells = [_cells(r) for r in rows]
    console = Console()
    if fmt is None:  # a table where it fits; otherwise one line per objective (cut to the terminal's width)
        fmt = "table" if console.is_terminal and console.width >= _TABLE_WIDTH else "plain"
    if fmt == "json":
        import json

        typer.echo(json.dumps(rows, indent=1, ensure_ascii=False))
    elif fmt == "table":
        console.print(_table(cells, with_paper=console.width >= _TABLE_WIDTH))
    elif fmt == "md":
        typer.echo(_markdown(cells))
    else:
        typer.echo(_plain(cells, width=console.width if console.is_terminal else None))


def _objective_row(o: Any) -> dict[str, Any]:
    """One objective as data (the json format; the other formats render these)."""
    return {
        "name": o.name,
        "summary": o.summary,
        "paper": o.paper,
        "arxiv": o.arxiv,
        "shape": o.shape,
        "columns": list(o.columns),
        "inputs": list(o.inputs),
        "reference": o.reference,
        "trains": o.trains,
        "normalisation": o.normalisation,
        "defaults": o.defaults(),
    }


def _cells(row: dict[str, Any]) -> tuple[str, ...]:
    """A row as the text of the columns of ``_HEADERS``."""
    data = row["shape"] + (f" ({'/'.join(row['columns'])})" if row["columns"] else "")
    data += f"; inputs: {', '.join(row['inputs'])}" if row["inputs"] else ""
    defaults = ", ".join(f"{k}={v}" for k, v in row["defaults"].items())
    return (
        row["name"],
        row["trains"],
        row["reference"],
        row["normalisation"],
        row["arxiv"] or "—",
        data,
        row["paper"],
        defaults or "—",
    )


def _plain(cells: list[tuple[str, ...]], width: int | None = None) -> str:
    # One line per objective: aligned columns, titles cut short, the defaults last; on a terminal each
    # line is cut to its width rather than wrapped.
    paper = _HEADERS.index("paper")
    cells = [(*c[:paper], _shorten(c[paper], _PLAIN_TITLE), *c[paper + 1 :]) for c in cells]
    widths = [max(len(c[i]) for c in [_HEADERS, *cells]) for i in range(len(_HEADERS) - 1)]
    lines = ["  ".join([*(c[i].ljust(w) for i, w in enumerate(widths)), c[-1]]).rstrip() for c in [_HEADERS, *cells]]
    return "\n".join(lines if width is None else [_shorten(line, width) for line in lines])


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1].rstrip() + "…"


def _markdown(cells: list[tuple[str, ...]]) -> str:
    def line(c: tuple[str, ...]) -> str:
        return "| " + " | ".join(x.replace("|", "\\|") for x in c) + " |"

    return "\n".join([line(_HEADERS), "|" + "---|" * len(_HEADERS), *map(line, cells)])


def _table(cells: list[tuple[str, ...]], with_paper: bool) -> Any:
    from rich import box
    from rich.table import Table

    table = Table(title="preftune objectives", box=box.SIMPLE_HEAD, expand=True)
    for i, header in enumerate(_HEADERS):
        longest = max(len(c[i]) for c in [_HEADERS, *cells])
        if header in ("data", "defaults"):
            table.add_column(header, overflow="fold", ratio=1, min_width=min(longest, 14))
        elif header == "paper":
            if with_paper:  # one line each, cut to the width left
                table.add_column(header, no_wrap=True, overflow="ellipsis", ratio=2)
        else:
            table.add_column(header, no_wrap=True, width=longest)
    paper = _HEADERS.index("paper")
    for c in cells:
        table.add_row(*(c if with_paper else c[:paper] + c[paper + 1 :]))
    return table


# ---------------------------------------------------------------------------------------- train ---
# Options of both training commands; any other field of their config is reachable with --set.
_RUN_FLAGS = (
    "model",
    "data",
    "eval_data",
    "loss",
    ("output", "-o"),
    "max_steps",
    "batch_size",
    "learning_rate",
    "precision",
    "lora",
    "resume",
    "skip_invalid",
)


@config_command(app, "train", TrainConfig, *_RUN_FLAGS, "beta")
def train_cmd(
    config: str = recipe_argument(),
    set_: list[str] = set_option(TrainConfig),
    *,
    overrides: dict[str, Any],
) -> None:
    """Train a policy on preference data with any registered objective."""
    from preftune.train.config import load_config, parse_set
    from preftune.train.trainer import train

    with _user_errors():
        cfg = load_config(config, {**overrides, **parse_set(set_ or [])})
        if cfg.margin_models:  # MODPO's margin models score the data first (reward layer)
            from preftune.reward.margins import train_with_margins

            result = train_with_margins(cfg)
        else:
            result = train(cfg)
    if _is_main_process():
        typer.echo(
            f"done: {result.steps} steps; metrics in {result.output_dir / 'metrics.jsonl'}"
            + (f"; model in {result.model_dir}" if result.model_dir else "")
        )


def _is_main_process() -> bool:
    """Under a launcher (accelerate launch, torchrun) only the process of rank 0 reports."""
    import os

    return os.environ.get("RANK", "0") == "0"


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
@config_command(
    app,
    "rank",
    RankConfig,
    "file",
    "method",
    "ties",
    "l2",
    "bootstrap",
    "ci",
    "seed",
    "anchor",
    "anchor_rating",
    "base",
    "scale",
    "k_factor",
    "judge",
    "self_comparisons",
    ("output", "-o"),
    ("formats", "--format"),
)
def rank_cmd(
    config: str = typer.Option(None, "--config", help="YAML RankConfig; explicit flags override it"),
    *,
    overrides: dict[str, Any],
) -> None:
    """Rank systems from side-by-side comparisons or rankings: Bradley-Terry, Davidson, Elo, Plackett-Luce."""
    from pydantic import ValidationError

    from preftune.rank.api import run_rank
    from preftune.rank.io import RankError

    try:
        cfg = RankConfig.from_yaml(config, **overrides) if config else RankConfig(**overrides)
        run_rank(cfg)
    except ValidationError as e:
        msgs = [f"  --{'.'.join(map(str, x['loc'])).replace('_', '-')}: {x['msg']}" for x in e.errors()]
        typer.echo("invalid options:\n" + "\n".join(msgs), err=True)
        raise typer.Exit(2) from None
    except RankError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None


# ------------------------------------------------------------------------------- end of rank ---


@config_command(
    app,
    "demo",
    OnlineConfig,
    ("output", "-o"),
    "model",
    "task",
    "algorithm",
    "iterations",
    "loss",
    "beta",
    "seed",
    "threads",
    "resume",
)
def demo_cmd(
    quick: bool = typer.Option(False, "--quick", help="tiny random model, seconds: every phase, for tests"),
    set_: list[str] = set_option(OnlineConfig),
    *,
    overrides: dict[str, Any],
) -> None:
    """Iterative on-policy DPO with LoRA on SmolLM2-135M-Instruct and a judged task; report before vs after."""
    from preftune.recipes.demo import demo_config, run_demo
    from preftune.train.config import parse_set

    with _user_errors():
        cfg = demo_config(quick, **overrides, **parse_set(set_ or []))
        run_demo(cfg, log=typer.echo)


def _algorithms() -> str:
    from preftune.online.algorithms import all_algorithms

    return "\n\n" + "\n\n".join(f"{a.name}: {a.summary}" for a in all_algorithms())


@config_command(app, "online", OnlineConfig, "algorithm", "model", "task", "judge", "iterations", ("output", "-o"),
                "resume", more_help={"algorithm": _algorithms})
def online_cmd(
    config: str = recipe_argument("configs/online/"),
    set_: list[str] = set_option(OnlineConfig),
    *,
    overrides: dict[str, Any],
) -> None:
    """Online, iterative and self-play training: sample from the current policy, judge, train, repeat."""
    from preftune.online.loop import run_online
    from preftune.train.config import load_config, parse_set

    with _user_errors():
        cfg = load_config(config, {**overrides, **parse_set(set_ or [])}, model=OnlineConfig)
        result = run_online(cfg, log=typer.echo)
    if _is_main_process():
        typer.echo(f"done: {len(result.rows)} iterations; {result.output_dir / 'iterations.jsonl'}; "
                   f"report {result.report}")


# ------------------------------------------------------------ reward, judge (owner: preftune/reward) ---
reward_app = typer.Typer(help="Reward and preference models: Bradley–Terry, regression, GPM.", no_args_is_help=True)
app.add_typer(reward_app, name="reward")


def _reward_objectives() -> str:
    from preftune.losses import all_objectives

    registry = ", ".join(o.name for o in all_objectives() if o.trains == "reward_model")
    return f"({registry}) or pal_a, pal_b, carm (PAL, CARM)"


@config_command(reward_app, "train", RewardConfig, *_RUN_FLAGS, more_help={"loss": _reward_objectives})
def reward_train_cmd(
    config: str = recipe_argument("configs/reward_*.yaml"),
    set_: list[str] = set_option(RewardConfig),
    *,
    overrides: dict[str, Any],
) -> None:
    """Train a reward / preference model; reports held-out pairwise accuracy (eval/rewards/accuracies)."""
    from preftune.reward.config import load_reward_config
    from preftune.reward.trainer import train_reward
    from preftune.train.config import parse_set

    with _user_errors():
        cfg = load_reward_config(config, {**overrides, **parse_set(set_ or [])})
        result = train_reward(cfg)
    final = {k: v for row in result.metrics for k, v in row.items() if k.startswith("eval/")}
    acc = final.get("eval/rewards/accuracies")
    typer.echo(
        f"done: {result.steps} steps; metrics in {result.output_dir / 'metrics.jsonl'}"
        + (f"; model in {result.model_dir}" if result.model_dir else "")
    )
    if acc is not None:
        typer.echo(f"held-out pairwise accuracy: {acc:.4f} (eval loss {final.get('eval/loss', float('nan')):.4f})")
    elif "eval/loss" in final:
        mae = f", MAE {final['eval/mae']:.4f}" if "eval/mae" in final else ""
        typer.echo(f"held-out loss: {final['eval/loss']:.4f}{mae}")


@reward_app.command("adapt")
def reward_adapt_cmd(
    model: str = typer.Argument(..., help="a PAL model folder (preftune reward train --loss pal_a|pal_b)"),
    data: str = typer.Option(..., "--data", help="the new user's few pairs (records with user_id, or --user-id)"),
    user_id: str | None = typer.Option(None, "--user-id", help="the new user's id for every record of --data"),
    output: str | None = typer.Option(None, "--output", "-o", help="write the adapted model here (default: in place)"),
    epochs: int = typer.Option(20, "--epochs", min=1, help="passes over the user's pairs"),
    learning_rate: float = typer.Option(5e-3, "--learning-rate", min=0.0, help="AdamW rate of the user's weights"),
    batch_size: int = typer.Option(4, "--batch-size", min=1, help="pairs per step"),
    seed: int = typer.Option(0, "--seed", help="seed of the new user's initial weights and the pair order"),
) -> None:
    """Fit new users of a PAL model from a few pairs: only their K mixture weights train (METHODS.md §M11)."""
    from preftune.reward.pal import adapt_file

    with _user_errors():
        results = adapt_file(model, data, user_id=user_id, output=output, log=typer.echo, epochs=epochs,
                             learning_rate=learning_rate, batch_size=batch_size, seed=seed)
    typer.echo(f"{len(results)} new user(s) written to {output or model}; judge with rm:{output or model}?user_id=ID")


@app.command("judge")
def judge_cmd(
    file: str = typer.Argument(
        ..., help='JSONL rows {"prompt", "responses": {system: text}} or {"prompt", "a", "b", "model_a", "model_b"}'
    ),
    judge: str = typer.Option(
        ...,
        "--judge",
        "-j",
        help="task:NAME (built-in task), rm:PATH (reward or GPM "
        "model folder; rm:PATH?user_id=ID a PAL model's user, rm:PATH?context=TEXT a CARM model's context), "
        "llm:MODEL (local chat model, asked A or B in both orders), lsc(JUDGE, ..., ref=candidates) "
        "(pointwise judges combined by the LSC transform)",
    ),
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


# ------------------------------------------------------------ compare (owner: preftune/compare) ---
from preftune.compare.config import CompareConfig  # noqa: E402  (pydantic only: `preftune --help` stays fast)


def _comparable() -> str:
    from preftune.compare.config import comparable

    return "(" + ", ".join(comparable()) + ")"


@config_command(app, "compare", CompareConfig, ("output", "-o"), "resume", "objectives", "tasks", "seeds",
                more_help={"objectives": _comparable})
def compare_cmd(
    config: str = recipe_argument("configs/compare/"),
    set_: list[str] = set_option(CompareConfig),
    *,
    overrides: dict[str, Any],
) -> None:
    """Which objective should I use? Objectives × tasks × seeds at an equal budget (the same on-policy pairs),
    compared on held-out prompts: table, trade-off plots, Bradley-Terry leaderboard."""
    from preftune.compare.config import load_compare_config
    from preftune.compare.grid import CellsFailed, run_compare
    from preftune.train.config import parse_set

    with _user_errors():
        cfg = load_compare_config(config, {**overrides, **parse_set(set_ or [])})
        try:
            result = run_compare(cfg, log=typer.echo)
        except CellsFailed as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1) from None
    typer.echo(f"done: {result.output_dir / 'table.md'}; leaderboard {result.output_dir / 'leaderboard.md'}")


# ------------------------------------------------------------------------------ end of compare ---


# -------------------------------------------------------- inspect (owner: preftune/data/inspect) ---
from preftune.data.inspect import InspectConfig  # noqa: E402  (pydantic only: `preftune --help` stays fast)


@config_command(app, "inspect", InspectConfig, "data", "model", "reward_model", "tokenizer", ("output", "-o"),
                "max_length", "max_prompt_length", "near_duplicate_threshold", "precision")
def inspect_cmd(
    set_: list[str] = set_option(InspectConfig),
    *,
    overrides: dict[str, Any],
) -> None:
    """Diagnose a preference data file before training: counts, length bias, duplicates, truncation,
    and with a model the CHES score of every pair, with a reward model the reward margins."""
    from preftune.data.inspect import inspect_data, render_markdown
    from preftune.train.config import load_config, parse_set

    with _user_errors():
        cfg = load_config(None, {**overrides, **parse_set(set_ or [])}, model=InspectConfig)
        model = tokenizer = reward_model = None
        if cfg.model is not None:
            from preftune.model import load_model

            model, tokenizer = load_model(cfg.model, dtype="float32")
        elif cfg.tokenizer_spec() is not None:
            from preftune.model import load_tokenizer

            tokenizer = load_tokenizer(cfg.tokenizer_spec())
        if cfg.reward_model is not None:
            from preftune.reward.model import load_preference_model

            reward_model = load_preference_model(cfg.reward_model, device=cfg.device)
        report = inspect_data(cfg, model=model, tokenizer=tokenizer, reward_model=reward_model,
                              log=lambda m: typer.echo(m, err=True))
    typer.echo(render_markdown(report))
    typer.echo(f"written: {', '.join(report['files'])}", err=True)


# ------------------------------------------------------------------------------ end of inspect ---


# ------------------------------------------------- data builders (owner: preftune/online/annotate.py) ---
from preftune.online.annotate import BrainDataConfig, RationalesConfig  # noqa: E402  (pydantic only)

data_app = typer.Typer(no_args_is_help=True, help="Build training data with a model: rationales, BRAIn samples.")
app.add_typer(data_app, name="data")


@config_command(data_app, "rationales", RationalesConfig, "data", "output", "model", "kind", "max_new_tokens",
                "batch_size", "pair_strategy")
def data_rationales_cmd(*, overrides: dict[str, Any]) -> None:
    """Add a generated rationale to every preference pair (RDPO / R-ORPO data: `--loss rdpo_rationale`)."""
    from preftune.online.annotate import annotate_rationales

    with _user_errors():
        cfg = RationalesConfig(**overrides)
        path = annotate_rationales(cfg.data, cfg.output, cfg.model, kind=cfg.kind, max_new_tokens=cfg.max_new_tokens,
                                   batch_size=cfg.batch_size, pair_strategy=cfg.pair_strategy, log=typer.echo)
    typer.echo(f"written: {path}")


@config_command(data_app, "brain", BrainDataConfig, "prompts", "output", "model", "judge", "prior", "k",
                "max_new_tokens", "seed", "batch_size", "max_length", "max_prompt_length", "chat_template")
def data_brain_cmd(*, overrides: dict[str, Any]) -> None:
    """Sample K responses per prompt (temperature 1), score them with a judge and record their log-probs under
    the proposal and the prior (BRAIn data: `--loss brain`)."""
    from preftune.online.annotate import sample_brain_data

    with _user_errors():
        cfg = BrainDataConfig(**overrides)
        if cfg.judge is None:
            raise ValueError("--judge is required: a pointwise judge of the samples (task:NAME or rm:PATH)")
        opts = cfg.model_dump(exclude={"prompts", "output", "model", "judge"})
        path = sample_brain_data(cfg.prompts, cfg.output, cfg.model, cfg.judge, log=typer.echo, **opts)
    typer.echo(f"written: {path}")


# fspo (owner: preftune/data/fspo.py): few-shot-conditioned pairs for personalisation (METHODS.md §M8)
from preftune.data.fspo import FspoDataConfig  # noqa: E402  (pydantic only)


@config_command(data_app, "fspo", FspoDataConfig, "data", "output", "shots", "seed", "min_shots", "eval_users",
                "eval_output", "pair_strategy")
def data_fspo_cmd(*, overrides: dict[str, Any]) -> None:
    """Prefix every pair's prompt with N other pairs of the same user (FSPO data: train with `--loss ipo_sum`
    or `dpo`); no model needed. Users with fewer other pairs get all of them; held-out users go to --eval-output."""
    from preftune.data.fspo import build_fspo_file

    with _user_errors():
        paths = build_fspo_file(FspoDataConfig(**overrides), log=typer.echo)
    typer.echo(f"written: {', '.join(map(str, paths))}")


# mapl (owner: preftune/data/mapl.py): MAPL's intra- and inter-sample pairs for multi-instruction prompts (§M5)
from preftune.data.mapl import MaplDataConfig  # noqa: E402  (pydantic only)


@config_command(data_app, "mapl", MaplDataConfig, "data", "output", "instructions", "families", "levels",
                "keep_original", "seed", "pair_strategy")
def data_mapl_cmd(*, overrides: dict[str, Any]) -> None:
    """Add MAPL's multi-level pairs: one response under a prompt with instructions it meets vs one it violates
    (pair_prompts, intra-sample) and instruction-augmented pairs ordered by compliance (inter-sample); no model
    needed. Train with `--loss mapl_intra` (or mapl_inter)."""
    from preftune.data.mapl import build_mapl_file

    with _user_errors():
        path = build_mapl_file(MaplDataConfig(**overrides), log=typer.echo)
    typer.echo(f"written: {path}")


# --------------------------------------------------------------------------- end of data builders ---


# ------------------------------------------------- value-search (owner: preftune/eval/value_search.py) ---
from preftune.eval.value_search import SearchConfig  # noqa: E402  (pydantic only: `preftune --help` stays fast)


@config_command(app, "value-search", SearchConfig, "prompts", "model", "critic", ("output", "-o"), "width",
                "max_steps", "max_step_tokens", "max_length", "temperature", "seed", "device")
def value_search_cmd(
    set_: list[str] = set_option(SearchConfig),
    *,
    overrides: dict[str, Any],
) -> None:
    """OREO's value-guided beam search: steps sampled from the policy, kept or dropped by the critic's value
    (a `--loss oreo` run's output/model and output/critic); one answer per prompt."""
    from preftune.eval.value_search import run_search
    from preftune.train.config import load_config, parse_set

    with _user_errors():
        cfg = load_config(None, {**overrides, **parse_set(set_ or [])}, model=SearchConfig)
        path = run_search(cfg, log=lambda m: typer.echo(m, err=True))
    typer.echo(f"written: {path}")


# ------------------------------------------------------------------------- end of value-search ---


def main() -> None:
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        app()
        return
    # under accelerate launch / torchrun: every process ends through end_launch (train/distributed.py)
    from preftune.train.distributed import end_launch

    try:
        app()
    except SystemExit as e:
        end_launch(e.code)
    end_launch(0)


if __name__ == "__main__":
    main()
