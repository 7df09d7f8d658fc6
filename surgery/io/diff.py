"""Which FFN neurons and attention heads differ between two checkpoints, read from the weights alone.

A neuron is matched by its key rows (gate/up or fc1, with biases) and its value column; removed neurons are the
base rows with no match, scaled ones have value columns that are a multiple of the base's. Heads are read from the
attention output projection's input columns (docs/design.md section 1), q/k/v from their row blocks.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import Tensor

from surgery.errors import UsageError
from surgery.io.checkpoint import INDEX
from surgery.model.arch import Arch, qkv_slices


class Weights:
    """Read-only tensors of a checkpoint folder by name (safetensors, lazily, one tensor at a time)."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.folder = folder
        index = folder / INDEX
        if index.exists():
            wm = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(folder.glob("*.safetensors"))
            if not files:
                raise UsageError(f"{folder} has no .safetensors files; diff needs safetensors checkpoints")
            wm = {}
            for f in files:
                with safe_open(str(f), "pt") as h:
                    wm.update({k: f.name for k in h.keys()})
        self.where = wm
        self._open = {name: safe_open(str(folder / name), "pt") for name in set(wm.values())}

    def names(self) -> set[str]:
        return set(self.where)

    def get(self, name: str) -> Tensor | None:
        f = self.where.get(name)
        return None if f is None else self._open[f].get_tensor(name).float()

    def dtype(self) -> torch.dtype:
        h = self._open[next(iter(self._open))]
        return h.get_tensor(next(iter(h.keys()))).dtype

    def slack(self, name: str) -> Tensor | None:
        """Per-entry storage rounding beyond `tolerance(dtype())`: none for safetensors (see GgufWeights.slack)."""
        return None


class GgufWeights:
    """Read-only tensors of a GGUF file (as `surgery export` writes them) under the Hugging Face names of the model
    `config` describes (the checkpoint on the other side), dequantised to float32 in HF layout with llama.cpp's
    conversions undone (gguf_file.GgufTensors); `names`: the other side's tensor names, looked for first."""

    def __init__(self, path: Path, config, names=()):
        from surgery.io.gguf_file import GgufTensors

        self.folder = path
        self.tensors = GgufTensors(path, config, names)

    def names(self) -> set[str]:
        return self.tensors.names()

    def get(self, name: str) -> Tensor | None:
        return self.tensors.get(name)

    def dtype(self) -> torch.dtype | str:
        """The matrices' storage type: a torch dtype for f32 / f16 / bf16 files, else the GGUF type name
        ("q8_0", "q4_0", ...), which `tolerance` reads as block quantisation."""
        t = self.tensors.gguf_type
        return {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}.get(t, t)

    def slack(self, name: str) -> Tensor | None:
        """Per entry, how far a block-quantised (q8_0 / q4_0) tensor may be from the weights it was written from
        (half a step of its block's scale, GgufTensors.bound); None for f32 / f16 / bf16 tensors."""
        return self.tensors.bound(name)


# Block-quantised GGUF matrices (GgufWeights.dtype): an entry is off by up to half a quantisation step of its block
# of 32 (blocks run along a matrix's rows), about amax/254 for q8_0 and, where q4_0 clips, amax/8 of the block;
# diff's checks allow 10 x tolerance of a key row's, a head's or a tensor's largest entry, which bounds that. A
# neuron's value column crosses blocks set by other neurons, so its check adds each entry's own bound (slack).
# Changes under these bounds (a scale within 1 +- 10 x tolerance) go unseen in such a file.
QUANT_TOLERANCE = {"q8_0": 1.5e-3, "q4_0": 2e-2}


