"""The verbs. Each is one package, surgery/commands/<verb>/: its `__init__.py` declares `COMMAND` (the options,
once, and the docstring `--help` shows) and its `job.py` does the work, returning a `Report`.

`register(Command(...))` adds a verb from outside the package (the CLI lists it with the built-in ones); an
installed package makes its verbs, selectors, tasks or architectures known to the CLI by naming a module in the
entry-point group "surgery.plugins" (imported before the command line is parsed; it calls the registers). A
verb's job may import anything below it (find, edits, io, model, evals) but never another verb.
"""

from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points

from surgery.commands.spec import Command

# the order `surgery --help` lists the verbs in; a verb package not named here is found all the same (listed after)
ORDER = (
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
    "export",
    "inspect",
    "diff",
)
BUILTIN = tuple(
    sorted(
        (m.name.replace("_", "-") for m in pkgutil.iter_modules(__path__) if m.ispkg),
        key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n),
    )
)
_ADDED: dict[str, Command] = {}


def register(command: Command) -> Command:
    """Add a verb (refuses a name already taken)."""
    if command.name in BUILTIN or command.name in _ADDED:
        raise ValueError(f"a command named {command.name!r} already exists")
    _ADDED[command.name] = command
    return command


def unregister(name: str) -> None:
    """Remove a verb added with `register` (built-in verbs stay)."""
    _ADDED.pop(name, None)


def names() -> list[str]:
    return [*BUILTIN, *_ADDED]


def get(name: str) -> Command:
    """The declaration of verb `name` (a built-in one is imported from its package: no torch)."""
    if name in _ADDED:
        return _ADDED[name]
    if name not in BUILTIN:
        raise KeyError(name)
    return importlib.import_module(f"surgery.commands.{name.replace('-', '_')}").COMMAND


def load_plugins() -> list[str]:
    """Import every module named in the "surgery.plugins" entry-point group (each registers what it adds)."""
    loaded = []
    for ep in entry_points(group="surgery.plugins"):
        ep.load()
        loaded.append(ep.name)
    return loaded
