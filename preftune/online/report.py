"""``report.md`` and ``iterations.png`` of an online run: every figure read from the run folder's files."""

from __future__ import annotations

import json
from pathlib import Path

from preftune.online import store
from preftune.online.store import IterationDir


def _pct(v, lo=None, hi=None) -> str:
    if v is None:
        return "–"
    s = f"{100 * v:.1f}%"
    return s + (f" [{100 * lo:.1f}–{100 * hi:.1f}]" if lo is not None and hi is not None else "")


def _num(v, digits=2, se=None) -> str:
    if v is None:
        return "–"
    return f"{v:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None else "")


def eval_table(base: dict, rows: list[dict]) -> list[str]:
    """One line per iterate (π_0 first): the held-out figures a user reads first."""
    head = ["| iterate | success (95% CI) | greedy success | KL to π_0 | words | fluency NLL | distinct-2 | "
            "repeats | win rate vs π_{t−1} | pairs | seconds |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    evals = [(0, base, None, None)] + [
        (r["iter/t"], {k[5:]: v for k, v in r.items() if k.startswith("eval/")}, r.get("iter/pairs"),
         r.get("iter/seconds")) for r in rows]
    out = head
    for t, e, pairs, secs in evals:
        out.append(
            f"| π_{t} | {_pct(e.get('success'), e.get('success_low'), e.get('success_high'))} | "
            f"{_pct(e.get('greedy_success'), e.get('greedy_low'), e.get('greedy_high'))} | "
            f"{_num(e.get('kl_ref'), 2, e.get('kl_ref_se') if t else None)} | {_num(e.get('len_words'), 1)} | "
            f"{_num(e.get('fluency_nll'), 3)} | {_num(e.get('distinct2'), 3)} | "
            f"{_pct(e.get('repeat_rate'))} | {_pct(e.get('winrate_prev'))} | {pairs if pairs is not None else '–'} | "
            f"{_num(secs, 0)} |")
    return out


def criteria(base: dict, last: dict) -> list[str]:
    """Did the answers get better as a user would judge them? Greedy success must rise, and fluency, distinct-2
    and repetition must stay within 10% of π_0's (``eval.quality.within_tolerance``), sampled and greedy."""
    from preftune.eval.policy_eval import Mean, Rate
    from preftune.eval.quality import QualityEval, within_tolerance

    def q(e: dict) -> QualityEval:
        return QualityEval(e["distinct2"], Rate(e["repeat_rate"], e["repeat_low"], e["repeat_high"], e["n"]),
                           Mean(e["fluency_nll"], e["fluency_nll_se"], e["n"]))

    checks = within_tolerance(q(base), q(last))
    if base.get("greedy_distinct2") is not None and last.get("greedy_distinct2") is not None:
        g = within_tolerance(QualityEval(base["greedy_distinct2"], Rate(base["greedy_repeat_rate"], 0, 0, 0)),
                             QualityEval(last["greedy_distinct2"], Rate(last["greedy_repeat_rate"], 0, 0, 0)))
        checks.update({f"greedy {k}": v for k, v in g.items()})
    if base.get("fluency_nll_success") is not None and last.get("fluency_nll_success") is not None:
        # like for like: the accepted answers of both, so that shorter answers are not read as less fluent
        # only for being short (the rule above stays as the issue states it)
        checks["fluency of accepted answers within 10%"] = (
            last["fluency_nll_success"] <= 1.1 * base["fluency_nll_success"])
    if base.get("greedy_success") is not None and last.get("greedy_success") is not None:
        checks["greedy success rises"] = last["greedy_success"] > base["greedy_success"]
    checks["sampled success rises"] = last.get("success", 0) > base.get("success", 0)
    return ["| check (last iterate vs π_0) | holds |", "|---|---|"] + [
        f"| {k.replace('_', '-')} | {'yes' if v else '**no**'} |" for k, v in checks.items()]


