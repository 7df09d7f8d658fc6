"""The fast paths of surgery.cna change nothing: blocked / stacked passes give the result of unblocked ones,
Gemma's post-FFN norm factors into shared directions with exact vocabulary ranges (certified, same top-k as the
exhaustive ranking), and dataset mode holds one batch of cases and one block of readout rows at a time."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from conftest import tiny_config, tiny_inputs
from test_cna import _same_topk, lively

from surgery.find import cna
from surgery.model.arch import ModelView


def _batch(seed=2, batch=4, seq=6):
    x = tiny_inputs(batch=batch, seq=seq, seed=seed)
    return x["input_ids"], x["attention_mask"]


def _scorers(view, layers, budget, chunk, ablate=((0, 1),)):
    batch = _batch()
    sa = cna.collect(view, *batch, layers)
    w = sa.logits.argmax(-1)
    sigma = view.final_sigma(sa.hfin)
    sb = cna.collect(view, *batch, layers, ablate=ablate)
    return (
        cna.Scorer(view, sa, sigma, w, chunk=chunk, budget=budget),
        cna.Scorer(view, sb, sigma, w, chunk=chunk, budget=budget),
    )


def gemma_nocap():
    """Tiny Gemma 3 without logit soft-capping (as Gemma 3 ships): its post-FFN norm is the case to certify."""
    cfg = tiny_config("gemma3")
    cfg.final_logit_softcapping = None
    torch.manual_seed(0)
    model = T.Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(6.0)
            else:
                p.add_(0.3 * torch.randn_like(p))
    return model


def test_blocked_passes_equal_unblocked():
    """Layer groups of one, readout blocks of 3 rows: the same certified top-k (indices and exact scores) and the
    same per-layer estimates as one group and one block, for a score and for a comparison."""
    view = ModelView(lively("llama"))
    layers = list(range(view.n_layers))
    V = view.unembed_matrix().shape[0]
    for with_b in (False, True):
        big_a, big_b = _scorers(view, layers, budget=1 << 24, chunk=256)
        small_a, small_b = _scorers(view, layers, budget=3 * V, chunk=3)
        assert small_a._rows_per_chunk() == 3 and big_a._rows_per_chunk() == 256
        tb, db = cna.certified_topk(big_a, 10, big_b if with_b else None)
        ts, ds = cna.certified_topk(small_a, 10, small_b if with_b else None)
        assert torch.equal(tb.layer, ts.layer) and torch.equal(tb.index, ts.index)
        torch.testing.assert_close(tb.score, ts.score, atol=1e-6, rtol=0)
        assert tb.certified.all() and ts.certified.all() and tb.rescored == ts.rescored
        for layer in layers:
            torch.testing.assert_close(db[layer], ds[layer], atol=1e-5, rtol=0)


def test_exact_pairs_equal_reference_exact_for_both_settings():
    """Rows shared by the two settings of one model (and by the cases) give each setting's own exact score."""
    view = ModelView(lively("qwen2"))
    a, b = _scorers(view, [1, 2], budget=5 * 96, chunk=5)
    case = torch.tensor([0, 3, 1, 0, 2, 3, 3])
    idx = torch.tensor([4, 4, 17, 40, 4, 0, 47])
    got_a, got_b = cna.exact_pairs([a, b], 2, case, idx)
    want_a = torch.stack([a.exact(2, torch.tensor([[int(i)]]).expand(4, 1))[c, 0] for c, i in zip(case, idx)])
    want_b = torch.stack([b.exact(2, torch.tensor([[int(i)]]).expand(4, 1))[c, 0] for c, i in zip(case, idx)])
    torch.testing.assert_close(got_a, want_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_b, want_b, atol=1e-5, rtol=0)
    assert not torch.allclose(got_a, got_b), "the ablation must change some scores"


