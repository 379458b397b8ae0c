"""OFS-DPO (ONLINE.md §7, LOSSES.md E5): two LoRA modules on one frozen base, trained on the same pairs.

The *fast* module is the PEFT adapter ``"default"`` (learning rate ``lr_fast``), the *slow* module an
adapter ``"slow"`` with the same LoRA config, started from the fast module's weights (learning rate
``lr_fast · lr_ratio``). On each micro-batch both modules' summed log-probs give
g_m = ℓ_m(y_w) − ℓ_m(y_l) and h_m = g_m − g_ref; each module's DPO loss is the registry ``dpo`` on its
statistics, and a chasing term couples them, the other module taking the reference's place:

    C_lead  = −log σ(β·(g_lead − sg[g_chase]))     the leader minimises L_lead  + λ·C_lead  (keeps its lead)
    C_chase = −log σ(β·(sg[g_lead] − g_chase))     the chaser minimises L_chase − λ·C_chase (closes the gap)

One backward on the sum trains both: the stop-gradients (``detach``) make each chasing term reach only
its own module (without them the ±λ terms would cancel). Every ``swap_every`` steps the module with the
lower running-mean DPO loss (over those steps) becomes the leader. Form and signs are the best reading
of the paper's abstract, **[UNVERIFIED]** (ONLINE.md §7); the tests pin what this file does: the
leader's term widens g_lead − g_chase, the chaser's narrows it.

Across iterations both modules continue and :class:`OFSState` (leader, running losses, swap count,
step count) carries over; the optimizers and the learning-rate schedule restart per iteration, as the
trainer's do. The leader is the active adapter when :func:`train_ofs` returns: it is the iterate that
samples next. :func:`ofs_state_dict` / :func:`load_ofs_state_dict` save and restore both modules.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from preftune.losses.base import PolicyStats, RefStats
from preftune.losses.functional import logsigmoid

# Module name → PEFT adapter name. The fast module is the adapter the policy was created with.
ADAPTERS = {"fast": "default", "slow": "slow"}
MODULES = ("fast", "slow")


# ---------------------------------------------------------------------------------------------- state


@dataclass
class OFSState:
    """What carries over between iterations (JSON-serialisable through ``as_dict``/``from_dict``).

    ``recent`` holds each module's per-step DPO losses since the last leader check (at most
    ``swap_every`` of them); ``step`` counts optimizer steps over all iterations, so the leader is
    re-checked every ``swap_every`` steps whatever the iteration boundaries.
    """

    leader: str = "fast"
    swaps: int = 0
    step: int = 0
    recent: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in MODULES})

    @property
    def chaser(self) -> str:
        return "slow" if self.leader == "fast" else "fast"

    @property
    def leader_adapter(self) -> str:
        """The PEFT adapter name of the leader (activate it to sample from the current iterate)."""
        return ADAPTERS[self.leader]

    def record(self, losses: dict[str, float], swap_every: int) -> bool:
        """Add one step's DPO losses; on every ``swap_every``-th step make the module with the lower
        running mean the leader (a tie keeps the leader). Returns whether the leader changed."""
        self.step += 1
        for m in MODULES:
            self.recent[m] = (self.recent[m] + [float(losses[m])])[-swap_every:]
        if self.step % swap_every:
            return False
        means = {m: sum(v) / len(v) for m, v in self.recent.items()}
        if means[self.chaser] < means[self.leader]:
            self.leader = self.chaser
            self.swaps += 1
            return True
        return False

    def as_dict(self) -> dict[str, Any]:
        return {"leader": self.leader, "swaps": self.swaps, "step": self.step,
                "recent": {m: list(v) for m, v in self.recent.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OFSState:
        if d.get("leader") not in MODULES:
            raise ValueError(f"OFS state: leader must be one of {MODULES}, got {d.get('leader')!r}")
        recent = d.get("recent") or {}
        return cls(leader=d["leader"], swaps=int(d.get("swaps", 0)), step=int(d.get("step", 0)),
                   recent={m: [float(x) for x in recent.get(m, [])] for m in MODULES})


@dataclass
class OFSResult:
    history: list[dict[str, float]]
    steps: int
    state: OFSState


# ---------------------------------------------------------------------------------------------- objective


@dataclass
class OFSTerms:
    """One micro-batch's terms. ``objective`` is what is back-propagated; the rest is per pair (B,)."""

    objective: Tensor  # scalar: mean L_fast + mean L_slow + λ·(mean C_lead − mean C_chase)
    loss: dict[str, Tensor]  # module → (B,) DPO losses
    margin: dict[str, Tensor]  # module → (B,) β·h_m, detached
    chase_lead: Tensor  # (B,)
    chase_chase: Tensor  # (B,)


