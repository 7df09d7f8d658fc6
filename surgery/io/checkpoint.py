"""Checkpoints that others can load: layouts, provenance manifest, hash verification, weight diff.

Layouts (docs/design.md section 2):
- sliced: per-layer FFN widths. config.json keeps the base `model_type`, records `ffn_widths` and transformers'
  `per_layer_config`, and maps AutoModelForCausalLM (`auto_map`) to a generated `modeling_surgery.py` that
  subclasses the base class and rebuilds each layer's FFN at its width (template in trust.py). Needs
  `trust_remote_code=True`; surgery's own loaders pass it only when that file is byte-identical to the template.
- padded: base shapes, removed neurons all-zero: native everywhere, no speed-up.
- zeroed: base shapes with in-place edits (debias): native.
Every folder is built in a temp dir beside the target and renamed into place (`report.atomic_dir`): a killed
export never leaves a partial checkpoint under the target name. Tensors are written one by one into
safetensors shards (offloaded `device_map="auto"` weights are fetched per tensor), never as a second full copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from surgery import __version__
from surgery.errors import UsageError
from surgery.io import trust
from surgery.io.deploy import Export, write_exports
from surgery.io.loading import DTYPES, resolve, sha256_file
from surgery.io.report import Report, atomic_dir, now
from surgery.model.arch import ModelView
from surgery.model.slicing import base_width, kept_indices, padding

LAYOUTS = ("sliced", "padded", "zeroed")
MANIFEST = "surgery.json"
MODELING = trust.MODELING
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_OURS = (
    "ffn_widths",
    "ffn_padding",
    "per_layer_config",
    "surgery_ffn",
    "auto_map",
    "allow_global_per_layer_attribute_access",
)


# ==== save ==================================================================================================
def save(
    model: nn.Module,
    tokenizer,
    out: str | Path,
    *,
    layout: str,
    provenance: dict | None = None,
    force: bool = False,
    dtype: str | torch.dtype | None = None,
    adapter_model=None,
    merge: bool = False,
    max_shard_size: str | int = "2GB",
    base: str | Path | None = None,
    extra_files: dict[str, str | bytes] | None = None,
    exports: Sequence[Export] = (),
) -> Report:
    """Write a self-describing checkpoint folder `out` in `layout` (sliced | padded | zeroed), atomically.

    `provenance` (recipe, seed, lora, base, layers: {l: {"kept"|"edited": [...]}}) goes into surgery.json with
    the tool version, layout, widths, dtype, created time and the sha256 of every file. `adapter_model` (a PEFT
    model) is saved under adapter/ and, with merge=True, merged into the exported weights. `exports` (deploy
    formats, e.g. GGUF) are written from the same weights into the folder and listed in surgery.json."""
    if layout not in LAYOUTS:
        raise UsageError(f"unknown --layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    target_dtype, out = _dtype(dtype), Path(out)
    shard_bytes = _parse_size(max_shard_size)
    prov = dict(provenance or {})
    kept = _kept_from(prov, model)
    _check_layout(model, layout, kept)
    if adapter_model is None or not merge:
        check_padding_zero(model)
    with atomic_dir(out, force) as tmp:
        if adapter_model is not None:
            adapter_model.save_pretrained(str(tmp / "adapter"))
            prov.setdefault("lora", _lora_settings(adapter_model))
            model = adapter_model.merge_and_unload() if merge else model
        check_padding_zero(model)
        files = write_tensors(model, tmp, layout, kept, target_dtype, shard_bytes)
        _write_config(model, tmp, layout, target_dtype)
        if layout == "sliced" and needs_modeling(model):
            (tmp / MODELING).write_text(modeling_source(model))
        _write_side_files(model, tokenizer, tmp, extra_files or {})
        manifest = _manifest(model, tmp, layout, prov, kept, target_dtype, files, base, adapter_model, merge)
        if exports:  # their own metadata carries the manifest as it stands without them; then they are listed
            manifest["exports"] = write_exports(model, tokenizer, tmp, list(exports), manifest)
            manifest["files"].update(file_hashes(tmp, skip=set(manifest["files"])))
        manifest = write_manifest(tmp, manifest)
    return Report(data=manifest, markdown=_save_markdown(out, manifest), files=[out])


def load(
    path: str | Path, dtype: str | torch.dtype | None = None, trust_remote_code: bool = False, **kwargs
) -> nn.Module:
    """Plain `from_pretrained`; the folder's own code runs only when it is provably this version's sliced-layout
    modeling file or the caller passes trust_remote_code=True (`trust.remote_code`)."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    kw = dict(trust_remote_code=trust.remote_code(path, trust_remote_code), **kwargs)
    manifest = trust.read_json(path / MANIFEST) if (path / MANIFEST).exists() else None
    manifest = manifest if isinstance(manifest, dict) else {}
    if dtype is not None:
        kw["dtype"] = _dtype(dtype)
    model = AutoModelForCausalLM.from_pretrained(str(path), **kw).eval()
    if manifest.get("layout") == "sliced":  # so a re-export (e.g. --layout padded) knows where neurons were
        model.surgery_kept = _kept_from(manifest, model)
    return model


