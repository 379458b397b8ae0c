"""Training dynamics in ``metrics.jsonl`` (issue 12): where the probability mass goes while a preference
objective trains, and how the gradient splits between the chosen and the rejected response.

Measured every ``dynamics_steps`` optimizer steps that are logged, and at the last step (docs/dynamics.md):

1. **Likelihood displacement on a fixed probe.** The probe is the first ``dynamics_probe`` training
   examples, fixed for the run. At step 0 and at every measured step each probe response is scored with
   the current policy: eval mode, no gradients, eager (no compiled graph), so the number is the same
   function of the weights at every step. ``dynamics/<role>_logp_delta`` is the mean over the probe's
   responses of that role of log π_s(y|x) − log π_0(y|x) (summed over tokens);
   ``dynamics/<role>_token_logp_delta`` the same per token (each response's change divided by its token
   count). A fixed probe because the training step's own ``logps/chosen`` averages a different batch every
   step: its trend mixes the model's change with the batch's composition (lengths, topics), while a fixed
   probe's change is the model's alone.
2. **Dispersion onto unseen responses** (3D-properties, Yan et al. 2024, arXiv 2406.07327): responses
   that are in no training pair, ``dynamics_unseen`` of them, one sampled from the initial policy π_0
   (temperature 1, no top-k/top-p) on each of the first probe prompts at step 0, at most
   ``dynamics_unseen_tokens`` tokens, then scored with the probe: ``dynamics/unseen_logp_delta``.
3. **Gradients of the step's batch.** With ℓ_i the objective's loss of example i and ℓ_t the log-prob of
   response token t: ``dynamics/dL_dlogp_<role>`` is the mean over the batch's responses of that role of
   (1/|y|) Σ_t ∂Σ_iℓ_i/∂ℓ_t, which is ∂ℓ_i/∂log π(y|x) for an objective of summed log-probs (DPO:
   −βσ(−βΔ) and +βσ(−βΔ)). ``dynamics/hidden_grad_ratio`` is ‖∂L_c/∂H‖ / ‖∂L_r/∂H‖, H the final
   hidden states (the LM head's input) of the step's micro-batches and L_c = Σ_t g_t ℓ_t over the chosen
   tokens with g_t = ∂Σ_iℓ_i/∂ℓ_t held fixed: the part of the loss gradient that flows through the
   chosen log-probs, measured where it enters the backbone (exact; every parameter's gradient below the
   head is a linear function of it). ``dynamics/log_dL_dprob_ratio`` (pairs only) is the paper's ratio
   of the gradients with respect to the sequence probabilities, log(|∂ℓ/∂π(y_c)| / |∂ℓ/∂π(y_r)|) =
   log|∂ℓ/∂logπ_c| − log π_c − log|∂ℓ/∂logπ_r| + log π_r, averaged over the batch (DPO: log π_r − log π_c).

Roles: pairs (and TPO's chosen/rejected/gold triples) have chosen and rejected columns; unpaired data
(KTO, BCO) has desirable and undesirable responses by label; lists have neither, so they get the
displacement of all their responses (``response``) and of the unseen ones, and no gradient split.

Under data parallelism the probe runs on the main process through the unwrapped engine (no collective);
the gradient sums go through the Runner's reduction with the step's other metrics. Under FSDP2 and
DeepSpeed a probe forward would be collective and the LM head sharded, so dynamics are off there, with the
reason logged. Nothing here draws from the training RNG streams or changes a weight: the sample runs in
a forked, seeded RNG, and the trajectory with dynamics on equals the one with them off (a test checks it).
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from time import perf_counter as now

import torch

from preftune.model.engine import _logits_postprocess, pack, scatter_stats, split_lm

PREFIX = "dynamics/"
PROBE_FILE = "dynamics_probe.json"  # in the output folder: the probe and its step-0 log-probs, for --resume


# ------------------------------------------------------------------------------------------ roles


def roles_of(obj) -> tuple[str, str] | None:
    """The two sides whose gradients are compared: (chosen, rejected) for pairs and triples,
    (desirable, undesirable) for labelled unpaired data, None for lists."""
    if obj.shape == "paired" or tuple(obj.columns[:2]) == ("chosen", "rejected"):
        return ("chosen", "rejected")
    if obj.shape == "unpaired":
        return ("desirable", "undesirable")
    return None


def response_roles(obj, num_responses: int, labels=None) -> list[str]:
    """The role name of each response of one example (``labels``: its ``inputs["labels"]``, unpaired)."""
    if obj.columns:
        return [obj.columns[k] if k < len(obj.columns) else "response" for k in range(num_responses)]
    if obj.shape == "paired":
        return ["chosen", "rejected", *["response"] * (num_responses - 2)]
    if obj.shape == "unpaired" and labels is not None:
        return ["desirable" if bool(v) else "undesirable" for v in list(labels)[:num_responses]]
    return ["response"] * num_responses


def role_grid(obj, valid: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """(B, K): 0 for a chosen/desirable response, 1 for a rejected/undesirable one, -1 otherwise."""
    B, K = valid.shape
    roles = torch.full((B, K), -1, dtype=torch.long, device=valid.device)
    sides = roles_of(obj)
    if sides == ("chosen", "rejected"):
        roles[:, 0] = 0
        roles[:, 1] = 1
    elif sides is not None and labels is not None:
        lab = labels.to(valid.device).reshape(B, -1).expand(B, K)
        roles = torch.where(lab.bool(), 0, 1)
    return roles.masked_fill(~valid.bool(), -1)


def unsupported_reason(kind: str) -> str | None:
    """Why dynamics are off under this launch (None: they run)."""
    if kind in ("fsdp2", "deepspeed"):
        return (f"under {kind} a probe forward is collective and the LM head is sharded; "
                "measure dynamics with a single-process or DDP run")
    return None


def due(step: int, total: int, every: int, logging_steps: int) -> bool:
    """Whether step ``step`` (1-based, after its update) is measured: every ``every`` steps and the last,
    when the row is logged at all."""
    logged = step % logging_steps == 0 or step == total
    return logged and (step % every == 0 or step == total)


# ------------------------------------------------------------------------------------------ the probe


@dataclass
class Probe:
    """Fixed token ids to score at every measured step, and their summed log-probs under π_0."""

    prompt_ids: list[list[int]]
    response_ids: list[list[list[int]]]  # per prompt: its training responses, then its unseen one (if any)
    roles: list[str]  # one per response, flat in prompt order
    baseline: list[float]  # log π_0(y|x) of every response, flat in prompt order

    def groups(self) -> list[tuple[list[int], list[list[int]]]]:
        return list(zip(self.prompt_ids, self.response_ids))

    def lengths(self) -> list[int]:
        return [len(r) for rs in self.response_ids for r in rs]

    def save(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(asdict(self)))
        tmp.replace(path)  # never a half-written probe

    @classmethod
    def load(cls, path: Path) -> Probe:
        return cls(**json.loads(path.read_text()))


def probe_examples(examples, obj, n: int) -> tuple[list[list[int]], list[list[list[int]]], list[str]]:
    """(prompt ids, response ids, flat roles) of the first ``n`` examples."""
    prompts, responses, roles = [], [], []
    for e in examples[:n]:
        prompts.append(list(e.prompt_ids))
        responses.append([list(r) for r in e.response_ids])
        roles += response_roles(obj, len(e.response_ids), e.inputs.get("labels"))
    return prompts, responses, roles


def displacement(roles: list[str], lengths: list[int], base: list[float], current: list[float]) -> dict[str, float]:
    """Mean change of the summed (``<role>_logp_delta``) and per-token (``<role>_token_logp_delta``) log-prob
    of each role's responses."""
    out = {}
    for role in sorted(set(roles)):
        idx = [i for i, r in enumerate(roles) if r == role]
        out[f"{PREFIX}{role}_logp_delta"] = sum(current[i] - base[i] for i in idx) / len(idx)
        out[f"{PREFIX}{role}_token_logp_delta"] = sum((current[i] - base[i]) / lengths[i] for i in idx) / len(idx)
    return out


