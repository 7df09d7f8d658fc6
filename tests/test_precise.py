"""Precise fine-tuning: head ownership per arch, frozen entries bit-identical, masked == slices-only training."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import ARCHS, HEADS, LAYERS, make_tiny, tiny_inputs
from torch.func import functional_call

from surgery.edits.precise import Precise, check_optimizer_settings, rescale_factor, select
from surgery.errors import UsageError
from surgery.find.components import Components, Shape, from_list, parse
from surgery.model.arch import ModelView
from surgery.model.hooks import Hooks


def _z(model, inputs) -> torch.Tensor:
    with Hooks(model) as h:
        h.capture("z", layers=[1], positions=None)
        model(**inputs)
    return h.store["z", 1]  # [B, T, H, dh]


@pytest.mark.parametrize("arch", ARCHS)
def test_head_slices_own_the_head(arch):
    """Perturbing the q/k/v entries of head 1.h changes the outputs z of h and (through shared k/v) of its GQA
    group only; perturbing its o_proj columns leaves every z unchanged but changes the layer's attention output."""
    model, inputs = make_tiny(arch), tiny_inputs()
    view = ModelView(model)
    group = view.n_heads // view.n_kv_heads
    base = _z(model, inputs)
    h = 1
    params = dict(model.named_parameters())
    slices = view.head_param_slices(1, h)
    with torch.no_grad():
        for name, axis, idx in slices[:-1]:
            params[name].index_add_(axis, idx, 0.5 * torch.ones_like(params[name].index_select(axis, idx)))
    changed = ((_z(model, inputs) - base).abs().amax((0, 1, 3)) > 1e-6).nonzero().flatten().tolist()
    kv = h // group
    assert h in changed and set(changed) <= set(range(kv * group, (kv + 1) * group))
    mask = torch.ones(view.n_heads)
    mask[h] = 0.0
    with Hooks(model) as hk:
        hk.ablate_heads(1, mask)
        hk.capture("attn", layers=[1], positions=None)
        model(**inputs)
    ablated = hk.store["attn", 1]
    with torch.no_grad():
        name, axis, idx = slices[-1]
        assert name.endswith(view.arch.attn_out + ".weight")
        params[name].index_fill_(axis, idx, 0.0)
    with Hooks(model) as hk:
        hk.capture("attn", layers=[1], positions=None)
        model(**inputs)
    torch.testing.assert_close(hk.store["attn", 1], ablated)  # the o_proj slice is exactly head h's output map


def _rows(n=6, seq=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (n, seq), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    return ids, labels


def _loss(model, ids, labels, params=None):
    kw = dict(input_ids=ids, labels=labels)
    return (functional_call(model, params, (), kw) if params is not None else model(**kw)).loss


def test_masked_training_equals_training_only_the_slices():
    """AdamW on the masked full matrices == AdamW on tensors that are exactly those slices (same losses, same
    final weights), with the H/h gradient rescale applied in both."""
    model = make_tiny("llama")
    ref = copy.deepcopy(model)
    comps = Components([(1, 1), (2, 3)], [0])
    sel = select(model, comps)
    scale = rescale_factor(model, sel, None)
    assert scale == LAYERS * HEADS / 2
    ids, labels = _rows()
    losses_a = []
    with Precise(model, sel):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
        for _ in range(4):
            loss = _loss(model, ids, labels)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses_a.append(loss.item())
    # the reference: one leaf tensor per trained entry set, put into frozen copies of the weights each step
    base = {n: p.detach().clone() for n, p in ref.named_parameters()}
    leaves, places = [], []
    for name, mask in sel.masks.items():
        flat = torch.ones_like(base[name], dtype=torch.bool) if mask is None else mask
        leaf = base[name][flat].clone().requires_grad_(True)
        leaves.append(leaf)
        places.append((name, flat, scale if name in sel.head_params else 1.0))
    opt = torch.optim.AdamW(leaves, lr=1e-2, weight_decay=0.0)
    losses_b = []
    for _ in range(4):
        weights = dict(base)
        for leaf, (name, flat, _) in zip(leaves, places):
            w = base[name].clone()
            w[flat] = leaf
            weights[name] = w
        loss = _loss(ref, ids, labels, weights)
        loss.backward()
        for leaf, (_, _, s) in zip(leaves, places):
            leaf.grad.mul_(s)
        opt.step()
        opt.zero_grad()
        losses_b.append(float(loss))
    assert losses_a == pytest.approx(losses_b, abs=1e-5)
    params = dict(model.named_parameters())
    for leaf, (name, flat, _) in zip(leaves, places):
        torch.testing.assert_close(params[name].detach()[flat], leaf.detach(), atol=1e-5, rtol=1e-5)
    assert losses_a[-1] < losses_a[0]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "phi3"])
