"""Multi-result heuristics (division) and 0-99 grids: a planted set of quotients is recovered with a held-out score,
noise on a division grid gets no label, and the families work on a 100 x 100 grid."""

from __future__ import annotations

import numpy as np
import pytest

from surgery.evals import arithmetic
from surgery.find import heuristics as Hx


def division_grid(lo: int = 0, hi: int = 99):
    pairs = arithmetic.candidate_pairs(2, "/", False, "exact", (lo, hi))
    a, b = pairs[:, 0], pairs[:, 1]
    return a, b, a // b


@pytest.mark.parametrize("planted", [(3, 7), (2, 5, 11), (4, 6, 8, 9)])
def test_planted_multi_result_is_recovered(planted):
    a, b, q = division_grid()
    rng = np.random.default_rng(0)
    act = np.isin(q, planted) * 1.0 + 0.3 * rng.standard_normal(len(q))
    sets = Hx.heuristic_sets(a, b, q)
    c = Hx.classify({"activation": act}, sets, multi=q)
    assert c["label"] == "result in {" + ", ".join(map(str, planted)) + "}"
    assert c["score"] >= 0.8
    assert (c["mask"] == np.isin(q, planted)).all()


@pytest.mark.parametrize("seed", range(8))
def test_noise_on_a_division_grid_gets_no_label(seed):
    a, b, q = division_grid()
    rng = np.random.default_rng(seed)
    sets = Hx.heuristic_sets(a, b, q)
    c = Hx.classify({"activation": rng.standard_normal(len(q)), "direct": rng.standard_normal(len(q))}, sets, multi=q)
    assert c["label"] is None and "mask" not in c


def test_multi_result_score_is_held_out():
    """A map that is high on the even prompts of a set but random on the odd ones must not score high."""
    _, _, q = division_grid()
    rng = np.random.default_rng(3)
    act = rng.standard_normal(len(q))
    even = np.zeros(len(q), bool)
    even[::2] = True
    act[even & np.isin(q, (3, 7))] += 5.0
    got = Hx.multi_result(act, q)
    assert got is None or got[2] < 0.6


def test_families_on_a_100x100_grid():
    a, b = (x.ravel() for x in np.meshgrid(np.arange(100), np.arange(100), indexing="ij"))
    sets = Hx.heuristic_sets(a, b, a + b)
    assert (
        len(a) == 10_000 and "op1 in [0,100)" not in sets and "result in [0,100)" not in sets
    )  # over half the grid: not a candidate
    assert {"op1 in [20,30)", "op2 % 7 == 3", "result tens digit 4", "op1 == op2"} <= set(sets)
    rng = np.random.default_rng(0)
    act = sets["op2 % 7 == 3"] * 1.0 + 0.3 * rng.standard_normal(len(a))
    assert Hx.classify({"activation": act}, sets)["label"] == "op2 % 7 == 3"
    assert Hx.classify({"activation": rng.standard_normal(len(a))}, sets)["label"] is None
