"""surgery finetune --data: precise SFT on the user's cases (tiny Llama with the real tokenizer, a tiny JSONL):
it trains on the train split and reports the test split's full-target accuracy (per group too), the head scan
runs on the train rows, an interrupted run resumes from its rows (keyed by the data file's content), and bad
input is one line, exit 2, nothing written."""

from __future__ import annotations

import json

import pytest

from surgery.cli import main
from surgery.commands.finetune import job as ft
from surgery.commands.finetune import run as finetune_run

ROWS = [
    ("France", " Paris", "eu"),
    ("Italy", " Rome", "eu"),
    ("Japan", " Tokyo", "asia"),
    ("Spain", " Madrid", "eu"),
    ("China", " Beijing", "asia"),
    ("Malaysia", " Kuala Lumpur", "asia"),
    ("Andorra", " Andorra la Vella", "eu"),
    ("Peru", " Lima", "sa"),
    ("Chile", " Santiago", "sa"),
    ("Egypt", " Cairo", "af"),
]
SMALL = [
    "general.mmlu=4",
    "general.csqa=4",
    "general.xsum_docs=2",
    "general.xsum_max_length=32",
    "train.max_steps=2",
    "train.batch_size=4",
    "methods=[precise,precise+mlp]",
    "top_heads=2",
    "scan.mlps=1",
    "data.test_size=0.3",
]


def _jsonl(path, rows=ROWS):
    path.write_text(
        "".join(json.dumps({"prompt": f"The capital of {c} is", "target": t, "group": g}) + "\n" for c, t, g in rows)
    )
    return path


def _run(tiny, data, out, **kw):
    return finetune_run(model=str(tiny), out=str(out), quick=True, data=str(data), overrides=SMALL, **kw)


def test_trains_reports_task_metric_and_resumes(tiny_smol_dir, tmp_path, monkeypatch):
    data = _jsonl(tmp_path / "d.jsonl")
    scans = []
    real_scan = ft.scan_components
    monkeypatch.setattr(ft, "scan_components", lambda *a: scans.append(a[2]) or real_scan(*a))
    calls = []
    real_row = ft._run_row

    def row(*a):
        calls.append(a[0].name)
        return real_row(*a)

    monkeypatch.setattr(ft, "_run_row", row)
    real_report = ft._report
    monkeypatch.setattr(ft, "_report", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):  # interrupted after every row, before the report
        _run(tiny_smol_dir, data, tmp_path / "o")
    assert (
        calls[:2] == ["base", "precise, 2 heads"] and calls[2].startswith("precise, 2 heads + MLPs") and len(calls) == 3
    )
    assert len(scans[0]) == 7  # the scan ran on the 7 train rows (test_size 0.3 of 10)
    monkeypatch.setattr(ft, "_report", real_report)
    calls.clear()
    rep = _run(tiny_smol_dir, data, tmp_path / "o")
    assert calls == []  # resumed: every row came from rows.jsonl
    rows = rep.data["results"]["rows"]
    assert [r["name"] for r in rows][:2] == ["base", "precise, 2 heads"]
    for r in rows:
        m = r["metrics"]
        assert "task" in m and "arith" not in m and "asdiv" not in m and m["task"]["n"] == 3
        assert {"mmlu", "csqa", "xsum"} <= set(m) and len(m["task"]["ci95"]) == 2
        assert r["kind"] == "base" or "delta" in m["task"]
    assert rows[1]["trained_params"] > 0 and rows[1]["step_seconds"] is not None
    groups = rep.data["results"]["task_groups"]["base"]
    assert sum(g["n"] for g in groups.values()) == 3
    assert rep.data["config"]["data"]["train"] == 7 and len(rep.data["config"]["data"]["sha256"]) == 64
    assert "task %" in rep.markdown and "2-digit arith" not in rep.markdown
    assert (tmp_path / "o" / "report.json").exists() and not (tmp_path / "o.partial").exists()


def test_resume_is_keyed_by_the_data_content(tiny_smol_dir, tmp_path, monkeypatch):
    a = ft.data_identity(str(_jsonl(tmp_path / "d.jsonl")), None)
    b = ft.data_identity(str(_jsonl(tmp_path / "d.jsonl", ROWS[:-1] + [("Egypt", " Alexandria", "af")])), None)
    assert a["data"] == b["data"] and a["sha256"] != b["sha256"]
    r = ft.FinetuneRecipe()
    from surgery.find.components import Components

    c = Components([(0, 1)], [])
    assert ft._fingerprint("m", r, c, [], a) != ft._fingerprint("m", r, c, [], b)
    assert ft.data_identity("capitals.csv", None)["sha256"]  # a shipped table named bare


