"""Recipes: YAML files validated into dataclasses, found by name (shipped in recipes/) or by path.

A recipe file may hold `profiles:`, named partial recipes merged over the rest: `--profile NAME` picks one,
`--quick` is `--profile quick` (the CPU-sized smoke run every recipe ships).
Any field can be overridden with dotted keys (`--set lora.rank=8`); an unknown key is one clear error.

    @dataclass
    class Lora:
        rank: int = field(default=8, metadata=rules(min=1))   # checked ranges, choices, non-empty lists
    @dataclass
    class MyRecipe:
        name: str = "x"
        lora: Lora = field(default_factory=Lora)
    r = recipe.load("arithmetic-prune", MyRecipe, overrides=["lora.rank=4"], profile="quick")
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from surgery.errors import UsageError

T = TypeVar("T")


def shipped() -> list[str]:
    """Names of the recipes shipped with the package."""
    return sorted(
        p.name[:-5] for p in importlib.resources.files("surgery.recipes").iterdir() if p.name.endswith(".yaml")
    )


def find(name_or_path: str) -> Path:
    """A recipe path from a shipped name or a YAML path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.exists():
            raise UsageError(f"recipe file {path} does not exist")
        return path
    res = importlib.resources.files("surgery.recipes") / f"{name_or_path}.yaml"
    if not res.is_file():
        raise UsageError(f"unknown recipe {name_or_path!r}; shipped: {', '.join(shipped())}, or give a .yaml path")
    return Path(str(res))


def load(
    name_or_path: str,
    schema: type[T],
    overrides: list[str] | tuple[str, ...] = (),
    quick: bool = False,
    profile: str | None = None,
) -> T:
    """Read, merge the chosen profile (`quick=True` is profile 'quick'), apply overrides, validate into `schema`."""
    path = find(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UsageError(f"recipe {path} is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(raw, dict):
        raise UsageError(f"recipe {path} must be a mapping of keys to values")
    profiles = raw.pop("profiles", None) or {}
    if not isinstance(profiles, dict):
        raise UsageError(f"recipe {path}: 'profiles' must map profile names to partial recipes")
    for pname, body in profiles.items():
        if body is not None and not isinstance(body, dict):
            raise UsageError(f"recipe {path}: profile {pname!r} must be a mapping of keys to values, got {body!r}")
    if quick and profile not in (None, "quick"):
        raise UsageError(f"--quick and --profile {profile} both given; pick one")
    name = "quick" if quick else profile
    if name is not None:
        if name not in profiles:
            raise UsageError(f"recipe {path.name} has no profile {name!r}; it has: {', '.join(profiles) or 'none'}")
        raw = merge(raw, profiles[name] or {})
    for item in overrides:
        raw = merge(raw, dotted(item))
    return build(schema, raw, where=path.name)


def resolve(
    name_or_path: str,
    schema: type[T],
    overrides: list[str] | tuple[str, ...] = (),
    quick: bool = False,
    profile: str | None = None,
    **flags,
) -> T:
    """`load`, then the command's explicit flags on top (None = keep the recipe's value), re-validated."""
    r = load(name_or_path, schema, overrides, quick, profile)
    given = {k: v for k, v in flags.items() if v is not None}
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    for key, value in given.items():  # errors name the flag the user typed, not the recipe key
        what = "--" + key.replace("_", "-")
        _within(_check(value, hints[key], what), fields[key].metadata.get("rules"), what)
    return build(schema, merge(to_dict(r), given), where=find(name_or_path).name) if given else r


def dotted(item: str) -> dict:
    """'lora.rank=8' -> {'lora': {'rank': 8}} (the value parsed as YAML: numbers, lists, booleans)."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise UsageError(f"override {item!r} must look like KEY=VALUE, e.g. lora.rank=8")
    out: Any = yaml.safe_load(value) if value else None
    for part in reversed(key.strip().split(".")):
        out = {part: out}
    return out


def merge(base: dict, extra: dict) -> dict:
    """Recursive dict merge; values in `extra` win."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def rules(*, min: float | None = None, max: float | None = None, choices=None, nonempty: bool = False) -> dict:
    """Field metadata checked by `build`: numeric range (inclusive), allowed values (a tuple, or a function
    returning one at check time, for registries), non-empty lists. A list field's rules apply to each element."""
    return {"rules": {"min": min, "max": max, "choices": choices, "nonempty": nonempty}}


def build(schema: type[T], raw: dict, where: str = "recipe", prefix: str = "") -> T:
    """Validate a mapping into dataclass `schema`: unknown keys, wrong types (a bool is not a number) and values
    outside a field's `rules` are one-line errors."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    for key in raw:
        if key not in fields:
            raise UsageError(f"{where}: unknown key {prefix + key!r}; known keys: {', '.join(fields)}")
    kwargs = {}
    for key, value in raw.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise UsageError(f"{where}: {prefix + key!r} must be a mapping")
            kwargs[key] = build(hint, value, where, prefix + key + ".")
        else:
            what = f"{where}: {prefix + key!r}"
            kwargs[key] = _within(_check(value, hint, what), fields[key].metadata.get("rules"), what)
    return schema(**kwargs)


def _within(value: Any, rule: dict | None, what: str) -> Any:
    """`value` if it satisfies `rule` (see `rules`), else a one-line UsageError naming the allowed values."""
    if rule is None or value is None:
        return value
    items = value if isinstance(value, (list, tuple)) else [value]
    if rule["nonempty"] and isinstance(value, (list, tuple)) and not value:
        raise UsageError(f"{what} must not be empty")
    choices = rule["choices"]() if callable(rule["choices"]) else rule["choices"]
    for v in items:
        if choices is not None and v not in choices:
            raise UsageError(f"{what}: {v!r} is not one of {', '.join(map(str, choices))}")
        if rule["min"] is not None and v < rule["min"]:
            raise UsageError(f"{what} must be >= {rule['min']}, got {v!r}")
        if rule["max"] is not None and v > rule["max"]:
            raise UsageError(f"{what} must be <= {rule['max']}, got {v!r}")
    return value


def _check(value: Any, hint: Any, what: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or value is None and type(None) in args:
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for a in args:
            try:
                return _check(value, a, what)
            except UsageError:
                pass
        raise UsageError(f"{what} has the wrong type ({type(value).__name__}); expected {hint}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UsageError(f"{what} must be a list, got {value!r}")
        inner = args[0] if args else Any
        return origin(_check(v, inner, what) for v in value)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise UsageError(f"{what} must be a mapping, got {value!r}")
        return value
    if hint in (int, float) and isinstance(value, bool):
        raise UsageError(f"{what} must be a number, got {value!r} (a boolean)")
    if hint is float and isinstance(value, int):
        return float(value)
    if isinstance(hint, type) and not isinstance(value, hint):
        raise UsageError(f"{what} must be {hint.__name__}, got {value!r}")
    return value


def to_dict(obj) -> dict:
    """The resolved recipe as plain data (for reports and provenance)."""
    return dataclasses.asdict(obj)
