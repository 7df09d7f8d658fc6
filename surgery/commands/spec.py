"""How a verb is declared: its options (once, here, with their defaults and checks) and the job that runs it.

This module and every verb's `__init__.py` import no torch, transformers or peft, so `surgery --help` and
`surgery VERB --help` answer at once; the job module is imported only when the verb runs.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Option:
    """One command-line option: argparse's flags and settings, and the keyword argument it fills."""

    flags: tuple[str, ...]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def dest(self) -> str:
        if "dest" in self.settings:
            return self.settings["dest"]
        long = next((f for f in self.flags if f.startswith("--")), self.flags[0])
        return long.lstrip("-").replace("-", "_")

    @property
    def default(self) -> Any:
        if self.settings.get("action") == "store_true":
            return self.settings.get("default", False)
        if self.settings.get("action") == "store_false":
            return self.settings.get("default", True)
        return self.settings.get("default")

    @property
    def required(self) -> bool:
        return self.settings.get("required", False) or not self.flags[0].startswith("-")


def option(*flags: str, **settings: Any) -> Option:
    return Option(tuple(flags), settings)


@dataclass(frozen=True)
class Command:
    """A verb: `name`, its documentation (first line = the one-line purpose in `surgery --help`), its options,
    and its job: a function taking every option as a keyword argument and returning a `Report`, given as the
    function itself or as "module:function" (imported when the verb runs)."""

    name: str
    doc: str
    options: Sequence[Option]
    job: Callable[..., Any] | str

    @property
    def summary(self) -> str:
        return self.doc.strip().splitlines()[0].rstrip(".") if self.doc.strip() else ""

    def defaults(self) -> dict[str, Any]:
        return {o.dest: copy.copy(o.default) for o in self.options if not o.required}

    def function(self) -> Callable[..., Any]:
        if callable(self.job):
            return self.job
        module, name = self.job.split(":")
        return getattr(importlib.import_module(module), name)

    def run(self, **values: Any) -> Any:
        """Run the job from Python with the declared defaults for every option not given."""
        known = {o.dest for o in self.options}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TypeError(f"surgery {self.name}: unknown option(s) {', '.join(unknown)}")
        missing = sorted(o.dest for o in self.options if o.required and o.dest not in values)
        if missing:
            raise TypeError(f"surgery {self.name}: missing required option(s) {', '.join(missing)}")
        return self.function()(**{**self.defaults(), **values})

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        for o in self.options:
            parser.add_argument(*o.flags, **o.settings)


# ---- value parsers: turn one option string into a typed value, or fail with one line ---------------------
def text(s: str) -> str:
    """A non-blank string (an empty --prompt or --target is a mistake, not a request for the default)."""
    if not s.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return s


def strs(s: str) -> tuple[str, ...]:
    """'a, b' -> ('a', 'b'); at least one item."""
    out = tuple(x.strip() for x in s.split(",") if x.strip())
    if not out:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {s!r}")
    return out


def ints(s: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in strs(s))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def heads(s: str) -> tuple[tuple[int, int], ...]:
    """'17.4,20.1' -> ((17, 4), (20, 1))."""
    try:
        return tuple((int(a), int(b)) for a, b in (x.split(".") for x in strs(s)))
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"expected heads as LAYER.HEAD[,LAYER.HEAD], got {s!r}") from None


def positive(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})


def memory_caps(s: str) -> dict[str | int, int]:
    """'cpu=8GiB' or '8GiB' (the CPU) or '0=20GiB,cpu=64GiB' (GPU 0 and the CPU) -> bytes per device, the
    `max_memory` accelerate's device_map="auto" takes (what exceeds every cap goes to disk)."""
    caps: dict[str | int, int] = {}
    for part in strs(s):
        dev, _, size = part.rpartition("=")
        dev = dev.strip().lower() or "cpu"
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", size)
        if not (dev in ("cpu", "mps") or dev.isdigit()) or m is None or m.group(2).lower() not in _UNITS:
            raise argparse.ArgumentTypeError(
                f"cannot read {part!r}; write DEVICE=SIZE pairs such as cpu=8GiB or 0=20GiB,cpu=64GiB"
            )
        bytes_ = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
        if bytes_ <= 0:
            raise argparse.ArgumentTypeError(f"{part!r} gives no memory; a cap must be above 0")
        caps[int(dev) if dev.isdigit() else dev] = bytes_
    if not caps:
        raise argparse.ArgumentTypeError("expected DEVICE=SIZE pairs such as cpu=8GiB")
    return caps


def registered(kind: str) -> Callable[[str], str]:
    """A selector name of `kind`, checked against the selector registry when the command line is parsed (the
    registry is imported then, not when the help is printed)."""

    def check(s: str) -> str:
        from surgery.find import selectors

        if s not in selectors.names(kind):
            raise argparse.ArgumentTypeError(f"unknown selector {s!r}; use one of {', '.join(selectors.names(kind))}")
        return s

    check.__name__ = f"{kind} selector"
    return check


# ---- shared option groups -----------------------------------------------------------------------------
TASK_SELECTORS = "cna | random | magnitude | activation | taylor | total-effect | wanda | flap"
CONTRAST_SELECTORS = "cna | cna-specific | activation-diff | random"

MODEL = [
    option("--model", default="smollm2-135m", help="registry name, local HF folder, or hub id"),
    option("--dtype", default="float32", help="float32 | bfloat16 | float16"),
    option("--device", default="cpu", help="cpu | cuda | auto (accelerate device_map for big models)"),
    option(
        "--trust-remote-code",
        action="store_true",
        help="run the model folder's own Python code (auto_map); "
        "only for authors you trust (surgery's own sliced checkpoints need no flag)",
    ),
]
OFFLOAD = [  # read-only commands: offloaded weights stream in per layer and cannot be edited or trained
    option(
        "--max-memory",
        type=memory_caps,
        default=None,
        help="with --device auto: memory per device, e.g. cpu=8GiB or 0=20GiB,cpu=64GiB; "
        "the rest of the model is offloaded to disk and streamed in layer by layer",
    ),
]
TASK = [
    option("--task", default="arithmetic", help="arithmetic | gender-bias | perplexity (or any registered task)"),
    option("--digits", type=ints, default=(1,), help="digit counts, e.g. 1,2"),
    option("--ops", type=strs, default=None, help="operations, e.g. +,-,*,/ (default all)"),
    option("--templates", type=strs, default=None, help="prompt templates: plain,calculate,words,question"),
    option("--limit", type=int, default=None, help="at most N problems (quick runs)"),
    option("--batch-size", type=positive, default=64),
    option("--seed", type=int, default=0),
]
DATA = [
    option(
        "--data",
        default=None,
        help="your cases: .jsonl/.csv/.parquet or a datasets folder (columns prompt, "
        "target, optional group, split); or a built-in task name",
    ),
    option("--columns", default=None, help="map your column names: prompt=question,target=answer"),
]
OUT = [option("--out", default=None, help="output folder for report.json / report.md / plots")]
FORCE = [option("--force", action="store_true", help="overwrite an existing output folder")]
EXPORT = [
    option(
        "--export",
        default=None,
        help="also write the checkpoint for a runtime, into the same folder: gguf[:TYPE] (llama.cpp; TYPE f32 | "
        "f16 | bf16 | q8_0 | q4_0, default f32)",
    )
]
RECIPE = [
    option("--quick", action="store_true", help="the recipe's quick profile (CPU-sized smoke run)"),
    option("--profile", default=None, help="a named profile of the recipe (e.g. cpu); --quick = --profile quick"),
    option(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any recipe field, e.g. --set lora.rank=8 (repeatable)",
    ),
]
