"""`surgery lora-sweep`: one LoRA per layer on 2-digit arithmetic (paper Figure 2) and the coefficient
amplification of each LoRA model's CNA top neurons per layer group (paper Tables 9-10).

Uses the `arithmetic-prune` recipe's lora / train / data / cna / sweep sections.
"""

from __future__ import annotations

import math
from pathlib import Path

from torch import nn

from surgery.edits.lora import fit_lora, merged_copy
from surgery.edits.pruning import load_recipe, task_cases, training_data
from surgery.errors import UsageError
from surgery.evals.arithmetic import Splits, accuracy, build_splits
from surgery.find.cna import parse_layers, scan
from surgery.find.neurons import mean_coefficients
from surgery.io.context import Run
from surgery.io.loading import check_training_dtype, load_model
from surgery.io.recipe import to_dict
from surgery.io.report import Report, atomic_dir, make, md_table, png_bytes, save
from surgery.model.arch import ModelView
from surgery.model.batching import pad_id


# ---- coefficient amplification (paper Tables 9-10) ---------------------------------------------------------
def amplification(
    orig: nn.Module,
    tuned: nn.Module,
    tokenizer,
    seqs: list[list[int]],
    top: dict[int, list[int]],
    groups: list[tuple[int, int]],
) -> list[dict]:
    """Mean |coefficient| of the CNA top neurons in the tuned vs the original model, per layer group."""
    layers = sorted(top)
    a = mean_coefficients(ModelView(orig), seqs, layers, pad_id(tokenizer), absolute=True)
    b = mean_coefficients(ModelView(tuned), seqs, layers, pad_id(tokenizer), absolute=True)
    out = []
    for lo, hi in groups:
        ls = [l for l in layers if lo <= l <= hi and top[l]]
        ca = sum(float(a[l][top[l]].sum()) for l in ls)
        cb = sum(float(b[l][top[l]].sum()) for l in ls)
        n = sum(len(top[l]) for l in ls)
        out.append(
            {
                "layers": f"{lo}-{hi}",
                "neurons": n,
                "orig": ca / max(n, 1),
                "lora": cb / max(n, 1),
                "ratio": cb / ca if ca else None,
            }
        )
    return out


# ---- the sweep (paper Figure 2, Tables 9-10) ----------------------------------------------------------------
def run(
    *,
    model: str,
    dtype: str,
    device: str,
    out: str | None,
    force: bool,
    quick: bool,
    overrides: list[str] | None,
    recipe: str,
    layers: str | None,
    profile: str | None,
    trust_remote_code: bool,
) -> Report:
    """`surgery lora-sweep` (its options and help: this package's __init__.py)."""
    r = load_recipe(recipe, overrides or (), quick, profile)
    check_training_dtype(dtype, device)
    run = Run("lora-sweep", out, force, default=f"lora-sweep-{Path(model).name}")
    spec = layers if layers is not None else r.sweep.layers
    if spec is not None and not str(spec).strip():
        raise UsageError("empty --layers; use A-B or a list like 3,5,7")
    with run.step("load"):
        loaded = load_model(model, dtype, device, trust_remote_code=trust_remote_code)
        which = parse_layers(spec, ModelView(loaded.model).n_layers)
    with run.step("data"):
        splits = build_splits(r.data)
        task = task_cases(splits, loaded.tokenizer, r.cna.limit)
    rows = [_sweep_layer(loaded, l, r, splits, task, run) for l in which]
    return _sweep_report(loaded, r, rows, run)


def _layer_groups(n_layers: int, groups: int) -> list[tuple[int, int]]:
    size = math.ceil(n_layers / max(1, groups))
    return [(lo, min(lo + size, n_layers) - 1) for lo in range(0, n_layers, size)]