def tolerance(dtype: torch.dtype | str) -> float:
    if isinstance(dtype, str):
        return QUANT_TOLERANCE.get(dtype, 2e-2)
    return {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}.get(dtype, 1e-6)


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def is_gguf(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".gguf"


def open_weights(folder: Path, config=None, names=()) -> Weights | GgufWeights:
    """The folder's tensors, or a GGUF file's (`GgufWeights`: `config` and `names` of the checkpoint on the other
    side), or one UsageError line when a tensor file or the index is corrupt or truncated."""
    try:
        if is_gguf(folder):
            if not Path(folder).is_file():
                raise UsageError(f"{folder}: no such GGUF file")
            return GgufWeights(Path(folder), config, names)
        return Weights(folder)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
        if isinstance(e, UsageError):
            raise
        raise UsageError(
            f"cannot read the weights in {folder} ({first_line(e)}); a tensor file or the index is "
            "corrupt or truncated (`surgery inspect` names it)"
        ) from None


def compare(
    base: Weights | GgufWeights, other: Weights | GgufWeights, cfg, arch: Arch, base_dir: Path, other_dir: Path
) -> dict:
    """Per layer: FFN neurons removed / zeroed / scaled / modified and heads zeroed / scaled / modified; other
    tensors that changed; a summary; the changed components (as `surgery finetune --components` reads them)."""
    tol = max(tolerance(base.dtype()), tolerance(other.dtype()))
    n_heads = int(cfg.num_attention_heads)
    n_layers = int(cfg.num_hidden_layers)
    layers = [_diff_layer(arch, base, other, l, n_heads, tol) for l in range(n_layers)]
    covered = {k for l in range(n_layers) for k in _ffn_names(arch, l)}
    covered |= {f"{arch.layers}.{l}.{arch.attn_out}.weight" for l in range(n_layers)}
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_heads)
    for l, rec in enumerate(layers):
        rec.update(_diff_qkv(arch, base, other, l, n_heads, n_kv, tol, covered))
        rec.update(_diff_ffn_out_bias(arch, base, other, l, tol, covered))
    others = _diff_others(base, other, covered, tol)
    data = {
        "base": str(base_dir),
        "other": str(other_dir),
        "arch": cfg.model_type,
        "tolerance": tol,
        "layers": layers,
        "other_tensors": others,
        "summary": diff_summary(layers, others),
        "changed_components": changed_components(layers),
    }
    return data


def _ffn_names(a: Arch, l: int) -> list[str]:
    pre = f"{a.layers}.{l}."
    return [pre + p + s for p in a.ffn_in for s in (".weight", ".bias")] + [pre + a.ffn_out + ".weight"]


def _ffn_mats(a: Arch, W: Weights, l: int) -> tuple[Tensor, Tensor] | None:
    """(keys [N, k*d + k], values [N, d]) of layer l, in one row per neuron; a missing key bias is a zero one (a
    config that switches biases on, e.g. Llama's mlp_bias for a folded edit, adds zeros and changes nothing)."""
    pre = f"{a.layers}.{l}."
    vw = W.get(pre + a.ffn_out + ".weight")
    if vw is None:
        return None
    values = vw if a.conv1d else vw.T
    parts = []
    for p in a.ffn_in:
        w, b = W.get(pre + p + ".weight"), W.get(pre + p + ".bias")
        w = w.T if a.conv1d else w
        chunks = 2 if a.ffn_kind == "fused" else 1
        b = b if b is not None else torch.zeros(w.shape[0], dtype=w.dtype)
        parts += list(w.chunk(chunks, 0)) + [c.unsqueeze(1) for c in b.chunk(chunks, 0)]
    return torch.cat(parts, 1), values


def _match_rows(ko: Tensor, kb: Tensor, tol: float) -> Tensor:
    """For each row of ko, the index of the (near-)identical row of kb, or -1: how sliced widths are recovered."""
    idx = torch.full((ko.shape[0],), -1, dtype=torch.long)
    bn = kb.pow(2).sum(1)
    for s in range(0, ko.shape[0], 1024):
        a = ko[s : s + 1024]
        d2 = a.pow(2).sum(1, keepdim=True) + bn - 2 * a @ kb.T
        best = d2.argmin(1)
        err = (a - kb[best]).abs().amax(1)
        ok = err <= 10 * tol * kb[best].abs().amax(1).clamp_min(1e-12)
        idx[s : s + 1024] = torch.where(ok, best, torch.full_like(best, -1))
    return idx


