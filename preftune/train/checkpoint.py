"""Checkpoints: trainable weights, optimizer, scheduler, RNG of every process, objective state and
the position in the data. Written to a temporary folder and renamed, so a crash mid-write never
leaves a checkpoint that looks complete; only the last ``keep`` are kept."""

from __future__ import annotations

import json
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
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


def load_checkpoint(path: Path, *, model, optimizer, scheduler, loss_state, process_index: int) -> dict:
    from safetensors.torch import load_file

    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise ValueError(
            f"{path}: checkpoint has parameters the model lacks (different model or LoRA settings?): {missing[:3]}"
        )
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t)
    opt = torch.load(path / "optim.pt", weights_only=False)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    if loss_state is not None and opt.get("loss_state") is not None:
        loss_state.load_state_dict(opt["loss_state"])
    rng_file = path / f"rng_{process_index}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((path / "trainer_state.json").read_text())
