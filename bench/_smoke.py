"""What the benches' `--smoke` runs share (not a bench itself): a scratch folder that is removed at exit, and a
tiny random-init Llama that speaks SmolLM2's tokenizer (arithmetic prompts tokenize as on the real model), saved as
a Hugging Face folder that `load_model` reads in a second. tests/test_bench_smoke.py runs every other bench/*.py
with --smoke.

The scratch folder also becomes $SURGERY_HOME, so what the engine caches for the random models (CNA's vocabulary
ranges) lands there and not in the repository's checkpoints/.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOL = ROOT / "checkpoints" / "base" / "smollm2-135m"

# `--set` overrides that cut the arithmetic-prune recipe's data to a few problems (the selection cases, the
# training rows and the held-out sets all come from them)
RECIPE_SETS = [
    "data.per_op=20",
    "data.test_size=4",
    "data.validation_size=0",
    "data.train_limit=8",
    "data.one_digit_limit=8",
    "cna.limit=6",
    "cna.max_rescore=256",
    "cna.exact_top=8",
]


def scratch(name: str) -> Path:
    """A fresh temporary folder for one smoke run (deleted when the process exits); $SURGERY_HOME points at it.
    Torch runs one thread here and in child processes: tiny shapes gain nothing from more, and on a CPU that other
    jobs hold, spinning threads slow them several-fold."""
    d = Path(tempfile.mkdtemp(prefix=f"bench-smoke-{name}-"))
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    os.environ["SURGERY_HOME"] = str(d)
    os.environ["OMP_NUM_THREADS"] = "1"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    return d


def tiny_model(folder: Path, layers: int = 4, seed: int = 0) -> str:
    """A tiny random Llama (d 48, FFN 64, 6 heads over 2 KV heads: head 1.4 exists) with SmolLM2's vocabulary and
    tokenizer, saved under folder/tiny-llama; returns the path to pass as a model name."""
    import torch
    import transformers as T

    if not (SMOL / "tokenizer.json").exists():
        raise SystemExit(f"--smoke needs SmolLM2's tokenizer in {SMOL} (make setup)")
    cfg = T.LlamaConfig(
        vocab_size=49152,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=6,
        num_key_value_heads=2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    d = Path(folder) / "tiny-llama"
    T.AutoModelForCausalLM.from_config(cfg).eval().save_pretrained(d)
    for f in SMOL.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, d / f.name)
    return str(d)


def adapter(model: str, folder: Path, layer: int = 1) -> str:
    """A LoRA adapter on `model`'s attention at `layer`, saved as a PEFT folder like a prune sweep's
    state/reference; its B matrices are random (not PEFT's zeros), so the adapted model differs from the base."""
    import torch

    from surgery.edits.lora import LoraSpec, attach
    from surgery.io.loading import load_model

    pm = attach(load_model(model).model, [layer], LoraSpec())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    d = Path(folder) / "reference"
    pm.save_pretrained(d)
    return str(d)


def cells(
    folder: Path,
    widths: dict[int, int],
    budgets: tuple[float, ...] = (50, 25),
    selectors: tuple[str, ...] = ("cna", "random", "magnitude"),
) -> Path:
    """folder/cells.jsonl as a prune sweep writes it (the fields the benches read: budget, selector, keep,
    kept_fraction), with random keep sets of `widths` ({layer: FFN width}) at each kept percentage."""
    import json
    import random

    rng = random.Random(0)
    total = sum(widths.values())
    lines = []
    for pct in budgets:
        for name in selectors:
            keep = {str(l): sorted(rng.sample(range(w), max(1, round(w * pct / 100)))) for l, w in widths.items()}
            kept = sum(len(v) for v in keep.values())
            lines.append(
                json.dumps({"budget": f"{pct:g}%", "selector": name, "keep": keep, "kept_fraction": kept / total})
            )
    path = Path(folder) / "cells.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def sweep_scores(folder: Path, widths: dict[int, int], order: tuple[str, ...] = ("cna", "random", "magnitude")) -> Path:
    """folder/state/scores.pt as a prune sweep saves it ({"sel": Selection, "means": None}), every selector's
    scores random over `widths` ({layer: FFN width}); returns folder."""
    import torch

    from surgery.edits.pruning import Selection

    g = torch.Generator().manual_seed(0)
    scores = {n: {l: torch.rand(w, generator=g) for l, w in widths.items()} for n in order}
    (Path(folder) / "state").mkdir(parents=True, exist_ok=True)
    torch.save({"sel": Selection(sorted(widths), list(order), scores), "means": None}, folder / "state" / "scores.pt")
    return Path(folder)


# ---- every bench's --smoke in ONE interpreter (tests/test_bench_smoke.py) ----------------------------------------
def run_all(names: list[str], report: Path) -> None:
    """Runs bench/NAME.py --smoke for each name, one after another in this process, as `python bench/NAME.py
    --smoke` would (run as __main__, its own argv), and writes {name: {"rc", "stdout", "stderr"}} to `report` as
    JSON. Output is captured at the file-descriptor level, so what a bench's child processes print is caught too.
    One interpreter pays torch's and transformers' import (~8 s on 2 cores) once instead of once per bench."""
    import json
    import runpy
    import traceback

    results = {}
    bench = Path(__file__).resolve().parent
    for name in names:
        logs = Path(tempfile.mkdtemp(prefix=f"bench-smoke-log-{name}-"))
        saved = os.dup(1), os.dup(2)
        sys.stdout.flush(), sys.stderr.flush()
        with open(logs / "out", "w") as out, open(logs / "err", "w") as err:
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            sys.argv = [str(bench / f"{name}.py"), "--smoke"]
            try:
                runpy.run_path(sys.argv[0], run_name="__main__")
                rc = 0
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if not isinstance(e.code, int | None):
                    print(e.code, file=sys.stderr)
            except BaseException:  # a broken bench is reported, the others still run
                traceback.print_exc()
                rc = 1
            finally:
                sys.stdout.flush(), sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                os.close(saved[0]), os.close(saved[1])
        results[name] = {"rc": rc, "stdout": (logs / "out").read_text(), "stderr": (logs / "err").read_text()}
        shutil.rmtree(logs, ignore_errors=True)
    Path(report).write_text(json.dumps(results))


if __name__ == "__main__":  # python bench/_smoke.py REPORT.json NAME [NAME ...]
    run_all(sys.argv[2:], Path(sys.argv[1]))
