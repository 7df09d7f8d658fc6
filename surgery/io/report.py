"""Reports: one JSON schema for every command, Markdown beside it, PNG plots; atomic writes.

Schema (stable, like lm-eval-harness results):
    {"tool": {"name", "version"}, "command", "model": {"name", "source", "arch", "params"},
     "config", "results", "timing": {"seconds"}, "created"}
"""

from __future__ import annotations

import ctypes
import ctypes.util
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

from surgery import __version__
from surgery.errors import UsageError


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
    return {
        "tool": {"name": "surgery", "version": __version__},
        "command": command,
        "model": model,
        "config": config,
        "results": results,
        "timing": {"seconds": round(seconds, 3)},
        "created": now(),
    }


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
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a report is an ordinary file (0644 usually)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def json_text(data) -> str:
    """The report JSON text (tensors and paths made plain)."""
    return json.dumps(data, indent=2, default=_jsonable) + "\n"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
        report.files += [
            write_json(out / f"{stem}.json", report.data),
            write_text_atomic(out / f"{stem}.md", report.markdown.rstrip() + "\n"),
        ]
    return report


@contextmanager
def atomic_dir(target: Path, force: bool = False) -> Iterator[Path]:
    """Build a folder in a temp dir beside `target`, then rename it into place; nothing partial survives.

    The temp dir is `.NAME.tmp.PID.*`: leftovers of the same target whose writer died (kill -9) are removed on
    the next run. An existing target needs force=True and is replaced only after the new one is complete, by an
    atomic exchange (Linux renameat2 RENAME_EXCHANGE) so the name always holds a complete folder; where that is
    unavailable, by two renames via `.NAME.old.PID`, and a next run puts back an old folder that a kill left
    between them."""
    target = Path(target)
    recover_stale(target)
    if target.exists() and not force:
        raise UsageError(f"{target} already exists; pass --force to overwrite it or choose another --out")
    check_out_dir(target.parent)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp.{os.getpid()}.", dir=target.parent))
    try:
        yield tmp
        tmp.chmod(0o777 & ~_umask())
        if not target.exists():
            os.rename(tmp, target)
        elif _exchange(tmp, target):
            pass  # tmp now holds the old folder; removed below
        else:
            old = target.with_name(f".{target.name}.old.{os.getpid()}")
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (renameat2 RENAME_EXCHANGE); False where the C library or file system cannot."""
    fn = getattr(_libc(), "renameat2", None) if _libc() is not None else None
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


_LIBC: list = []


def _libc():
    if not _LIBC:
        try:
            _LIBC.append(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True))
        except OSError:
            _LIBC.append(None)
    return _LIBC[0]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _stale(target: Path, kind: str) -> list[Path]:
    """`.NAME.<kind>.PID[.*]` siblings of `target` whose writer process is gone."""
    prefix = f".{target.name}.{kind}."
    out = []
    if not target.parent.is_dir():
        return out
    for p in target.parent.iterdir():
        if p.name.startswith(prefix):
            pid = p.name[len(prefix) :].split(".", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                out.append(p)
    return out


def recover_stale(target: Path) -> None:
    """Clean up after a writer of `target` that was killed: put back an old folder a --force replacement had moved
    aside if the name is empty, delete the rest (old folders and half-built temp folders)."""
    for old in sorted(_stale(target, "old")):
        if not target.exists():
            os.rename(old, target)
        else:
            shutil.rmtree(old, ignore_errors=True)
    for tmp in _stale(target, "tmp"):
        shutil.rmtree(tmp, ignore_errors=True)


def git_commit() -> str | None:
    """The short git commit of the surgery source tree a result was computed with (None outside a git checkout)."""
    import subprocess

    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


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


def mcnemar(before: Sequence[bool], after: Sequence[bool]) -> dict:
    """Paired accuracy change on the same items: exact two-sided McNemar p-value (binomial on the discordant
    items), the change and its 95% paired normal interval."""
    n = len(before)
    lost = sum(b and not a for b, a in zip(before, after))
    gained = sum(a and not b for b, a in zip(before, after))
    k, m = min(lost, gained), lost + gained
    p = min(1.0, 2 * sum(math.comb(m, i) for i in range(k + 1)) / 2**m) if m else 1.0
    d = [float(a) - float(b) for b, a in zip(before, after)]
    mean = sum(d) / n if n else 0.0
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) if n > 1 else 0.0
    half = 1.96 * sd / math.sqrt(n) if n else 0.0
    return {
        "n": n,
        "acc_before": sum(before) / n if n else 0.0,
        "acc_after": sum(after) / n if n else 0.0,
        "change": mean,
        "change_ci95": [mean - half, mean + half],
        "lost": lost,
        "gained": gained,
        "p_value": p,
    }


def md_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub Markdown table; floats printed with 3 decimals."""

    def cell(x):
        return f"{x:.3f}" if isinstance(x, float) else str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (imported when a plot is drawn, not before)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig, dpi: int = 110) -> bytes:
    """Render a matplotlib figure to PNG bytes (for files written inside an atomic checkpoint folder) and close it."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()