@contextlib.contextmanager
def _eager():
    """Compiled layers run eagerly: the probe's shapes and its no-grad forward would each compile a graph."""
    with torch.compiler.set_stance("force_eager"):
        yield


@torch.no_grad()
def score(engine, groups, pad_id: int, device, batch_size: int, autocast=contextlib.nullcontext) -> list[float]:
    """Summed log-prob of every response of ``groups`` ((prompt ids, [response ids]) pairs), flat in group
    order, under ``engine`` (a ``LogProbEngine``) as it is now: eval mode, no gradients, eager."""
    out: list[float] = []
    was_training = engine.training
    engine.eval()
    try:
        with _eager():
            for s in range(0, len(groups), batch_size):
                part = groups[s : s + batch_size]
                packed = pack([p for p, _ in part], [rs for _, rs in part], pad_id, device=device,
                              share_prefix=engine.shares_prefix())
                with autocast():
                    flat = engine(**packed.tensors())["token_logps"]
                seq, _, _ = scatter_stats(packed, flat.float(), need_tokens=False)  # (B, K)
                for b, (_, rs) in enumerate(part):
                    out += seq[b, : len(rs)].tolist()
    finally:
        engine.train(was_training)
    return out


def stop_ids(tokenizer, model) -> list[int]:
    """The tokenizer's EOS and the model's generation-config EOS ids."""
    ids = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update([gen] if isinstance(gen, int) else list(gen or []))
    return sorted(ids)


