"""Components: the attention heads and MLPs a skill lives in, from a file or a list, checked against a model.

    comps = parse("14.2, 1.4, mlp.20", Shape("smollm2-135m", "llama", 30, 9))   # a plain list
    comps = parse("runs/heads/heads.json", shape, top_heads=8)                  # a `surgery heads` result
    comps = parse("runs/circuit/circuit.json", shape)                           # a `surgery circuit` result


Files are ranked: heads.json (zero ablation) by the accuracy drop, then the target log-prob drop; a path-patching
heads.json (`--method path-patch`) by the relative logit effect, most negative first; circuit.json keeps its own
order. `top_heads=K` keeps the first K heads. Every check (a component outside the model, an empty list, K larger
than what is available, a file written for another model) is a one-line UsageError raised before any weights load.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from surgery.errors import UsageError
from surgery.io.state import read_components

Head = tuple[int, int]


@dataclass(frozen=True)
class Shape:
    """What the checks need to know about the model, readable from its config alone (no weights)."""

    name: str
    arch: str
    n_layers: int
    n_heads: int


@dataclass
class Components:
    """Heads (layer, head) in rank order and whole MLPs (layer indices); `source` says where they came from."""

    heads: list[Head]
    mlps: list[int] = field(default_factory=list)
    source: str = "list"

    def names(self) -> list[str]:
        return [f"{l}.{h}" for l, h in self.heads] + [f"mlp.{l}" for l in self.mlps]

    def to_dict(self) -> dict:
        return {"heads": [f"{l}.{h}" for l, h in self.heads], "mlps": list(self.mlps), "source": self.source}


def shape_of(config, name: str) -> Shape:
    """The Shape of a model from its transformers config."""
    return Shape(name, config.model_type, int(config.num_hidden_layers), int(config.num_attention_heads))


def parse(spec: str, shape: Shape, top_heads: int | None = None) -> Components:
    """Components from a heads.json / circuit.json path or a list like '14.2, 1.4, mlp.20', checked against shape."""
    if spec is None or not str(spec).strip():
        raise UsageError("empty --components; give heads like 14.2,1.4 (and mlp.20), or a heads.json / circuit.json")
    path = Path(str(spec).strip())
    comps = from_file(path, shape) if path.suffix == ".json" or path.is_file() else from_list(str(spec))
    check(comps, shape)
    return take(comps, top_heads)


def from_list(spec: str) -> Components:
    """'14.2, 1.4, mlp.20' -> heads [(14, 2), (1, 4)], mlps [20] (duplicates dropped, order kept)."""
    heads, mlps = [], []
    for item in (x.strip() for x in spec.split(",")):
        if not item:
            continue
        if m := re.fullmatch(r"(\d+)\.(\d+)", item):
            heads.append((int(m.group(1)), int(m.group(2))))
        elif m := re.fullmatch(r"mlp\.?(\d+)", item, re.I):
            mlps.append(int(m.group(1)))
        else:
            raise UsageError(f"bad component {item!r}; use LAYER.HEAD (e.g. 14.2) or mlp.LAYER (e.g. mlp.20)")
    if not heads and not mlps:
        raise UsageError("empty --components; give heads like 14.2,1.4 (and mlp.20)")
    return Components(list(dict.fromkeys(heads)), list(dict.fromkeys(mlps)), "list")


def from_file(path: Path, shape: Shape) -> Components:
    """Components of a heads.json (either method) or circuit.json, after checking it was made for this model."""
    if not path.is_file():
        raise UsageError(f"--components file {path} does not exist; give a heads.json, circuit.json or a list")
    kind, data = read_components(path)  # every key read below is there, of its type
    return _circuit(data, path, shape) if kind == "circuit" else _heads_json(data, path, shape)


def _same_model(
    path: Path, name: str | None, arch: str | None, layers: int | None, heads: int | None, shape: Shape
) -> None:
    theirs = {"arch": arch, "layers": layers, "heads": heads}
    ours = {"arch": shape.arch, "layers": shape.n_layers, "heads": shape.n_heads}
    bad = [k for k in ours if theirs[k] is not None and theirs[k] != ours[k]]
    if name and name != shape.name and Path(name).name != Path(shape.name).name:
        bad.append("name")
    if bad:
        raise UsageError(
            f"{path} was made for another model ({name}: {theirs}) than --model {shape.name} "
            f"({ours}); rerun the scan on this model"
        )


def _heads_json(data: dict, path: Path, shape: Shape) -> Components:
    res, model = data["results"], data.get("model") or {}
    sh = res.get("shape") or {}
    _same_model(path, model.get("name"), model.get("arch"), sh.get("layers"), sh.get("heads"), shape)
    rows = res["heads"]
    if (data.get("config") or {}).get("method") == "path-patch":
        rows = sorted(rows, key=lambda r: r["effect"])  # most negative relative logit effect first
    else:
        rows = sorted(rows, key=lambda r: (-r["drop"]["overall"], -r.get("logprob_drop", 0.0)))
    return Components([(int(r["layer"]), int(r["head"])) for r in rows], [], f"heads:{path}")


def _circuit(data: dict, path: Path, shape: Shape) -> Components:
    c, model = data["circuit"], data.get("model") or {}
    _same_model(path, model.get("name"), model.get("arch"), model.get("n_layers"), model.get("n_heads"), shape)
    heads = [from_list(h).heads[0] for h in c.get("heads", [])]
    return Components(heads, [int(m) for m in c.get("mlps", [])], f"circuit:{path}")


def check(comps: Components, shape: Shape) -> None:
    """Every head and MLP inside the model; at least one component."""
    if not comps.heads and not comps.mlps:
        raise UsageError(f"{comps.source} names no components; give at least one head or MLP")
    for l, h in comps.heads:
        if not (0 <= l < shape.n_layers and 0 <= h < shape.n_heads):
            raise UsageError(
                f"head {l}.{h} is outside the model ({shape.n_layers} layers x {shape.n_heads} heads: "
                f"0.0..{shape.n_layers - 1}.{shape.n_heads - 1})"
            )
    for l in comps.mlps:
        if not 0 <= l < shape.n_layers:
            raise UsageError(f"mlp.{l} is outside the model (layers 0..{shape.n_layers - 1})")


def take(comps: Components, k: int | None) -> Components:
    """The first k heads (all MLPs kept); k larger than the heads available is an error."""
    if k is None:
        return comps
    if k < 1:
        raise UsageError(f"--top-heads {k}: need 1 or more")
    if k > len(comps.heads):
        raise UsageError(
            f"--top-heads {k} is more than the {len(comps.heads)} heads in {comps.source}; "
            f"use at most {len(comps.heads)}"
        )
    return Components(comps.heads[:k], comps.mlps, comps.source)
