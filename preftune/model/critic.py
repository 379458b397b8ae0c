"""OREO's critic V_φ(s) (Wang et al. 2024, arXiv 2412.16145; METHODS.md §M7; jwhj/OREO ``examples/train_pcl.py``,
``openrlhf/models/model.py`` ``_get_critic_model``, ``examples/scratch/batch_sbs.py``).

- **The network**: as the authors' critic, a copy of the initial (SFT) model's backbone with a bias-free linear value
  head, zero-initialised (their ``zero_init_value_head`` when no critic is loaded), V(s_t) = wᵀ h_t at the hidden
  state h_t of the position that predicts token t. preftune holds it as an ``AutoModelForTokenClassification``
  with one label (the head's bias frozen at 0, classifier dropout 0), so the saved critic is a plain HF folder
  that ``AutoModelForTokenClassification.from_pretrained`` loads, and that ``value_model`` takes back as the
  initial critic of a next (iterative OREO) run, as their ``--load_critic``.
- **Training**: the engine owns it (``LogProbEngine.critic``, like SparsePO's mask network), so it runs inside the
  engine's forward on the same packed batch, its parameters are in the run's optimizer (their own parameter group
  and learning rate, ``critic_learning_rate``), are clipped on their own (``max_grad_norm`` per network, as the
  authors' two DeepSpeed engines) and are saved in every checkpoint with the policy's (``critic.*``, one file,
  one atomic rename). ``preftune train --loss oreo`` adds ``oreo_value``'s loss to ``oreo``'s: the value loss
  reads Φ with stop-gradient and the policy loss reads V with stop-gradient, so one backward gives each network
  exactly its own loss's gradient and one optimizer step updates both from the same pre-step state — what the
  authors' loop computes (their actor reads the values computed before the critic's step, and the critic's
  targets come from the policy before the actor's step). ``--loss oreo_value`` trains the critic alone (their
  ``--critic_only``; the policy is frozen). The final critic is ``output/critic/``.
- **Search**: ``value_guided_beam`` (their ``batch_sbs.py``): step-level beam search scored by the critic.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

CRITIC_DIR = "critic"  # output/critic: the trained critic, an AutoModelForTokenClassification folder
VALUE_OBJECTIVE = "oreo_value"
DELIMITERS = {"newline": ("\n",), "newline_period": ("\n", ". ", ".$ ")}  # the authors' period_as_delimiter


def trains_critic(obj) -> bool:
    """Objectives that read the critic's values train it (oreo jointly, oreo_value alone)."""
    return "values" in obj.inputs


def critic_only(obj) -> bool:
    """``oreo_value``: the critic trains, the policy is frozen (the authors' ``--critic_only``)."""
    return obj.name == VALUE_OBJECTIVE


# ------------------------------------------------------------------------------------ the network


def _head(model: nn.Module) -> nn.Linear:
    """The token-classification head (Llama ``score``, BERT-style ``classifier``)."""
    for name in ("score", "classifier"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Linear):
            return head
    raise ValueError(f"{type(model).__name__}: no linear token-classification head (score/classifier)")


class Critic(nn.Module):
    """V(s) at the response positions of a packed batch (model/engine.py ``PackedBatch``), (M,) in float32.

    ``model``: a token-classification model with one label. The backbone runs on the engine's own layout
    (prefix-shared block masks and position ids included), so V(s_t) is read where the policy predicts token t.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        if getattr(model.config, "num_labels", None) != 1:
            raise ValueError(f"a critic has one output per token (num_labels=1), got {model.config.num_labels}")
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, pred_rows: Tensor, pred_pos: Tensor,
                position_ids: Tensor | None = None) -> Tensor:
        from preftune.model.engine import _attention_mask_for

        backbone = getattr(self.model, self.model.base_model_prefix)
        emb = self.model.get_input_embeddings().weight
        kwargs = {} if position_ids is None else {"position_ids": position_ids}
        out = backbone(input_ids=input_ids, attention_mask=_attention_mask_for(self.model, attention_mask, emb),
                       use_cache=False, **kwargs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return _head(self.model)(hidden[pred_rows, pred_pos]).squeeze(-1).float()  # (M,)

    @torch.no_grad()
    def last_values(self, sequences: Sequence[Sequence[int]], pad_id: int = 0) -> Tensor:
        """(n,) V at the last token of each sequence (the state after it): the search's score."""
        device = next(self.parameters()).device
        n, width = len(sequences), max(len(s) for s in sequences)
        ids = torch.full((n, width), pad_id, dtype=torch.long, device=device)
        mask = torch.zeros(n, width, dtype=torch.long, device=device)
        for i, s in enumerate(sequences):  # right padding: positions are 0.. as in training's unshared rows
            ids[i, : len(s)] = torch.as_tensor(list(s), device=device)
            mask[i, : len(s)] = 1
        last = torch.tensor([len(s) - 1 for s in sequences], device=device)
        return self(ids, mask, torch.arange(n, device=device), last)


