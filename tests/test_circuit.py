"""`surgery circuit` / `surgery heuristics`: the heuristic classifier on synthetic maps, selection helpers, and bad
input rejected (one line, exit 2) before anything is loaded or written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from surgery.cli import main
from surgery.find import circuit as C
from surgery.find import heuristics as Hx


def grid(lo: int = 0, hi: int = 29):
    a, b = np.meshgrid(np.arange(lo, hi + 1), np.arange(lo, hi + 1), indexing="ij")
    return a.ravel(), b.ravel()


@pytest.mark.parametrize(
    "planted",
    ["op1 % 5 == 2", "op2 in [10,20)", "result units digit 7", "op1 == op2", "result % 3 == 0", "op1 tens digit 1"],
)
def test_planted_heuristic_is_recovered(planted):
    a, b = grid()
    sets = Hx.heuristic_sets(a, b, a + b)
    rng = np.random.default_rng(0)
    act = sets[planted] * 1.0 + 0.3 * rng.standard_normal(len(a))
    c = Hx.classify({"activation": act}, sets)
    if planted == "op2 in [10,20)":  # the same prompts are also "op2 tens digit 1": either name is right
        assert c["label"] in ("op2 in [10,20)", "op2 tens digit 1")
    elif planted == "op1 tens digit 1":
        assert c["label"] in ("op1 tens digit 1", "op1 in [10,20)")
    else:
        assert c["label"] == planted
    assert c["score"] >= 0.8


def test_planted_direct_map_is_used():
    a, b = grid()
    sets = Hx.heuristic_sets(a, b, a + b)
    rng = np.random.default_rng(1)
    c = Hx.classify({"activation": rng.standard_normal(len(a)), "direct": sets["result % 7 == 4"] * 2.0}, sets)
    assert (c["label"], c["map"]) == ("result % 7 == 4", "direct")


@pytest.mark.parametrize("seed", range(5))
def test_noise_gets_no_label(seed):
    a, b = grid()
    sets = Hx.heuristic_sets(a, b, a + b)
    rng = np.random.default_rng(seed)
    c = Hx.classify({"activation": rng.standard_normal(len(a)), "direct": rng.standard_normal(len(a))}, sets)
    assert c["label"] is None and c["score"] < 0.6


def test_match_score_definition():
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    sets = {"first two": np.array([1, 1, 0, 0, 0], bool), "1 and 3": np.array([0, 1, 0, 1, 0], bool)}
    assert Hx.match_scores(scores, sets) == {"first two": 1.0, "1 and 3": 0.5}


def test_knee_recall_first_reaching():
    assert C.knee([0, 1, 2, 10], [0.0, 0.8, 0.85, 1.0], 10) == 1
    assert C.first_reaching([0, 5, 10], [0.1, 0.95, 0.99], 0.9) == 5
    assert C.first_reaching([0, 5], [0.1, 0.5], 0.9) is None
    assert C.recall([3, 2, 1, 0], [30, 20, 10, 0], k=2) == 1.0
    assert C.recall([0, 1, 2, 3], [30, 20, 10, 0], k=2) == 0.0


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["--operands", "9-3"], "empty"),
        (["--operands", "x"], "LO-HI"),
        (["--ops", "%"], "cannot be expressed"),
        (["--templates", "words"], "cannot name"),
        (["--faithfulness", "0"], "outside (0, 1]"),
        (["--faithfulness", "1.5"], "outside (0, 1]"),
        (["--operands", "0-1", "--ops", "*"], "fewer than"),
        (["--limit", "1"], "at least 2"),
    ],
)
def test_circuit_bad_input(tmp_path, capsys, argv, msg):
    out = tmp_path / "c"
    assert main(["circuit", "--model", "no-such-model", "--out", str(out)] + argv) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1
    assert not out.exists()


def test_heuristics_bad_input(tmp_path, capsys):
    out = tmp_path / "h"
    assert main(["heuristics", "--circuit", str(tmp_path / "nothing"), "--out", str(out)]) == 2
    assert "no circuit.json" in capsys.readouterr().err
    folder = tmp_path / "circ"
    folder.mkdir()
    (folder / "circuit.json").write_text(
        json.dumps({"model": {"name": "smollm2-135m", "source": "/x", "n_layers": 30, "n_heads": 9}, "config": {}})
    )
    assert main(["heuristics", "--circuit", str(folder), "--model", "other-model", "--out", str(out)]) == 2
    assert "was made with model smollm2-135m" in capsys.readouterr().err
    assert main(["heuristics", "--circuit", str(folder), "--threshold", "0", "--out", str(out)]) == 2
    assert not out.exists()


@pytest.mark.real
@pytest.mark.slow
def test_circuit_on_smollm2_writes_the_finetune_keys(smol, tmp_path):
    out = tmp_path / "c"
    assert (
        main(
            [
                "circuit",
                "--ops",
                "+",
                "--operands",
                "0-4",
                "--limit",
                "4",
                "--verify",
                "4",
                "--rescore",
                "2",
                "--no-agree",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    data = json.loads((out / "circuit.json").read_text())
    assert set(data["model"]) >= {"name", "arch", "n_layers", "n_heads"} and data["model"]["n_layers"] == 30
    assert data["circuit"]["mlps"] == list(range(30))
    assert all(h.count(".") == 1 for h in data["circuit"]["heads"])
    assert data["per_op"]["+"]["heads"] == data["results"]["per_op"]["+"]["heads"]
    ci = data["results"]["per_op"]["+"]["faithfulness_interval"]
    assert ci is not None and ci["low"] <= ci["high"] and ci["se"] >= 0  # per-prompt values were recorded
    md = (out / "circuit.md").read_text()
    assert "faithfulness (SE) [95% CI]" in md and f"({ci['se']}) [{ci['low']}, {ci['high']}]" in md
    for f in ("circuit.md", "effects.png", "faithfulness.png"):
        assert (out / f).stat().st_size > 0


def test_chance_iou_matches_random_sets():
    """The agreement's chance baseline is the mean IoU of two random n-subsets (Monte Carlo, 2,000 draws)."""
    g = torch.Generator().manual_seed(0)
    for n, total in ((8, 270), (149, 270), (375, 23040)):
        draws = [
            len(
                set(torch.randperm(total, generator=g)[:n].tolist())
                & set(torch.randperm(total, generator=g)[:n].tolist())
            )
            for _ in range(2000)
        ]
        mc = sum(i / (2 * n - i) for i in draws) / len(draws)
        assert abs(C.chance_iou(n, total) - mc) < 0.01 + 0.05 * mc, (n, total, C.chance_iou(n, total), mc)
    assert C.chance_iou(0, 10) is None


def test_faithfulness_interval_is_a_paired_bootstrap_of_the_ratio_of_means():
    from surgery.find.circuit import faithfulness_interval

    rng = np.random.default_rng(0)
    model = rng.normal(1.0, 0.1, 400)
    empty = rng.normal(0.0, 0.1, 400)
    circuit = 0.8 * model + 0.2 * empty + rng.normal(0, 0.05, 400)  # F = 0.8 by construction
    ci = faithfulness_interval(circuit.tolist(), model.tolist(), empty.tolist())
    assert ci["low"] < 0.8 < ci["high"] and 0.0 < ci["se"] < 0.02
    few = faithfulness_interval(circuit[:20].tolist(), model[:20].tolist(), empty[:20].tolist())
    assert few["se"] > ci["se"]  # fewer prompts, wider
    assert faithfulness_interval([], [], []) is None  # a stage cached without per-prompt values
