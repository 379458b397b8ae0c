"""The processes of an online run: one (``preftune online``), or N data-parallel ones under
``accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes N -m preftune online ...``
(docs/distributed.md, "Online, iterative and self-play training").

Under N processes each phase's work is shared out as follows:

- sample (training and held-out prompts): process r draws the batches r, r + N, … of the one-process
  run, each with the seed it has there (``generate(part=...)``), and the samples are gathered to every
  process, so they are the one-process samples whatever N;
- judge, build, and the held-out judging and scoring: the main process alone, which writes every file
  of the run while the others wait;
- train: every process, on its share of each global batch, gradients averaged (DDP, as ``preftune train``).

Which phases are still to run is decided from the main process's view of the run folder (``broadcast``),
so every process takes the same branch of a resume.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch

T = TypeVar("T")

# The other processes wait in a collective while the main process judges and builds, or judges and scores
# the held-out answers; torch's default timeout (10 minutes under NCCL) would end a run whose judge is a
# large model.
WAIT = timedelta(hours=3)

_SHARDED = (
    "preftune online is not run under {name}: it keeps one policy in memory from phase to phase (sampling, "
    "scoring, training), and {name} would replace that model's weights with shards in place; sampling from "
    "sharded weights is not implemented either (each process would need a whole copy gathered first). "
    "Launch it with configs/accelerate/ddp.yaml (sampling and training data-parallel), or as one process"
)
_SHAPES = {
    "per_step": "--algorithm {alg} samples, judges and takes one optimizer step per batch of prompts inside one "
    "trainer, whose steps are not shared out between processes",
    "fast_slow": "--algorithm {alg} trains its fast and slow LoRA modules in a loop of its own (online/ofs.py) "
    "that does not average gradients across processes",
    "stages": "--algorithm {alg} (one trainer run per curriculum stage, the reference recomputed on the "
    "in-memory model before each) is not tested under several processes",
    "tree": "--algorithm {alg} grows each prompt's search tree step by step on one process (online/mcts.py); "
    "the searches are not shared out between processes",
    "code_tests": "--algorithm {alg} runs its codes against its tests in the sandbox on one process (online/dstc.py)",
}


def refusals(cfg, world: int) -> list[str]:
    """What this online run asks for that preftune does not run under the launch (``world`` processes)."""
    out = []
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        out.append(_SHARDED.format(name="FSDP2"))
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        out.append(_SHARDED.format(name="DeepSpeed"))
    shape = cfg.algo().shape
    if world > 1 and shape in _SHAPES:
        out.append(_SHAPES[shape].format(alg=cfg.algorithm) + "; run it as one process")
    return out


class Processes:
    """This process's place in the launch: ``rank`` of ``world``, and the few collectives the loop uses.
    One process (no launcher) takes the same calls, each then a no-op."""

    def __init__(self, cfg):
        world = int(os.environ.get("WORLD_SIZE", "1"))
        refused = refusals(cfg, world)
        if refused:
            raise ValueError("; ".join(refused))
        self.rank, self.world, self.device = 0, 1, torch.device("cpu")
        if world > 1:
            from accelerate import PartialState

            # cpu=True where there is no accelerator, as the trainer's start_run: only then does accelerate
            # form a gloo process group on a CPU machine. The trainer's Accelerator keeps this group.
            no_accel = not torch.cuda.is_available() and not torch.backends.mps.is_available()
            state = PartialState(cpu=no_accel, timeout=WAIT)
            self.rank, self.world, self.device = state.process_index, state.num_processes, state.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def part(self) -> tuple[int, int]:
        """This process's share of the sampling batches (``generate(part=...)``)."""
        return self.rank, self.world

    def gather(self, obj: T) -> list[T]:
        """Every process's ``obj``, in rank order, on every process."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: T) -> T:
        """The main process's ``obj`` on every process."""
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def on_main(self, fn: Callable[[], T]) -> T | None:
        """``fn()`` on the main process (it writes the run's files) while the others wait; then all go on.
        Returns its value on the main process, None elsewhere. An error on the main process is raised on
        every process (the others' message names it), instead of leaving them waiting."""
        if self.world == 1:
            return fn()
        value, error = None, None
        if self.is_main:
            try:
                value = fn()
            except BaseException as e:  # re-raised below, after the others have been told
                error = e
        failed = self.broadcast(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        if failed is not None:
            raise RuntimeError(f"the main process failed: {failed}")
        return value
