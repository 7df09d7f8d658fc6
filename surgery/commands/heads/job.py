"""`surgery heads`: which attention heads a task needs, by ablation (accuracy drop per head, the paper's Tables
1-3) or by path patching (Zhang et al.'s relative logit effect). The engines are surgery/find/head_scan.py and
surgery/find/path_patch.py; this module runs them on a loaded model and writes heads.json / heads.md / heads.png.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np
from torch import Tensor

from surgery.errors import UsageError
from surgery.evals import arithmetic, tasks
from surgery.find import head_scan as H
from surgery.find.head_scan import (
    Head,
    attribution,
    head_means,
    head_row,
    keys_of,
    load_partial,
    scan,
    spearman,
    summary,
)
from surgery.find.path_patch import COUNTERFACTUALS, NULL_WORD, THRESHOLD, effects, null_operator_pairs
from surgery.io import report as rep
from surgery.io.loading import load_model
from surgery.model.arch import ModelView
from surgery.model.batching import pad_id


def run(
    *,
    model: str,
    dtype: str,
    device: str,
    task: str,
    digits: Sequence[int],
    ops: Sequence[str] | None,
    templates: Sequence[str] | None,
    limit: int | None,
    batch_size: int,
    seed: int,
    out: str | None,
    ablation: str,
    mode: str,
    verify: int,
    only_heads: Sequence[Head] | None,
    trust_remote_code: bool,
    method: str,
    counterfactual: str,
    data: str | None,
    columns: str | None,
    max_memory: dict | None = None,
) -> rep.Report:
    """`surgery heads` (its options and help: this package's __init__.py)."""
    from accelerate import PartialState

    if method == "path-patch" and data is not None:
        raise UsageError("--method path-patch needs the arithmetic task's null-operator counterfactual; drop --data")
    if method == "path-patch":
        return run_path_patch(
            model,
            dtype,
            device,
            digits,
            ops,
            templates,
            limit,
            seed,
            out,
            counterfactual,
            only_heads,
            trust_remote_code,
            max_memory,
        )
    if method != "ablation":
        raise UsageError(f"unknown --method {method!r}; use ablation or path-patch")

    t0 = time.time()
    tasks.check_data_args(data, None, columns)
    user = tasks.load_cases(data, columns) if data is not None else None
    if user is not None and limit is not None:
        user = user.select(range(min(max(limit, 1), len(user))))
    _check_options("arithmetic" if user is not None else task, ablation, mode)
    outdir = rep.check_out_dir(out) or Path("checkpoints") / "heads"
    state = PartialState(cpu=device == "cpu")  # cpu: gloo process group across CPU processes
    per_rank_gpu = device == "cuda" and state.num_processes > 1  # one GPU per process under accelerate launch
    loaded = load_model(
        model, dtype, "cpu" if per_rank_gpu else device, trust_remote_code=trust_remote_code, max_memory=max_memory
    )
    if per_rank_gpu:
        loaded.model.to(state.device)
    view = ModelView(loaded.model)
    heads = H.heads_of(view, only_heads)
    if mode == "screen" and verify > len(heads):
        raise UsageError(f"--verify {verify} is more than the {len(heads)} heads scanned; use at most {len(heads)}")
    if user is not None:
        labels, batches = H.user_batches(loaded, user, batch_size)
    else:
        labels, batches = H.arithmetic_batches(loaded, digits, ops, templates, limit, seed, batch_size)
    config = dict(
        data=data,
        columns=columns,
        task=None if data else task,
        digits=list(digits),
        ops=sorted(set(labels["op"])),
        templates=list(templates or arithmetic.DEFAULT_TEMPLATES),
        limit=limit,
        seed=seed,
        ablation=ablation,
        mode=mode,
        verify=verify if mode == "screen" else None,
        batch_size=batch_size,
        n_cases=len(labels["op"]),
        processes=state.num_processes,
    )
    fp = H.fingerprint(loaded, config, heads)
    repl = head_means(view, batches) if ablation == "mean" else None
    screen = None
    if mode == "screen":
        screen = attribution(view, batches, repl)
        heads = sorted(heads, key=lambda lh: float(screen[lh]))[:verify]  # most negative first-order change first
    outdir.mkdir(parents=True, exist_ok=True)
    done = load_partial(outdir, fp)
    sink = H.partial_sink(outdir / f"heads.partial.r{state.process_index}.jsonl", fp)
    scan(
        view,
        batches,
        len(labels["op"]),
        heads,
        repl,
        done,
        sink,
        state.process_index,
        state.num_processes,
        progress=state.is_main_process,
    )
    state.wait_for_everyone()
    if not state.is_main_process:
        return rep.Report(data={})
    rows = load_partial(outdir, fp)
    return _report(loaded, view, labels, batches, heads, rows, screen, config, outdir, time.time() - t0)


def _check_options(task: str, ablation: str, mode: str) -> None:
    if task != "arithmetic":
        raise UsageError(f"surgery heads supports --task arithmetic, got {task!r}")
    if ablation not in ("zero", "mean"):
        raise UsageError(f"unknown --ablation {ablation!r}; use zero or mean")
    if mode not in ("exact", "screen"):
        raise UsageError(f"unknown --mode {mode!r}; use exact or screen")


def _report(loaded, view, labels, batches, heads, rows, screen, config, outdir, seconds) -> rep.Report:
    masks = keys_of(labels)
    base_ok, base_lp = H.baseline(view, batches, len(labels["op"]))
    base = summary(base_ok, base_lp, masks)
    table = [
        head_row(l, h, summary([c == "1" for c in rows[l, h]["correct"]], rows[l, h]["logprob"], masks), base)
        for l, h in sorted(heads)
        if (l, h) in rows
    ]
    results = {
        "baseline": {"acc": base["acc"], "n": base["n"], "logprob": round(base["logprob"], 6)},
        "heads": table,
        "shape": {"layers": view.n_layers, "heads": view.n_heads},
    }
    if screen is not None:
        results["screen"] = _screen_summary(screen, table)
    data = rep.make("heads", loaded.describe(), config, results, seconds)
    md = markdown(data)
    files = [rep.write_json(outdir / "heads.json", data), rep.write_text_atomic(outdir / "heads.md", md)]
    files.append(
        heatmap(
            results,
            outdir / "heads.png",
            title=f"{loaded.name}: accuracy drop per head ({config['ablation']} ablation)",
        )
    )
    return rep.Report(data=data, markdown=md, files=files)


def _screen_summary(screen: Tensor, table: list[dict]) -> dict:
    """Screen scores for every head (predicted drop of the mean target log-prob) and agreement on the verified set."""
    pred = {(r["layer"], r["head"]): -float(screen[r["layer"], r["head"]]) for r in table}
    keys = list(pred)
    ex = {(r["layer"], r["head"]): r for r in table}
    return {
        "predicted_logprob_drop_sum": [[round(-float(x), 6) for x in row] for row in screen],
        "verified": [f"{l}.{h}" for l, h in keys],
        "spearman_vs_exact_acc_drop": _r(spearman([pred[k] for k in keys], [ex[k]["drop"]["overall"] for k in keys])),
        "spearman_vs_exact_logprob_drop": _r(spearman([pred[k] for k in keys], [ex[k]["logprob_drop"] for k in keys])),
    }


def _r(x: float) -> float | None:
    return None if x != x else round(x, 4)


# ---- rendering ---------------------------------------------------------------------------------------------------
def _pts(x: float) -> str:
    return "n/a" if x != x else f"{100 * x:+.1f}"


def _name(r: dict) -> str:
    return f"{r['layer']}.{r['head']}"


def markdown(data: dict, top: int = 10) -> str:
    """The paper's tables: top heads x ops (Table 1), the top head per op and digit count (Table 2), memorize vs
    change-one (Table 3). Drops are in accuracy points (baseline - ablated)."""
    res, cfg = data["results"], data["config"]
    base, table = res["baseline"], sorted(res["heads"], key=lambda r: -r["drop"]["overall"])
    ops = [k for k in ("+", "-", "*", "/") if k in base["acc"]]
    groups = sorted(
        k
        for k in base["acc"]
        if k[:1].isdigit() or cfg.get("data") and k not in ("overall", "first-token", "later-token")
    )
    lines = [
        f"# Head scan: {data['model']['name']} ({cfg['ablation']} ablation, {cfg['mode']} mode)",
        "",
        f"{len(table)} heads scanned on {base['n']['overall']} answer-token cases "
        f"(digits {cfg['digits']}, templates {cfg['templates']}), {data['timing']['seconds']:.0f} s.",
        "",
        "Baseline accuracy: "
        + ", ".join(f"{k} {100 * base['acc'][k]:.1f}% (n={base['n'][k]})" for k in ["overall"] + ops),
        "",
    ]
    if not table:
        return "\n".join(lines + ["No heads scanned."])
    d = np.array([r["drop"]["overall"] for r in table])
    lines += [
        f"Drop distribution (points): max {100 * d.max():.1f}, >= 10: {int((d >= 0.1).sum())} heads, "
        f">= 2: {int((d >= 0.02).sum())}, < 2: {int((d < 0.02).sum())} of {len(d)}.",
        "",
        f"## Table 1: top {min(top, len(table))} heads, accuracy drop per operation (points)",
        "",
        rep.md_table(
            ["head", "overall"] + ops + ["acc overall"],
            [
                [_name(r), _pts(r["drop"]["overall"])]
                + [_pts(r["drop"][o]) for o in ops]
                + [f"{100 * r['acc']['overall']:.1f}%"]
                for r in table[:top]
            ],
        ),
        "",
        "## Table 2: most important head per operation and digit count",
        "",
        rep.md_table(
            ["group", "baseline", "head", "drop (points)", "n"],
            [
                [
                    g,
                    f"{100 * base['acc'][g]:.1f}%",
                    _name(w := max(table, key=lambda r: r["drop"][g])),
                    _pts(w["drop"][g]),
                    base["n"][g],
                ]
                for g in groups
            ],
        ),
        "",
    ]
    types = [t for t in ("memorize", "change-one") if t in base["acc"]]
    if types:
        lines += [
            "## Table 3: memorize vs change-one cases, top heads (drop in points)",
            "",
            rep.md_table(
                ["head"] + [f"{t} (n={base['n'][t]}, base {100 * base['acc'][t]:.1f}%)" for t in types],
                [[_name(r)] + [_pts(r["drop"][t]) for t in types] for r in table[:top]],
            ),
            "",
        ]
    if "screen" in res:
        s = res["screen"]
        lines += [
            "## Screen",
            "",
            f"Attribution screen over all heads; exact scan of the top {len(s['verified'])}. "
            f"Spearman(screen, exact) on them: accuracy drop {s['spearman_vs_exact_acc_drop']}, "
            f"target log-prob drop {s['spearman_vs_exact_logprob_drop']}. Every head named above has exact numbers.",
            "",
        ]
    return "\n".join(lines)


def heatmap(results: dict, path: Path, title: str = "") -> Path:
    """Layer x head heatmaps of the accuracy drop: overall, then one panel per op (unscanned heads blank)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L, H = results["shape"]["layers"], results["shape"]["heads"]
    keys = ["overall"] + [k for k in ("+", "-", "*", "/") if k in results["baseline"]["acc"]]
    fig, axes = plt.subplots(1, len(keys), figsize=(1.2 + 0.32 * H * len(keys), 1.2 + 0.2 * L), squeeze=False)
    vmax = max([100 * r["drop"][k] for r in results["heads"] for k in keys if r["drop"][k] == r["drop"][k]] + [1.0])
    for ax, k in zip(axes[0], keys):
        grid = np.full((L, H), np.nan)
        for r in results["heads"]:
            grid[r["layer"], r["head"]] = 100 * r["drop"][k]
        im = ax.imshow(grid, aspect="auto", cmap="RdBu_r", vmin=-vmax, vmax=vmax, origin="lower")
        ax.set_title(f"{k} (base {100 * results['baseline']['acc'][k]:.0f}%)", fontsize=9)
        ax.set_xlabel("head")
        ax.set_xticks(range(0, H, max(1, H // 8)))
    axes[0][0].set_ylabel("layer")
    fig.colorbar(im, ax=axes[0].tolist(), label="accuracy drop (points)", shrink=0.8)
    fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


# ---- path patching ----------------------------------------------------------------------------------------
def run_path_patch(
    model: str = "smollm2-135m",
    dtype: str = "float32",
    device: str = "cpu",
    digits: Sequence[int] = (2,),
    ops: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
    limit: int | None = None,
    seed: int = 0,
    out: str | None = None,
    counterfactual: str = "null-operator",
    only_heads=None,
    trust_remote_code: bool = False,
    max_memory: dict | None = None,
) -> rep.Report:
    """Path patching of every head (sender) to the logits with the null-operator counterfactual; writes
    DIR/heads.json (rows with the relative logit effect; config.method = path-patch, readable by
    `surgery finetune --components`), DIR/heads.md and DIR/heads.png."""
    t0 = time.time()
    if counterfactual not in COUNTERFACTUALS:
        raise UsageError(f"unknown --counterfactual {counterfactual!r}; use {', '.join(COUNTERFACTUALS)}")
    tmpl = tuple(templates or arithmetic.DEFAULT_TEMPLATES)
    outdir = rep.check_out_dir(out) or Path("checkpoints") / "heads-path-patch"
    kw = dict(ops=tuple(ops)) if ops else {}
    problems = arithmetic.build(digits=tuple(digits), templates=tmpl, seed=seed, limit=limit, **kw)
    loaded = load_model(model, dtype, device, trust_remote_code=trust_remote_code, max_memory=max_memory)
    view = ModelView(loaded.model)
    heads = None
    if only_heads:
        for l, h in only_heads:
            view.check_head(l, h)
        heads = list(only_heads)
    clean, cf, targets = null_operator_pairs(loaded.tokenizer, problems)
    eff, base = effects(view, clean, cf, targets, pad_id(loaded.tokenizer), heads)
    config = dict(
        method="path-patch",
        counterfactual=counterfactual,
        null_word=NULL_WORD,
        threshold=THRESHOLD,
        digits=list(digits),
        templates=list(tmpl),
        limit=limit,
        seed=seed,
        n_problems=len(clean),
        n_skipped=len(problems) - len(clean),
    )
    rows = [
        {"layer": l, "head": h, "effect": round(float(eff[l, h]), 6), "key": bool(eff[l, h] < THRESHOLD)}
        for l in range(view.n_layers)
        for h in range(view.n_heads)
        if eff[l, h] == eff[l, h]
    ]
    results = {
        "shape": {"layers": view.n_layers, "heads": view.n_heads},
        "heads": rows,
        "baseline": {"answer_logit_mean": round(float(base.mean()), 4)},
        "key_heads": [f"{r['layer']}.{r['head']}" for r in sorted(rows, key=lambda r: r["effect"]) if r["key"]],
    }
    data = rep.make("heads", loaded.describe(), config, results, time.time() - t0)
    md = path_patch_markdown(data)
    outdir.mkdir(parents=True, exist_ok=True)
    files = [rep.write_json(outdir / "heads.json", data), rep.write_text_atomic(outdir / "heads.md", md)]
    (outdir / "heads.png").write_bytes(path_patch_heatmap(eff, loaded.name))
    return rep.Report(data=data, markdown=md, files=files + [outdir / "heads.png"])


def path_patch_markdown(data: dict, top: int = 15) -> str:
    res, cfg = data["results"], data["config"]
    rows = sorted(res["heads"], key=lambda r: r["effect"])
    return "\n".join(
        [
            f"# Path patching: {data['model']['name']} (null-operator counterfactual, {cfg['n_problems']} problems, "
            f"{cfg['digits']}-digit, {cfg['n_skipped']} skipped)",
            "",
            f"Key heads (effect < {100 * cfg['threshold']:.0f}%): {len(res['key_heads'])} of {len(rows)}: "
            f"{', '.join(res['key_heads']) or 'none'}",
            "",
            rep.md_table(
                ["head", "relative logit effect %"],
                [[f"{r['layer']}.{r['head']}", f"{100 * r['effect']:+.2f}"] for r in rows[:top]],
            ),
        ]
    )


def path_patch_heatmap(eff: Tensor, name: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.5 + 0.35 * eff.shape[1], 1.2 + 0.18 * eff.shape[0]))
    v = float(np.nanmax(np.abs(100 * eff.numpy()))) or 1.0
    im = ax.imshow(100 * eff.numpy(), aspect="auto", cmap="RdBu", vmin=-v, vmax=v, origin="lower")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(f"{name}: path-patching effect (%)", fontsize=9)
    fig.colorbar(im, ax=ax)
    return rep.png_bytes(fig)
