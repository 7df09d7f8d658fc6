"""End to end on the real SmolLM2-135M: `surgery prune --recipe arithmetic-prune --keep top50 --quick` shrunk
further with --set overrides (CI budget: a few minutes on 2 cores)."""

from __future__ import annotations

import json

import pytest

from surgery.commands.diff.job import diff as diff_checkpoints
from surgery.model.slicing import padded_width

pytestmark = [pytest.mark.real, pytest.mark.slow]

SMALL = [
    "train.max_steps=4",
    "train.batch_size=4",
    "data.per_op=40",
    "data.test_size=16",
    "data.train_limit=32",
    "data.one_digit_limit=16",
    "cna.limit=12",
    "cna.max_rescore=256",
]
ROWS = [
    "original",
    "LoRA only",
    "cna-pruned + LoRA",
    "random-pruned + LoRA",
    "magnitude-pruned + LoRA",
    "activation-pruned + LoRA",
    "taylor-pruned + LoRA",
]


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, smol):
    from surgery.commands.prune import run

    out = tmp_path_factory.mktemp("prune") / "x"
    return out, run(out=str(out), quick=True, keep="top50", overrides=SMALL, export="gguf")


def test_report_rows_and_budget(pruned):
    out, rep = pruned
    res = rep.data["results"]
    assert [r["name"] for r in res["rows"]] == ROWS
    kept = [r["kept"] for r in res["rows"][2:]]
    assert len(set(kept)) == 1 and kept[0] > 0  # every selector at the same budget
    assert set(res["kept"]["cna"]) == set(range(15, 30))
    for sel, per_layer in res["kept"].items():
        assert per_layer == res["kept"]["cna"], sel
    for r in res["rows"]:
        assert 0 <= r["test2"]["full_answer_acc"] <= 1 and len(r["test2"]["full_answer_ci95"]) == 2
    assert "| cna-pruned + LoRA |" in rep.markdown


def test_checkpoint_widths_and_reload(pruned):
    from transformers import AutoModelForCausalLM

    from surgery.model.arch import ModelView

    out, rep = pruned
    for name in ("surgery.json", "report.json", "report.md", "accuracy.png", "kept.png", "config.json"):
        assert (out / name).exists(), name
    assert (out / "adapter" / "adapter_config.json").exists()
    kept = rep.data["results"]["kept_indices"]
    back = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()
    widths = ModelView(back).ffn_widths()
    assert all(widths[l] == padded_width(len(kept[l]), 1536) for l in kept) and all(w == 1536 for w in widths[:15])
    prov = json.loads((out / "surgery.json").read_text())
    assert prov["layout"] == "sliced"
    assert rep.data["results"]["reload"]["widths_match"]
    assert rep.data["results"]["reload"]["max_logit_diff"] < 1e-4


def test_export_gguf_sits_in_the_checkpoint_and_runs_in_llama_cpp(pruned):
    """--export gguf: the pruned model (LoRA merged) as one GGUF in the checkpoint folder, listed with its sha256 in
    surgery.json, carrying the provenance; llama.cpp runs it as `deci` at the checkpoint's own widths and decodes
    what the reloaded checkpoint decodes."""
    from surgery.commands.inspect.job import inspect as inspect_path
    from surgery.io import checkpoint, llamacpp
    from surgery.io.gguf_file import read_gguf

    out, rep = pruned
    manifest = json.loads((out / "surgery.json").read_text())
    (record,) = manifest["exports"]
    path = out / record["file"]
    assert record["format"] == "gguf" and record["arch"] == "deci" and record["file"] in manifest["files"]
    g = read_gguf(path)
    assert g["problems"] == [] and g["widths"] == [w or 1 for w in manifest["ffn"]["widths"]]  # 0: one zero neuron
    assert g["manifest"]["recipe"]["keep"] == "top50" and g["manifest"]["layout"] == "sliced"
    assert inspect_path(str(out)).data["problems"] == []
    if not llamacpp.available():
        pytest.skip("llama-cpp-python not installed")
    from transformers import AutoTokenizer

    back, tok = checkpoint.load(out), AutoTokenizer.from_pretrained(str(out))
    llm = llamacpp.open_gguf(path)
    for prompt in ("Calculate: 23+45=", "Calculate: 7*8="):
        ids = tok.encode(prompt)
        assert llamacpp.greedy(llm, ids, 6) == llamacpp.transformers_greedy(back, ids, 6), prompt


def test_reloaded_checkpoint_answers_like_report(pruned):
    """The exported model scores the 1-digit set exactly as the in-memory model did."""
    from surgery.evals.arithmetic import DataSpec, accuracy, build_splits
    from surgery.io import checkpoint as export
    from surgery.io.loading import load_model

    out, rep = pruned
    tok = load_model("smollm2-135m").tokenizer
    spec = DataSpec(per_op=40, test_size=16, train_limit=32, one_digit_limit=16, validation_size=0)
    acc = accuracy(export.load(out), tok, build_splits(spec).one_digit)["overall"]["full_answer_acc"]
    assert acc == pytest.approx(rep.data["results"]["rows"][2]["one_digit"]["full_answer_acc"])


def test_lora_sweep_quick(tmp_path, smol):
    from surgery.commands.lora_sweep import run as sweep

    out = tmp_path / "sweep"
    rep = sweep(out=str(out), quick=True, layers="8", overrides=SMALL + ["cna.limit=4", "sweep.top=5"])
    rows = rep.data["results"]["layers"]
    assert [r["layer"] for r in rows] == [8]
    amp = rows[0]["amplification"]
    assert len(amp) == 4 and sum(a["neurons"] for a in amp) >= 5  # the union of per-case top-5 lists
    assert all(a["ratio"] > 0 and a["orig"] > 0 for a in amp if a["neurons"])  # mean |m| of real neurons
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG" and (out / "report.md").exists()


def test_prune_checkpoint_inspects_and_diffs(pruned, capsys):
    """prune's checkpoint goes through the one manifest writer: base id + sha256, inspect exit 0, diff reads it."""
    from surgery.cli import main as cli_main

    out, rep = pruned
    m = json.loads((out / "surgery.json").read_text())
    assert m["base"]["id"] == "smollm2-135m" and len(m["base"]["sha256"]) == 64
    assert cli_main(["inspect", str(out)]) == 0 and "All hashes match" in capsys.readouterr().out
    d = diff_checkpoints("smollm2-135m", str(out))
    kept = rep.data["results"]["kept_indices"]
    assert all(d.data["summary"]["widths"][int(l)] == padded_width(len(k), 1536) for l, k in kept.items())