def ofs_objective(stats: dict[str, PolicyStats], ref: RefStats, *, beta: float, lam: float,
                  leader: str) -> OFSTerms:
    """The OFS-DPO terms from both modules' statistics (``stats["fast"]``, ``stats["slow"]``, (B, 2)).

    Each module's DPO loss is the registry's ``dpo``; the chasing terms compare the modules' own
    margins g_m = ℓ_m(y_w) − ℓ_m(y_l) (the reference cancels between them), each with the other
    module's margin behind a stop-gradient.
    """
    from preftune.losses import get

    if leader not in MODULES:
        raise ValueError(f"leader must be one of {MODULES}, got {leader!r}")
    dpo = get("dpo").fn
    outs = {m: dpo(stats[m], ref, beta=beta) for m in MODULES}
    g = {m: stats[m].logps[:, 0] - stats[m].logps[:, 1] for m in MODULES}
    chaser = "slow" if leader == "fast" else "fast"
    g_lead, g_chase = g[leader], g[chaser]
    chase_lead = -logsigmoid(beta * (g_lead - g_chase.detach()))
    chase_chase = -logsigmoid(beta * (g_lead.detach() - g_chase))
    objective = sum(outs[m].losses.mean() for m in MODULES) + lam * (chase_lead.mean() - chase_chase.mean())
    margin = {m: outs[m].chosen_rewards - outs[m].rejected_rewards for m in MODULES}
    return OFSTerms(objective, {m: outs[m].losses for m in MODULES}, margin, chase_lead, chase_chase)


# ---------------------------------------------------------------------------------------------- adapters


def adapter_parameters(model, adapter: str) -> list[torch.nn.Parameter]:
    """The parameters of one PEFT adapter (every tuner layer's ``adapter_layer_names`` entries for it)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    params: list[torch.nn.Parameter] = []
    for module in model.modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        for attr in module.adapter_layer_names:
            holder = getattr(module, attr)
            if adapter in holder:
                x = holder[adapter]
                params += [x] if isinstance(x, torch.nn.Parameter) else list(x.parameters())
    if not params:
        raise ValueError(f"the model has no parameters of adapter {adapter!r}")
    return params


def ensure_slow_adapter(model) -> bool:
    """Add the ``"slow"`` adapter with the fast module's config and weights, unless it exists.
    Returns whether it was added. The active adapter is left as it was."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    _check_model(model)
    if ADAPTERS["slow"] in model.peft_config:
        return False
    active = model.active_adapter
    model.add_adapter(ADAPTERS["slow"], model.peft_config[ADAPTERS["fast"]])
    fast = get_peft_model_state_dict(model, adapter_name=ADAPTERS["fast"])
    _load_adapter(model, fast, ADAPTERS["slow"], set_peft_model_state_dict)
    model.set_adapter(active)
    return True


def ofs_state_dict(model) -> dict[str, Tensor]:
    """Both modules' weights, cloned to CPU: ``"fast.<key>"`` and ``"slow.<key>"``, where ``<key>`` is
    PEFT's adapter-name-free key (``get_peft_model_state_dict``)."""
    from peft import get_peft_model_state_dict

    _check_model(model)
    if ADAPTERS["slow"] not in model.peft_config:
        raise ValueError("the model has no 'slow' adapter yet: train_ofs (or ensure_slow_adapter) adds it")
    out = {}
    for m in MODULES:
        for k, v in get_peft_model_state_dict(model, adapter_name=ADAPTERS[m]).items():
            out[f"{m}.{k}"] = v.detach().cpu().clone()
    return out


def load_ofs_state_dict(model, sd: dict[str, Tensor]) -> None:
    """Restore both modules from :func:`ofs_state_dict` (the slow adapter is added first if the model
    has none, as after a resume). The active adapter is left as it was: activate
    ``OFSState.leader_adapter`` to sample from the leader."""
    from peft import set_peft_model_state_dict

    _check_model(model)
    parts: dict[str, dict[str, Tensor]] = {m: {} for m in MODULES}
    for k, v in sd.items():
        m, _, rest = k.partition(".")
        if m not in parts or not rest:
            raise ValueError(f"OFS state dict: key {k!r} is not 'fast.<name>' or 'slow.<name>'")
        parts[m][rest] = v
    for m in MODULES:
        if not parts[m]:
            raise ValueError(f"OFS state dict has no '{m}.' weights")
    ensure_slow_adapter(model)
    active = model.active_adapter
    for m in MODULES:
        _load_adapter(model, parts[m], ADAPTERS[m], set_peft_model_state_dict)
    model.set_adapter(active)


