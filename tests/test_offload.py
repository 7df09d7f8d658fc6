"""`--device auto --max-memory`: a model that does not fit is offloaded to disk (accelerate) and gives the results
of the in-memory run; caps that cannot work are refused with one line."""

from __future__ import annotations

import json

import pytest
import torch

from surgery.cli import main
from surgery.io.loading import load_model
from surgery.model.arch import ArchError, ModelView
from surgery.model.offload import any_offloaded

# the tiny SmolLM2-tokenizer model: 4 layers of ~35 KiB (fp32), a 6 MiB embedding; 40 KiB puts most of it on disk
CAP = ["--device", "auto", "--max-memory", "cpu=40KiB"]


def test_a_capped_model_is_offloaded_to_disk_and_computes_the_same_logits(tiny_smol_dir):
    ref = load_model(str(tiny_smol_dir)).model
    capped = load_model(str(tiny_smol_dir), device="auto", max_memory={"cpu": 40 * 1024})
    where = set(capped.model.hf_device_map.values())
    assert "disk" in where and any_offloaded(capped.model)
    ids = torch.tensor([[1, 500, 20, 7, 9]])
    assert torch.equal(ref(input_ids=ids).logits, capped.model(input_ids=ids).logits)
    view, mem = ModelView(capped.model), ModelView(ref)
    for layer in range(view.n_layers):  # weights read as math objects come back from disk
        assert torch.equal(view.values(layer), mem.values(layer))
        assert all(torch.equal(a, b) for a, b in zip(view.keys(layer), mem.keys(layer)))
    assert torch.equal(view.unembed_matrix(), mem.unembed_matrix())
    assert torch.equal(view.final_gain(), mem.final_gain())
    with pytest.raises(ArchError, match="offloaded"):  # an in-place edit would be lost: refused
        view.zero_neuron_weights(0, [1])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_offloaded_cna_equals_the_in_memory_run(tiny_smol_dir, tmp_path, dtype):
    """Dataset-mode CNA: the same certified per-case top-k, the same neurons, the same scores (bf16: the fp32
    compute of upcast.py runs on weights streamed in from disk)."""
    args = ["cna", "--model", str(tiny_smol_dir), "--digits", "1", "--limit", "9", "--top", "5", "--dtype", dtype]
    assert main([*args, "--out", str(tmp_path / "mem")]) == 0
    assert main([*args, *CAP, "--out", str(tmp_path / "off")]) == 0
    a = json.loads((tmp_path / "mem" / "cna.json").read_text())["results"]
    b = json.loads((tmp_path / "off" / "cna.json").read_text())["results"]
    assert a["per_case_top"] == b["per_case_top"] and a["certified"] == b["certified"]
    assert [r["neuron"] for r in a["neurons"]] == [r["neuron"] for r in b["neurons"]]
    for x, y in zip(a["neurons"], b["neurons"]):
        assert x["score_sum"] == pytest.approx(y["score_sum"], abs=1e-6)


def test_offloaded_eval_and_head_screen_equal_the_in_memory_runs(tiny_smol_dir, tmp_path):
    ev = ["eval", "--model", str(tiny_smol_dir), "--digits", "1", "--limit", "12"]
    assert main([*ev, "--out", str(tmp_path / "e1")]) == 0
    assert main([*ev, *CAP, "--out", str(tmp_path / "e2")]) == 0
    r1, r2 = (json.loads((tmp_path / e / "report.json").read_text())["results"] for e in ("e1", "e2"))
    assert r1 == r2
    hs = ["heads", "--model", str(tiny_smol_dir), "--mode", "screen", "--digits", "1", "--limit", "6", "--verify", "1"]
    assert main([*hs, "--out", str(tmp_path / "h1")]) == 0
    assert main([*hs, *CAP, "--out", str(tmp_path / "h2")]) == 0
    h1, h2 = (json.loads((tmp_path / h / "heads.json").read_text())["results"] for h in ("h1", "h2"))
    assert h1["screen"]["verified"] == h2["screen"]["verified"]  # the screen's top head, then its exact ablation
    for a, b in zip(h1["screen"]["predicted_logprob_drop_sum"], h2["screen"]["predicted_logprob_drop_sum"]):
        assert a == pytest.approx(b, abs=1e-5)
    assert h1["heads"] == h2["heads"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--device", "auto", "--max-memory", "cpu=8XB"], "cannot read 'cpu=8XB'"),
        (["--device", "auto", "--max-memory", "gpu0=8GiB"], "DEVICE=SIZE"),
        (["--device", "auto", "--max-memory", "cpu=0"], "above 0"),
        (["--device", "auto", "--max-memory", "cpu=1KiB"], "smaller than one layer"),
        (["--max-memory", "cpu=8GiB"], "add --device auto"),
    ],
)
def test_bad_memory_caps_are_one_line_exit_2_nothing_written(tiny_smol_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "never"
    try:  # argparse's checks exit; the loader's return 2
        rc = main(["cna", "--model", str(tiny_smol_dir), "--prompt", "1+2=", *extra, "--out", str(out)])
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert message in err and len(err.splitlines()) == 1 and not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_device_cuda_without_cuda_is_one_line_exit_2(tiny_smol_dir, tmp_path, capsys):
    out = tmp_path / "never"
    rc = main(["cna", "--model", str(tiny_smol_dir), "--prompt", "1+2=", "--device", "cuda", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "no CUDA device" in err and len(err.splitlines()) == 1 and not out.exists()
