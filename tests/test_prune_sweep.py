"""`surgery prune --sweep` and `--keep auto`: budgets parsed strictly, cells resumable (a resumed sweep equals an
uninterrupted one for every cell), another recipe refused naming its keys, the bisection's path, the timing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import make_tiny

from surgery.commands.prune import run
from surgery.commands.prune import sweep as prune_sweep
from surgery.edits.pruning import sliced_copy
from surgery.errors import UsageError

SMALL = [
    "train.max_steps=2",
    "train.batch_size=4",
    "train.eval_batch_size=16",
    "data.per_op=20",
    "data.test_size=8",
    "data.train_limit=16",
    "data.one_digit_limit=8",
    "cna.limit=6",
    "cna.max_rescore=256",
    "cna.batch_size=8",
    "baselines=[random]",
]
VOLATILE = ("seconds", "latency")  # wall-clock fields; everything else must match exactly


def test_parse_budgets():
    assert prune_sweep.parse_budgets("50%, 25% ,10%,top500") == ["50%", "25%", "10%", "top500"]
    assert prune_sweep.parse_budgets("12.50%") == ["12.5%"]
    for bad, msg in [
        ("", "empty"),
        ("5%,", "empty budget"),
        ("5%,5.0%", "twice"),
        ("x", "not topN"),
        ("101%", r"\(0, 100\]"),
        ("top0", "top1"),
    ]:
        with pytest.raises(UsageError, match=msg):
            prune_sweep.parse_budgets(bad)


def _cells(out: Path) -> list[dict]:
    return [
        {k: v for k, v in json.loads(line).items() if k not in VOLATILE}
        for line in (out / "cells.jsonl").read_text().splitlines()
    ]


def test_resumed_sweep_equals_uninterrupted(tiny_smol_dir, tmp_path, monkeypatch):
    """Kill a sweep inside its third cell; the rerun trains only the missing cells, and every cell equals the
    uninterrupted sweep's (accuracies, kept indices, lr, params)."""
    args = dict(model=str(tiny_smol_dir), quick=True, overrides=SMALL, sweep="50%,25%")
    monkeypatch.setattr(prune_sweep, "CELL_SAVE_STEPS", 2)  # every cell saves its training state mid-cell
    full = run(out=str(tmp_path / "full"), **args)
    assert len(full.data["results"]["cells"]) == 4
    lines = (tmp_path / "full" / "cells.jsonl").read_text().splitlines()
    assert all(json.loads(line)["commit"] for line in lines)  # each cell records the commit it ran on
    assert (tmp_path / "full" / "state" / "cells").is_dir()  # the cells saved their training state ...
    assert not any((tmp_path / "full" / "state" / "cells").glob("*"))  # ... and removed it when written

    calls = []
    real = prune_sweep.prune_and_train

    def dies_in_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # a kill in the middle of the third cell
        return real(*a, **k)

    monkeypatch.setattr(prune_sweep, "prune_and_train", dies_in_third)
    with pytest.raises(KeyboardInterrupt):
        run(out=str(tmp_path / "resumed"), **args)
    assert len(_cells(tmp_path / "resumed")) == 2
    calls.clear()
    monkeypatch.setattr(prune_sweep, "prune_and_train", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    resumed = run(out=str(tmp_path / "resumed"), **args)
    assert len(calls) == 2  # only the two missing cells trained
    key = lambda c: (c["budget"], c["selector"])  # noqa: E731
    assert sorted(_cells(tmp_path / "resumed"), key=key) == sorted(_cells(tmp_path / "full"), key=key)
    assert resumed.data["results"]["reference_rows"] == full.data["results"]["reference_rows"]
    for f in ("report.md", "report.json", "sweep.png"):
        assert (tmp_path / "resumed" / f).exists()
    # every selector at each budget keeps the same per-layer counts
    cells = _cells(tmp_path / "full")
    for b in ("50%", "25%"):
        counts = [{l: len(v) for l, v in c["keep"].items()} for c in cells if c["budget"] == b]
        assert len(counts) == 2 and counts[0] == counts[1]
    assert {c["budget"]: c["kept"] for c in cells} == {"50%": 48, "25%": 24}  # of the 96 deep neurons


def test_a_cell_another_worker_holds_is_passed_over_then_trained_if_that_worker_dies(
    tiny_smol_dir, tmp_path, monkeypatch
):
    """A live lock on cell 50%|cna (another worker training it): the sweep trains the other three first, waits for
    the lock, and when the holder lets go without a result (it was killed), trains the cell itself."""
    out = tmp_path / "s"
    args = dict(model=str(tiny_smol_dir), quick=True, overrides=SMALL, sweep="50%,25%")
    held, release = threading.Event(), threading.Event()

    def other_worker():
        with prune_sweep.folder_lock(out, "cell-50%|cna"):
            held.set()
            release.wait(120)

    calls = []
    real = prune_sweep.prune_and_train

    def train(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            release.set()  # the other worker dies while this one trains its third cell
        return real(*a, **k)

    out.mkdir()
    holder = threading.Thread(target=other_worker)
    holder.start()
    assert held.wait(10)
    monkeypatch.setattr(prune_sweep, "prune_and_train", train)
    rep = run(out=str(out), **args)
    holder.join()
    order = [(c["budget"], c["selector"]) for c in _cells(out)]
    assert order == [("50%", "random"), ("25%", "cna"), ("25%", "random"), ("50%", "cna")]
    assert len(calls) == 4 and len(rep.data["results"]["cells"]) == 4


def test_two_workers_on_one_folder_share_the_cells(tiny_smol_dir, tmp_path):
    """The same sweep command started twice at once on one --out (two processes): both finish, every cell is
    trained exactly once, and the cells equal a single process's."""
    flags = ["prune", "--model", str(tiny_smol_dir), "--quick", "--sweep", "50%,25%"]
    for kv in SMALL:
        flags += ["--set", kv]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")

    def start(out: Path):
        return subprocess.Popen(
            [sys.executable, "-m", "surgery", *flags, "--out", str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    one = start(tmp_path / "one")
    err = one.communicate(timeout=600)[1]
    assert one.returncode == 0, err
    pair = [start(tmp_path / "two"), start(tmp_path / "two")]
    logs = [p.communicate(timeout=600)[1] for p in pair]
    assert [p.returncode for p in pair] == [0, 0], logs
    trained = [
        [ln.split(":")[0].split("cell ")[1] for ln in log.splitlines() if ln.startswith("[prune] cell ")]
        for log in logs
    ]
    assert sorted(trained[0] + trained[1]) == ["25% cna", "25% random", "50% cna", "50% random"]
    key = lambda c: (c["budget"], c["selector"])  # noqa: E731
    assert sorted(_cells(tmp_path / "two"), key=key) == sorted(_cells(tmp_path / "one"), key=key)
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert len(report["results"]["cells"]) == 4


def test_another_recipe_is_refused_by_name_and_nothing_changes(tiny_smol_dir, tmp_path):
    out = tmp_path / "s"
    run(out=str(out), model=str(tiny_smol_dir), quick=True, overrides=SMALL, sweep="50%")
    before = sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*"))
    with pytest.raises(UsageError, match=r"another recipe: lora.rank \(8 there, 4 now\)"):
        run(out=str(out), model=str(tiny_smol_dir), quick=True, overrides=[*SMALL, "lora.rank=4"], sweep="50%")
    assert sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*")) == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("mine")
    with pytest.raises(UsageError, match="not a prune sweep folder"):
        run(out=str(tmp_path / "other"), model=str(tiny_smol_dir), quick=True, overrides=SMALL, sweep="50%")
    # a longer budget list or another baseline only adds cells
    rep = run(
        out=str(out),
        model=str(tiny_smol_dir),
        quick=True,
        overrides=[*SMALL, "baselines=[random,magnitude]"],
        sweep="50%",
    )
    assert sorted(c["selector"] for c in rep.data["results"]["cells"]) == ["cna", "magnitude", "random"]


def test_search_bisects_to_the_smallest_passing_budget(monkeypatch):
    """A fake model that passes iff at least 30% is kept: the probes halve the interval every time."""
    ref_rows = [{"validation": {"full_answer_acc": 0.5}}, {"validation": {"full_answer_acc": 0.8}}]
    sw = SimpleNamespace(ref_rows=ref_rows, plan=SimpleNamespace(selectors=["cna"], uniform=False), sel=None)
    monkeypatch.setattr(prune_sweep, "keeps_for", lambda sel, kind, v, uniform=False: {"cna": {0: list(range(int(v)))}})
    interim = []
    monkeypatch.setattr(prune_sweep, "write_report", lambda sw, budgets, found: interim.append(dict(found)))

    def cell(sw, budget, name, keep):
        pct = float(budget.rstrip("%"))
        return {
            "budget": budget,
            "selector": name,
            "kept": len(keep[0]),
            "kept_fraction": pct / 100,
            "validation": {"full_answer_acc": 0.8 if pct >= 30 else 0.1},
        }

    monkeypatch.setattr(prune_sweep, "cell", cell)
    found = prune_sweep.search(sw, max_drop=2, against="reference", steps=5)
    assert [p["budget"] for p in found["path"]] == ["50%", "25%", "37.5%", "31.25%", "28.12%"]
    assert [p["passed"] for p in found["path"]] == [True, False, True, True, False]
    assert found["best"]["budget"] == "31.25%" and found["target"] == pytest.approx(0.78)
    # the report written after each probe says the search is still running, not that no probe passed
    assert [f["running"] for f in interim] == [f"{i} of 5 probes done" for i in range(1, 6)]
    assert "running" not in found
    found = prune_sweep.search(sw, max_drop=0, against="original", steps=1)  # original: 0.5, and 50% passes
    assert found["best"]["budget"] == "50%" and found["target"] == 0.5


def test_keep_auto_exports_the_found_model(tiny_smol_dir, tmp_path):
    """--max-drop 100 lets every probe pass: two probes end at 25%, whose model is exported and reloads with the
    kept widths and the evaluated model's logits."""
    out = tmp_path / "auto"
    rep = run(
        out=str(out),
        model=str(tiny_smol_dir),
        quick=True,
        keep="auto",
        max_drop=100.0,
        overrides=[*SMALL, "data.validation_size=8", "search.steps=2"],
    )
    s = rep.data["results"]["search"]
    assert [p["budget"] for p in s["path"]] == ["50%", "25%"] and s["best"]["budget"] == "25%"
    assert s["reload"]["widths_match"] and s["reload"]["max_logit_diff"] < 1e-4
    man = json.loads((out / "checkpoint" / "surgery.json").read_text())
    assert man["layout"] == "sliced" and man["recipe"]["keep"] == "25%"
    md = (out / "report.md").read_text()
    assert "## Budget search" in md and "Found: **25%**" in md and "Searching" not in md


def test_latency_and_flop_ratio():
    dense = make_tiny("llama")
    sliced = sliced_copy(dense, {1: list(range(16)), 2: list(range(24))})  # multiples of 8: no padding
    lat = prune_sweep.latency(dense, sliced, [[3, 4, 5, 6], [7, 8]], 0, repeats=2)
    assert lat["speedup"] > 0 and lat["batch"] == [2, 4]
    assert lat["flop_ratio"] == pytest.approx(
        prune_sweep.matmul_params(sliced) / prune_sweep.matmul_params(dense), abs=1e-4
    )
    per_neuron = 3 * dense.config.hidden_size  # gate + up rows, down column
    assert prune_sweep.matmul_params(dense) - prune_sweep.matmul_params(sliced) == (32 + 24) * per_neuron
    assert isinstance(torch.get_num_threads(), int)