def _load_adapter(model, sd: dict[str, Tensor], adapter: str, setter) -> None:
    result = setter(model, sd, adapter_name=adapter)
    missing = [k for k in result.missing_keys if f".{adapter}." in k]
    if result.unexpected_keys or missing:
        raise ValueError(f"adapter {adapter!r}: weights do not fit the model (unexpected "
                         f"{result.unexpected_keys[:3]}, missing {missing[:3]})")


def _check_model(model) -> None:
    from preftune.model.lora import is_peft_model

    if not is_peft_model(model):
        raise TypeError("OFS-DPO trains two LoRA adapters: the model must be a peft PeftModel (apply_lora)")
    cfg = model.peft_config.get(ADAPTERS["fast"])
    if cfg is None:
        raise ValueError(f"the model has no {ADAPTERS['fast']!r} adapter (the fast module)")
    if getattr(cfg, "bias", "none") != "none":
        # Adapters that train biases change the shared base: both modules and the reference would move.
        raise ValueError("OFS-DPO needs LoRA bias='none' (the base is the reference and is shared)")


# ---------------------------------------------------------------------------------------------- training


def module_stats(engine, packed, adapter: str, params: list[torch.nn.Parameter]) -> PolicyStats:
    """(B, K) summed log-probs under adapter ``adapter`` alone, with gradients.

    PEFT's ``set_adapter`` turns ``requires_grad`` off on the inactive adapter, and autograd drops the
    gradient of a leaf whose flag is off at backward time, even when it was on in the forward; so
    ``params`` (both modules') are switched back on after each switch.
    """
    from preftune.model.engine import scatter_stats

    model = engine.model
    model.set_adapter(adapter)
    for p in params:
        p.requires_grad_(True)
    if model.active_adapter != adapter:  # the forward below must run this module only
        raise RuntimeError(f"set_adapter({adapter!r}) left {model.active_adapter!r} active")
    flat = engine(**packed.tensors())["token_logps"].float()
    logps, _, _ = scatter_stats(packed, flat, False)
    return PolicyStats(logps=logps, lengths=packed.lengths.to(logps.device), valid=packed.valid.to(logps.device))


