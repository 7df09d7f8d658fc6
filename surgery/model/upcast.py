"""fp32 arithmetic on low-precision weights: a bf16 / fp16 model computes exactly what an fp32 model holding the same
(bf16-representable) weights computes, one module upcast at a time.

    with fp32_compute(model):          # model in bfloat16
        out = model(input_ids=ids)     # every module runs in fp32 on its own weights, upcast losslessly

Why: CNA certifies its top-k with bounds on fp32 quantities. Bounds that also covered bf16 rounding of every
activation would be loose (bf16 keeps 8 significant bits), and a certificate against a bf16 forward would certify
the rounding, not the model. Instead the forward that CNA reads runs in fp32: each module's parameters are cast to
fp32 on entry and back on exit (bf16 -> fp32 -> bf16 is exact), and the embedding output is fp32 from the start,
so the hidden states, rotary tables and attention run in fp32. Memory: the model stays in its dtype; at most one
module's parameters exist in fp32 at a time (the largest is the embedding or the LM head). The result equals the
fp32 model with the same weights to fp32 rounding (tests/test_bf16.py).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


def low_precision(model: nn.Module) -> bool:
    """Whether the model holds floating-point parameters narrower than fp32."""
    return any(p.is_floating_point() and p.element_size() < 4 for p in model.parameters())


@contextmanager
def fp32_compute(model: nn.Module) -> Iterator[None]:
    """Inside the block the model computes in fp32 on its own weights (a no-op for an fp32 model)."""
    if not low_precision(model):
        yield
        return
    handles = []
    for mod in model.modules():
        own = [p for p in mod.parameters(recurse=False) if p.is_floating_point()] + [
            b for b in mod.buffers(recurse=False) if b.is_floating_point()
        ]
        if not own:
            continue
        handles.append(mod.register_forward_pre_hook(_up))
        handles.append(mod.register_forward_hook(_down))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _up(mod: nn.Module, args) -> tuple | None:
    """Cast the module's own parameters and buffers to fp32 (remembering their dtype) and its float inputs."""
    saved = {}
    for name, t in [*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)]:
        if t.is_floating_point() and t.dtype != torch.float32:
            saved[name] = t.dtype
            t.data = t.data.float()
    mod._surgery_dtypes = saved
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def _down(mod: nn.Module, args, out):
    """Cast the parameters and buffers back (exact: they were representable in their own dtype)."""
    saved = getattr(mod, "_surgery_dtypes", {})
    for name, t in [*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)]:
        if name in saved:
            t.data = t.data.to(saved[name])
    mod._surgery_dtypes = {}
    return out
