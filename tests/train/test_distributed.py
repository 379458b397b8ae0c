"""Two CPU processes (gloo, through accelerate) give the same loss and gradients as one process on
the same global batch."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("ddp_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(nproc: int, batch_size: int, args, result: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        str(WORKER),
        *map(str, args),
        str(batch_size),
        str(result),
    ]
    if nproc == 1:
        cmd = [sys.executable, str(WORKER), *map(str, args), str(batch_size), str(result)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(result, weights_only=False)


@pytest.mark.slow
def test_two_processes_equal_one(tiny_model_dir, pairs_file, tmp_path):
    one = _run(1, 4, [tiny_model_dir, pairs_file, tmp_path / "o1"], tmp_path / "one.pt")
    two = _run(2, 2, [tiny_model_dir, pairs_file, tmp_path / "o2"], tmp_path / "two.pt")
    assert one["world"] == 1 and two["world"] == 2
    for k in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
        assert one["metrics"][k] == pytest.approx(two["metrics"][k], rel=1e-5, abs=1e-6), k
    assert one["grads"].keys() == two["grads"].keys()
    for n, g in one["grads"].items():
        assert torch.allclose(g, two["grads"][n], atol=1e-6, rtol=1e-4), n
