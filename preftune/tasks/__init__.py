"""preftune.tasks: built-in tasks with programmatic judges (the demo and the benchmarks use them)."""

from preftune.tasks.base import Judgement, Task, all_tasks, get_task, prompt_text, register, word_count

__all__ = ["Judgement", "Task", "all_tasks", "get_task", "prompt_text", "register", "word_count"]