def _plain_lm(model: nn.Module) -> nn.Module:
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(lm, "peft_config") or any("lora_" in n for n, _ in lm.named_parameters()):
        raise ValueError("the critic is copied from the initial model before LoRA adapters are added")
    return lm


def load_value_model(path: str):
    """A critic for OREO: any ``AutoModelForTokenClassification`` folder with ``num_labels = 1``."""
    from transformers import AutoModelForTokenClassification

    model = AutoModelForTokenClassification.from_pretrained(path, dtype=torch.float32)
    if model.config.num_labels != 1:
        raise ValueError(
            f"value_model {path}: expected a token-classification model with num_labels=1, "
            f"got {model.config.num_labels}"
        )
    return model


def new_critic(model: nn.Module, *, value_model: str | None = None, disable_dropout: bool = True) -> Critic:
    """The run's initial critic: ``value_model`` (a token-classification folder with one label, e.g. a previous
    run's ``output/critic``), else the authors' default, a copy of ``model``'s backbone (the initial policy, before
    any adapter) with a zero-initialised bias-free value head. Built in float32 on ``model``'s device."""
    from transformers import AutoModelForTokenClassification

    if value_model is not None:
        critic = Critic(load_value_model(value_model))
    else:
        lm = _plain_lm(model)
        cfg = copy.deepcopy(lm.config)
        cfg.num_labels, cfg.classifier_dropout, cfg.architectures = 1, 0.0, None
        cfg.id2label, cfg.label2id = {0: "value"}, {"value": 0}
        impl = getattr(lm.config, "_attn_implementation", None)
        tc = AutoModelForTokenClassification.from_config(cfg, dtype=torch.float32,
                                                         **({"attn_implementation": impl} if impl else {}))
        src = getattr(lm, lm.base_model_prefix)
        getattr(tc, tc.base_model_prefix).load_state_dict({k: v.float() for k, v in src.state_dict().items()})
        with torch.no_grad():
            _head(tc).weight.zero_()
        critic = Critic(tc.to(next(lm.parameters()).device))
    head = _head(critic.model)
    if head.bias is not None:  # bias-free as the authors' value head: kept at what was loaded (0 for a new one)
        head.bias.requires_grad_(False)
    for m in critic.modules():
        if isinstance(m, nn.Dropout) and (disable_dropout or m is getattr(critic.model, "dropout", None)):
            m.p = 0.0  # the authors' value head has no dropout
    return critic.train()


def critic_for(cfg, obj, model: nn.Module) -> Critic | None:
    """The critic a run of ``obj`` trains (None for objectives without one), from the initial ``model``."""
    if not trains_critic(obj):
        return None
    with torch.random.fork_rng(devices=[]):  # nothing here draws, but the run's random state stays untouched
        return new_critic(model, value_model=cfg.value_model, disable_dropout=cfg.disable_dropout)


def save_critic(critic: Critic, folder: Path, tokenizer=None) -> Path:
    """``folder`` (``output/critic``): the critic as a token-classification HF folder, written to a temporary
    folder and renamed."""
    import shutil

    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    critic.model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def load_critic(path: str | Path) -> Critic:
    """A critic saved by ``save_critic`` (a run's ``output/critic``, or the run folder itself), in eval mode."""
    path = Path(path)
    if (path / CRITIC_DIR / "config.json").is_file():
        path = path / CRITIC_DIR
    return Critic(load_value_model(str(path))).eval()


# ------------------------------------------------------------------------------------ training hooks


