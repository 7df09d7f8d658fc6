"""surgery/io/state.py: every state file a command reads back is checked by one reader, and every defect (missing,
not UTF-8, not JSON, wrong top level, a key missing or of another type) is one UsageError line naming the file,
the defect and the fix."""

from __future__ import annotations

import json

import pytest

from surgery.errors import UsageError
from surgery.io import state

HEADS = {
    "model": {"name": "tiny", "arch": "llama"},
    "config": {"ablation": "zero"},
    "results": {"shape": {"layers": 3, "heads": 4}, "heads": [{"layer": 0, "head": 1, "drop": {"overall": 0.1}}]},
}
CIRCUIT = {
    "model": {"name": "tiny", "source": "/m", "n_layers": 3, "n_heads": 4},
    "config": {"ops": ["+"], "operands": [0, 9], "template": "calculate", "seed": 0},
    "results": {"per_op": {"+": {"neurons": {"1": [3, 4]}}}},
    "circuit": {"heads": ["2.1"], "mlps": [0, 1]},
}


def _write(path, content):
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    return path


def _one_line(exc: pytest.ExceptionInfo, *phrases: str) -> None:
    msg = str(exc.value)
    assert "\n" not in msg and all(p in msg for p in phrases), msg


@pytest.mark.parametrize(
    "content, phrase",
    [
        (None, "does not exist"),
        (b"\xff\xfe\x00", "is not UTF-8 text"),
        (b"", "is not valid JSON"),
        (b'{"a": }', "is not valid JSON"),
        (b"[" * 100_000, "is not valid JSON"),
        (b"[]", "holds a list, not an object"),
        (b"null", "holds null, not an object"),
        (b'"text"', "holds a string, not an object"),
    ],
)
def test_read_json_defects(content, phrase, tmp_path):
    f = tmp_path / "x.json"
    if content is not None:
        f.write_bytes(content)
    with pytest.raises(UsageError) as e:
        state.read_json(f, "do this")
    _one_line(e, str(f), phrase, "; do this")


def test_read_sweep(tmp_path):
    f = _write(tmp_path / "sweep.json", {"fingerprint": {"model": "m"}})
    assert state.read_sweep(f) == {"model": "m"}
    for content, phrase in [({}, "lacks fingerprint (an object)"), ({"fingerprint": 3}, "fingerprint is an integer")]:
        with pytest.raises(UsageError) as e:
            state.read_sweep(_write(f, content))
        _one_line(e, "sweep.json", phrase, "--force")


def test_read_circuit_run(tmp_path):
    f = _write(tmp_path / "circuit.run.json", {"model": "m"})
    assert state.read_circuit_run(f) == {"model": "m"}
    with pytest.raises(UsageError) as e:
        state.read_circuit_run(_write(f, [1]))
    _one_line(e, "circuit.run.json holds a list", "--force")


def _change(data: dict, where: str, value) -> dict:
    data = json.loads(json.dumps(data))
    *parents, key = (int(k) if k.isdigit() else k for k in where.split("."))
    d = data
    for k in parents:
        d = d[k]
    if value is KeyError:
        del d[key]
    else:
        d[key] = value
    return data


def test_read_circuit_and_its_study(tmp_path):
    _write(tmp_path / "circuit.json", CIRCUIT)
    data = state.read_circuit(tmp_path)
    state.check_circuit_study(data, tmp_path)
    with pytest.raises(UsageError) as e:
        state.read_circuit(tmp_path / "nothing")
    _one_line(e, "has no circuit.json", "surgery circuit --out")


@pytest.mark.parametrize(
    "where, value, phrase",
    [
        ("model", KeyError, "lacks model (an object)"),
        ("model.source", KeyError, "lacks model.source (a string)"),
        ("model.n_heads", True, "model.n_heads is a boolean, not an integer"),
        ("circuit", [], "circuit is a list, not an object"),
        ("circuit.heads", ["2.x"], "circuit.heads has '2.x', not LAYER.HEAD"),
        ("circuit.mlps", [1.5], "circuit.mlps[0] is a number, not an integer"),
    ],
)
def test_read_circuit_defects(where, value, phrase, tmp_path):
    _write(tmp_path / "circuit.json", _change(CIRCUIT, where, value))
    with pytest.raises(UsageError) as e:
        state.read_circuit(tmp_path)
    _one_line(e, "circuit.json", phrase, "surgery circuit --out")


@pytest.mark.parametrize(
    "where, value, phrase",
    [
        ("config", KeyError, "lacks config"),
        ("config.ops", [], "config.ops is empty"),
        ("config.ops", "+", "config.ops is a string, not a list"),
        ("config.operands", [0, "9"], "config.operands[1] is a string"),
        ("config.template", KeyError, "lacks config.template"),
        ("config.seed", 0.5, "config.seed is a number, not an integer"),
        ("config.score", 1, "config.score is an integer, not a string"),
        ("results.per_op", KeyError, "lacks results.per_op"),
        ("results.per_op.+", KeyError, "lacks results.per_op.+ (an object)"),
        ("results.per_op.+.neurons", {"one": [1]}, "has key 'one', not a layer number"),
        ("results.per_op.+.neurons", {"1": ["3"]}, "results.per_op.+.neurons.1[0] is a string"),
    ],
)
def test_circuit_study_defects(where, value, phrase, tmp_path):
    data = _change(CIRCUIT, where, value)
    with pytest.raises(UsageError) as e:
        state.check_circuit_study(data, tmp_path)
    _one_line(e, "circuit.json", phrase, "surgery circuit --out")


def test_read_components(tmp_path):
    assert state.read_components(_write(tmp_path / "h.json", HEADS))[0] == "heads"
    pp = _change(
        _change(HEADS, "config.method", "path-patch"), "results.heads", [{"layer": 0, "head": 1, "effect": -2}]
    )
    assert state.read_components(_write(tmp_path / "p.json", pp))[0] == "heads"
    assert state.read_components(_write(tmp_path / "c.json", CIRCUIT))[0] == "circuit"


@pytest.mark.parametrize(
    "data, phrase",
    [
        (_change(HEADS, "results.heads", {}), "results.heads is an object, not a list"),
        (_change(HEADS, "results.heads", [3]), "results.heads[0] is an integer, not an object"),
        (_change(HEADS, "results.heads.0.layer", KeyError), "lacks results.heads[0].layer"),
        (_change(HEADS, "results.heads.0.drop", 0.1), "results.heads[0].drop is a number, not an object"),
        (_change(HEADS, "results.shape.layers", "3"), "results.shape.layers is a string"),
        (_change(HEADS, "model", "tiny"), "model is a string, not an object"),
        (_change(HEADS, "config.method", 2), "config.method is an integer"),
        (_change(CIRCUIT, "model.n_layers", "30"), "model.n_layers is a string"),
        (_change(CIRCUIT, "circuit.heads", "2.1"), "circuit.heads is a string, not a list"),
        ({"model": {}}, "neither a heads.json"),
    ],
)
def test_read_components_defects(data, phrase, tmp_path):
    with pytest.raises(UsageError) as e:
        state.read_components(_write(tmp_path / "f.json", data))
    _one_line(e, "f.json", phrase, "surgery heads")
