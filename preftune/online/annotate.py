"""Data builders that need a model: rationales for preference pairs (RDPO / R-ORPO, METHODS.md §M3) and
BRAIn's K-sample lists with the log-probs of the distributions that drew them (METHODS.md §M6).

``annotate_rationales``: an instruction model reads (x, y_w, y_l) and the preference and explains it; the
reply becomes the pair's ``rationale`` (``preftune data rationales``). The paper's generator prompt is not
public [UNVERIFIED]: ``RATIONALE_REQUEST`` asks for the released sets' two kinds, a short general rationale
or a detailed specific one. Decoding is greedy.

``sample_brain_data``: K samples per prompt from the proposal q at temperature 1 without top-k/top-p (so the
sampling distribution is exactly q's), a pointwise judge's scores, and the summed log-probs under q and the
prior p (``prior`` model; absent, p = q) of exactly the tokens the trainer will score (the record tokenised as
``preftune train`` tokenises it), so log π_θ − log q is 0 at the start when π_θ = q (``preftune data brain``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

RATIONALE_REQUEST = {
    "general": (
        "Here is a request and two responses to it. A human judged Response A to be better than Response B.\n\n"
        "[Request]\n{prompt}\n\n[Response A]\n{chosen}\n\n[Response B]\n{rejected}\n\n"
        "In two or three sentences, give the general reason why Response A is preferable."
    ),
    "specific": (
        "Here is a request and two responses to it. A human judged Response A to be better than Response B.\n\n"
        "[Request]\n{prompt}\n\n[Response A]\n{chosen}\n\n[Response B]\n{rejected}\n\n"
        "Explain in detail why Response A is preferable, pointing to specific content of both responses."
    ),
}


class RationalesConfig(BaseModel):
    """Options of `preftune data rationales`."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    data: str = Field(..., description="preference data (any layout preftune reads: pairs, or scored lists)")
    output: str = Field(..., description="JSONL file of prompt/chosen/rejected/rationale rows")
    model: str = Field("smollm2-135m-instruct", description="the rationale generator: llm:MODEL or a model spec")
    kind: Literal["general", "specific"] = Field(
        "general", description="general: a short reason; specific: a detailed one citing both responses"
    )
    max_new_tokens: int = Field(128, gt=0, description="longest rationale in tokens (greedy decoding)")
    batch_size: int = Field(8, gt=0, description="sequences per generation batch")
    pair_strategy: Literal["best_worst", "all", "adjacent"] = Field(
        "best_worst", description="how pairs are built from scored or ranked lists (as in training)"
    )


class BrainDataConfig(BaseModel):
    """Options of `preftune data brain`."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    prompts: str = Field(..., description="JSONL rows with a prompt, or task:NAME (the task's training prompts)")
    output: str = Field(..., description="JSONL file of prompt/responses/scores/proposal_logps/prior_logps rows")
    model: str = Field("smollm2-135m-instruct", description="the proposal q that samples (llm:MODEL or a model spec)")
    judge: str | None = Field(None, description="pointwise judge of the samples' rewards: task:NAME or rm:PATH")
    prior: str | None = Field(None, description="the prior p (the SFT model); default: the proposal (p = q)")
    k: int = Field(4, ge=2, description="samples per prompt")
    max_new_tokens: int = Field(64, gt=0, description="longest sample in tokens")
    seed: int = Field(0, description="sampling seed")
    batch_size: int = Field(16, gt=0, description="sequences per generation / scoring batch")
    max_length: int = Field(1024, gt=1, description="as `preftune train`: the log-probs are of the tokens it scores")
    max_prompt_length: int = Field(512, gt=0, description="as `preftune train`")
    chat_template: Literal["auto", "always", "never"] = Field("auto", description="as `preftune train`")


def _model_spec(spec: str) -> str:
    """``llm:PATH`` (the judge spec form) or a plain model spec."""
    return spec.partition(":")[2] if spec.startswith("llm:") else spec


def _write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    """Written through a temporary file and renamed: a killed run leaves no half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)
    return path


