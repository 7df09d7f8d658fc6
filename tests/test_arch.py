"""Identities of the architecture table and the hooks, on tiny random models of every supported arch."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny, tiny_inputs

from surgery.model.arch import ArchError, ModelView, supported
from surgery.model.hooks import Hooks

ATOL = 1e-5


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_table_lists_the_promised_architectures():
    for mt in ["llama", "mistral", "qwen2", "gemma3_text", "gpt2", "gptj", "gpt_neox", "phi3"]:
        assert mt in supported()


def test_unknown_architecture_is_one_clear_error():
    class Cfg:
        model_type = "mamba"

    class M(torch.nn.Module):
        config = Cfg()

    with pytest.raises(ArchError, match="unsupported architecture 'mamba'; supported: .*llama"):
        ModelView(M())


def test_heads_sum_to_attention_output(tiny):
    v, x = ModelView(tiny), tiny_inputs()
    with Hooks(v) as h, torch.no_grad():
        h.capture("z", positions=None).capture("attn", positions=None)
        tiny(**x)
    for layer in range(v.n_layers):
        z, out = h.store["z", layer], h.store["attn", layer]
        total = sum(z[:, :, hd] @ v.head_out_weight(layer, hd).T for hd in range(v.n_heads))
        bias = v.attn_out_bias(layer)
        total = total + (bias if bias is not None else 0)
        torch.testing.assert_close(total, out, atol=ATOL, rtol=0)


def test_neurons_sum_to_ffn_output(tiny):
    """sum_k m_k v_k (+ bias, + post-norm linearised at the real output) == F^l, the FFN's contribution."""
    v, x = ModelView(tiny), tiny_inputs()
    with Hooks(v) as h, torch.no_grad():
        h.capture("m", positions=None).capture("ffn", positions=None)
        tiny(**x)
    for layer in range(v.n_layers):
        m, F = h.store["m", layer], h.store["ffn", layer]
        y = m @ v.values(layer)
        b = v.ffn_out_bias(layer)
        y = y + (b if b is not None else 0)
        s = v.ffn_post_scale(layer, y)
        contrib = m.unsqueeze(-1) * v.values(layer)  # [B, T, N, d] per-neuron subvalues
        if s is not None:
            contrib = contrib * s.unsqueeze(-2)
        torch.testing.assert_close(contrib.sum(-2) + (0 if s is not None or b is None else b), F, atol=ATOL, rtol=0)


def test_ffn_input_stream_is_layer_output_minus_ffn(tiny):
    """r = x^{l-1} + A^l: for sequential layers it is what the pre-FFN norm reads (parallel: same identity)."""
    v, x = ModelView(tiny), tiny_inputs()
    with Hooks(v) as h, torch.no_grad():
        h.capture("resid_in", positions=None).capture("resid", positions=None).capture("ffn", positions=None)
        tiny(**x)
    for layer in range(v.n_layers):
        r = h.store["resid", layer] - h.store["ffn", layer]
        if v.parallel:
            continue  # r then mixes x and A: checked through the logits identity in the CNA tests
        norm_in = []
        hd = v.pre_ffn_norm(layer).register_forward_pre_hook(lambda mod, a: norm_in.append(a[0]))
        with torch.no_grad():
            tiny(**x)
        hd.remove()
        torch.testing.assert_close(r, norm_in[0], atol=ATOL, rtol=0)


def test_frozen_readout_reproduces_the_logits(tiny):
    v, x = ModelView(tiny), tiny_inputs()
    with Hooks(v) as h, torch.no_grad():
        h.capture("resid", layers=[v.n_layers - 1], positions=None)
        logits = tiny(**x).logits
    hfin = h.store["resid", v.n_layers - 1]
    torch.testing.assert_close(v.logits_frozen(hfin, v.final_sigma(hfin)), logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "phi3", "gemma3"])
def test_hook_head_zeroing_equals_weight_zeroing(arch):
    model, x = make_tiny(arch), tiny_inputs()
    v = ModelView(model)
    mask = torch.ones(v.n_heads)
    mask[1] = 0
    with Hooks(v) as h:
        h.ablate_heads(1, mask)
        hooked = _logits(model, x)
    v.zero_head_weights(1, 1)
    torch.testing.assert_close(hooked, _logits(model, x), atol=ATOL, rtol=0)


def test_per_row_head_masks_match_single_runs():
    model, x = make_tiny("qwen2"), tiny_inputs(batch=3)
    v = ModelView(model)
    masks = torch.ones(3, v.n_heads)
    masks[1, 0] = 0
    masks[2, 3] = 0
    with Hooks(v) as h:
        h.ablate_heads(2, masks)
        batched = _logits(model, x)
    for row in range(3):
        with Hooks(v) as h:
            h.ablate_heads(2, masks[row])
            single = _logits(model, x)[row]
        torch.testing.assert_close(batched[row], single, atol=ATOL, rtol=0)