def _check_layout(model: nn.Module, layout: str, kept: dict[int, list[int]]) -> None:
    view = ModelView(model)
    sliced = [i for i, w in enumerate(view.ffn_widths()) if w != base_width(model)]
    if layout == "zeroed" and sliced:
        raise UsageError(f"layers {sliced} are sliced; --layout zeroed keeps base shapes: use sliced or padded")
    if layout != "sliced" and getattr(model.config, "surgery_ffn_out_bias", False):
        raise UsageError(
            f"the FFN output biases added by bias compensation do not exist in the native "
            f"{model.config.model_type} class; export with --layout sliced"
        )
    missing = [i for i in sliced if i not in kept]
    if layout == "padded" and missing:
        raise UsageError(
            f"--layout padded needs the kept neuron indices of sliced layers {missing}; pass "
            "provenance={'layers': {l: {'kept': [...]}}} or slice with surgery.slicing.slice_ffn"
        )


def _kept_from(prov: dict, model: nn.Module) -> dict[int, list[int]]:
    """Kept indices per sliced layer (base numbering): the provenance's, else what slice_ffn recorded."""
    layers = prov.get("layers") or {}
    kept = {int(k): list(map(int, v["kept"])) for k, v in layers.items() if isinstance(v, dict) and "kept" in v}
    return kept or kept_indices(model)


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UsageError(f"unknown --dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _parse_size(size: str | int) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(size), re.I)
    if not m:
        raise UsageError(f"bad shard size {size!r}; use e.g. 500MB or 2GB")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * mult)


