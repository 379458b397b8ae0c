"""`preftune value-search`: OREO's value-guided step-level beam search over a prompts file (METHODS.md §M7;
jwhj/OREO ``examples/scratch/batch_sbs.py``), with a policy and the critic an OREO run saved (``output/critic``).

The search itself is ``preftune.model.critic.value_guided_beam``; this module reads prompts, renders them as
training does (the chat template for conversations, or ``chat_template``), runs the search per prompt and writes
one JSON line per prompt. Importing it loads pydantic only (the command's ``--help`` stays fast).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class SearchConfig(BaseModel):
    """Options of `preftune value-search`."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    prompts: str = Field(..., description="JSONL file with a `prompt` per line (text or chat messages)")
    model: str = Field(..., description="the policy that proposes steps: an OREO run's output/model (or any model)")
    critic: str = Field(..., description="the critic: an OREO run's output folder or its output/critic")
    output: str = Field("runs/value_search/answers.jsonl",
                        description="one JSON line per prompt: the answer and its value")
    width: int = Field(3, gt=0, description="beams kept, and samples drawn from each beam per step (authors: K = 3)")
    max_steps: int = Field(20, gt=0, description="longest search, in steps")
    delimiter: str = Field("\n", description="a step ends at the first token whose text holds it (the training one)")
    max_step_tokens: int = Field(
        256, gt=0, description="a step without the delimiter after this many tokens ends the answer"
    )
    max_length: int = Field(1024, gt=1, description="prompt + answer tokens at most (the answer ends there)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the steps (the authors': 1)")
    chat_template: Literal["auto", "always", "never"] = Field(
        "auto", description="apply the tokenizer's chat template: auto = to conversations only (as in training)"
    )
    seed: int = Field(0, description="sampling seed")
    device: str | None = Field(None, description="cpu, cuda, ... (default: cuda when available)")


def read_prompts(path: str) -> list:
    """The ``prompt`` of every line; a line without one is an error naming the file, line and field."""
    prompts = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not JSON ({e.msg})") from None
        prompt = row.get("prompt") if isinstance(row, dict) else None
        if not isinstance(prompt, (str, list)) or not prompt:
            raise ValueError(f"{path}:{i}: prompt: missing (text or chat messages)")
        prompts.append(prompt)
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def prompt_ids(prompt, tokenizer, chat_template: str = "auto") -> list[int]:
    """Token ids of ``prompt`` as training renders it (the generation prompt included under a template)."""
    from preftune.data.tokenize import render_example

    r = render_example(prompt, [""], tokenizer, chat_template)
    return list(tokenizer(r.prompt, add_special_tokens=not r.templated)["input_ids"])


def run_search(cfg: SearchConfig, log=print) -> Path:
    """Search every prompt of ``cfg.prompts``; writes ``cfg.output`` (via a temporary file) and returns its path."""
    import torch

    from preftune.model import load_model
    from preftune.model.critic import load_critic, sampler, scorer, value_guided_beam

    prompts = read_prompts(cfg.prompts)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    policy, tokenizer = load_model(cfg.model, dtype="float32")
    policy = policy.to(device).eval()
    critic = load_critic(cfg.critic).to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(cfg.seed)
    rows = []
    for i, prompt in enumerate(prompts):
        ids = prompt_ids(prompt, tokenizer, cfg.chat_template)
        expand = sampler(policy, ids, tokenizer, delimiter=cfg.delimiter, max_step_tokens=cfg.max_step_tokens,
                         temperature=cfg.temperature, max_length=cfg.max_length)
        best = value_guided_beam(expand, scorer(critic, ids, tokenizer.eos_token_id, pad), width=cfg.width,
                                 max_steps=cfg.max_steps)
        answer = None if best is None else tokenizer.decode(best.ids, skip_special_tokens=True)
        rows.append({"prompt": prompt, "answer": answer, "value": None if best is None else best.value})
        log(f"[{i + 1}/{len(prompts)}] value {rows[-1]['value']}")
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(out)
    return out
