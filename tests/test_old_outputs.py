"""Outputs written before the package moved into floors still work: a sliced checkpoint written by commit 89798e2
loads (its modeling file still matches the template, so no trust flag is needed) and gives the same logits, and
that commit's CNA vocabulary-range cache is hit (read, never recomputed) by today's code. The fixture and the
script that wrote it are in tests/fixtures/old_outputs/ (README.md there)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers as T

from surgery.commands.inspect.job import inspect
from surgery.find import cna
from surgery.io import checkpoint, trust
from surgery.io.loading import load_model
from surgery.model.arch import ModelView

FIX = Path(__file__).parent / "fixtures" / "old_outputs"


@pytest.fixture(scope="module")
def ref():
    return torch.load(FIX / "logits.pt"), json.loads((FIX / "expected.json").read_text())


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.float()


def test_old_sliced_checkpoint_is_trusted_and_loads_with_the_same_logits(ref):
    saved, _ = ref
    ids, mask = saved["input_ids"], saved["attention_mask"]
    assert trust.not_ours(FIX / "sliced") is None and trust.remote_code(FIX / "sliced") is True
    model = checkpoint.load(FIX / "sliced")
    assert model.config.ffn_widths == [16, 8] and model.surgery_kept[1] == [1, 2, 3, 40]
    torch.testing.assert_close(_logits(model, ids, mask), saved["sliced_logits"], atol=1e-5, rtol=0)
    via_loader = load_model(str(FIX / "sliced")).model
    torch.testing.assert_close(_logits(via_loader, ids, mask), saved["sliced_logits"], atol=1e-5, rtol=0)
    plain = T.AutoModelForCausalLM.from_pretrained(str(FIX / "sliced"), trust_remote_code=True).eval()
    torch.testing.assert_close(_logits(plain, ids, mask), saved["sliced_logits"], atol=1e-5, rtol=0)
    report = inspect(str(FIX / "sliced")).data
    assert report["ok"] and report["problems"] == [] and report["files_checked"] == 6


def test_old_vocabulary_range_cache_is_hit_not_recomputed(ref, tmp_path, monkeypatch):
    saved, expected = ref
    ids, mask = saved["input_ids"], saved["attention_mask"]
    shutil.copytree(FIX / "cna_home", tmp_path / "home")  # never write into the fixture
    monkeypatch.setenv("SURGERY_HOME", str(tmp_path / "home"))
    cache = tmp_path / "home" / "cache" / "vocab-range"
    before = {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in cache.iterdir()}
    monkeypatch.setattr(cna, "_save_quietly", lambda *a, **k: pytest.fail("vocabulary-range cache miss"))
    dense = load_model(str(FIX / "dense")).model
    torch.testing.assert_close(_logits(dense, ids, mask), saved["dense_logits"], atol=1e-5, rtol=0)
    res = cna.compare(ModelView(dense), (ids, mask), [0, 1], k=6)
    assert before == {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in cache.iterdir()}
    for layer in (0, 1):
        key = expected["cna"]["cache_key_by_layer"][str(layer)]
        hi, lo = torch.load(cache / f"{key}.pt")
        assert all(torch.equal(a, b) for a, b in zip(res.scorer_a.vocab_range(layer), (hi, lo)))
    assert res.top.layer.tolist() == expected["cna"]["top_layer"]
    assert res.top.index.tolist() == expected["cna"]["top_index"]
    torch.testing.assert_close(res.top.score, torch.tensor(expected["cna"]["top_score"]), atol=1e-5, rtol=0)