@torch.no_grad()
def sample_unseen(model, prompts: list[list[int]], max_new_tokens: int, seed: int, stop: list[int],
                  pad_id: int) -> list[list[int]]:
    """One response per prompt sampled from ``model`` as it is (π_0 at step 0): temperature 1, no
    top-k or top-p, cut after the first EOS (kept). Left-padded, one batch, in a forked RNG seeded
    ``seed``, so the training RNG streams are untouched. (transformers' ``generate``, not preftune's fast
    sampler: that lives in ``preftune.online``, a layer ``train`` may not import.)"""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), L), dtype=torch.long)
    for r, p in enumerate(prompts):  # left padding: every prompt ends at column L - 1
        ids[r, L - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[r, L - len(p) :] = 1
    gen = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                           eos_token_id=stop, pad_token_id=pad_id)
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]), _eager():
            torch.manual_seed(seed)
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen)
    finally:
        model.train(was_training)
    samples = []
    for row in out[:, L:].tolist():
        cut = next((t + 1 for t, tok in enumerate(row) if tok in stop), len(row))
        samples.append(row[:cut])
    return samples


# ------------------------------------------------------------------------------------------ gradients


def token_weights(packed, g_seq: torch.Tensor | None, g_tok: torch.Tensor | None) -> torch.Tensor:
    """g_t = ∂L/∂ℓ_t (M,) for every response token of ``packed``, from the loss's gradients with respect
    to the summed log-probs ``g_seq`` (B, K) and the per-token log-probs ``g_tok`` (B, K, T): a token's
    log-prob reaches the loss through both."""
    slot, index = packed.token_slot, packed.token_index
    g = torch.zeros(slot.shape[0], dtype=torch.float32, device=slot.device)
    if g_seq is not None:
        g = g + g_seq.float().reshape(-1)[slot]
    if g_tok is not None:
        g = g + g_tok.float().reshape(packed.B * packed.K, -1)[slot, index]
    return g


def hidden_grad_sq(h: torch.Tensor, g: torch.Tensor, tokens: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None = None, post=None, chunk: int = 256) -> torch.Tensor:
    """‖g_t ∂ log softmax(post(W h_t + b))[y_t] / ∂h_t‖² for every row t of ``h`` (M, H): the squared norm
    of the loss gradient that reaches the hidden state h_t through token t's log-prob. float32, autocast
    off; ``weight`` (V, H) is not differentiated. Without a logit transform (``post`` None) the gradient is
    written out, g_t Wᵀ(e_{y_t} − softmax(W h_t + b)), one (chunk, V) buffer; with one, autograd per chunk
    (rows are independent, so one backward gives them all)."""
    W = weight.detach().float()
    b = None if bias is None else bias.detach().float()
    out = []
    with torch.autocast(h.device.type, enabled=False):
        for s in range(0, h.shape[0], chunk):
            hc, gc, yc = h[s : s + chunk].detach().float(), g[s : s + chunk].float(), tokens[s : s + chunk, None]
            if post is None:
                logits = torch.nn.functional.linear(hc, W, b)  # (C, V)
                d = logits.sub_(logits.logsumexp(-1, keepdim=True)).exp_().mul_(-gc[:, None])  # −g·softmax
                gh = d.scatter_add_(-1, yc, gc[:, None]) @ W  # (g·onehot − g·softmax) W
            else:
                with torch.enable_grad():
                    hc.requires_grad_(True)
                    logp = post(torch.nn.functional.linear(hc, W, b)).float().log_softmax(-1).gather(-1, yc)
                    (gh,) = torch.autograd.grad((logp.squeeze(-1) * gc).sum(), hc)
            out.append(gh.pow(2).sum(-1))
    return torch.cat(out) if out else h.new_zeros(0, dtype=torch.float32)


def _logit_transform(lm):
    """The model's logit transform (Cohere, Granite, Gemma soft-capping), None where it has none."""
    if all(getattr(lm.config, a, None) is None for a in ("logit_scale", "logits_scaling", "final_logit_softcapping")):
        return None
    return _logits_postprocess(lm)


