"""Representation edits behind a contrast (A vs B prompts), folded into the FFN output projection of chosen layers.

y = W_out h + b is layer l's FFN output projection (on Gemma-3 before its post-FFN norm). From the selection
pairs, y at the last prompt position of every A prompt (class 0) and every B prompt (class 1):
- leace: LEACE (Belrose et al., NeurIPS 2023, through `concept-erasure`): r(y) = y - L R (y - mu), the least-
  squares affine edit after which no linear classifier tells A from B better than a constant (both class means
  equal). Folded: W_out <- (I - L R) W_out, b <- (I - L R) b + L R mu. Where the native class holds no FFN output
  bias (Gemma-3, Qwen2, Mistral, Phi-3) the constant L R mu is dropped: the class means stay equal (the constant
  is the same for both classes), only the layer's mean output moves, by -L R mu.
- project: directional ablation of u, the top right singular vector of the paired differences y_A - y_B
  (uncentred, so a consistent mean difference dominates): W_out <- (I - u u^T) W_out, b <- (I - u u^T) b. No
  bias needed: every architecture.
- steer: a control vector, y <- y - alpha (mean y_A - mean y_B), alpha chosen on validation pairs, folded into
  b. It needs an FFN output bias (Llama's mlp_bias, GPT-2/J/NeoX); elsewhere it is refused with one line.
- random-project: `project` with a seeded random unit direction: the control at equal rank.
Every edit is one `Affine` per layer, y -> y - L (R y) + c: `hooked` applies it in the forward pass (what the
measurements see), `fold` writes it into the weights (what is exported); tests check they agree.
Layers: the `budget` layers of the candidates whose A/B class means differ most, in units of the outputs'
spread (||mu_A - mu_B|| / sqrt(mean ||y - mu||^2)), on the fit pairs. Classes are the pairs' sides after
`aligned` swaps each pair so that its difference points along the top principal direction of the differences.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from surgery.errors import UsageError
from surgery.model.arch import ModelView
from surgery.model.batching import device_of, left_pad, position_ids
from surgery.model.slicing import ensure_out_biases

METHODS = ("leace", "project", "steer", "random-project")
MIN_PAIRS = 8  # LEACE estimates a d x d covariance from 2n outputs (shrunk): below 8 pairs the fit is noise


@dataclass
class Affine:
    """y -> y - left @ (right @ y) + shift at one layer's FFN output projection (left [d, r], right [r, d])."""

    layer: int
    left: Tensor
    right: Tensor
    shift: Tensor

    def __call__(self, y: Tensor) -> Tensor:
        left, right, shift = (t.to(y.device, torch.float32) for t in (self.left, self.right, self.shift))
        return (y.float() - (y.float() @ right.T) @ left.T + shift).to(y.dtype)

    def to_json(self) -> dict:
        return {"layer": self.layer, "rank": int(self.left.shape[1]), "shift_norm": float(self.shift.norm())}


@torch.no_grad()
def ffn_outputs(
    view: ModelView, seqs: Sequence[Sequence[int]], layers: Sequence[int], pad: int, batch_size: int = 32
) -> dict[int, Tensor]:
    """{layer: [n, d]} float32 FFN output projection outputs at the last position of each sequence."""
    out: dict[int, list[Tensor]] = {l: [] for l in layers}
    dev = device_of(view.model)

    def keep(layer: int):
        return lambda mod, args, y: out[layer].append(y[:, -1].float().cpu())

    handles = [view.ffn_out(l).register_forward_hook(keep(l)) for l in layers]
    try:
        for i in range(0, len(seqs), batch_size):
            ids, mask = left_pad([list(s) for s in seqs[i : i + batch_size]], pad)
            view.model(
                input_ids=ids.to(dev),
                attention_mask=mask.to(dev),
                position_ids=position_ids(mask).to(dev),
                use_cache=False,
            )
    finally:
        for h in handles:
            h.remove()
    return {l: torch.cat(v) for l, v in out.items()}


