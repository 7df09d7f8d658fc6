"""The state files commands read back from earlier runs (circuit.json, circuit.run.json, heads.json, sweep.json,
component lists), each checked by one reader here: a file that is missing, not JSON, or not the expected shape
is one UsageError line naming the file and the defect, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

from surgery.errors import UsageError


def read_circuit(path: str | Path) -> dict:
    """A circuit folder's circuit.json, with a clear error when it is not one."""
    f = Path(path) / "circuit.json"
    if not f.is_file():
        raise UsageError(f"{path} has no circuit.json; pass a folder written by `surgery circuit --out`")
    return json.loads(f.read_text())
