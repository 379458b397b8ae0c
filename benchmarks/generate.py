"""Sampling speed: ``transformers.generate`` against preftune's fast sampler (and CTranslate2 where installed).

    python benchmarks/generate.py --threads 1                  # demo shape (32 new tokens) and 128 new tokens
    python benchmarks/generate.py --threads 1 --max-new-tokens 32 --engines hf_fp32,fast_bf16

The shape is the online demo's: the first ``--prompts`` (64) train prompts of the ``word_limit`` task,
chat-templated, ``--n`` (4) samples each, temperature 0.8, top-p 0.95, at most ``--max-new-tokens``
new tokens, stopping at EOS. Engines:

- ``hf_fp32``, ``hf_bf16``: ``generate(engine="hf")``, i.e. ``transformers.generate``, batches of
  ``--hf-batch`` (48, the online loop's ``gen_batch_size``) sequences; ``bf16`` is a bf16 copy of
  the weights (the loop's ``sampling_precision: bf16``).
- ``fast_fp32``, ``fast_bf16``: ``generate(engine="fast")`` (``preftune/online/sampler.py``), batches
  of ``--fast-batch`` (256) sequences.
- ``ct2_fp32``: CTranslate2 (``pip install ctranslate2``; skipped when absent), float32 (its CPU
  build has no bf16), the model converted from the HF folder in the timed run (conversion counts:
  an online loop would convert every iterate), full-vocabulary top-p (``sampling_topk=0``).

Every (engine, length) runs in a fresh subprocess, so the peak RSS it reports (``ru_maxrss``) is its
own, model load included; the time excludes loading. Besides wall time the table gives the run's
CPU time (user + system): on a machine shared with other jobs it measures the engine's own work
where wall time also measures the neighbours. ``fast_bf16@48`` runs an engine at another batch.
``--repeats`` runs the grid again in reverse order, so drift of a shared machine hits every engine
alike; the table gives the median time.

Useful MFU = useful FLOPs / time / the matmul rate of the engine's precision, where useful FLOPs =
2 × parameters × (each prompt's tokens once + every generated token): the work of one prefill per
prompt and one forward per sampled token. The rate is measured by this script, with the same
thread count, on the model's own GEMMs (every linear layer's shape and the LM head at 256 rows,
the decode batch), per CPU second (so a busy neighbour does not lower it), and for float32 the
faster of MKL (``F.linear``) and oneDNN with prepacked weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_name  # benchmarks/machine.py (scripts run from this folder)

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ["hf_fp32", "hf_bf16", "fast_fp32", "fast_bf16", "ct2_fp32"]


# ----------------------------------------------------------------------------------------- child side


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def split_engine(name: str) -> tuple[str, str, int | None]:
    """``fast_bf16@48`` -> ("fast", "bf16", 48): engine, precision, batch override."""
    base, _, batch = name.partition("@")
    engine, precision = base.split("_")
    return engine, precision, int(batch) if batch else None


def load(job: dict):
    import torch

    from preftune.model.loading import load_model
    from preftune.tasks import word_limit

    model, tok = load_model(job["model"])
    if split_engine(job["engine"])[1] == "bf16":
        model = model.to(torch.bfloat16)
    return model, tok, word_limit.train_prompts()[: job["prompts"]]


def run_preftune(job: dict) -> dict:
    from preftune.online.generate import generate

    model, tok, prompts = load(job)
    engine, _, batch = split_engine(job["engine"])
    batch = batch or (job["hf_batch"] if engine == "hf" else job["fast_batch"])
    t, c = time.perf_counter(), cpu_seconds()
    g = generate(model, tok, prompts, n=job["n"], temperature=job["temperature"], top_p=job["top_p"],
                 max_new_tokens=job["max_new_tokens"], seed=job["seed"], batch_size=batch, engine=engine)
    secs, cpu = time.perf_counter() - t, cpu_seconds() - c
    samples = [s for row in g.samples for s in row]
    return {"seconds": secs, "cpu_seconds": cpu, "prompt_tokens": sum(map(len, g.prompt_ids)),
            "gen_tokens": sum(s.num_tokens for s in samples), "responses": len(samples),
            "eos_rate": sum(s.finished for s in samples) / len(samples)}


def run_ct2(job: dict) -> dict:
    import ctranslate2

    from preftune.model.loading import resolve_model
    from preftune.online.generate import encode_prompts, eos_ids

    _, tok, prompts = load({**job, "engine": "x_fp32"})
    ids = encode_prompts(tok, prompts)
    stop = eos_ids(tok)
    with tempfile.TemporaryDirectory() as out:
        t, c = time.perf_counter(), cpu_seconds()
        ctranslate2.converters.TransformersConverter(str(resolve_model(job["model"]))).convert(
            out, quantization="float32", force=True)
        convert = time.perf_counter() - t
        gen = ctranslate2.Generator(out, device="cpu", compute_type="float32", intra_threads=job["threads"])
        ctranslate2.set_random_seed(job["seed"])
        starts = [tok.convert_ids_to_tokens(p) for p in ids for _ in range(job["n"])]
        t = time.perf_counter()
        res = gen.generate_batch(starts, max_batch_size=job["fast_batch"], max_length=job["max_new_tokens"],
                                 sampling_topk=0, sampling_topp=job["top_p"],
                                 sampling_temperature=job["temperature"], end_token=stop, return_end_token=True,
                                 include_prompt_in_result=False)
        secs, cpu = time.perf_counter() - t, cpu_seconds() - c
    outs = [r.sequences_ids[0] for r in res]
    finished = [bool(o) and o[-1] in stop for o in outs]
    return {"seconds": convert + secs, "cpu_seconds": cpu, "convert_seconds": convert,
            "prompt_tokens": sum(map(len, ids)), "gen_tokens": sum(map(len, outs)), "responses": len(outs),
            "eos_rate": sum(finished) / len(outs), "max_len": max(map(len, outs))}


def child(job: dict) -> None:
    import torch

    torch.set_num_threads(job["threads"])
    res = run_ct2(job) if job["engine"].startswith("ct2") else run_preftune(job)
    res["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print("RESULT " + json.dumps(res), flush=True)


# ---------------------------------------------------------------------------------------- parent side


def model_shapes(spec: str) -> tuple[int, list[tuple[int, int]]]:
    """(parameters, [(in, out) of every distinct linear of a decoder layer, and the LM head])."""
    from transformers import AutoConfig

    from preftune.model.loading import resolve_model

    cfg = AutoConfig.from_pretrained(resolve_model(spec))
    h, i, n, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * i + 2 * h
    params = n * per_layer + v * h * (1 if cfg.tie_word_embeddings else 2) + h
    layer = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]
    return params, layer * n + [(h, v)]


def matmul_rate(dtype_name: str, shapes: list[tuple[int, int]], rows: int = 256, seconds: float = 3.0) -> dict:
    """GFLOP/s of one decode step's GEMMs (``rows`` × every linear of the model) per CPU second, best
    of 3 windows, through ``F.linear`` and (float32) through oneDNN with prepacked weights, the path
    the fast sampler takes for float32 on CPU; ``best`` is the machine's rate for MFU."""
    import torch
    import torch.nn.functional as F

    dt = getattr(torch, dtype_name)
    distinct = sorted(set(shapes))
    count = {s: shapes.count(s) for s in distinct}
    xs = {s: torch.randn(rows, s[0], dtype=dt) for s in distinct}
    ws = {s: torch.randn(s[1], s[0], dtype=dt) for s in distinct}
    flops = sum(2 * rows * a * b * count[(a, b)] for a, b in distinct)
    paths = {"F.linear": lambda s: F.linear(xs[s], ws[s])}
    if dt == torch.float32 and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        packed = {s: torch.ops.mkldnn._reorder_linear_weight(ws[s], rows) for s in distinct}
        paths["onednn"] = lambda s: torch.ops.mkldnn._linear_pointwise(xs[s], packed[s], None, "none", [], "")
    out = {}
    for name, mm in paths.items():
        best = 0.0
        for _ in range(3):
            t, r = time.process_time(), 0
            while time.process_time() - t < seconds / 3:
                for s in distinct:
                    for _ in range(count[s]):
                        mm(s)
                r += 1
            best = max(best, flops * r / (time.process_time() - t) / 1e9)
        out[name] = best
    out["best"] = max(out.values())
    return out