def _cli(argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code)


@pytest.mark.parametrize(
    "content, name, phrase",
    [
        ('{"question": "a", "answer": " b"}\n', "d.jsonl", "no column prompt"),
        ("", "d.jsonl", "is empty"),
        ('{"prompt": "a", "target": " "}\n', "d.jsonl", "empty in 1 row"),
        ("prompt,target\n", "d.txt", "unknown format"),
        (
            "".join(f'{{"prompt": "p{i}", "target": " t", "split": "train"}}\n' for i in range(4)),
            "d.jsonl",
            "split 'test' has no rows",
        ),
    ],
)
def test_bad_data_is_one_line_exit_2_nothing_written(tiny_smol_dir, tmp_path, capfd, content, name, phrase):
    data = tmp_path / name
    data.write_text(content)
    out = tmp_path / "o"
    assert _cli(["finetune", "--model", str(tiny_smol_dir), "--quick", "--data", str(data), "--out", str(out)]) == 2
    err = capfd.readouterr().err
    assert len(err.strip().splitlines()) == 1 and phrase in err, err
    assert not out.exists() and not (tmp_path / "o.partial").exists()


def test_duplicate_prompts_across_splits_warn_with_count(capfd):
    from datasets import Dataset

    ds = Dataset.from_dict(
        {
            "prompt": ["a", "a", "b", "c"],
            "target": [" x"] * 4,
            "group": ["all"] * 4,
            "split": ["train", "test", "train", "test"],
        }
    )
    parts = ft.user_splits(ds, ft.FinetuneRecipe())
    assert len(parts["train"]) == 2 and "1 test prompt(s) also appear" in capfd.readouterr().err


def test_a_row_killed_mid_training_resumes_from_its_saved_state(tiny_smol_dir, tmp_path, monkeypatch):
    """save_steps=2: a row killed just after its step-4 save resumes at step 4 (weights, AdamW, scheduler, RNG and
    data position restored) and ends where an uninterrupted row ends: the same losses and the same evaluation."""
    from transformers import TrainerCallback

    data = _jsonl(tmp_path / "d.jsonl")
    over = [*SMALL, "train.max_steps=6", "save_steps=2", "methods=[precise]", "train.warmup_ratio=0.0"]

    def go(out):
        return finetune_run(model=str(tiny_smol_dir), out=str(out), quick=True, data=str(data), overrides=over)

    whole = go(tmp_path / "whole").data["results"]["rows"]

    class Kill(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.global_step == 4:
                raise KeyboardInterrupt

    real = ft.answer_trainer
    monkeypatch.setattr(ft, "answer_trainer", lambda *a, **k: _with(real(*a, **k), Kill()))
    with pytest.raises(KeyboardInterrupt):
        go(tmp_path / "o")
    saved = list((tmp_path / "o.partial" / "state").glob("*/checkpoint-4"))
    assert len(saved) == 1
    progress = (tmp_path / "o.partial" / "progress.md").read_text()  # the finished base row, readable mid-run
    assert "1 of 2 rows finished" in progress and "| base |" in progress and "precise, 2 heads" not in progress
    steps = []

    class Count(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            steps.append(state.global_step)

    monkeypatch.setattr(ft, "answer_trainer", lambda *a, **k: _with(real(*a, **k), Count()))
    resumed = go(tmp_path / "o").data["results"]["rows"]
    assert steps == [5, 6]  # the resumed row ran only the steps after its save
    a, b = whole[1], resumed[1]
    assert a["name"] == b["name"] == "precise, 2 heads"
    losses = lambda r: [(e["step"], e["loss"]) for e in r["log"] if "loss" in e]  # noqa: E731
    assert [s for s, _ in losses(b)] == [1, 2, 3, 4, 5, 6]  # the saved log history is restored with the state
    assert [x for _, x in losses(b)] == pytest.approx([x for _, x in losses(a)], rel=1e-5)
    assert json.dumps(b["metrics"], sort_keys=True) == json.dumps(a["metrics"], sort_keys=True)
    assert b["commit"] == a["commit"]
    assert not (tmp_path / "o.partial").exists()


def _with(trainer, callback):
    trainer.add_callback(callback)
    return trainer