def _sweep_layer(loaded, layer: int, r, splits: Splits, task, run: Run) -> dict:
    """Train a LoRA at `layer`, evaluate it, and measure the amplification of its CNA top neurons."""
    orig, tok = loaded.model, loaded.tokenizer
    with run.step(f"LoRA layer {layer}"):
        fit = fit_lora(orig, tok, layer, r.lora, r.train, *training_data(r, splits, tok))
        tuned = merged_copy(fit.model)
        acc = accuracy(tuned, tok, splits.test, r.train.eval_batch_size)["overall"]
    with run.step(f"CNA layer {layer}"):
        n = ModelView(orig).n_layers
        sc = scan(
            ModelView(tuned),
            task.seqs,
            list(range(n)),
            r.sweep.top,
            pad_id(tok),
            view_b=ModelView(orig),
            targets=task.targets,
            batch_size=r.cna.batch_size,
        )
        top = {l: sorted(s) for l, s in sc.per_case_sets().items()}
        amp = amplification(orig, tuned, tok, task.seqs, top, _layer_groups(n, r.sweep.groups))
    return {
        "layer": layer,
        "lr": fit.lr,
        "test2": acc,
        "amplification": amp,
        "top_per_group": [a["neurons"] for a in amp],
    }


def _sweep_report(loaded, r, rows: list[dict], run: Run) -> Report:
    """report.json / report.md / sweep.png in the run's folder, written atomically."""
    table = md_table(
        ["LoRA layer", "2-digit test acc %", "95% CI", "n", "lr"],
        [
            [
                x["layer"],
                f"{100 * x['test2']['full_answer_acc']:.1f}",
                "[{:.1f}, {:.1f}]".format(*[100 * c for c in x["test2"]["full_answer_ci95"]]),
                x["test2"]["n_problems"],
                x["lr"],
            ]
            for x in rows
        ],
    )
    groups = [a["layers"] for a in rows[0]["amplification"]] if rows else []
    amp = md_table(
        ["LoRA layer"] + [f"{g} (lora/orig)" for g in groups],
        [
            [x["layer"]]
            + [("-" if a["ratio"] is None else f"{a['ratio']:.2f}x") + f" ({a['neurons']})" for a in x["amplification"]]
            for x in rows
        ],
    )
    md = "\n\n".join(
        [
            f"# lora-sweep: {loaded.name}, recipe {r.name}",
            "## 2-digit test accuracy per LoRA layer (paper Figure 2)",
            table,
            f"## Coefficient amplification of the CNA top-{r.sweep.top} neurons (mean |m|, LoRA / "
            "original, per layer group; neuron count in brackets; paper Tables 9-10)",
            amp,
            "## Timing",
            md_table(["step", "seconds"], list(run.seconds.items())),
        ]
    )
    data = make(
        run.command, loaded.describe(), to_dict(r), {"layers": rows, "steps_seconds": run.seconds}, run.elapsed()
    )
    rep = Report(data, md)
    with atomic_dir(run.out, run.force) as tmp:
        save(rep, tmp)
        (tmp / "sweep.png").write_bytes(_sweep_png(rows))
    rep.files = [run.out / "report.json", run.out / "report.md", run.out / "sweep.png"]
    return rep


def _sweep_png(rows: list[dict]) -> bytes:
    """Accuracy per LoRA layer with 95% CIs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazily, after selecting the non-interactive backend

    fig, ax = plt.subplots(figsize=(8, 3.5))
    xs = [x["layer"] for x in rows]
    acc = [100 * x["test2"]["full_answer_acc"] for x in rows]
    ci = [
        [a - 100 * x["test2"]["full_answer_ci95"][0] for a, x in zip(acc, rows)],
        [100 * x["test2"]["full_answer_ci95"][1] - a for a, x in zip(acc, rows)],
    ]
    ax.errorbar(xs, acc, yerr=ci, marker="o", capsize=3)
    ax.set_xlabel("LoRA layer")
    ax.set_ylabel("2-digit test accuracy %")
    return png_bytes(fig, dpi=100)
