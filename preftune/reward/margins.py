"""MODPO's margin rewards from models, computed once before training and cached (METHODS.md §M1).

MODPO folds other objectives' rewards into DPO's logit as a margin. They come from the data (the
``margin_rewards`` field, one list per response) or from *margin models*, scored here on every
training and eval example before the first step:

* a reward model (a ``preftune reward train`` folder, or any HF sequence-classification model): its
  reward r_j(x, y), read through its own template and tokenizer (``RewardModel.score``);
* a policy (a causal-LM folder or a saved LoRA adapter folder): its implicit DPO reward
  r_j = β_j·(ℓ_{π_j}(y) − ℓ_ref(y)) on the training run's own token ids, with the run's reference
  (``TrainConfig.model``) and β_j = ``margin_beta`` (default: the loss's β, as the authors' scripts).

Model columns follow the data's columns, in ``margin_models`` order. Values are cached on disk (JSON,
written atomically) under a key of the model weights, the data and the settings, like the reference
log-probs: a second run on the same data and models reads them back.

    from preftune.reward.margins import train_with_margins
    train_with_margins(TrainConfig(loss="modpo", data="pairs.jsonl", margin_models=["runs/rm/model"],
                                   loss_params={"w": [0.5, 0.5]}))

``preftune train --loss modpo --set margin_models=[PATH]`` runs the same.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

CACHE_VERSION = 1


@dataclass(frozen=True)
class MarginSource:
    """One margin model: where it is, how it gives a reward, and the column's name."""

    path: str
    kind: Literal["reward_model", "implicit"]

    @property
    def name(self) -> str:
        tag = "rm" if self.kind == "reward_model" else "implicit"
        return f"{tag}:{Path(str(self.path).rstrip('/')).name or self.path}"


def margin_source(path: str) -> MarginSource:
    """A reward model when the folder's config is a sequence-classification model (or a preftune reward
    model); otherwise a policy whose implicit DPO reward is the margin."""
    from transformers import AutoConfig

    from preftune.model import is_adapter_folder, resolve_model
    from preftune.reward.model import META_KEY

    source = resolve_model(path)
    if isinstance(source, Path) and is_adapter_folder(source):
        return MarginSource(str(path), "implicit")
    cfg = AutoConfig.from_pretrained(source)
    seq_cls = any(a.endswith("ForSequenceClassification") for a in (getattr(cfg, "architectures", None) or []))
    return MarginSource(str(path), "reward_model" if seq_cls or getattr(cfg, META_KEY, None) else "implicit")


# ------------------------------------------------------------------------------------------ scoring


def reward_model_margins(rm, examples: list, batch_size: int = 8) -> list[list[float]]:
    """``out[i][k]`` = r(x_i, y_ik) of a loaded ``RewardModel`` (BT reward, or a regression model's reward
    attribute); a GPM has no scalar reward and is refused."""
    if rm.kind == "gpm":
        raise ValueError("a GPM preference model has no scalar reward to use as a MODPO margin")
    return [rm.score(ex.prompt, list(ex.responses), batch_size).tolist() for ex in examples]


def implicit_margins(
    policy, reference, tokenized: list, pad_id: int, beta: float, batch_size: int = 8
) -> list[list[float]]:
    """``out[i][k]`` = β·(ℓ_π(y_ik) − ℓ_ref(y_ik)): the implicit DPO reward of ``policy`` against ``reference``
    on the given token ids (sequence sums over response tokens)."""
    from preftune.model.scoring import response_token_logps

    prompts = [list(e.prompt_ids) for e in tokenized]
    responses = [[list(r) for r in e.response_ids] for e in tokenized]
    pol = response_token_logps(policy, prompts, responses, pad_id, batch_size=batch_size)
    ref = response_token_logps(reference, prompts, responses, pad_id, batch_size=batch_size)
    return [[beta * float(a.sum() - b.sum()) for a, b in zip(pa, ra, strict=True)]
            for pa, ra in zip(pol, ref, strict=True)]


# ------------------------------------------------------------------------------------------ cache


def _digest(*parts: Any) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([CACHE_VERSION, *parts], sort_keys=True, default=str).encode())
    return h.hexdigest()


def _read(path: Path, n: int) -> list[list[float]] | None:
    if not path.exists():
        return None
    values = json.loads(path.read_text(encoding="utf-8"))
    return values if len(values) == n else None


