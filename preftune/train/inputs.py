"""Inputs the trainer computes for objectives, beyond the sequence statistics of the engine.

An objective declares the keys it reads from ``PolicyStats.inputs`` (registry ``inputs``). Most come
from the data (scores, labels, win_probs, rm_margin, semantic_distance...); the keys below are
computed here, once per micro-batch, by :func:`provide_inputs` (called from ``Runner.forward_loss``).
A key the data already carries is never recomputed: the data wins (e.g. INPO's ``prev_logps``).

=================  ==========================================================================
key                source
=================  ==========================================================================
kl_logps           KTO's KL baseline: policy log-probs of mismatched (prompt, completion) pairs
ref_kl_logps       of the same micro-batch (prompt i with the completion of example i − 1 mod B,
                   TRL's and HALOs' cyclic shift), policy under no_grad as in TRL 1.16
                   (``KTOTrainer._compute_kl_logps``); z0 is detached anyway. Needs reference
                   weights at train time (a live reference, or LoRA with the adapter disabled).
prev_logps         INPO's π_t: first iteration π_t = π_ref, i.e. the reference log-probs; later
                   iterations pass π_t's summed log-probs as a ``prev_logps`` column.
token_reward_mask  SparsePO's learned masks (sparsepo_learned): computed by the engine's mask network
token_kl_mask      (model/masks.py) from the reference's every-block hidden states, in the forward.
token_activation_  MaPO's mask (sparsepo_mapo): from the reference's activations, hooked during the
mask               engine's live-reference pass (model/masks.py). Neither is a provider's work.
token_rm_logps     TGDPO: per-token log-probs of the frozen token-level reward policy
                   ``TrainConfig.token_rm_model`` (same tokenizer), loaded once.
values             OREO: V(s_t) at every response position from the critic the engine owns and trains
                   (model/critic.py), computed in the engine's forward; not a provider's work.
policy_kl          OREO: KL_t(π_θ ‖ π_ref) over the vocabulary, from the live-reference forward.
state_mask         OREO: the states (B, K, T): every response token, or with ``step_level`` the first
                   token of every reasoning step (model/critic.py ``state_mask``, the tokenizer's text).
margin_rewards     MODPO: (B, K, 0) when neither the data nor margin_models give margin columns.
rationale_logps    RDPO / R-ORPO: ℓ_θ(r | x_rat) and the token count of each pair's rationale, scored
rationale_lengths  by the policy in the same forward as the pair (loop.PolicyForward, model/engine.py
                   with_side); records carry ``rationales``. Not a provider's work.
prior_logps        BRAIn: the prior's log-probs; absent from the data, the prior is the proposal
                   (``proposal_logps``: responses sampled from the SFT model itself).
terminal_reward    OREO: the trajectory reward R — a ``terminal_reward`` column, else ``scores``,
                   else the label (1 desirable / 0 undesirable).
step_ids           TPO trees: each response token's step index (−1 off the response), steps starting at the
                   data's ``steps`` (``step_chars``) or after newlines (model/critic.py ``state_mask``).
prompt_tokens      MAPL: per response, its leading tokens that belong to its own prompt (records with
                   ``pair_prompts``, counted at tokenisation); 0 for records without.
step_hidden        TPO trees: the policy's last-layer hidden states pooled per step (B, K, S, H), from a
                   separate no-grad forward (one row per response): a_{i,s} takes no gradient anyway.
=================  ==========================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Provider:
    keys: tuple[str, ...]  # the keys one call produces
    fn: Callable  # fn(runner, batch, packed, policy, ref) -> dict[str, Tensor]
    source: str  # one line for the docs and error messages
    live_reference: bool = False  # needs reference weights during training (not a precomputed cache)
    config: str | None = None  # the TrainConfig field it needs


# ------------------------------------------------------------------------------------ providers


def _unshared(runner, batch, packed):
    """The one-row-per-response layout of the same batch (for auxiliary models, which need not
    support prefix sharing); token order, and so the (B, K, T) grid, is the same as ``packed``'s."""
    from preftune.model.engine import pack

    if not packed.shared:
        return packed
    return pack(batch.prompt_ids, batch.response_ids, runner.pad_id, device=runner.acc.device)


def _aux_model(runner, field: str, loader: Callable):
    """Load ``runner.cfg.<field>`` once per run; frozen, eval mode, on the run's device."""
    cache = runner.__dict__.setdefault("_aux_models", {})
    if field not in cache:
        model = loader(getattr(runner.cfg, field))
        model.eval().requires_grad_(False)
        cache[field] = model.to(runner.acc.device)
    return cache[field]


