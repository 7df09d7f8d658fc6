"""The state files commands read back from earlier runs (circuit.json, circuit.run.json, heads.json, sweep.json,
component lists), each checked by one reader here: a file that is missing, not UTF-8, not JSON, or not the
expected shape (a key missing or of another type) is one UsageError line naming the file, the defect and what to
do, never a traceback.

    fp = read_sweep(out / "sweep.json")                     # a prune sweep folder's resume key
    saved = read_circuit_run(out / "circuit.run.json")      # an unfinished circuit run's configuration
    data = read_circuit(folder)                             # FOLDER/circuit.json (model, circuit sections)
    check_circuit_study(data, folder)                       # + what heuristics reads (config, results.per_op)
    kind, data = read_components(path)                      # a --components file: "heads" or "circuit"
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from surgery.errors import UsageError

CIRCUIT_FIX = "pass a folder written by `surgery circuit --out`"
COMPONENTS_FIX = "give a heads.json (`surgery heads`), a circuit.json (`surgery circuit`) or a list like 14.2,mlp.20"
CIRCUIT_MODEL = {"name": "a string", "source": "a string", "n_layers": "an integer", "n_heads": "an integer"}
TYPES = {"an object": dict, "a list": list, "a string": str, "an integer": int, "a number": (int, float)}


def read_json(path: str | Path, fix: str, kind: str = "an object"):
    """The parsed JSON of `path`, or one UsageError line: missing, unreadable, not UTF-8, not JSON, or a top level
    that is not `kind`. `fix` says what to do instead."""
    f = Path(path)
    if not f.is_file():
        raise UsageError(f"{f} does not exist; {fix}")
    try:
        text = f.read_bytes().decode("utf-8")
    except OSError as e:
        raise UsageError(f"cannot read {f} ({e.strerror}); {fix}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{f} is not UTF-8 text, so not JSON; {fix}") from None
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        where = f" ({e.msg} at line {e.lineno})" if isinstance(e, json.JSONDecodeError) else ""
        raise UsageError(f"{f} is not valid JSON{where}; {fix}") from None
    if not _is(data, kind):
        raise UsageError(f"{f} holds {_kind(data)}, not {kind}; {fix}")
    return data


def _is(v, kind: str) -> bool:
    return not isinstance(v, bool) and isinstance(v, TYPES[kind])


def _kind(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    return next((k for k, t in TYPES.items() if isinstance(v, t)), type(v).__name__)


def _get(d: dict, key: str, kind: str, f: Path, fix: str, at: str = "", required: bool = True):
    """d[key] checked to be `kind` (None when absent and not required); `at` is d's dotted place in the file."""
    if key not in d:
        if required:
            raise UsageError(f"{f} lacks {at}{key} ({kind}); {fix}")
        return None
    v = d[key]
    if not _is(v, kind):
        raise UsageError(f"{f}: {at}{key} is {_kind(v)}, not {kind}; {fix}")
    return v


def _items(v: list, kind: str, f: Path, fix: str, at: str) -> list:
    for i, x in enumerate(v):
        if not _is(x, kind):
            raise UsageError(f"{f}: {at}[{i}] is {_kind(x)}, not {kind}; {fix}")
    return v


# ---- prune sweep / circuit run folders ----------------------------------------------------------------------------
def read_sweep(path: str | Path) -> dict:
    """The fingerprint (resume key) in a prune sweep folder's sweep.json."""
    f, fix = Path(path), "delete that folder or pass --force to start it over"
    return _get(read_json(f, fix), "fingerprint", "an object", f, fix)


def read_circuit_run(path: str | Path) -> dict:
    """The configuration in an unfinished circuit run's circuit.run.json."""
    return read_json(path, "pass --force to start that folder over, or choose another --out")


# ---- circuit.json ---------------------------------------------------------------------------------------------
def read_circuit(path: str | Path) -> dict:
    """A circuit folder's circuit.json: its model (name, source, n_layers, n_heads) and, when present, its circuit
    section (heads "L.H", MLP layers), checked."""
    f = Path(path) / "circuit.json"
    if not f.is_file():
        raise UsageError(f"{path} has no circuit.json; {CIRCUIT_FIX}")
    data = read_json(f, CIRCUIT_FIX)
    model = _get(data, "model", "an object", f, CIRCUIT_FIX)
    for key, kind in CIRCUIT_MODEL.items():
        _get(model, key, kind, f, CIRCUIT_FIX, "model.")
    _circuit_section(data, f, CIRCUIT_FIX)
    return data


