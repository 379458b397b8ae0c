"""Run by test_fsdp.py and test_deepspeed.py, under ``accelerate launch --config_file
configs/accelerate/<name>.yaml`` or alone.

``python sharded_worker.py '<json>'`` with keys ``mode``, ``config`` (TrainConfig fields) and ``result``:
- ``step``: ``steps`` optimizer steps (default 1), then the final model when ``save``; the main process saves
  each step's metrics, every parameter's gradient of the first step before clipping (gathered whole from the shards or
  partitions), the evaluation after the last step (with ``eval_data``), how many times each process wrote the
  reference cache, and the kind of run preftune set up.
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


def step(runner, result: str, steps: int, save: bool) -> None:
    from accelerate.utils import gather_object

    grads = {}
    if runner.kind == "deepspeed":  # DeepSpeed steps inside backward; its gradients are read just before
        from deepspeed.utils import safe_get_full_grad

        owner, name = runner.engine, "step"

        def read():
            return {n: safe_get_full_grad(p) for n, p in runner.base_engine.model.named_parameters()}
    else:  # before clipping, as DeepSpeed's are
        owner, name = runner, "clip"

        def read():
            return {n: full(p.grad.detach()) for n, p in runner.base_engine.model.named_parameters()
                    if p.grad is not None}

    original = getattr(owner, name)

    def capture(*a, **k):
        if not grads:  # the first step's; every process reads (gathering is collective)
            grads.update({n: g.detach().clone().cpu() for n, g in read().items() if g is not None})
        return original(*a, **k)

    setattr(owner, name, capture)
    metrics = []
    for _ in range(steps):
        metrics.append(runner.train_step())
        runner.step += 1
    evaluation = runner.evaluate() if runner.eval_set is not None else None
    model_dir = runner.save_final() if save else None
    all_saves = gather_object([len(saves)]) if runner.world > 1 else [len(saves)]
    if runner.acc.is_main_process:
        torch.save({"grads": grads, "metrics": metrics[0], "history": metrics, "world": runner.world,
                    "kind": runner.kind, "cache_writes": all_saves, "units": units(runner.base_engine),
                    "ref_units": units(runner.ref_model) if runner.ref_model is not None else None,
                    "model_dir": str(model_dir) if model_dir else None, "eval": evaluation}, result)


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
        step(runner, spec["result"], spec.get("steps", 1), spec.get("save", False))
    elif spec["mode"] == "crash":
        crash(runner, spec["crash_after"])
    else:
        raise ValueError(spec["mode"])


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
    from preftune.train.distributed import end_launch

    end_launch(0)  # as the CLI ends a launched process (a teardown abort would fail the launch)
