"""`surgery export`: load SRC as transformers does, write it as GGUF or a vLLM folder (surgery/io/deploy.py), report."""

from __future__ import annotations

from pathlib import Path

from surgery.errors import UsageError
from surgery.io import llamacpp
from surgery.io.checkpoint import MANIFEST, read_manifest, save
from surgery.io.context import Run
from surgery.io.deploy import Export, check_now, write_exports
from surgery.io.gguf_file import TYPES
from surgery.io.loading import load_model
from surgery.io.report import Report, atomic_dir, json_text, make, write_text_atomic
from surgery.io.vllm_config import write_vllm
from surgery.model.arch import ModelView

FORMATS = ("gguf", "vllm", "native")  # gguf / vllm: surgery/io/deploy.py; native: a stock checkpoint


def export(
    *, src: str, format: str, gguf_type: str, prompt: str, out: str | None, force: bool, trust_remote_code: bool
) -> Report:
    """`surgery export` (its options and help: this package's __init__.py)."""
    if format not in FORMATS:
        raise UsageError(f"unknown --format {format!r}; use one of {', '.join(FORMATS)}")
    if gguf_type not in TYPES:
        raise UsageError(f"unknown --gguf-type {gguf_type!r}; use one of {', '.join(TYPES)}")
    folder = Path(src)
    manifest = read_manifest(folder) if (folder / MANIFEST).is_file() else None
    run = Run("export", out, force, default=f"export-{folder.name or src}")
    with run.step("load"):
        loaded = load_model(src, trust_remote_code=trust_remote_code)
        wanted = [Export(format, gguf_type)]
        if format != "native":  # native: any architecture (a safetensors checkpoint)
            check_now(loaded.model, wanted)  # a model the runtime cannot run, or widths a type does not fit
    if format == "native":
        return native(loaded, manifest, src, run, force)
    if format == "vllm":
        with run.step("write"), atomic_dir(run.out, force) as tmp:
            results = write_vllm(loaded.model, loaded.tokenizer, tmp)
            results["folder"] = str(run.out)
            results["serve"] = results["serve"].replace(str(tmp), str(run.out))
            data = make("export", loaded.describe(), {"src": src, "format": format}, results, run.elapsed())
            md = vllm_markdown(results, run.command)
            write_text_atomic(tmp / "report.json", json_text(data))
            write_text_atomic(tmp / "report.md", md + "\n")
        return Report(data, md, [run.out])
    with run.step("write"), atomic_dir(run.out, force) as tmp:
        (written,) = write_exports(loaded.model, loaded.tokenizer, tmp, wanted, manifest, Path(loaded.name).name)
        results = {
            **{k: v for k, v in written.items() if k != "format"},
            "file": str(run.out / written["file"]),
            "manifest_embedded": manifest is not None,
        }
        if llamacpp.available():  # the file as llama.cpp runs it, against transformers on the same prompt
            results["llama_cpp"] = runtime_check(loaded.model, loaded.tokenizer, tmp / written["file"], prompt)
        data = make("export", loaded.describe(), {"src": src, "format": format}, results, run.elapsed())
        md = markdown(results, run.command)
        write_text_atomic(tmp / "report.json", json_text(data))
        write_text_atomic(tmp / "report.md", md + "\n")
    return Report(data, md, [run.out])


def native(loaded, manifest: dict | None, src: str, run: Run, force: bool) -> Report:
    """A checkpoint every tool loads with plain `from_pretrained` (no remote code): one FFN width -> the stock
    config at that width (sliced); per-layer widths -> the base shapes with the removed neurons as zeros (padded:
    no speed win, but native everywhere). The kept indices come from SRC's surgery.json."""
    widths = ModelView(loaded.model).ffn_widths()
    layout = "sliced" if len(set(widths)) == 1 else "padded"
    prov = {"layers": (manifest or {}).get("layers", {}), "exported_from": {"src": src, "format": "native"}}
    results = {"folder": str(run.out), "layout": layout, "ffn_widths": widths}
    data = make("export", loaded.describe(), {"src": src, "format": "native"}, results, run.elapsed())
    shape = f"{widths[0]} in every layer (the stock config)" if layout == "sliced" else "per layer, padded with zeros"
    md = "\n".join(
        [
            f"# export: {run.out.name}, native",
            f"`{run.command}`",
            "",
            f"- layout **{layout}**: FFN widths {shape}; loads with plain from_pretrained, no remote code",
            "",
            f"Load it: `AutoModelForCausalLM.from_pretrained('{run.out}')`",
        ]
    )
    with run.step("write"):
        save(
            loaded.model,
            loaded.tokenizer,
            run.out,
            layout=layout,
            provenance=prov,
            force=force,
            base=(manifest or {}).get("base"),
            extra_files={"report.json": json_text(data), "report.md": md + "\n"},
        )
    return Report(data, md, [run.out])


