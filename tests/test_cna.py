"""CNA identities on tiny models of every arch: the score equals a direct recomputation; screened top-k ==
exhaustive top-k; comparisons are consistent."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, make_tiny, tiny_inputs

from surgery.errors import UsageError
from surgery.find import cna
from surgery.model.arch import ModelView


def lively(arch: str):
    """A tiny model whose weights are scaled up so that neuron effects are O(0.1-1), not float noise."""
    model = make_tiny(arch)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(6.0)
    return model


def _same_topk(fast, slow, b, tol=1e-5):
    """Top-k sets equal up to exact ties at the k-th score; scores equal."""
    torch.testing.assert_close(fast.top.score[b], slow.top.score[b], atol=tol, rtol=0)
    got = set(zip(fast.top.layer[b].tolist(), fast.top.index[b].tolist()))
    want = set(zip(slow.top.layer[b].tolist(), slow.top.index[b].tolist()))
    kth = float(slow.top.score[b, -1])
    for layer, idx in got ^ want:
        assert abs(float(slow.delta[layer][b, idx]) - kth) < tol, (layer, idx)


def _batch(seed=1, batch=4, seq=6):
    x = tiny_inputs(batch=batch, seq=seq, seed=seed)
    return x["input_ids"], x["attention_mask"]


def _direct_score(view, state, sigma, w, layer, k, b):
    """log softmax(lm_head(g * centre(r + m c v)/sigma + norm bias))[w] minus the same without the neuron."""
    norm, head = view.final_norm, view.lm_head
    gain = view.final_gain()

    def logp(x):
        if view.arch.norm_kind == "layer":
            x = x - x.mean()
        h = gain * x / sigma[b] + (norm.bias.float() if getattr(norm, "bias", None) is not None else 0)
        z = head(h.to(head.weight.dtype)).float()
        return torch.log_softmax(view.softcap_logits(z), -1)[w[b]]

    r = state.r[layer][b]
    v = view.values(layer)[k].float()
    c = state.c[layer]
    sub = state.m[layer][b, k] * (v if c is None else c[b] * v)
    return logp(r + sub) - logp(r)


@pytest.mark.parametrize("arch", ARCHS)
def test_score_equals_direct_recomputation(arch):
    model = lively(arch)
    view = ModelView(model)
    layers = list(range(view.n_layers))
    st = cna.collect(view, *_batch(), layers)
    sigma = view.final_sigma(st.hfin)
    w = st.logits.argmax(-1)
    sc = cna.Scorer(view, st, sigma, w, chunk=7)
    ex = sc.exhaustive(1)
    for b, k in [(0, 0), (1, 5), (3, 47), (2, 20)]:
        torch.testing.assert_close(ex[b, k], _direct_score(view, st, sigma, w, 1, k, b), atol=1e-5, rtol=0)
    # the frozen readout of the real final state reproduces the model's logits
    torch.testing.assert_close(view.logits_frozen(st.hfin, sigma), st.logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_bounds_hold_and_screened_topk_equals_exhaustive(arch):
    model = lively(arch)
    view = ModelView(model)
    layers = list(range(view.n_layers))
    fast = cna.compare(view, _batch(), layers, k=10)
    slow = cna.compare(view, _batch(), layers, k=10, exhaustive=True)
    sc = fast.scorer_a
    for layer in layers:
        ex = sc.exhaustive(layer)
        lo, hi = sc.bounds(layer)
        assert (ex >= lo - 1e-5).all() and (ex <= hi + 1e-5).all(), "bounds must hold for every neuron"
        if not sc.cap:
            assert (ex <= sc.first_order(layer) + 1e-5).all(), "first-order is an upper bound (convexity)"
    assert fast.top.certified.all() or sc.cap
    for b in range(4):
        _same_topk(fast, slow, b)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3", "phi3"])
def test_head_ablation_comparison_matches_exhaustive(arch):
    model = lively(arch)
    view = ModelView(model)
    layers = [1, 2]
    kw = dict(ablate_b=((0, 1), (1, 2)))
    fast = cna.compare(view, _batch(), layers, k=8, **kw)
    slow = cna.compare(view, _batch(), layers, k=8, exhaustive=True, **kw)
    for b in range(4):
        _same_topk(fast, slow, b)
    assert slow.top.score.abs().max() > 1e-3, "the comparison must see real effects"


def test_prompt_b_comparison_uses_its_own_sigma_and_a_target():
    model = make_tiny("qwen2")
    view = ModelView(model)
    tgt = torch.tensor([7])
    ids_a, m_a = _batch(seed=3, batch=1)
    ids_b, m_b = _batch(seed=4, batch=1)
    res = cna.compare(view, (ids_a, m_a), [0, 1, 2], k=5, batch_b=(ids_b, m_b), target=tgt, exhaustive=True)
    solo_b = cna.compare(view, (ids_b, m_b), [0, 1, 2], k=5, target=tgt, exhaustive=True)
    solo_a = cna.compare(view, (ids_a, m_a), [0, 1, 2], k=5, target=tgt, exhaustive=True)
    for layer in [0, 1, 2]:
        torch.testing.assert_close(res.delta[layer], solo_a.imp_a[layer] - solo_b.imp_a[layer], atol=1e-6, rtol=0)


def test_parse_layers_and_target_errors():
    assert cna.parse_layers("deep", 30) == list(range(15, 30))
    assert cna.parse_layers("3-5,9", 30) == [3, 4, 5, 9]
    with pytest.raises(UsageError, match="outside the model"):
        cna.parse_layers("28-31", 30)
    with pytest.raises(UsageError, match="bad layer range"):
        cna.parse_layers("x-y", 30)


def test_scan_aggregates_batches_and_padding_does_not_matter():
    model = lively("llama")
    view = ModelView(model)
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(3, 96, (n,), generator=g).tolist() for n in (4, 7, 5, 6, 3)]
    whole = cna.scan(view, seqs, [1, 2], k=6, pad_id=0, batch_size=5, progress=False)
    split = cna.scan(view, seqs, [1, 2], k=6, pad_id=0, batch_size=2, progress=False)
    torch.testing.assert_close(whole.top_score, split.top_score, atol=1e-5, rtol=0)
    assert whole.certified.all()
    for i, seq in enumerate(seqs):  # passes group cases by length; the outputs come back in input order
        one = cna.compare(view, (torch.tensor([seq]), torch.ones(1, len(seq), dtype=torch.long)), [1, 2], k=6)
        torch.testing.assert_close(whole.top_score[i], one.top.score[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(split.top_score[i], one.top.score[0], atol=1e-5, rtol=0)
        assert torch.equal(whole.top_index[i], one.top.index[0]) and whole.targets[i] == one.target[0]
    keep = whole.per_case_sets()
    assert sum(len(v) for v in keep.values()) >= 6
