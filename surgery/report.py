"""Reports: one JSON schema for every command, Markdown beside it, PNG plots; atomic writes.

Schema (stable, like lm-eval-harness results):
    {"tool": {"name", "version"}, "command", "model": {"name", "source", "arch", "params"},
     "config", "results", "timing": {"seconds"}, "created"}
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from . import __version__
from .errors import UsageError


@dataclass
class Report:
    """What an operation returns: the JSON-able data, a Markdown rendering, and the files it wrote."""

    data: dict
    markdown: str = ""
    files: list[Path] = field(default_factory=list)
    exit_code: int = 0  # e.g. 1 when `surgery inspect` finds a tampered file


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def make(command: str, model: dict | None, config: dict, results: dict, seconds: float) -> dict:
    """The shared report dict."""
    return {"tool": {"name": "surgery", "version": __version__}, "command": command, "model": model,
            "config": config, "results": results, "timing": {"seconds": round(seconds, 3)}, "created": now()}


def check_out_dir(out: str | Path | None) -> Path | None:
    """Fail early (before any work) if `out` cannot be written: one line, the fix."""
    if out is None:
        return None
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder path")
    probe = out
    while not probe.exists():
        probe = probe.parent
    try:  # a real probe: permission bits say little to root or on special file systems
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise UsageError(f"--out {out} is not writable ({probe}: {e.strerror}); choose another folder") from None
    return out


def new_out_dir(out: str | Path | None, default: Path, force: bool) -> Path:
    """The output folder (`default` when not given): writable, and not existing unless --force."""
    path = check_out_dir(out) or default
    if path.exists() and not force:
        raise UsageError(f"{path} already exists; pass --force to overwrite it or choose another --out")
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    """Write a file via a temp file + rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def json_text(data) -> str:
    """The report JSON text (tensors and paths made plain)."""
    return json.dumps(data, indent=2, default=_jsonable) + "\n"


def write_json(path: Path, data) -> Path:
    return write_text_atomic(path, json_text(data))


def _jsonable(x):
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def save(report: Report, out: Path | None, stem: str = "report") -> Report:
    """Write DIR/<stem>.json and DIR/<stem>.md (atomically each) when `out` is given."""
    if out is not None:
        report.files += [write_json(out / f"{stem}.json", report.data),
                         write_text_atomic(out / f"{stem}.md", report.markdown.rstrip() + "\n")]
    return report


@contextmanager
def atomic_dir(target: Path, force: bool = False) -> Iterator[Path]:
    """Build a folder in a temp dir beside `target`, then rename it into place; nothing partial survives.

    An existing target needs force=True (it is replaced only after the new one is complete)."""
    target = Path(target)
    if target.exists() and not force:
        raise UsageError(f"{target} already exists; pass --force to overwrite it or choose another --out")
    check_out_dir(target.parent)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp.", dir=target.parent))
    try:
        yield tmp
        tmp.chmod(0o755)
        if target.exists():
            old = target.with_name(f".{target.name}.old.{os.getpid()}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def wilson(k: int, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson score interval for k successes out of n (sane at 0, n and small n); [0, 1] when n = 0.
    The one interval every accuracy in every report uses."""
    if n == 0:
        return [0.0, 1.0]
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return [max(0.0, mid - half), min(1.0, mid + half)]


def md_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub Markdown table; floats printed with 3 decimals."""
    def cell(x):
        return f"{x:.3f}" if isinstance(x, float) else str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def png_bytes(fig, dpi: int = 110) -> bytes:
    """Render a matplotlib figure to PNG bytes (for files written inside an atomic checkpoint folder) and close it."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()
