"""Width rounding of sliced layers (surgery.slicing.PAD_MULTIPLE): padding neurons are exactly zero, the padded
model computes what the unpadded slice computes, and padding survives export, reload, re-slicing, padded layout,
diff and FFN LoRA training (docs/design.md section 1)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ARCHS, N, make_tiny, tiny_inputs
from transformers.activations import ACT2FN

from surgery.commands.diff.job import diff as diff_checkpoints
from surgery.edits.lora import LoraSpec, attach
from surgery.errors import UsageError
from surgery.io import checkpoint as export
from surgery.model.arch import ModelView
from surgery.model.slicing import kept_indices, padded_width, padding, slice_ffn

KEEP = {0: list(range(0, N, 3)), 2: [1, 2, 3, 40, 41]}  # 16 (a multiple of 8) and 5 (-> 8)


def _logits(model, x=None):
    with torch.no_grad():
        return model(**(x or tiny_inputs())).logits


def _act_name(cfg) -> str:
    return getattr(cfg, "hidden_act", None) or getattr(cfg, "hidden_activation", None) or cfg.activation_function


@pytest.mark.parametrize("arch", ARCHS)
def test_every_activation_maps_zero_to_zero(arch):
    """A padding neuron has zero keys and key bias: its coefficient is act(0) (plain) or act(0) * 0 (gated)."""
    act = ACT2FN[_act_name(make_tiny(arch).config)]
    assert torch.equal(act(torch.zeros(4)), torch.zeros(4))


def test_padded_width_rule():
    assert [padded_width(n, 48) for n in (0, 1, 5, 8, 9, 16, 17, 40, 41, 47, 48)] == [
        0,
        8,
        8,
        8,
        16,
        16,
        24,
        40,
        41,
        47,
        48,
    ]  # 41..47 would round to the base width: left as they are
    assert padded_width(5, 48, multiple=1) == 5 and padded_width(5, 48, multiple=16) == 16


@pytest.mark.parametrize("arch", ARCHS)
def test_padded_slice_equals_unpadded_slice(arch):
    """Padding neurons contribute exactly 0; the logits agree with the exact-width slice to fp32 rounding (a GEMM
    of another inner size may sum in another order, so bit-identity is not guaranteed on every kernel; the
    measured difference is printed by -s) and the padding weights are exactly zero."""
    model = make_tiny(arch)
    exact, padded = copy.deepcopy(model), copy.deepcopy(model)
    slice_ffn(exact, KEEP, multiple=1)
    slice_ffn(padded, KEEP)
    assert ModelView(exact).ffn_widths() == [16, N, 5] and ModelView(padded).ffn_widths() == [16, N, 8]
    assert padding(padded) == {0: 0, 2: 3} and kept_indices(padded) == kept_indices(exact)
    v = ModelView(padded)
    assert all(float(k[5:].abs().max()) == 0 for k in v.keys(2)) and float(v.values(2)[5:].abs().max()) == 0
    a, b = _logits(exact), _logits(padded)
    print(f"{arch}: max |padded - exact| = {float((a - b).abs().max()):.2e}")
    torch.testing.assert_close(b, a, atol=1e-6, rtol=0)


def test_reslicing_a_padded_layer_drops_padding_and_composes():
    model = make_tiny("llama")
    slice_ffn(model, {1: list(range(10, 27))})  # 17 kept -> width 24, padding at 17..23
    assert ModelView(model).ffn_width(1) == 24 and padding(model)[1] == 7
    slice_ffn(model, {1: [0, 5, 16, 17, 23]})  # 17 and 23 are padding positions: they keep nothing
    assert kept_indices(model) == {1: [10, 15, 26]} and ModelView(model).ffn_width(1) == 8
    ref = make_tiny("llama")
    slice_ffn(ref, {1: [10, 15, 26]}, multiple=1)
    torch.testing.assert_close(_logits(model), _logits(ref), atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3"])
def test_padding_survives_export_reload_and_padded_layout(arch, tmp_path):
    model = make_tiny(arch)
    slice_ffn(model, KEEP)
    export.save(model, None, tmp_path / "s", layout="sliced")
    back = export.load(tmp_path / "s")
    assert ModelView(back).ffn_widths() == [16, N, 8] and padding(back) == {0: 0, 2: 3}
    assert back.config.ffn_padding == [0, 0, 3]
    torch.testing.assert_close(_logits(back), _logits(model), atol=1e-6, rtol=0)
    export.save(back, None, tmp_path / "p", layout="padded")  # base shapes: the padding is dropped
    dense = export.load(tmp_path / "p")
    assert ModelView(dense).ffn_widths() == [N, N, N]
    torch.testing.assert_close(_logits(dense), _logits(model), atol=1e-5, rtol=0)
    d = diff_checkpoints(str(tmp_path / "p"), str(tmp_path / "s"))
    assert [r["padding"] for r in d.data["layers"]] == [0, 0, 3] and d.data["summary"]["modified"] == 0


@pytest.mark.parametrize("arch", ["llama", "phi3", "gpt2"])
def test_ffn_lora_keeps_padding_exactly_zero_after_training_and_merge(arch, tmp_path):
    """lora.ffn=true adapts the key and value projections of the pruned layers; the padding neurons' LoRA rows
    and columns are frozen at zero, so after AdamW steps and merging the exported padding is exactly zero."""
    model = make_tiny(arch)
    slice_ffn(model, KEEP)
    pm = attach(model, [1], LoraSpec(rank=4), ffn_layers=[0, 2])
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    x = tiny_inputs()
    for _ in range(3):
        pm(**x, labels=x["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()
    merged = copy.deepcopy(pm).merge_and_unload()
    v = ModelView(merged)
    assert float(v.values(2)[:5].abs().max()) > 0
    assert all(float(k[5:].abs().max()) == 0 for k in v.keys(2)) and float(v.values(2)[5:].abs().max()) == 0
    changed = any(not torch.equal(a, b) for a, b in zip(ModelView(model).keys(2), v.keys(2)))
    assert changed  # the LoRA did train the real neurons' keys
    export.save(pm.get_base_model(), None, tmp_path / "m", layout="sliced", adapter_model=pm, merge=True)
    back = export.load(tmp_path / "m")
    assert padding(back)[2] == 3
    assert all(float(k[5:].abs().max()) == 0 for k in ModelView(back).keys(2))
    torch.testing.assert_close(_logits(back), _logits(merged), atol=1e-5, rtol=0)


def test_export_refuses_nonzero_padding(tmp_path):
    """Weights trained outside surgery.lora (e.g. full fine-tuning) may move a padding neuron: it is then no
    longer padding and the manifest would lie, so export refuses before writing anything."""
    model = make_tiny("llama")
    slice_ffn(model, KEEP)
    with torch.no_grad():
        ModelView(model).values(2)[6] += 1.0
    with pytest.raises(UsageError, match="padding neurons"):
        export.save(model, None, tmp_path / "x", layout="sliced")
    assert not (tmp_path / "x").exists()


def test_multiple_one_turns_rounding_off_and_bad_multiple_is_an_error():
    model = make_tiny("llama")
    assert slice_ffn(model, {0: [1, 2, 3]}, multiple=1) == {0: 3} and padding(model) == {0: 0}
    with pytest.raises(UsageError, match="multiple must be >= 1"):
        slice_ffn(model, {0: [1]}, multiple=0)
