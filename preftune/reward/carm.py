"""Context-aware preference modelling (CARM; Pitis et al., arXiv 2407.14916; METHODS.md §M12), trained by
``preftune reward train --loss carm`` (registry name ``rm_carm``).

A pair is judged under a context z (a criterion, scenario or user profile), given per pair in the record
field ``pair_contexts``. The reward model reads z rendered in front of the prompt ([preftune] template
"Evaluate the response according to: {context}", a blank line, then the prompt; for chat prompts the text
goes in front of the first user turn) and is trained with Bradley–Terry on r_φ(x, z, y):
L = −log σ(r_φ(x,z,y_w^z) − r_φ(x,z,y_l^z)). Pairs without a context train on the bare prompt.

Evaluation (``eval/context_acc``, ``eval/context_free_acc`` in the trainer's eval metrics;
:func:`context_accuracy` also gives (iii)): (i) accuracy of pairs that have a context, judged with it;
(ii) the same pairs judged without it; (iii) [preftune] row consistency: every context-bearing pair of a
record right. On data whose labels reverse with the context a context-blind scorer gets exactly ½ on (i)
and 0 on (iii).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from preftune.losses.registry import Hyper, Objective

DEFAULT_TEMPLATE = "Evaluate the response according to: {context}"
PAPER = "Improving Context-Aware Preference Modeling for Language Models"


def _carm_fn(policy, ref=None, center_rewards_coefficient: float = 0.0):
    """BT on context-conditioned rewards (the same function as rm_bt: the context lives in the prompt)."""
    from preftune.losses import get

    return get("rm_bt").fn(policy, ref, center_rewards_coefficient)


OBJECTIVE = Objective(
    name="rm_carm",
    fn=_carm_fn,
    summary="Context-aware reward model: Bradley–Terry on r(x, z, y) with the pair's context z in the prompt",
    paper=PAPER,
    arxiv="2407.14916",
    shape="paired",
    reference="none",
    normalisation="sum",
    trains="reward_model",
    hyperparameters={"center_rewards_coefficient": Hyper(0.0, 0.0, None, help="reward centering, as rm_bt")},
    notes="[reward-model objective] records carry pair_contexts (one string per pair).",
)


def render_context(prompt: Any, context: str | None, template: str = DEFAULT_TEMPLATE) -> Any:
    """The prompt the context-aware RM reads: the rendered context, a blank line, then the prompt."""
    if context is None:
        return prompt
    head = template.format(context=context)
    if isinstance(prompt, str):
        return f"{head}\n\n{prompt}"
    messages = copy.deepcopy(prompt)
    for m in messages:
        if m.get("role") == "user":
            m["content"] = f"{head}\n\n{m['content']}"
            return messages
    return [{"role": "user", "content": head}, *messages]


def context_examples(records, template: str = DEFAULT_TEMPLATE, pair_strategy: str = "best_worst") -> list:
    """(chosen, rejected) examples with each pair's context rendered into the prompt; each example keeps the
    bare prompt as ``context_free_prompt`` and its context as ``context`` (None without one)."""
    from preftune.data import derive_examples

    out = []
    for rec in records:
        exs = derive_examples([rec], "paired", pair_strategy=pair_strategy)
        contexts = rec.pair_contexts if rec.pair_contexts is not None else [None] * len(exs)
        for ex, ctx in zip(exs, contexts, strict=True):
            ex.context_free_prompt, ex.context = ex.prompt, ctx
            ex.prompt = render_context(ex.prompt, ctx, template)
            out.append(ex)
    return out


def context_free_prompt_ids(examples, tokenizer, cfg) -> list[list[int] | None]:
    """Token ids of each example's bare prompt (None where the example has no context)."""
    from preftune.data import Example, tokenize_example

    out = []
    for ex in examples:
        if getattr(ex, "context", None) is None:
            out.append(None)
            continue
        tok = tokenize_example(Example(ex.context_free_prompt, ex.responses), tokenizer, max_length=cfg.max_length,
                               max_prompt_length=cfg.max_prompt_length, truncation_mode=cfg.truncation_mode,
                               chat_template=cfg.chat_template)
        out.append(tok.prompt_ids)
    return out


def context_accuracy(margins: list[float], rows: list[Any], free_margins: list[float] | None = None) -> dict:
    """(i) ``context_acc``, (ii) ``context_free_acc`` (with ``free_margins``) and (iii) ``context_consistency``
    from per-item margins r(x,z,y_w) − r(x,z,y_l); ``rows`` keys the record each item comes from. A tie
    (margin 0) counts ½ in accuracies and as wrong in consistency."""

    def acc(ms):
        return sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in ms) / len(ms) if ms else float("nan")

    by_row: dict[Any, bool] = {}
    for m, r in zip(margins, rows, strict=True):
        by_row[r] = by_row.get(r, True) and m > 0
    out = {"context_acc": acc(margins),
           "context_consistency": sum(by_row.values()) / len(by_row) if by_row else float("nan")}
    if free_margins is not None:
        out["context_free_acc"] = acc(free_margins)
    return out


def add_context_metrics(forward, runner, dataset, indices: list[int], result, rewards: torch.Tensor) -> None:
    """Eval metrics ``context_acc`` and ``context_free_acc`` (NaN for pairs without a context, which the
    Runner's means leave out): the pairs of ``indices`` as scored with their context (``rewards`` (B, 2)),
    and scored again on the bare prompt (``dataset.context_free_prompt_ids``, set by reward.data.prepare)."""
    from preftune.reward.model import pad_right

    free = getattr(dataset, "context_free_prompt_ids", None)
    if free is None:
        return
    rows = [(i, free[j]) for i, j in enumerate(indices) if free[j] is not None]
    with_ctx = torch.full((len(indices),), float("nan"))
    without = with_ctx.clone()
    if rows:
        seqs = [p + r for i, p in rows for r in dataset.examples[indices[i]].response_ids]
        ids, mask = pad_right(seqs, forward.pad_id, runner.acc.device)
        with torch.no_grad(), runner.acc.autocast():
            r = runner.engine(ids, mask).float()[:, 0].view(len(rows), 2).cpu()
        sel = torch.tensor([i for i, _ in rows])
        rw = rewards.detach().float().cpu()
        with_ctx[sel] = (rw[sel, 0] > rw[sel, 1]).float()
        without[sel] = (r[:, 0] > r[:, 1]).float()
    result.metrics["context_acc"] = with_ctx
    result.metrics["context_free_acc"] = without
