"""Physical FFN slicing: keep a set of neurons per layer, cut the weights, record per-layer widths in the config.

Keeping neuron set K of layer l means: key rows K (gate/up, fc1; fused gate_up rows K and N+K), key bias K,
value columns K (down/fc2; GPT-2 Conv1D: rows). The sliced model computes exactly what the dense model computes
with every other neuron zeroed (docs/design.md section 1), and is smaller and faster.

Like nanoGPT's `crop_block_size`, the structural edit updates weights AND config together: `config.ffn_widths`
(every layer), `config.per_layer_config` (transformers' per-layer overrides of the width attribute, only where a
layer differs from the base width) and, on the model object, `surgery_kept` (kept indices in BASE numbering, so
slicing twice composes and `export` can re-expand to the base shape).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .arch import ModelView
from .errors import UsageError

KeepSpec = dict[int, "Tensor | list[int]"]


# ---- index helpers -----------------------------------------------------------------------------------------
def normalize_keep(view: ModelView, keep: KeepSpec) -> dict[int, Tensor]:
    """Sorted, unique long indices per layer, checked against the layer's current width (one-line errors)."""
    out: dict[int, Tensor] = {}
    for layer, idx in keep.items():
        layer = view.check_layer(int(layer))
        t = torch.as_tensor(idx, dtype=torch.long).flatten().unique(sorted=True)
        width = view.ffn_width(layer)
        if t.numel() and (int(t[0]) < 0 or int(t[-1]) >= width):
            raise UsageError(f"layer {layer}: neuron indices must be in 0..{width - 1}; "
                             f"got {int(t[0])}..{int(t[-1])}")
        out[layer] = t
    return out


def keep_to_mask(keep: KeepSpec, widths: list[int] | dict[int, int]) -> dict[int, Tensor]:
    """Boolean masks (True = kept) of each layer's width; layers absent from `keep` keep every neuron."""
    items = widths.items() if isinstance(widths, dict) else enumerate(widths)
    masks = {}
    for layer, width in items:
        m = torch.ones(width, dtype=torch.bool)
        if layer in keep:
            m = torch.zeros(width, dtype=torch.bool)
            m[torch.as_tensor(keep[layer], dtype=torch.long)] = True
        masks[layer] = m
    return masks


def mask_to_keep(masks: dict[int, Tensor]) -> dict[int, Tensor]:
    """Kept indices (sorted) from boolean masks."""
    return {layer: m.nonzero().flatten() for layer, m in masks.items()}


def removed(keep: Tensor | list[int], width: int) -> Tensor:
    """The complement of `keep` in 0..width-1, sorted: the neurons slicing drops."""
    m = torch.ones(width, dtype=torch.bool)
    m[torch.as_tensor(keep, dtype=torch.long)] = False
    return m.nonzero().flatten()


def ffn_param_count(model: nn.Module) -> int:
    """Parameters in all FFN key and value projections (weights and biases)."""
    view = ModelView(model)
    mods = [m for i in range(view.n_layers) for m in (*view.ffn_in(i), view.ffn_out(i))]
    return sum(p.numel() for m in mods for p in m.parameters(recurse=False))


def base_width(model: nn.Module) -> int:
    """The unsliced FFN width: the config's width attribute (GPT-2 `n_inner=None` means the layers' width)."""
    view = ModelView(model)
    w = _global(model.config, view.arch.width_attr)
    return int(w) if w else max(view.ffn_widths())


def kept_indices(model: nn.Module) -> dict[int, list[int]]:
    """Kept neurons of every sliced layer, in base numbering (empty for a model never sliced)."""
    return {int(k): list(map(int, v)) for k, v in getattr(model, "surgery_kept", {}).items()}


# ---- the edit ----------------------------------------------------------------------------------------------
@torch.no_grad()
def slice_ffn(model: nn.Module, keep: KeepSpec) -> dict[int, int]:
    """Cut each listed layer's FFN to the kept neuron indices; returns {layer: new width} for those layers.

    Replaces the key/value modules with smaller ones (same class, dtype, device, requires_grad) and updates
    `model.config` (ffn_widths, per_layer_config) and `model.surgery_kept` (base numbering)."""
    view = ModelView(model)
    base = base_width(model)
    idx = normalize_keep(view, keep)
    kept = kept_indices(model)
    for layer, k in idx.items():
        _slice_layer(view, layer, k)
        prev = torch.tensor(kept.get(layer, range(base)), dtype=torch.long)
        kept[layer] = prev[k].tolist()
    model.surgery_kept = kept
    record_widths(model, view.ffn_widths(), base)
    return {layer: view.ffn_width(layer) for layer in idx}


@torch.no_grad()
def fold_means(model: nn.Module, keep: KeepSpec, means: dict[int, Tensor]) -> dict[int, Tensor]:
    """FLAP's bias compensation, on the DENSE weights before `slice_ffn(model, keep)`: add each removed neuron's
    mean contribution, sum over removed k of mean(m_k) v_k, to its layer's FFN output bias. The sliced model then
    computes exactly what the dense model computes with every removed neuron's coefficient replaced by its mean.
    Returns the added bias per layer.

    Every layer's FFN output gets a bias (zero where nothing was folded) so the checkpoint has one shape per layer.
    Where the arch table names a config flag for native FFN biases (`Arch.ffn_bias_attr`, Llama: mlp_bias) it is
    switched on (key biases stay zero, so it loads natively); architectures whose native class has no FFN output
    bias record `config.surgery_ffn_out_bias` and export only as the sliced layout."""
    view = ModelView(model)
    _ensure_out_biases(model, view)
    shifts = {}
    for layer, k in normalize_keep(view, keep).items():
        v = view.values(layer)
        gone = removed(k, view.ffn_width(layer)).to(v.device)
        shifts[layer] = means[layer].to(v)[gone] @ v[gone]
        view.ffn_out(layer).bias.add_(shifts[layer])
    return shifts


