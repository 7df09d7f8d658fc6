"""`surgery diff` with a GGUF file on one side (surgery/io/gguf_file.py GgufTensors, surgery/io/diff.py GgufWeights).

Identities, no training, no search: a GGUF written from a model reads back under the model's Hugging Face names
with llama.cpp's conversions undone (Llama/Deci Q/K row permutation, Gemma 3 norms + 1, GPT-2 Conv1D transpose,
NeoX query_key_value regrouping), so diffing it against the checkpoint folder of the same model reports nothing;
an edit made before export (zeroed neurons, a zeroed head) and a per-layer slicing (`deci`) are reported exactly.
"""

from __future__ import annotations

import json

import pytest
import torch
from test_gguf import WIDTHS, needs_tokenizer, sliced, tiny, tokenizer

from surgery.cli import main
from surgery.commands.diff.job import diff
from surgery.io.checkpoint import save
from surgery.io.gguf_file import _permute, _unpermute, hf_tensors, read_gguf, write_gguf
from surgery.model.arch import ModelView

N = 96  # tiny()'s FFN width


def _folder(model, tmp_path, name="base"):
    save(model, tokenizer(), tmp_path / name, layout="sliced")
    return tmp_path / name


def _nothing_changed(data: dict) -> None:
    s = data["summary"]
    assert all(s[k] == 0 for k in s if k != "widths"), s
    assert data["other_tensors"] == [] and data["changed_components"] == {"heads": [], "kv_heads": [], "mlps": []}
    for r in data["layers"]:
        assert not r.get("heads_q_modified") and not r.get("kv_heads_modified") and not r.get("qkv_outside_heads"), r


def test_unpermute_inverts_permute():
    for shape, heads in (((64, 8), 4), ((32, 64), 2), ((64,), 4), ((48, 5), 3)):
        x = torch.randn(shape)
        assert torch.equal(_unpermute(_permute(x, heads), heads), x)
        assert not torch.equal(_permute(x, heads), x)


@needs_tokenizer
def test_same_model_as_gguf_diffs_as_unchanged_both_ways(tmp_path, capsys):
    model = tiny("llama")
    base = _folder(model, tmp_path)
    path = write_gguf(model, tokenizer(), tmp_path / "m.gguf", "f32").path
    sd, back = model.state_dict(), hf_tensors(path, model.config)
    assert set(back) == set(sd) - {"lm_head.weight"}  # the tied head is not written
    assert all(torch.equal(back[k], sd[k]) for k in back)
    assert main(["diff", str(base), str(path), "--out", str(tmp_path / "rep")]) == 0
    data = json.loads((tmp_path / "rep" / "diff.json").read_text())
    _nothing_changed(data)
    assert data["tolerance"] == 1e-6 and data["summary"]["widths"] == [N] * 3
    _nothing_changed(diff(str(path), str(base)).data)  # the GGUF as BASE: the folder's config serves both


@needs_tokenizer
@pytest.mark.parametrize("gguf_type", ["f32", "f16", "bf16", "q8_0", "q4_0"])
def test_edits_made_before_export_are_reported_exactly(gguf_type, tmp_path):
    """Three zeroed neurons, a zeroed head and a neuron scaled x2.5, through each storage type; a neuron whose value
    column is 100x smaller than its neighbours (their blocks set its q8_0 / q4_0 rounding) is not flagged."""
    model = tiny("llama")
    view = ModelView(model)
    with torch.no_grad():
        view.ffn_out(0).weight[:, 7] *= 0.01
    base = _folder(model, tmp_path)
    with torch.no_grad():
        for n in (5, 17, 40):  # three neurons of layer 1: keys and value columns
            for m in view.ffn_in(1):
                m.weight[n] = 0
                m.bias[n] = 0
            view.ffn_out(1).weight[:, n] = 0
        dh = view.head_dim
        view.attn_out(2).weight[:, 3 * dh : 4 * dh] = 0  # head 2.3's output columns
        view.ffn_out(2).weight[:, 8] *= 2.5
    path = write_gguf(model, tokenizer(), tmp_path / f"m-{gguf_type}.gguf", gguf_type).path
    r = diff(str(base), str(path))
    L = r.data["layers"]
    assert L[1]["zeroed"] == [5, 17, 40] and L[0]["zeroed"] == [] and L[2]["zeroed"] == []
    assert [x["heads_zeroed"] for x in L] == [[], [], [3]]
    assert [s["neuron"] for x in L for s in x["scaled"]] == [8] and L[2]["amplified"] == [8]
    assert L[2]["scaled"][0]["factor"] == pytest.approx(2.5, abs=1e-6 if gguf_type == "f32" else 0.02)
    assert all(not x["modified"] and not x["heads_modified"] and not x["heads_scaled"] for x in L)
    assert all(not x["heads_q_modified"] and not x["kv_heads_modified"] for x in L)
    assert r.data["other_tensors"] == []
    assert r.data["changed_components"] == {"heads": ["2.3"], "kv_heads": [], "mlps": [1, 2]}