def annotate_rationales(
    data: str,
    output: str,
    model: str,
    *,
    kind: str = "general",
    max_new_tokens: int = 128,
    batch_size: int = 8,
    pair_strategy: str = "best_worst",
    log: Callable[[str], None] = print,
    loaded: tuple[Any, Any] | None = None,
) -> Path:
    """Read preference data (any layout preftune reads; validated, errors with file, line and field), derive its
    pairs, generate one rationale per pair with ``model`` (``llm:MODEL`` or a model spec) and write
    ``prompt/chosen/rejected/rationale`` rows to ``output``. ``loaded``: an already loaded (model, tokenizer)."""
    from preftune import data as pdata
    from preftune.data.rationales import as_text
    from preftune.online.generate import generate

    if kind not in RATIONALE_REQUEST:
        raise ValueError(f"kind must be one of {', '.join(RATIONALE_REQUEST)}, got {kind!r}")
    records, _ = pdata.load_and_validate(data, objective_shape="paired")
    pairs = pdata.to_pairs(records, pair_strategy=pair_strategy)
    if loaded is None:
        from preftune.model import load_model

        loaded = load_model(_model_spec(model))
    lm, tokenizer = loaded
    requests = [[{"role": "user", "content": RATIONALE_REQUEST[kind].format(
        prompt=as_text(e.prompt), chosen=as_text(e.responses[0]), rejected=as_text(e.responses[1]))}]
        for e in pairs]
    chat = "always" if getattr(tokenizer, "chat_template", None) else "never"
    if chat == "never":  # a model without a chat template reads the request as plain text
        requests = [r[0]["content"] + "\nReason:" for r in requests]
    gens = generate(lm, tokenizer, requests, n=1, temperature=0.0, max_new_tokens=max_new_tokens,
                    batch_size=batch_size, chat_template=chat)
    rows = [{"prompt": e.prompt, "chosen": e.responses[0], "rejected": e.responses[1], "rationale": g[0].text}
            for e, g in zip(pairs, gens.samples, strict=True)]
    empty = sum(not r["rationale"].strip() for r in rows)
    if empty:
        log(f"warning: {empty} of {len(rows)} rationales are empty (training refuses them: raise max_new_tokens "
            "or use another model)")
    log(f"{len(rows)} pairs annotated with {kind} rationales by {model}")
    return _write_jsonl(output, rows)


def _summed_logps(model, prompt_ids, response_ids, pad_id, batch_size: int) -> list[list[float]]:
    from preftune.model.scoring import response_token_logps

    out = response_token_logps(model, prompt_ids, response_ids, pad_id, batch_size=batch_size)
    return [[float(t.sum()) for t in row] for row in out]


def sample_brain_data(
    prompts: str,
    output: str,
    model: str,
    judge: str,
    *,
    k: int = 4,
    prior: str | None = None,
    max_new_tokens: int = 64,
    seed: int = 0,
    batch_size: int = 16,
    max_length: int = 1024,
    max_prompt_length: int = 512,
    chat_template: str = "auto",
    log: Callable[[str], None] = print,
    loaded: tuple[Any, Any] | None = None,
    prior_model: Any = None,
) -> Path:
    """BRAIn records from a prompt file (JSONL rows with ``prompt``, or a task's prompts as ``task:NAME``): K
    samples of ``model`` (the proposal q) per prompt, ``judge``'s pointwise scores (``task:NAME``, ``rm:PATH``),
    ``proposal_logps`` under q and ``prior_logps`` under ``prior`` (absent: the same numbers, p = q)."""
    from preftune.data import Example, tokenize_example
    from preftune.online.generate import generate
    from preftune.reward.judges import make_judge

    if k < 2:
        raise ValueError("BRAIn needs k >= 2 samples per prompt")
    texts = _read_prompts(prompts)
    if loaded is None:
        from preftune.model import load_model

        loaded = load_model(_model_spec(model))
    lm, tokenizer = loaded
    scorer = make_judge(judge)
    if not scorer.pointwise:
        raise ValueError(f"judge {judge!r} has no pointwise scores (BRAIn needs a reward per sample): use task:NAME "
                         "or rm:PATH")
    # Temperature 1, no top-p: the samples come from q itself, whose log-probs are recorded below.
    gens = generate(lm, tokenizer, texts, n=k, temperature=1.0, top_p=1.0, max_new_tokens=max_new_tokens,
                    seed=seed, batch_size=batch_size, chat_template=chat_template)
    toks = [tokenize_example(Example(p, [s.text for s in row]), tokenizer, max_length=max_length,
                             max_prompt_length=max_prompt_length, chat_template=chat_template)
            for p, row in zip(texts, gens.samples, strict=True)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = ([t.prompt_ids for t in toks], [t.response_ids for t in toks])
    proposal = _summed_logps(lm, *ids, pad, batch_size)
    if prior is not None or prior_model is not None:
        if prior_model is None:
            from preftune.model import load_model

            prior_model = load_model(prior)[0]
        prior_logps = _summed_logps(prior_model, *ids, pad, batch_size)
    else:
        prior_logps = proposal
    rows = []
    for p, row, lq, lp in zip(texts, gens.samples, proposal, prior_logps, strict=True):
        responses = [s.text for s in row]
        rows.append({"prompt": p, "responses": responses, "scores": [float(x) for x in scorer.score(p, responses)],
                     "proposal_logps": lq, "prior_logps": lp})
    log(f"{len(rows)} prompts x {k} samples from {model} (temperature 1, top_p 1), scored by {judge}")
    return _write_jsonl(output, rows)


def _read_prompts(source: str) -> list:
    """Prompts from ``task:NAME`` (the task's training prompts) or a JSONL file of rows with ``prompt``."""
    if source.startswith("task:"):
        from preftune.tasks import get_task

        return list(get_task(source.partition(":")[2]).train_prompts())
    rows = []
    with open(source, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{source}:{n}: <line>: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), (str, list)) or not row["prompt"]:
                raise ValueError(f"{source}:{n}: prompt: missing (rows need a prompt: text or chat messages)")
            rows.append(row["prompt"])
    if not rows:
        raise ValueError(f"{source}: no prompts")
    return rows