def test_post_ffn_norm_factors_into_shared_directions_and_certifies():
    """Gemma: c_b * v_k = s_b * (gain * v_k): shared directions [N, d], the exact vocabulary range [N] (no
    per-case Cauchy-Schwarz), bounds that hold for every neuron, certified top-k equal to the exhaustive one."""
    view = ModelView(gemma_nocap())
    assert view.post_ffn_norm(0) is not None and not view.softcap
    layers = list(range(view.n_layers))
    fast = cna.compare(view, _batch(), layers, k=8, ablate_b=((1, 2),))
    slow = cna.compare(view, _batch(), layers, k=8, ablate_b=((1, 2),), exhaustive=True)
    for sc in (fast.scorer_a, fast.scorer_b):
        for layer in layers:
            dirs, s = sc._factor(layer)
            assert dirs.dim() == 2 and s is not None and s.shape == (4, 1)
            assert sc.vocab_range(layer)[0].dim() == 1
            ex = sc.exhaustive(layer)
            lo, hi = sc.bounds(layer)
            assert (ex >= lo - 1e-5).all() and (ex <= hi + 1e-5).all()
    assert fast.top.certified.all()
    assert fast.top.rescored < 4 * sum(view.ffn_width(l) for l in layers), "bounds must spare some neurons"
    for b in range(4):
        _same_topk(fast, slow, b)


def test_scan_holds_one_batch_and_one_block_at_a_time(monkeypatch):
    """Dataset-mode memory is set by batch_size (cases held at once) and the Scorer's block size (readout rows
    held at once), not by the number of cases: a structural check on what each pass is given."""
    view = ModelView(lively("llama"))
    g = torch.Generator().manual_seed(7)
    seqs = [torch.randint(3, 96, (n,), generator=g).tolist() for n in (4, 7, 5, 6, 3, 5, 6)]
    seen_cases, seen_rows = [], []
    compare, rows = cna.compare_states, cna.Scorer._readout_rows

    work: list[dict] = []

    def spy_compare(view_a, sa, *args, **kw):
        seen_cases.append(sa.logits.shape[0])
        c = compare(view_a, sa, *args, **kw)
        work.extend([c.scorer_a.work, c.scorer_b.work])
        return c

    def spy_rows(self, dirs, out=None):
        seen_rows.append(dirs.shape[0])
        return rows(self, dirs, out)

    monkeypatch.setattr(cna, "compare_states", spy_compare)
    monkeypatch.setattr(cna.Scorer, "_readout_rows", spy_rows)
    res = cna.scan(view, seqs, [1, 2], k=6, pad_id=0, batch_size=3, progress=False, ablate_b=((0, 1),), chunk=5)
    assert seen_cases == [3, 3, 1] and res.certified.all() and res.top_score.shape == (7, 6)
    assert seen_rows and max(seen_rows) <= 5
    # exact scores are built in reused buffers: per comparison ONE work block that settings A and B share,
    # whatever the pairs
    assert work and all(a is b and a.buf is not None and a.buf.shape[0] == 3 for a, b in zip(work[::2], work[1::2]))


def test_scan_caps_the_cases_per_pass_by_held_logits_and_the_results_do_not_change(monkeypatch):
    """Dataset-mode memory is bounded by `held` (base-logit floats per setting) whatever --batch-size asks for
    (the forwards still run --batch-size cases); every score and bound is per case, so a smaller pass changes no
    result."""
    view = ModelView(lively("llama"))
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(3, 96, (n,), generator=g).tolist() for n in (4, 7, 5, 6, 3, 5, 6)]
    layers, V = [1, 2], view.unembed_matrix().shape[0]
    seen, forwards, compare, collect = [], [], cna.compare_states, cna.collect

    def spy(view_a, sa, *args, **kw):
        seen.append(sa.logits.shape[0])
        return compare(view_a, sa, *args, **kw)

    def spy_collect(view, ids, *args, **kw):
        forwards.append(ids.shape[0])
        return collect(view, ids, *args, **kw)

    monkeypatch.setattr(cna, "compare_states", spy)
    monkeypatch.setattr(cna, "collect", spy_collect)
    kw = dict(k=6, pad_id=0, batch_size=7, progress=False, ablate_b=((0, 1),))
    whole = cna.scan(view, seqs, layers, **kw)
    assert seen == [7] and forwards == [7, 7]
    seen.clear(), forwards.clear()
    held = cna.scan(view, seqs, layers, held=2 * len(layers) * V + 5, **kw)
    assert seen == [2, 2, 2, 1] and forwards == [7, 7], "the forwards keep --batch-size; the passes are capped"
    assert torch.equal(whole.top_layer, held.top_layer) and torch.equal(whole.top_index, held.top_index)
    torch.testing.assert_close(held.top_score, whole.top_score, atol=1e-5, rtol=0)
    for l in layers:
        torch.testing.assert_close(held.total[l], whole.total[l], atol=1e-4, rtol=1e-5)
    assert whole.certified.all() and held.certified.all()
    assert cna.cases_per_pass(64, cna.HELD, 30, 49152) == 11  # the default on SmolLM2: 64 MiB per setting
    assert cna.cases_per_pass(64, 10, 30, 49152) == 1