def test_mean_ablation_replaces_the_head_output():
    model, x = make_tiny("llama"), tiny_inputs()
    v = ModelView(model)
    repl = torch.randn(v.n_heads, v.head_dim)
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0])
    with Hooks(v) as h, torch.no_grad():
        h.ablate_heads(0, mask, replacement=repl).capture("z", layers=[0], positions=None)
        model(**x)
    torch.testing.assert_close(h.store["z", 0][:, :, 1], repl[1].expand(3, 7, -1))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gptj", "phi3", "gemma3"])
def test_hook_neuron_zeroing_equals_weight_zeroing(arch):
    model, x = make_tiny(arch), tiny_inputs()
    v = ModelView(model)
    idx = [0, 5, 17]
    scale = torch.ones(v.ffn_width(1))
    scale[idx] = 0
    with Hooks(v) as h:
        h.scale_neurons(1, scale)
        hooked = _logits(model, x)
    v.zero_neuron_weights(1, idx)
    torch.testing.assert_close(hooked, _logits(model, x), atol=ATOL, rtol=0)


def test_hook_neuron_scaling_equals_value_scaling():
    model, x = make_tiny("gpt_neox"), tiny_inputs()
    v = ModelView(model)
    scale = torch.ones(v.ffn_width(2))
    scale[[3, 4]] = 2.5
    with Hooks(v) as h:
        h.scale_neurons(2, scale)
        hooked = _logits(model, x)
    v.scale_neuron_values(2, [3, 4], 2.5)
    torch.testing.assert_close(hooked, _logits(model, x), atol=ATOL, rtol=0)


def test_noop_hooks_are_bit_identical(tiny):
    v, x = ModelView(tiny), tiny_inputs()
    ref = _logits(tiny, x)
    with Hooks(v) as h:
        for layer in range(v.n_layers):
            h.ablate_heads(layer, torch.ones(v.n_heads)).scale_neurons(layer, torch.ones(v.ffn_width(layer)))
        h.capture("z").capture("m").capture("resid").capture("ffn").capture("resid_in")
        out = _logits(tiny, x)
    assert torch.equal(ref, out)


def test_hooks_removed_after_exception():
    model, x = make_tiny("llama"), tiny_inputs()
    v = ModelView(model)
    ref = _logits(model, x)
    with pytest.raises(RuntimeError, match="boom"):
        with Hooks(v) as h:
            h.ablate_heads(0, torch.zeros(v.n_heads)).capture("m")
            raise RuntimeError("boom")
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert torch.equal(ref, _logits(model, x))


def test_out_of_range_layer_and_head_are_clear_errors():
    v = ModelView(make_tiny("llama"))
    with pytest.raises(ArchError, match="layer 9 is outside the model"):
        v.layer(9)
    with pytest.raises(ArchError, match="head 0.7 is outside"):
        v.check_head(0, 7)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3", "gpt2", "gptj", "gemma3"])
def test_ov_matrix_is_the_attention_on_a_single_token(arch):
    """With one token every head attends to itself: attention output == OV @ n(x) (+ biases)."""
    model, v = make_tiny(arch), None
    v = ModelView(model)
    ids = torch.tensor([[5]])
    with Hooks(v) as h, torch.no_grad():
        h.capture("attn", layers=[1], positions=None)
        norm_in = []
        first = v.layer(1)
        mods = dict(first.named_modules())
        norm = mods["input_layernorm"] if "input_layernorm" in mods else mods["ln_1"]
        hd = norm.register_forward_hook(lambda m, a, o: norm_in.append(o))
        model(input_ids=ids)
        hd.remove()
    x = norm_in[0][0, 0]
    got = v.ov_matrix(1) @ x
    want = h.store["attn", 1][0, 0]
    vb = v.value_weight(1)  # biases: v bias goes through O; o bias added once
    layer_mods = dict(v.layer(1).named_modules())
    bias = 0
    if v.attn_out_bias(1) is not None:
        bias = bias + v.attn_out_bias(1)
    vmod = layer_mods[v.arch.attn_v]
    if getattr(vmod, "bias", None) is not None:
        b = vmod.bias[-vb.shape[0] :]
        group = v.n_heads // (vb.shape[0] // v.head_dim)
        full = torch.cat([b[(hh // group) * v.head_dim : (hh // group + 1) * v.head_dim] for hh in range(v.n_heads)])
        bias = bias + (v.attn_out(1).weight.T @ full if v.arch.conv1d else v.attn_out(1).weight @ full)
    torch.testing.assert_close(got + bias, want, atol=1e-5, rtol=0)
