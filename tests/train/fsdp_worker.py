"""Run by test_fsdp.py, under ``accelerate launch --config_file configs/accelerate/<name>.yaml`` or alone.

``python fsdp_worker.py '<json>'`` with keys ``mode``, ``config`` (TrainConfig fields) and ``result``:
- ``step``: one optimizer step; the main process saves the step's metrics, every parameter's gradient
  (gathered whole from the shards), how many times each process wrote the reference cache, and the kind
  of run preftune set up.
- ``crash``: train, and end every process abruptly (``os._exit``) right after the checkpoint of step
  ``crash_after`` is complete, as a killed job would.
"""

import json
import os
import sys

import torch

from preftune.model.reference import ReferenceCache
from preftune.train.config import TrainConfig
from preftune.train.trainer import build_runner, run_to_end

saves = []
_save = ReferenceCache.save


def _counting_save(self, path):
    saves.append(str(path))
    return _save(self, path)


ReferenceCache.save = _counting_save


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def step(runner, result: str) -> None:
    from accelerate.utils import gather_object

    grads = {}
    original = runner.opt.step

    def capture(*a, **k):
        for n, p in runner.base_engine.model.named_parameters():  # every process: gathering is collective
            if p.grad is not None:
                grads[n] = full(p.grad.detach()).clone().cpu()
        return original(*a, **k)

    runner.opt.step = capture
    metrics = runner.train_step()
    all_saves = gather_object([len(saves)]) if runner.world > 1 else [len(saves)]
    if runner.acc.is_main_process:
        torch.save({"grads": grads, "metrics": metrics, "world": runner.world, "kind": runner.kind,
                    "cache_writes": all_saves, "units": units(runner.base_engine),
                    "ref_units": units(runner.ref_model) if runner.ref_model is not None else None}, result)


def units(module) -> list[str]:
    """The FSDP2 units of ``module``: the class names of the submodules that are sharded on their own."""
    from torch.distributed.fsdp import FSDPModule

    return [type(m).__name__ for m in module.modules() if isinstance(m, FSDPModule)]


def crash(runner, after: int) -> None:
    original = runner.save_checkpoint

    def save_then_die():
        path = original()
        if runner.step == after:
            runner.acc.wait_for_everyone()
            os._exit(3)
        return path

    runner.save_checkpoint = save_then_die
    run_to_end(runner)


def main(spec: dict) -> None:
    runner = build_runner(TrainConfig(**spec["config"]))
    if spec["mode"] == "step":
        step(runner, spec["result"])
    elif spec["mode"] == "crash":
        crash(runner, spec["crash_after"])
    else:
        raise ValueError(spec["mode"])


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
