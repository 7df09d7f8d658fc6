"""The paper's validations (`surgery cna --validate mask,pe,fe`): each number equals an independent computation
through the weights, on the real SmolLM2 (a random model has nothing to lose, so equality there proves little)."""

from __future__ import annotations

import random

import pytest
import torch

from surgery.evals import arithmetic
from surgery.find import validate as V
from surgery.model.arch import ModelView
from surgery.model.batching import predict_cases

pytestmark = [pytest.mark.real, pytest.mark.slow]


@pytest.fixture(scope="module")
def ctx(smol):
    cases = arithmetic.cases(arithmetic.build(digits=(1,), templates=("calculate",), limit=16, seed=0), smol.tokenizer)
    return V._Ctx(smol, ModelView(smol.model), cases, 32, random.Random(0))


def _weight_accuracy(ctx, zero: dict[int, list[int]]) -> float:
    """Accuracy with the listed neurons zeroed in the WEIGHTS (not by hooks); the weights are restored after."""
    m = ctx.loaded.model
    saved = {k: v.clone() for k, v in m.state_dict().items() if any(f"layers.{l}.mlp" in k for l in zero)}
    try:
        for layer, idx in zero.items():
            ModelView(m).zero_neuron_weights(layer, idx)
        return float(predict_cases(m, ctx.loaded.tokenizer, ctx.cases, 32, progress=False)["correct"].float().mean())
    finally:
        m.load_state_dict(saved, strict=False)


def test_baseline_is_the_models_accuracy(ctx):
    assert 0.2 < ctx.base < 1.0  # SmolLM2 gets some, not all, one-digit answers: drops can be measured
    assert ctx.base == _weight_accuracy(ctx, {})


def test_zeroing_and_keep_only_equal_weight_edits(ctx):
    top = [
        (28, 480),
        (26, 534),
        (22, 1010),
        (29, 7),
    ]  # the number neurons of docs/results/cna-validation.md and one more
    assert ctx.accuracy(ctx.zeroed(top)) == _weight_accuracy(ctx, {28: [480], 26: [534], 22: [1010], 29: [7]})
    deep = [28, 29]
    keep = V._keep_only(ctx, [(28, 480)], deep)
    others = {28: [i for i in range(1536) if i != 480], 29: list(range(1536))}
    assert ctx.accuracy(keep) == _weight_accuracy(ctx, others)
    assert ctx.accuracy(keep) < ctx.base  # two whole deep FFNs gone: the model must get worse


def test_random_controls_are_disjoint_and_same_shape(ctx):
    sel = [(20, 1), (20, 2), (25, 3)]
    rnd = ctx.random_like(sel)
    assert not set(rnd) & set(sel) and sorted(l for l, _ in rnd) == [20, 20, 25]


def test_prediction_enhancing_numbers(ctx):
    top = [(10, 5), (20, 7), (25, 9)]
    pe = V.prediction_enhancing(ctx, top)
    v = ctx.view
    value = v.values(10)[5].float()
    cos = [float(torch.nn.functional.cosine_similarity(value, v.keys(l)[0][i].float(), dim=0)) for l, i in top[1:]]
    assert pe["lowest"] == "10_5" and pe["n_upper"] == 2
    assert abs(pe["cos_value_key_upper"] - sum(cos) / 2) < 1e-6
    clean, zero = ctx.coefficients(), ctx.coefficients(scales=ctx.zeroed([(10, 5)]))
    before = sum(float(clean[l][i].abs()) for l, i in top[1:])
    after = sum(float(zero[l][i].abs()) for l, i in top[1:])
    assert abs(pe["upper_coef_change_zero_lowest"] - (after - before) / before) < 1e-6
    assert pe["upper_coef_change_zero_lowest"] != 0.0  # zeroing an earlier neuron moves later coefficients
    assert V.prediction_enhancing(ctx, [(20, 1), (20, 2)]) == {"skipped": "all top neurons sit in one layer"}


def test_coefficient_drop_under_head_ablation(ctx):
    top = [(20, 1), (21, 2)]
    d = V._coef_drop(ctx, top, ((1, 4),))
    clean, abl = ctx.coefficients(), ctx.coefficients(ablate=((1, 4),))
    before = sum(float(clean[l][i].abs()) for l, i in top)
    assert abs(d["top_relative_change"] - (sum(float(abl[l][i].abs()) for l, i in top) - before) / before) < 1e-6
    assert d["k"] == 2 and d["top_relative_change"] != 0.0
