"""Deployment formats written beside (or instead of) a checkpoint: what `--export` means in every command.

    exports = parse_exports("gguf:q8_0")                 # -> [Export("gguf", "q8_0")]; bad spec: one line
    check_planned(model, exports, per_layer=True, multiple=32)   # before a long job: will the result be writable?
    write_exports(model, tokenizer, folder, exports, manifest)   # inside the checkpoint's temporary folder

`surgery export SRC --format gguf|vllm` and `prune/debias/edit/finetune --export gguf[:TYPE],vllm` go through
these, so a format is added in one place. A GGUF written by a command sits in its checkpoint folder as
NAME-TYPE.gguf (its own metadata carries the provenance), a vLLM folder as vllm/; both are listed (with their
sha256) in surgery.json like every other file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from surgery.errors import UsageError
from surgery.io import gguf_file, vllm_config
from surgery.model.arch import ModelView

FORMATS = ("gguf", "vllm")


@dataclass(frozen=True)
class Export:
    format: str
    gguf_type: str = "f32"  # gguf only


def parse_exports(spec: str | None) -> list[Export]:
    """'gguf' | 'gguf:q8_0' | 'vllm' | a comma list of them -> Exports; anything else is one line."""
    if spec is None or not str(spec).strip():
        return []
    out = []
    for part in str(spec).split(","):
        fmt, _, kind = part.strip().lower().partition(":")
        if fmt not in FORMATS:
            raise UsageError(f"unknown --export format {fmt!r}; use one of {', '.join(FORMATS)} (e.g. gguf:q8_0)")
        if fmt == "vllm" and kind:
            raise UsageError(f"--export vllm takes no type (the weights keep the checkpoint's dtype); drop ':{kind}'")
        kind = kind or "f32"
        if kind not in gguf_file.TYPES:
            raise UsageError(f"unknown GGUF type {kind!r} in --export {spec}; use one of {', '.join(gguf_file.TYPES)}")
        if any(e.format == fmt and e.gguf_type == kind for e in out):
            raise UsageError(f"--export lists {fmt}:{kind} twice; give each once")
        out.append(Export(fmt, kind))
    return out


def check_now(model: nn.Module, exports: list[Export]) -> None:
    """For a model whose widths are final (debias, edit, finetune, export): every export writable, or one line."""
    for e in exports:
        if e.format == "vllm":
            vllm_config.check_vllm(model)
            continue
        gguf_file.gguf_arch(model)
        gguf_file.check_type(model, e.gguf_type)


def check_planned(model: nn.Module, exports: list[Export], per_layer: bool, multiple: int | None) -> None:
    """For a model about to be cut or edited (its widths not known yet): refuses what cannot be written whatever
    the selection keeps: an architecture without GGUF, per-layer widths where llama.cpp has no per-layer graph
    (`per_layer`: a sliced result that is not --uniform), a block type the widths will not fit (`multiple`, the
    width multiple of the slicing, not a multiple of the block; or a present width or the hidden size that is
    not). multiple=None: the widths stay as they are (zero / scale edits)."""
    view = ModelView(model)
    for e in exports:
        arch = view.arch
        if e.format == "vllm":
            vllm_config.check_vllm(model, per_layer=per_layer and multiple is not None)
            continue
        if arch.gguf is None or multiple is None:
            check_now(model, [e])  # an unchanged model: the same checks as its export
            continue
        if per_layer and not arch.gguf_per_layer:
            raise UsageError(
                f"--export gguf: {model.config.model_type} has no per-layer-width llama.cpp graph and this cut "
                "leaves per-layer widths; cut every layer to one width (prune --uniform), edit without removing "
                "(zero or scale), or drop --export"
            )
        block = gguf_file.BLOCK.get(e.gguf_type)
        if block and (multiple % block or view.hidden_size % block or any(w % block for w in view.ffn_widths())):
            raise UsageError(
                f"--export gguf:{e.gguf_type} stores rows in blocks of {block} and the cut widths are multiples of "
                f"{multiple}; prune with --multiple {block}, or export f32, f16 or bf16"
            )


def write_exports(
    model: nn.Module, tokenizer, folder: Path, exports: list[Export], manifest: dict | None, name: str | None = None
) -> list[dict]:
    """Writes every export into `folder` (a checkpoint's temporary folder, or `surgery export`'s) as
    NAME-TYPE.gguf (NAME: the model's folder name); returns one record per file."""
    name = name or Path(str(getattr(model.config, "_name_or_path", "") or "model")).name or "model"
    records = []
    for e in exports:
        if e.format == "vllm":
            records.append(vllm_config.write_vllm(model, tokenizer, folder / "vllm"))
            continue
        path = folder / f"{name}-{e.gguf_type}.gguf"
        written = gguf_file.write_gguf(model, tokenizer, path, e.gguf_type, manifest, name=name)
        records.append(
            {
                "format": "gguf",
                "file": written.path.name,
                "arch": written.arch,
                "gguf_type": e.gguf_type,
                "ffn_widths": written.widths,
                "tensors": written.tensors,
                "bytes": written.bytes,
            }
        )
    return records
