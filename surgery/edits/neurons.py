"""Neuron edits behind a contrast (A vs B prompts): selection scores, hook edits and the same edits in the weights.

Shared by `surgery edit` (any pair set) and `surgery debias` (its gender recipe), so both select and edit with
the same code:
- `contrast_scores`: a registered "contrast" selector (`surgery.selectors`): CNA over pairs (imp(A) - imp(B) of
  the pair's target token, summed; candidates rescored exactly), activation-diff or random;
- `scaled` / `zeroed`: inside the block the neurons' coefficients are multiplied by a factor through hooks
  (m_k -> s m_k; s = 0 zeroes): what every measurement uses, no model copies;
- `edit_weights`: the same edit in the weights: zero (key rows and value vector zeroed), scale (value vector
  times s: m_k v_k -> s m_k v_k exactly) or remove (sliced out of the FFN; equal to zeroing).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from surgery.errors import UsageError
from surgery.find import selectors
from surgery.find.neurons import Neuron, by_layer, zero_scales
from surgery.model.arch import ModelView
from surgery.model.batching import device_of, left_pad, pad_id, position_ids
from surgery.model.hooks import Hooks
from surgery.model.slicing import slice_ffn

EDITS = ("zero", "scale", "remove")


def contrast_scores(
    view: ModelView,
    layers: list[int],
    pad: int,
    method: str,
    *,
    seqs_a: list[list[int]],
    seqs_b: list[list[int]],
    targets: list[int],
    prompts_a: list[list[int]],
    prompts_b: list[list[int]],
    seed: int = 0,
    batch_size: int = 32,
    candidates: int = 100,
    keep_seqs: list[list[int]] | None = None,
    keep_targets: list[int] | None = None,
) -> tuple[dict[int, Tensor], dict]:
    """Scores {layer: [N]} of contrast selector `method` (higher = edit first) and what it reported.

    CNA reads the per-case contexts (`seqs_a`/`seqs_b`, each ending before the scored token `targets`); the
    activation baselines and random read the bare prompts (`prompts_a`/`prompts_b`); cna-specific also reads
    the keep cases (`keep_seqs`, each ending before its `keep_targets` token)."""
    if method in ("cna", "cna-specific"):
        inp = selectors.Inputs(
            view,
            layers,
            pad,
            seqs_a,
            targets,
            seqs_b,
            batch_size=batch_size,
            candidates=candidates,
            keep_seqs=keep_seqs,
            keep_targets=keep_targets,
        )
    else:
        inp = selectors.Inputs(view, layers, pad, prompts_a, None, prompts_b, seed=seed, batch_size=batch_size)
    return selectors.score("contrast", method, inp), inp.info


@contextmanager
def scaled(model: nn.Module, neurons: Sequence[Neuron], factor: float = 0.0) -> Iterator[None]:
    """Inside the block the neurons' coefficients are multiplied by `factor` through hooks (0: zeroed)."""
    if not neurons:
        yield
        return
    view = ModelView(model)
    with Hooks(view) as h:
        for l, s in zero_scales(view, neurons).items():
            h.scale_neurons(l, torch.where(s == 0, torch.full_like(s, float(factor)), s))
        yield


def zeroed(model: nn.Module, neurons: Sequence[Neuron]):
    """Inside the block the neurons are zeroed by hooks (m_k -> 0: identical to zeroing their weights)."""
    return scaled(model, neurons, 0.0)


def edit_weights(
    model: nn.Module, neurons: Sequence[Neuron], edit: str, inplace: bool = False, factor: float = 0.0
) -> nn.Module:
    """The model with the neurons zeroed (key rows, key biases, value vectors), their value vectors scaled by
    `factor` (edit scale) or sliced out (edit remove); a deep copy unless `inplace`."""
    if edit not in EDITS:
        raise UsageError(f"unknown --edit {edit!r}; use one of {', '.join(EDITS)}")
    out = model if inplace else copy.deepcopy(model)
    view = ModelView(out)
    groups = by_layer(neurons)
    if edit == "zero":
        for l, idx in groups.items():
            view.zero_neuron_weights(l, idx)
    elif edit == "scale":
        for l, idx in groups.items():
            view.scale_neuron_values(l, idx, factor)
    else:
        slice_ffn(out, {l: kept(view, l, idx) for l, idx in groups.items()})
    return out


def kept(view: ModelView, layer: int, idx: Sequence[int]) -> Tensor:
    """Indices of `layer`'s neurons that are not in idx (what `remove` keeps)."""
    keep = torch.ones(view.ffn_width(layer), dtype=torch.bool)
    keep[list(idx)] = False
    return keep.nonzero().flatten()


@torch.no_grad()
def probe_logits(
    model: nn.Module, tokenizer, prompts: Sequence[str], neurons: Sequence[Neuron] = (), factor: float = 0.0
) -> Tensor:
    """Logits [B, T, V] of a left-padded prompt batch (neurons scaled by hooks): compares a weight edit with
    what the hook-based measurements saw."""
    ids, mask = left_pad([tokenizer(p).input_ids for p in prompts], pad_id(tokenizer))
    dev = device_of(model)
    with scaled(model, neurons, factor):
        return (
            model(
                input_ids=ids.to(dev),
                attention_mask=mask.to(dev),
                position_ids=position_ids(mask).to(dev),
                use_cache=False,
            )
            .logits.float()
            .cpu()
        )


def edit_and_check(
    model: nn.Module, tokenizer, chosen: list[Neuron], edit: str, probe: Sequence[str], factor: float = 0.0
) -> tuple[nn.Module, float]:
    """Edit the weights in place (every hook-based measurement is done by now) and return the edited model with
    the max |logit difference| to the hook-edited model on `probe` prompts (0 when the export is what was
    measured)."""
    hooked = probe_logits(model, tokenizer, probe, chosen, factor)
    edited = edit_weights(model, chosen, edit, inplace=True, factor=factor)
    return edited, float((probe_logits(edited, tokenizer, probe) - hooked).abs().max())
