"""The same identities on the real SmolLM2-135M weights (fp32, atol 1e-4)."""

from __future__ import annotations

import pytest
import torch

from surgery.model.arch import ModelView
from surgery.model.hooks import Hooks

pytestmark = pytest.mark.real
ATOL = 1e-4


@pytest.fixture(scope="module")
def batch(smol):
    enc = smol.tokenizer(
        ["Calculate: 3+5=", "Calculate: 17+25=", "A woman works as a"], return_tensors="pt", padding=True
    )
    return dict(enc)


def test_real_heads_and_neurons_sum_exactly(smol, batch):
    v = ModelView(smol.model)
    layers = [0, 14, 29]
    with Hooks(v) as h, torch.no_grad():
        for what in ("z", "attn", "m", "ffn"):
            h.capture(what, layers=layers, positions=None)
        smol.model(**batch)
    for layer in layers:
        z = h.store["z", layer]
        heads = sum(z[:, :, hd] @ v.head_out_weight(layer, hd).T for hd in range(v.n_heads))
        torch.testing.assert_close(heads, h.store["attn", layer], atol=ATOL, rtol=0)
        torch.testing.assert_close(h.store["m", layer] @ v.values(layer), h.store["ffn", layer], atol=ATOL, rtol=0)


def test_real_frozen_readout_and_head_zeroing(smol, batch):
    model, v = smol.model, ModelView(smol.model)
    with Hooks(v) as h, torch.no_grad():
        h.capture("resid", layers=[v.n_layers - 1], positions=None)
        logits = model(**batch).logits
    hfin = h.store["resid", v.n_layers - 1]
    torch.testing.assert_close(v.logits_frozen(hfin, v.final_sigma(hfin)), logits, atol=ATOL, rtol=0)
    mask = torch.ones(v.n_heads)
    mask[4] = 0
    with Hooks(v) as h, torch.no_grad():
        h.ablate_heads(17, mask)
        hooked = model(**batch).logits
    w = v.head_out_weight(17, 4)
    saved = w.clone()
    v.zero_head_weights(17, 4)
    try:
        with torch.no_grad():
            zeroed = model(**batch).logits
    finally:
        with torch.no_grad():
            w.copy_(saved)
    torch.testing.assert_close(hooked, zeroed, atol=ATOL, rtol=0)
    with Hooks(v) as h, torch.no_grad():
        h.ablate_heads(17, torch.ones(v.n_heads)).capture("m")
        assert torch.equal(model(**batch).logits, logits)