# ---- tensors -------------------------------------------------------------------------------------------------
def named_tensors(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """The state dict one tensor at a time, tied duplicates once, offloaded (meta) weights fetched from disk."""
    seen: set[int] = set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        if t.device.type == "meta":
            from transformers.integrations.accelerate import load_offloaded_parameter

            t = load_offloaded_parameter(model, name)
        yield name, t.detach()


def _padding_plan(model: nn.Module, kept: dict[int, list[int]]) -> dict[str, tuple[Tensor, Tensor, int, int]]:
    """{tensor name: (source positions, base idx, axis, base size)} for every FFN tensor of a sliced layer (padded
    layout); the source positions skip the zero padding neurons at the end of a width-rounded layer."""
    view, n = ModelView(model), base_width(model)
    a, plan = view.arch, {}
    for layer, idx in kept.items():
        w = view.ffn_width(layer)
        if w == n:
            continue
        k, src = torch.tensor(idx, dtype=torch.long), torch.arange(len(idx))
        rows, src_rows = (torch.cat([k, k + n]), torch.cat([src, src + w])) if a.ffn_kind == "fused" else (k, src)
        size = 2 * n if a.ffn_kind == "fused" else n
        for p in a.ffn_in:
            plan[f"{a.layers}.{layer}.{p}.weight"] = (src_rows, rows, 1 if a.conv1d else 0, size)
            plan[f"{a.layers}.{layer}.{p}.bias"] = (src_rows, rows, 0, size)
        plan[f"{a.layers}.{layer}.{a.ffn_out}.weight"] = (src, k, 0 if a.conv1d else 1, n)
    return plan


def _pad(t: Tensor, src: Tensor, idx: Tensor, axis: int, size: int) -> Tensor:
    shape = list(t.shape)
    shape[axis] = size
    return torch.zeros(shape, dtype=t.dtype).index_copy_(axis, idx, t.index_select(axis, src))


def check_padding_zero(model: nn.Module) -> None:
    """Every padding neuron of a width-rounded layer (slicing.padding) must be exactly zero (key rows, key biases,
    value columns): otherwise it is no longer padding (e.g. full fine-tuning trained it) and the manifest would
    lie. Raised before anything is written."""
    view = ModelView(model)
    for layer, pad in padding(model).items():
        if pad <= 0:
            continue
        w = view.ffn_width(layer)
        tail = slice(w - pad, w)
        parts = [k[tail] for k in view.keys(layer)] + [view.values(layer)[tail]]
        parts += [
            getattr(m, "bias").view(-1, w)[:, tail] for m in view.ffn_in(layer) if getattr(m, "bias", None) is not None
        ]
        if any(bool(p.detach().ne(0).any()) for p in parts):
            raise UsageError(
                f"layer {layer}: the {pad} padding neurons (positions {w - pad}..{w - 1}) are not zero "
                "(trained after slicing?); re-slice the model or train with surgery.lora, which "
                "freezes them"
            )


def write_tensors(
    model: nn.Module, folder: Path, layout: str, kept: dict[int, list[int]], dtype: torch.dtype | None, shard_bytes: int
) -> list[str]:
    """Stream tensors into safetensors shards of at most `shard_bytes` (one tensor may exceed it); returns names."""
    plan = _padding_plan(model, kept) if layout == "padded" else {}
    shards: list[dict[str, Tensor]] = []
    current: dict[str, Tensor] = {}
    size = 0
    for name, t in named_tensors(model):
        t = t.to("cpu", dtype=dtype if (dtype and t.is_floating_point()) else t.dtype).contiguous()
        if name in plan:
            t = _pad(t, *plan[name])
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > shard_bytes:
            shards.append(_flush(model, folder, len(shards), current, layout != "sliced"))
            current, size = {}, 0
        current[name], size = t, size + nbytes
    shards.append(_flush(model, folder, len(shards), current, layout != "sliced"))
    return _name_shards(folder, shards)


def _flush(model: nn.Module, folder: Path, i: int, tensors: dict[str, Tensor], native: bool) -> dict[str, None]:
    """Write one shard now (so at most one shard is in memory); returns the names written. Native layouts use the
    checkpoint's original tensor names, as save_pretrained does (e.g. NeoX `embed_out`); the sliced layout keeps
    the in-memory names, because transformers applies no renaming to remote-code classes."""
    from safetensors.torch import save_file

    if native:
        try:
            from transformers.core_model_loading import revert_weight_conversion

            tensors = revert_weight_conversion(model, tensors)
        except ImportError:  # older transformers: in-memory names are the checkpoint names
            pass
    save_file(tensors, str(folder / f".shard-{i:05d}.safetensors"), metadata={"format": "pt"})
    return dict.fromkeys(tensors)


def _name_shards(folder: Path, shards: list[dict]) -> list[str]:
    if len(shards) == 1:
        os.replace(folder / ".shard-00000.safetensors", folder / SINGLE)
        return [SINGLE]
    names, weight_map, total = [], {}, 0
    for i, keys in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(folder / f".shard-{i:05d}.safetensors", folder / name)
        names.append(name)
        weight_map.update({k: name for k in keys})
        total += (folder / name).stat().st_size
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return names


# ---- config, modeling file, side files -------------------------------------------------------------------------
def _write_config(model: nn.Module, folder: Path, layout: str, dtype: torch.dtype | None) -> None:
    d = json.loads(model.config.to_json_string(use_diff=False))
    for key in _OURS:
        d.pop(key, None)
    base_cls = _base_class(model)
    d["architectures"] = [base_cls.__name__]
    widths = ModelView(model).ffn_widths() if layout == "sliced" else None
    if widths is not None and needs_modeling(model):
        d.update(_sliced_config(model, widths))
    elif widths is not None:  # one width in every layer: the stock config at that width, no code
        d[ModelView(model).arch.width_attr] = widths[0]
    if dtype is not None:
        d["dtype"] = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")


def needs_modeling(model: nn.Module) -> bool:
    """Whether a sliced checkpoint of `model` needs the generated modeling file: its layers have different FFN
    widths, or bias compensation gave the FFNs output biases the native class lacks. A model cut to ONE width in
    every layer (`prune --uniform`) is a stock config with a smaller intermediate size: plain `from_pretrained`."""
    return len(set(ModelView(model).ffn_widths())) > 1 or bool(getattr(model.config, "surgery_ffn_out_bias", False))


def _sliced_config(model: nn.Module, widths: list[int]) -> dict:
    view, n = ModelView(model), base_width(model)
    a = view.arch
    overrides = {str(i): {a.width_attr: w} for i, w in enumerate(widths) if w != n}
    cls = _base_class(model).__name__  # same name as the base class: pipelines accept it for text-generation
    return {
        "architectures": [cls],
        "auto_map": {"AutoModelForCausalLM": f"{MODELING[:-3]}.{cls}"},
        "ffn_widths": widths,
        "ffn_padding": _padding_list(model),
        a.width_attr: n,
        "per_layer_config": overrides,
        "surgery_ffn": {
            "layers": a.layers,
            "ffn": a.ffn,
            "ffn_in": list(a.ffn_in),
            "ffn_out": a.ffn_out,
            "ffn_kind": a.ffn_kind,
            "conv1d": a.conv1d,
            "out_bias": bool(getattr(model.config, "surgery_ffn_out_bias", False)),
        },
    }


def _padding_list(model: nn.Module) -> list[int]:
    """Zero padding neurons at the end of each layer (width rounding), 0 where none."""
    pad = padding(model)
    return [max(pad.get(i, 0), 0) for i in range(ModelView(model).n_layers)]


def _base_class(model: nn.Module) -> type:
    """The transformers class the model is an instance of (our generated subclass resolves to its parent)."""
    import transformers

    for cls in type(model).__mro__:
        if getattr(transformers, cls.__name__, None) is cls:
            return cls
    raise UsageError(f"{type(model).__name__} is not a transformers model class; export a transformers model")


def modeling_source(model: nn.Module) -> str:
    """The generated modeling file of the sliced layout (imports only torch and transformers)."""
    return trust.modeling_text(_base_class(model).__name__)


def _write_side_files(model: nn.Module, tokenizer, folder: Path, extra: dict[str, str | bytes]) -> None:
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(str(folder))
    for name, content in extra.items():
        path = folder / name
        if path.resolve().parent != folder.resolve() and folder.resolve() not in path.resolve().parents:
            raise UsageError(f"extra file {name!r} escapes the checkpoint folder; use a relative name")
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)


