"""`surgery prune`: CNA -> keep set -> physical slicing -> fresh LoRA -> train -> compare -> export (paper 6.1).

A small orchestration over the steps of surgery/edits/pruning.py (torchtune style): `reference` (LoRA at layer L
trained on 2-digit problems, the CNA reference; also the "LoRA only" row), `select` + `keeps_for` (CNA original
vs reference on every 1-digit case, and every baseline at the SAME per-layer budget), `prune_and_train` (slice a
copy, fresh LoRA, train), `evaluate_row`, `export_checkpoint` (+ `check_reload`), then `markdown` / `plots`;
`pipeline` and `finish` chain them and a `context.Run` times each step and owns the output folder. `--sweep`
and `--keep auto` hand over to surgery/commands/prune/sweep.py (many budgets, resumable).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from surgery.commands.prune import sweep as prune_sweep
from surgery.edits.lora import Fit, fit_lora, load_against, merged_copy
from surgery.edits.pruning import (
    Plan,
    PruneRecipe,
    PruneTask,
    check_keep_syntax,
    ci_text,
    evaluate_row,
    export_checkpoint,
    keeps_for,
    load_recipe,
    lora_params,
    make_plan,
    make_task,
    prune_and_train,
    results_table,
    select,
    token_means,
)
from surgery.errors import UsageError
from surgery.evals import tasks
from surgery.io.checkpoint import MODELING, needs_modeling
from surgery.io.context import Run
from surgery.io.deploy import Export, check_planned, parse_exports
from surgery.io.loading import check_training_dtype, load_model
from surgery.io.recipe import to_dict
from surgery.io.report import Report, json_text, make, md_table, png_bytes
from surgery.model.arch import ModelView


# ---- report ------------------------------------------------------------------------------------------------
def kept_table(keeps: dict[str, dict[int, list[int]]], width: dict[int, int]) -> str:
    """Kept count and fraction per layer, per selector (all selectors share the budget)."""
    main = next(iter(keeps.values()))
    rows = [[l, len(main[l]), width[l], f"{100 * len(main[l]) / width[l]:.1f}%"] for l in sorted(main)]
    return md_table(["layer", "kept", "width", "fraction"], rows)


def plots(
    rows: list[dict], keep: dict[int, list[int]], width: dict[int, int], key: str = "test2", label: str = "2-digit test"
) -> dict[str, bytes]:
    """accuracy.png (headline test accuracy with 95% CIs per model) and kept.png (kept neurons per layer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    fig, ax = plt.subplots(figsize=(8, 4))
    acc = [r[key]["full_answer_acc"] * 100 for r in rows]
    lo = [a - r[key]["full_answer_ci95"][0] * 100 for a, r in zip(acc, rows)]
    hi = [r[key]["full_answer_ci95"][1] * 100 - a for a, r in zip(acc, rows)]
    ax.bar([r["name"] for r in rows], acc, yerr=[lo, hi], capsize=4, color="tab:blue")
    ax.set_ylabel(f"{label} accuracy % (95% CI)")
    ax.tick_params(axis="x", rotation=30)
    out["accuracy.png"] = _png(fig)
    fig, ax = plt.subplots(figsize=(8, 3))
    ls = sorted(keep)
    ax.bar(ls, [100 * len(keep[l]) / width[l] for l in ls], color="tab:green")
    ax.set_xlabel("layer")
    ax.set_ylabel("kept FFN neurons %")
    out["kept.png"] = _png(fig)
    return out


def _png(fig) -> bytes:
    return png_bytes(fig, dpi=100)


def _cna_line(r: PruneRecipe, certified: float | None) -> str:
    if r.selector != "cna" or certified is None:
        return ""
    what = (
        "delta = importance in the reference (LoRA) model - in the original"
        if r.cna.score == "delta"
        else "score = importance in the reference (LoRA) model alone (cna.score=reference)"
    )
    return (
        f"CNA: {what}, correct answer token; "
        f"{100 * certified:.0f}% of cases have a certified exact top-k (max_rescore {r.cna.max_rescore}; "
        "the others use the best exact scores found)"
    )


def markdown(
    r: PruneRecipe,
    plan: Plan,
    rows: list[dict],
    keeps: dict,
    width: dict,
    run: Run,
    model_name: str,
    task: PruneTask,
    certified: float | None = None,
) -> str:
    deep_total = sum(width[l] for l in plan.layers)
    total = sum(len(v) for v in keeps[plan.selectors[0]].values())
    return "\n\n".join(
        [
            f"# prune: {model_name}, recipe {r.name}",
            f"`{run.command}`",
            f"keep **{r.keep}** of layers {plan.layers[0]}-{plan.layers[-1]} ({total} of {deep_total} neurons, "
            f"{100 * total / deep_total:.1f}%), selector **{r.selector}**, LoRA at layer {plan.lora_layer} "
            f"(rank {r.lora.rank}, lr chosen from {r.train.lrs})",
            _cna_line(r, certified),
            "## Results (Table 11 form; full-answer accuracy, teacher forced = greedy)",
            results_table(rows, deep_total, task.labels),
            "## Kept neurons per layer",
            kept_table(keeps, width),
            "## Timing",
            md_table(["step", "seconds"], list(run.seconds.items())),
            f"Checkpoint: `{run.out}` ({r.layout} layout)",
        ]
    )


# ---- the command -------------------------------------------------------------------------------------------
def run(
    *,
    model: str,
    dtype: str,
    device: str,
    out: str | None,
    force: bool,
    export: str | None,
    quick: bool,
    overrides: list[str] | None,
    recipe: str,
    keep: str | None,
    layers: str | None,
    selector: str | None,
    lora_layer: int | None,
    against: str | None,
    layout: str | None,
    uniform: bool,
    multiple: int | None,
    profile: str | None,
    trust_remote_code: bool,
    sweep: str | None,
    max_drop: float | None,
    data: str | None,
    columns: str | None,
) -> Report:
    """`surgery prune` (its options and help: this package's __init__.py)."""
    check_training_dtype(dtype, device)  # every prune trains (the reference LoRA or the recovery)
    if sweep is not None and keep is not None:
        raise UsageError("--sweep and --keep both given; a sweep runs every budget in its list (drop --keep)")
    exports = parse_exports(export)
    if exports and sweep is not None:
        raise UsageError("--export writes a checkpoint's runtime files; a --sweep exports no checkpoint (drop it)")
    auto = keep is not None and keep.strip().lower() == "auto"
    if max_drop is not None and not auto:
        raise UsageError("--max-drop applies to --keep auto; add --keep auto or drop --max-drop")
    if max_drop is not None and max_drop < 0:
        raise UsageError(f"--max-drop {max_drop:g} is negative; give the points of accuracy the cut may cost (e.g. 2)")
    search = {}
    if against is not None and against.strip().lower() == "original":
        if not auto:
            raise UsageError(
                "--against original applies to --keep auto (the drop is measured against the original "
                "model); give a reference adapter or checkpoint folder otherwise"
            )
        search["search.against"], against = "original", None
    if max_drop is not None:
        search["search.max_drop"] = max_drop
    sets = [*(overrides or ()), *(f"{k}={v}" for k, v in search.items())]
    r = load_recipe(
        recipe,
        sets,
        quick,
        profile,
        keep=None if auto else keep,
        layers=layers,
        selector=selector,
        lora_layer=lora_layer,
        layout=layout,
        uniform=True if uniform else None,
        multiple=multiple,
    )
    tasks.check_data_args(data, None, columns)
    if data is not None:
        r.data = dataclasses.replace(r.data, path=data, columns=columns if columns is not None else r.data.columns)
    if r.data.path:  # a bad file, or one too small to split, is one line before any model loads
        rows = tasks.load_cases(r.data.path, r.data.columns)
        tasks.prune_splits(rows, r.data.seed, r.data.test_size, r.data.validation_size)
    budgets = prune_sweep.parse_budgets(sweep) if sweep is not None else None
    if against is not None and not Path(against).exists():
        raise UsageError(f"--against {against} does not exist; give a PEFT adapter folder or a checkpoint folder")
    if budgets is not None or auto or r.keep == "auto":
        return prune_sweep.run(
            {"model": model, "dtype": dtype, "device": device},
            r,
            out,
            force,
            budgets,
            against,
            trust_remote_code,
            exports,
        )
    run = Run("prune", out, force, default=f"prune-{Path(model).name}")
    check_keep_syntax(r.keep)
    with run.step("load"):
        loaded = load_model(model, dtype, device, trust_remote_code=trust_remote_code)
        plan = make_plan(r, loaded.model)  # inside the step: a bad plan is the only line printed
        check_planned(loaded.model, exports, per_layer=not plan.uniform, multiple=plan.multiple)
    res = pipeline(loaded, r, plan, against, run, trust_remote_code)
    return finish(loaded, r, plan, res, run, exports)


@dataclass
class Results:
    rows: list[dict]
    keeps: dict[str, dict[int, list[int]]]
    fits: dict[str, Fit]
    merged: dict[str, nn.Module]
    width: dict[int, int]
    cna_certified: float | None
    task: PruneTask


def pipeline(
    loaded, r: PruneRecipe, plan: Plan, against: str | None, run: Run, trust_remote_code: bool = False
) -> Results:
    """Steps a-e: reference, keep sets, slice + LoRA per selector, evaluation rows."""
    orig, tok = loaded.model, loaded.tokenizer
    with run.step("data"):
        task = make_task(r, tok)
    with run.step("reference LoRA" if against is None else "reference (--against)"):
        ref_fit = None if against else fit_lora(orig, tok, plan.lora_layer, r.lora, r.train, task.train, task.validate)
        ref = load_against(against, loaded, trust_remote_code) if against else merged_copy(ref_fit.model)
    with run.step("evaluate original + reference"):
        rows = _reference_rows(orig, ref, ref_fit, against, task)
    top_k = int(plan.keep_value) if plan.keep_kind == "top" else 0
    sel = select(orig, ref, tok, task.cases, plan.layers, plan.selectors, r, top_k, run.step)
    keeps, cert = keeps_for(sel, plan.keep_kind, plan.keep_value, plan.uniform), sel.certified
    teacher = ref if r.train.distill > 0 else None  # the unpruned LoRA model teaches the pruned ones
    means = token_means(orig, tok, task.cases, plan.layers, r.compensate_at) if r.compensate else None
    del ref, ref_fit
    fits, merged = {}, {}
    for name in plan.selectors:
        with run.step(f"slice + LoRA + evaluate ({name})"):
            _, fit = prune_and_train(orig, tok, keeps[name], r, plan, task, teacher, means)
            m = merged_copy(fit.model)
            rows.append(
                evaluate_row(
                    f"{name}-pruned + LoRA",
                    m,
                    task,
                    sum(len(v) for v in keeps[name].values()),
                    lora_params(fit),
                    fit.lr,
                )
            )
            if name == plan.selectors[0]:  # only the exported model stays in memory
                fits[name], merged[name] = fit, m
    width = {l: ModelView(orig).ffn_width(l) for l in plan.layers}
    return Results(rows, keeps, fits, merged, width, cert, task)


def _reference_rows(orig, ref, ref_fit, against, task: PruneTask) -> list[dict]:
    """Rows 'original' and 'LoRA only' (the trained reference; or the --against model)."""
    return [
        evaluate_row("original", orig, task, None),
        evaluate_row(
            "LoRA only" if against is None else "reference (--against)",
            ref,
            task,
            None,
            lora_params(ref_fit) if ref_fit else 0,
            ref_fit.lr if ref_fit else None,
        ),
    ]


def finish(loaded, r: PruneRecipe, plan: Plan, res: Results, run: Run, exports: Sequence[Export] = ()) -> Report:
    """Step f: report + plots + export of the main selector's model; reload check."""
    main = plan.selectors[0]
    md = markdown(r, plan, res.rows, res.keeps, res.width, run, loaded.name, res.task, res.cna_certified)
    results = {
        "rows": res.rows,
        "kept": {s: {l: len(v) for l, v in k.items()} for s, k in res.keeps.items()},
        "kept_indices": res.keeps[main],
        "lora_layer": plan.lora_layer,
        "layers": plan.layers,
        "cna_certified_fraction": res.cna_certified,
        "lr": {s: f.lr for s, f in res.fits.items()},
        "val_acc": {s: f.val_acc for s, f in res.fits.items()},
        "steps_seconds": run.seconds,
        "data": res.task.sizes(),
    }
    data = make("prune", loaded.describe(), to_dict(r), results, run.elapsed())
    remote_code = r.layout == "sliced" and needs_modeling(res.merged[main])
    label = res.task.labels[res.task.headline]
    closing = shown(res.rows, main, res.task.headline, label, run.out, r.layout, remote_code)
    extra = {
        "report.json": json_text(data),
        "report.md": md + "\n\n" + closing + "\n",
        **plots(res.rows, res.keeps[main], res.width, res.task.headline, res.task.labels[res.task.headline]),
    }
    with run.step("export"):
        check = export_checkpoint(
            res.fits[main],
            res.merged[main],
            loaded.tokenizer,
            run.out,
            run.force,
            r,
            plan,
            res.keeps[main],
            loaded.source,
            extra,
            exports,
        )
    if not check["widths_match"] or check["max_logit_diff"] > 1e-3:
        raise RuntimeError(f"exported checkpoint does not match the in-memory model: {check}")
    data["results"]["reload"] = check
    md += f"\n\nReloaded with transformers: widths match kept counts, max |logit diff| {check['max_logit_diff']:.2e}"
    md += "\n\n" + closing
    return Report(data, md, [run.out])


def _apart(a: dict, b: dict) -> str:
    """How full-answer accuracy a compares with b: higher / lower with the 95% intervals apart, or overlapping."""
    (alo, ahi), (blo, bhi) = a["full_answer_ci95"], b["full_answer_ci95"]
    if alo > bhi:
        return "higher, 95% intervals apart"
    if ahi < blo:
        return "lower, 95% intervals apart"
    return "not distinguishable (95% intervals overlap)"


def _pct_ci(acc: dict) -> str:
    value, interval = ci_text(acc).split(" ", 1)
    return f"{value}% {interval}"


def shown(
    rows: list[dict], main: str, headline: str, label: str, out, layout: str, remote_code: bool | None = None
) -> str:
    """The closing lines: what the run showed (the pruned model against the original and against each other
    selector at the same budget, on the held-out problems) and where the checkpoint is (`remote_code`: whether
    it carries its modeling file; None: look in `out`)."""
    by_name = {row["name"]: row for row in rows}
    pruned = by_name.get(f"{main}-pruned + LoRA")
    if pruned is None:
        return f"Checkpoint: `{out}` ({layout} layout)"
    lines = ["## What this run shows", ""]
    n = pruned[headline]["n_problems"]
    if "original" in by_name:
        original = by_name["original"][headline]
        lines.append(
            f"- {main}-pruned + LoRA: {_pct_ci(pruned[headline])} full-answer accuracy on {n} held-out {label} "
            f"problems; the original model: {_pct_ci(original)}. "
            f"The pruned model is {_apart(pruned[headline], original)}."
        )
    for name, row in by_name.items():
        if name.endswith("-pruned + LoRA") and name != f"{main}-pruned + LoRA":
            lines.append(
                f"- {name} at the same budget (control): {_pct_ci(row[headline])}; {main} is "
                f"{_apart(pruned[headline], row[headline])}."
            )
    remote_code = (Path(out) / MODELING).is_file() if remote_code is None else remote_code
    trust = ", trust_remote_code=True" if remote_code else ""
    lines.append(
        f"- The pruned checkpoint is `{out}` ({layout} layout): "
        f"`pipeline('text-generation', model='{out}'{trust})`; `surgery inspect {out}` verifies it."
    )
    return "\n".join(lines)
