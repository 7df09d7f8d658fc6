"""Physical FFN slicing: keep a set of neurons per layer, cut the weights, record per-layer widths in the config.

Keeping neuron set K of layer l means: key rows K (gate/up, fc1; fused gate_up rows K and N+K), key bias K,
value columns K (down/fc2; GPT-2 Conv1D: rows). The sliced model computes exactly what the dense model computes
with every other neuron zeroed (docs/design.md section 1), and is smaller and faster.

Like nanoGPT's `crop_block_size`, the structural edit updates weights AND config together: `config.ffn_widths`
(every layer), `config.per_layer_config` (transformers' per-layer overrides of the width attribute, only where a
layer differs from the base width) and, on the model object, `surgery_kept` (kept indices in BASE numbering, so
slicing twice composes and `export` can re-expand to the base shape).

Width rounding (on by default): a layer keeping n neurons gets the physical width n rounded UP to a multiple
(`PAD_MULTIPLE` = 8; `slice_ffn(..., multiple=1)` turns it off). The extra "padding neurons" sit at the END of the
layer (positions n..width-1) with all-zero key rows, key biases and value columns, so each contributes
m_p v_p = m_p * 0 = 0 and the output is that of the unpadded slice (for every supported activation act(0) = 0
as well, so m_p = 0 too). Why: GEMMs whose inner or outer size is off a multiple of 8 take slower paths
(bench/widths.py: on the project CPU 77 -> 80 neurons is 10% faster, 109 -> 112 12%, 563 -> 564 7%). A width that
would reach the base width is left unrounded. The story stays complete: `surgery_kept[l]` lists the n real
neurons (base numbering), `config.ffn_widths[l]` is the physical width, `config.ffn_padding[l]` =
width - n, and export writes the padding into surgery.json (`ffn.padding`) and refuses a model whose padding
neurons are not exactly zero (training a padded FFN: `lora.attach` freezes the padding's LoRA rows/columns).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from surgery.errors import UsageError
from surgery.model.arch import ModelView

KeepSpec = dict[int, "Tensor | list[int]"]
PAD_MULTIPLE = 8  # default width multiple of a sliced layer (bench/widths.py); 1 = no padding


# ---- index helpers -----------------------------------------------------------------------------------------
def normalize_keep(view: ModelView, keep: KeepSpec) -> dict[int, Tensor]:
    """Sorted, unique long indices per layer, checked against the layer's current width (one-line errors)."""
    out: dict[int, Tensor] = {}
    for layer, idx in keep.items():
        layer = view.check_layer(int(layer))
        t = torch.as_tensor(idx, dtype=torch.long).flatten().unique(sorted=True)
        width = view.ffn_width(layer)
        if t.numel() and (int(t[0]) < 0 or int(t[-1]) >= width):
            raise UsageError(f"layer {layer}: neuron indices must be in 0..{width - 1}; got {int(t[0])}..{int(t[-1])}")
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