def _diff_layer(a: Arch, base: Weights, other: Weights, l: int, n_heads: int, tol: float) -> dict:
    rec: dict = {"layer": l}
    mb, mo = _ffn_mats(a, base, l), _ffn_mats(a, other, l)
    if mb is not None and mo is not None:
        rec.update(_diff_neurons(mb, mo, tol, (_value_slack(a, base, l), _value_slack(a, other, l))))
    rec.update(_diff_heads(a, base, other, l, n_heads, tol))
    return rec


def _value_slack(a: Arch, W: Weights | GgufWeights, l: int) -> Tensor | None:
    """[N, d] per-entry storage rounding of layer l's value vectors (block-quantised GGUF), or None."""
    s = W.slack(f"{a.layers}.{l}.{a.ffn_out}.weight")
    return None if s is None else (s if a.conv1d else s.T)


def _diff_neurons(
    mb: tuple[Tensor, Tensor],
    mo: tuple[Tensor, Tensor],
    tol: float,
    slack: tuple[Tensor | None, Tensor | None] = (None, None),
) -> dict:
    (kb, vb), (ko, vo) = mb, mo
    n, m = kb.shape[0], ko.shape[0]
    idx = torch.arange(n) if m == n else _match_rows(ko, kb, tol)
    pad = torch.zeros(m, dtype=torch.bool)
    if m != n:  # width rounding's padding neurons: all-zero keys and values, no base neuron (slicing.padded_width)
        pad = (ko.abs().amax(1) == 0) & (vo.abs().amax(1) == 0)
        idx[pad] = -1
    matched = idx >= 0
    j, i = matched.nonzero().flatten(), idx[matched]
    rec = {
        "base_width": n,
        "width": m,
        "removed": sorted(set(range(n)) - set(i.tolist())) if m != n else [],
        "padding": int(pad.sum()),
        "unmatched": int((~matched & ~pad).sum()),
    }
    vbi, voj, kbi, koj = vb[i], vo[j], kb[i], ko[j]
    scale_v = vbi.abs().amax(1).clamp_min(1e-12)
    zero = (voj.abs().amax(1) == 0) & (vbi.abs().amax(1) > 0)
    c = (voj * vbi).sum(1) / vbi.pow(2).sum(1).clamp_min(1e-30)
    lim = 10 * tol * scale_v * c.abs().clamp_min(1)
    sb, so = slack
    if sb is None and so is None:
        prop = (voj - c.unsqueeze(1) * vbi).abs().amax(1) <= lim
        same = torch.zeros_like(prop)
    else:  # a block-quantised side: each entry may also be off by its block's rounding
        s = (0 if sb is None else sb[i]) + (0 if so is None else so[j])
        prop = ((voj - c.unsqueeze(1) * vbi).abs() <= lim.unsqueeze(1) + s).all(1)
        same = ((voj - vbi).abs() <= (10 * tol * scale_v).unsqueeze(1) + s).all(1)  # unchanged up to rounding
        zero &= ~same  # values within their block's rounding of 0 (a q4_0 block set by larger neighbours)
    scaled = prop & ~zero & ~same & ((c - 1).abs() > 10 * tol)
    key_zero = (koj.abs().amax(1) == 0) & (kbi.abs().amax(1) > 0)
    key_changed = (koj - kbi).abs().amax(1) > 10 * tol * kbi.abs().amax(1).clamp_min(1e-12)
    value_changed = ~prop & ~zero & ~same
    rec["zeroed"] = sorted(set(i[zero | key_zero].tolist()))
    rec["scaled"] = [{"neuron": int(i[t]), "factor": round(float(c[t]), 6)} for t in scaled.nonzero().flatten()]
    rec["amplified"] = [s["neuron"] for s in rec["scaled"] if abs(s["factor"]) > 1]
    rec["modified"] = sorted(set(i[(key_changed & ~key_zero & ~zero) | value_changed].tolist()))
    return rec


