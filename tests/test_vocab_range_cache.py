"""CNA's vocabulary-range cache, row by row: an edited or pruned copy of a model recomputes only the rows it
changed, and every range equals a fresh computation."""

from __future__ import annotations

import torch
from conftest import make_tiny

from surgery.find import cna
from surgery.model.arch import ModelView
from surgery.model.slicing import slice_ffn


def _lively():
    model = make_tiny("llama")
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(6.0)
    return model


def _ranges(view: ModelView, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(3, view.unembed_matrix().shape[0], (2, 5), generator=torch.Generator().manual_seed(0))
    res = cna.compare(view, (x, torch.ones_like(x)), [layer], k=4)
    return res.scorer_a.vocab_range(layer)


def _fresh(view: ModelView, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ranges computed directly, every row against the whole vocabulary (no cache)."""
    x = torch.randint(3, view.unembed_matrix().shape[0], (2, 5), generator=torch.Generator().manual_seed(0))
    sc = cna.compare(view, (x, torch.ones_like(x)), [layer], k=4).scorer_a
    d = sc._factor(layer)[0]
    z = (sc._centre(d) * sc.gain) @ sc.WU.T
    return z.amax(-1), z.amin(-1)


def _count_rows(monkeypatch) -> list[int]:
    seen: list[int] = []
    real = cna.RowStore.add

    def add(self, keys, hi, lo):
        seen.append(len(keys))
        real(self, keys, hi, lo)

    monkeypatch.setattr(cna.RowStore, "add", add)
    return seen


def test_edit_recomputes_only_the_changed_rows(tmp_path, monkeypatch):
    monkeypatch.setenv("SURGERY_HOME", str(tmp_path))
    cna.RowStore._memo.clear()
    computed = _count_rows(monkeypatch)
    model = _lively()
    view = ModelView(model)
    width = view.ffn_width(1)
    _ranges(view, 1)
    assert computed == [width]  # a new model: every row once

    edited = [3, 7, 11]
    view.zero_neuron_weights(1, torch.tensor(edited))
    hi, lo = _ranges(view, 1)
    assert computed == [width, 1]  # three zeroed rows are one new row (all zero)
    want_hi, want_lo = _fresh(view, 1)
    torch.testing.assert_close(hi, want_hi, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lo, want_lo, rtol=1e-6, atol=1e-6)
    assert float(hi[edited].abs().max()) == 0.0 and float(lo[edited].abs().max()) == 0.0


def test_pruned_copy_reuses_the_base_rows_and_the_top_k_is_unchanged(tmp_path, monkeypatch):
    monkeypatch.setenv("SURGERY_HOME", str(tmp_path))
    cna.RowStore._memo.clear()
    computed = _count_rows(monkeypatch)
    model = _lively()
    base_hi, base_lo = _ranges(ModelView(model), 0)
    keep = list(range(0, ModelView(model).ffn_width(0), 3))
    slice_ffn(model, {0: keep})
    view = ModelView(model)
    cna.RowStore._memo.clear()  # as in a new process: the store is read back from disk
    hi, lo = _ranges(view, 0)
    assert computed == [len(base_hi)]  # the pruned layer computed nothing
    assert torch.equal(hi, base_hi[keep]) and torch.equal(lo, base_lo[keep])
    want_hi, want_lo = _fresh(view, 0)
    torch.testing.assert_close(hi, want_hi, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lo, want_lo, rtol=1e-6, atol=1e-6)


def test_a_torn_shard_only_costs_recomputation(tmp_path, monkeypatch):
    monkeypatch.setenv("SURGERY_HOME", str(tmp_path))
    cna.RowStore._memo.clear()
    model = _lively()
    hi, lo = _ranges(ModelView(model), 0)
    shards = list((tmp_path / "cache" / "vocab-range").glob("rows-*/*.pt"))
    assert len(shards) == 1
    shards[0].write_bytes(b"torn")
    for f in (tmp_path / "cache" / "vocab-range").glob("*.pt"):
        f.unlink()  # the whole-layer file too: the row store is the only way back
    cna.RowStore._memo.clear()
    again_hi, again_lo = _ranges(ModelView(_lively()), 0)
    assert torch.equal(hi, again_hi) and torch.equal(lo, again_lo)
