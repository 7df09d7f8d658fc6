"""`surgery cna` end to end on a tiny saved model (prompt and dataset modes, validations, bad input)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from surgery.cli import main

SMOL = Path("checkpoints/base/smollm2-135m")


@pytest.fixture
def tiny_dir(tiny_smol_dir):
    return tiny_smol_dir


def test_prompt_mode_writes_table_and_files(tiny_dir, tmp_path, capsys):
    out = tmp_path / "cna"
    rc = main(
        [
            "cna",
            "--model",
            str(tiny_dir),
            "--prompt",
            "Calculate: 3+5=",
            "--ablate-head",
            "1.2",
            "--top",
            "5",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    data = json.loads((out / "cna.json").read_text())
    rows = data["results"]["neurons"]
    assert len(rows) == 5 and data["results"]["certified"]
    for r in rows:
        assert abs(r["imp_a"] - r["imp_b"] - r["delta"]) < 1e-5
        assert len(r["top_tokens"]) == 10
    assert (out / "cna_layers.png").stat().st_size > 1000
    assert "| neuron | imp A | imp B | delta |" in capsys.readouterr().out


def test_dataset_mode_with_validations(tiny_dir, tmp_path):
    out = tmp_path / "cna"
    rc = main(
        [
            "cna",
            "--model",
            str(tiny_dir),
            "--ops",
            "+",
            "--limit",
            "6",
            "--top",
            "5",
            "--validate",
            "mask,pe,fe",
            "--ablate-head",
            "0.1",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    res = json.loads((out / "cna.json").read_text())["results"]
    assert res["mode"] == "dataset" and res["certified"] == res["n_cases"]
    assert len(res["per_case_top"]) == res["n_cases"]
    v = res["validations"]
    rows = v["mask"]["rows"]
    assert len(res["neurons"]) == 99 and [r["k"] for r in rows] == [10, 20, 30, 50, 99]  # --validate mask ranks 99
    for r in rows:  # drops are differences of accuracies measured on the same cases
        assert all(-1 <= r[key] <= 1 for key in ("zero_top_drop", "zero_random_drop", "keep_top_deep_drop"))
        assert 0 <= r["kept_in_deep"] <= r["k"]
    assert v["mask"]["coefficient_drop"]["k"] == 10
    layers = {n["layer"] for n in res["neurons"][:30]}
    if len(layers) == 1:  # PE needs a lower and an upper layer among the top neurons
        assert v["pe"] == {"skipped": "all top neurons sit in one layer"}
    else:
        assert v["pe"]["n_upper"] == sum(n["layer"] > min(layers) for n in res["neurons"][:30])
        assert -1 <= v["pe"]["cos_value_key_upper"] <= 1
    assert v["fe"]["candidates"] > 0 and v["fe"]["layers"] == "0-1"


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["--prompt", "x", "--target", " nursery rhymes"], "is 2 tokens"),
        (["--prompt", "x", "--layers", "3-9"], "outside the model"),
        (["--prompt", "x", "--ablate-head", "1.9"], "head 1.9 is outside"),
        (["--prompt-b", "y"], "--prompt-b needs --prompt"),
    ],
)
def test_bad_input_is_one_line_exit_2(tiny_dir, capsys, argv, msg):
    rc = main(["cna", "--model", str(tiny_dir), *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and msg in err and len(err.splitlines()) == 1


def _launch(*args: str, processes: int = 2):
    """`accelerate launch` of `python -m surgery ...` on `processes` CPU processes (gloo), one thread each."""
    import os
    import shutil
    import subprocess
    import sys

    launcher = Path(sys.executable).with_name("accelerate")  # the venv's, also when PATH lacks .venv/bin
    if not launcher.exists():
        launcher = shutil.which("accelerate")
    assert launcher, "accelerate (a dependency) must provide its CLI"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [str(launcher), "launch", "--cpu", "--num_processes", str(processes), "-m", "surgery", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("mode", [["--digits", "1", "--limit", "9"], ["--pairs", "{pairs}"]])
def test_two_gloo_processes_equal_one(tiny_dir, tmp_path, mode):
    """Dataset-mode CNA split over 2 CPU processes (accelerate launch, gloo): the same per-case certified top-k in
    the same case order, the same neurons, and sums equal to float rounding."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps({"prompt_a": f"{a} works as a", "prompt_b": f"{b} works as a", "target": " nurse"}) + "\n"
            for a, b in [("Anna", "Peter"), ("Maria", "Mark"), ("Sofia", "Paul"), ("Emma", "John"), ("Eva", "Tom")]
        )
    )
    args = ["cna", "--model", str(tiny_dir), "--top", "5", *[a.format(pairs=pairs) for a in mode]]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    two = _launch(*args, "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    a = json.loads((tmp_path / "one" / "cna.json").read_text())["results"]
    b = json.loads((tmp_path / "two" / "cna.json").read_text())["results"]
    assert a["per_case_top"] == b["per_case_top"] and a["targets"] == b["targets"]
    assert (a["n_cases"], a["certified"], a["rescored"]) == (b["n_cases"], b["certified"], b["rescored"])
    assert [r["neuron"] for r in a["neurons"]] == [r["neuron"] for r in b["neurons"]]
    for x, y in zip(a["neurons"], b["neurons"]):
        assert x["score_sum"] == pytest.approx(y["score_sum"], abs=1e-4) and x["in_case_topk"] == y["in_case_topk"]
