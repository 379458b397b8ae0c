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
) -> Path:
    from safetensors.torch import save_file

    final = ckpt_root / f"{PREFIX}{step:07d}"
    tmp = ckpt_root / f".tmp-{PREFIX}{step:07d}"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    wait()
    torch.save(rng_state(), tmp / f"rng_{process_index}.pt")
    if is_main:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
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


def load_checkpoint(path: Path, *, model, optimizer, scheduler, loss_state, process_index: int) -> dict:
    """Restore a checkpoint into the run; returns its trainer state. Every file is read (and refused
    if unsafe) before anything in the run changes."""
    from safetensors.torch import load_file

    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise ValueError(
            f"{path}: checkpoint has parameters the model lacks (different model or LoRA settings?): {missing[:3]}"
        )
    opt = load_restricted(path / "optim.pt")
    rng_file = path / f"rng_{process_index}.pt"
    rng = load_restricted(rng_file) if rng_file.exists() else None
    state = read_trainer_state(path)
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    if loss_state is not None and opt.get("loss_state") is not None:
        loss_state.load_state_dict(opt["loss_state"])
    if rng is not None:
        set_rng_state(rng)
    return state
