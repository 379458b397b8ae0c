"""PAL: pluralistic reward models from prototype mixtures (Chen et al., arXiv 2406.08469; METHODS.md §M11,
LOSSES.md G4), trained by ``preftune reward train --loss pal_a|pal_b``.

Every user u owns only K mixture logits W_u; w_u = softmax(W_u / T) mixes K prototypes shared by all users,
so a new user is fitted from a few comparisons with everything else frozen (:func:`adapt_user`,
``preftune reward adapt``). Encodings are the LM backbone's final hidden states (``AutoModel``), mapped into
a d-dim preference space by a 2-layer GELU MLP f, as in the authors' ``pal_rm_{a,b}``:

* PAL-B: item e(x,y) = f(E(x⊕y)); the ideal point is prompt-conditioned, a_u(x) = Σ_k w_{u,k} g_k(E(x)) with
  K projector heads g_k; r_u(x,y) = c·cos(e, a_u), c = exp(s) ≤ 100, s initialised log(1/0.07); loss =
  cross-entropy over the two rewards (BT on r_u).
* PAL-A: prototypes P (K × hidden); a_u = f(w_uᵀP) (``f(Pw)``; also ``Pw``: P in the preference space,
  ``f(P)w``); r_u = −‖e − a_u‖ (closer is better); loss max(0, 1 − t·s), s = ‖e_1 − a_u‖ − ‖e_2 − a_u‖.

Label convention of the paper: t = +1 ⇔ the **second** response is preferred. preftune's pairs are
(chosen, rejected), so training always has t = −1; the paper-form functions below keep t for the tests.

Positions: the released trainers score every position from the one where the two token sequences diverge
to the end and weight the per-position losses (``cumulative``: (i+1)/(l(l+1)/2), the default; ``mean``;
``only_last``). [preftune] Past the end of the shorter response its last position is reused (the authors'
padded batch reads pad positions there). E(x) is the hidden state at the prompt's last token, read from the
prompt+response pass (a causal model gives the prompt-alone encoding there, without a second forward);
the reward the judge uses is the last-token one (the authors' scalar-RM export).

The prototype-norm bound λ·Σ_k max(0, ‖p_k‖ − B) is computed and logged but, as in the released trainers,
not back-propagated (``bound_in_loss`` adds it). PAL-A bounds the rows of P, PAL-B the prompt-conditioned
prototypes g_k(E(x)).

Saved folder (``output/model``): the backbone as a plain ``AutoModel`` folder (LoRA merged) with the
tokenizer, the settings under ``preftune_reward`` in ``config.json``, ``pal_heads.safetensors`` (f, g_k or
P, logit scale, the user table W) and ``pal_users.json`` (the ids of W's rows). ``load_preference_model``
and the ``rm:PATH?user_id=ID`` judge read it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from preftune.losses.base import LossOutput
from preftune.losses.registry import Hyper, Objective

KINDS = ("pal_a", "pal_b")
IDEAL_POINTS = ("f(Pw)", "Pw", "f(P)w")
WEIGHTINGS = ("cumulative", "mean", "only_last")
HEADS_FILE, USERS_FILE = "pal_heads.safetensors", "pal_users.json"
MAX_LOGIT_SCALE = 100.0
PAPER = "PAL: Pluralistic Alignment Framework for Learning from Heterogeneous Preferences"


# ------------------------------------------------------------------------------------------ the math


def user_weights(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """w_u = softmax(W_u / T) over the K prototypes. (..., K) → (..., K)."""
    return torch.softmax(logits / temperature, dim=-1)


def logit_scale(s: Tensor) -> Tensor:
    """c = exp(s), clamped at 100 (CLIP's cap, as the released PAL-B)."""
    return s.exp().clamp(max=MAX_LOGIT_SCALE)


def pal_b_ideal_point(w: Tensor, prototypes: Tensor) -> Tensor:
    """a_u(x) = Σ_k w_k g_k(E(x)). w (B, K), prototypes g_k(E(x)) (B, K, d) → (B, d)."""
    return (w.unsqueeze(-1) * prototypes).sum(-2)


def pal_b_rewards(items: Tensor, ideal: Tensor, scale: Tensor) -> Tensor:
    """r = c·cos(e, a): items (..., d), ideal broadcastable to it, scale c a scalar → (...)."""
    return scale * (F.normalize(items, dim=-1) * F.normalize(ideal, dim=-1)).sum(-1)


def pal_a_rewards(items: Tensor, ideal: Tensor) -> Tensor:
    """r = −‖e − a_u‖₂ (the ideal-point model: the closer response is preferred). (..., d) → (...)."""
    return -torch.linalg.vector_norm(items - ideal, dim=-1)


def pal_a_loss(dist_first: Tensor, dist_second: Tensor, t: Tensor | float) -> Tensor:
    """PAL-A hinge in the paper's form: s = ‖e_1 − a_u‖ − ‖e_2 − a_u‖, L = max(0, 1 − t·s), t = +1 ⇔ the
    second response is preferred."""
    return F.relu(1.0 - t * (dist_first - dist_second))


def pal_b_loss(r_first: Tensor, r_second: Tensor, t: Tensor | float) -> Tensor:
    """PAL-B cross-entropy over the two rewards, target = the second if t = +1: −log softmax(r)[target]."""
    target_second = torch.as_tensor(t, dtype=r_first.dtype, device=r_first.device) > 0
    win, lose = torch.where(target_second, r_second, r_first), torch.where(target_second, r_first, r_second)
    return F.softplus(lose - win)


def position_weights(mask: Tensor, weighting: str) -> Tensor:
    """Per-position weights (B, P) over the valid positions of ``mask`` (B, P), summing to 1 per row.

    cumulative: (i+1)/(l(l+1)/2) for the i-th of l positions (later positions, which have read more of the
    response, weigh more); mean: 1/l; only_last: 1 on the last valid position.
    """
    m = mask.to(torch.float64)
    i = m.cumsum(-1) - 1  # position index among the valid ones
    n = m.sum(-1, keepdim=True).clamp(min=1)
    if weighting == "cumulative":
        w = (i + 1) / (n * (n + 1) / 2)
    elif weighting == "mean":
        w = torch.ones_like(m) / n
    elif weighting == "only_last":
        w = (i == n - 1).to(m.dtype)
    else:
        raise ValueError(f"position weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
    return w * m


def aggregate_positions(losses: Tensor, mask: Tensor, weighting: str) -> Tensor:
    """Σ_i weight_i · loss_i per row: (B, P) → (B,)."""
    return (losses * position_weights(mask, weighting).to(losses.dtype)).sum(-1)


def prototype_bound(prototypes: Tensor, bound: float, lam: float) -> Tensor:
    """λ·Σ_k max(0, ‖p_k‖ − B), averaged over any leading (batch) dimensions. (..., K, d) → ()."""
    excess = F.relu(torch.linalg.vector_norm(prototypes, dim=-1) - bound).sum(-1)
    return lam * excess.mean()


# ------------------------------------------------------------------------------------------ objectives


def _pal_objective(kind: str) -> Objective:
    bound = 23.0 if kind == "pal_a" else 4.0
    loss = "hinge max(0, 1 − t·s) on ideal-point distances" if kind == "pal_a" else "cross-entropy on c·cos"
    return Objective(
        name=f"rm_{kind}",
        fn=pal_objective_fn,
        summary=f"PAL-{kind[-1].upper()} pluralistic reward model (K prototypes, per-user mixture weights): {loss}",
        paper=PAPER,
        arxiv="2406.08469",
        shape="paired",
        reference="none",
        normalisation="sum",
        trains="reward_model",
        hyperparameters={
            "position_weighting": Hyper("cumulative", choices=WEIGHTINGS,
                                        help="how the per-position losses from the divergence point on are weighted"),
            "bound": Hyper(bound, 0.0, None, help="B of the prototype-norm bound λ·Σ max(0, ‖p_k‖ − B)"),
            "bound_lambda": Hyper(1.0, 0.0, None, help="λ of the prototype-norm bound"),
            "bound_in_loss": Hyper(False, help="back-propagate the bound (the released trainers only log it)"),
            "temperature": Hyper(1.0, 0.0, None, low_open=True, help="T of w_u = softmax(W_u / T)"),
        },
        inputs=("user_index",),
        notes="[reward-model objective] trained by preftune.reward.pal.PALForward; records carry user_id.",
    )


def pal_objective_fn(*args, **kwargs):  # the registry's slot; the forward computes PAL's loss itself
    raise TypeError("PAL objectives are computed by preftune.reward.pal.PALForward")


OBJECTIVES = {f"rm_{k}": _pal_objective(k) for k in KINDS}


# ------------------------------------------------------------------------------------------ the model


def _mlp(d_in: int, d: int) -> nn.Sequential:
    """The authors' 2-layer GELU projector into the preference space."""
    return nn.Sequential(nn.Linear(d_in, d), nn.GELU(), nn.Linear(d, d))


class PALHeads(nn.Module):
    """Everything but the backbone: f, the prototypes (PAL-A: P; PAL-B: heads g_k), the logit scale and W."""

    def __init__(self, kind: str, hidden: int, dim: int, k: int, num_users: int, ideal_point: str = "f(Pw)",
                 temperature: float = 1.0):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"PAL kind must be one of {KINDS}, got {kind!r}")
        self.kind, self.k, self.ideal_point, self.temperature = kind, k, ideal_point, temperature
        self.f = _mlp(hidden, dim)
        if kind == "pal_b":
            self.g = nn.ModuleList(_mlp(hidden, dim) for _ in range(k))
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        else:
            if ideal_point not in IDEAL_POINTS:
                raise ValueError(f"ideal_point must be one of {IDEAL_POINTS}, got {ideal_point!r}")
            width = dim if ideal_point == "Pw" else hidden
            # Gaussian rows of expected norm ≈ 1 (the authors' expectation-norm initialiser).
            self.prototypes = nn.Parameter(torch.randn(k, width) / math.sqrt(width))
        self.user_logits = nn.Parameter(torch.randn(num_users, k))  # W: one row per user, N(0, 1)

    def weights(self, user_index: Tensor) -> Tensor:
        return user_weights(self.user_logits[user_index], self.temperature)

    def ideal(self, w: Tensor, prompt_h: Tensor) -> tuple[Tensor, Tensor]:
        """(ideal points (B, d), the prototypes the bound reads). w (B, K), prompt encodings (B, hidden)."""
        if self.kind == "pal_b":
            protos = torch.stack([g(prompt_h) for g in self.g], dim=1)  # (B, K, d)
            return pal_b_ideal_point(w, protos), protos
        p = self.prototypes  # (K, hidden | d)
        if self.ideal_point == "f(Pw)":
            return self.f(w @ p), p
        if self.ideal_point == "Pw":
            return w @ p, p
        return w @ self.f(p), p  # f(P)w

    def rewards(self, items: Tensor, ideal: Tensor) -> Tensor:
        """items (B, ..., d) and ideal points (B, d) → rewards (B, ...)."""
        a = ideal.reshape(ideal.shape[0], *([1] * (items.dim() - 2)), ideal.shape[-1])
        if self.kind == "pal_b":
            return pal_b_rewards(items, a, logit_scale(self.logit_scale))
        return pal_a_rewards(items, a)


class PALModel(nn.Module):
    """Backbone (``AutoModel``) + heads. One pass over prompt+response sequences gives item encodings at
    the requested positions and the prompt encoding at its last token."""

    def __init__(self, backbone: nn.Module, heads: PALHeads, users: list[str], meta: dict | None = None):
        super().__init__()
        self.backbone, self.heads = backbone, heads
        self.users = list(users)
        self.meta = dict(meta or {})
        self.config = backbone.config  # the Runner and set_pad read model.config

    def user_row(self, user_id: Any) -> int:
        try:
            return self.users.index(str(user_id))
        except ValueError:
            shown = ", ".join(self.users[:10]) + (" ..." if len(self.users) > 10 else "")
            raise KeyError(f"unknown user_id {user_id!r} (known: {shown}); fit it with `preftune reward adapt`, "
                           "or score with the population mean (no user_id)") from None

    def population_weights(self) -> Tensor:
        """The mean of every known user's w_u: the judge of an unspecified user."""
        return user_weights(self.heads.user_logits.detach(), self.heads.temperature).mean(0)

    def encode(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def forward(self, input_ids: Tensor, attention_mask: Tensor, item_pos: Tensor, prompt_pos: Tensor,
                user_index: Tensor | None = None, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Rewards (B, R, P) and the bound's prototypes, for B groups of R sequences each (group-major rows):
        item_pos (B·R, P) positions read per sequence, prompt_pos (B,) the prompt's last token in each
        group's first sequence; the user as rows of W (``user_index`` (B,)) or mixture ``weights`` (B, K)."""
        h = self.encode(input_ids, attention_mask).float()  # (B·R, T, H)
        b = prompt_pos.shape[0]
        rows = torch.arange(h.shape[0], device=h.device)
        items = self.heads.f(h[rows[:, None], item_pos])  # (B·R, P, d)
        items = items.view(b, -1, *items.shape[1:])  # (B, R, P, d)
        first = rows.view(b, -1)[:, 0]
        prompt_h = h[first, prompt_pos]  # (B, H)
        w = self.heads.weights(user_index) if weights is None else weights.to(h.dtype)
        ideal, protos = self.heads.ideal(w, prompt_h)
        return self.heads.rewards(items, ideal), protos


def build_pal_model(cfg, tokenizer, users: list[str]) -> PALModel:
    """Backbone from ``cfg.model`` (``AutoModel``: the LM without its head) and fresh heads (seeded)."""
    from transformers import AutoModel

    from preftune.model import ensure_pad_token, resolve_model

    source = resolve_model(cfg.model)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        backbone = AutoModel.from_pretrained(source, dtype=torch.float32)
        heads = PALHeads(cfg.kind, backbone.config.hidden_size, cfg.pal_dim, cfg.pal_prototypes, len(users),
                         cfg.pal_ideal_point, float(cfg.objective().resolve(cfg.loss_hyperparameters())["temperature"]))
    ensure_pad_token(tokenizer)
    backbone.config.pad_token_id = tokenizer.pad_token_id
    if cfg.freeze_backbone:
        backbone.requires_grad_(False)
    return PALModel(backbone, heads, users, pal_meta(cfg))


def pal_meta(cfg) -> dict:
    params = cfg.objective().resolve(cfg.loss_hyperparameters())
    return {
        "kind": cfg.kind, "objective": cfg.loss, "k": cfg.pal_prototypes, "dim": cfg.pal_dim,
        "ideal_point": cfg.pal_ideal_point, "temperature": float(params["temperature"]),
        "position_weighting": params["position_weighting"],
        "chat_template": cfg.chat_template, "max_length": cfg.max_length,
        "max_prompt_length": cfg.max_prompt_length, "truncation_mode": cfg.truncation_mode,
    }


def apply_backbone_lora(model: PALModel, cfg) -> PALModel:
    """LoRA adapters on the backbone (the heads train in full); merged into the saved folder."""
    from peft import LoraConfig, get_peft_model

    from preftune.model.lora import quiet_peft_deprecations

    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=cfg.lora_target, task_type="FEATURE_EXTRACTION")
    with quiet_peft_deprecations():
        model.backbone = get_peft_model(model.backbone, config)
    return model


# ------------------------------------------------------------------------------------------ positions


def pair_positions(prompt_ids: list[list[int]], response_ids: list[list[list[int]]], weighting: str,
                   device=None) -> tuple[Tensor, Tensor, Tensor]:
    """(item positions (B·2, P), position mask (B, P), prompt's last position (B,)) for (chosen, rejected)
    groups: the positions from where the two token sequences diverge to the end of the longer one, each
    side clamped to its own last token; one (the last) position with ``only_last``."""
    per_pair = []
    for p, (c, r) in zip(prompt_ids, response_ids, strict=True):
        sc, sr = p + c, p + r
        d = 0
        while d < min(len(sc), len(sr)) and sc[d] == sr[d]:
            d += 1
        end = max(len(sc), len(sr))
        start = end - 1 if weighting == "only_last" else min(d, end - 1)
        js = list(range(start, end))
        per_pair.append(([min(j, len(sc) - 1) for j in js], [min(j, len(sr) - 1) for j in js]))
    width = max(len(c) for c, _ in per_pair)
    pos, mask = [], []
    for c, r in per_pair:
        pad = width - len(c)
        pos += [c + [c[-1]] * pad, r + [r[-1]] * pad]  # padding repeats the last position (masked out)
        mask.append([True] * len(c) + [False] * pad)
    prompt_pos = [len(p) - 1 for p in prompt_ids]
    t = lambda x, dt: torch.tensor(x, dtype=dt, device=device)  # noqa: E731
    return t(pos, torch.long), t(mask, torch.bool), t(prompt_pos, torch.long)


def last_valid(values: Tensor, mask: Tensor) -> Tensor:
    """values (B, P) at each row's last valid position → (B,)."""
    idx = (mask.long().cumsum(-1).argmax(-1))  # the first index reaching the row's count: its last valid one
    return values.gather(-1, idx[:, None])[:, 0]


# ------------------------------------------------------------------------------------------ training


def pal_losses(kind: str, rewards: Tensor, mask: Tensor, weighting: str) -> Tensor:
    """Per-pair losses from rewards (B, 2, P) of (chosen, rejected) (t = −1: the first is preferred)."""
    rc, rr = rewards[:, 0], rewards[:, 1]
    if kind == "pal_a":  # distances are −r
        per_pos = pal_a_loss(-rc, -rr, -1.0)
    else:
        per_pos = pal_b_loss(rc, rr, -1.0)
    return aggregate_positions(per_pos, mask, weighting)


class PALEngine(nn.Module):
    """The PAL model as the loop's engine (``engine.model`` is what checkpoints hold)."""

    def __init__(self, model: PALModel):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def _param_group(name: str) -> str:
    if name.startswith("heads.user_logits") or name.startswith("heads.prototypes"):
        return "mixture"
    if name.startswith("heads.logit_scale"):
        return "scale"
    return "heads" if name.startswith("heads.") else "backbone"


class PALForward:
    """(chosen, rejected) pairs of known users → PAL's loss; the Runner's ``Forward`` for rm_pal_a/rm_pal_b."""

    supports_sharding = False
    loss_state = None

    def __init__(self, cfg, model: PALModel):
        self.cfg, self.kind = cfg, cfg.kind
        self.params = cfg.objective().resolve(cfg.loss_hyperparameters())
        self.pad_id = model.config.pad_token_id
        self.engine = PALEngine(model)

    def attach(self, runner) -> None:
        pass

    def param_groups(self, trainable: list[nn.Parameter]) -> list[dict]:
        """The authors' Adam groups: backbone at the run's rate; projectors ``pal_head_lr`` (weight decay
        0.01); prototypes and W ``pal_user_lr``; the logit scale ``pal_scale_lr``."""
        cfg, ids = self.cfg, {id(p) for p in trainable}
        spec = {"backbone": {}, "heads": {"lr": cfg.pal_head_lr, "weight_decay": 0.01},
                "mixture": {"lr": cfg.pal_user_lr, "weight_decay": 0.0},
                "scale": {"lr": cfg.pal_scale_lr, "weight_decay": 0.0}}
        groups: dict[str, list] = {k: [] for k in spec}
        for n, p in self.engine.model.named_parameters():
            if id(p) in ids:
                groups[_param_group(n)].append(p)
        return [{"params": ps, **spec[k]} for k, ps in groups.items() if ps]

    def __call__(self, runner, dataset, indices: list[int], grad: bool):
        from preftune.data import collate
        from preftune.reward.model import group_sequences, pad_right
        from preftune.train.loop import Micro

        batch = collate([dataset.examples[i] for i in indices])
        device = runner.acc.device
        ids, mask = pad_right(group_sequences(batch.prompt_ids, batch.response_ids), self.pad_id, device)
        item_pos, pos_mask, prompt_pos = pair_positions(batch.prompt_ids, batch.response_ids,
                                                        self.params["position_weighting"], device)
        users = batch.inputs["user_index"].to(device).long()
        with torch.set_grad_enabled(grad), runner.acc.autocast():
            rewards, protos = runner.engine(ids, mask, item_pos, prompt_pos, user_index=users)
        rewards = rewards.float()  # (B, 2, P)
        losses = pal_losses(self.kind, rewards, pos_mask, self.params["position_weighting"])
        bound = prototype_bound(protos.float(), self.params["bound"], self.params["bound_lambda"])
        if self.params["bound_in_loss"]:
            losses = losses + bound
        rc, rr = last_valid(rewards[:, 0], pos_mask), last_valid(rewards[:, 1], pos_mask)
        all_pos = ((rewards[:, 0] > rewards[:, 1]).float() * pos_mask).sum(-1) / pos_mask.sum(-1).clamp(min=1)
        out = LossOutput(losses, rc.detach(), rr.detach(),
                         {"prototype_bound": bound.detach(), "accuracies_all_positions": all_pos.detach()})
        return Micro(out, None, batch)

    def save_final(self, model, tokenizer, target: Path) -> None:
        save_pal_model(model, tokenizer, target)


# ------------------------------------------------------------------------------------------ saving


def _plain_backbone(backbone: nn.Module) -> nn.Module:
    import copy

    from preftune.model import is_peft_model

    return copy.deepcopy(backbone).merge_and_unload() if is_peft_model(backbone) else backbone


def _write_table(folder: Path, model: PALModel) -> None:
    """Heads and user ids, each written to a temporary name and renamed into place."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.heads.state_dict().items()}
    tmp = folder / (HEADS_FILE + ".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, folder / HEADS_FILE)
    tmp = folder / (USERS_FILE + ".tmp")
    tmp.write_text(json.dumps({"users": model.users}, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp, folder / USERS_FILE)


def save_pal_model(model: PALModel, tokenizer, target: str | Path) -> Path:
    """The whole model in one folder, written under a temporary name and renamed into place."""
    from preftune.reward.model import META_KEY

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        backbone = _plain_backbone(model.backbone)
        setattr(backbone.config, META_KEY, {**model.meta, "num_users": len(model.users)})
        backbone.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _write_table(tmp, model)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_pal_model(path: str | Path, *, dtype: str = "float32") -> PALModel:
    from safetensors.torch import load_file
    from transformers import AutoModel

    from preftune.reward.model import META_KEY

    path = Path(path)
    backbone = AutoModel.from_pretrained(path, dtype=getattr(torch, dtype))
    meta = dict(getattr(backbone.config, META_KEY))
    users = json.loads((path / USERS_FILE).read_text(encoding="utf-8"))["users"]
    heads = PALHeads(meta["kind"], backbone.config.hidden_size, meta["dim"], meta["k"], len(users),
                     meta.get("ideal_point", "f(Pw)"), meta.get("temperature", 1.0))
    heads.load_state_dict(load_file(str(path / HEADS_FILE)))
    meta.pop("num_users", None)
    return PALModel(backbone, heads, users, meta)


# ------------------------------------------------------------------------------------------ use


class PALRewardModel:
    """A trained PAL model as a reward model for one user: ``score``, ``prefer_batch``, ``prefer``.

    ``user_id`` picks a row of W; None scores with the population mean of w_u. ``weights`` (K,) overrides both.
    """

    def __init__(self, model: PALModel, tokenizer, user_id: Any = None, device=None):
        from preftune.model import ensure_pad_token

        self.model, self.tokenizer, self.meta = model, tokenizer, model.meta
        self.kind = model.meta["kind"]
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model.to(self.device).eval()
        ensure_pad_token(tokenizer)
        self.pad_id = tokenizer.pad_token_id
        self.user_id = user_id
        if user_id is not None:
            model.user_row(user_id)  # an unknown id fails here, not at the first score

    def weights_for(self, user_id: Any = None) -> Tensor:
        uid = self.user_id if user_id is None else user_id
        if uid is None:
            return self.model.population_weights()
        row = self.model.user_row(uid)
        return user_weights(self.model.heads.user_logits.detach()[row], self.model.heads.temperature)

    def _tokenize_group(self, prompt, responses: list) -> tuple[list[int], list[list[int]]]:
        """Prompt ids and each response's ids, exactly as training tokenises a group."""
        from preftune.data import Example, tokenize_example

        m = self.meta
        tok = tokenize_example(Example(prompt, list(responses)), self.tokenizer, max_length=m.get("max_length"),
                               max_prompt_length=m.get("max_prompt_length"),
                               truncation_mode=m.get("truncation_mode", "keep_end"),
                               chat_template=m.get("chat_template", "auto"))
        return tok.prompt_ids, tok.response_ids

    def _tokenize(self, prompt, response) -> tuple[list[int], list[int]]:
        p, rs = self._tokenize_group(prompt, [response])
        return p, rs[0]

    @torch.no_grad()
    def score(self, prompts, responses: list, batch_size: int = 8, user_id: Any = None) -> Tensor:
        """r_u(x, y) at the last token (N,); compare responses of one prompt."""
        from preftune.reward.model import _broadcast, pad_right

        prompts = _broadcast(prompts, len(responses))
        w = self.weights_for(user_id).to(self.device)
        out = []
        for s in range(0, len(responses), batch_size):
            toks = [self._tokenize(p, r) for p, r in zip(prompts[s:s + batch_size], responses[s:s + batch_size],
                                                           strict=True)]
            seqs = [p + r for p, r in toks]
            ids, mask = pad_right(seqs, self.pad_id, self.device)
            item_pos = torch.tensor([[len(q) - 1] for q in seqs], device=self.device)
            prompt_pos = torch.tensor([len(p) - 1 for p, _ in toks], device=self.device)
            r, _ = self.model(ids, mask, item_pos, prompt_pos, weights=w.expand(len(seqs), -1))
            out.append(r[:, 0, 0].float().cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def prefer_batch(self, prompts, a: list, b: list, batch_size: int = 8, user_id: Any = None) -> Tensor:
        """P(a ≻ b) = σ(r_a − r_b) (PAL-B's training link; for PAL-A the same link on −distances)."""
        from preftune.reward.model import _broadcast

        n = len(a)
        prompts = _broadcast(prompts, n)
        r = self.score(list(prompts) * 2, list(a) + list(b), batch_size, user_id)
        return torch.sigmoid(r[:n] - r[n:])

    def prefer(self, prompt, a, b, user_id: Any = None) -> float:
        return float(self.prefer_batch([prompt], [a], [b], user_id=user_id)[0])


# ------------------------------------------------------------------------------------------ new users


@dataclass
class AdaptResult:
    """A new user's fitted mixture logits and how its few pairs are ordered before and after."""

    user_id: str
    logits: list[float]
    weights: list[float]
    losses: list[float] = field(default_factory=list)  # per epoch, mean over the pairs
    accuracy_before: float = float("nan")
    accuracy_after: float = float("nan")


@torch.no_grad()
def _cached_pairs(rm: PALRewardModel, pairs: list[tuple[Any, Any, Any]], weighting: str):
    """Item encodings f(E(x⊕y)) (n, 2, P, d), position mask (n, P) and prompt encodings (n, hidden): the frozen
    part of the model, computed once."""
    from preftune.reward.model import pad_right

    toks = [rm._tokenize_group(p, [c, r]) for p, c, r in pairs]
    prompt_ids = [p for p, _ in toks]
    response_ids = [rs for _, rs in toks]
    items, masks, prompts = [], [], []
    for s in range(0, len(pairs), 8):
        pi, ri = prompt_ids[s:s + 8], response_ids[s:s + 8]
        item_pos, mask, prompt_pos = pair_positions(pi, ri, weighting, rm.device)
        from preftune.reward.model import group_sequences

        ids, att = pad_right(group_sequences(pi, ri), rm.pad_id, rm.device)
        h = rm.model.encode(ids, att).float()
        rows = torch.arange(h.shape[0], device=h.device)
        e = rm.model.heads.f(h[rows[:, None], item_pos])  # (2b, P, d)
        items.append(e.view(len(pi), 2, *e.shape[1:]))
        masks.append(mask)
        prompts.append(h[rows.view(len(pi), 2)[:, 0], prompt_pos])
    width = max(m.shape[1] for m in masks)
    pad = lambda t, dim: F.pad(t, [0, 0] * (t.dim() - dim - 1) + [0, width - t.shape[dim]])  # noqa: E731
    return (torch.cat([pad(e, 2) for e in items]), torch.cat([pad(m, 1) for m in masks]), torch.cat(prompts))


def adapt_user(rm: PALRewardModel, user_id: Any, pairs: list[tuple[Any, Any, Any]], *, epochs: int = 20,
               learning_rate: float = 5e-3, weight_decay: float = 0.0, batch_size: int = 4, seed: int = 0,
               weighting: str | None = None) -> AdaptResult:
    """Fit a new user's K mixture logits on a few (prompt, chosen, rejected) pairs, everything else frozen
    (METHODS.md §M11 stage 2: W_u ~ N(0, 1), AdamW lr 5e-3, weight decay 0, 20 epochs); the row is appended
    to the model's user table. Only W_u changes: the backbone and heads are not in the optimizer and their
    outputs are computed once, without gradients."""
    model = rm.model
    uid = str(user_id)
    if uid in model.users:
        raise ValueError(f"user_id {uid!r} is already in the model's table (a new user needs a new id)")
    if not pairs:
        raise ValueError(f"no pairs for user {uid!r}")
    weighting = weighting or model.meta.get("position_weighting", "cumulative")
    items, mask, prompt_h = _cached_pairs(rm, pairs, weighting)
    heads = model.heads
    with torch.no_grad():
        protos = torch.stack([g(prompt_h) for g in heads.g], 1) if heads.kind == "pal_b" else None
    gen = torch.Generator().manual_seed(seed)
    logits = nn.Parameter(torch.randn(heads.k, generator=gen).to(items.device))
    opt = torch.optim.AdamW([logits], lr=learning_rate, weight_decay=weight_decay)

    def rewards(idx: Tensor) -> Tensor:
        w = user_weights(logits, heads.temperature).expand(len(idx), -1)
        if heads.kind == "pal_b":
            ideal = pal_b_ideal_point(w, protos[idx])
        else:
            ideal, _ = heads.ideal(w, prompt_h[idx])  # P and f are frozen (no optimizer holds them)
        return heads.rewards(items[idx], ideal)  # (b, 2, P)

    def accuracy() -> float:
        with torch.no_grad():
            r = rewards(torch.arange(len(pairs), device=items.device))
            return float((last_valid(r[:, 0], mask) > last_valid(r[:, 1], mask)).float().mean())

    before = accuracy()
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    history = []
    try:
        for _ in range(epochs):
            order = torch.randperm(len(pairs), generator=gen).to(items.device)
            total = 0.0
            for s in range(0, len(pairs), batch_size):
                idx = order[s:s + batch_size]
                loss = pal_losses(heads.kind, rewards(idx), mask[idx], weighting).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
            history.append(total / len(pairs))
    finally:
        for p in frozen:
            p.requires_grad_(True)
    after = accuracy()
    add_user(model, uid, logits.detach())
    w = user_weights(logits.detach(), heads.temperature)
    return AdaptResult(uid, logits.detach().cpu().tolist(), w.cpu().tolist(), history, before, after)


def add_user(model: PALModel, user_id: str, logits: Tensor) -> None:
    """Append a row to W (the existing rows are copied bit for bit)."""
    heads = model.heads
    with torch.no_grad():
        table = torch.cat([heads.user_logits.detach(), logits.reshape(1, -1).to(heads.user_logits)], 0)
    heads.user_logits = nn.Parameter(table, requires_grad=heads.user_logits.requires_grad)
    model.users.append(str(user_id))


def save_user_table(model: PALModel, folder: str | Path) -> None:
    """Rewrite the heads and user ids of a saved PAL folder in place (after :func:`adapt_user`)."""
    _write_table(Path(folder), model)


def adapt_file(model_dir: str | Path, data: str | Path, *, user_id: str | None = None,
               output: str | Path | None = None, log=print, **kwargs) -> list[AdaptResult]:
    """``preftune reward adapt``: fit every user of ``data`` (records with ``user_id``, or all records as
    ``user_id``) that the model does not know; write the extended table to ``output`` (default: in place)."""
    from preftune.data import DataError, DataIssue, derive_examples, load_and_validate
    from preftune.model import load_tokenizer

    records, _ = load_and_validate(data, objective_shape="paired")
    by_user: dict[str, list] = {}
    issues = []
    for rec in records:
        uid = user_id if user_id is not None else rec.user_id
        if uid is None:
            issues.append(DataIssue(rec.source, rec.line, "user_id", "missing (or pass --user-id)"))
            continue
        for ex in derive_examples([rec], "paired"):
            by_user.setdefault(str(uid), []).append((ex.prompt, ex.responses[0], ex.responses[1]))
    if issues:
        raise DataError(issues)
    model_dir = Path(model_dir)
    model = load_pal_model(model_dir)
    rm = PALRewardModel(model, load_tokenizer(model_dir))
    new = {u: p for u, p in by_user.items() if u not in model.users}
    known = sorted(set(by_user) - set(new))
    if known:
        log(f"skipped {len(known)} user(s) the model already has: {', '.join(known[:5])}")
    results = []
    for uid, pairs in new.items():
        res = adapt_user(rm, uid, pairs, **kwargs)
        log(f"user {uid}: {len(pairs)} pairs, accuracy on them {res.accuracy_before:.3f} -> "
            f"{res.accuracy_after:.3f}, weights {[round(x, 4) for x in res.weights]}")
        results.append(res)
    target = Path(output) if output is not None else model_dir
    if target != model_dir:
        if target.exists():
            raise FileExistsError(f"{target} exists; choose a new folder for the adapted model")
        shutil.copytree(model_dir, target)
    save_user_table(model, target)
    return results


# ------------------------------------------------------------------------------------------ data


def user_examples(records, users: list[str], pair_strategy: str = "all", new_users: bool = True) -> list:
    """(chosen, rejected) examples with ``inputs["user_index"]``, the row of the record's ``user_id`` in
    ``users`` (extended with unseen ids when ``new_users``); every record without a known user is reported."""
    from preftune.data import DataError, DataIssue, derive_examples

    out, issues = [], []
    rows = {u: i for i, u in enumerate(users)}
    for rec in records:
        if rec.user_id is None:
            issues.append(DataIssue(rec.source, rec.line, rec.field_name("user_id"),
                                    "missing: PAL needs the id of the user who gave each preference"))
            continue
        uid = str(rec.user_id)
        if uid not in rows:
            if not new_users:
                issues.append(DataIssue(rec.source, rec.line, rec.field_name("user_id"),
                                        f"{uid!r} is not a user of the training data (fit new users with "
                                        "`preftune reward adapt`)"))
                continue
            rows[uid] = len(users)
            users.append(uid)
        for ex in derive_examples([rec], "paired", pair_strategy=pair_strategy):
            ex.inputs = {"user_index": float(rows[uid])}
            out.append(ex)
    if issues:
        raise DataError(issues)
    return out
