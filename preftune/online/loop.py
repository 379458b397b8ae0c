"""The one online loop (ONLINE.md §0.2): prompts → K samples from the current policy → judge → the
algorithm's training input → a trainer run from the current iterate → the next iterate.

Phases of iteration t (folder ``iter_NN``), each finished by a manifest entry after its files:
``sample`` (samples.jsonl, with token ids) → ``judge`` (judgements.jsonl) → ``build`` (train_input.jsonl
and the cached reference log-probs) → ``train`` (train/: trainer metrics; policy.safetensors: the new
iterate's trainable weights) → ``eval`` (heldout.jsonl; the figures in the manifest). ``--resume``
redoes only the phase a kill interrupted; the policy is restored from the last saved iterate.

Cost rules: one trainable model in memory (LoRA: the reference is the adapters turned off); log-probs
on the sampled token ids; reference log-probs computed once per iteration and handed to the trainer;
nothing sampled or scored twice (the held-out samples of π_t are the "previous" side of π_{t+1}'s
win rate).

Under ``accelerate launch`` with N data-parallel processes (online/processes.py) sampling and training are
shared out, and the main process alone judges, builds, evaluates and writes every file.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from preftune.online import store
from preftune.online.build import Pair, build_pairs, curriculum_stages, large_margin, sampled_tiebreak, win_rates
from preftune.online.config import OnlineConfig
from preftune.online.processes import Processes
from preftune.online.store import PHASES, IterationDir


@dataclass
class OnlineResult:
    output_dir: Path
    rows: list[dict]
    base_eval: dict
    report: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- policy


class Policy:
    """The one trainable model and its saved states.

    LoRA: adapters on the base; the reference π_0 is the adapters turned off, an iterate is an adapter
    state (a few MB). Full fine-tuning keeps a frozen copy of π_0 only when something needs π_0.
    """

    def __init__(self, cfg: OnlineConfig):
        self.cfg = cfg
        self.model, self.tokenizer = _load(cfg)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else \
            self.tokenizer.eos_token_id
        from preftune.train.loop import disable_dropout

        disable_dropout(self.model)
        self.init_model = None
        if cfg.lora:
            from preftune.model import LoraSettings, apply_lora

            torch.manual_seed(cfg.seed)
            self.model = apply_lora(self.model, LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha))
        else:  # full fine-tuning: π_0 (KL, fluency, fixed reference) needs its own frozen copy
            from preftune.model import frozen_reference_copy

            self.init_model = frozen_reference_copy(self.model)
        self.ofs = cfg.algo().shape == "fast_slow"
        self.ofs_state = None  # OFS-DPO: leader, running losses, swaps (online/ofs.py)
        if self.ofs:
            from preftune.online.ofs import ensure_slow_adapter

            ensure_slow_adapter(self.model)  # both modules start from the same (zero) update

    # -- states
    def state(self) -> dict[str, torch.Tensor]:
        """The trainable state (LoRA: the adapter; full: every weight), cloned to CPU."""
        if self.ofs:  # both modules, and which one leads (the iterate)
            from preftune.online.ofs import ofs_state_dict

            state = ofs_state_dict(self.model)
            state["__leader__"] = torch.tensor(int(self.model.active_adapter == "slow"))
            return state
        if self.cfg.lora:
            from peft import get_peft_model_state_dict

            return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(self.model).items()}
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.ofs:
            from preftune.online.ofs import load_ofs_state_dict

            state = dict(state)
            leader = int(state.pop("__leader__"))
            load_ofs_state_dict(self.model, state)
            self.model.set_adapter("slow" if leader else "default")
        elif self.cfg.lora:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.model, state)
        else:
            self.model.load_state_dict(state)

    def save_state(self, path: Path) -> None:
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({k: v.contiguous() for k, v in self.state().items()}, str(tmp))
        tmp.replace(path)

    def load_state_file(self, path: Path) -> None:
        from safetensors.torch import load_file

        self.load_state(load_file(str(path)))

    def sampling_model(self):
        """The iterate for generation: with LoRA a plain copy with the adapter merged in. peft's unmerged
        layers add two small matmuls and Python work to every linear at every generated token; merging
        in place and unmerging would leave float error in the base, i.e. in the reference."""
        import copy

        bf16 = self.cfg.sampling_precision == "bf16"
        if not self.cfg.lora:
            return copy.deepcopy(self.model).to(torch.bfloat16) if bf16 else self.model
        merged = copy.deepcopy(self.model).merge_and_unload()
        return merged.to(torch.bfloat16) if bf16 else merged

    # -- scoring on sampled ids
    def token_logps(self, prompt_ids, response_ids, which: str = "current") -> list[list[torch.Tensor]]:
        """Per-token log-probs under the current iterate, or π_0 (``which="init"``)."""
        from preftune.model.scoring import response_token_logps

        bs = self.cfg.eval_batch_size
        if which == "init" and self.init_model is not None:
            return response_token_logps(self.init_model, prompt_ids, response_ids, self.pad_id, batch_size=bs)
        return response_token_logps(self.model, prompt_ids, response_ids, self.pad_id,
                                    adapters_off=which == "init", batch_size=bs)

    def token_logps_under(self, state: dict | None, prompt_ids, response_ids) -> list[list[torch.Tensor]]:
        """Log-probs under a saved state (None: π_0), the current state restored afterwards."""
        if state is None:
            return self.token_logps(prompt_ids, response_ids, "init")
        current = self.state()
        self.load_state(state)
        try:
            return self.token_logps(prompt_ids, response_ids)
        finally:
            self.load_state(current)


def _load(cfg: OnlineConfig):
    if cfg.model == "tiny":
        from preftune.model.tiny import tiny_model, tiny_tokenizer

        model, tok = tiny_model(seed=cfg.seed), tiny_tokenizer()
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
        return model, tok
    from preftune.model import load_model

    return load_model(cfg.model, dtype="float32")


# ---------------------------------------------------------------------------------------------- runner


class OnlineRun:
    def __init__(self, cfg: OnlineConfig, log=print):
        from preftune.tasks import get_task

        self.cfg = cfg
        self.procs = Processes(cfg)  # refuses the launches and algorithms not run under several processes
        self.log = log if self.procs.is_main else _quiet
        self.alg = cfg.algo()
        self.task = get_task(cfg.task)
        self.out = Path(cfg.output or f"runs/online-{cfg.algorithm}-{datetime.now():%Y%m%d-%H%M%S}")
        self.k = cfg.resolved("k")
        self.rule = cfg.resolved("rule")
        self.ref_mode = cfg.resolved("ref_mode")
        self.timings: dict[str, float] = {}
        self._init_logps: dict = {}

    # ------------------------------------------------------------------ setup
    def prepare(self) -> None:
        cfg = self.cfg
        summary = cfg.summary()
        summary["output"] = str(self.out)
        summary["processes"] = self.procs.world  # batch_size is per process: the global batch depends on it
        cfg_path = self.out / "online_config.json"
        self.procs.on_main(lambda: self._check_output(cfg_path, summary))
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.policy = Policy(cfg)
        if self.procs.world > 1:  # each process samples and trains on its own device
            self.policy.model.to(self.procs.device)
        self.procs.on_main(lambda: store.write_json(cfg_path, summary))
        rng = random.Random(cfg.seed)
        pool = self.task.train_prompts()
        self.order = rng.sample(pool, len(pool))
        need = cfg.prompts_per_iteration * cfg.iterations
        if need > len(pool):
            self.log(f"[online] {need} training prompts asked for, the task has {len(pool)}: later iterations "
                     "reuse prompts")
        held = self.task.heldout_prompts()
        self.heldout = random.Random(cfg.seed + 1).sample(held, min(cfg.heldout_prompts, len(held)))
        self.judge = self._make_judge() if self.procs.is_main else None  # the main process judges
        self.teacher = _read_teacher(cfg.teacher_file, self.policy.tokenizer) if cfg.teacher_file else {}

    def _check_output(self, cfg_path: Path, summary: dict) -> None:
        if not cfg_path.exists():
            return
        if not self.cfg.resume:
            raise ValueError(f"{self.out} already holds an online run; pass --resume to continue it, "
                             "or choose another --output")
        old = {"processes": 1, **store.read_json(cfg_path)}  # runs from before it was recorded ran one
        # iterations may grow: iteration t's prompts, seeds and reference do not depend on T, so a finished run
        # continues with more iterations exactly as if it had been started with them
        changed = sorted(k for k in summary if k not in ("resume", "progress", "plot", "threads", "output",
                                                         "iterations") and old.get(k) != summary[k])
        if summary["iterations"] < old.get("iterations", 0):
            changed.append("iterations (fewer than the run has)")
        if changed:
            raise ValueError(f"{cfg_path}: the run was started with other settings ({', '.join(changed)}); "
                             "resume with the same settings or use a new --output")

    def _make_judge(self):
        from preftune.online.judging import SampleJudge

        return SampleJudge(self.cfg.resolved("judge"), self.task, temperature=self.cfg.judge_temperature,
                           eos_penalty=self.cfg.resolved("missing_eos_penalty"), policy=self.policy.model,
                           tokenizer=self.policy.tokenizer,
                           # an lsc(..., ref=pi0) judge samples π_0 on every training prompt now (reward/lsc.py)
                           reference_prompts=[p for t in range(1, self.cfg.iterations + 1)
                                              for p in self.prompts_for(t)],
                           sampling={"max_new_tokens": self.cfg.max_new_tokens, "seed": self.cfg.seed,
                                     "batch_size": self.cfg.gen_batch_size, "engine": self.cfg.sampling_engine},
                           reference_file=self.out / "lsc_reference.jsonl")

    def prompts_for(self, t: int) -> list:
        n = self.cfg.prompts_per_iteration
        return [self.order[(i) % len(self.order)] for i in range((t - 1) * n, t * n)]

    # ------------------------------------------------------------------ the loop
    def run(self) -> OnlineResult:
        t0 = time.perf_counter()
        self.prepare()
        procs = self.procs
        base_path = self.out / "eval_base.json"
        if procs.broadcast(base_path.exists()):
            base_eval = store.read_json(base_path)
        else:
            base_eval = self.evaluate(self.out / "eval_base", prev_state=None, t=0,
                                      then=lambda ev: store.write_json(base_path, ev))
        self.log(f"[online] π_0 held-out: {_rate_text(base_eval)}")
        rows = []
        start_state: dict | None = None  # π_0 is the fresh adapter (B = 0): the state of the model now
        self.states = {0: self.policy.state()}
        for t in range(1, self.cfg.iterations + 1):
            it = IterationDir(self.out, t)
            # Every process goes by the main process's view of the folder, read before it writes again.
            done = procs.broadcast(set(it.manifest()["phases"]))
            if done >= set(PHASES):
                self.policy.load_state_file(it.file("policy.safetensors"))
                self.states[t] = self.policy.state()
                if procs.is_main:
                    rows.append(self.row(it, base_eval))
                continue
            if t > 1:  # restore π_{t-1} (after a resume the model in memory is π_0)
                self.policy.load_state_file(IterationDir(self.out, t - 1).file("policy.safetensors"))
            start_state = self.policy.state()
            self.states[t - 1] = start_state
            self.iteration(it, t, done)

            def record(it=it, t=t) -> None:
                rows.append(self.row(it, base_eval))
                store.write_jsonl(self.out / "iterations.jsonl", rows)
                self.log(f"[online] iteration {t}: {_rate_text(it.info('eval'))}; "
                         f"pairs {it.info('build').get('pairs')}")

            procs.on_main(record)
        self.timings["total"] = time.perf_counter() - t0

        def finish():
            from preftune.online.report import write_report

            store.write_jsonl(self.out / "iterations.jsonl", rows)
            return write_report(self.out, self.cfg, base_eval, rows, log=self.log)

        report = procs.on_main(finish)
        return OnlineResult(self.out, rows, base_eval if procs.is_main else {}, report, self.timings)

    def iteration(self, it: IterationDir, t: int, done: set[str]) -> None:
        """The phases of iteration ``t`` not in ``done`` (those its manifest listed when it began)."""
        if self.alg.shape == "per_step":  # one process only (online/processes.py)
            from preftune.online.per_step import run_per_step

            if "train" not in done:
                run_per_step(self, it, t)
        elif self.alg.shape == "tree":  # MCTS-DPO: trees, then step pairs with their own ids (online/mcts.py)
            from preftune.online.mcts import tree_phases

            tree_phases(self, it, t, done)
            if "train" not in done:
                self.train_phase(it, t, None)
        elif self.alg.shape == "code_tests":  # DSTC: codes × tests in the sandbox, code+test pairs (online/dstc.py)
            from preftune.online.dstc import dstc_phases

            dstc_phases(self, it, t, done)
            if "train" not in done:
                self.train_phase(it, t, None)
        else:
            self._init_logps = {}  # π_0 log-probs of this iteration's samples (tie_break=fluency)
            gens = self.sample_phase(it, t, done)
            if "build" not in done:
                self.procs.on_main(lambda: self.build_phase(it, t, gens, self.judge_phase(it, gens)))
            if "train" not in done:
                self.train_phase(it, t, gens)
        if "eval" not in done:
            if "train" in done:  # after a resume the model in memory is π_{t−1}; the phase saved π_t
                self.policy.load_state_file(it.file("policy.safetensors"))
            t0 = time.perf_counter()

            def finish(ev: dict) -> None:
                ev["seconds"] = time.perf_counter() - t0
                it.finish("eval", ev)

            self.evaluate(it.path / "eval", prev_state=self.states[t - 1], t=t, then=finish)

    # ------------------------------------------------------------------ phases
    def sample(self, prompts, n: int, seed: int, temperature: float, top_p: float, desc: str):
        from tqdm.auto import tqdm

        from preftune.online.generate import generate, merge_parts

        procs = self.procs
        model = self.policy.sampling_model()
        # Each process draws every N-th batch (the same batches and seeds as one process), then all gather.
        with tqdm(total=len(prompts) * n, desc=f"sample ({desc})", unit="seq", dynamic_ncols=True,
                  disable=not (self.cfg.progress and procs.is_main)) as bar:
            gens = generate(model, self.policy.tokenizer, prompts, n=n, temperature=temperature,
                            top_p=top_p, max_new_tokens=self.cfg.max_new_tokens, seed=seed,
                            batch_size=self.cfg.gen_batch_size, part=procs.part, engine=self.cfg.sampling_engine,
                            progress=lambda k: bar.update(k * procs.world))  # the others keep about its pace
        return gens if procs.world == 1 else merge_parts(procs.gather(gens))

    def sample_phase(self, it: IterationDir, t: int, done: set[str]):
        from preftune.online.generate import generations_from_rows, generations_to_rows

        path = it.file("samples.jsonl")
        if "sample" in done:
            return generations_from_rows(store.read_jsonl(path))
        t0 = time.perf_counter()
        gens = self.sample(self.prompts_for(t), self.k, self.cfg.seed + 1000 * t, self.cfg.resolved("temperature"),
                           self.cfg.resolved("top_p"), f"iteration {t}")
        secs = time.perf_counter() - t0

        def write() -> None:
            store.write_jsonl(path, generations_to_rows(gens))
            tokens = [s.num_tokens for row in gens.samples for s in row]
            it.finish("sample", {"prompts": len(gens.prompts), "gen_tokens": sum(tokens), "gen_seconds": secs,
                                 "eos_rate": _mean([s.finished for row in gens.samples for s in row]),
                                 "len_mean": _mean(tokens)})

        self.procs.on_main(write)
        return gens

    def judge_phase(self, it: IterationDir, gens) -> list:
        from preftune.online.judging import Judged

        path = it.file("judgements.jsonl")
        if it.done("judge"):
            return [Judged(r["scores"], r.get("P"), r.get("details", []), r.get("fluency"))
                    for r in store.read_jsonl(path)]
        need_p = "win_probs" in self.alg.inputs or self.rule == "tournament"
        self.judge.calls = 0
        judged = []
        t0 = time.perf_counter()
        for prompt, row in zip(gens.prompts, gens.samples, strict=True):
            judged.append(self.judge.judge_prompt(prompt, [s.text for s in row], [s.finished for s in row], need_p))
        extra = {}
        if self.cfg.tie_break != "order":
            extra["fluency_mean"] = self._fluency(gens, judged)
        store.write_jsonl(path, [{"scores": j.scores, "P": j.P, "details": j.details,
                                  **({"fluency": j.fluency} if j.fluency is not None else {})} for j in judged])
        top = [max(j.scores) for j in judged]
        flat = [s for j in judged for s in j.scores]
        it.finish("judge", {"judge_calls": self.judge.calls, "judge_seconds": time.perf_counter() - t0,
                            "score_mean": _mean(flat), "score_top1": _mean(top),
                            "score_spread": _mean([max(j.scores) - min(j.scores) for j in judged]),
                            "all_tied": _mean([max(j.scores) == min(j.scores) for j in judged]),
                            "success": _mean([d.get("success", False) for j in judged for d in j.details])
                            if judged and judged[0].details and "success" in judged[0].details[0] else None,
                            **extra})
        return judged

    def _fluency(self, gens, judged) -> float | None:
        """tie_break=fluency: each sample's mean token log-prob under π_0 (its EOS left out, as in the
        evaluation's fluency), one pass over the sampled ids. The token log-probs are kept for the fixed
        reference of this iteration's pairs, so no sample is scored under π_0 twice."""
        from preftune.online.evaluate import text_logp_mean

        rids = [[s.token_ids for s in row] for row in gens.samples]
        lps = self.policy.token_logps(gens.prompt_ids, rids, "init")
        self._init_logps = {(i, k): lp for i, row in enumerate(lps) for k, lp in enumerate(row)}
        for j, row, lp_row in zip(judged, gens.samples, lps, strict=True):
            means = [text_logp_mean(lp, s.finished) for s, lp in zip(row, lp_row, strict=True)]
            j.fluency = [-1e9 if m is None else m for m in means]  # no text token: least fluent (strict JSON)
        return _mean([f for j in judged for f in j.fluency if f > -1e9])

    def build_phase(self, it: IterationDir, t: int, gens, judged) -> None:
        """Pairs by the algorithm's rule, the inputs its objective needs, and reference log-probs."""
        rng = random.Random(self.cfg.seed + 1000 * t)
        rows: list[dict] = []
        ties = 0
        for i, (row, j) in enumerate(zip(gens.samples, judged, strict=True)):
            texts = [s.text for s in row]
            lengths = [s.num_tokens for s in row]
            if self.alg.shape == "stages":
                stages = curriculum_stages(j.scores, lengths, self.cfg.curry_stages, tiebreak=j.fluency)
                pairs = [(s + 1, p) for s, ps in enumerate(stages) for p in ps]
            elif self.rule == "large_margin":
                pairs = [(0, p) for p in self._dno_pairs(gens.prompts[i], j, row)]
            else:
                tb = j.fluency
                if tb is not None and self.cfg.tie_break == "fluency_sampled":
                    tb = sampled_tiebreak(j.scores, tb, self.cfg.tie_break_temperature, rng)
                pairs = [(0, p) for p in build_pairs(self.rule, j.scores, P=j.P, lengths=lengths, texts=texts,
                                                      rng=rng, length_penalty=self.cfg.length_penalty,
                                                      min_margin=self.cfg.min_margin, tiebreak=tb)]
            ties += not pairs
            wr = win_rates(j.P) if "win_probs" in self.alg.inputs else None
            for stage, p in pairs:
                r = {"prompt": i, "w": p.w, "l": p.l, "margin": p.margin, "stage": stage}
                if p.kind:
                    r["kind"] = p.kind
                if wr is not None:
                    r["win_probs"] = [wr[p.w], wr[p.l]]
                    r["pair_win_prob"] = j.P[p.w][p.l]
                rows.append(r)
        flipped = flip_labels(rows, self.cfg.flip_pairs, random.Random(f"flip-{self.cfg.seed}-{t}"))
        rows += self._replay(t)
        examples = self.examples(gens, rows)
        info = {"pairs": len(rows), "prompts_without_pair": ties, "ties_dropped": ties,
                "margin_mean": _mean([r["margin"] for r in rows]),
                "len_chosen": _mean([len(e.response_ids[0]) for e in examples]),
                "len_rejected": _mean([len(e.response_ids[1]) for e in examples])}
        if rows and "win_probs" in self.alg.inputs:
            info["win_prob_w"] = _mean([r["win_probs"][0] for r in rows])
            info["win_prob_l"] = _mean([r["win_probs"][1] for r in rows])
        if self.cfg.flip_pairs:
            info["flipped"] = flipped
        if self.rule == "large_margin":
            for kind in ("S>S", "T>S", "S>T"):
                info[f"pairs_{kind}"] = sum(r.get("kind") == kind for r in rows)
        if examples and self.alg.shape != "stages":
            self._reference(it, t, examples, rows)
        store.write_jsonl(it.file("train_input.jsonl"), rows)
        it.finish("build", info)

    def _dno_pairs(self, prompt, j, row) -> list[Pair]:
        scores = list(j.scores)
        teacher = None
        key = json.dumps(prompt, sort_keys=True)
        if key in self.teacher:
            ts = self.judge.judge_prompt(prompt, [self.teacher[key]["text"]], [True], False).scores[0]
            scores.append(ts)
            teacher = len(row)
        return large_margin(scores, teacher=teacher, pos_min=self.cfg.dno_pos_min, margin=self.cfg.dno_margin,
                            student_pos_margin=self.cfg.dno_student_margin)

    def _replay(self, t: int) -> list[dict]:
        """DNO: a share of the two previous iterations' pairs (not re-sampled), deterministic."""
        if self.rule != "large_margin":
            return []
        out = []
        for back, share in enumerate(self.cfg.dno_replay, start=1):
            if t - back < 1:
                break
            prev = IterationDir(self.out, t - back)
            own = [r for r in store.read_jsonl(prev.file("train_input.jsonl")) if "from_iteration" not in r]
            n = int(round(share * len(own)))
            pick = random.Random(self.cfg.seed + 7 * t + back).sample(own, n)
            out += [{**r, "from_iteration": t - back} for r in pick]
        return out

    def examples(self, gens, rows: list[dict]) -> list:
        """Training groups on the sampled token ids: (prompt ids, [chosen ids, rejected ids])."""
        from preftune.data.tokenize import TokenizedExample

        out = []
        for n, r in enumerate(rows):
            if "chosen_ids" in r:  # MCTS-DPO step pairs: prompt + taken steps, and the two continuations
                p_ids, resp = r["prompt_ids"], [r["chosen_ids"], r["rejected_ids"]]
                out.append(TokenizedExample(p_ids, resp, source="online", line=r["prompt"] + 1, index=n))
                continue
            if "from_iteration" in r:
                g = self._samples_of(r["from_iteration"])
            else:
                g = gens
            p_ids = g.prompt_ids[r["prompt"]]
            resp = [self._response_ids(g, r["prompt"], r["w"]), self._response_ids(g, r["prompt"], r["l"])]
            budget = self.cfg.max_length - len(p_ids)
            if budget < 1:
                raise ValueError(f"a prompt of {len(p_ids)} tokens leaves no room under max_length="
                                 f"{self.cfg.max_length}")
            inputs = {}
            if "win_probs" in r:
                inputs["win_probs"] = r["win_probs"]
                inputs["pair_win_prob"] = r["pair_win_prob"]
            out.append(TokenizedExample(p_ids, [x[:budget] for x in resp], inputs=inputs, source="online",
                                        line=r["prompt"] + 1, index=n,
                                        responses_truncated=sum(len(x) > budget for x in resp)))
        return out

    def _response_ids(self, g, i: int, k: int) -> list[int]:
        row = g.samples[i]
        if k < len(row):
            return row[k].token_ids
        return self.teacher[json.dumps(g.prompts[i], sort_keys=True)]["ids"]

    def _samples_of(self, t: int):
        from preftune.online.generate import generations_from_rows

        cache = getattr(self, "_gens_cache", {})
        self._gens_cache = cache
        if t not in cache:
            cache[t] = generations_from_rows(store.read_jsonl(IterationDir(self.out, t).file("samples.jsonl")))
        return cache[t]

    def _reference(self, it: IterationDir, t: int, examples, rows) -> None:
        """Reference token log-probs of the iteration's pairs (and INPO's π_t log-probs), cached."""
        from preftune.model.reference import ReferenceCache

        pids = [e.prompt_ids for e in examples]
        rids = [e.response_ids for e in examples]
        mode = self.ref_mode
        current = self.policy.token_logps(pids, rids) if mode != "fixed" or "prev_logps" in self.alg.inputs \
            else None
        if mode == "fixed":
            ref = self._cached_init(rows, examples) or self.policy.token_logps(pids, rids, "init")
        elif mode == "previous":
            ref = current
        else:  # APO: log π̂_t = (1+α)·log π_t − α·log π_{t−1} (π̂_0 = π_0); pair differences are exact
            a = self.cfg.apo_alpha
            prev = self.policy.token_logps_under(self.states.get(t - 2), pids, rids) if t >= 2 else current
            ref = [[(1 + a) * c - a * p for c, p in zip(cs, ps, strict=True)] for cs, ps in
                   zip(current, prev, strict=True)]
        if "prev_logps" in self.alg.inputs:
            for r, cs in zip(rows, current, strict=True):
                r["prev_logps"] = [float(x.sum()) for x in cs]
        ReferenceCache(ref).save(it.file("reference.safetensors"))

    def _cached_init(self, rows, examples) -> list[list[torch.Tensor]] | None:
        """π_0 token log-probs of the pairs from the judge phase's fluency pass (same process only; a replayed
        pair or a teacher response was not in it, and then everything is scored afresh)."""
        cache = self._init_logps
        if not cache:
            return None
        out = []
        for r, e in zip(rows, examples, strict=True):
            keys = [(r["prompt"], r["w"]), (r["prompt"], r["l"])]
            if "from_iteration" in r or any(k not in cache for k in keys):
                return None
            out.append([cache[k][: len(ids)] for k, ids in zip(keys, e.response_ids, strict=True)])
        return out

    # ------------------------------------------------------------------ training
    def train_config(self, it_dir: Path, t: int, steps_override: int | None = None):
        from preftune.train.config import TrainConfig

        cfg = self.cfg
        return TrainConfig(
            model=cfg.model, output=str(it_dir), loss=cfg.resolved_loss(), loss_params=cfg.loss_hyperparameters(),
            lora=cfg.lora, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha, learning_rate=cfg.learning_rate,
            epochs=cfg.resolved("epochs"), max_steps=steps_override, batch_size=cfg.batch_size,
            grad_accum=cfg.grad_accum, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
            seed=cfg.seed + t, reference="precompute", progress=cfg.progress, plot=cfg.plot, save_model=False,
            warmup_ratio=cfg.warmup_ratio, precision=cfg.precision, length_grouping=False, dynamics=cfg.dynamics,
        )

    def train_phase(self, it: IterationDir, t: int, gens) -> None:
        from preftune.model.reference import ReferenceCache
        from preftune.train.trainer import train

        rows = store.read_jsonl(it.file("train_input.jsonl"))
        t0 = time.perf_counter()
        if not rows:
            self.log(f"[online] iteration {t}: no pairs (every prompt's samples tied); training skipped, "
                     "π_t carries over")

            def skip() -> None:
                self.policy.save_state(it.file("policy.safetensors"))
                it.finish("train", {"skipped": "no pairs", "steps": 0})

            self.procs.on_main(skip)
            return
        if self.alg.shape == "stages":
            history, steps = self._train_stages(it, t, gens, rows)
        elif self.alg.shape == "fast_slow":
            history, steps = self._train_ofs(it, t, gens, rows)
        else:
            examples = self.examples(gens, rows)
            for e, r in zip(examples, rows, strict=True):
                if "prev_logps" in r:
                    e.inputs["prev_logps"] = r["prev_logps"]
            ref = ReferenceCache.load(it.file("reference.safetensors"))
            # Under N processes every one trains on its share of each global batch (DDP), and all end with
            # the same weights.
            result = train(self.train_config(it.path / "train", t), train_examples=examples,
                           tokenizer=self.policy.tokenizer, model=self.policy.model, ref_cache=ref)
            history, steps = result.metrics, result.steps
        secs = time.perf_counter() - t0

        def write() -> None:
            self.policy.save_state(it.file("policy.safetensors"))  # π_t is the train phase's output
            it.finish("train", {"steps": steps, "train_seconds": secs, **_tail_means(history)})

        self.procs.on_main(write)

    def _train_ofs(self, it: IterationDir, t: int, gens, rows):
        """OFS-DPO: fast and slow LoRA modules on the same pairs (online/ofs.py); the leader is the iterate."""
        from preftune.model.reference import ReferenceCache
        from preftune.online.ofs import OFSState, train_ofs

        cfg = self.cfg
        prev = IterationDir(self.out, t - 1).file("ofs_state.json")
        state = OFSState.from_dict(store.read_json(prev)) if t > 1 and prev.exists() else self.policy.ofs_state
        result = train_ofs(self.policy.model, self.policy.tokenizer, self.examples(gens, rows),
                           ReferenceCache.load(it.file("reference.safetensors")),
                           beta=float(cfg.loss_hyperparameters().get("beta", 0.1)), lr_fast=cfg.learning_rate,
                           lr_ratio=cfg.ofs_lr_ratio, lam=cfg.ofs_lambda, swap_every=cfg.ofs_swap_every,
                           batch_size=cfg.batch_size, epochs=cfg.resolved("epochs"), seed=cfg.seed + t,
                           warmup_ratio=cfg.warmup_ratio, out_dir=it.path / "train", progress=cfg.progress,
                           state=state)
        self.policy.ofs_state = result.state
        store.write_json(it.file("ofs_state.json"), result.state.as_dict())
        return result.history, result.steps

    def _train_stages(self, it: IterationDir, t: int, gens, rows):
        """Curry-DPO: one trainer run per stage, each from the previous stage's model, that model being the
        reference (refreshed per stage): the same loop as `preftune train --set curriculum=iterative`."""
        from preftune.train.curriculum import Stage, train_stages

        numbers = sorted({r["stage"] for r in rows})
        stages = [[r for r in rows if r["stage"] == s] for s in numbers]
        results, _ = train_stages([Stage(self.examples(gens, srows), [r["margin"] for r in srows]) for srows in stages],
                                  [self.train_config(it.path / "train" / f"stage_{s}", t) for s in numbers],
                                  self.policy.model, self.policy.tokenizer, log=self.log)
        return [m for r in results for m in r.metrics], sum(r.steps for r in results)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, folder: Path, prev_state: dict | None, t: int, then=None) -> dict | None:
        """π_t's held-out figures, and ``then(figures)`` (which writes them). Every process samples its share
        of the held-out answers; the main process judges, scores and writes (None elsewhere)."""
        from preftune.online.evaluate import evaluate_policy, heldout_generations

        answers = heldout_generations(self, t)

        def on_main() -> dict:
            ev = evaluate_policy(self, folder, prev_state, t, answers)
            if then is not None:
                then(ev)
            return ev

        return self.procs.on_main(on_main)

    def row(self, it: IterationDir, base_eval: dict) -> dict:
        m = it.manifest()["phases"]
        row: dict[str, Any] = {"iter/t": it.t}
        s, j, b = m.get("sample", {}), m.get("judge", {}), m.get("build", {})
        row.update({"iter/prompts": s.get("prompts"), "iter/gen_tokens": s.get("gen_tokens"),
                    "iter/gen_seconds": s.get("gen_seconds"), "iter/eos_rate": s.get("eos_rate"),
                    "iter/len_mean": s.get("len_mean"), "iter/judge_calls": j.get("judge_calls"),
                    "iter/score_mean": j.get("score_mean"), "iter/score_top1": j.get("score_top1"),
                    "iter/score_spread": j.get("score_spread"), "iter/prompts_dropped": 0})
        if "fluency_mean" in j:
            row["iter/fluency_mean"] = j["fluency_mean"]
        row.update({f"iter/{k}": v for k, v in b.items()})
        row.update({k if k.startswith(("train/", "objective/", "val/")) else f"train/{k}": v
                    for k, v in m.get("train", {}).items()})
        row.update({f"eval/{k}": v for k, v in m.get("eval", {}).items() if not isinstance(v, (dict, list))})
        row["iter/seconds"] = sum(float(m.get(p, {}).get(key) or 0.0) for p, key in (
            ("sample", "gen_seconds"), ("judge", "judge_seconds"), ("train", "train_seconds"), ("eval", "seconds")))
        return row