def _add(sums: dict, key: str, total, count) -> None:
    """Into the Runner's per-step sums: (total, count) pairs that its reduction sums over processes."""
    t, c = sums.get(key, (torch.zeros(()), torch.zeros(())))
    as_t = lambda v: torch.as_tensor(v).detach().float().cpu()  # noqa: E731
    sums[key] = (t + as_t(total), c + as_t(count))


class StepGradients:
    """The gradient measurements of one optimizer step. ``capture`` keeps each micro-batch's final hidden
    states while the policy runs; ``observe`` (after the forward, before its backward) adds the micro-batch's
    sums; ``finish`` turns the reduced sums into the logged ratio."""

    def __init__(self, runner, sides: tuple[str, str], paired: bool):
        self.runner, self.sides, self.paired = runner, sides, paired
        self.obj = runner.forward.obj
        self.engine = runner.base_engine
        lm, self.backbone, self.head = split_lm(self.engine.model)
        self.post = _logit_transform(lm)
        self.hidden: torch.Tensor | None = None
        self.seconds = 0.0
        a, b = sides
        self.keys = [f"{PREFIX}dL_dlogp_{a}", f"{PREFIX}dL_dlogp_{b}", f"{PREFIX}_hidden_sq_{a}",
                     f"{PREFIX}_hidden_sq_{b}"] + ([f"{PREFIX}log_dL_dprob_ratio"] if paired else [])

    @contextlib.contextmanager
    def capture(self):
        """Keep the backbone's output of the first forward with gradients (the policy's: reference passes
        run without gradients; a later policy pass, KTO's mismatched pairs, is not the step's batch)."""
        self.hidden = None

        def hook(module, args, output):
            if self.hidden is None and torch.is_grad_enabled():
                h = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
                self.hidden = h.detach()

        handle = self.backbone.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def observe(self, sums: dict, out, stand_in: bool) -> None:
        t0 = now()
        stats, batch = out.stats, out.batch
        wrt = [t for t in (stats.logps, stats.token_logps) if t is not None and t.requires_grad]
        if stand_in or self.hidden is None or not wrt or not out.result.losses.requires_grad:
            for k in self.keys:  # every process reduces the same keys; these count nothing
                _add(sums, k, 0.0, 0.0)
            return
        grads = torch.autograd.grad(out.result.losses.sum(), wrt, retain_graph=True, allow_unused=True)
        found = dict(zip([id(t) for t in wrt], grads))
        g_seq = found.get(id(stats.logps))
        g_tok = found.get(id(stats.token_logps)) if stats.token_logps is not None else None
        device = self.hidden.device
        packed = pack(batch.prompt_ids, batch.response_ids, self.runner.pad_id, device=device,
                      share_prefix=self.engine.shares_prefix())  # the layout the forward used
        g = token_weights(packed, g_seq, g_tok)  # (M,)
        roles = role_grid(self.obj, packed.valid.to(device), batch.inputs.get("labels"))  # (B, K)
        token_role = roles.reshape(-1)[packed.token_slot]  # (M,)
        h = self.hidden[packed.pred_rows, packed.pred_pos]  # (M, H): the LM head's inputs
        sq = hidden_grad_sq(h, g, packed.pred_tokens, self.head.weight, getattr(self.head, "bias", None), self.post)
        # Per response: the mean of its tokens' g_t (= ∂ℓ/∂logπ(y|x) for an objective of summed log-probs).
        per_slot = torch.zeros(packed.B * packed.K, device=device).index_add(0, packed.token_slot, g)
        dl = (per_slot / packed.lengths.reshape(-1).to(device).clamp(min=1)).view(packed.B, packed.K)
        for side, name in enumerate(self.sides):
            pick = roles == side
            _add(sums, f"{PREFIX}dL_dlogp_{name}", dl[pick].sum(), pick.sum())
            _add(sums, f"{PREFIX}_hidden_sq_{name}", sq[token_role == side].sum(), 1.0)
        if self.paired:
            logps = stats.logps.detach().float()
            ratio = dl[:, 0].abs().log() - logps[:, 0] - dl[:, 1].abs().log() + logps[:, 1]
            ok = torch.isfinite(ratio)
            _add(sums, f"{PREFIX}log_dL_dprob_ratio", ratio[ok].sum(), ok.sum())
        self.seconds += now() - t0

    def finish(self, metrics: dict[str, float]) -> dict[str, float]:
        a, b = (metrics.pop(f"{PREFIX}_hidden_sq_{s}") for s in self.sides)
        ratio = math.sqrt(a / b) if b > 0 and math.isfinite(a) else float("nan")
        metrics[f"{PREFIX}hidden_grad_ratio"] = ratio
        return metrics


