"""Neuron sets, shared by `prune` and `debias`: ranking scores across layers, seeded random scores, and mean
coefficients over prompts (the activation baselines, the coefficient-amplification table).

Scores are {layer: [N] tensor}; a neuron is (layer, index).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from surgery.model.arch import ModelView
from surgery.model.batching import device_of, left_pad, position_ids
from surgery.model.hooks import Hooks

Neuron = tuple[int, int]  # (layer, index)


def offsets_of(widths: Sequence[int]) -> Tensor:
    """[0, w0, w0 + w1, ...]: where each layer starts when the layers' neurons are concatenated."""
    return torch.tensor([0, *widths]).cumsum(0)


def unflatten(flat: Tensor, layers: Sequence[int], offsets: Tensor) -> tuple[Tensor, Tensor]:
    """Flat neuron indices over concatenated layers -> (layer, index within its layer), same shape as `flat`."""
    offsets = offsets.to(flat.device)
    pos = torch.bucketize(flat.contiguous(), offsets[1:], right=True)
    return torch.tensor(list(layers), device=flat.device)[pos], flat - offsets[pos]


def top_n(scores: dict[int, Tensor], n: int) -> list[Neuron]:
    """The n highest-scoring (layer, index) pairs over all layers, best first."""
    layers = sorted(scores)
    flat = torch.cat([scores[l].float() for l in layers])
    li, ix = unflatten(flat.topk(n).indices, layers, offsets_of([len(scores[l]) for l in layers]))
    return list(zip(li.tolist(), ix.tolist()))


def by_layer(neurons: Sequence[Neuron]) -> dict[int, list[int]]:
    """{layer: sorted indices}."""
    out: dict[int, list[int]] = {}
    for l, i in neurons:
        out.setdefault(l, []).append(i)
    return {l: sorted(v) for l, v in sorted(out.items())}


def zero_scales(view: ModelView, neurons: Sequence[Neuron]) -> dict[int, Tensor]:
    """Per-layer coefficient scales [N] that zero `neurons` (1 elsewhere), for `Hooks.scale_neurons`."""
    scales: dict[int, Tensor] = {}
    for l, i in neurons:
        scales.setdefault(l, torch.ones(view.ffn_width(l)))[i] = 0.0
    return scales


def random_scores(view: ModelView, layers: list[int], seed: int) -> dict[int, Tensor]:
    """Seeded uniform scores: the top N of them is a uniform random N-subset (nested across N); the paper's
    random baseline (LoRA9-r)."""
    g = torch.Generator().manual_seed(seed)
    return {l: torch.rand(view.ffn_width(l), generator=g) for l in layers}


@torch.no_grad()
def mean_coefficients(
    view: ModelView,
    seqs: Sequence[Sequence[int]],
    layers: list[int],
    pad: int,
    batch_size: int = 32,
    absolute: bool = False,
    head_masks: dict[int, Tensor] | None = None,
    scales: dict[int, Tensor] | None = None,
) -> dict[int, Tensor]:
    """Mean coefficient m_k (or |m_k|) at the last position over `seqs` (duplicates counted, each distinct
    sequence run once), {layer: [N]}; optionally with heads masked and neurons scaled (`Hooks` settings)."""
    uniq = sorted({tuple(s) for s in seqs})
    count: dict[tuple, int] = {}
    for s in seqs:
        count[tuple(s)] = count.get(tuple(s), 0) + 1
    weight = torch.tensor([count[u] for u in uniq], dtype=torch.float32)
    sums = {l: torch.zeros(view.ffn_width(l)) for l in layers}
    dev = device_of(view.model)
    for i in range(0, len(uniq), batch_size):
        ids, mask = left_pad(uniq[i : i + batch_size], pad)
        with Hooks(view) as h:
            for layer, hm in (head_masks or {}).items():
                h.ablate_heads(layer, hm)
            for layer, s in (scales or {}).items():
                h.scale_neurons(layer, s)
            h.capture("m", layers, positions=-1)
            view.model(
                input_ids=ids.to(dev),
                attention_mask=mask.to(dev),
                position_ids=position_ids(mask).to(dev),
                logits_to_keep=1,
                use_cache=False,
            )
        for l in layers:
            m = h.store["m", l].float().cpu()
            sums[l] += weight[i : i + batch_size] @ (m.abs() if absolute else m)
    return {l: v / weight.sum() for l, v in sums.items()}