def _diff_heads(a: Arch, base: Weights, other: Weights, l: int, n_heads: int, tol: float) -> dict:
    name = f"{a.layers}.{l}.{a.attn_out}.weight"
    wb, wo = base.get(name), other.get(name)
    if wb is None or wo is None:
        return {}
    if wb.shape != wo.shape:
        return {"attn_out_shape": [list(wb.shape), list(wo.shape)]}
    if a.conv1d:
        wb, wo = wb.T, wo.T  # now [out, in] for every arch: head h owns input columns
    dh = wb.shape[1] // n_heads
    zeroed, scaled, modified = [], [], []
    for h in range(n_heads):
        b, o = wb[:, h * dh : (h + 1) * dh].flatten(), wo[:, h * dh : (h + 1) * dh].flatten()
        lim = 10 * tol * b.abs().max().clamp_min(1e-12)
        if (o - b).abs().max() <= lim:
            continue
        c = float(o @ b / (b @ b).clamp_min(1e-30))
        if o.abs().max() == 0:
            zeroed.append(h)
        elif (o - c * b).abs().max() <= lim * max(1.0, abs(c)):
            scaled.append({"head": h, "factor": round(c, 6)})
        else:
            modified.append(h)
    return {"heads_zeroed": zeroed, "heads_scaled": scaled, "heads_modified": modified}