# ------------------------------------------------------------------------------------------ the runner's view


class Dynamics:
    """What a run measures and when; ``probe`` is set on the main process only (it logs)."""

    def __init__(self, every: int, total: int, logging_steps: int, obj, probe: Probe | None = None):
        self.every, self.total, self.logging_steps = every, total, logging_steps
        self.obj, self.probe = obj, probe
        self.sides = roles_of(obj)
        self.pending = 0.0  # seconds spent on this step's gradient measurements

    def due(self, step: int) -> bool:
        return due(step, self.total, self.every, self.logging_steps)

    def gradients(self, runner) -> StepGradients | None:
        """The gradient measurements of the coming step (None: the objective has no two sides)."""
        if self.sides is None:
            return None
        return StepGradients(runner, self.sides, paired=self.sides == ("chosen", "rejected"))

    def finish_step(self, grads: StepGradients | None, metrics: dict[str, float]) -> dict[str, float]:
        if grads is None:
            return metrics
        self.pending += grads.seconds
        return grads.finish(metrics)

    def measure(self, runner) -> dict[str, float]:
        """The probe's displacement under the current weights (main process; others return {})."""
        t0 = now()
        out: dict[str, float] = {}
        if self.probe is not None and runner.acc.is_main_process:
            current = score_probe(runner, self.probe)
            out = displacement(self.probe.roles, self.probe.lengths(), self.probe.baseline, current)
        out[f"{PREFIX}seconds"] = now() - t0 + self.pending  # what this step's measurements cost
        self.pending = 0.0
        return out


def score_probe(runner, probe: Probe) -> list[float]:
    return score(runner.base_engine, probe.groups(), runner.pad_id, runner.acc.device,
                 max(1, runner.cfg.batch_size), runner.acc.autocast)


def start(runner, resumed: bool) -> Dynamics | None:
    """The run's ``Dynamics``, or None (off, with the reason printed). At step 0 the main process builds the
    probe, samples the unseen responses from the untouched policy, scores them and writes the probe to the
    output folder; a resumed run reads it back from there."""
    cfg, acc = runner.cfg, runner.acc
    obj = getattr(runner.forward, "obj", None)
    if not getattr(cfg, "dynamics", False) or obj is None:
        return None
    why = unsupported_reason(runner.kind)
    if why:
        acc.print(f"dynamics: off ({why})")
        return None
    dyn = Dynamics(cfg.dynamics_steps, runner.total, cfg.logging_steps, obj)
    path = cfg.output_dir / PROBE_FILE
    if not acc.is_main_process or cfg.dynamics_probe == 0:
        return dyn
    t0 = now()
    if resumed and path.exists():
        dyn.probe = Probe.load(path)
        acc.print(f"dynamics: probe of step 0 read from {path}")
        return dyn
    if resumed:
        acc.print(f"dynamics: no step-0 probe in {path}; this resumed run logs no displacement")
        return dyn
    prompts, responses, roles = probe_examples(runner.train_set.examples, obj, cfg.dynamics_probe)
    n_unseen = min(cfg.dynamics_unseen, len(prompts))
    if n_unseen:
        model = split_lm(runner.base_engine.model)[0]
        unseen = sample_unseen(model, prompts[:n_unseen], cfg.dynamics_unseen_tokens, cfg.seed,
                               stop_ids(runner.tokenizer, model), runner.pad_id)
        for i, ids in enumerate(unseen):
            responses[i].append(ids)
        roles = _with_unseen(roles, responses, n_unseen)
    t1 = now()
    probe = Probe(prompts, responses, roles, baseline=[])
    probe.baseline = score_probe(runner, probe)
    probe.save(path)
    acc.print(f"dynamics: every {cfg.dynamics_steps} steps; probe of {len(prompts)} examples "
              f"({len(roles) - n_unseen} responses) and {n_unseen} unseen responses sampled from the initial "
              f"policy in {t1 - t0:.2f} s, scored in {now() - t1:.2f} s")
    dyn.probe = probe
    return dyn


def _with_unseen(roles: list[str], responses: list[list[list[int]]], n_unseen: int) -> list[str]:
    """The flat roles with ``unseen`` after the training responses of each of the first ``n_unseen`` prompts."""
    out, pos = [], 0
    for i, rs in enumerate(responses):
        k = len(rs) - (1 if i < n_unseen else 0)
        out += roles[pos : pos + k] + (["unseen"] if i < n_unseen else [])
        pos += k
    return out
