"""Launching preftune as users launch it, for the multi-process tests (test_fsdp.py, test_deepspeed.py):
``accelerate launch --config_file configs/accelerate/<name>.yaml`` of sharded_worker.py or of ``-m preftune``."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("sharded_worker.py")
ACCELERATE_CONFIGS = ROOT / "configs" / "accelerate"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def launch(config: str | None, nproc: int, *args: str, module: bool = False, check: bool = True,
           script: Path = WORKER):
    """``accelerate launch --config_file configs/accelerate/<config>.yaml`` (None: plain python) of the worker
    (``script``: another one), or with ``module`` of ``-m preftune``."""
    target = ["-m", "preftune", *args] if module else [str(script), *args]
    if config is None:
        cmd = [sys.executable, *target]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ACCELERATE_CONFIGS / f"{config}.yaml"), "--num_processes", str(nproc),
               "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()), *target]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, failure(proc)
    return proc


def failure(proc) -> str:
    """What went wrong in a launch: everything the workers wrote (torchrun prefixes their tracebacks ``[rankN]:``;
    a worker killed by a signal in C++ code writes a bare line such as ``terminate called ...``), then the
    launcher's own report."""
    return "\n".join([f"exit {proc.returncode}", "--- stdout:", proc.stdout[-4000:], "--- stderr:",
                      proc.stderr[-12000:]])


def one_step(config: str | None, nproc: int, cfg: dict, result: Path, **spec) -> dict:
    """The worker's ``step`` mode (``spec``: its ``steps`` and ``save``) and what it saved."""
    launch(config, nproc, json.dumps({"mode": "step", "config": cfg, "result": str(result), **spec}))
    return torch.load(result, weights_only=False)


def tiny_cfg(model_dir, data, out: Path, batch_size: int, **kw) -> dict:
    base = dict(model=str(model_dir), data=str(data), output=str(out), loss="dpo", max_steps=1,
                batch_size=batch_size, learning_rate=1e-3, warmup_ratio=0.0, progress=False, plot=False,
                length_grouping=False, max_grad_norm=None)
    return {**base, **kw}


def assert_same_step(one: dict, two: dict) -> None:
    for k in ("loss", "rewards/margins", "logps/chosen", "logps/rejected", "grad_norm"):
        assert one["metrics"][k] == pytest.approx(two["metrics"][k], rel=1e-5, abs=1e-6), k
    assert one["grads"].keys() == two["grads"].keys()
    for n, g in one["grads"].items():
        assert torch.allclose(g, two["grads"][n], atol=1e-6, rtol=1e-4), (n, (g - two["grads"][n]).abs().max())
