"""`surgery circuit` resumes: a run killed between stages, rerun with the same --out and options, finishes with
exactly the results of an uninterrupted run, without redoing finished stages; another configuration in that
folder is refused (one line naming the keys, exit 2, nothing written)."""

from __future__ import annotations

import json

import pytest
import torch

from surgery.cli import main
from surgery.commands.circuit import job as circuit_job
from surgery.commands.heuristics import job as heuristics_job
from surgery.find import circuit as C
from surgery.find import heuristics as Hx

ARGS = [
    "--ops",
    "+,/",
    "--operands",
    "0-12",
    "--limit",
    "3",
    "--verify",
    "6",
    "--rescore",
    "2",
    "--include-wrong",
    "--neuron-from",
    "2",
    "--batch-size",
    "8",
]


def _results(folder):
    d = json.loads((folder / "circuit.json").read_text())
    return d["results"], d["circuit"], d["per_op"], d["config"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_smol_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("c") / "full"
    assert main(["circuit", "--model", str(tiny_smol_dir), "--out", str(out), *ARGS]) == 0
    return out


def test_resumed_equals_uninterrupted(tiny_smol_dir, uninterrupted, tmp_path, monkeypatch, capsys):
    out = tmp_path / "killed"
    argv = ["circuit", "--model", str(tiny_smol_dir), "--out", str(out), *ARGS]
    real_curve, calls = C.neuron_curve, []

    def dies_second_time(*a, **k):
        calls.append(1)
        if len(calls) == 2:  # the second operator's neuron stage
            raise KeyboardInterrupt
        return real_curve(*a, **k)

    monkeypatch.setattr(C, "neuron_curve", dies_second_time)
    assert main(argv) == 130
    assert not (out / "circuit.json").exists()
    files = sorted(f.name for f in (out / circuit_job.STAGE_DIR).iterdir())
    done = [f for f in files if not f.endswith(".commit")]
    commits = circuit_job.stage_commits(out)  # every finished stage names the commit that computed it
    assert sorted(commits) == [f.removesuffix(".json") for f in done if f.endswith(".json")]
    assert all(commits.values())
    assert done == [
        "add.effects.json",
        "add.heads.json",
        "add.neurons.json",
        "div.effects.json",
        "div.heads.json",
        circuit_job.MEANS_FILE,
    ]
    monkeypatch.setattr(C, "neuron_curve", real_curve)
    screens, means = [], []
    real_screen, real_means = C.screen_mean, C.P.means
    monkeypatch.setattr(C, "screen_mean", lambda *a, **k: screens.append(1) or real_screen(*a, **k))
    monkeypatch.setattr(C.P, "means", lambda *a, **k: means.append(1) or real_means(*a, **k))
    assert main(argv) == 0
    assert screens == []  # the effects of both operators came from the stages
    assert means == []  # and the means pass from the means file
    assert _results(out) == _results(uninterrupted)
    assert json.loads((out / "circuit.json").read_text())["stage_commits"].keys() >= commits.keys()


def test_other_configuration_is_refused(tiny_smol_dir, tmp_path, capfd):
    out = tmp_path / "c"
    out.mkdir()
    (out / circuit_job.RUN_FILE).write_text(json.dumps({"model": str(tiny_smol_dir), "limit": 5}))
    before = sorted(p.name for p in out.iterdir())
    assert main(["circuit", "--model", "some-other-model", "--out", str(out), *ARGS]) == 2
    err = capfd.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "another configuration" in err
    assert "model:" in err and "limit:" in err and "ops:" in err
    assert sorted(p.name for p in out.iterdir()) == before


def test_finished_folder_needs_force(uninterrupted, tiny_smol_dir, capfd):
    assert main(["circuit", "--model", str(tiny_smol_dir), "--out", str(uninterrupted), *ARGS]) == 2
    assert "already holds a finished circuit" in capfd.readouterr().err


def test_heuristics_end_to_end(tiny_smol_dir, uninterrupted, tmp_path):
    """`surgery heuristics` on a finished circuit folder: json, md and gallery written; every labelled neuron's
    score reaches the threshold; every reported accuracy lies inside its own 95% interval."""
    out = tmp_path / "h"
    assert (
        main(
            [
                "heuristics",
                "--circuit",
                str(uninterrupted),
                "--top",
                "2",
                "--max-heuristics",
                "2",
                "--max-prompts",
                "10",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert {p.name for p in out.iterdir()} >= {"heuristics.json", "heuristics.md", "gallery.png"}
    data = json.loads((out / "heuristics.json").read_text())
    res, thr = data["results"], data["config"]["threshold"]
    assert set(res["per_op"]) == {"+", "/"}
    for r in res["per_op"].values():
        assert r["labelled"] == sum(t["label"] is not None for t in r["table"])
        assert all(t["score"] >= thr for t in r["table"] if t["label"] is not None)
        for a in (r["ablations"] or {}).values():
            if isinstance(a, dict) and a.get("n"):
                assert a["ci95"][0] <= a["acc"] <= a["ci95"][1]
    assert "Classified fraction" in (out / "heuristics.md").read_text()


def test_ablation_accuracy_markdown():
    assert heuristics_job._acc_md(Hx._acc(torch.tensor([True] * 7 + [False] * 3))) == "0.700 [0.397, 0.892] (n=10)"
    assert heuristics_job._acc_md(Hx._acc(torch.tensor([], dtype=torch.bool))) == "n/a (n=0)"


def test_two_gloo_processes_equal_one(tiny_smol_dir, uninterrupted, tmp_path):
    """`accelerate launch --num_processes 2` (CPU, gloo): the operators split over the processes (+ on one, / on
    the other), the first one reports: the same results, circuit and per-operator circuits as one process."""
    from test_cna_cli import _launch

    out = tmp_path / "two"
    two = _launch("circuit", "--model", str(tiny_smol_dir), "--out", str(out), *ARGS)
    assert two.returncode == 0, two.stderr[-3000:]
    got, want = _results(out), _results(uninterrupted)
    assert got[1:3] == want[1:3]  # the circuit and the per-operator circuits: identical
    _close(got[0], want[0])  # every figure: equal up to float rounding (one thread per process there)


def _close(a, b, path="results"):
    """Equal structures whose floats agree to 1e-6 relative (the thread count changes float sums' order)."""
    if isinstance(b, dict):
        assert set(a) == set(b), path
        for k in b:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(b, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-9), path
    else:
        assert a == b, path
