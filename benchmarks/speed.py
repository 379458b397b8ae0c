"""Speed and memory of one DPO step: TRL's DPOTrainer against preftune, same model, data, batch, precision.

    python benchmarks/speed.py                 # full grid: 3 shapes x 5 configurations + LoRA
    python benchmarks/speed.py --quick         # one shape (120/120), 1 warm-up + 2 timed steps
    python benchmarks/speed.py --shapes 120/120 --configs trl_precompute_bf16,preftune_bf16 --steps 3

What is measured. Every (shape, configuration) runs in a fresh subprocess (so the peak RSS it reports,
``ru_maxrss``, is that configuration's own high-water mark, model load included), runs ``--warmup``
untimed optimizer steps and ``--steps`` timed ones, and reports the median step time. Configurations
of one shape run one after the other, in alternating order across ``--repeats``, so drift of a shared
machine hits every configuration alike. Before the grid, the script measures this machine's
matmul rate (float32 and bfloat16, square matmuls of the model's width class) with the same thread
count; "useful MFU" = useful FLOPs per step / step time / that rate, where useful FLOPs = 6 x
parameters x unique tokens (prompt once + every response once) for full fine-tuning and 4 x
parameters x unique tokens for LoRA (no weight gradients of the frozen base).

Data: synthetic, random token ids (no special tokens) with exactly P prompt tokens and R tokens for
each of chosen and rejected; ``batch`` distinct examples, so every optimizer step sees the same batch
in both trainers and the step-0 loss and log-probs are comparable. TRL gets the token ids directly
(its tokenisation step is bypassed), so both trainers see the same tokens.

Configurations: ``trl_default`` (float32, live reference copy), ``trl_precompute`` (reference
log-probs precomputed before training), ``trl_precompute_bf16``, ``preftune_fp32``, ``preftune_bf16``
(both with reference log-probs precomputed and cached, prefix sharing auto), ``preftune_fp32_ckpt`` and
``preftune_bf16_ckpt`` (the same with ``gradient_checkpointing``: each decoder layer's activations are
recomputed in backward, so they trade about one extra forward for memory), ``..._compile`` (the same with
``compile``: every decoder layer through torch.compile; its one-off compile falls in the warm-up steps),
``..._eager`` (the policy loaded with ``attn_implementation="eager"``, so that inductor compiles the
attention math too; TRL keeps transformers' default, sdpa), ``..._mbNN`` (with compile: activation memory
budget NN/100, the share of each compiled layer's activations kept for backward, the rest recomputed),
``preftune_fp32_auto`` and ``preftune_bf16_auto`` (``engine: auto``, the default: what it chooses on this
machine is in each row's ``engine`` field),
``trl_lora_precompute``
and ``preftune_lora`` (LoRA r=16 on all linear layers, float32). Reference precomputation is not
counted in the step time of either trainer.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_name  # benchmarks/machine.py (scripts run from this folder)

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ["64/64", "120/120", "512/128"]
CONFIGS = [
    "trl_default",
    "trl_precompute",
    "trl_precompute_bf16",
    "preftune_fp32",
    "preftune_bf16",
    "preftune_fp32_ckpt",
    "preftune_bf16_ckpt",
    "preftune_fp32_compile",
    "preftune_bf16_compile",
    "preftune_bf16_ckpt_compile",
    "preftune_bf16_compile_eager",
    "preftune_fp32_auto",
    "preftune_bf16_auto",
]
LORA_CONFIGS = ["trl_lora_precompute", "preftune_lora"]
LORA_R, LORA_ALPHA = 16, 32


# ----------------------------------------------------------------------------------------- child side


def synthetic_batch(tokenizer, n: int, prompt_len: int, resp_len: int, seed: int = 0) -> list[dict]:
    import random

    rng = random.Random(seed)
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(min(len(tokenizer), 40000)) if i not in special and i > 100]
    draw = lambda k: [rng.choice(vocab) for _ in range(k)]  # noqa: E731
    return [
        {"prompt_ids": draw(prompt_len), "chosen_ids": draw(resp_len), "rejected_ids": draw(resp_len)} for _ in range(n)
    ]


def load(model_spec: str, attn_implementation: str | None = None):
    import torch

    from preftune.model import load_model

    model, tok = load_model(model_spec, dtype="float32", attn_implementation=attn_implementation)
    return model.to(torch.float32), tok


def run_trl(job: dict) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    model, tok = load(job["model"])
    rows = synthetic_batch(tok, job["batch"], job["prompt"], job["response"])
    ds = Dataset.from_list(rows)

    class PreTokenized(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # already prompt_ids / chosen_ids / rejected_ids

    times, marks, logs = [], {}, []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            marks["t"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - marks["t"])

        def on_log(self, args, state, control, logs=None, **kw):
            if logs:
                logs_list.append(dict(logs))

    logs_list = logs
    cfg = job["config"]
    peft_config = None
    if "lora" in cfg:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        )
    args = DPOConfig(
        output_dir=job["tmp"],
        per_device_train_batch_size=job["batch"],
        max_steps=job["warmup"] + job["steps"],
        learning_rate=5e-7,
        beta=0.1,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        precompute_ref_log_probs="precompute" in cfg,
        bf16="bf16" in cfg,
        max_length=None,
        dataloader_num_workers=0,
        seed=0,
        gradient_accumulation_steps=1,
        use_cpu=True,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
    )
    trainer = PreTokenized(
        model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft_config, callbacks=[Clock()]
    )
    trainer.train()
    first = next((l for l in logs if "loss" in l), {})
    return {
        "times": times[job["warmup"] :],
        "loss0": first.get("loss"),
        "logps_chosen0": first.get("logps/chosen"),
        "logps_rejected0": first.get("logps/rejected"),
    }


def run_preftune(job: dict) -> dict:
    from accelerate import Accelerator

    from preftune.data.tokenize import TokenizedExample
    from preftune.train import engine_choice, loop
    from preftune.train.config import TrainConfig
    from preftune.train.data_prep import TokenizedSet

    model, tok = load(job["model"], "eager" if "_eager" in job["config"] else None)
    rows = synthetic_batch(tok, job["batch"], job["prompt"], job["response"])
    examples = [
        TokenizedExample(r["prompt_ids"], [r["chosen_ids"], r["rejected_ids"]], index=i) for i, r in enumerate(rows)
    ]
    cfg_name = job["config"]
    auto = "_auto" in cfg_name
    budget = next((int(p[2:]) / 100 for p in cfg_name.split("_") if p.startswith("mb") and p[2:].isdigit()), None)
    cfg = TrainConfig(
        model=job["model"],
        loss="dpo",
        beta=0.1,
        batch_size=job["batch"],
        max_steps=job["warmup"] + job["steps"],
        learning_rate=5e-7,
        scheduler="constant",
        warmup_ratio=0.0,
        precision="bf16" if "bf16" in cfg_name else "fp32",
        reference="precompute",
        ref_cache_dir=str(Path(job["tmp"]) / "ref"),
        output=str(Path(job["tmp"]) / "out"),
        lora="lora" in cfg_name,
        lora_r=LORA_R,
        lora_alpha=LORA_ALPHA,
        progress=False,
        plot=False,
        save_model=False,
        prefix_sharing=job.get("prefix_sharing", "auto"),
        gradient_checkpointing="_ckpt" in cfg_name,
        engine="auto" if auto else "plain",
        compile=None if auto else "_compile" in cfg_name,
        activation_memory_budget=budget,
        logits_chunk=job.get("logits_chunk", 1024),
    )
    obj = cfg.objective()
    acc = Accelerator(mixed_precision="bf16" if cfg.precision == "bf16" else "no", cpu=True)
    # As `preftune train` does: the engine options unset in cfg are filled by the engine choice (auto).
    cfg, choice = engine_choice.resolve(cfg, model, acc, model_passed=False)
    policy, ref_model = loop.setup_models(cfg, model)
    forward = loop.PolicyForward(cfg, obj, obj.resolve(cfg.loss_hyperparameters()), policy, ref_model, tok)
    runner = loop.Runner(cfg, forward, acc, tok, TokenizedSet(examples, "bench"), None)
    # (the Runner precomputes the reference log-probs, or loads them from the cache, before step 0)
    times, first = [], None
    for _ in range(cfg.max_steps):
        t = time.perf_counter()
        metrics = runner.train_step()
        times.append(time.perf_counter() - t)
        runner.step += 1
        first = first or metrics
    profile = None
    if job.get("profile"):  # after the timed steps, so compilation and first-touch costs are not in it
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            runner.train_step()
        profile = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)
    return {
        "profile": profile,
        "times": times[job["warmup"] :],
        "loss0": first.get("loss"),
        "logps_chosen0": first.get("logps/chosen"),
        "logps_rejected0": first.get("logps/rejected"),
        "prefix_sharing": runner.base_engine.prefix_sharing_reason,
        "engine": choice.describe(),
    }


def child(job: dict) -> None:
    import resource

    import torch

    torch.set_num_threads(job["threads"])
    with tempfile.TemporaryDirectory() as tmp:
        job["tmp"] = tmp
        out = run_trl(job) if job["config"].startswith("trl") else run_preftune(job)
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print("RESULT " + json.dumps(out), flush=True)


# ---------------------------------------------------------------------------------------- parent side


def matmul_rate(dtype_name: str, n: int = 1024, seconds: float = 3.0) -> float:
    """Sustained GFLOP/s of an n x n x n matmul in ``dtype`` on this machine (best of 3 windows)."""
    import torch

    dt = getattr(torch, dtype_name)
    a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(3):
        t, r = time.perf_counter(), 0
        while time.perf_counter() - t < seconds / 3:
            a @ b
            r += 1
        best = max(best, 2 * n**3 * r / (time.perf_counter() - t) / 1e9)
    return best


def model_params(spec: str) -> int:
    from transformers import AutoConfig

    from preftune.model.loading import resolve_model

    cfg = AutoConfig.from_pretrained(resolve_model(spec))
    h, i, n, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * i + 2 * h
    return n * per_layer + v * h * (1 if cfg.tie_word_embeddings else 2) + h


def run_job(job: dict, timeout: int) -> dict:
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(job["threads"]),
        TOKENIZERS_PARALLELISM="false",
        TRANSFORMERS_VERBOSITY="error",
        PYTHONWARNINGS="ignore",
    )
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(job)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=ROOT,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": (proc.stderr or proc.stdout)[-2000:]}


def summarise(job: dict, res: dict, n_params: int, rates: dict) -> dict:
    row = {"shape": f"{job['prompt']}/{job['response']}", "config": job["config"]}
    if "error" in res:
        return {**row, "error": res["error"]}
    med = statistics.median(res["times"])
    tokens = job["batch"] * (job["prompt"] + 2 * job["response"])
    flops = (4 if "lora" in job["config"] else 6) * n_params * tokens
    rate = rates["bfloat16" if "bf16" in job["config"] else "float32"]
    return {
        **row,
        "step_s": med,
        "steps_s": res["times"],
        "tokens_per_s": tokens / med,
        "useful_tflop": flops / 1e12,
        "mfu": flops / med / (rate * 1e9),
        "peak_rss_gib": res["peak_rss_gib"],
        "loss0": res.get("loss0"),
        "logps_chosen0": res.get("logps_chosen0"),
        "logps_rejected0": res.get("logps_rejected0"),
        "prefix_sharing": res.get("prefix_sharing"),
        "engine": res.get("engine"),
        **({"profile": res["profile"]} if res.get("profile") else {}),
    }


def table(rows: list[dict]) -> str:
    best = {}
    for r in rows:
        if r["config"].startswith("trl") and "step_s" in r:
            best.setdefault(r["shape"], {})[r["config"]] = r
    lines = [
        "| shape P/R | configuration | median step (s) | tokens/s | peak RSS (GiB) | useful MFU | "
        "vs TRL same precision | vs TRL precompute+bf16 | step-0 loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['config']} | error | | | | | | |")
            continue
        trl = best.get(r["shape"], {})
        same = {
            "preftune_fp32": "trl_precompute",
            "preftune_bf16": "trl_precompute_bf16",
            "preftune_lora": "trl_lora_precompute",
        }.get("_".join(r["config"].split("_")[:2]))
        vs_same = f"{trl[same]['step_s'] / r['step_s']:.2f}x" if same in trl else ""
        vs_best = (
            f"{trl['trl_precompute_bf16']['step_s'] / r['step_s']:.2f}x, "
            f"mem {r['peak_rss_gib'] / trl['trl_precompute_bf16']['peak_rss_gib']:.2f}x"
            if "trl_precompute_bf16" in trl and r["config"].startswith("preftune")
            else ""
        )
        loss = f"{r['loss0']:.6f}" if r.get("loss0") is not None else ""
        lines.append(
            f"| {r['shape']} | {r['config']} | {r['step_s']:.2f} | {r['tokens_per_s']:.0f} | "
            f"{r['peak_rss_gib']:.2f} | {100 * r['mfu']:.0f}% | {vs_same} | {vs_best} | {loss} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "step_s" in r]
    shapes = list(dict.fromkeys(r["shape"] for r in ok))
    configs = list(dict.fromkeys(r["config"] for r in ok))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    w = 0.8 / max(1, len(configs))
    for ci, c in enumerate(configs):
        for ax, key in zip(axes, ("step_s", "peak_rss_gib")):
            xs = [si + ci * w for si, s in enumerate(shapes) if any(r["shape"] == s and r["config"] == c for r in ok)]
            ys = [r[key] for s in shapes for r in ok if r["shape"] == s and r["config"] == c]
            ax.bar(xs, ys, w, label=c)
    for ax, title in zip(axes, ("median step time (s), lower is better", "peak RSS (GiB), lower is better")):
        ax.set_xticks([i + 0.4 - w / 2 for i in range(len(shapes))], [f"P/R = {s}" for s in shapes])
        ax.set_title(title)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="shape 120/120 only, 1 warm-up and 2 timed steps, no LoRA")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model spec (preftune.model.load_model)")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated prompt/response token counts")
    ap.add_argument("--configs", default=None, help=f"comma-separated subset of {CONFIGS + LORA_CONFIGS}")
    ap.add_argument("--no-lora", action="store_true", help="skip the LoRA configurations")
    ap.add_argument("--lora-shape", default="120/120", help="shape of the LoRA configurations")
    ap.add_argument("--batch", type=int, default=4, help="pairs per optimizer step")
    ap.add_argument("--logits-chunk", type=int, default=1024, help="preftune: response positions per LM-head chunk")
    ap.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first")
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps (median reported)")
    ap.add_argument("--repeats", type=int, default=1, help="run the grid this many times, alternating the order")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads in every run")
    ap.add_argument("--profile", action="store_true",
                    help="preftune configurations: one more step under torch.profiler after the timed ones; its "
                    "top operators (self CPU time) go to the results as 'profile'")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per configuration run")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.json"), help="JSON results file")
    ap.add_argument("--plot", default=str(ROOT / "docs" / "benchmarks.png"), help="PNG plot (empty: none)")
    a = ap.parse_args(argv)
    if a.quick:
        a.shapes, a.steps, a.warmup, a.no_lora = "120/120", 2, 1, True
    return a


def machine_meta(a: argparse.Namespace, rates: dict, n_params: int) -> dict:
    """What the results depend on besides the code: machine, library versions and the run's settings."""
    import torch
    import transformers
    import trl

    return {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "cpu": cpu_name(),
        "threads": a.threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "command": " ".join(sys.argv),
        "matmul_gflops": rates,
        "params": n_params,
        "batch": a.batch,
        "warmup": a.warmup,
        "steps": a.steps,
    }


