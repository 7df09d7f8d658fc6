"""`surgery inspect`: read a checkpoint's manifest back, verify every hash, and summarise it."""

from __future__ import annotations

from pathlib import Path

from surgery.io.checkpoint import (
    load_instructions,
    read_manifest,
    remote_code_note,
    verify_files,
    verify_manifest,
    verify_safetensors,
)
from surgery.io.gguf_file import read_gguf
from surgery.io.report import Report


def inspect(path: str) -> Report:
    """`surgery inspect` (its options and help: this package's __init__.py)."""
    folder = Path(path)
    if folder.is_file() and folder.suffix == ".gguf":
        return inspect_gguf(folder)
    m = read_manifest(folder)
    files = m["files"]
    problems = verify_manifest(m) + verify_files(folder, files) + verify_safetensors(folder)
    base = m.get("base")
    data = {
        "path": str(folder),
        "layout": m.get("layout"),
        "arch": m.get("arch"),
        "dtype": m.get("dtype"),
        "tool": m.get("tool"),
        "created": m.get("created"),
        "base": base if isinstance(base, dict) or base is None else {"id": base, "sha256": None},
        "ffn": m.get("ffn"),
        "seed": m.get("seed"),
        "recipe": m.get("recipe"),
        "lora": m.get("lora"),
        "adapter": m.get("adapter"),
        "edited_layers": sorted(m.get("layers") or {}, key=int),
        "files_checked": len(files),
        "remote_code": remote_code_note(folder, m),
        "problems": problems,
        "ok": not problems,
    }
    return Report(data=data, markdown=markdown(data), exit_code=1 if problems else 0)


def markdown(d: dict) -> str:
    ffn = d.get("ffn") if isinstance(d.get("ffn"), dict) else {}
    w = ffn.get("widths") or []
    base = d.get("base") or {}
    tool = d.get("tool") if isinstance(d.get("tool"), dict) else {}
    lines = [
        f"# {d['path']}",
        "",
        f"- layout: **{d['layout']}** ({load_instructions(d['path'], str(d['layout'] or ''))})",
        f"- arch: {d['arch']}, dtype: {d['dtype']}, made by surgery {tool.get('version')} at {d['created']}",
        f"- base: {base.get('id')} sha256 {base.get('sha256')}",
        f"- FFN widths (base {ffn.get('base_width')}): {w}",
        *(
            [f"- zero padding neurons (width rounding) per layer: {ffn['padding']}"]
            if any(ffn.get("padding") or [])
            else []
        ),
        f"- edited layers: {d['edited_layers']}",
        f"- seed: {d['seed']}, lora: {bool(d['lora'])}",
        f"- files verified: {d['files_checked']}",
    ]
    lines += [f"- remote code: {d['remote_code']}"] if d.get("remote_code") else []
    lines += [""] + ([f"PROBLEM: {p}" for p in d["problems"]] or ["All hashes match."])
    return "\n".join(lines)


def inspect_gguf(path: Path) -> Report:
    """A GGUF file `surgery export` wrote: its digest recomputed over every metadata pair and tensor, and the
    provenance of the checkpoint it came from (its surgery.json, stored in the metadata)."""
    g = read_gguf(path)
    m = g["manifest"] or {}
    data = {
        "path": str(path),
        "format": "gguf",
        "arch": g["arch"],
        "ffn_widths": g["widths"],
        "tensors": len(g["tensors"]),
        "source": {k: m.get(k) for k in ("layout", "arch", "base", "created", "tool", "recipe", "seed")} if m else None,
        "edited_layers": sorted(m.get("layers") or {}, key=int),
        "problems": g["problems"],
        "ok": not g["problems"],
    }
    widths = g["widths"]
    lines = [
        f"# {path}",
        "",
        f"- GGUF, llama.cpp architecture **{g['arch']}**, {len(g['tensors'])} tensors",
        f"- FFN widths: {widths[0] if widths and len(set(widths)) == 1 else widths}",
        "- made from: " + (f"a surgery checkpoint, {m.get('layout')} layout" if m else "no surgery.json embedded"),
        f"- edited layers: {data['edited_layers']}",
        "",
        *([f"PROBLEM: {p}" for p in g["problems"]] or ["The digest matches: metadata and tensors are as exported."]),
    ]
    return Report(data=data, markdown="\n".join(lines), exit_code=1 if g["problems"] else 0)