def test_serial_passes_run_small_ops_at_one_thread_and_large_products_at_the_callers():
    """The Scorer's bookkeeping runs at one torch thread (no OpenMP barriers to spin at on shared cores), its
    large products at the caller's threads, and the caller's count comes back afterwards, even after an error."""
    seen = {}
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:

        @cna.serial
        def work(fail=False):
            seen["inside"] = torch.get_num_threads()
            with cna.wide():
                seen["wide"] = torch.get_num_threads()
            seen["after wide"] = torch.get_num_threads()
            if fail:
                raise ValueError("boom")

        work()
        assert seen == {"inside": 1, "wide": 2, "after wide": 1} and torch.get_num_threads() == 2
        with pytest.raises(ValueError):
            work(fail=True)
        assert torch.get_num_threads() == 2 and cna._caller_threads is None
        with cna.wide():  # outside a serial pass: the caller's threads, unchanged
            assert torch.get_num_threads() == 2
        # a real comparison: the bounds' bookkeeping at one thread, the base-logit product over W_U at two
        threads: dict[str, set[int]] = {"bounds": set(), "readout": set()}
        bounds, readout = cna.Scorer._bounds, ModelView.readout

        def spy_bounds(self, layer):
            threads["bounds"].add(torch.get_num_threads())
            return bounds(self, layer)

        def spy_readout(self, *a, **kw):
            threads["readout"].add(torch.get_num_threads())
            return readout(self, *a, **kw)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(cna.Scorer, "_bounds", spy_bounds)
            mp.setattr(ModelView, "readout", spy_readout)
            view = ModelView(lively("llama"))
            ids = torch.randint(3, 96, (2, 5), generator=torch.Generator().manual_seed(1))
            c = cna.compare(view, (ids, torch.ones_like(ids)), [1, 2], k=4, ablate_b=((0, 1),))
        assert c.top.certified.all() and threads == {"bounds": {1}, "readout": {2}}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_softcapped_model_is_certified_by_its_lipschitz_bound():
    """Soft-capping (the tiny Gemma 3 has cap 30): the bounds hold for every neuron and certify the top-k without
    rescoring every neuron; the top-k equals the exhaustive one."""
    view = ModelView(lively("gemma3"))
    assert view.softcap
    layers = list(range(view.n_layers))
    fast = cna.compare(view, _batch(), layers, k=5)
    slow = cna.compare(view, _batch(), layers, k=5, exhaustive=True)
    sc = fast.scorer_a
    for layer in layers:
        ex = sc.exhaustive(layer)
        lo, hi = sc.bounds(layer)
        assert (ex >= lo - 1e-5).all() and (ex <= hi + 1e-5).all()
    assert fast.top.certified.all()
    assert fast.top.rescored < 4 * sum(view.ffn_width(l) for l in layers), "the bound must spare some neurons"
    for b in range(4):
        _same_topk(fast, slow, b)


