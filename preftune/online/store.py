"""The run folder of an online run: atomic files and per-iteration manifests.

Every file is written to a temporary name in its folder and renamed into place, so a kill at any
moment leaves either the old file or the new one, never half of one. A phase counts as done only when
the iteration's ``manifest.json`` says so, and the manifest is written after the phase's files; a
resume therefore trusts exactly the phases that finished and redoes the one in progress.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

PHASES = ("sample", "judge", "build", "train", "eval")


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class IterationDir:
    """``iter_NN/``: the phases' files and the manifest that says which phases finished."""

    def __init__(self, root: Path, t: int):
        self.t = t
        self.path = root / f"iter_{t:02d}"
        self.manifest_path = self.path / "manifest.json"

    def manifest(self) -> dict:
        if self.manifest_path.exists():
            return read_json(self.manifest_path)
        return {"t": self.t, "phases": {}}

    def done(self, phase: str) -> bool:
        return phase in self.manifest()["phases"]

    def finish(self, phase: str, info: dict | None = None) -> None:
        m = self.manifest()
        m["phases"][phase] = info or {}
        write_json(self.manifest_path, m)

    def info(self, phase: str) -> dict:
        return self.manifest()["phases"].get(phase, {})

    def complete(self) -> bool:
        return all(self.done(p) for p in PHASES)

    def file(self, name: str) -> Path:
        return self.path / name
