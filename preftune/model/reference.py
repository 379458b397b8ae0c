"""Reference log-probs computed once and cached on disk.

The cache key covers everything that changes the numbers: the reference weights (a digest of the
parameters), the exact token ids of every example, and the engine settings that matter. A changed
model, data set or tokenisation therefore misses the cache instead of silently reusing stale values;
the same run again, or another objective on the same data, hits it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from preftune.losses.base import RefStats

CACHE_VERSION = 1


def default_cache_dir() -> Path:
    root = os.environ.get("PREFTUNE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "preftune")
    return Path(root) / "ref"


def model_fingerprint(model: nn.Module) -> str:
    """Digest of the reference weights (adapters excluded: the reference is the base model)."""
    h = hashlib.blake2b(digest_size=16)
    for name, p in sorted(model.state_dict().items()):
        if "lora_" in name:
            continue
        h.update(name.encode())
        t = p.detach()
        if hasattr(t, "full_tensor"):  # a DTensor shard (FSDP2): hash the whole tensor, the same on every process
            t = t.full_tensor()
        t = t.cpu().contiguous()
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def data_fingerprint(examples) -> str:
    h = hashlib.blake2b(digest_size=16)
    for ex in examples:
        h.update(json.dumps([ex.prompt_ids, ex.response_ids]).encode())
    return h.hexdigest()


class ReferenceCache:
    """Per-example reference token log-probs: ``flat`` (all tokens) + ``offsets`` per (example, k)."""

    def __init__(self, token_logps: list[list[torch.Tensor]]):
        self.token_logps = token_logps

    def batch(self, indices: list[int], K: int, need_tokens: bool, device=None) -> RefStats:
        B = len(indices)
        logps = torch.zeros(B, K)
        T = max((len(t) for i in indices for t in self.token_logps[i]), default=1)
        tok = torch.zeros(B, K, max(T, 1)) if need_tokens else None
        for b, i in enumerate(indices):
            for k, t in enumerate(self.token_logps[i]):
                logps[b, k] = t.sum()
                if need_tokens and len(t):
                    tok[b, k, : len(t)] = t
        if device is not None:
            logps = logps.to(device)
            tok = tok.to(device) if tok is not None else None
        return RefStats(logps, tok)

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        flat = [t for per_ex in self.token_logps for t in per_ex]
        counts = torch.tensor([len(per_ex) for per_ex in self.token_logps], dtype=torch.long)
        lens = torch.tensor([len(t) for t in flat], dtype=torch.long)
        data = torch.cat(flat) if flat else torch.zeros(0)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        save_file({"data": data.float().contiguous(), "lens": lens, "counts": counts}, tmp)
        os.replace(tmp, path)  # atomic: a reader never sees half a file

    @classmethod
    def load(cls, path: Path) -> ReferenceCache:
        from safetensors.torch import load_file

        t = load_file(str(path))
        pieces = list(torch.split(t["data"], t["lens"].tolist()))
        out, pos = [], 0
        for c in t["counts"].tolist():
            out.append(pieces[pos : pos + c])
            pos += c
        return cls(out)


def cache_key(model_fp: str, data_fp: str, settings: dict) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps({"v": CACHE_VERSION, "m": model_fp, "d": data_fp, "s": settings}, sort_keys=True).encode())
    return h.hexdigest()