def _kto_kl(runner, batch, packed, policy, ref) -> dict[str, Tensor]:
    from preftune.model.engine import pack, reference_stats, scatter_stats

    n = batch.batch_size
    # Prompt i with the completion of example i − 1 (mod B): TRL's [c_{B-1}, c_0, ..., c_{B-2}].
    responses = [[batch.response_ids[(i - 1) % n][0]] for i in range(n)]
    engine = runner.base_engine
    kl_packed = pack(
        batch.prompt_ids,
        responses,
        runner.pad_id,
        device=runner.acc.device,
        share_prefix=engine.shares_prefix(),
    )
    with torch.no_grad(), runner.acc.autocast():
        kl, _, _ = scatter_stats(kl_packed, engine(**kl_packed.tensors())["token_logps"], False)
        ref_kl = reference_stats(engine, kl_packed, runner.ref_model, False).logps
    return {"kl_logps": kl[:, 0].float(), "ref_kl_logps": ref_kl[:, 0].float()}


def _prev_logps(runner, batch, packed, policy, ref) -> dict[str, Tensor]:
    if ref is None:
        raise ValueError("prev_logps (π_t = π_ref on the first iteration) needs the reference log-probs")
    return {"prev_logps": ref.logps.detach().float()}


def _engine_masks(runner, batch, packed, policy, ref) -> dict[str, Tensor]:
    # The engine fills these in every forward with a live reference (loop.PolicyForward); reaching here
    # means a forward without one.
    raise ValueError("SparsePO's token masks come from the live-reference pass of the policy forward "
                     "(reference=live); this forward had none")


def _token_rm_logps(runner, batch, packed, policy, ref) -> dict[str, Tensor]:
    from preftune.model import load_model
    from preftune.model.engine import LogProbEngine, scatter_stats

    rm = _aux_model(runner, "token_rm_model", lambda path: load_model(path, dtype="float32")[0])
    p = _unshared(runner, batch, packed)
    with torch.no_grad(), runner.acc.autocast():
        out = LogProbEngine(rm, runner.cfg.logits_chunk, prefix_sharing="off")(**p.tensors())
    _, tok, _ = scatter_stats(p, out["token_logps"].float(), True)
    return {"token_rm_logps": tok}


def _engine_critic(runner, batch, packed, policy, ref) -> dict[str, Tensor]:
    # The engine fills values (its critic) and policy_kl (a live reference) in every forward of an OREO run.
    raise ValueError("OREO's values and KL(π_θ‖π_ref) come from the engine's forward (its critic, model/critic.py, "
                     "and a live reference); this forward had none")


def _state_mask(runner, batch, packed, policy, ref) -> dict[str, Tensor]:
    from preftune.model.critic import state_mask

    return {"state_mask": state_mask(batch, packed.T, runner.tokenizer, runner.forward.params).to(policy.logps.device)}


def _no_margins(runner, batch, packed, policy, ref) -> dict[str, Tensor]:
    # MODPO without margin columns (neither in the data nor from margin_models): w = (w_0,), i.e. DPO.
    return {"margin_rewards": policy.logps.new_zeros(*policy.logps.shape, 0).detach()}


def _engine_rationales(runner, batch, packed, policy, ref) -> dict[str, Tensor]:
    # The policy forward fills these when the batch carries rationales; reaching here means it had none.
    raise ValueError("rationale_logps: the batch has no rationales (records need `rationales`, one per pair, or a "
                     "`rationale` column)")


def _prior_is_proposal(runner, batch, packed, policy, ref) -> dict[str, Tensor]:
    if "proposal_logps" not in policy.inputs:
        raise ValueError("prior_logps defaults to proposal_logps, and the data has neither")
    return {"prior_logps": policy.inputs["proposal_logps"]}


def _terminal_reward(runner, batch, packed, policy, ref) -> dict[str, Tensor]:
    for key in ("scores", "labels"):
        if key in batch.inputs:
            return {"terminal_reward": batch.inputs[key].float().to(policy.logps.device)}
    raise ValueError("terminal_reward needs a terminal_reward, scores or label column")



def _tree_steps(runner, batch, packed, policy, ref) -> dict[str, Tensor]:
    from preftune.losses.tree import clip_steps, step_means
    from preftune.model.critic import state_mask

    B, K, T = packed.B, packed.K, max(packed.T, 1)
    starts = state_mask(batch, T, runner.tokenizer, {"step_level": True})  # (B, K, T) first token of each step
    in_response = torch.arange(T) < packed.lengths.cpu().unsqueeze(-1)  # (B, K, T)
    ids = torch.where(in_response, starts.long().cumsum(-1) - 1, -1)
    p = _unshared(runner, batch, packed)
    model = runner.base_engine.model
    with torch.no_grad(), runner.acc.autocast():
        out = model(input_ids=p.input_ids, attention_mask=p.attention_mask, output_hidden_states=True)
    last = out.hidden_states[-1].float()  # (N, L, H); a response token's own position is pred_pos + 1
    grid = last.new_zeros(B * K, T, last.shape[-1])
    grid[p.token_slot, p.token_index] = last[p.pred_rows, p.pred_pos + 1]
    device = policy.logps.device
    ids = clip_steps(ids.to(device), packed.valid.to(device))
    pooled, _ = step_means(grid.view(B, K, T, -1).to(device), ids, max(int(ids.max().item()) + 1, 1))
    return {"step_ids": ids, "step_hidden": pooled}