def train_ofs(model, tokenizer, examples, ref_cache, *, beta: float, lr_fast: float, lr_ratio: float, lam: float,
              swap_every: int, batch_size: int, epochs: float, seed: int, warmup_ratio: float,
              out_dir: str | Path, progress: bool = False, state: OFSState | None = None) -> OFSResult:
    """One iteration of OFS-DPO on ``examples`` (pairs: response_ids = [chosen, rejected]).

    ``ref_cache`` holds the base model's token log-probs of ``examples`` (in list order). Both
    modules see every micro-batch; each has its own AdamW (lr ``lr_fast`` and ``lr_fast·lr_ratio``,
    linear warm-up over ``warmup_ratio`` of the steps then linear decay) and its own gradient-norm
    clip at 1.0. Deterministic for a ``seed``. Writes ``out_dir/metrics.jsonl`` (one row per step) and
    returns the history, the step count and the state to pass to the next iteration; the leader's
    adapter is active on return.
    """
    from preftune.model.engine import LogProbEngine, pack
    from preftune.online import store
    from preftune.train.config import TrainConfig
    from preftune.train.trainer import make_optimizer

    _check_args(beta=beta, lr_fast=lr_fast, lr_ratio=lr_ratio, lam=lam, swap_every=swap_every,
                batch_size=batch_size, epochs=epochs, warmup_ratio=warmup_ratio)
    if not examples:
        raise ValueError("train_ofs: no examples")
    bad = [i for i, e in enumerate(examples) if len(e.response_ids) != 2]
    if bad:
        raise ValueError(f"train_ofs: example {bad[0]} has {len(examples[bad[0]].response_ids)} responses; "
                         "OFS-DPO trains on pairs [chosen, rejected]")
    if len(ref_cache.token_logps) != len(examples):
        raise ValueError(f"train_ofs: the reference cache holds {len(ref_cache.token_logps)} examples, "
                         f"not the {len(examples)} given")
    _check_model(model)
    state = OFSState.from_dict(state.as_dict()) if state is not None else OFSState()
    torch.manual_seed(seed)
    ensure_slow_adapter(model)
    params = {m: adapter_parameters(model, ADAPTERS[m]) for m in MODULES}
    if {id(p) for p in params["fast"]} & {id(p) for p in params["slow"]}:
        raise RuntimeError("the fast and slow adapters share parameters")
    all_params = params["fast"] + params["slow"]

    n = len(examples)
    per_epoch = math.ceil(n / batch_size)
    total = max(1, math.ceil(per_epoch * epochs))
    rng = random.Random(seed)
    batches: list[list[int]] = []
    while len(batches) < total:
        order = rng.sample(range(n), n)
        batches += [order[s : s + batch_size] for s in range(0, n, batch_size)]
    batches = batches[:total]

    lrs = {"fast": lr_fast, "slow": lr_fast * lr_ratio}
    opts, scheds = {}, {}
    for m in MODULES:
        cfg = TrainConfig(learning_rate=lrs[m], warmup_ratio=warmup_ratio, scheduler="linear")
        opts[m], scheds[m] = make_optimizer(cfg, params[m], total)
    clip = 1.0  # per module

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    engine = LogProbEngine(model, prefix_sharing="auto")
    share = engine.shares_prefix()
    was_training = model.training
    model.train()
    history: list[dict[str, float]] = []
    from tqdm.auto import tqdm

    try:
        for step, idx in enumerate(tqdm(batches, desc="train (ofs)", unit="step", disable=not progress,
                                        dynamic_ncols=True), start=1):
            batch = [examples[i] for i in idx]
            packed = pack([e.prompt_ids for e in batch], [e.response_ids for e in batch], pad_id, device=device,
                          share_prefix=share)
            ref = ref_cache.batch(idx, 2, False, device=device)
            for m in MODULES:
                opts[m].zero_grad(set_to_none=True)
            stats = {m: module_stats(engine, packed, ADAPTERS[m], all_params) for m in MODULES}
            leader = state.leader
            terms = ofs_objective(stats, ref, beta=beta, lam=lam, leader=leader)
            terms.objective.backward()
            # "loss" is the back-propagated objective; in value it is L_fast + L_slow (±λ·C cancel in value)
            row: dict[str, float] = {"step": float(step), "loss": float(terms.objective.detach())}
            for m in MODULES:
                row[f"grad_norm/{m}"] = float(torch.nn.utils.clip_grad_norm_(params[m], clip))
                row[f"lr/{m}"] = float(scheds[m].get_last_lr()[0])
                opts[m].step()
                scheds[m].step()
            losses = {m: float(terms.loss[m].detach().mean()) for m in MODULES}
            for m in MODULES:
                row[f"loss/{m}"] = losses[m]
                row[f"rewards/accuracies/{m}"] = float((terms.margin[m] > 0).float().mean())
                row[f"rewards/margins/{m}"] = float(terms.margin[m].mean())
            row["chase/lead"] = float(terms.chase_lead.detach().mean())
            row["chase/chase"] = float(terms.chase_chase.detach().mean())
            row["prob_gap"] = float((torch.sigmoid(terms.margin["fast"]) - torch.sigmoid(terms.margin["slow"]))
                                    .abs().mean())
            row["leader"] = float(MODULES.index(leader))  # the module that led this step's update
            state.record(losses, swap_every)
            row["swaps"] = float(state.swaps)  # after this step's leader check
            history.append(row)
    finally:
        model.train(was_training)
        model.set_adapter(state.leader_adapter)  # the leader samples next; PEFT freezes the other module
    out = Path(out_dir)
    store.write_jsonl(out / "metrics.jsonl", history)
    return OFSResult(history=history, steps=len(history), state=state)


def _check_args(**kw) -> None:
    rules = {"beta": lambda v: v > 0, "lr_fast": lambda v: v > 0, "lr_ratio": lambda v: v > 0,
             "lam": lambda v: v >= 0, "swap_every": lambda v: isinstance(v, int) and v >= 1,
             "batch_size": lambda v: isinstance(v, int) and v >= 1, "epochs": lambda v: v > 0,
             "warmup_ratio": lambda v: 0 <= v <= 1}
    for k, v in kw.items():
        if not rules[k](v):
            raise ValueError(f"train_ofs: {k}={v!r} is out of range")
