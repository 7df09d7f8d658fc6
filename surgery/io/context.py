"""One run of a command that writes a folder: where it writes (--out / --force), how long each step took, the
command line that made it, and the report it returns.

    run = Run("prune", out, force, default="prune-smollm2-135m")   # refuses an existing folder without --force
    with run.step("load"):
        ...
    run.seconds  # {"load": 3.1, ...}, for the report's timing table


A step logs ONE line to stderr when it finishes (`[prune] load: 3.1s`), never when it starts: an error raised
inside a step is then the only line the user sees.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from surgery.io.loading import home
from surgery.io.report import check_out_dir, new_out_dir


class Run:
    """Output folder, step timing and command line of one command run."""

    def __init__(self, name: str, out: str | Path | None, force: bool, default: str, fresh: bool = True):
        """fresh=False: the command manages an existing folder itself (a resumable sweep); only writability is
        checked here."""
        self.name = name
        self.out: Path = (
            new_out_dir(out, home() / default, force) if fresh else (check_out_dir(out) or home() / default)
        )
        self.force = force
        self.start = time.time()
        self.seconds: dict[str, float] = {}
        self.command = command_line(name)

    @contextmanager
    def step(self, what: str) -> Iterator[None]:
        """Time a step; on success log `[name] what: Ns` to stderr and record it."""
        t0 = time.time()
        yield
        self.seconds[what] = round(time.time() - t0, 1)
        sys.stderr.write(f"[{self.name}] {what}: {self.seconds[what]:.1f}s\n")

    def elapsed(self) -> float:
        return time.time() - self.start


def command_line(name: str) -> str:
    """`surgery NAME ARGS...` as typed when run from the CLI, else `surgery.NAME` (called from Python)."""
    if sys.argv[1:2] == [name]:
        return " ".join(["surgery", name, *sys.argv[2:]])
    return f"surgery.{name} (Python API)"
