"""Devices: the engine keeps its tensors on the model's device and returns scores on the CPU; --device drives
training. The parity tests run on every device this machine has (CUDA where one exists; the CPU always)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny

from surgery.edits import training
from surgery.edits.training import TrainSpec, train_args
from surgery.find import cna
from surgery.find import neurons as selection
from surgery.model.arch import ModelView

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SEQS = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16]]


def test_training_device_follows_the_model_not_the_machine(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU exists, but the model is on the CPU
    assert train_args(TrainSpec(), 1e-3, str(tmp_path), 8, device="cpu").use_cpu is True
    assert training._accelerated("cuda:0") and not training._accelerated("cpu") and not training._accelerated(None)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_cna_scan_on_device_equals_cpu(arch, device):
    ref = cna.scan(ModelView(make_tiny(arch)), SEQS, [0, 1, 2], 5, 0, ablate_b=((1, 1),), batch_size=2, progress=False)
    got = cna.scan(
        ModelView(make_tiny(arch).to(device)), SEQS, [0, 1, 2], 5, 0, ablate_b=((1, 1),), batch_size=2, progress=False
    )
    for name in ("top_layer", "top_index", "top_score", "targets"):
        assert getattr(got, name).device.type == "cpu"  # results come back on the CPU
    assert torch.equal(got.top_index, ref.top_index) and torch.equal(got.top_layer, ref.top_layer)
    assert torch.allclose(got.top_score, ref.top_score, atol=1e-5)
    for l in (0, 1, 2):
        assert got.coef_a[l].device.type == "cpu" and torch.allclose(got.total[l], ref.total[l], atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_scorer_pieces_on_device(device):
    view = ModelView(make_tiny("llama").to(device))
    ids = torch.tensor([SEQS[0]])
    st = cna.collect(view, ids, torch.ones_like(ids), [1])
    sc = cna.Scorer(view, st, view.final_sigma(st.hfin), torch.tensor([7]))  # target given on the CPU
    idx = torch.arange(4)
    assert sc.first_order(1).device.type == "cpu"
    assert torch.allclose(sc.exact_same(1, idx), sc.exact(1, idx[None]), atol=1e-5)
    assert len(cna.top_tokens(view, _Tok(), 1, 0)) == 10
    assert view.ov_matrix(0).device == view.values(0).device


@pytest.mark.parametrize("device", DEVICES)
def test_mean_coefficients_on_device(device):
    a = selection.mean_coefficients(ModelView(make_tiny("qwen2")), SEQS, [0, 2], pad=0)
    b = selection.mean_coefficients(ModelView(make_tiny("qwen2").to(device)), SEQS, [0, 2], pad=0)
    assert all(torch.allclose(a[l], b[l], atol=1e-5) for l in (0, 2))


class _Tok:
    def decode(self, ids):
        return str(ids[0])