def check_circuit_study(data: dict, path: str | Path) -> None:
    """What `surgery heuristics` reads besides the model: config (ops, operands, template, seed, score) and per
    operator the neurons of results.per_op."""
    f, fix = Path(path) / "circuit.json", CIRCUIT_FIX
    cfg = _get(data, "config", "an object", f, fix)
    ops = _items(_get(cfg, "ops", "a list", f, fix, "config."), "a string", f, fix, "config.ops")
    if not ops:
        raise UsageError(f"{f}: config.ops is empty; {fix}")
    operands = _items(_get(cfg, "operands", "a list", f, fix, "config."), "an integer", f, fix, "config.operands")
    if len(operands) != 2:
        raise UsageError(f"{f}: config.operands has {len(operands)} entries, not 2 (LO, HI); {fix}")
    _get(cfg, "template", "a string", f, fix, "config.")
    _get(cfg, "seed", "an integer", f, fix, "config.")
    _get(cfg, "score", "a string", f, fix, "config.", required=False)
    per_op = _get(_get(data, "results", "an object", f, fix), "per_op", "an object", f, fix, "results.")
    for op in ops:
        at = f"results.per_op.{op}."
        neurons = _get(_get(per_op, op, "an object", f, fix, "results.per_op."), "neurons", "an object", f, fix, at)
        for layer in neurons:
            if not layer.isdigit():
                raise UsageError(f"{f}: {at}neurons has key {layer!r}, not a layer number; {fix}")
            _get(neurons, layer, "a list", f, fix, f"{at}neurons.")
            _items(neurons[layer], "an integer", f, fix, f"{at}neurons.{layer}")


def _circuit_section(data: dict, f: Path, fix: str, required: bool = False) -> dict | None:
    """The "circuit" section: heads as "L.H" strings, mlps as layer numbers (both optional)."""
    c = _get(data, "circuit", "an object", f, fix, required=required)
    if c is None:
        return None
    heads = _items(_get(c, "heads", "a list", f, fix, "circuit.", False) or [], "a string", f, fix, "circuit.heads")
    bad = next((h for h in heads if not re.fullmatch(r"\d+\.\d+", h)), None)
    if bad is not None:
        raise UsageError(f"{f}: circuit.heads has {bad!r}, not LAYER.HEAD (e.g. 14.2); {fix}")
    _items(_get(c, "mlps", "a list", f, fix, "circuit.", False) or [], "an integer", f, fix, "circuit.mlps")
    return c


# ---- heads.json and --components files ----------------------------------------------------------------------------
def _heads_section(data: dict, f: Path, fix: str) -> list:
    """results.heads of a heads.json: rows with layer and head, and effect (path patching) or drop.overall."""
    path_patch = (data.get("config") or {}).get("method") == "path-patch"
    res = _get(data, "results", "an object", f, fix)
    rows = _items(_get(res, "heads", "a list", f, fix, "results."), "an object", f, fix, "results.heads")
    for i, row in enumerate(rows):
        at = f"results.heads[{i}]."
        _get(row, "layer", "an integer", f, fix, at)
        _get(row, "head", "an integer", f, fix, at)
        if path_patch:
            _get(row, "effect", "a number", f, fix, at)
        else:
            _get(_get(row, "drop", "an object", f, fix, at), "overall", "a number", f, fix, f"{at}drop.")
            _get(row, "logprob_drop", "a number", f, fix, at, required=False)
    shape = _get(res, "shape", "an object", f, fix, "results.", required=False) or {}
    for key in ("layers", "heads"):
        _get(shape, key, "an integer", f, fix, "results.shape.", required=False)
    return rows


def read_components(path: str | Path) -> tuple[str, dict]:
    """A --components file: ("circuit", circuit.json) or ("heads", heads.json of either method), checked."""
    f, fix = Path(path), COMPONENTS_FIX
    data = read_json(f, fix)
    for section in ("model", "config"):
        _get(data, section, "an object", f, fix, required=False)
    model = data.get("model") or {}
    for key in ("name", "arch"):
        _get(model, key, "a string", f, fix, "model.", required=False)
    if isinstance(data.get("circuit"), dict):
        for key in ("n_layers", "n_heads"):
            _get(model, key, "an integer", f, fix, "model.", required=False)
        _circuit_section(data, f, fix, required=True)
        return "circuit", data
    if isinstance(data.get("results"), dict) and "heads" in data["results"]:
        _get(data.get("config") or {}, "method", "a string", f, fix, "config.", required=False)
        _heads_section(data, f, fix)
        return "heads", data
    raise UsageError(f"{f} is neither a heads.json (surgery heads) nor a circuit.json (surgery circuit); {fix}")