def _diff_qkv(
    a: Arch, base: Weights, other: Weights, l: int, n_heads: int, n_kv: int, tol: float, covered: set[str]
) -> dict:
    """Query heads whose query rows changed and key/value heads whose key/value rows changed (precise fine-tuning
    edits exactly these), read through the arch table's q/k/v layout; the tensors stay listed under
    other_tensors as well (`covered` is not extended)."""
    pre = f"{a.layers}.{l}."
    names = [pre + p + s for p in a.attn_qkv for s in (".weight", ".bias")]
    pairs = {n: (base.get(n), other.get(n)) for n in names}
    pairs = {n: (b, o) for n, (b, o) in pairs.items() if b is not None and o is not None and b.shape == o.shape}
    if not pairs:
        return {}
    wname = next(n for n in names if n.endswith(".weight"))
    if wname not in pairs:
        return {}
    ow = base.get(pre + a.attn_out + ".weight")
    dh = (ow.shape[0] if a.conv1d else ow.shape[1]) // n_heads
    changed = {n: _changed_entries(b, o, tol) for n, (b, o) in pairs.items()}
    explained = {n: torch.zeros_like(c) for n, c in changed.items()}
    q_heads, kv_heads = set(), set()
    group = n_heads // n_kv
    for h in range(n_heads):
        for path, axis, idx in qkv_slices(a, n_heads, n_kv, dh, h):
            for suffix in (".weight", ".bias"):
                n = pre + path + suffix
                if n not in changed:
                    continue
                ax = axis if suffix == ".weight" else 0
                sub = changed[n].index_select(ax, idx)
                explained[n].index_fill_(ax, idx, True)
                if not sub.any():
                    continue
                q_part, kv_part = _qkv_parts(a, path, sub, ax, dh)
                if q_part:
                    q_heads.add(h)
                if kv_part:
                    kv_heads.add(h // group)
    outside = any(bool((changed[n] & ~explained[n]).any()) for n in changed)
    return {"heads_q_modified": sorted(q_heads), "kv_heads_modified": sorted(kv_heads), "qkv_outside_heads": outside}


def _diff_ffn_out_bias(a: Arch, base: Weights, other: Weights, l: int, tol: float, covered: set[str]) -> dict:
    """The FFN output bias belongs to no neuron but to the MLP: a change marks the MLP as changed (the tensor
    stays listed under other_tensors too)."""
    name = f"{a.layers}.{l}.{a.ffn_out}.bias"
    b, o = base.get(name), other.get(name)
    if b is None and o is None:
        return {}
    b = b if b is not None else torch.zeros_like(o)  # a missing bias is a zero one
    o = o if o is not None else torch.zeros_like(b)
    if b.shape != o.shape:
        return {}
    return {"ffn_out_bias_changed": bool(_changed_entries(b, o, tol).any())}


def _changed_entries(b: Tensor, o: Tensor, tol: float) -> Tensor:
    return (o - b).abs() > 10 * tol * b.abs().max().clamp_min(1e-12)


def _qkv_parts(a: Arch, path: str, sub: Tensor, axis: int, dh: int) -> tuple[bool, bool]:
    """Whether the changed entries of one head's q/k/v slice touch its query part and its key/value part
    (slices are [q] or [k] or [v] for separate projections, [q | k | v] of dh each for fused ones)."""
    if a.qkv_layout == "separate":
        return (True, False) if path == a.attn_qkv[0] else (False, True)
    parts = sub.split(dh, dim=axis)
    return bool(parts[0].any()), any(bool(p.any()) for p in parts[1:])


def changed_components(layers: list[dict]) -> dict:
    """The components a change touches: heads (o_proj input columns or query rows changed), key/value heads,
    and MLPs (any FFN neuron's keys or values changed)."""
    heads, kv, mlps = set(), set(), set()
    for r in layers:
        l = r["layer"]
        hs = r.get("heads_zeroed", []) + [s["head"] for s in r.get("heads_scaled", [])] + r.get("heads_modified", [])
        heads |= {(l, h) for h in hs + r.get("heads_q_modified", [])}
        kv |= {(l, h) for h in r.get("kv_heads_modified", [])}
        if r.get("zeroed") or r.get("scaled") or r.get("modified") or r.get("removed") or r.get("ffn_out_bias_changed"):
            mlps.add(l)
    return {
        "heads": [f"{l}.{h}" for l, h in sorted(heads)],
        "kv_heads": [f"{l}.{h}" for l, h in sorted(kv)],
        "mlps": sorted(mlps),
    }


def _renamed(base: Weights, other: Weights, covered: set[str]) -> dict[str, str]:
    """{base name: other name} for tensors saved under another name with identical values (e.g. NeoX
    `embed_out` vs `lm_head`: checkpoint vs in-memory naming)."""
    only_b, only_o = sorted(base.names() - other.names() - covered), sorted(other.names() - base.names() - covered)
    pairs = {}
    for nb in only_b:
        b = base.get(nb)
        for no in only_o:
            o = other.get(no)
            if no not in pairs.values() and o.shape == b.shape and torch.equal(o, b):
                pairs[nb] = no
                break
    return pairs


def _diff_others(base: Weights, other: Weights, covered: set[str], tol: float) -> list[dict]:
    out = []
    renamed = _renamed(base, other, covered)
    for name in sorted(base.names() | other.names()):
        if name in covered or name in renamed or name in renamed.values():
            continue
        b, o = base.get(name), other.get(name)
        if b is None or o is None:
            out.append({"tensor": name, "change": "added" if b is None else "removed"})
        elif b.shape != o.shape:
            out.append({"tensor": name, "change": "shape", "shapes": [list(b.shape), list(o.shape)]})
        else:
            d = float((o - b).abs().max()) if b.numel() else 0.0
            if d > 10 * tol * max(float(b.abs().max()) if b.numel() else 0.0, 1e-12):
                out.append({"tensor": name, "change": "values", "max_abs_diff": d})
    return out


def diff_summary(layers: list[dict], others: list[dict]) -> dict:
    def total(key):
        return sum(len(r.get(key, [])) for r in layers)

    return {
        "widths": [r.get("width") for r in layers],
        "removed": total("removed"),
        "zeroed": total("zeroed"),
        "scaled": total("scaled"),
        "amplified": total("amplified"),
        "modified": total("modified"),
        "heads_zeroed": total("heads_zeroed"),
        "heads_scaled": total("heads_scaled"),
        "heads_modified": total("heads_modified"),
        "other_tensors_changed": len(others),
    }