def aligned(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Pairs swapped so that every paired difference a - b points along the top principal direction of the
    differences. Pair sets oriented by something else than the concept (the gender pairs put the STEREOTYPED
    gender in A, so A holds women and men alike) would otherwise have equal class means, and LEACE, steering and
    the layer choice would see no concept at all."""
    d = (a - b).double()
    if not bool(d.abs().max() > 0):
        return a, b
    u = torch.linalg.svd(d, full_matrices=False).Vh[0]
    flip = (d @ u) < 0
    return torch.where(flip[:, None], b, a), torch.where(flip[:, None], a, b)


def separation(a: Tensor, b: Tensor) -> float:
    """||mean a - mean b|| over the root mean squared distance of all outputs to their common mean."""
    y = torch.cat([a, b])
    spread = (y - y.mean(0)).pow(2).sum(1).mean().sqrt()
    return float((a.mean(0) - b.mean(0)).norm() / spread.clamp_min(1e-12))


def choose_layers(outputs_a: dict[int, Tensor], outputs_b: dict[int, Tensor], budget: int) -> list[int]:
    """The `budget` layers whose A/B class means differ most (in units of spread), in layer order."""
    sep = {l: separation(*aligned(outputs_a[l], outputs_b[l])) for l in outputs_a}
    return sorted(sorted(sep, key=lambda l: -sep[l])[:budget])


def fit(
    view: ModelView,
    method: str,
    outputs_a: dict[int, Tensor],
    outputs_b: dict[int, Tensor],
    layers: Sequence[int],
    alpha: float = 1.0,
    seed: int = 0,
) -> list[Affine]:
    """One Affine per layer for `method`, from the A and B outputs of the fit pairs."""
    if method not in METHODS:
        raise UsageError(f"unknown representation edit {method!r}; use one of {', '.join(METHODS)}")
    n = min(len(outputs_a[l]) for l in layers) if layers else 0
    if method == "leace" and n < MIN_PAIRS:
        raise UsageError(
            f"LEACE needs at least {MIN_PAIRS} selection pairs to fit (it estimates a covariance), got {n}; "
            "add pairs or lower --test-size"
        )
    if method == "steer" and not view.native_ffn_bias():
        raise UsageError(
            f"--edit steer folds a constant into the FFN output bias, which {view.config.model_type} has not; "
            "use --edit project or leace (no bias needed)"
        )
    g = torch.Generator().manual_seed(seed)
    out = []
    for l in layers:
        a, b = aligned(outputs_a[l].double(), outputs_b[l].double())
        d = a.shape[1]
        zero = torch.zeros(d, dtype=torch.float64)
        if method == "leace":
            out.append(_leace(l, a, b, keep_mean=view.native_ffn_bias()))
        elif method == "project":
            u = torch.linalg.svd(a - b, full_matrices=False).Vh[0]
            out.append(Affine(l, u[:, None], u[None, :], zero))
        elif method == "random-project":
            u = torch.randn(d, generator=g, dtype=torch.float64)
            u = u / u.norm()
            out.append(Affine(l, u[:, None], u[None, :], zero))
        else:
            empty = torch.zeros(d, 0, dtype=torch.float64)
            out.append(Affine(l, empty, empty.T, -alpha * (a.mean(0) - b.mean(0))))
    return [Affine(e.layer, e.left.float(), e.right.float(), e.shift.float()) for e in out]


def _leace(layer: int, a: Tensor, b: Tensor, keep_mean: bool) -> Affine:
    from concept_erasure import LeaceFitter

    x = torch.cat([a, b])
    z = torch.cat([torch.zeros(len(a)), torch.ones(len(b))]).to(x)
    eraser = LeaceFitter.fit(x, z[:, None]).eraser
    left, right = eraser.proj_left, eraser.proj_right  # r(y) = y - left @ right @ (y - mu)
    shift = left @ (right @ eraser.bias) if keep_mean else torch.zeros_like(eraser.bias)
    return Affine(layer, left, right, shift)


@contextmanager
def hooked(view: ModelView, edits: Sequence[Affine]) -> Iterator[None]:
    """Inside the block each edit is applied to its layer's FFN output projection output (no weight changes)."""
    handles = [view.ffn_out(e.layer).register_forward_hook(lambda mod, args, y, e=e: e(y)) for e in edits]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def fold(model: nn.Module, edits: Sequence[Affine]) -> None:
    """Write the edits into the weights in place: W <- W - L (R W), b <- b - L (R b) + shift. A nonzero shift
    needs an FFN output bias: every layer gets one (Llama: config mlp_bias, loads natively)."""
    view = ModelView(model)
    if any(bool(e.shift.abs().max() > 0) for e in edits if e.shift.numel()):
        if not view.native_ffn_bias():
            raise UsageError(f"{view.config.model_type} has no FFN output bias to hold the edit's constant")
        ensure_out_biases(model, view)
    for e in edits:
        mod = view.ffn_out(e.layer)
        w = mod.weight  # [d, N] (Conv1D: [N, d])
        left, right = e.left.to(w.device, torch.float64), e.right.to(w.device, torch.float64)
        wd = w.double().T if view.arch.conv1d else w.double()
        new = wd - left @ (right @ wd)
        w.copy_((new.T if view.arch.conv1d else new).to(w.dtype))
        if mod.bias is not None:
            bd = mod.bias.double()
            mod.bias.copy_((bd - left @ (right @ bd) + e.shift.to(bd)).to(mod.bias.dtype))


def describe(edits: Sequence[Affine]) -> list[dict]:
    return [e.to_json() for e in edits]
