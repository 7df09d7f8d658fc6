"""Evaluation suites and user tasks (shipped as surgery.evals). Every module of this folder is imported here, so
a task that registers itself (`registry.register(Task(...))` at the end of its module) needs no other edit."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
