"""The package reads as floors, and the rules are checked here rather than kept by hand.

Floors, lowest first (a module imports only from its own floor or a lower one):
    surgery, surgery.errors      the version and the one usage-error type
    surgery.model                the architecture table, hooks, batched forwards, slicing
    surgery.io                   loading, trust, recipes, reports, run folders, checkpoints, state files
    surgery.evals                built-in suites and user tasks, one registry
    surgery.find                 what carries a behaviour: CNA, selectors, head scans, patching, circuits
    surgery.edits                what changes a model: neuron edits, pruning steps, LoRA, training, precise masks
    surgery.commands             one package per verb; no verb imports another
    surgery.cli, surgery.__main__
Imports inside functions count too, and no module reaches into another's private names.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"surgery": ROOT / "surgery", "surgery.evals": ROOT / "evals", "surgery.recipes": ROOT / "recipes"}
FLOORS = [
    ("surgery", "surgery.errors"),
    ("surgery.model",),
    ("surgery.io",),
    ("surgery.evals",),
    ("surgery.find",),
    ("surgery.edits",),
    ("surgery.commands",),
    ("surgery.cli", "surgery.__main__"),
]


def modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for pkg, folder in FOLDERS.items():
        for p in folder.rglob("*.py"):
            if "fixtures" in p.parts or ".venv" in p.parts:
                continue
            parts = [*p.relative_to(folder).with_suffix("").parts]
            if pkg == "surgery" and parts[0] in ("evals", "recipes"):
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = p
    return out


def _is_package(name: str, path: Path) -> bool:
    return path.name == "__init__.py"


def _resolve(name: str, path: Path, node: ast.ImportFrom, known: set[str]) -> list[str]:
    if node.level:
        base = name if _is_package(name, path) else name.rpartition(".")[0]
        for _ in range(node.level - 1):
            base = base.rpartition(".")[0]
        mod = f"{base}.{node.module}" if node.module else base
    else:
        mod = node.module or ""
    hits = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in known]  # `from pkg import module`
    return hits or ([mod] if mod in known else [])


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    g: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                g[name].update(_resolve(name, path, node, known))
            elif isinstance(node, ast.Import):
                g[name].update(a.name for a in node.names if a.name in known)
        g[name].discard(name)
        g[name] -= {p for p in known if name.startswith(p + ".")}  # a module importing its own package
    return g


def floor(module: str) -> int:
    best = None
    for i, prefixes in enumerate(FLOORS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > len(best[1])):
                best = (i, p)
    assert best is not None, f"{module} is on no floor: add it to FLOORS"
    return best[0]


def verb(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "commands" and parts[2] != "spec" else None


def cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(g[n]):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_walker_finds_planted_faults():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None
    g = graph()
    assert "surgery.model.batching" in g["surgery.find.cna"]
    assert "surgery.model.batching" in g["surgery.evals.arithmetic"]
    assert floor("surgery.find.cna") > floor("surgery.model.arch") and floor("surgery.errors") == 0
    assert verb("surgery.commands.prune.sweep") == "prune" and verb("surgery.commands.spec") is None


def test_no_import_cycle():
    found = cycle(graph())
    assert found is None, f"import cycle: {' -> '.join(found)}"


def test_imports_go_only_sideways_or_down():
    g = graph()
    up = sorted(f"{m} -> {d}" for m in g for d in g[m] if floor(d) > floor(m))
    assert not up, "imports that climb a floor:\n" + "\n".join(up)


def test_no_verb_imports_another_verb():
    g = graph()
    bad = sorted(f"{m} -> {d}" for m in g for d in g[m] if verb(m) and verb(d) and verb(m) != verb(d))
    assert not bad, "verbs importing other verbs:\n" + "\n".join(bad)


def test_no_module_uses_another_modules_private_names():
    mods = modules()
    known = set(mods)
    bad = []
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        aliases: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                for target in _resolve(name, path, node, known):
                    for a in node.names:
                        if a.name.startswith("_") and not a.name.startswith("__"):
                            bad.append(f"{name}: from {target} import {a.name}")
                        if f"{node.module}.{a.name}" in known or target.endswith("." + a.name):
                            aliases[a.asname or a.name] = target
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in known and a.asname:
                        aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and aliases[node.value.id] != name
            ):
                bad.append(f"{name}: {node.value.id}.{node.attr} ({aliases[node.value.id]})")
    assert not bad, "private names used across modules:\n" + "\n".join(sorted(set(bad)))


def test_every_package_is_shipped():
    """pyproject lists every package folder (a new floor or verb that is not listed would be missing from a
    wheel) and every folder of modules has an __init__.py."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {m for m, p in modules().items() if p.name == "__init__.py"}
    assert folders == listed, (
        f"packages not listed: {sorted(folders - listed)}; listed, not found: {sorted(listed - folders)}"
    )
    for p in (ROOT / "surgery").rglob("*.py"):
        assert (p.parent / "__init__.py").exists(), f"{p.parent} has modules but no __init__.py"


def test_code_points_only_into_the_repository():
    """Every project document the package, tests, benches or docs cite (a file named in upper case or under docs/;
    lower-case .md names are report outputs) exists in the repository: the design notes the code relies on live in
    docs/, not in a file outside the repo."""
    sources = [
        *ROOT.glob("surgery/**/*.py"),
        *ROOT.glob("evals/*.py"),
        *ROOT.glob("tests/*.py"),
        *ROOT.glob("bench/*.py"),
        ROOT / "README.md",
        *ROOT.glob("docs/**/*.md"),
    ]
    shipped = {p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*.md") if ".venv" not in p.parts} | {
        p.name for p in ROOT.rglob("*.md") if ".venv" not in p.parts
    }
    cited = {
        (src.name, m)
        for src in sources
        for m in re.findall(r"(?:docs/[\w./-]+|\b[A-Z][A-Z0-9_-]+)\.md\b", src.read_text())
    }
    missing = sorted((src, m) for src, m in cited if m.lstrip("./") not in shipped)
    assert not missing, f"cited Markdown files that are not in the repository: {missing}"