def padded_width(n: int, base: int, multiple: int = PAD_MULTIPLE) -> int:
    """The physical width of a layer keeping n neurons: n rounded up to `multiple`, or n itself when rounding
    would reach the base width (a base-width layer must be in base order) or multiple <= 1."""
    if multiple <= 1 or n == 0:
        return n
    w = -(-n // multiple) * multiple
    return w if w < base else n


def sliced_width(model: nn.Module, n: int) -> int:
    """The width `slice_ffn` gives a layer of `model` keeping n neurons (the multiple it was sliced with)."""
    return padded_width(n, base_width(model), getattr(model, "surgery_pad_multiple", PAD_MULTIPLE))


def padding(model: nn.Module) -> dict[int, int]:
    """{layer: number of zero padding neurons at the end of the layer} for every sliced layer (0 = none)."""
    widths = ModelView(model).ffn_widths()
    return {l: widths[l] - len(k) for l, k in kept_indices(model).items()}


def kept_indices(model: nn.Module) -> dict[int, list[int]]:
    """Kept neurons of every sliced layer, in base numbering (empty for a model never sliced)."""
    return {int(k): list(map(int, v)) for k, v in getattr(model, "surgery_kept", {}).items()}


# ---- the edit ----------------------------------------------------------------------------------------------
@torch.no_grad()
def slice_ffn(model: nn.Module, keep: KeepSpec, multiple: int | None = None) -> dict[int, int]:
    """Cut each listed layer's FFN to the kept neuron indices (current numbering), padded with zero neurons up to
    a multiple of `multiple` (default PAD_MULTIPLE; 1 = exact widths); returns {layer: new width}.

    Replaces the key/value modules with smaller ones (same class, dtype, device, requires_grad) and updates
    `model.config` (ffn_widths, ffn_padding, per_layer_config) and `model.surgery_kept` (real neurons only, base
    numbering). Keeping a padding position of an already padded layer keeps nothing (it is zero)."""
    multiple = PAD_MULTIPLE if multiple is None else int(multiple)
    if multiple < 1:
        raise UsageError(f"width multiple must be >= 1 (1 = no padding); got {multiple}")
    view = ModelView(model)
    base = base_width(model)
    idx = normalize_keep(view, keep)
    kept = kept_indices(model)
    for layer, k in idx.items():
        prev = torch.tensor(kept.get(layer, range(base)), dtype=torch.long)
        k = k[k < len(prev)]  # positions past the real neurons are padding
        _slice_layer(view, layer, k, padded_width(len(k), base, multiple))
        kept[layer] = prev[k].tolist()
    model.surgery_kept = kept
    model.surgery_pad_multiple = multiple
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
    ensure_out_biases(model, view)
    shifts = {}
    for layer, k in normalize_keep(view, keep).items():
        v = view.values(layer)
        gone = removed(k, view.ffn_width(layer)).to(v.device)
        shifts[layer] = means[layer].to(v)[gone] @ v[gone]
        view.ffn_out(layer).bias.add_(shifts[layer])
    return shifts


def ensure_out_biases(model: nn.Module, view: ModelView) -> None:
    """A (zero) bias on every layer's FFN output projection; on Llama-family configs also on the keys (mlp_bias)."""
    flag = view.arch.ffn_bias_attr  # the config switch of a native FFN bias (biases on keys and values alike)
    for i in range(view.n_layers):
        mods = [*view.ffn_in(i), view.ffn_out(i)] if flag else [view.ffn_out(i)]
        for m in mods:
            if getattr(m, "bias", None) is None:
                w = m.weight
                m.bias = nn.Parameter(
                    torch.zeros(w.shape[1] if view.arch.conv1d else w.shape[0], dtype=w.dtype, device=w.device)
                )
    if flag:
        setattr(model.config, flag, True)
    elif not view.native_ffn_bias():
        model.config.surgery_ffn_out_bias = True


def _slice_layer(view: ModelView, layer: int, k: Tensor, width: int) -> None:
    n = view.ffn_width(layer)
    groups = [k, k + n] if view.arch.ffn_kind == "fused" else [k]
    root = view.layer(layer)
    for path in view.arch.ffn_in:
        _replace(root, path, _cut(_get(root, path), groups, width, out_dim=True, conv1d=view.arch.conv1d))
    _replace(root, view.arch.ffn_out, _cut(view.ffn_out(layer), [k], width, out_dim=False, conv1d=view.arch.conv1d))
    ffn = view.ffn(layer)
    for attr in ("intermediate_size", "ffn_dim", "n_inner"):
        if isinstance(getattr(ffn, attr, None), int):
            setattr(ffn, attr, width)


def _take(t: Tensor, axis: int, groups: list[Tensor], width: int) -> Tensor:
    """Features `groups` of t along `axis`, each group zero-padded at its end to `width` (fused gate_up: two)."""
    parts = []
    for g in groups:
        part = t.index_select(axis, g.to(t.device))
        if width > len(g):
            shape = list(part.shape)
            shape[axis] = width - len(g)
            part = torch.cat([part, part.new_zeros(shape)], axis)
        parts.append(part)
    return torch.cat(parts, axis).contiguous()


def _cut(mod: nn.Module, groups: list[Tensor], width: int, out_dim: bool, conv1d: bool) -> nn.Module:
    """A new projection keeping output features `groups` (out_dim) or input features, each group zero-padded to
    `width`; Conv1D stores [in, out]."""
    w = mod.weight
    if type(mod) is not nn.Linear and not conv1d:
        raise UsageError(f"cannot slice a {type(mod).__name__}; slice before adding LoRA adapters (or merge them)")
    axis = (1 if out_dim else 0) if conv1d else (0 if out_dim else 1)
    new_w = _take(w, axis, groups, width)
    bias = getattr(mod, "bias", None)
    new_b = _take(bias, 0, groups, width) if (bias is not None and out_dim) else bias
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
    pad = padding(model)
    cfg.ffn_padding = [pad.get(i, 0) for i in range(len(widths))]
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
