"""Physical FFN slicing: sliced == dense with the other neurons zeroed, exact shapes, config widths, composition."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ARCHS, N, make_tiny, tiny_inputs

from surgery.errors import UsageError
from surgery.model.arch import ModelView
from surgery.model.slicing import (
    base_width,
    dense_equivalent,
    ffn_param_count,
    keep_to_mask,
    kept_indices,
    mask_to_keep,
    removed,
    slice_ffn,
)

ATOL = 1e-5


def _keep(seed: int = 0) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {0: torch.randperm(N, generator=g)[:17], 2: torch.randperm(N, generator=g)[:5]}


def _logits(model, x):
    with torch.no_grad():
        return model(**x).logits


@pytest.mark.parametrize("multiple", [1, 8])
@pytest.mark.parametrize("arch", ARCHS)
def test_sliced_equals_dense_with_other_neurons_zeroed(arch, multiple):
    """Exact widths (multiple=1) and the default rounding up to 8 with zero padding neurons (17 -> 24, 5 -> 8)."""
    model, x, keep = make_tiny(arch), tiny_inputs(), _keep()
    dense = copy.deepcopy(model)
    dense_equivalent(dense, keep)
    before = ffn_param_count(model)
    widths = slice_ffn(model, keep, multiple=multiple)
    assert widths == ({0: 17, 2: 5} if multiple == 1 else {0: 24, 2: 8})
    torch.testing.assert_close(_logits(model, x), _logits(dense, x), atol=ATOL, rtol=0)
    v = ModelView(model)
    assert v.ffn_widths() == [widths[0], N, widths[2]]
    assert model.config.ffn_padding == [widths[0] - 17, 0, widths[2] - 5]
    for layer, k in widths.items():
        for key in v.keys(layer):
            assert key.shape[0] == k
        assert v.values(layer).shape[0] == k
        for mod in v.ffn_in(layer):
            b = getattr(mod, "bias", None)
            assert b is None or b.numel() == k * (2 if v.arch.ffn_kind == "fused" else 1)
    assert ffn_param_count(model) < before


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3"])
def test_config_records_widths_and_base(arch):
    model = make_tiny(arch)
    slice_ffn(model, _keep())
    cfg = model.config
    assert cfg.ffn_widths == [24, N, 8]  # 17 and 5 kept, rounded up to multiples of 8
    assert cfg.ffn_padding == [7, 0, 3]
    assert base_width(model) == N
    assert cfg.is_heterogeneous
    attr = ModelView(model).arch.width_attr
    assert [getattr(cfg.per_layer_config[i], attr) for i in range(3)] == [24, N, 8]


def test_slicing_twice_composes_in_base_numbering():
    model, x = make_tiny("llama"), tiny_inputs()
    dense = copy.deepcopy(model)
    slice_ffn(model, {1: list(range(10, 30))})
    slice_ffn(model, {1: [0, 5, 19]})
    assert kept_indices(model) == {1: [10, 15, 29]}
    dense_equivalent(dense, {1: [10, 15, 29]})
    torch.testing.assert_close(_logits(model, x), _logits(dense, x), atol=ATOL, rtol=0)


def test_sliced_model_generates_and_trains():
    model = make_tiny("qwen2")
    slice_ffn(model, _keep())
    out = model.generate(tiny_inputs(batch=1)["input_ids"], max_new_tokens=4, do_sample=False)
    assert out.shape[1] == 7 + 4
    model.train()
    model(**tiny_inputs(), labels=tiny_inputs()["input_ids"]).loss.backward()
    assert ModelView(model).ffn_out(0).weight.grad.shape[1] == 24  # 17 kept + 7 padding


def test_bad_indices_are_one_line_errors():
    model = make_tiny("llama")
    with pytest.raises(UsageError, match="layer 0: neuron indices must be in 0..47"):
        slice_ffn(model, {0: [0, 48]})
    with pytest.raises(UsageError, match="layer 7 is outside"):
        slice_ffn(model, {7: [0]})


def test_mask_helpers_round_trip():
    keep = {0: [3, 1], 2: [0]}
    masks = keep_to_mask(keep, [4, 4, 4])
    assert masks[1].all() and masks[0].tolist() == [False, True, False, True]
    assert mask_to_keep(masks)[0].tolist() == [1, 3]
    assert removed([3, 1], 4).tolist() == [0, 2]


@pytest.mark.parametrize("arch", ARCHS)
def test_bias_compensation_equals_dense_with_removed_neurons_at_their_mean(arch):
    """FLAP's fix, exactly: folding mean(m_k) v_k of the removed neurons into the FFN output bias, then slicing,
    gives the dense model whose removed neurons output their mean coefficient (also under Gemma's post-FFN norm)."""
    from surgery.model.slicing import fold_means

    dense = make_tiny(arch)
    view = ModelView(dense)
    keep = {0: [1, 5, 9, 30], 2: list(range(0, N, 3))}
    g = torch.Generator().manual_seed(7)
    means = {l: torch.randn(N, generator=g) for l in keep}
    handles = []
    for l, k in keep.items():  # reference: the dense model, removed coefficients replaced by their means
        gone = torch.ones(N, dtype=torch.bool)
        gone[k] = False

        def pre(mod, args, gone=gone, mean=means[l]):
            m = args[0].clone()
            m[..., gone] = mean[gone].to(m)
            return (m, *args[1:])

        handles.append(view.ffn_out(l).register_forward_pre_hook(pre))
    x = tiny_inputs()
    with torch.no_grad():
        want = dense(**x).logits
    for h in handles:
        h.remove()
    comp = copy.deepcopy(dense)
    shifts = fold_means(comp, keep, means)
    slice_ffn(comp, keep)
    with torch.no_grad():
        got = comp(**x).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert all(float(s.abs().sum()) > 0 for s in shifts.values())
    assert all(ModelView(comp).ffn_out_bias(l) is not None for l in range(ModelView(comp).n_layers))


@pytest.mark.parametrize(
    "arch, layout", [("llama", "padded"), ("llama", "sliced"), ("qwen2", "sliced"), ("gpt2", "padded")]
)
def test_compensated_checkpoint_loads_back(arch, layout, tmp_path):
    """Llama-family: mlp_bias carries the folded bias natively; other gated archs need the sliced layout's own
    modeling file; padded is refused for them with one line."""
    from surgery.io import checkpoint as export
    from surgery.model.slicing import fold_means

    model = make_tiny(arch)
    keep = {1: [0, 2, 4, 8]}
    fold_means(model, keep, {1: torch.linspace(-1, 1, N)})
    slice_ffn(model, keep)
    export.save(model, None, tmp_path / "ck", layout=layout)
    back = export.load(tmp_path / "ck")
    x = tiny_inputs()
    with torch.no_grad():
        torch.testing.assert_close(back(**x).logits, model(**x).logits, atol=1e-5, rtol=1e-5)
    if arch == "qwen2":
        with pytest.raises(UsageError, match="--layout sliced"):
            export.save(model, None, tmp_path / "ck2", layout="padded")