def _write(path: Path, values: list[list[float]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(values, f)
    os.replace(tmp, path)  # a reader never sees half a file


def cache_dir(cfg) -> Path:
    from preftune.model.reference import default_cache_dir

    return (Path(cfg.ref_cache_dir) if cfg.ref_cache_dir else default_cache_dir()).parent / "margins"


# ------------------------------------------------------------------------------------------ examples


def add_margin_rewards(examples: list, cfg, tokenizer, log=print) -> list:
    """Copies of ``examples`` (``data.Example``) whose ``inputs['margin_rewards']`` (one list per response)
    end with one column per ``cfg.margin_models`` entry; every value computed once and cached."""
    import torch

    from preftune.model.reference import model_fingerprint
    from preftune.train.data_prep import tokenize_all

    if not examples or not cfg.margin_models:
        return list(examples)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    beta = cfg.margin_beta if cfg.margin_beta is not None else cfg.objective().resolve(cfg.loss_hyperparameters()).get(
        "beta", 0.1)
    texts = [[ex.prompt, list(ex.responses)] for ex in examples]
    columns: list[list[list[float]]] = []
    tokenized = reference = ref_fp = None
    for spec in cfg.margin_models:
        src = margin_source(spec)
        if src.kind == "reward_model":
            from preftune.reward.model import load_preference_model

            model = load_preference_model(src.path, device=device)
            key = _digest("rm", model_fingerprint(model.model), texts)
            what = "reward model"

            compute = partial(reward_model_margins, model, examples, cfg.batch_size)
        else:
            from preftune.model import load_model

            if tokenized is None:  # the training run's own token ids and reference (TrainConfig.model)
                tokenized = tokenize_all(examples, tokenizer, cfg, "margins", log).examples
                reference = load_model(cfg.model, dtype="float32")[0].to(device)
                ref_fp = model_fingerprint(reference)
            model = load_model(src.path, dtype="float32")[0].to(device)
            key = _digest("implicit", model_fingerprint(model), ref_fp, beta, [[e.prompt_ids, e.response_ids]
                                                                                for e in tokenized])
            what = f"implicit reward, β={beta}"
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

            compute = partial(implicit_margins, model, reference, tokenized, pad, beta, cfg.batch_size)
        path = cache_dir(cfg) / f"{key}.json"
        values = _read(path, len(examples))
        if values is None:
            log(f"margin rewards: {src.name} ({what}) on {len(examples)} examples (cached at {path})")
            values = compute()
            _write(path, values)
        else:
            log(f"margin rewards: {src.name} cache hit {path}")
        del model, compute
        columns.append(values)
    out = []
    for i, ex in enumerate(examples):
        have = ex.inputs.get("margin_rewards") or [[] for _ in ex.responses]
        rows = [list(have[k]) + [float(col[i][k]) for col in columns] for k in range(len(ex.responses))]
        out.append(dataclasses.replace(ex, inputs={**ex.inputs, "margin_rewards": rows}))
    return out


def margin_columns(examples: list) -> int:
    """Number of margin reward columns the examples carry (0 without margin_rewards)."""
    rows = examples[0].inputs.get("margin_rewards") if examples else None
    return len(rows[0]) if rows else 0


def train_with_margins(cfg, **kwargs):
    """``train.trainer.train`` on ``cfg.data`` (and ``eval_data``) with the margin models' columns added.

    The weights are checked against the columns before anything is written: w needs 1 + columns entries."""
    from preftune.losses.pairwise import modpo_weights
    from preftune.model import load_tokenizer
    from preftune.train.data_prep import load_examples
    from preftune.train.trainer import train

    if cfg.data is None:
        raise ValueError("no training data: pass --data PATH (or data: in the config)")
    obj = cfg.objective()
    tokenizer = kwargs.pop("tokenizer", None) or load_tokenizer(cfg.model)
    train_ex = add_margin_rewards(load_examples(cfg.data, obj, cfg, tokenizer, split=cfg.split), cfg, tokenizer)
    eval_ex = None
    if cfg.eval_data is not None:
        eval_ex = add_margin_rewards(load_examples(cfg.eval_data, obj, cfg, tokenizer), cfg, tokenizer)
    modpo_weights(obj.resolve(cfg.loss_hyperparameters()).get("w"), margin_columns(train_ex))
    return train(cfg, train_examples=train_ex, eval_examples=eval_ex, tokenizer=tokenizer, **kwargs)
