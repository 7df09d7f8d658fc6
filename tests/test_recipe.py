"""Recipes: shipped lookup, quick profile, dotted overrides, clear errors."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from surgery.errors import UsageError
from surgery.io import recipe


@dataclass
class Lora:
    rank: int = 8
    lr: float = 1e-4
    layers: list[int] = field(default_factory=list)


@dataclass
class R:
    name: str = "x"
    keep: str | None = None
    lora: Lora = field(default_factory=Lora)


def _write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return str(p)


def test_load_profiles_and_overrides(tmp_path):
    p = _write(
        tmp_path,
        "name: a\nlora: {rank: 16, lr: 0.001}\nprofiles:\n  quick:\n    lora: {rank: 2}\n  cpu:\n    keep: 5%\n",
    )
    r = recipe.load(p, R)
    assert r.lora.rank == 16 and r.lora.lr == 0.001
    q = recipe.load(p, R, quick=True, overrides=["lora.layers=[3, 4]", "keep=top500", "lora.lr=1"])
    assert q.lora.rank == 2 and q.lora.layers == [3, 4] and q.keep == "top500" and q.lora.lr == 1.0
    assert recipe.load(p, R, profile="quick") == recipe.load(p, R, quick=True)
    c = recipe.load(p, R, profile="cpu")
    assert c.keep == "5%" and c.lora.rank == 16
    with pytest.raises(UsageError, match="has no profile 'gpu'; it has: quick, cpu"):
        recipe.load(p, R, profile="gpu")
    with pytest.raises(UsageError, match="pick one"):
        recipe.load(p, R, quick=True, profile="cpu")


def test_unknown_key_and_wrong_type_are_clear(tmp_path):
    p = _write(tmp_path, "lora: {rnak: 3}\n")
    with pytest.raises(UsageError, match="unknown key 'lora.rnak'; known keys: rank, lr, layers"):
        recipe.load(p, R)
    with pytest.raises(UsageError, match="'lora.rank' must be int"):
        recipe.load(_write(tmp_path, "lora: {rank: many}\n"), R)
    with pytest.raises(UsageError, match="KEY=VALUE"):
        recipe.load(_write(tmp_path, "name: a\n"), R, overrides=["lora.rank"])


def test_unknown_recipe_names_the_shipped_ones():
    with pytest.raises(UsageError, match="unknown recipe 'nope'"):
        recipe.find("nope")
