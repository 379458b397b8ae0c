"""`preftune online` under data-parallel processes, launched as a user launches it: ``accelerate launch
--config_file configs/accelerate/ddp.yaml -m preftune online ...`` (CPU processes, gloo). Two processes share
the sampling (every other batch, gathered) and the training (DDP), the main process judges, builds, evaluates
and writes, and the run is the one-process run: the same samples, pairs and held-out answers, the same
iteration rows and weights within float tolerance, every file written by one process, as often as there."""

import json
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
from launching import launch  # noqa: E402  (tests/train/launching.py: the multi-process tests' launcher)

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("online_worker.py")
TIME_KEYS = ("seconds", "gen_seconds", "judge_seconds", "train_seconds", "tokens/s", "step_time", "elapsed")
# 5 prompts × 4 samples, 2 prompts per sampling batch: 3 batches, 2 on process 0 and 1 on process 1; 6 held-out
# prompts × 2 samples: 2 batches, and the greedy answers one (process 1 idle). 5 pairs in iteration 1 (the
# tiny model and seed 0): its last optimizer step has 1 pair, and process 1 a stand-in micro-batch.
SETTINGS = {"prompts_per_iteration": 5, "k": 4, "gen_batch_size": 8, "heldout_prompts": 6, "heldout_samples": 2,
            "max_new_tokens": 8, "learning_rate": 1e-3, "max_length": 96, "max_prompt_length": 64,
            "progress": False, "plot": False}


def _run(tmp_path: Path, name: str, config: str | None, nproc: int, batch_size: int) -> tuple[Path, Counter]:
    out, log = tmp_path / name, tmp_path / f"{name}.writes"
    sets = {**SETTINGS, "batch_size": batch_size}
    launch(config, nproc, str(log), "online", "--algorithm", "iterative_dpo", "--model", "tiny", "--task",
           "tiny_letters", "--iterations", "2", "-o", str(out),
           *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")], script=WORKER)
    writes = {}
    for rank in range(nproc):
        path = Path(f"{log}.{rank}")
        lines = path.read_text().splitlines() if path.exists() else []
        writes[rank] = Counter(str(Path(x).relative_to(out.resolve())) for x in lines
                               if Path(x).is_relative_to(out.resolve()))
    assert all(not w for r, w in writes.items() if r > 0), writes  # only the main process writes the run
    return out, writes[0]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _same_figures(a, b, where: str) -> None:
    """Equal structure, equal ints and strings, floats within tolerance (the trained weights differ in the
    last bits: two processes sum the batch's gradients in another order)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            if not str(k).endswith(TIME_KEYS):
                _same_figures(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same_figures(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5, nan_ok=True), where
    else:
        assert a == b, where


def test_two_ddp_processes_run_the_one_process_online_loop(tmp_path):
    one, one_writes = _run(tmp_path, "one", None, 1, batch_size=2)
    two, two_writes = _run(tmp_path, "two", "ddp", 2, batch_size=1)  # the same global batch: 1 pair × 2

    assert json.loads((two / "online_config.json").read_text())["processes"] == 2
    assert json.loads((one / "online_config.json").read_text())["processes"] == 1
    assert one_writes == two_writes  # the same files, each as often (manifest.json once per phase)
    assert one_writes["iter_02/samples.jsonl"] == 1 and one_writes["iterations.jsonl"] == 3

    rows1, rows2 = _jsonl(one / "iterations.jsonl"), _jsonl(two / "iterations.jsonl")
    assert [r["iter/t"] for r in rows2] == [1, 2]
    _same_figures(rows1, rows2, "iterations.jsonl")
    _same_figures(json.loads((one / "eval_base.json").read_text()), json.loads((two / "eval_base.json").read_text()),
                  "eval_base.json")
    assert (one / "eval_base.heldout.jsonl").read_text() == (two / "eval_base.heldout.jsonl").read_text()
    steps = []
    for t in (1, 2):
        a, b = one / f"iter_{t:02d}", two / f"iter_{t:02d}"
        # Samples, judgements and pairs: the same, to the token (iteration 2 samples from the trained π_1).
        for name in ("samples.jsonl", "judgements.jsonl", "train_input.jsonl", "heldout.jsonl"):
            assert (a / name).read_text() == (b / name).read_text(), (t, name)
        _same_figures(json.loads((a / "manifest.json").read_text()), json.loads((b / "manifest.json").read_text()),
                      f"iter_{t:02d}/manifest.json")
        w1, w2 = load_file(str(a / "policy.safetensors")), load_file(str(b / "policy.safetensors"))
        assert w1.keys() == w2.keys()
        for k in w1:
            assert torch.allclose(w1[k], w2[k], atol=1e-5, rtol=1e-4), (t, k, (w1[k] - w2[k]).abs().max())
        w0 = load_file(str(one / f"iter_{t - 1:02d}" / "policy.safetensors")) if t > 1 else None
        assert w0 is None or any(not torch.equal(w0[k], w1[k]) for k in w1)  # it trained
        steps.append(rows2[t - 1]["train/steps"])
    assert steps == [r["train/steps"] for r in rows1] and min(steps) > 0
    # 5 pairs in iteration 1: its last step has one, and process 1 ran a stand-in that counted nothing.
    assert len(_jsonl(two / "iter_01" / "train_input.jsonl")) == 5 and steps[0] == 3
