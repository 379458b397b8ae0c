"""Reward and preference models: a sequence-classification head on any HF model, and the scoring API.

Saved layout (``output/model``): a plain ``AutoModelForSequenceClassification`` folder (LoRA merged),
with ``num_labels`` = 1 (Bradley–Terry), A (regression, ``id2label`` = the attribute names) or 2k
(GPM), and the settings needed to use the outputs under the ``preftune_reward`` key of
``config.json`` (kind, τ, normalisation, attributes, tokenisation). It travels with the weights in
one atomic write, and ``AutoModelForSequenceClassification.from_pretrained`` ignores it.

    rm = load_preference_model("runs/reward/model")
    rm.score(["Q?", "Q?"], ["short answer", "long answer"])   # BT / regression: rewards (N,)
    rm.prefer("Q?", "short answer", "long answer")           # P(a ≻ b): σ(r_a − r_b), or GPM σ(s/τ)

The reward is read at the last non-pad token (the HF head's pooling); the pad id is set in the
model config. Texts are rendered and tokenised exactly as in training (``data.tokenize_example``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

META_KEY = "preftune_reward"


# ------------------------------------------------------------------------------------------ build


def build_reward_model(cfg, tokenizer, *, dtype: str = "float32"):
    """``AutoModelForSequenceClassification`` for ``cfg`` (a RewardConfig) with a fresh head (seeded).

    A source that is already a preftune regression model and a BT objective: the head starts from the
    ``reward_attribute`` row (HelpSteer2-Preference stage 2 reuses the stage-1 helpfulness head).
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from preftune.model import resolve_model

    source = resolve_model(cfg.model)
    src_cfg = AutoConfig.from_pretrained(source)
    src_meta = getattr(src_cfg, META_KEY, None) or {}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialised score.weight" is the point, not news
    try:
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)
            if src_meta.get("kind") == "regression" and cfg.kind == "bt":
                model = AutoModelForSequenceClassification.from_pretrained(
                    source, dtype=getattr(torch, dtype)
                )
                _keep_head_row(model, src_meta["attributes"].index(src_meta["reward_attribute"]))
            else:
                model = AutoModelForSequenceClassification.from_pretrained(
                    source,
                    num_labels=cfg.num_labels,
                    dtype=getattr(torch, dtype),
                    ignore_mismatched_sizes=True,
                )
    finally:
        hf_logging.set_verbosity(verbosity)
    set_pad(model, tokenizer)
    describe(model, cfg)
    return model


