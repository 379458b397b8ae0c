"""SparsePO's token masks (Christopoulou et al. 2025, arXiv 2410.05102; METHODS.md §M2; huawei-noah/HEBO
``SparsePO/src/masks/mask_models.py``, ``trainers/mapo_trainer.py``).

Two sources, both read at the positions whose hidden state predicts a response token (the engine's
``pred_rows``/``pred_pos``, i.e. the authors' "drop the last position, align with the labels"):

- **learned** (``sparsepo_learned``): ``TokenMaskHead`` ("simple_all") on the reference's hidden states of
  every block, trained through the loss with the policy. ``SparseMaskNet`` holds one head (a common mask)
  or two (independent reward and KL masks). The engine owns it (``LogProbEngine.token_masks``), so its
  parameters are in the optimizer, synced by DDP and checkpointed with the trainable weights
  (``with_mask_net``); the final network is ``output/sparsepo_mask.safetensors`` (``save_mask_net``).
- **MaPO** (``sparsepo_mapo``): no parameters. ``record_activations`` hooks a Llama-style reference
  during the engine's no-grad live-reference pass; ``mapo_mask`` turns the per-token feature means into
  one mask in [0, 1] per response.

Everything here is torch only; the engine passes the backbone in.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

# The authors' mask_weight_decay in every experiment (sparse_config.py default; README's TL;DR/HH rows),
# applied to the mask network's weights only (HF's rule: no decay on biases and LayerNorm).
MASK_WEIGHT_DECAY = 0.01
# The authors' mask_dropout default; their trainer's disable_dropout=True zeroes it (TRL's
# disable_dropout_in_model runs on the model that holds the mask modules), as preftune's does.
MASK_DROPOUT = 0.01
MASK_FILE = "sparsepo_mask.safetensors"
# Inputs (B, K, T) the engine computes for SparsePO's objectives (registry ``inputs``).
LEARNED_KEYS = ("token_reward_mask", "token_kl_mask")
ACTIVATION_KEY = "token_activation_mask"
GROUPS = ("mlp", "attn", "resid", "logits")


# ------------------------------------------------------------------------------------ learned masks


class TokenMaskHead(nn.Module):
    """One "simple_all" mask (HEBO ``SimpleMaskAllLayers`` with relu layer and mixer activations).

    h_{l,t}: the reference's hidden state after block l (HF ``hidden_states[1:]``: the last is after the
    final norm). s_{l,t} = Dropout(ReLU(w_lᵀ LN(h_{l,t}) + b_l)), m_t = Dropout(ReLU(Σ_l c_l s_{l,t})):
    one LayerNorm shared by all layers (affine, the model's ε), w_l ∈ R^d and b_l per layer, a mixer c
    without bias. m_t ≥ 0 and unbounded. Init as HF ``_init_weights`` initialises the authors' modules
    (they are built inside a ``PreTrainedModel``): weights N(0, init_std²), biases 0, LayerNorm (1, 0).
    """

    def __init__(self, hidden_size: int, num_layers: int, eps: float, dropout: float = MASK_DROPOUT,
                 init_std: float = 0.02):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.layer_weight = nn.Parameter(torch.empty(num_layers, hidden_size))  # w_l, one row per layer
        self.layer_bias = nn.Parameter(torch.zeros(num_layers))  # b_l
        self.mixer = nn.Parameter(torch.empty(num_layers))  # c
        self.dropout = nn.Dropout(dropout)
        nn.init.normal_(self.layer_weight, std=init_std)
        nn.init.normal_(self.mixer, std=init_std)

    def forward(self, layer_hidden: Tensor) -> Tensor:
        """(L, M, H) hidden states of the L blocks at M positions → (M,) mask values."""
        x = self.norm(layer_hidden)
        s = self.dropout(torch.relu(torch.einsum("lmh,lh->ml", x, self.layer_weight) + self.layer_bias))  # (M, L)
        return self.dropout(torch.relu(s @ self.mixer))

    def decay_parameters(self) -> list[nn.Parameter]:
        return [self.layer_weight, self.mixer]


class SparseMaskNet(nn.Module):
    """SparsePO's learned masks: one common head for both terms, or independent reward / KL heads."""

    def __init__(self, hidden_size: int, num_layers: int, eps: float, *, independent: bool, reward: bool = True,
                 kl: bool = True, dropout: float = MASK_DROPOUT, init_std: float = 0.02):
        super().__init__()
        if not (reward or kl):
            raise ValueError("SparsePO's mask network needs mask_reward or mask_kl")
        self.settings = dict(hidden_size=hidden_size, num_layers=num_layers, eps=eps, independent=independent,
                             reward=reward, kl=kl)
        names = [n for n, on in (("reward", reward), ("kl", kl)) if on] if independent else ["common"]
        self.heads = nn.ModuleDict({n: TokenMaskHead(hidden_size, num_layers, eps, dropout, init_std) for n in names})

    def forward(self, layer_hidden: Tensor) -> dict[str, Tensor]:
        """(L, M, H) → {input key: (M,) mask}; a common mask is the same tensor under both keys."""
        if "common" in self.heads:
            m = self.heads["common"](layer_hidden)
            return {k: m for k in LEARNED_KEYS}
        return {f"token_{n}_mask": head(layer_hidden) for n, head in self.heads.items()}

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(weights decayed by MASK_WEIGHT_DECAY, biases and LayerNorm: no decay)."""
        decay = [p for h in self.heads.values() for p in h.decay_parameters()]
        ids = {id(p) for p in decay}
        return decay, [p for p in self.parameters() if id(p) not in ids]


def learned_masks_needed(obj) -> bool:
    return any(k in obj.inputs for k in LEARNED_KEYS)


def activation_mask_needed(obj) -> bool:
    return ACTIVATION_KEY in obj.inputs


def layer_norm_eps(config) -> float:
    for name in ("layer_norm_eps", "layer_norm_epsilon", "rms_norm_eps"):
        if getattr(config, name, None) is not None:
            return float(getattr(config, name))
    return 1e-5


def mask_net_for(obj, params: dict, model, *, disable_dropout: bool, seed: int) -> SparseMaskNet | None:
    """The mask network ``obj`` trains (None for objectives without learned masks), sized from ``model`` and
    initialised from ``seed`` without touching the global random state."""
    if not learned_masks_needed(obj):
        return None
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = lm.config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SparseMaskNet(
            cfg.hidden_size, cfg.num_hidden_layers, layer_norm_eps(cfg), independent=params["masks"] == "independent",
            reward=params["mask_reward"], kl=params["mask_kl"], dropout=0.0 if disable_dropout else MASK_DROPOUT,
            init_std=float(getattr(cfg, "initializer_range", 0.02)),
        )


class _WithMaskNet:
    """The model's parameters plus the mask network's under ``token_masks.``: what checkpoints save and
    restore (train/checkpoint.py reads only ``named_parameters``)."""

    def __init__(self, model: nn.Module, net: nn.Module):
        self.model, self.net = model, net

    def named_parameters(self):
        yield from self.model.named_parameters()
        for n, p in self.net.named_parameters():
            yield f"token_masks.{n}", p


def with_mask_net(model: nn.Module, net: nn.Module | None):
    return model if net is None else _WithMaskNet(model, net)


def save_mask_net(net: SparseMaskNet, folder: Path) -> Path:
    """``folder/sparsepo_mask.safetensors`` (its settings in the metadata), written via a temporary file."""
    from safetensors.torch import save_file

    path = Path(folder) / MASK_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    state = {k: v.detach().float().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(tmp), metadata={"settings": json.dumps(net.settings)})
    tmp.replace(path)
    return path


def load_mask_net(path: Path) -> SparseMaskNet:
    """A network written by ``save_mask_net`` (a file, or the run's output folder), in eval mode."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / MASK_FILE
    with safe_open(str(path), framework="pt") as f:
        settings = json.loads((f.metadata() or {})["settings"])
    net = SparseMaskNet(**settings, dropout=0.0)
    net.load_state_dict(load_file(str(path)))
    return net.eval()


# ------------------------------------------------------------------------------------ MaPO masks


def minmax_per_response(x: Tensor, slot: Tensor, n_slots: int) -> Tensor:
    """(n, M) values → (n, M) rescaled to [0, 1] within each response (tokens sharing ``slot``).

    The authors z-score first, then min–max; min–max of a z-score is the min–max of the values, so the
    z-score is left out (METHODS.md §0 correction 3). A response whose values are all equal (one token,
    or a constant activation) would be 0/0: it gets 1 everywhere [preftune], so it is not masked out.
    """
    idx = slot.expand_as(x)
    lo = torch.full((x.shape[0], n_slots), float("inf"), dtype=x.dtype, device=x.device)
    hi = torch.full_like(lo, float("-inf"))
    lo = lo.scatter_reduce(1, idx, x, "amin").gather(1, idx)
    hi = hi.scatter_reduce(1, idx, x, "amax").gather(1, idx)
    span = hi - lo
    flat = span <= 0
    return torch.where(flat, torch.ones_like(x), (x - lo) / torch.where(flat, torch.ones_like(span), span))


def mapo_mask(groups: dict[str, Tensor], slot: Tensor, n_slots: int) -> Tensor:
    """MaPO's common mask (``activation_mapping='zn_rescale'``, ``activation_hook='all'``), (M,) in [0, 1].

    ``groups``: group name → (n_tensors, M) feature means of each hooked tensor at the M response tokens
    (``slot``: each token's response, b·K + k). Each tensor is min–max rescaled per response, the tensors
    of a group averaged, then the groups averaged with equal weight.
    """
    per_group = [minmax_per_response(g.to(torch.float64 if g.dtype == torch.float64 else torch.float32),
                                     slot, n_slots).mean(0) for g in groups.values()]
    return torch.stack(per_group).mean(0)


def _check_llama_style(backbone: nn.Module) -> None:
    what = type(backbone).__name__
    layers = getattr(backbone, "layers", None)
    if layers is None or not hasattr(backbone, "norm") or not hasattr(backbone, "embed_tokens"):
        raise ValueError(f"sparsepo_mapo hooks Llama-style models (embed_tokens, layers, norm); {what} is not one")
    for layer in layers:
        kids = {n for n, _ in layer.named_children()}
        norms = ("input_layernorm", "post_attention_layernorm")
        extra_norms = sorted(n for n in kids if "norm" in n and n not in norms)
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        missing = [n for n in ("self_attn", "mlp", *norms) if n not in kids]
        missing += [f"self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim")
                    if attn is not None and not hasattr(attn, n)]
        missing += ["mlp.down_proj"] if mlp is not None and not hasattr(mlp, "down_proj") else []
        qk_norm = [n for n in ("q_norm", "k_norm") if attn is not None and hasattr(attn, n)]
        rotary = attn is not None and hasattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb")
        if missing or extra_norms or qk_norm or not rotary:
            why = "; ".join(filter(None, [
                f"lacks {', '.join(missing)}" if missing else "",
                f"has other norms ({', '.join(extra_norms + qk_norm)})" if extra_norms or qk_norm else "",
                "" if rotary or attn is None else "its attention module has no apply_rotary_pos_emb",
            ]))
            raise ValueError(f"sparsepo_mapo hooks Llama-style decoder layers (pre-norm, sequential residual, rotary "
                             f"q/k without q/k norms: Llama, Mistral, Qwen2, SmolLM2); {type(layer).__name__} {why}")


@contextlib.contextmanager
def record_activations(backbone: nn.Module) -> Iterator[dict[str, list[Tensor]]]:
    """Forward hooks on a Llama-style backbone for one forward: group → list of (N, L) feature means.

    The authors' hook points (GPT-NeoX, sequential residual), mapped onto a Llama-style layer:
    mlp: the MLP's hidden activation (input of ``down_proj``; NeoX ``mlp.post_act``); attn: q, k, v (the
    projections), q and k after the rotary embedding, and the heads' output before ``o_proj`` (``v_out``);
    resid: input_layernorm's output, the attention output, the residual after attention, the
    post-attention norm's output, the MLP output and the layer output (the six points NeoX's sequential
    branch fires; ``post_ln_mlp`` is listed there but never fired), plus the embeddings and the final
    norm's output. The logits group is computed by the caller from the final hidden states.
    """
    _check_llama_style(backbone)
    rec: dict[str, list[Tensor]] = {"mlp": [], "attn": [], "resid": []}
    handles = []

    def keep(group: str, x: Tensor) -> None:
        rec[group].append(x.detach().to(torch.promote_types(x.dtype, torch.float32)).mean(-1))  # (N, L) at once

    def out_hook(group):
        return lambda mod, args, out: keep(group, out[0] if isinstance(out, tuple) else out)

    def in_hook(group):
        return lambda mod, args: keep(group, args[0])

    for layer in backbone.layers:
        attn, state = layer.self_attn, {}
        rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb

        def attn_pre(mod, args, kwargs, state=state):
            state["cos_sin"] = kwargs.get("position_embeddings")

        def proj(name, state=state):
            def hook(mod, args, out):
                state[name] = out.detach()
                keep("attn", out)
            return hook

        def attn_post(mod, args, out, state=state, attn=attn, rope=rope):
            # q and k after the rotary embedding, recomputed from the projections the model just used.
            cos, sin = state["cos_sin"]
            shape = (*state["q"].shape[:-1], -1, attn.head_dim)
            q, k = (state[n].view(shape).transpose(1, 2) for n in ("q", "k"))
            q, k = rope(q, k, cos, sin)
            keep("attn", q.transpose(1, 2).flatten(-2))
            keep("attn", k.transpose(1, 2).flatten(-2))
            keep("resid", out[0] if isinstance(out, tuple) else out)  # delta_attn

        handles += [
            layer.input_layernorm.register_forward_hook(out_hook("resid")),  # input_ln_attn
            attn.register_forward_pre_hook(attn_pre, with_kwargs=True),
            attn.q_proj.register_forward_hook(proj("q")),
            attn.k_proj.register_forward_hook(proj("k")),
            attn.v_proj.register_forward_hook(proj("v")),
            attn.o_proj.register_forward_pre_hook(in_hook("attn")),  # v_out
            attn.register_forward_hook(attn_post),
            layer.post_attention_layernorm.register_forward_pre_hook(in_hook("resid")),  # post_attn
            layer.post_attention_layernorm.register_forward_hook(out_hook("resid")),  # post_ln_attn
            layer.mlp.down_proj.register_forward_pre_hook(in_hook("mlp")),  # post_act
            layer.mlp.register_forward_hook(out_hook("resid")),  # delta_mlp
            layer.register_forward_hook(out_hook("resid")),  # post_mlp
        ]
    handles += [
        backbone.embed_tokens.register_forward_hook(out_hook("resid")),  # post_emb
        backbone.norm.register_forward_hook(out_hook("resid")),  # post_ln_f
    ]
    try:
        yield rec
    finally:
        for h in handles:
            h.remove()


def optimizer_groups(trainable: list[nn.Parameter], net: SparseMaskNet | None):
    """AdamW parameter groups: ``trainable`` as it is without a mask network; with one, the rest of the
    trainable parameters (the run's weight decay), the network's weights (MASK_WEIGHT_DECAY) and its
    biases and LayerNorm (no decay), as the authors' ``create_optimizer`` groups them."""
    if net is None:
        return trainable
    decay, no_decay = net.param_groups()
    ids = {id(p) for p in net.parameters()}
    return [
        {"params": [p for p in trainable if id(p) not in ids]},
        {"params": decay, "weight_decay": MASK_WEIGHT_DECAY},
        {"params": no_decay, "weight_decay": 0.0},
    ]