def test_frozen_entries_bit_identical_after_trainer(arch, tmp_path):
    """The HF Trainer (answer_trainer, AdamW, clipping, warmup) changes the selected entries and not one bit else."""
    from surgery.edits.training import TrainSpec, answer_trainer

    model = make_tiny(arch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sel = select(model, Components([(0, 1), (2, 0)], [1]))
    ids, labels = _rows(8, 6)
    rows = [{"input_ids": i.tolist(), "labels": [-100] * 3 + i.tolist()[3:]} for i in ids]
    spec = TrainSpec(lrs=[1e-2], max_steps=3, batch_size=4, weight_decay=0.0, warmup_ratio=0.0)
    with Precise(model, sel):
        trainer = answer_trainer(model, rows, spec, 1e-2, str(tmp_path), 0)
        trainer.train()
        n_state = sum(1 for _ in trainer.optimizer.state)
    assert n_state == len(sel.masks)  # optimiser state only for parameters holding a trained entry
    for name, p in model.named_parameters():
        m = sel.masks.get(name, False)
        if m is None:
            assert not torch.equal(p, before[name]), name
            continue
        frozen = ~m if isinstance(m, torch.Tensor) else torch.ones_like(p, dtype=torch.bool)
        assert torch.equal(p.detach()[frozen], before[name][frozen]), name
        if isinstance(m, torch.Tensor):
            assert not torch.equal(p.detach()[m], before[name][m]), name
    assert all(p.requires_grad for p in model.parameters())  # restored on exit


def test_weight_decay_refused():
    with pytest.raises(UsageError, match="weight_decay"):
        check_optimizer_settings(0.01)


SHAPE = Shape("tiny", "llama", LAYERS, HEADS)


@pytest.mark.parametrize(
    "spec,msg",
    [
        ("", "empty"),
        (" , ", "empty"),
        ("3.0", "outside"),
        ("0.4", "outside"),
        ("mlp.9", "outside"),
        ("1.x", "bad component"),
        ("nope.json", "does not exist"),
    ],
)
def test_bad_components(spec, msg):
    with pytest.raises(UsageError, match=msg):
        parse(spec, SHAPE)


def test_components_from_files(tmp_path):
    heads = {
        "model": {"name": "tiny", "arch": "llama"},
        "config": {"ablation": "zero"},
        "results": {
            "shape": {"layers": LAYERS, "heads": HEADS},
            "heads": [
                {"layer": 0, "head": 1, "drop": {"overall": 0.1}, "logprob_drop": 0.2},
                {"layer": 2, "head": 3, "drop": {"overall": 0.3}, "logprob_drop": 0.1},
                {"layer": 1, "head": 0, "drop": {"overall": 0.1}, "logprob_drop": 0.5},
            ],
        },
    }
    f = tmp_path / "heads.json"
    f.write_text(json.dumps(heads))
    assert parse(str(f), SHAPE, top_heads=2).heads == [(2, 3), (1, 0)]
    with pytest.raises(UsageError, match="at most 3"):
        parse(str(f), SHAPE, top_heads=4)
    with pytest.raises(UsageError, match="another model"):
        parse(str(f), Shape("tiny", "llama", LAYERS + 1, HEADS))
    circ = {
        "model": {"name": "other-model", "arch": "llama", "n_layers": LAYERS, "n_heads": HEADS},
        "circuit": {"heads": ["2.1", "0.0"], "mlps": [1]},
    }
    g = tmp_path / "circuit.json"
    g.write_text(json.dumps(circ))
    with pytest.raises(UsageError, match="another model"):
        parse(str(g), SHAPE)
    circ["model"]["name"] = "tiny"
    g.write_text(json.dumps(circ))
    c = parse(str(g), SHAPE)
    assert (c.heads, c.mlps) == ([(2, 1), (0, 0)], [1])
    assert from_list("14.2, 1.4, mlp.20").names() == ["14.2", "1.4", "mlp.20"]
