"""Checkpoints: trainable weights, optimizer, scheduler, RNG of every process, objective state and
the position in the data. Written to a temporary folder and renamed, so a crash mid-write never
leaves a checkpoint that looks complete; only the last ``keep`` are kept.

A checkpoint folder may come from elsewhere, so nothing in it is unpickled freely: weights are
safetensors, and ``optim.pt`` / ``rng_<i>.pt`` hold only tensors, numbers, strings and containers and
load with ``torch.load(weights_only=True)``, which refuses anything else (it admits numpy's RNG key
array too, which checkpoints of earlier builds of this version hold).
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import torch

PREFIX = "checkpoint-"


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Only what the optimizer changes (LoRA: the adapters; full fine-tuning: everything)."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict:
    """Every generator of this process, as tensors and plain values (loadable with weights_only)."""
    name, key, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (name, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, cached)  # key: uint32 (624,)
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, key, pos, has_gauss, cached = state["numpy"]  # key: a tensor, or an array (older checkpoints)
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_rng_globals() -> list:
    """What checkpoints written before the RNG state held only tensors contain besides plain values:
    numpy's RNG key, a uint32 array."""
    return [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_restricted(path: Path):
    """``torch.load`` that refuses anything but tensors, plain values and numpy's RNG key (a pickled
    object could run code when loaded)."""
    try:
        with torch.serialization.safe_globals(_numpy_rng_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message also suggests weights_only=False; keep only what it found.
        text = " ".join(str(e).split())
        found = text.split("Unpickler error:", 1)[-1].split(" Please use", 1)[0].split(" Check the doc", 1)[0].strip()
        raise ValueError(
            f"{path}: refused to load: it holds more than tensors, numbers, strings and containers, so loading "
            f"it could run code ({found}). Resume only from checkpoints this version of preftune wrote."
        ) from None


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    if not ckpt_root.is_dir():
        return []
    done = [p for p in ckpt_root.glob(PREFIX + "*") if (p / "trainer_state.json").exists()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX) :]))


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    *,
    model,
    optimizer,
    scheduler,
    trainer_state: dict,
    loss_state,
    process_index: int,
    is_main: bool,
    wait,
    keep: int,
    shards: int | None = None,
) -> Path:
    """``shards``: the process count of a sharded (FSDP2) run, whose every process writes its own shard of
    the trainable weights and optimizer state; None: the main process writes them whole."""
    from safetensors.torch import save_file

    final = ckpt_root / f"{PREFIX}{step:07d}"
    tmp = ckpt_root / f".tmp-{PREFIX}{step:07d}"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    wait()
    torch.save(rng_state(), tmp / f"rng_{process_index}.pt")
    opt_state = optimizer.state_dict()
    if shards is not None:
        _save_shard(tmp, model, opt_state, process_index, shards)
        opt_state = {"state": {}, "param_groups": opt_state["param_groups"]}  # the tensors are in the shards
        trainer_state = {**trainer_state, "shards": shards}
    if is_main:
        if shards is None:
            save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save(
            {
                "optimizer": opt_state,
                "scheduler": scheduler.state_dict(),
                "loss_state": loss_state.state_dict() if loss_state is not None else None,
            },
            tmp / "optim.pt",
        )
        # trainer_state.json is written last: its presence marks the checkpoint complete.
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
    wait()
    if is_main:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in list_checkpoints(ckpt_root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    wait()
    return final


def read_trainer_state(path: Path) -> dict:
    """The checkpoint's position and identity (step, total, seed, loss, elapsed seconds)."""
    return json.loads((path / "trainer_state.json").read_text())


def load_checkpoint(
    path: Path, *, model, optimizer, scheduler, loss_state, process_index: int, shards: int | None = None
) -> dict:
    """Restore a checkpoint into the run; returns its trainer state. Every file is read (and refused
    if unsafe) before anything in the run changes. ``shards`` as for ``save_checkpoint``: a sharded
    checkpoint resumes only into a sharded run of as many processes."""
    from safetensors.torch import load_file

    state = read_trainer_state(path)
    if state.get("shards") != shards:
        def what(n):
            return f"an FSDP2 run of {n} processes" if n else "an unsharded run (single process, DDP)"

        raise ValueError(f"{path}: checkpoint was written by {what(state.get('shards'))}; this is {what(shards)}: "
                         "resume with the launch that wrote it")
    params = dict(model.named_parameters())
    opt = load_restricted(path / "optim.pt")
    if shards is None:
        weights = load_file(str(path / "trainable.safetensors"))
    else:
        weights, opt["optimizer"]["state"] = _load_shard(path, params, optimizer, process_index, shards)
    missing = [n for n in weights if n not in params]
    if missing:
        raise ValueError(
            f"{path}: checkpoint has parameters the model lacks (different model or LoRA settings?): {missing[:3]}"
        )
    rng_file = path / f"rng_{process_index}.pt"
    rng = load_restricted(rng_file) if rng_file.exists() else None
    with torch.no_grad():
        for n, t in weights.items():
            _local(params[n]).copy_(t)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    if loss_state is not None and opt.get("loss_state") is not None:
        loss_state.load_state_dict(opt["loss_state"])
    if rng is not None:
        set_rng_state(rng)
    return state


# ---------------------------------------------------------------- sharded (FSDP2) checkpoints
# Each process writes the shards it holds (DTensor local tensors) as safetensors: its trainable weights, and
# its optimizer state keyed "<parameter index>.<state name>". Which state tensors were DTensors is recorded
# in the file's metadata, so loading rebuilds them on the same mesh with the same placements.


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _shard_name(kind: str, process_index: int, shards: int) -> str:
    return f"{kind}-{process_index:05d}-of-{shards:05d}.safetensors"


def _save_shard(folder: Path, model, opt_state: dict, process_index: int, shards: int) -> None:
    from safetensors.torch import save_file

    weights = {n: _local(p.detach()).cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(weights, str(folder / _shard_name("model", process_index, shards)))
    tensors, distributed = {}, []
    for i, entry in opt_state["state"].items():
        for k, v in entry.items():
            if not isinstance(v, torch.Tensor):
                raise ValueError(f"optimizer state {k!r} is not a tensor; a sharded checkpoint holds tensors only")
            if hasattr(v, "to_local"):
                distributed.append(f"{i}.{k}")
            tensors[f"{i}.{k}"] = _local(v).detach().cpu().contiguous()
    save_file(tensors, str(folder / _shard_name("optim", process_index, shards)),
              metadata={"dtensor": json.dumps(distributed)})


def _load_shard(path: Path, params: dict, optimizer, process_index: int, shards: int) -> tuple[dict, dict]:
    """(this process's trainable weights, the optimizer ``state`` for ``load_state_dict``)."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    from torch.distributed.tensor import DTensor

    weights = load_file(str(path / _shard_name("model", process_index, shards)))
    for n, t in weights.items():
        if n in params and _local(params[n]).shape != t.shape:
            raise ValueError(f"{path}: shard {process_index} of {n} has shape {tuple(t.shape)}, this run's "
                             f"{tuple(_local(params[n]).shape)} (another model or sharding?)")
    opt_file = path / _shard_name("optim", process_index, shards)
    with safe_open(str(opt_file), framework="pt") as f:
        distributed = set(json.loads((f.metadata() or {}).get("dtensor", "[]")))
    ordered = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict = {}
    for key, t in load_file(str(opt_file)).items():
        i, name = key.split(".", 1)
        p = ordered[int(i)]
        if key in distributed:
            t = DTensor.from_local(t.to(_local(p).device), p.device_mesh, p.placements, run_check=False,
                                   shape=p.shape, stride=p.stride())
        state.setdefault(int(i), {})[name] = t
    return weights, state
