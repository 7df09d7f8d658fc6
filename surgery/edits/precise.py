"""Precise fine-tuning (Zhang et al., ICML 2024): train only the weights of chosen heads and MLPs.

    sel = select(model, Components([(14, 2), (20, 1)], mlps=[20]))   # which entries of which parameters train
    with Precise(model, sel, grad_scale=None):                        # freeze the rest, mask + rescale gradients
        answer_trainer(model, rows, spec, lr, tmp, pad).train()


What a head owns (through the arch table, `ModelView.head_param_slices`): its query rows of q_proj (and bias),
the key and value rows of ITS key/value head, and its input columns of o_proj. Under grouped-query attention a
key/value head is shared by the n_heads / n_kv query heads of its group; selecting one query head trains the
shared k/v rows, so the other heads of that group change through their keys and values (their own query rows
and o_proj columns stay frozen). This is the only choice that lets the selected head's attention pattern and
values move; the alternative (query and output only) is not offered. A selected MLP trains all its parameters
(gate/up/down or fc1/fc2, with biases); norms are never trained.

Mechanics: every parameter gets requires_grad=False except the ones holding a selected entry; on those a gradient
hook multiplies the gradient by a 0/1 mask (and by the rescale factor), so the optimiser (the HF Trainer's AdamW
sees only requires_grad parameters) keeps state only for matrices that contain a trained entry. Masked entries
get a zero gradient at every step, so AdamW's moments stay exactly 0 and their update is exactly 0 with weight
decay 0: frozen entries end bit-identical (tested). Weight decay must be 0 (decoupled decay would shrink them).

Gradient rescaling (the paper): head gradients are multiplied by H/h (heads in the model / heads trained),
`grad_scale=None`; a number overrides it, 1 turns it off. Under Adam a constant factor changes the update only
through epsilon and gradient-norm clipping (clipping sees the larger norm), so with AdamW it is nearly a no-op;
it matters for SGD. MLP gradients are not rescaled.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from surgery.errors import UsageError
from surgery.find.components import Components
from surgery.model.arch import ModelView


@dataclass
class Selection:
    """Per parameter name: a 0/1 mask of its trained entries (None: the whole parameter trains)."""

    masks: dict[str, Tensor | None]
    heads: list[tuple[int, int]]
    mlps: list[int]
    head_params: set[str] = field(default_factory=set)  # parameters whose gradient is rescaled

    def trained_entries(self, model: nn.Module) -> int:
        params = dict(model.named_parameters())
        return sum(params[n].numel() if m is None else int(m.sum()) for n, m in self.masks.items())


def select(model: nn.Module, comps: Components) -> Selection:
    """Masks of the entries owned by comps' heads (q/k/v rows, o_proj columns) and whole MLP parameters."""
    view = ModelView(model)
    params = dict(model.named_parameters())
    masks: dict[str, Tensor | None] = {}
    for l, h in comps.heads:
        for name, axis, idx in view.head_param_slices(l, h):
            p = params[name]
            m = masks.get(name)
            if m is None:
                m = masks[name] = torch.zeros_like(p, dtype=torch.bool)
            m.index_fill_(axis, idx.to(p.device), True)
    head_params = set(masks)
    for l in comps.mlps:
        for name in view.ffn_param_names(l):
            masks[name] = None
    return Selection(masks, list(comps.heads), list(comps.mlps), head_params)


def rescale_factor(model: nn.Module, sel: Selection, grad_scale: float | None) -> float:
    """H/h: query heads in the model over heads trained (the paper), unless grad_scale is given."""
    if grad_scale is not None:
        return float(grad_scale)
    view = ModelView(model)
    return view.n_layers * view.n_heads / max(1, len(sel.heads))


class Precise:
    """Context manager: freeze everything outside `sel`, mask and rescale gradients inside it; restores
    requires_grad and removes the hooks on exit."""

    def __init__(self, model: nn.Module, sel: Selection, grad_scale: float | None = None):
        self.model, self.sel = model, sel
        self.scale = rescale_factor(model, sel, grad_scale)
        self._handles: list = []
        self._saved: dict[str, bool] = {}

    def __enter__(self) -> "Precise":
        params = dict(self.model.named_parameters())
        missing = [n for n in self.sel.masks if n not in params]
        if missing:
            raise UsageError(f"selected parameters {missing[:3]} are not in the model; select on this model")
        for name, p in params.items():
            self._saved[name] = p.requires_grad
            p.requires_grad_(name in self.sel.masks)
        for name, mask in self.sel.masks.items():
            factor = self.scale if name in self.sel.head_params else 1.0
            self._handles.append(params[name].register_hook(_grad_hook(mask, factor, params[name])))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for name, p in self.model.named_parameters():
            p.requires_grad_(self._saved.get(name, True))


def _grad_hook(mask: Tensor | None, factor: float, p: Tensor):
    """g -> g * mask * factor (mask kept on the parameter's device and dtype)."""
    m = None if mask is None else mask.to(device=p.device, dtype=p.dtype)

    def hook(g: Tensor) -> Tensor:
        if m is not None:
            g = g * m
        return g * factor if factor != 1.0 else g

    return hook


def check_optimizer_settings(weight_decay: float) -> None:
    """Decoupled weight decay would move frozen entries inside a partly trained matrix: refuse it."""
    if weight_decay:
        raise UsageError(
            f"precise fine-tuning needs train.weight_decay 0 (got {weight_decay}): decoupled decay "
            "would shrink the frozen rows of partly trained matrices"
        )


def state_bytes(optimizer) -> int:
    """Bytes held in the optimiser's state (e.g. AdamW's two moments), measured from its tensors."""
    total = 0
    for st in optimizer.state.values():
        total += sum(t.numel() * t.element_size() for t in st.values() if isinstance(t, Tensor))
    return total


def grad_bytes(model: nn.Module) -> int:
    """Bytes held in .grad tensors of the model's parameters."""
    return sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
