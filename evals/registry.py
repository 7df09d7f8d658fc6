"""ONE registry of tasks: the place a task is added, built-in or a user's.

A task has a name and any of three faces:
- `cases()`: its rows as a `datasets.Dataset` of prompt, target, group, split (what `--data NAME` reads, so every
  command that takes a user's cases takes the task too);
- `pairs()`: contrast pairs prompt_a, prompt_b, target, group, split (what `--pairs NAME` reads);
- `suite(loaded, options) -> results` and `lines(results) -> list[str]`: its own scoring (what
  `surgery eval --task NAME` runs), stored under `key` in the report.
The built-in tasks register themselves at the end of their module in this folder (arithmetic.py, gender_bias.py,
perplexity.py); the package imports every module here, so a new file is found without touching any other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from datasets import Dataset

from surgery.errors import UsageError


@dataclass(frozen=True)
class EvalOptions:
    """The `surgery eval` options a suite receives (each reads what it needs)."""

    digits: tuple[int, ...]
    ops: tuple[str, ...]
    templates: tuple[str, ...]
    limit: int | None
    batch_size: int
    seed: int


@dataclass(frozen=True)
class Task:
    name: str
    cases: Callable[[], Dataset] | None = None
    pairs: Callable[[], Dataset] | None = None
    suite: Callable[[object, EvalOptions], dict] | None = None
    lines: Callable[[dict], list[str]] | None = None
    key: str | None = None  # where `suite`'s results go in a report (default: the name)

    @property
    def result_key(self) -> str:
        return self.key or self.name


TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    """Add a task (refuses a name already taken: pick another name rather than shadow a built-in)."""
    if task.name in TASKS:
        raise ValueError(f"a task named {task.name!r} is already registered")
    if task.suite is not None and task.lines is None:
        raise ValueError(f"task {task.name!r}: a suite needs `lines` to print its results")
    TASKS[task.name] = task
    return task


def names(face: str) -> list[str]:
    """Names of the tasks that have `face` ("cases", "pairs" or "suite")."""
    return [n for n, t in TASKS.items() if getattr(t, face) is not None]


def get(name: str, face: str) -> Task:
    """The task `name`, which must have `face`; else one line naming the ones that do."""
    task = TASKS.get(name)
    if task is None or getattr(task, face) is None:
        what = {"cases": "cases", "pairs": "contrast pairs", "suite": "an eval suite"}[face]
        raise UsageError(f"unknown task {name!r} (with {what}); use one of {', '.join(names(face))} or a data file")
    return task