@needs_tokenizer
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_per_layer_widths_deci_report_the_removed_neurons(arch, tmp_path):
    model = tiny(arch)
    base = _folder(model, tmp_path)
    cut = sliced(tiny(arch), WIDTHS)
    written = write_gguf(cut, tokenizer(), tmp_path / "cut.gguf", "f32")
    assert written.arch == "deci" and read_gguf(written.path)["widths"] == [64, 32, 96]
    r = diff(str(base), str(written.path))
    L = r.data["layers"]
    assert r.data["summary"]["widths"] == [64, 32, 96]
    for l, w in WIDTHS.items():
        kept = list(range(0, N, max(1, N // w)))[:w]  # as sliced() keeps them
        assert L[l]["removed"] == sorted(set(range(N)) - set(kept)), l
        assert L[l]["base_width"] == N and L[l]["unmatched"] == 0 and L[l]["padding"] == 0
        assert not L[l]["zeroed"] and not L[l]["modified"] and not L[l]["scaled"]
        assert not L[l]["heads_zeroed"] and not L[l]["heads_modified"] and not L[l]["heads_q_modified"]
    assert r.data["other_tensors"] == [] and r.data["changed_components"]["mlps"] == [0, 1]


@needs_tokenizer
@pytest.mark.parametrize("arch", ["gemma3", "gpt2", "gpt_neox"])
def test_converted_architectures_round_trip_unchanged(arch, tmp_path):
    """Gemma 3 (norms + 1, q/k norms too), GPT-2 (Conv1D transposed), NeoX (query_key_value regrouped, untied
    head)."""
    model = tiny(arch)
    base = _folder(model, tmp_path)
    path = write_gguf(model, tokenizer(), tmp_path / "m.gguf", "f32").path
    sd, back = model.state_dict(), hf_tensors(path, model.config)
    for k, t in back.items():
        assert t.shape == sd[k].shape and (t - sd[k]).abs().max() <= 1e-6 * max(1.0, float(sd[k].abs().max())), k
    _nothing_changed(diff(str(base), str(path)).data)


@needs_tokenizer
def test_bad_gguf_input_is_one_line(tmp_path, capfd):
    tok = tokenizer()
    a = write_gguf(tiny("llama"), tok, tmp_path / "a.gguf", "f32").path
    b = write_gguf(tiny("gpt2"), tok, tmp_path / "b.gguf", "f32").path
    base = _folder(tiny("llama"), tmp_path)
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\0" * 10)
    cases = [
        ([str(a), str(b)], "both GGUF files"),
        ([str(base), str(b)], "'gpt2' model"),
        ([str(b), str(base)], "'gpt2' model"),
        ([str(base), str(tmp_path / "missing.gguf")], "no such GGUF file"),
        ([str(base), str(tmp_path / "junk.gguf")], "not a readable GGUF file"),
    ]
    capfd.readouterr()
    for argv, phrase in cases:
        assert main(["diff", *argv]) == 2, argv
        err = capfd.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("surgery: error:") and phrase in err[0], (argv, err)