def _keep_head_row(model, row: int) -> None:
    head = model.score
    new = torch.nn.Linear(head.in_features, 1, bias=head.bias is not None, dtype=head.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(head.weight[row : row + 1])
        if head.bias is not None:
            new.bias.copy_(head.bias[row : row + 1])
    model.score = new
    model.config.num_labels = 1


def set_pad(model, tokenizer) -> None:
    """The head pools at the last token that is not the pad id, so config and tokenizer must agree."""
    from preftune.model import ensure_pad_token

    ensure_pad_token(tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id


def describe(model, cfg) -> None:
    """Write label names and the ``preftune_reward`` settings into the model config."""
    labels = {
        "bt": ["reward"],
        "regression": list(cfg.attributes),
        "gpm": [f"gpm_{i}" for i in range(cfg.gpm_dim)],
    }[cfg.kind]
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {v: k for k, v in enumerate(labels)}
    params = cfg.objective().resolve(cfg.loss_hyperparameters())
    meta: dict[str, Any] = {
        "kind": cfg.kind,
        "objective": cfg.loss,
        "chat_template": cfg.chat_template,
        "max_length": cfg.max_length,
        "max_prompt_length": cfg.max_prompt_length,
        "truncation_mode": cfg.truncation_mode,
    }
    if cfg.kind == "regression":
        meta |= {
            "attributes": list(cfg.attributes),
            "reward_attribute": cfg.reward_attribute or cfg.attributes[0],
        }
    if cfg.kind == "gpm":
        meta |= {"k": cfg.gpm_dim // 2, "tau": float(params["tau"]), "normalize": bool(params["normalize"])}
    if cfg.loss == "rm_carm":  # a context-aware RM: judges render a context in front of the prompt the same way
        meta |= {"context_template": cfg.context_template}
    setattr(model.config, META_KEY, meta)


def apply_reward_lora(model, cfg):
    """LoRA adapters (``task_type=SEQ_CLS``: the new head trains in full, as ``modules_to_save``)."""
    from peft import LoraConfig, get_peft_model

    from preftune.model import LoraSettings
    from preftune.model.lora import quiet_peft_deprecations

    s = LoraSettings(
        r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target_modules=cfg.lora_target
    )
    config = LoraConfig(
        r=s.r,
        lora_alpha=s.alpha,
        lora_dropout=s.dropout,
        target_modules=s.target_modules,
        bias=s.bias,
        task_type="SEQ_CLS",
    )
    with quiet_peft_deprecations():  # peft's own read of a deprecated transformers alias
        return get_peft_model(model, config)


def plain_model(model):
    """The model as a plain HF seq-cls model: adapters merged into a copy (the original keeps training)."""
    import copy

    from preftune.model import is_peft_model, unwrap_model

    model = unwrap_model(model)
    return copy.deepcopy(model).merge_and_unload() if is_peft_model(model) else model


# ------------------------------------------------------------------------------------------ forward


def pad_right(seqs: list[list[int]], pad_id: int, device=None) -> tuple[Tensor, Tensor]:
    """(input_ids, attention_mask), both (N, L), right-padded with ``pad_id``."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def group_sequences(prompt_ids: list[list[int]], response_ids: list[list[list[int]]]) -> list[list[int]]:
    """prompt + response token lists, group-major (B·K sequences)."""
    return [p + r for p, rs in zip(prompt_ids, response_ids, strict=True) for r in rs]


# ------------------------------------------------------------------------------------------ use


class RewardModel:
    """A trained reward / preference model: ``score`` (rewards), ``prefer`` (P(a ≻ b)), ``embed`` (GPM).

    ``kind``: ``bt`` (one reward), ``regression`` (one output per attribute; the reward is the
    ``reward_attribute`` head) or ``gpm`` (2k-dim preference embeddings: no scalar reward, only
    preferences — it can represent cycles no reward can).
    """

    def __init__(self, model, tokenizer, meta: dict | None = None, device: str | torch.device | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.meta = dict(
            meta if meta is not None else getattr(model.config, META_KEY, None) or {"kind": "bt"}
        )
        self.kind = self.meta.get("kind", "bt")
        # CARM: the context every prompt is judged under (reward/carm.py render_context); None: the bare prompt.
        self.context: str | None = None
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model.to(self.device).eval()
        set_pad(self.model, tokenizer)

    # --- raw outputs
    def _tokenize(self, prompt, response) -> list[int]:
        from preftune.data import Example, tokenize_example

        m = self.meta
        if self.context is not None:
            from preftune.reward.carm import DEFAULT_TEMPLATE, render_context

            prompt = render_context(prompt, self.context, m.get("context_template", DEFAULT_TEMPLATE))
        tok = tokenize_example(
            Example(prompt, [response]),
            self.tokenizer,
            max_length=m.get("max_length"),
            max_prompt_length=m.get("max_prompt_length"),
            truncation_mode=m.get("truncation_mode", "keep_end"),
            chat_template=m.get("chat_template", "auto"),
        )
        return tok.prompt_ids + tok.response_ids[0]

    @torch.no_grad()
    def outputs(self, prompts, responses: list, batch_size: int = 8) -> Tensor:
        """Head outputs (N, num_labels) for N (prompt, response); one prompt is shared by all responses."""
        prompts = _broadcast(prompts, len(responses))
        seqs = [self._tokenize(p, r) for p, r in zip(prompts, responses, strict=True)]
        out = []
        for s in range(0, len(seqs), batch_size):
            ids, mask = pad_right(seqs[s : s + batch_size], self.model.config.pad_token_id, self.device)
            out.append(self.model(input_ids=ids, attention_mask=mask).logits.float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.model.config.num_labels)

    def score(self, prompts, responses: list, batch_size: int = 8) -> Tensor:
        """Rewards (N,). Only defined up to a per-prompt constant: compare responses of one prompt."""
        out = self.outputs(prompts, responses, batch_size)
        if self.kind == "gpm":
            raise TypeError("a GPM preference model has no scalar reward; use prefer() or embed()")
        if self.kind == "regression":
            return out[:, self.meta["attributes"].index(self.meta["reward_attribute"])]
        return out[:, 0]

    def attribute_scores(self, prompts, responses: list, batch_size: int = 8) -> dict[str, Tensor]:
        """Regression models: {attribute: ratings (N,)}."""
        if self.kind != "regression":
            raise TypeError(f"attribute_scores needs a regression model, this one is {self.kind}")
        out = self.outputs(prompts, responses, batch_size)
        return {a: out[:, i] for i, a in enumerate(self.meta["attributes"])}

    def embed(self, prompts, responses: list, batch_size: int = 8) -> Tensor:
        """GPM preference embeddings (N, 2k), L2-normalised when the model was trained so."""
        if self.kind != "gpm":
            raise TypeError(f"embed needs a GPM model, this one is {self.kind}")
        v = self.outputs(prompts, responses, batch_size)
        return torch.nn.functional.normalize(v, dim=-1) if self.meta.get("normalize", True) else v

    # --- preferences
    def prefer_batch(self, prompts, a: list, b: list, batch_size: int = 8) -> Tensor:
        """P(a_i ≻ b_i | prompt_i) (N,): σ(r_a − r_b) for rewards, σ(s(a ≻ b)/τ) for GPM."""
        from preftune.losses.reward import gpm_score

        n = len(a)
        prompts = _broadcast(prompts, n)
        both = list(prompts) + list(prompts)
        if self.kind == "gpm":
            v = self.embed(both, list(a) + list(b), batch_size)
            return torch.sigmoid(gpm_score(v[:n], v[n:]) / self.meta.get("tau", 0.1))
        r = self.score(both, list(a) + list(b), batch_size)
        return torch.sigmoid(r[:n] - r[n:])

    def prefer(self, prompt, a, b) -> float:
        """P(a ≻ b | prompt)."""
        return float(self.prefer_batch([prompt], [a], [b])[0])


def _broadcast(prompts, n: int) -> list:
    """One prompt (text, or a chat as a list of message dicts) for all n, or a list of n prompts."""
    single = isinstance(prompts, str) or (
        isinstance(prompts, list) and prompts and isinstance(prompts[0], dict)
    )
    if single:
        return [prompts] * n
    prompts = list(prompts)
    if len(prompts) != n:
        raise ValueError(f"{len(prompts)} prompts for {n} responses")
    return prompts


def load_preference_model(
    path: str | Path, *, device: str | None = None, dtype: str = "float32", user_id: Any = None
) -> RewardModel:
    """Load a saved reward / preference model folder (or any HF seq-cls model: read as BT, one reward).

    A PAL folder (reward/pal.py) loads as a ``PALRewardModel`` scoring for ``user_id`` (None: the population
    mean of the users' mixture weights)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from preftune.model import load_tokenizer, resolve_model

    source = resolve_model(path)
    kind = (getattr(AutoConfig.from_pretrained(source), META_KEY, None) or {}).get("kind")
    if kind in ("pal_a", "pal_b"):
        from preftune.reward.pal import PALRewardModel, load_pal_model

        return PALRewardModel(load_pal_model(source, dtype=dtype), load_tokenizer(source), user_id, device)
    if user_id is not None:
        raise ValueError(f"user_id={user_id!r}: {path} is not a PAL model (only PAL models score per user)")
    model = AutoModelForSequenceClassification.from_pretrained(source, dtype=getattr(torch, dtype))
    return RewardModel(model, load_tokenizer(source), device=device)