def test_scan_block_budget_reaches_the_scorers_and_changes_nothing(monkeypatch):
    """`scan(budget=...)` sets every Scorer's [rows, vocab] block size (bench/cna_scan.py --block-floats); a block
    of 3 vocabulary rows gives the same certified top-k and scores as the default."""
    view = ModelView(lively("llama"))
    g = torch.Generator().manual_seed(7)
    seqs = [torch.randint(3, 96, (n,), generator=g).tolist() for n in (4, 7, 5, 6, 3)]
    budgets: list[int] = []
    init = cna.Scorer.__init__

    def spy_init(self, *args, **kw):
        init(self, *args, **kw)
        budgets.append(self.budget)

    monkeypatch.setattr(cna.Scorer, "__init__", spy_init)
    kw = dict(k=6, pad_id=0, batch_size=3, progress=False, ablate_b=((0, 1),))
    small = cna.scan(view, seqs, [1, 2], budget=3 * view.unembed_matrix().shape[0], **kw)
    assert budgets and set(budgets) == {3 * view.unembed_matrix().shape[0]}
    default = cna.scan(view, seqs, [1, 2], **kw)
    assert small.certified.all() and default.certified.all()
    assert torch.equal(small.top_index, default.top_index) and torch.equal(small.top_layer, default.top_layer)
    assert torch.allclose(small.top_score, default.top_score, atol=1e-5)


@pytest.mark.parametrize(
    "make",
    [lambda: lively("llama"), lambda: lively("gpt2"), gemma_nocap],
    ids=["llama", "gpt2-layernorm", "gemma3-post-norm"],
)
def test_shift_free_exp_paths_equal_the_max_shifted_ones(monkeypatch, make):
    """The bounds' top-token sums and the exact pair scores exponentiate without a max pass when the vocabulary
    range keeps every exponent within EXP_SAFE; forcing the max-shifted path (EXP_SAFE 0) gives the same bounds,
    the same exact scores, and the same certified top-k as the per-case reference block ([B, N, s])."""
    view = ModelView(make())
    layers = list(range(view.n_layers))
    case = torch.tensor([0, 3, 1, 0, 2, 3, 3, 1])
    idx = torch.tensor([4, 4, 17, 40, 4, 0, 47, 5])
    lse_calls = []
    real_lse = cna._lse_
    monkeypatch.setattr(cna, "_lse_", lambda z: lse_calls.append(1) or real_lse(z))

    def run():
        a, b = _scorers(view, layers, budget=5 * view.unembed_matrix().shape[0], chunk=5)
        bounds = [sc.bounds(l) for sc in (a, b) for l in layers]
        pairs = cna.exact_pairs([a, b], torch.tensor(layers)[case % len(layers)], case, idx)
        top, _ = cna.certified_topk(a, 6, b)
        ref = [sc._bounds_per_case(l) for sc in (a, b) for l in layers]
        return bounds, pairs, top, ref

    fast = run()
    assert not lse_calls, "the exponents of these models stay within EXP_SAFE: the shift-free path must run"
    monkeypatch.setattr(cna, "EXP_SAFE", 0.0)
    slow = run()
    assert lse_calls
    for (lo, hi), (lo_s, hi_s), (lo_r, hi_r) in zip(fast[0], slow[0], fast[3]):
        for x, y in ((lo, lo_s), (hi, hi_s), (lo, lo_r), (hi, hi_r)):
            torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-5)
    for x, y in zip(fast[1], slow[1]):
        torch.testing.assert_close(x, y, atol=2e-5, rtol=0)
    assert torch.equal(fast[2].index, slow[2].index) and torch.equal(fast[2].layer, slow[2].layer)
    assert fast[2].certified.all()


@pytest.mark.parametrize("V", [49152, 5000, 300])
def test_blocked_topk_equals_torch_topk(V):
    """The top-k from the k best blocks (ragged end included) is torch's top-k: same values, same index sets."""
    g = torch.Generator().manual_seed(V)
    z = torch.randn(7, V, generator=g) * 3
    z[0, -1] = 50.0  # the best element in the ragged end
    z[1, :40] = torch.linspace(20, 30, 40)  # the top tokens crowded in one block
    vals, idx = cna._topk(z, 32)
    ref = z.topk(32, -1)
    assert torch.equal(vals, ref.values)
    assert torch.equal(idx.sort(1).values, ref.indices.sort(1).values)
    assert torch.equal(z.gather(1, idx), vals)