# ---- provenance ---------------------------------------------------------------------------------------------
def _manifest(
    model,
    folder: Path,
    layout: str,
    prov: dict,
    kept: dict,
    dtype,
    tensor_files: list[str],
    base,
    adapter_model,
    merge: bool,
) -> dict:
    view = ModelView(model)
    m = dict(prov)
    m.setdefault("layers", {str(k): {"kept": v} for k, v in sorted(kept.items())})
    m["base"] = base_record(base if base is not None else m.get("base"), model)
    if layout == "sliced" and (folder / MODELING).is_file():
        m["modeling_sha256"] = sha256_file(folder / MODELING)
    m.update(
        {
            "format": "surgery-checkpoint/1",
            "tool": {"name": "surgery", "version": __version__},
            "created": now(),
            "layout": layout,
            "arch": model.config.model_type,
            "dtype": str(dtype or next(model.parameters()).dtype).removeprefix("torch."),
            "ffn": {
                "base_width": base_width(model),
                "widths": view.ffn_widths() if layout == "sliced" else [base_width(model)] * view.n_layers,
                "padding": _padding_list(model) if layout == "sliced" else [0] * view.n_layers,
            },
            "adapter": {"path": "adapter", "merged": merge} if adapter_model is not None else None,
            "tensor_files": tensor_files,
            "files": file_hashes(folder),
        }
    )
    return m


