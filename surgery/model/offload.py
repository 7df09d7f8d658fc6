"""Weights that live off the execution device: read them as math objects (accelerate's CPU / disk offload).

A model loaded with `--device auto --max-memory ...` (accelerate `device_map="auto"`) keeps the parameters that do
not fit on the `meta` device; accelerate's hooks bring each module's weights in for its forward and drop them after.
The forward passes need nothing from us. What does is the code that reads weights directly (CNA's value vectors,
the unembedding, the norm gains): `tensor(module, name)` returns the real tensor for such a module (loaded for the
duration of the read; the caller holds the only reference, so it is freed as soon as the caller drops it).

    w = tensor(view.ffn_out(layer))          # [d, N] even when layer's FFN lives on disk
"""

from __future__ import annotations

from torch import Tensor, nn


def offloaded(module: nn.Module) -> bool:
    """Whether `module`'s own parameters are offloaded (accelerate keeps them on `meta` between forwards)."""
    from accelerate.utils import has_offloaded_params

    return has_offloaded_params(module)


def tensor(module: nn.Module, name: str = "weight") -> Tensor:
    """`module.<name>` as a real tensor on the module's execution device, whether or not it is offloaded."""
    if not offloaded(module):
        return getattr(module, name)
    from accelerate.utils import align_module_device

    with align_module_device(module):  # loads the module's weights from the offload map; `meta` again after
        return getattr(module, name)


def any_offloaded(model: nn.Module) -> bool:
    """Whether some module of `model` is offloaded (its weights cannot be edited in place)."""
    return any(offloaded(m) for m in model.modules())