# ---------------------------------------------------------------------------------------------- helpers


def flip_labels(rows: list[dict], share: float, rng: random.Random) -> int:
    """Swap chosen and rejected in exactly round(share · n) of ``rows`` (drawn by ``rng``, marked ``flipped``):
    label noise at a known rate, for robustness studies (rDPO, cDPO). Returns how many were flipped."""
    n = round(share * len(rows))
    for r in (rows[i] for i in rng.sample(range(len(rows)), n)):
        r["w"], r["l"], r["margin"], r["flipped"] = r["l"], r["w"], -r["margin"], True
        if "win_probs" in r:
            r["win_probs"] = r["win_probs"][::-1]
            r["pair_win_prob"] = 1.0 - r["pair_win_prob"]
    return n


def _quiet(*args, **kwargs) -> None:
    """The log of the processes other than the main one."""


def _mean(xs) -> float | None:
    xs = [float(x) for x in xs]
    return sum(xs) / len(xs) if xs else None


def _tail_means(history: list[dict], share: float = 0.1) -> dict[str, float]:
    """Trainer metrics averaged over the last 10% of logged steps (ONLINE.md §0.4)."""
    steps = [h for h in history if "loss" in h]
    if not steps:
        return {}
    tail = steps[-max(1, int(math.ceil(share * len(steps)))):]
    keys = [k for k in tail[-1] if k not in ("step",) and isinstance(tail[-1][k], (int, float))]
    out = {}
    for k in keys:
        vals = [h[k] for h in tail if isinstance(h.get(k), (int, float)) and math.isfinite(h[k])]
        if vals:
            out[k] = sum(vals) / len(vals)
    return out


