"""bf16 models: CNA's certified top-k on a bf16 model equals the exhaustive fp32 computation on the same weights
(the bf16 weights cast to fp32), on every architecture; the forward CNA reads runs in fp32 on the bf16 weights
(`surgery.model.upcast`), bit-identical to the fp32 model, and the model stays bf16."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ARCHS, make_tiny, tiny_inputs
from test_cna import _batch, _same_topk

from surgery.find import cna
from surgery.model.arch import ModelView
from surgery.model.upcast import fp32_compute, low_precision


def _pair(arch: str):
    """A lively tiny model in bf16 and the fp32 model holding exactly its (bf16-rounded) weights."""
    model = make_tiny(arch)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(6.0)
    low = model.to(torch.bfloat16)
    return low, copy.deepcopy(low).float()


@pytest.mark.parametrize("arch", ARCHS)
def test_fp32_compute_equals_the_fp32_model_and_leaves_the_weights_bf16(arch):
    low, ref = _pair(arch)
    before = {n: p.clone() for n, p in low.named_parameters()}
    with torch.no_grad():
        with fp32_compute(low):
            got = low(**tiny_inputs()).logits
        want = ref(**tiny_inputs()).logits
        plain = low(**tiny_inputs()).logits.float()
    assert torch.equal(got, want)  # bit-identical
    assert float((plain - want).abs().max()) > 1e-4  # a plain bf16 forward is not (what the upcast is for)
    assert low_precision(low) and all(
        p.dtype == torch.bfloat16 and torch.equal(p, before[n]) for n, p in low.named_parameters()
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_certified_topk_of_a_bf16_model_equals_exhaustive_fp32_on_its_weights(arch):
    low, ref = _pair(arch)
    layers = list(range(ModelView(low).n_layers))
    fast = cna.compare(ModelView(low), _batch(), layers, k=10)
    slow = cna.compare(ModelView(ref), _batch(), layers, k=10, exhaustive=True)
    assert fast.top.certified.all() or fast.scorer_a.cap
    for b in range(4):
        _same_topk(fast, slow, b)  # ties at the k-th score are handled explicitly there