def run_job(job: dict, timeout: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(job["threads"]), TOKENIZERS_PARALLELISM="false",
               TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    try:
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True,
                              text=True, env=env, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": (proc.stderr or proc.stdout)[-2000:]}


def summarise(job: dict, runs: list[dict], params: int, rates: dict) -> dict:
    row = {"engine": job["engine"], "max_new_tokens": job["max_new_tokens"]}
    good = [r for r in runs if "error" not in r]
    if not good:
        return {**row, "error": runs[0]["error"]}
    secs = statistics.median(r["seconds"] for r in good)
    r0 = good[0]
    flops = 2 * params * (r0["prompt_tokens"] + statistics.median(r["gen_tokens"] for r in good))
    rate = rates["bfloat16" if split_engine(job["engine"])[1] == "bf16" else "float32"]["best"]
    cpu = statistics.median(r["cpu_seconds"] for r in good)
    return {**row, "seconds": secs, "runs_seconds": [r["seconds"] for r in good], "cpu_seconds": cpu,
            "cpu_mfu": flops / cpu / (rate * 1e9),
            "responses_per_s": r0["responses"] / secs,
            "gen_tokens": statistics.median(r["gen_tokens"] for r in good),
            "tokens_per_s": statistics.median(r["gen_tokens"] for r in good) / secs,
            "useful_tflop": flops / 1e12, "mfu": flops / secs / (rate * 1e9),
            "peak_rss_gib": max(r["peak_rss_gib"] for r in good), "eos_rate": r0["eos_rate"],
            **({"convert_seconds": r0["convert_seconds"]} if "convert_seconds" in r0 else {})}


def table(rows: list[dict]) -> str:
    base = {r["max_new_tokens"]: r for r in rows if r["engine"] == "hf_fp32" and "seconds" in r}
    lines = ["| new tokens | engine | time (s) | CPU time (s) | responses/s | gen tokens/s | peak RSS (GiB) | "
             "useful MFU (wall, CPU) | vs hf_fp32 (wall, CPU) | EOS rate |", "|---" * 10 + "|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['max_new_tokens']} | {r['engine']} | error | | | | | | | |")
            continue
        b = base.get(r["max_new_tokens"])
        vs = f"{b['seconds'] / r['seconds']:.2f}x, {b['cpu_seconds'] / r['cpu_seconds']:.2f}x" if b else ""
        lines.append(f"| {r['max_new_tokens']} | {r['engine']} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | "
                     f"{r['responses_per_s']:.2f} | {r['tokens_per_s']:.0f} | {r['peak_rss_gib']:.2f} | "
                     f"{100 * r['mfu']:.0f}%, {100 * r['cpu_mfu']:.0f}% | {vs} | {r['eos_rate']:.2f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model spec (preftune.model.load_model)")
    ap.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated subset of {ENGINES}")
    ap.add_argument("--max-new-tokens", default="32,128", help="comma-separated response length limits")
    ap.add_argument("--prompts", type=int, default=64, help="word_limit train prompts")
    ap.add_argument("--n", type=int, default=4, help="samples per prompt")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hf-batch", type=int, default=48, help="sequences per transformers.generate call")
    ap.add_argument("--fast-batch", type=int, default=256, help="sequences per batch of the fast sampler and ct2")
    ap.add_argument("--repeats", type=int, default=1, help="run the grid this many times, alternating the order")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads in every run")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per run")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks_generate.json"), help="JSON results file")
    return ap.parse_args(argv)