def runtime_check(model, tokenizer, path: Path, prompt: str, new_tokens: int = 16) -> dict:
    """`prompt` through llama.cpp and through transformers: max |logit diff| over its positions and both greedy
    continuations (`new_tokens` tokens, no stop token)."""
    import numpy as np
    import torch

    llm = llamacpp.open_gguf(path)
    ids = tokenizer.encode(prompt, add_special_tokens=True)
    with torch.no_grad():
        hf = model(torch.tensor([ids])).logits[0].float().numpy()
    hf_new = llamacpp.transformers_greedy(model, ids, new_tokens)
    cpp_new = llamacpp.greedy(llm, ids, new_tokens)
    return {
        "prompt": prompt,
        "same_token_ids": llamacpp.tokenize(llm, prompt) == ids,
        "max_logit_diff": float(np.abs(llamacpp.logits(llm, ids) - hf).max()),
        "completion": tokenizer.decode(cpp_new),
        "same_greedy_as_transformers": cpp_new == hf_new,
    }


def markdown(r: dict, command: str) -> str:
    widths = r["ffn_widths"]
    shown = f"{widths[0]} in every layer" if len(set(widths)) == 1 else f"per layer {widths}"
    return "\n".join(
        [
            f"# export: {Path(r['file']).name}",
            f"`{command}`",
            "",
            f"- llama.cpp architecture **{r['arch']}**, {r['gguf_type']}, {r['tensors']} tensors, "
            f"{r['bytes'] / 2**20:.1f} MiB",
            f"- FFN widths: {shown}",
            "- provenance (surgery.json) embedded: "
            + ("yes" if r["manifest_embedded"] else "no (not a surgery checkpoint)"),
            "",
            *_runtime_lines(r.get("llama_cpp")),
            "Run it:",
            "",
            f"    llama-cli -m {r['file']} -p 'Calculate: 12+7='",
            f'    python -c "from llama_cpp import Llama; '
            f"print(Llama('{r['file']}')('Calculate: 12+7=', max_tokens=4))\"",
            "",
            f"Verify it: `surgery inspect {r['file']}`",
        ]
    )


def vllm_markdown(r: dict, command: str) -> str:
    widths = r["ffn_widths"]
    shown = f"{widths[0]} in every layer" if len(set(widths)) == 1 else f"per layer {widths}"
    how = (
        "DeciLM block_configs with each layer's exact ffn.intermediate_size, and the configuration_decilm.py vLLM "
        "loads with --trust-remote-code"
        if r["remote_code"]
        else "the stock config (no code)"
    )
    return "\n".join(
        [
            f"# export: {r['folder']} for vLLM",
            f"`{command}`",
            "",
            f"- architecture **{r['architecture']}**: {how}",
            f"- FFN widths: {shown}",
            "- checked against vLLM's loader source (tests/test_vllm.py); vLLM itself was not run here",
            "",
            f"Serve it: `{r['serve']}`",
        ]
    )


def _runtime_lines(check: dict | None) -> list[str]:
    if check is None:
        return ["llama-cpp-python is not installed: the file was not run here (`make setup` installs it).", ""]
    same = "the same" if check["same_greedy_as_transformers"] else "NOT the same"
    return [
        f"Through llama.cpp: {check['prompt']!r} -> {check['completion']!r} ({same} greedy tokens as "
        f"transformers; max |logit diff| {check['max_logit_diff']:.1e}; token ids "
        f"{'identical' if check['same_token_ids'] else 'DIFFERENT'})",
        "",
    ]
