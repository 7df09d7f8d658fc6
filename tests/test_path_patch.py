"""Path patching: the prefix-reuse engine equals a plain full forward of the patched model (own hooks)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny

from surgery.find.path_patch import effects
from surgery.model.arch import ModelView


def _direct(model, ids, cf_ids, targets, layer, head):
    """Relative logit change from full forwards: capture clean/cf z at every o_proj input, then rerun with the
    sender's z from cf and every later layer's z from the clean run, written with bare forward pre-hooks."""
    view = ModelView(model)
    H, dh = view.n_heads, view.head_dim
    store = {}

    def grab(tag, l):
        def hook(mod, args):
            store[tag, l] = args[0].detach().clone()

        return hook

    def run(x, hooks):
        hs = [view.attn_out(l).register_forward_pre_hook(fn) for l, fn in hooks]
        try:
            with torch.no_grad():
                return model(input_ids=x).logits[:, -1]
        finally:
            for h in hs:
                h.remove()

    base = run(ids, [(l, grab("clean", l)) for l in range(view.n_layers)])
    run(cf_ids, [(l, grab("cf", l)) for l in range(view.n_layers)])

    def patch(l):
        def hook(mod, args):
            x = args[0].clone()
            if l == layer:
                x.view(*x.shape[:-1], H, dh)[..., head, :] = store["cf", l].view(*x.shape[:-1], H, dh)[..., head, :]
            else:
                x = store["clean", l].clone()
            return (x,)

        return hook

    patched = run(ids, [(l, patch(l)) for l in range(layer, view.n_layers)])
    rows = torch.arange(len(targets))
    b, p = base[rows, targets], patched[rows, targets]
    return float(((p - b) / b).mean())


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3", "gpt_neox"])
def test_path_patch_equals_direct_patched_run(arch):
    model = make_tiny(arch)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 96, (4, 6), generator=g)
    cf = ids.clone()
    cf[:, 2] = 5  # the "operator" position replaced by a null token
    targets = torch.randint(3, 96, (4,), generator=g)
    heads = [(0, 1), (1, 3), (2, 0)]
    eff, _ = effects(ModelView(model), ids.tolist(), cf.tolist(), targets.tolist(), 0, heads, progress=False)
    for l, h in heads:
        assert float(eff[l, h]) == pytest.approx(_direct(model, ids, cf, targets, l, h), abs=1e-5)
    assert any(abs(float(eff[l, h])) > 1e-4 for l, h in heads)  # the patch changes something
    assert torch.isnan(eff[0, 0])  # unscanned heads stay empty
