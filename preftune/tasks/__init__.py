"""preftune.tasks: built-in tasks with programmatic judges (the demo and the benchmarks use them)."""

from preftune.tasks.base import Judgement, Task, all_tasks, get_task, prompt_text, register, word_count
from preftune.tasks.sandbox import Limits, RunResult, Sandbox, SandboxUnavailable, run_python

__all__ = ["Judgement", "Limits", "RunResult", "Sandbox", "SandboxUnavailable", "Task", "all_tasks", "get_task",
           "prompt_text", "register", "run_python", "word_count"]
