"""The one hook mechanism: capture and intervene on heads, neurons and the residual stream.

    with Hooks(model) as h:
        h.ablate_heads(17, mask)          # mask [H] or [B, H]: 1 keeps a head, 0 ablates it (zero or mean)
        h.scale_neurons(20, scale)        # scale [N] or [B, N]: 0 zeroes a neuron, 2 doubles it
        h.capture("m", layers=[20], positions=-1)
        model(**batch)
    h.store["m", 20]                      # [B, N] coefficients at the last position


Interventions act on the inputs of the attention output projection (head outputs z_h) and of the FFN output
projection (coefficients m_k), which is exactly what zeroing o_proj input columns or FFN value vectors does in
the weights. Hooks are registered on `__enter__` (or on the first call after it) and always removed on exit,
also when the body raises.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Iterable, Literal

import torch
from torch import Tensor, nn

from surgery.model.arch import ModelView

What = Literal["z", "m", "resid", "resid_in", "ffn", "attn"]
Positions = int | Tensor | None  # None: all positions; int: one position for every row; Tensor [B]: per row


def _pick(x: Tensor, positions: Positions) -> Tensor:
    if positions is None:
        return x
    if isinstance(positions, int):  # a copy: a view would keep the whole [B, T, ...] activation alive
        return x[:, positions].clone()
    return x[torch.arange(x.shape[0], device=x.device), positions.to(x.device)]


def _rowwise(t: Tensor, batch: int) -> Tensor:
    """A [K] or [B, K] per-row setting as [B, K] (broadcast) for a batch of B rows."""
    if t.dim() == 1:
        return t.unsqueeze(0)
    if t.shape[0] != batch:
        raise ValueError(f"per-row setting has {t.shape[0]} rows but the batch has {batch}")
    return t


def _hidden(out):
    return out[0] if isinstance(out, tuple) else out


class Hooks:
    """Context manager holding interventions and captures for one model; cleans up on exit, always."""

    def __init__(self, model: nn.Module | ModelView):
        self.view = model if isinstance(model, ModelView) else ModelView(model)
        self.head_masks: dict[int, tuple[Tensor, Tensor | None]] = {}
        self.neuron_scales: dict[int, Tensor] = {}
        self.patches: dict[tuple[What, int], tuple[Tensor, Tensor]] = {}
        self.captures: dict[tuple[What, int], tuple[Positions, bool]] = {}
        self.store: dict[tuple[What, int], Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._active = False

    # ---- declaring what to do -------------------------------------------------------------------
    def ablate_heads(self, layer: int, mask: Tensor, replacement: Tensor | None = None) -> "Hooks":
        """Keep (1) or ablate (0) heads of `layer`; mask [H] or [B, H], fractional values interpolate.

        Ablated heads are replaced by `replacement` [H, head_dim] (mean ablation) or zero (the paper)."""
        self.view.check_layer(layer)
        if mask.shape[-1] != self.view.n_heads:
            raise ValueError(f"head mask has {mask.shape[-1]} heads, layer {layer} has {self.view.n_heads}")
        self.head_masks[layer] = (mask, replacement)
        return self._refresh()

    def scale_neurons(self, layer: int, scale: Tensor) -> "Hooks":
        """Multiply the coefficients m_k of `layer` by scale [N] or [B, N] (0 zeroes, 1 keeps)."""
        if scale.shape[-1] != self.view.ffn_width(layer):
            raise ValueError(
                f"neuron scale has {scale.shape[-1]} entries, layer {layer} has {self.view.ffn_width(layer)}"
            )
        self.neuron_scales[layer] = scale
        return self._refresh()

    def patch(self, what: What, layer: int, donor: Tensor, where: Tensor) -> "Hooks":
        """Replace `what` ("z", "m" or "ffn") of `layer` by `donor` wherever `where` is True (activation patching,
        mean ablation). where: [B, T, H] for z, [B, T, N] for m, [B, T] for ffn; donor broadcasts against
        [B, T, H, dh] / [B, T, N] / [B, T, d]. Applied after head masks / neuron scales, before captures."""
        if what not in ("z", "m", "ffn"):
            raise ValueError(f"patch supports z, m and ffn, not {what!r}")
        self.patches[(what, self.view.check_layer(layer))] = (donor, where)
        return self._refresh()

    def capture(
        self, what: What, layers: Iterable[int] | None = None, positions: Positions = -1, keep_grad: bool = False
    ) -> "Hooks":
        """Record `what` at `positions` for `layers` (default all) into `store[what, layer]`.

        z: head outputs [B, (T), H, dh]; m: coefficients [B, (T), N]; resid_in / resid: layer input / output;
        attn: attention output projection output; ffn: F^l, the FFN's contribution (after a post-FFN norm)."""
        for layer in range(self.view.n_layers) if layers is None else layers:
            self.captures[(what, self.view.check_layer(layer))] = (positions, keep_grad)
        return self._refresh()

    def clear(self) -> None:
        self.store.clear()

    # ---- context management ---------------------------------------------------------------------
    def __enter__(self) -> "Hooks":
        self._active = True
        return self._refresh()

    def __exit__(self, *exc) -> None:
        self._remove()
        self._active = False

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _refresh(self) -> "Hooks":
        if self._active:
            self._remove()
            self._register()
        return self

    def _register(self) -> None:
        v = self.view
        per_layer: dict[int, set[What]] = defaultdict(set)
        for what, layer in self.captures:
            per_layer[layer].add(what)
        patched = {layer for _, layer in self.patches}
        for layer in set(per_layer) | set(self.head_masks) | set(self.neuron_scales) | patched:
            wants = per_layer[layer] | {w for w, l in self.patches if l == layer}
            if layer in self.head_masks or "z" in wants:
                self._pre(v.attn_out(layer), self._z_hook(layer))
            if layer in self.neuron_scales or "m" in wants:
                self._pre(v.ffn_out(layer), self._m_hook(layer))
            if "resid_in" in wants:
                self._pre(v.layer(layer), self._recorder("resid_in", layer), with_kwargs=True)
            if "resid" in wants:
                self._post(v.layer(layer), self._recorder("resid", layer))
            if "ffn" in wants:
                self._post(v.ffn_contribution_module(layer), self._ffn_hook(layer))
            if "attn" in wants:
                self._post(v.attn_out(layer), self._recorder("attn", layer))

    def _pre(self, mod: nn.Module, fn: Callable, with_kwargs: bool = False) -> None:
        self._handles.append(mod.register_forward_pre_hook(fn, with_kwargs=with_kwargs))

    def _post(self, mod: nn.Module, fn: Callable) -> None:
        self._handles.append(mod.register_forward_hook(fn))

    # ---- the hooks --------------------------------------------------------------------------------
    def _save(self, what: What, layer: int, x: Tensor) -> None:
        key = (what, layer)
        if key in self.captures:
            positions, keep_grad = self.captures[key]
            y = _pick(x, positions)
            self.store[key] = y if keep_grad else y.detach()

    def _z_hook(self, layer: int) -> Callable:
        H, dh = self.view.n_heads, self.view.head_dim

        def hook(mod, args):
            x = args[0]
            z = x.view(*x.shape[:-1], H, dh)
            if layer in self.head_masks:
                mask, repl = self.head_masks[layer]
                mk = _rowwise(mask.to(x), x.shape[0])[:, None, :, None]  # [B, 1, H, 1]
                z = z * mk if repl is None else z * mk + (1 - mk) * repl.to(x)
            if ("z", layer) in self.patches:
                donor, where = self.patches["z", layer]
                z = torch.where(where.to(x.device)[..., None], donor.to(x), z)
            self._save("z", layer, z)
            return (z.reshape(x.shape), *args[1:])

        return hook

    def _m_hook(self, layer: int) -> Callable:
        def hook(mod, args):
            m = args[0]
            if layer in self.neuron_scales:
                m = m * _rowwise(self.neuron_scales[layer].to(m), m.shape[0])[:, None, :]
            if ("m", layer) in self.patches:
                donor, where = self.patches["m", layer]
                m = torch.where(where.to(m.device), donor.to(m), m)
            self._save("m", layer, m)
            return (m, *args[1:])

        return hook

    def _ffn_hook(self, layer: int) -> Callable:
        """F^l: patched where asked (the returned output replaces the module's), then recorded."""

        def post(mod, args, out):
            y = _hidden(out)
            if ("ffn", layer) in self.patches:
                donor, where = self.patches["ffn", layer]
                y = torch.where(where.to(y.device)[..., None], donor.to(y), y)
                out = (y, *out[1:]) if isinstance(out, tuple) else y
            self._save("ffn", layer, y)
            return out

        return post

    def _recorder(self, what: What, layer: int) -> Callable:
        if what == "resid_in":

            def pre(mod, args, kwargs):
                x = args[0] if args else kwargs["hidden_states"]
                self._save(what, layer, x)

            return pre

        def post(mod, args, out):
            self._save(what, layer, _hidden(out))

        return post


