"""Run by test_online_distributed.py: ``preftune online`` (the arguments after the first), each process
recording in ``<first argument>.<rank>`` every file it writes (opened for writing, or renamed into place),
with the task ``tiny_letters`` of test_online_loop.py registered (a judge a random tiny model gets varied
scores from)."""

import builtins
import io
import os
import sys
from pathlib import Path


def _prompts(n, offset=0):
    return [[{"role": "user", "content": f"Say something about item {i}."}] for i in range(offset, offset + n)]


def _letters(prompt, response, finished=True):
    from preftune.tasks import Judgement

    letters = [c for c in response.lower() if c.isalpha()]
    s = sum(c == "e" for c in letters) / len(letters) if letters else 0.0
    return Judgement(s, s > 0.1, {"letters": len(letters)})


def main(log: str, args: list[str]) -> None:
    from preftune.tasks import Task, register

    register(Task("tiny_letters", "test task", lambda: _prompts(40), lambda: _prompts(6, 100), _letters))
    record = Path(f"{log}.{os.environ.get('RANK', '0')}")
    real_replace, real_open = os.replace, io.open

    def note(path) -> None:
        if not Path(path).name.startswith("."):  # temporary names are not files of the run
            with real_open(record, "a", encoding="utf-8") as f:
                f.write(f"{Path(path).resolve()}\n")

    def replace(src, dst, *a, **kw):
        real_replace(src, dst, *a, **kw)
        note(dst)

    def open_(file, mode="r", *a, **kw):
        if isinstance(file, (str, os.PathLike)) and any(m in mode for m in "wax+"):
            note(file)
        return real_open(file, mode, *a, **kw)

    os.replace = replace
    io.open = builtins.open = open_
    from preftune.cli import main as cli

    sys.argv = ["preftune", *args]
    cli()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
    from preftune.train.distributed import end_launch

    end_launch(0)  # as the CLI ends a launched process (a teardown abort would fail the launch)