def _rate_text(ev: dict) -> str:
    if not ev or ev.get("success") is None:
        return "n/a"
    text = f"success {100 * ev['success']:.1f}% [{100 * ev['success_low']:.1f}–{100 * ev['success_high']:.1f}]"
    if ev.get("greedy_success") is not None:
        text += f", greedy {100 * ev['greedy_success']:.1f}%"
    return text


def _read_teacher(path: str, tokenizer) -> dict:
    """DNO's teacher answers: JSONL {prompt, response}, keyed by the prompt (messages or text), with the
    response's token ids as the data layer tokenises an assistant turn after that prompt."""
    from preftune.data import DataError, DataIssue, Example, jsonl_rows
    from preftune.data.tokenize import tokenize_example

    out, issues = {}, []
    for row, n in jsonl_rows(Path(path), issues):
        for fld in ("prompt", "response"):
            if fld not in row:
                issues.append(DataIssue(path, n, fld, "missing"))
        if "prompt" in row and "response" in row:
            prompt = row["prompt"]
            if isinstance(prompt, str):
                prompt = [{"role": "user", "content": prompt}]
            tok = tokenize_example(Example(prompt, [[{"role": "assistant", "content": row["response"]}]]), tokenizer)
            out[json.dumps(prompt, sort_keys=True)] = {"text": row["response"], "ids": tok.response_ids[0]}
    if issues:
        raise DataError(issues)
    return out


def run_online(cfg: OnlineConfig, log=print) -> OnlineResult:
    run = OnlineRun(cfg, log=log)
    return run.run()