# ---- prefix reuse: run the model from a layer upward on cached hidden states ---------------------------
from contextlib import contextmanager  # noqa: E402
from typing import Iterator  # noqa: E402


@contextmanager
def run_from(view: ModelView, layer: int, hidden: Tensor) -> Iterator[None]:
    """Inside the block, a model forward runs only layers[layer:], starting from `hidden` [B, T, d] (the residual
    input of `layer`, e.g. captured from a clean run) instead of the embeddings: prefix reuse for ablations at or
    above `layer`. Masks and positions still come from the model's own forward (pass the same attention_mask /
    position_ids as the run `hidden` came from); `config.layer_types` is sliced alongside (Gemma's per-layer
    attention kinds). Register Hooks BEFORE entering: layer indices shift while the tail is swapped in."""
    full, types = view.layers, getattr(view.config, "layer_types", None)
    view.check_layer(layer)
    tail = nn.ModuleList(list(full)[layer:])

    def substitute(mod, args, kwargs):
        if args:
            return (hidden.to(args[0].dtype), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden.to(kwargs["hidden_states"].dtype)}

    handle = tail[0].register_forward_pre_hook(substitute, with_kwargs=True)
    view.set_layers(tail)
    if types is not None:
        view.config.layer_types = list(types)[layer:]
    try:
        yield
    finally:
        handle.remove()
        view.set_layers(full)
        if types is not None:
            view.config.layer_types = types