def plot(out: Path, base: dict, rows: list[dict]) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [base] + [{k[5:]: v for k, v in r.items() if k.startswith("eval/")} for r in rows]
    ts = list(range(len(evals)))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    ax = axes[0]
    s = [100 * e.get("success", float("nan")) for e in evals]
    lo = [100 * (e.get("success", 0) - e.get("success_low", 0)) for e in evals]
    hi = [100 * (e.get("success_high", 0) - e.get("success", 0)) for e in evals]
    ax.errorbar(ts, s, yerr=[lo, hi], marker="o", capsize=4, label="sampled")
    if all(e.get("greedy_success") is not None for e in evals):
        ax.plot(ts, [100 * e["greedy_success"] for e in evals], marker="s", label="greedy")
    ax.set(xlabel="iteration", ylabel="held-out success (%)", ylim=(0, 105), title="success (95% Wilson)")
    ax.legend()
    axes[1].plot(ts, [e.get("kl_ref", 0.0) for e in evals], marker="o")
    axes[1].set(xlabel="iteration", ylabel="nats / answer", title="KL to π_0")
    axes[2].plot(ts, [e.get("len_words", float("nan")) for e in evals], marker="o")
    axes[2].set(xlabel="iteration", ylabel="words", title="mean answer length")
    for a in axes:
        a.set_xticks(ts)
    fig.tight_layout()
    path = out / "iterations.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _examples(out: Path, base_rows: list[dict], last_rows: list[dict], n: int = 4) -> list[str]:
    lines = []
    for kind in ("greedy", "sampled"):
        b = {(r["prompt"], r["k"]): r for r in base_rows if r["kind"] == kind}
        a = {(r["prompt"], r["k"]): r for r in last_rows if r["kind"] == kind}
        keys = sorted(set(a) & set(b))[:n]
        if not keys:
            continue
        lines += [f"### {kind.capitalize()} answers (same held-out prompt, π_0 → last iterate)", ""]
        for key in keys:
            lines += [f"- π_0 ({'✓' if b[key]['success'] else '✗'}): {_quote(b[key]['response'])}",
                      f"  last ({'✓' if a[key]['success'] else '✗'}): {_quote(a[key]['response'])}"]
        lines.append("")
    return lines


def _quote(text: str, limit: int = 240) -> str:
    t = " ".join(text.split())
    return "“" + (t if len(t) <= limit else t[:limit] + "…") + "”"


def write_report(out: Path, cfg, base: dict, rows: list[dict], log=print) -> Path:
    summary = cfg.summary()
    lines = [f"# preftune online: {cfg.algorithm} on {cfg.task}", "",
             f"Model `{cfg.model}`; {cfg.iterations} iterations × {cfg.prompts_per_iteration} prompts × "
             f"{summary['k']} samples; judge `{summary['judge']}`; objective `{summary['loss']}` "
             f"{json.dumps(summary['loss_params'])}; reference `{summary['ref_mode']}`; pair rule "
             f"`{summary['rule']}`. Held-out: {cfg.heldout_prompts} prompts on topics never trained on × "
             f"{cfg.heldout_samples} samples (temperature {cfg.eval_temperature}, top-p {cfg.eval_top_p}, "
             f"the same seed every iteration) plus one greedy answer each.", "",
             "## Held-out, per iterate", "", *eval_table(base, rows), ""]
    last = {k[5:]: v for k, v in rows[-1].items() if k.startswith("eval/")} if rows else {}
    if base.get("fluency_nll") is not None and last.get("fluency_nll") is not None:
        lines += ["## Better answers, or only a higher score?", "",
                  "Fluency within 10% (NLL ≤ 1.1 × π_0's), distinct-2 ≥ 0.9 × π_0's, repeating answers at most "
                  "10 points more than π_0's (`preftune.eval.quality.within_tolerance`):", "",
                  *criteria(base, last), ""]
        if base.get("lone_list_rate") is not None and last.get("lone_list_rate") is not None:
            lines += [f"Format habit (not a check): answers that open a list with a single item ("
                      f"\"1. Sleep is essential.\") {100 * base['lone_list_rate']:.1f}% → "
                      f"{100 * last['lone_list_rate']:.1f}%.", ""]
    if cfg.plot and rows:
        p = plot(out, base, rows)
        if p:
            lines += [f"![per iteration]({p.name})", ""]
    base_rows = store.read_jsonl(out / "eval_base.heldout.jsonl") if (out / "eval_base.heldout.jsonl").exists() \
        else []
    last = IterationDir(out, rows[-1]["iter/t"]).file("heldout.jsonl") if rows else None
    if last is not None and last.exists():
        lines += ["## Examples", "", *_examples(out, base_rows, store.read_jsonl(last))]
    lines += ["## How to read it", "",
              "- success: share of answers the task judge accepts, Wilson 95% interval; greedy: one greedy answer "
              "per prompt.",
              "- KL to π_0: mean over sampled answers of log π_t(y|x) − log π_0(y|x) on the sampled token ids "
              "(nats per answer, ± standard error).",
              "- fluency NLL: mean per-token negative log-likelihood of the answers' text (EOS left out) "
              "under π_0 (of all answers, and of the answers the judge accepts: per-token NLL is higher for "
              "short answers even when π_0 writes them, so the accepted answers compare like with like); "
              "distinct-2: unique "
              "word bigrams / all bigrams over the answers; repeats: share of answers that repeat a line or a "
              "phrase.",
              "- Files: `iterations.jsonl` (one row per iteration, ONLINE.md §0.4 keys), `iter_NN/` (samples with "
              "token ids, judgements, train_input, trainer metrics, the iterate's weights, held-out answers).",
              "", "## Settings", "", "```json", json.dumps(summary, indent=1), "```", ""]
    path = out / "report.md"
    store.write_text(path, "\n".join(lines))
    log(f"[online] report: {path}")
    return path