def _no_own_prompts(runner, batch, packed, policy, ref) -> dict[str, Tensor]:
    return {"prompt_tokens": policy.logps.new_zeros(policy.logps.shape)}

PROVIDERS: tuple[Provider, ...] = (
    Provider(
        ("kl_logps", "ref_kl_logps"),
        _kto_kl,
        "mismatched (prompt, completion) pairs of the micro-batch (completion of example i−1 with "
        "prompt i), policy under no_grad and reference",
        live_reference=True,
    ),
    Provider(
        ("prev_logps",),
        _prev_logps,
        "a prev_logps column (π_t's summed log-probs); without it π_t = π_ref (the first iteration)",
    ),
    Provider(
        ("token_reward_mask", "token_kl_mask"),
        _engine_masks,
        "the learned mask network (model/masks.py TokenMaskHead on the reference's every-block hidden states; "
        "a common mask is one tensor under both keys), computed in the engine's forward, trained with the policy",
    ),
    Provider(
        ("token_activation_mask",),
        _engine_masks,
        "MaPO's mask from the reference's activations (hooks in the live-reference pass, min–max per response; "
        "model/masks.py mapo_mask), no gradient",
    ),
    Provider(
        ("token_rm_logps",),
        _token_rm_logps,
        "per-token log-probs of the frozen reward policy token_rm_model",
        config="token_rm_model",
    ),
    Provider(
        ("values",),
        _engine_critic,
        "V(s_t) from the critic trained with the policy (model/critic.py: a copy of the initial model with a "
        "zero-initialised value head, or value_model), computed in the engine's forward",
    ),
    Provider(("policy_kl",), _engine_critic, "KL(π_θ‖π_ref) per token over the vocabulary, from the live reference"),
    Provider(
        ("state_mask",), _state_mask,
        "every response token, or with step_level the first token of each reasoning step (split at the delimiters)",
    ),
    Provider(
        ("margin_rewards",),
        _no_margins,
        "a margin_rewards column (one list of floats per response, named by objective_names), or margin_models "
        "scored once before training (reward/margins.py); neither: no margin columns (MODPO = DPO)",
    ),
    Provider(
        ("rationale_logps", "rationale_lengths"),
        _engine_rationales,
        "the policy's summed log-prob and token count of each pair's rationale after its rationale prompt x_rat, "
        "scored in the policy forward (records carry `rationales`; data/rationales.py renders x_rat)",
    ),
    Provider(
        ("prior_logps",),
        _prior_is_proposal,
        "a prior_logps field (log p(y|x) under the SFT prior, recorded when sampling); absent: the prior is the "
        "proposal (prior_logps = proposal_logps)",
    ),
    Provider(
        ("terminal_reward",), _terminal_reward, "a terminal_reward column, else scores, else the label as 1/0"
    ),
    Provider(
        ("prompt_tokens",), _no_own_prompts,
        "records with pair_prompts: each response's leading tokens that are its own prompt's (counted when "
        "tokenising); 0 for the others",
    ),
    Provider(
        ("step_ids", "step_hidden"), _tree_steps,
        "each response token's step (steps from the data's `steps`, else split after newlines; indices past the "
        "group's shortest response clipped) and the policy's last-layer hidden states pooled per step (no grad)",
    ),
)
_BY_KEY = {k: p for p in PROVIDERS for k in p.keys}


def engine_keys() -> frozenset[str]:
    """Every input key the trainer can compute (the rest must come from the data)."""
    return frozenset(_BY_KEY)


def providers_for(obj) -> list[Provider]:
    seen: list[Provider] = []
    for key in obj.inputs:
        p = _BY_KEY.get(key)
        if p is not None and p not in seen:
            seen.append(p)
    return seen


def needs_live_reference(obj) -> bool:
    return any(p.live_reference for p in providers_for(obj))


def required_config(obj) -> list[str]:
    """TrainConfig fields the objective's computed inputs need (e.g. tgdpo: token_rm_model)."""
    return [p.config for p in providers_for(obj) if p.config]


DATA_SOURCES = {
    "labels": "the data's labels (a label column; pairs give chosen = desirable, rejected = undesirable)",
    "scores": "the data's scores or ranking, in the list's order",
}


def input_sources(obj) -> dict[str, str]:
    """key → where ``preftune train`` gets it: computed here, or a data column."""
    return {
        k: _BY_KEY[k].source if k in _BY_KEY else DATA_SOURCES.get(k, f"data column `{k}`")
        for k in obj.inputs
    }


def provide_inputs(runner, obj, batch, packed, policy, ref) -> dict[str, Tensor]:
    """The computed inputs ``obj`` declares and the data does not carry, for one micro-batch."""
    out: dict[str, Tensor] = {}
    for p in providers_for(obj):
        if all(k in policy.inputs for k in p.keys):
            continue
        got = p.fn(runner, batch, packed, policy, ref)
        out.update({k: v for k, v in got.items() if k not in policy.inputs})
    return out