def base_record(base, model: nn.Module) -> dict:
    """{id, path, sha256} of the base model, whatever form the caller gives it in (a folder, registry name or hub
    id, or a dict with id/path/source); falls back to the model's own `name_or_path`. sha256 is None only when the
    base is not on this machine (a hub id)."""
    extra = dict(base) if isinstance(base, dict) else {}
    src = (extra.get("path") or extra.get("source") or extra.get("id")) if isinstance(base, dict) else base
    src = src or getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None)
    if not src:
        return {**extra, "id": None, "path": None, "sha256": None}
    try:
        return {**extra, **base_identity(src)}
    except UsageError:  # not resolvable here (e.g. a temp folder since deleted): keep the name, no hash
        return {**extra, "id": str(src), "path": None, "sha256": None}


def manifest_digest(manifest: dict) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of the manifest without its `manifest_sha256`."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return hashlib.sha256(canon.encode()).hexdigest()


def write_manifest(folder: Path, manifest: dict) -> dict:
    """THE writer of surgery.json (every command's checkpoint goes through `save`, which calls this): the
    manifest with its own integrity hash, in canonical round-trippable JSON. Returns what was written."""
    m = json.loads(json.dumps(manifest, default=str))  # exactly what a reader will parse back
    m["manifest_sha256"] = manifest_digest(m)
    (folder / MANIFEST).write_text(json.dumps(m, indent=2) + "\n")
    return m


def file_hashes(folder: Path, skip: set[str] = frozenset()) -> dict[str, dict]:
    """{relative path: {sha256, bytes}} of every file in the folder except the manifest itself (and `skip`:
    relative paths already hashed)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and p.name != MANIFEST and rel not in skip:
            out[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return out


def base_identity(base: str | Path) -> dict:
    """{id, path, sha256}: the base model's name and one hash over its tensor files (sorted by name)."""
    name, where = resolve(str(base))
    h = hashlib.sha256()
    if isinstance(where, Path):
        for p in sorted(Path(where).glob("*.safetensors")):
            h.update(p.name.encode() + sha256_file(p).encode())
    return {"id": name, "path": str(where), "sha256": h.hexdigest() if isinstance(where, Path) else None}


def _lora_settings(adapter_model) -> dict:
    cfgs = getattr(adapter_model, "peft_config", {}) or {}
    return {name: json.loads(json.dumps(c.to_dict(), default=str)) for name, c in cfgs.items()}


def _save_markdown(out: Path, m: dict) -> str:
    w = m["ffn"]["widths"]
    return (
        f"# Checkpoint {out}\n\nlayout **{m['layout']}**, arch {m['arch']}, dtype {m['dtype']}, "
        f"FFN widths {min(w)}..{max(w)} (base {m['ffn']['base_width']}), files {len(m['files'])}\n\n"
        f"{load_instructions(out, m['layout'])}\n"
    )


def load_instructions(path: Path | str, layout: str) -> str:
    trc = ", trust_remote_code=True" if layout == "sliced" and (Path(path) / MODELING).is_file() else ""
    return (
        f"Load: `AutoModelForCausalLM.from_pretrained('{path}'{trc})` or "
        f"`pipeline('text-generation', model='{path}'{trc})`"
    )