def _ensure_out_biases(model: nn.Module, view: ModelView) -> None:
    """A (zero) bias on every layer's FFN output projection; on Llama-family configs also on the keys (mlp_bias)."""
    flag = view.arch.ffn_bias_attr  # the config switch of a native FFN bias (biases on keys and values alike)
    for i in range(view.n_layers):
        mods = [*view.ffn_in(i), view.ffn_out(i)] if flag else [view.ffn_out(i)]
        for m in mods:
            if getattr(m, "bias", None) is None:
                w = m.weight
                m.bias = nn.Parameter(torch.zeros(w.shape[1] if view.arch.conv1d else w.shape[0],
                                                  dtype=w.dtype, device=w.device))
    if flag:
        setattr(model.config, flag, True)
    elif not view.native_ffn_bias():
        model.config.surgery_ffn_out_bias = True


def _slice_layer(view: ModelView, layer: int, k: Tensor) -> None:
    n = view.ffn_width(layer)
    rows = torch.cat([k, k + n]) if view.arch.ffn_kind == "fused" else k
    root = view.layer(layer)
    for path in view.arch.ffn_in:
        _replace(root, path, _cut(_get(root, path), rows, out_dim=True, conv1d=view.arch.conv1d))
    _replace(root, view.arch.ffn_out, _cut(view.ffn_out(layer), k, out_dim=False, conv1d=view.arch.conv1d))
    ffn = view.ffn(layer)
    for attr in ("intermediate_size", "ffn_dim", "n_inner"):
        if isinstance(getattr(ffn, attr, None), int):
            setattr(ffn, attr, len(k))


def _cut(mod: nn.Module, idx: Tensor, out_dim: bool, conv1d: bool) -> nn.Module:
    """A new projection keeping output features `idx` (out_dim) or input features `idx`; Conv1D stores [in, out]."""
    w = mod.weight
    if type(mod) is not nn.Linear and not conv1d:
        raise UsageError(f"cannot slice a {type(mod).__name__}; slice before adding LoRA adapters (or merge them)")
    idx = idx.to(w.device)
    axis = (1 if out_dim else 0) if conv1d else (0 if out_dim else 1)
    new_w = w.index_select(axis, idx).contiguous()
    bias = getattr(mod, "bias", None)
    new_b = bias.index_select(0, idx).contiguous() if (bias is not None and out_dim) else bias
    out_f, in_f = (new_w.shape[1], new_w.shape[0]) if conv1d else tuple(new_w.shape)
    new = _empty_like(mod, in_f, out_f, bias is not None, conv1d)
    new.weight = nn.Parameter(new_w, requires_grad=w.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(new_b.clone(), requires_grad=bias.requires_grad)
    return new.train(mod.training)


def _empty_like(mod: nn.Module, in_f: int, out_f: int, bias: bool, conv1d: bool) -> nn.Module:
    with torch.device("meta"):
        if conv1d:
            return type(mod)(out_f, in_f)  # transformers Conv1D(nf=out, nx=in)
        return nn.Linear(in_f, out_f, bias=bias)


def record_widths(model: nn.Module, widths: list[int], base: int) -> None:
    """Write per-layer widths into the config: `ffn_widths`, transformers' `per_layer_config`, base width kept."""
    cfg = model.config
    attr = ModelView(model).arch.width_attr
    _allow_global(cfg)
    if _global(cfg, attr) in (None, 0):
        setattr(cfg, attr, base)  # GPT-2 n_inner=None means 4*n_embd: make the base explicit
    cfg.ffn_widths = list(widths)
    overrides = {i: {attr: w} for i, w in enumerate(widths) if w != base}
    if hasattr(type(cfg), "per_layer_config"):
        cfg.per_layer_config = None
        if overrides:
            cfg.per_layer_config = overrides


def _allow_global(cfg) -> None:
    """Heterogeneous configs raise on reading the global width; code that reads it (ours, peft) wants the base."""
    if hasattr(type(cfg), "allow_global_per_layer_attribute_access"):
        cfg.allow_global_per_layer_attribute_access = True


def _global(cfg, attr: str):
    """The global (base) value of a config attribute, without the heterogeneous-config warning."""
    if hasattr(cfg, "_getattr_without_heterogeneous_validation"):
        return cfg._getattr_without_heterogeneous_validation(attr, None)
    return getattr(cfg, attr, None)


# ---- module paths (relative paths come from the arch table) -----------------------------------------------
def _get(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _replace(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_get(root, parent) if parent else root, name, new)


def dense_equivalent(model: nn.Module, keep: KeepSpec) -> None:
    """Zero (in place) every neuron `keep` drops: the dense reference a sliced model must match exactly."""
    view = ModelView(model)
    for layer, k in normalize_keep(view, keep).items():
        view.zero_neuron_weights(layer, removed(k, view.ffn_width(layer)))
