"""`surgery prune` on the user's own rows (`--data` / recipe data.path): the task protocol's splits, training rows,
selection cases and teacher-forced test scores drive every prune step, single run and sweep alike."""

from __future__ import annotations

import json

from surgery.commands.prune import run
from surgery.evals import tasks

FAST = ["train.max_steps=2", "train.batch_size=4", "cna.limit=8", "cna.max_rescore=256", "baselines=[random]"]


def test_custom_prune_recipe_runs_on_the_shipped_capitals(tiny_smol_dir, tmp_path):
    out = tmp_path / "cap"
    rep = run(model=str(tiny_smol_dir), recipe="custom-prune", quick=True, keep="top3", overrides=FAST, out=str(out))
    res = rep.data["results"]
    ds = tasks.load_cases("capitals.csv")
    parts = tasks.split(ds, 0, 0.2, 0.1)
    assert res["data"] == {
        "train": len(parts["train"]),
        "test": len(parts["test"]),
        "validation": len(parts["validation"]),
    }
    assert [r["name"] for r in res["rows"]] == ["original", "LoRA only", "cna-pruned + LoRA", "random-pruned + LoRA"]
    for r in res["rows"]:
        assert r["test"]["n_problems"] == len(parts["test"]) and 0 <= r["test"]["full_answer_acc"] <= 1
        assert "test2" not in r
    assert "| test acc % [95% CI] |" in (out / "report.md").read_text()
    assert json.loads((out / "surgery.json").read_text())["recipe"]["data"]["path"] == "capitals.csv"


def test_data_flag_with_column_mapping_in_a_sweep(tiny_smol_dir, tmp_path):
    f = tmp_path / "facts.jsonl"
    rows = [{"q": f"Calculate: {a}+{b}=", "a": str(a + b)} for a in range(8) for b in range(8)]
    f.write_text("\n".join(json.dumps(r) for r in rows))
    rep = run(
        model=str(tiny_smol_dir),
        quick=True,
        data=str(f),
        columns="prompt=q,target=a",
        sweep="50%",
        overrides=[*FAST, "data.test_size=0.25", "data.validation_size=8"],
        out=str(tmp_path / "s"),
    )
    cells = rep.data["results"]["cells"]
    assert sorted(c["selector"] for c in cells) == ["cna", "random"]
    assert all(c["test"]["n_problems"] == 16 and c["validation"]["n_problems"] == 8 for c in cells)