# ==== reading back and verifying ====================================================================================
def read_manifest(folder: Path) -> dict:
    """The surgery.json of `folder`, checked for the shape inspect relies on; UsageError (exit 2) when the folder
    is not a readable surgery checkpoint."""
    if not folder.exists():
        raise UsageError(f"{folder} does not exist; give a checkpoint folder")
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder; give a checkpoint folder")
    f = folder / MANIFEST
    if not f.is_file():
        raise UsageError(
            f"{folder} has no {MANIFEST}, so it is not a surgery checkpoint; "
            "compare weights with `surgery diff BASE PATH` instead"
        )
    try:
        m = json.loads(f.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{f} is not valid JSON ({e}); not a readable surgery checkpoint") from None
    bad = None
    if not isinstance(m, dict):
        bad = f"is a JSON {type(m).__name__}, not an object"
    elif not isinstance(m.get("files"), dict):
        bad = "has no 'files' mapping of file name -> {sha256, bytes}"
    else:
        for name, meta in m["files"].items():
            ok = (
                isinstance(meta, dict)
                and isinstance(meta.get("sha256"), str)
                and isinstance(meta.get("bytes"), int)
                and not isinstance(meta.get("bytes"), bool)
            )
            if not ok:
                bad = f"entry {name!r} needs sha256 (text) and bytes (an integer)"
                break
            if Path(name).is_absolute() or ".." in Path(name).parts:
                bad = f"entry {name!r} points outside the folder"
                break
        layers = m.get("layers")
        if (
            bad is None
            and layers is not None
            and not (isinstance(layers, dict) and all(str(k).lstrip("-").isdigit() for k in layers))
        ):
            bad = "has 'layers' that is not a mapping of layer numbers"
    if bad:
        raise UsageError(f"{f} {bad}; not a readable surgery checkpoint")
    return m


def verify_manifest(m: dict) -> list[str]:
    """The manifest's own hash: detects an edited surgery.json (not a forger who recomputes the hash)."""
    recorded = m.get("manifest_sha256")
    if recorded is None:
        return [
            f"{MANIFEST}: no manifest_sha256, so its own integrity cannot be checked (edited, or written "
            "by an older surgery)"
        ]
    if recorded != manifest_digest(m):
        return [f"{MANIFEST}: manifest_sha256 mismatch (the manifest was edited after export)"]
    return []


def verify_files(folder: Path, files: dict) -> list[str]:
    """Every listed file present with its size and sha256; every file in the folder (any depth) listed."""
    problems = []
    for name, meta in files.items():
        p = folder / name
        if not p.is_file():
            problems.append(f"{name}: missing")
        elif p.stat().st_size != meta["bytes"]:
            problems.append(f"{name}: size {p.stat().st_size} != recorded {meta['bytes']} (truncated or altered)")
        elif sha256_file(p) != meta["sha256"]:
            problems.append(f"{name}: sha256 mismatch (tampered)")
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if rel == MANIFEST or rel in files or p.is_dir() and not p.is_symlink():
            continue
        problems.append(f"{rel}: not listed in {MANIFEST} (added after export)")
    return problems


def remote_code_note(folder: Path, m: dict) -> str | None:
    """For a sliced checkpoint: whether its modeling file is this version's template (so it loads without
    --trust-remote-code)."""
    if m.get("layout") != "sliced":
        return None
    if not (folder / MODELING).is_file():
        return "none: one FFN width in every layer, a stock config"
    why = trust.not_ours(folder)
    return (
        f"{MODELING} is surgery {__version__}'s template: loads without {trust.FLAG}"
        if why is None
        else f"needs {trust.FLAG}: {why}"
    )


def verify_safetensors(folder: Path) -> list[str]:
    """Each tensor file must parse and be as long as its header says (catches truncation without a manifest)."""
    problems = []
    for p in sorted(folder.rglob("*.safetensors")):
        rel = p.relative_to(folder).as_posix()
        try:
            header = _safetensors_header(p)
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            problems.append(f"{rel}: unreadable ({e})")
            continue
        n = int.from_bytes(p.open("rb").read(8), "little")
        if p.stat().st_size < 8 + n + end:
            problems.append(f"{rel}: truncated ({p.stat().st_size} bytes < {8 + n + end} the header needs)")
    return problems


def _safetensors_header(p: Path) -> dict:
    with p.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError("shorter than a safetensors header")
        n = int.from_bytes(raw, "little")
        if n > 100_000_000 or n > p.stat().st_size:
            raise ValueError("bad header length")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"bad header: {e}") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return header
