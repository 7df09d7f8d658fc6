"""The verbs. Each is one package, surgery/commands/<verb>/: its `__init__.py` declares `COMMAND` (the options,
once, and the docstring `--help` shows) and its `job.py` does the work, returning a `Report`.

`register(Command(...))` adds a verb from outside the package (the CLI lists it with the built-in ones). A verb's
job may import anything below it (find, edits, io, model, evals) but never another verb.
"""

from __future__ import annotations

import importlib

from surgery.commands.spec import Command

BUILTIN = (
    "eval",
    "heads",
    "cna",
    "prune",
    "debias",
    "edit",
    "lora-sweep",
    "finetune",
    "circuit",
    "heuristics",
    "inspect",
    "diff",
)
_ADDED: dict[str, Command] = {}


def register(command: Command) -> Command:
    """Add a verb (refuses a name already taken)."""
    if command.name in BUILTIN or command.name in _ADDED:
        raise ValueError(f"a command named {command.name!r} already exists")
    _ADDED[command.name] = command
    return command


def names() -> list[str]:
    return [*BUILTIN, *_ADDED]


def get(name: str) -> Command:
    """The declaration of verb `name` (a built-in one is imported from its package: no torch)."""
    if name in _ADDED:
        return _ADDED[name]
    if name not in BUILTIN:
        raise KeyError(name)
    return importlib.import_module(f"surgery.commands.{name.replace('-', '_')}").COMMAND