def value_loss_for(obj, params: dict):
    """For ``oreo``: (the value objective's function, its hyperparameters taken from ``params``); else None."""
    if not trains_critic(obj) or critic_only(obj):
        return None
    from preftune.losses import get

    value = get(VALUE_OBJECTIVE)
    return value.fn, {k: params[k] for k in value.hyperparameters if k in params}


def joint_output(policy_out, value_out):
    """One LossOutput for the joint step: losses L_π + L_V (each network gets its own gradient through the
    stop-gradients), both logged on their own (``policy_loss``, ``value_loss``)."""
    from preftune.losses.base import LossOutput

    metrics = {**policy_out.metrics, **value_out.metrics, "policy_loss": policy_out.losses.detach()}
    return LossOutput(policy_out.losses + value_out.losses, policy_out.chosen_rewards, policy_out.rejected_rewards,
                      metrics)


def optimizer_groups(params, critic: Critic | None, lr: float):
    """The run's parameter list or groups with the critic's trainable parameters in a group of their own at
    learning rate ``lr`` (the authors' critic optimizer: same betas and weight decay, its own learning rate; the
    schedule's shape is shared, as theirs is)."""
    if critic is None:
        return params
    ids = {id(p) for p in critic.parameters()}
    groups = params if params and isinstance(params[0], dict) else [{"params": list(params)}]
    rest = [{**g, "params": [p for p in g["params"] if id(p) not in ids]} for g in groups]
    return [g for g in rest if g["params"]] + [
        {"params": [p for p in critic.parameters() if p.requires_grad], "lr": lr}
    ]


class _WithCritic:
    """The checkpointed parameters plus the critic's under ``critic.`` (train/checkpoint.py reads only
    ``named_parameters``): policy and critic are saved in one file and restored together."""

    def __init__(self, model, critic: nn.Module):
        self.model, self.critic = model, critic

    def named_parameters(self):
        yield from self.model.named_parameters()
        for n, p in self.critic.named_parameters():
            yield f"critic.{n}", p


def with_critic(model, critic: nn.Module | None):
    return model if critic is None else _WithCritic(model, critic)


def step_starts(response_ids: Sequence[int], tokenizer, delimiters: Sequence[str],
                chars: Sequence[int] | None = None) -> list[bool]:
    """Which tokens begin a reasoning step (the authors' step-level states sit just before them).

    A step ends with a delimiter ('\\n'; with period_as_delimiter also '. ' and '.$ ') and the next begins at the
    following character, as the authors split the response text; the step's first token is the token holding
    that character (their ``char_to_token``). ``chars``: the steps' start offsets given by the data (its ``steps``
    field) instead of the delimiters. The first token always begins a step."""
    pieces = [tokenizer.decode([t]) for t in response_ids]
    text = "".join(pieces)
    starts = set(chars or ())
    for d in () if chars is not None else delimiters:
        i = text.find(d)
        while i != -1:
            starts.add(i + len(d))
            i = text.find(d, i + 1)
    out = [False] * len(pieces)
    if out:
        out[0] = True
    ends = [0] * len(pieces)
    pos = 0
    for j, p in enumerate(pieces):
        pos += len(p)
        ends[j] = pos
    j = 0
    for c in sorted(s for s in starts if s < len(text)):
        while ends[j] <= c:
            j += 1
        out[j] = True
    return out


def state_mask(batch, T: int, tokenizer, params: dict) -> Tensor:
    """(B, K, T) bool step-level states of a collated batch (``params['step_level']``), else every response token.
    Steps start at the data's ``steps`` (``batch.inputs['step_chars']``, data/trajectories.py) when it has them,
    else after the delimiters."""
    B, K = len(batch.response_ids), max(len(r) for r in batch.response_ids)
    out = torch.zeros(B, K, max(T, 1), dtype=torch.bool)
    delimiters = DELIMITERS[params.get("step_delimiters", "newline")]
    given = batch.inputs.get("step_chars")  # (B, K, n) offsets, −1 padding
    for b, responses in enumerate(batch.response_ids):
        for k, r in enumerate(responses):
            if params.get("step_level") and r:
                chars = None if given is None else [int(c) for c in given[b, k].tolist() if c >= 0]
                out[b, k, : len(r)] = torch.tensor(step_starts(r, tokenizer, delimiters, chars), dtype=torch.bool)
            else:
                out[b, k, : len(r)] = True
    return out