def grid(a: argparse.Namespace) -> list[dict]:
    """One job per (shape, configuration); the LoRA configurations run at ``--lora-shape`` only."""
    configs = a.configs.split(",") if a.configs else CONFIGS + ([] if a.no_lora else LORA_CONFIGS)
    jobs = []
    for shape in a.shapes.split(","):
        p, r = map(int, shape.split("/"))
        for c in configs:
            if c in LORA_CONFIGS and shape != a.lora_shape:
                continue
            jobs.append(
                {
                    "model": a.model,
                    "config": c,
                    "prompt": p,
                    "response": r,
                    "batch": a.batch,
                    "warmup": a.warmup,
                    "steps": a.steps,
                    "threads": a.threads,
                    "logits_chunk": a.logits_chunk,
                    "profile": a.profile,
                }
            )
    return jobs


def run_grid(jobs: list[dict], repeats: int, timeout: int) -> dict[tuple, list]:
    """Every job ``repeats`` times, in alternating order (so drift of a shared machine hits all alike)."""
    results: dict[tuple, list] = {}
    for rep in range(repeats):
        order = jobs if rep % 2 == 0 else jobs[::-1]
        for job in order:
            t = time.perf_counter()
            res = run_job(job, timeout)
            key = (job["prompt"], job["response"], job["config"])
            results.setdefault(key, []).append(res)
            print(
                f"[{time.perf_counter() - t:6.0f}s] {job['prompt']}/{job['response']} {job['config']}: "
                f"{json.dumps(res)[:400]}",
                flush=True,
            )
    return results


def merge_runs(runs: list[dict]) -> dict:
    """The repeats of one job as one result: all step times pooled, the highest peak RSS; the first
    error when no run succeeded."""
    good = [x for x in runs if "error" not in x]
    if not good:
        return runs[0]
    return {
        "times": [t for x in good for t in x["times"]],
        **{k: v for k, v in good[0].items() if k != "times"},
        "peak_rss_gib": max(x["peak_rss_gib"] for x in good),
    }


def main() -> None:
    a = parse_args()
    if a.child:
        child(json.loads(a.child))
        return
    import torch

    torch.set_num_threads(a.threads)
    rates = {d: matmul_rate(d) for d in ("float32", "bfloat16")}
    n_params = model_params(a.model)
    meta = machine_meta(a, rates, n_params)
    print(json.dumps(meta, indent=1), flush=True)
    jobs = grid(a)
    results = run_grid(jobs, a.repeats, a.timeout)
    rows = [
        summarise(job, merge_runs(results[(job["prompt"], job["response"], job["config"])]), n_params, rates)
        for job in jobs
    ]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(table(rows))
    if a.plot:
        plot(rows, Path(a.plot))



if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
