"""Activation patching engine on tiny random models of every architecture: no-op, full patch == counterfactual,
faithfulness end points, and the attribution screen == exact patching to first order."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, VOCAB, make_tiny

from surgery.find import patching as P
from surgery.model.arch import ModelView
from surgery.model.hooks import Hooks

T, B = 7, 3
ROLE_POS = ([2, 3], [4], [5], [6])  # op1, operator, op2, last


def pairs(seed: int = 0, answer_tokens: int | None = None) -> P.Pairs:
    """Clean/counterfactual rows that share the prefix and the last token and differ in the role tokens; answers
    of one token ([B]) or, with `answer_tokens`, teacher-forced answers ([B, answer_tokens])."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(3, VOCAB, (B, T), generator=g)
    cf = clean.clone()
    cf[:, 2:6] = torch.randint(3, VOCAB, (B, 4), generator=g)
    roles = torch.zeros(len(P.ROLES), T, dtype=torch.bool)
    for r, pos in enumerate(ROLE_POS):
        roles[r, pos] = True
    shape = (B,) if answer_tokens is None else (B, answer_tokens)
    return P.Pairs(
        clean, cf, roles, torch.randint(3, VOCAB, shape, generator=g), torch.randint(3, VOCAB, shape, generator=g)
    )


def all_components(view: ModelView, neurons: bool = False) -> list[P.Component]:
    out = [P.Component("head", l, h, r) for l in range(view.n_layers) for h in range(view.n_heads) for r in range(4)]
    out += [P.Component("mlp", l, -1, r) for l in range(view.n_layers) for r in range(4)]
    if neurons:
        out += [P.Component("neuron", l, k, 3) for l in range(view.n_layers) for k in range(0, view.ffn_width(l), 7)]
    return out


def patch_everything(view: ModelView, ids: torch.Tensor, donor: P.Acts) -> torch.Tensor:
    """Every head and every MLP of every layer at every position from `donor`, in one forward."""
    every = torch.ones(ids.shape[0], ids.shape[1], dtype=torch.bool)
    with Hooks(view) as h:
        for l in range(view.n_layers):
            h.patch("z", l, donor.z[l], every[..., None].expand(-1, -1, view.n_heads))
            h.patch("ffn", l, donor.ffn[l], every)
        return view.model(**P.model_inputs(view, ids)).logits[:, -1].float()


@pytest.mark.parametrize("arch", ARCHS)
def test_self_patch_is_noop(arch):
    view = ModelView(make_tiny(arch))
    pr = pairs()
    clean = P.run(view, pr.clean, neurons=True)
    assert torch.equal(patch_everything(view, pr.clean, clean), clean.logits[:, -1])  # same batch shape: bit-identical
    comps = all_components(view, neurons=True)
    for l in range(view.n_layers):
        logits = P.patched(view, pr, [c for c in comps if c.layer == l], clean, clean)
        # stacked copies change matmul blocking only: equal to float rounding
        torch.testing.assert_close(logits, clean.logits.expand_as(logits), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_patch_all_from_counterfactual_is_counterfactual(arch):
    view = ModelView(make_tiny(arch))
    pr = pairs()
    cf = P.run(view, pr.cf)
    torch.testing.assert_close(patch_everything(view, pr.clean, cf), cf.logits[:, -1], atol=1e-5, rtol=1e-5)
    # and through the batched engine: the last-position MLP + heads of the LAST layer carry everything up there
    clean = P.run(view, pr.clean)
    assert not torch.allclose(clean.logits, cf.logits)


@pytest.mark.parametrize("arch", ARCHS)
def test_faithfulness_end_points(arch):
    view = ModelView(make_tiny(arch))
    ids = pairs().clean
    clean = P.run(view, ids)
    mean_all = P.means(view, ids, batch_size=2)
    assert mean_all.count == B
    nl_model = P.normalized_logit(P.ablated(view, ids, mean_all, P.Circuit.full(view)), ids[:, -1]).mean()
    assert torch.equal(P.ablated(view, ids, mean_all, P.Circuit.full(view)), clean.logits)
    nl_empty = P.normalized_logit(P.ablated(view, ids, mean_all, P.Circuit.empty(view)), ids[:, -1]).mean()
    assert P.faithfulness(float(nl_model), float(nl_model), float(nl_empty)) == 1.0
    assert P.faithfulness(float(nl_empty), float(nl_model), float(nl_empty)) == 0.0
    # the mean of one prompt is that prompt: ablating everything (and every last-position neuron) changes nothing
    one = ids[:1]
    m1 = P.means(view, one)
    empty = P.Circuit.empty(view)
    torch.testing.assert_close(P.ablated(view, one, m1, empty), P.run(view, one).logits, atol=1e-5, rtol=1e-5)
    neurons = P.Circuit(
        empty.heads,
        torch.ones(view.n_layers, dtype=torch.bool),
        {l: torch.zeros(view.ffn_width(l), dtype=torch.bool) for l in range(view.n_layers)},
    )
    torch.testing.assert_close(P.ablated(view, one, m1, neurons), P.run(view, one).logits, atol=1e-5, rtol=1e-5)


def _interpolate(a: P.Acts, b: P.Acts, eps: float) -> P.Acts:
    def mix(x, y):
        return {l: x[l] + eps * (y[l] - x[l]) for l in x}

    return P.Acts(mix(a.z, b.z), mix(a.ffn, b.ffn), a.resid, mix(a.m, b.m), None)


@pytest.mark.parametrize("arch", ARCHS)
def test_screen_is_exact_to_first_order(arch):
    """Patch a' = a + eps (a_cf - a): the exact Eq. 1 effect's derivative in eps at 0 (central difference, float64;
    HF attention keeps its softmax in fp32, hence not a smaller eps) == the screen's (a_cf - a) . dM/da."""
    view = ModelView(make_tiny(arch).double())
    pr = pairs()
    clean, cf = P.run(view, pr.clean, neurons=True), P.run(view, pr.cf, neurons=True)
    assert_screen_is_first_order(view, pr, clean, cf)


def assert_screen_is_first_order(view, pr, clean, cf) -> None:
    """The central difference of the exact effect in eps == the screen, for every component."""
    s = P.screen(view, pr, cf, neurons=True)
    eps = 1e-3
    comps = all_components(view, neurons=True)
    ex = (
        P.exact(view, pr, comps, clean, _interpolate(clean, cf, eps))
        - P.exact(view, pr, comps, clean, _interpolate(clean, cf, -eps))
    ) / (2 * eps)
    first = torch.stack(
        [
            s["head"][c.role, c.layer, c.index]
            if c.kind == "head"
            else s["mlp"][c.role, c.layer]
            if c.kind == "mlp"
            else s["neuron"][c.layer, c.index]
            for c in comps
        ]
    ).double()
    scale = first.abs().max().item()
    assert scale > 1e-5  # not trivially zero
    torch.testing.assert_close(ex, first, atol=1e-2 * scale, rtol=0)
