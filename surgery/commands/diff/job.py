"""`surgery diff`: what an edit changed, from the weights alone."""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError

from surgery.errors import UsageError
from surgery.io.diff import compare, first_line, is_gguf, open_weights
from surgery.io.loading import resolve
from surgery.io.report import Report, check_out_dir, md_table
from surgery.io.report import save as save_report
from surgery.model.arch import arch_for


def diff(base: str, other: str, out: str | None = None) -> Report:
    """`surgery diff` (its options and help: this package's __init__.py). Either side may be a GGUF file (as
    `surgery export` writes it): its tensors are read under the names of the checkpoint folder on the other side,
    whose config describes both."""
    out_dir = check_out_dir(out)
    base_gguf, other_gguf = is_gguf(base), is_gguf(other)
    if base_gguf and other_gguf:
        raise UsageError(
            "BASE and OTHER are both GGUF files; diff needs a checkpoint folder on one side (its config names "
            "the model's tensors): compare the GGUF with the folder it was exported from"
        )
    base_dir = Path(base) if base_gguf else Path(resolve(base)[1])
    other_dir = Path(other)
    if other_gguf:
        cfg = _config(base_dir, "BASE")
    else:
        if not (other_dir / "config.json").exists():
            raise UsageError(f"{other} has no config.json; point OTHER at a checkpoint folder or a GGUF file")
        cfg = _config(other_dir, "OTHER")
    arch = arch_for(cfg)
    if base_gguf:
        other_weights = open_weights(other_dir)
        base_weights = open_weights(base_dir, cfg, sorted(other_weights.names()))
    else:
        base_weights = open_weights(base_dir)
        other_weights = open_weights(other_dir, cfg, sorted(base_weights.names()))
    try:
        data = compare(base_weights, other_weights, cfg, arch, base_dir, other_dir)
    except (SafetensorError, OSError) as e:  # a tensor file whose header parsed but whose data did not
        raise UsageError(
            f"cannot read the weights ({first_line(e)}); a tensor file is corrupt or truncated "
            "(`surgery inspect` names it)"
        ) from None
    return save_report(Report(data=data, markdown=markdown(data)), out_dir, stem="diff")


def _config(folder: Path, side: str):
    """The checkpoint folder's config, or one line."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise UsageError(
            f"{folder / 'config.json'} is unreadable ({first_line(e)}); point {side} at an intact checkpoint folder"
        ) from None


def markdown(d: dict) -> str:
    rows = []
    for r in d["layers"]:
        counts = [len(r.get(k, [])) for k in ("removed", "zeroed", "scaled", "modified")]
        heads = r.get("heads_zeroed", []) + [s["head"] for s in r.get("heads_scaled", [])] + r.get("heads_modified", [])
        if any(counts) or heads:
            rows.append([r["layer"], f"{r.get('base_width')} -> {r.get('width')}", *counts, _short(heads)])
    s = d["summary"]
    lines = [
        f"# diff {d['base']} -> {d['other']}",
        "",
        f"{s['removed']} neurons removed, {s['zeroed']} zeroed, {s['scaled']} scaled "
        f"({s['amplified']} amplified), {s['modified']} otherwise modified; heads zeroed {s['heads_zeroed']},"
        f" scaled {s['heads_scaled']}, modified {s['heads_modified']}; {s['other_tensors_changed']} other "
        "tensors changed.",
        "",
    ]
    lines += (
        [md_table(["layer", "width", "removed", "zeroed", "scaled", "modified", "heads"], rows)]
        if rows
        else ["No FFN neuron or head changes."]
    )
    cc = d.get("changed_components")
    if cc:
        lines += [
            "",
            f"Changed components: heads {', '.join(cc['heads']) or 'none'}; key/value heads "
            f"{', '.join(cc['kv_heads']) or 'none'}; MLPs {', '.join(map(str, cc['mlps'])) or 'none'}.",
        ]
    for r in d["layers"]:
        if r.get("amplified"):
            f = {x["neuron"]: x["factor"] for x in r["scaled"]}
            lines.append(f"\nAMPLIFIED layer {r['layer']}: " + ", ".join(f"{k} x{f[k]:g}" for k in r["amplified"]))
    for o in d["other_tensors"]:
        lines.append(
            f"- {o['tensor']}: {o['change']}"
            + (f" (max |diff| {o['max_abs_diff']:.3g})" if "max_abs_diff" in o else "")
        )
    return "\n".join(lines)


def _short(xs: list[int]) -> str:
    return ",".join(map(str, xs[:8])) + ("..." if len(xs) > 8 else "")