def main() -> None:
    a = parse_args()
    if a.child:
        child(json.loads(a.child))
        return
    import torch

    torch.set_num_threads(a.threads)
    params, shapes = model_shapes(a.model)
    rates = {d: matmul_rate(d, shapes) for d in ("float32", "bfloat16")}
    print(f"matmul GFLOP/s per CPU second at {a.threads} threads (the model's GEMMs, 256 rows): {rates}", flush=True)
    engines = a.engines.split(",")
    if "ct2_fp32" in engines and not _has("ctranslate2"):
        print("ctranslate2 is not installed: ct2_fp32 skipped", flush=True)
        engines.remove("ct2_fp32")
    common = {k: getattr(a, k) for k in ("model", "prompts", "n", "temperature", "top_p", "seed", "hf_batch",
                                          "fast_batch", "threads")}
    jobs = [{**common, "engine": e, "max_new_tokens": int(m)} for m in a.max_new_tokens.split(",") for e in engines]
    results: dict[int, list] = {}
    for rep in range(a.repeats):
        for i in (range(len(jobs)) if rep % 2 == 0 else reversed(range(len(jobs)))):
            t = time.perf_counter()
            res = run_job(jobs[i], a.timeout)
            results.setdefault(i, []).append(res)
            print(f"[{time.perf_counter() - t:6.0f}s] {jobs[i]['engine']} {jobs[i]['max_new_tokens']}: "
                  f"{json.dumps(res)[:300]}", flush=True)
    rows = [summarise(job, results[i], params, rates) for i, job in enumerate(jobs)]
    meta = {"cpu": cpu_name(), "machine": f"{os.cpu_count()} CPUs, {platform.platform()}", "threads": a.threads,
            "torch": torch.__version__, "command": " ".join(sys.argv), "matmul_gflops": rates, "params": params}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(a.out).with_suffix(".tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    tmp.replace(a.out)
    print(table(rows))


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None



if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