# ------------------------------------------------------------------------------------ value-guided search


@dataclass
class Candidate:
    """A partial (or finished) response: its token ids after the prompt and the critic's value of it."""

    ids: list[int]
    value: float
    finished: bool


def value_guided_beam(
    expand: Callable[[list[list[int]], int], list[list[tuple[list[int], bool]]]],
    score: Callable[[list[Candidate]], list[float]],
    *,
    width: int = 3,
    max_steps: int = 20,
) -> Candidate | None:
    """Step-level beam search with a critic (METHODS.md §M7(b); jwhj/OREO ``examples/scratch/batch_sbs.py``).

    ``expand(prefixes, n)``: for every prefix (response ids so far), ``n`` sampled next steps, each ``(step ids,
    finished)``; a step ends at the delimiter (unfinished) or at EOS / the length limit (finished).
    ``score(candidates)``: the critic's value of each candidate's response so far.
    Each beam is extended ``width`` times; every child is scored; finished children go to the answer pool; the
    ``width`` best unfinished children are the next beams; it stops when none is left or after ``max_steps``. The
    answer is the finished candidate of highest value (None when nothing finished, as theirs).
    """
    beams: list[Candidate] = [Candidate([], math.nan, False)]
    answers: list[Candidate] = []
    for _ in range(max_steps):
        steps = expand([b.ids for b in beams], width)
        children = [Candidate(b.ids + list(s), math.nan, done) for b, per in zip(beams, steps, strict=True)
                    for s, done in per]
        for c, v in zip(children, score(children), strict=True):
            c.value = float(v)
        answers += [c for c in children if c.finished]
        beams = sorted((c for c in children if not c.finished), key=lambda c: -c.value)[:width]
        if not beams:
            break
    return max(answers, key=lambda c: c.value) if answers else None


def sampler(policy, prompt_ids: list[int], tokenizer, *, delimiter: str = "\n", max_step_tokens: int = 256,
            temperature: float = 1.0, max_length: int = 2048):
    """``expand`` for ``value_guided_beam`` from a causal LM: steps sampled at ``temperature`` up to and including
    the first token whose text holds ``delimiter``; finished at EOS, at ``max_step_tokens`` without a delimiter,
    or at ``max_length`` tokens in all (the authors' vLLM call: stop='\\n', temperature 1)."""
    eos = tokenizer.eos_token_id
    device = next(policy.parameters()).device

    def cut(new: list[int]) -> tuple[list[int], bool]:
        for j, t in enumerate(new):
            if t == eos:
                return new[: j + 1], True
            if delimiter in tokenizer.decode([t]):
                return new[: j + 1], False
        return new, True

    @torch.no_grad()
    def expand(prefixes: list[list[int]], n: int) -> list[list[tuple[list[int], bool]]]:
        out = []
        for prefix in prefixes:
            ids = torch.tensor([prompt_ids + prefix] * n, device=device)
            room = max(1, min(max_step_tokens, max_length - ids.shape[1]))
            gen = policy.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=temperature,
                                  top_k=0, top_p=1.0, max_new_tokens=room, eos_token_id=eos,
                                  pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
                                  stop_strings=[delimiter], tokenizer=tokenizer)
            steps = [cut(row[ids.shape[1]:].tolist()) for row in gen]
            out.append([(s, done or len(prompt_ids) + len(prefix) + len(s) >= max_length) for s, done in steps])
        return out

    return expand


def scorer(critic: Critic, prompt_ids: list[int], eos_id: int | None, pad_id: int = 0):
    """``score`` for ``value_guided_beam``: V at the last token of prompt + response. A finished response is scored
    without its EOS (the state after EOS is never trained; the one before it is), an unfinished one with its
    delimiter token (the state a step-level critic is trained on). [preftune]: the authors' script scores the text
    with the stop string stripped and without EOS."""

    def score(cands: list[Candidate]) -> list[float]:
        seqs = [prompt_ids + (c.ids[:-1] if c.finished and c.ids and c.ids[-1] == eos_id else c.ids) for c in cands]
        return critic.last_values(seqs, pad_id).tolist()

    return score
