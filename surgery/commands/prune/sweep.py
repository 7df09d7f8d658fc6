"""`surgery prune --sweep 50%,25%,10%,5%` and `surgery prune --keep auto --max-drop D`: many budgets from one set
of scores, in one resumable folder.

Every selector's scores are computed once (`pruning.select`) and saved; each (budget, selector) CELL then slices
the original, trains a fresh recovery LoRA, evaluates it, times the sliced model against the dense one, saves its
adapter and appends one JSON line to cells.jsonl the moment it finishes. Rerunning the same command with the same
--out reads the folder and runs only the missing cells (a killed cell resumes its training from the state it
saves every 100 steps); a folder
made by another recipe is refused, naming the differing keys. What may change between runs without a refusal: the
budget list, the baselines and the search settings (they only add cells).

Several processes may work on one folder at once (the same command started again with the same --out, e.g. one
per core with OMP_NUM_THREADS=1 on a CPU): the first trains the reference and computes the scores while the others
wait for it (a lock on state/), then each takes the next cell no other process holds (one lock file per cell;
a lock dies with its process, so a killed worker's cell is free again) and every process returns only when all of
its cells are finished, by it or by another. Locks are POSIX `fcntl` locks on the local file system; where
`fcntl` is missing (Windows) they are no-ops and a folder takes one process at a time.

The budget search bisects the kept percentage of the main selector on the validation split: a probe passes when
its recovered validation accuracy is at most D points below the reference's (the unpruned LoRA model; `--against
original`: the original model's); the smallest passing probe is re-assembled from its saved adapter and exported.

Folder:
    sweep.json                  what made it (the resume key): the recipe less the keys above, model, dtype, --against
    state/reference/            the reference LoRA adapter (reference-fit.json: its lr and size); reference.json
                                its and the original's evaluation rows
    state/scores.pt             every selector's scores, CNA's per-case ranking, bias-compensation means
    state/cells/<cell>/         a running cell's training state (adapter, AdamW, scheduler, RNG); removed when it ends
    cells.jsonl                 one finished cell per line (metrics, kept indices, latency)
    cells/<budget>-<selector>/  that cell's recovery adapter
    locks/                      the lock files of concurrent workers (empty files; safe to delete when none runs)
    report.md, report.json, sweep.png   rewritten after every cell
    checkpoint/                 (--keep auto) the exported model
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from peft import PeftModel
from torch import nn

from surgery.edits.lora import Fit, fit_lora, load_against, merged_copy
from surgery.edits.pruning import (
    Keep,
    Plan,
    PruneRecipe,
    PruneTask,
    Selection,
    TaskCases,
    ci_text,
    evaluate_row,
    export_checkpoint,
    keeps_for,
    lora_params,
    make_plan,
    make_task,
    parse_keep,
    prune_and_train,
    results_table,
    select,
    sliced_copy,
    token_means,
)
from surgery.errors import UsageError
from surgery.io.context import Run
from surgery.io.deploy import Export, check_planned
from surgery.io.loading import load_model
from surgery.io.recipe import to_dict
from surgery.io.report import Report, git_commit, json_text, make, md_table, png_bytes, write_json, write_text_atomic
from surgery.io.state import read_sweep
from surgery.model.arch import ModelView
from surgery.model.batching import left_pad, pad_id

try:
    import fcntl
except ImportError:  # Windows: no POSIX locks; one process per folder
    fcntl = None

VARIES = ("keep", "baselines", "description", "search")  # recipe keys a resumed folder may change
MISSING = object()


# ---- the budget list ---------------------------------------------------------------------------------------
def parse_budgets(text: str) -> list[str]:
    """'50%,25%,top500' -> ['50%', '25%', 'top500']: each a valid keep spec, none twice, at least one."""
    items = [s.strip().lower() for s in str(text).split(",")]
    if not any(items):
        raise UsageError("--sweep is empty; give budgets like 50%,25%,10%,5% or top500,top100")
    out: list[str] = []
    for s in items:
        if not s:
            raise UsageError(f"--sweep {text!r} has an empty budget; separate budgets with single commas")
        try:
            kind, value = parse_keep(s)
        except UsageError:
            raise UsageError(f"--sweep budget {s!r} is not topN or P% (e.g. 25% or top500)") from None
        if (kind == "top" and value < 1) or (kind == "pct" and not 0 < value <= 100):
            raise UsageError(f"--sweep budget {s}: use top1 or more, or a percentage in (0, 100]")
        canon = f"top{int(value)}" if kind == "top" else f"{value:g}%"
        if canon in out:
            raise UsageError(f"--sweep lists {canon} twice; give each budget once")
        out.append(canon)
    return out


# ---- the folder: resume key, refusal, cells ------------------------------------------------------------------
def fingerprint(r: PruneRecipe, model: str, dtype: str, against: str | None) -> dict:
    """The flat settings a folder's cells depend on (dotted keys): the recipe less VARIES, the model, the dtype
    and the CNA reference."""
    flat = _flat({k: v for k, v in to_dict(r).items() if k not in VARIES})
    return {**flat, "model": model, "dtype": dtype, "against": against or ""}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_folder(out: Path, fp: dict, force: bool) -> bool:
    """Whether `out` is a sweep folder of this same fingerprint to resume (False: a new folder). A folder of another
    recipe, or a non-empty folder that is no sweep, is refused without --force. Writes nothing."""
    meta = out / "sweep.json"
    if force or not out.exists():
        return False
    if not meta.exists():
        if any(p.name != "locks" for p in out.iterdir()):  # locks/: a worker's, before the resume key
            raise UsageError(f"{out} exists and is not a prune sweep folder; choose another --out or pass --force")
        return False
    old = read_sweep(meta)
    defaults = fingerprint(PruneRecipe(), fp["model"], fp["dtype"], None)
    differ = [
        k
        for k in sorted(set(old) | set(fp))
        if old.get(k, MISSING) != fp.get(k, MISSING) and not (k not in old and fp.get(k) == defaults.get(k))
    ]  # a key added since, at its default
    if differ:
        shown = ", ".join(f"{k} ({old.get(k, 'unset')!r} there, {fp.get(k, 'unset')!r} now)" for k in differ[:4])
        more = f" and {len(differ) - 4} more" if len(differ) > 4 else ""
        raise UsageError(
            f"{out} holds a sweep of another recipe: {shown}{more}; use another --out, or --force to start over"
        )
    return True


def start_folder(out: Path, fp: dict, force: bool, resuming: bool) -> None:
    """Create (or, with --force, recreate) the folder and its resume key (written first: a second worker that looks
    at a folder being created sees a sweep folder, never an unknown non-empty one)."""
    if force and out.exists() and not resuming:
        shutil.rmtree(out)
    if not (out / "sweep.json").exists():
        write_json(out / "sweep.json", {"fingerprint": fp})
    (out / "state").mkdir(parents=True, exist_ok=True)


@contextmanager
def folder_lock(out: Path, name: str, wait: bool = True) -> Iterator[bool]:
    """An exclusive lock `name` on the folder, shared by every process working on it; yields whether it is held
    (wait=False: False at once when another live process holds it). Released on exit or when the process dies."""
    if fcntl is None:
        yield True
        return
    path = out / "locks" / f"{re.sub(r'[^A-Za-z0-9._-]', '_', name)}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cell_key(budget: str, selector: str) -> str:
    return f"{budget}|{selector}"


def read_cells(out: Path) -> dict[str, dict]:
    """The finished cells, by key; a last line cut by a kill is ignored (its cell runs again)."""
    path, cells = out / "cells.jsonl", {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            cells[cell_key(rec["budget"], rec["selector"])] = rec
    return cells


def append_cell(out: Path, rec: dict) -> None:
    """One line, flushed to disk: after this the cell counts as done (appends of concurrent workers take turns).
    The line records the git commit the cell ran on."""
    path = out / "cells.jsonl"
    text = json.dumps({**rec, "commit": rec.get("commit") or git_commit() or "unknown"}, default=_plain) + "\n"
    with folder_lock(out, "cells.jsonl"):
        if path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
            text = "\n" + text  # a line cut by a kill stays unparseable on its own line
        with open(path, "a") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def _plain(x):
    return x.tolist() if hasattr(x, "tolist") else str(x)


def adapter_dir(out: Path, budget: str, selector: str) -> Path:
    return out / "cells" / re.sub(r"[^A-Za-z0-9._-]", "_", f"{budget}-{selector}")


# ---- timing -----------------------------------------------------------------------------------------------
def matmul_params(model: nn.Module) -> int:
    """Weights every token multiplies through (linear / Conv1D layers incl. the LM head; not embeddings): the
    forward FLOPs per token are about twice this, so a ratio of two models is their FLOP ratio."""
    return sum(
        m.weight.numel()
        for m in model.modules()
        if isinstance(getattr(m, "weight", None), torch.Tensor)
        and not isinstance(m, nn.Embedding)
        and m.weight.dim() == 2
    )


@torch.no_grad()
def latency(dense: nn.Module, sliced: nn.Module, seqs: list[list[int]], pad: int, repeats: int = 5) -> dict:
    """Forward time of one batch, dense and sliced interleaved `repeats` times (medians), and the FLOP ratio."""
    ids, mask = left_pad(seqs, pad)
    dev = next(dense.parameters()).device
    ids, mask = ids.to(dev), mask.to(dev)
    times: dict[str, list[float]] = {"dense": [], "sliced": []}
    for i in range(repeats + 1):  # the first round warms up and is dropped
        for name, m in (("dense", dense), ("sliced", sliced)):
            t0 = time.perf_counter()
            m(input_ids=ids, attention_mask=mask)
            if i:
                times[name].append(time.perf_counter() - t0)
    d, s = statistics.median(times["dense"]), statistics.median(times["sliced"])
    return {
        "dense_s": round(d, 5),
        "sliced_s": round(s, 5),
        "speedup": round(d / s, 3),
        "flop_ratio": round(matmul_params(sliced) / matmul_params(dense), 4),
        "batch": list(ids.shape),
        "repeats": repeats,
    }


# ---- the shared state of a folder ----------------------------------------------------------------------------
@dataclass
class Sweep:
    """Everything cells share: the loaded model, data, reference, scores and the folder."""

    loaded: object
    r: PruneRecipe
    plan: Plan  # layers and LoRA layer (its keep fields are unused)
    out: Path
    task: PruneTask
    ref_rows: list[dict]
    sel: Selection
    teacher: nn.Module | None
    means: dict[int, torch.Tensor] | None
    cells: dict[str, dict]
    run: Run

    @property
    def deep_total(self) -> int:
        view = ModelView(self.loaded.model)
        return sum(view.ffn_width(l) for l in self.plan.layers)


def prepare(
    loaded, r: PruneRecipe, plan: Plan, out: Path, against: str | None, top_k: int, run: Run, trust_remote_code: bool
) -> Sweep:
    """Data, the reference (trained once and saved, or loaded from the folder), every selector's scores (computed
    once and saved) and the bias-compensation means."""
    orig, tok = loaded.model, loaded.tokenizer
    with run.step("data"):
        task = make_task(r, tok)
    with folder_lock(out, "state"):  # a second worker waits here, then loads what the first saved
        ref, ref_rows = reference(loaded, r, plan, task, out, against, run, trust_remote_code)
        sel, means = scores(orig, ref, tok, task.cases, r, plan, top_k, out, run)
    return Sweep(
        loaded, r, plan, out, task, ref_rows, sel, ref if r.train.distill > 0 else None, means, read_cells(out), run
    )


def reference(
    loaded,
    r: PruneRecipe,
    plan: Plan,
    task: PruneTask,
    out: Path,
    against: str | None,
    run: Run,
    trust_remote_code: bool,
) -> tuple[nn.Module, list[dict]]:
    """The CNA reference and teacher: the saved adapter of an earlier run of this folder, else `--against`, else a
    LoRA trained now (and saved). Rows 'original' and 'LoRA only' (with validation accuracy) are saved beside it."""
    orig, tok = loaded.model, loaded.tokenizer
    folder, rows_file = out / "state" / "reference", out / "state" / "reference.json"
    fit_file = out / "state" / "reference-fit.json"
    with run.step("reference LoRA" if against is None else "reference (--against)"):
        if against is not None:
            ref = load_against(against, loaded, trust_remote_code)
        elif (folder / "adapter_config.json").exists():
            ref = load_against(folder, loaded)
        else:
            fit = fit_lora(orig, tok, plan.lora_layer, r.lora, r.train, task.train, task.validate)
            ref = merged_copy(fit.model)
            _save_adapter(fit.model, folder)
            write_json(
                fit_file,
                {
                    "lr": fit.lr,
                    "lora_params": lora_params(fit),
                    "val_acc": fit.val_acc,
                    "seconds": round(fit.seconds, 1),
                },
            )
    if rows_file.exists():
        return ref, json.loads(rows_file.read_text())
    fit = json.loads(fit_file.read_text()) if against is None and fit_file.exists() else {"lr": None, "lora_params": 0}
    with run.step("evaluate original + reference"):
        rows = [
            evaluate_row("original", orig, task, None, sets=list(task.sets)),
            evaluate_row(
                "LoRA only" if against is None else "reference (--against)",
                ref,
                task,
                None,
                fit["lora_params"],
                fit["lr"],
                sets=list(task.sets),
            ),
        ]
    write_json(rows_file, rows)
    return ref, rows


def _save_adapter(peft_model, folder: Path) -> None:
    """Save a PEFT adapter via a temp folder + rename, so a folder that exists is complete."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(str(tmp))
    shutil.rmtree(folder, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(folder)


def scores(
    orig, ref, tok, task: TaskCases, r: PruneRecipe, plan: Plan, top_k: int, out: Path, run: Run
) -> tuple[Selection, dict | None]:
    """Every selector's scores (and CNA's per-case ranking at least `top_k` deep), from the folder when an earlier
    run computed them; selectors added since are scored now."""
    path = out / "state" / "scores.pt"
    saved = torch.load(path, weights_only=False) if path.exists() else None
    if saved is not None and (top_k <= saved["sel"].ranked or saved["sel"].case_top is None and not top_k):
        sel = saved["sel"]
        missing = [n for n in plan.selectors if n not in sel.scores]
        if missing:
            extra = select(orig, ref, tok, task, plan.layers, missing, r, 0, run.step)
            sel.scores.update(extra.scores)
            if extra.case_top is not None and sel.case_top is None:
                sel.case_top, sel.ranked, sel.certified = extra.case_top, extra.ranked, extra.certified
        sel.order = list(plan.selectors)
        means = saved["means"]
    else:
        sel = select(orig, ref, tok, task, plan.layers, plan.selectors, r, top_k, run.step)
        means = None
    if r.compensate and means is None:
        with run.step("means (bias compensation)"):
            means = token_means(orig, tok, task, plan.layers, r.compensate_at)
    tmp = path.with_name(".scores.pt.tmp")
    torch.save({"sel": sel, "means": means}, tmp)
    tmp.rename(path)
    return sel, means


# ---- one cell ---------------------------------------------------------------------------------------------
def cell(sw: Sweep, budget: str, name: str, keep: Keep, wait: bool = True) -> dict | None:
    """Slice, recover, evaluate and time one (budget, selector); saved and appended before it returns. A cell the
    folder already holds (finished by this or another process) is returned as saved. While another process works
    on it: wait for it (wait=True), or return None at once."""
    key = cell_key(budget, name)
    if key in sw.cells:
        return sw.cells[key]
    with folder_lock(sw.out, f"cell-{key}", wait) as held:
        if not held:
            return None
        sw.cells.update(read_cells(sw.out))
        if key in sw.cells:
            return sw.cells[key]
        return _train_cell(sw, budget, name, keep)


CELL_SAVE_STEPS = 100  # a cell's training saves its state every 100 steps: a killed cell resumes mid-training


def _train_cell(sw: Sweep, budget: str, name: str, keep: Keep) -> dict:
    key = cell_key(budget, name)
    orig, tok = sw.loaded.model, sw.loaded.tokenizer
    t0 = time.time()
    with sw.run.step(f"cell {budget} {name}"):
        state = cell_state_dir(sw.out, key)
        _, fit = prune_and_train(orig, tok, keep, sw.r, sw.plan, sw.task, sw.teacher, sw.means, state, CELL_SAVE_STEPS)
        m = merged_copy(fit.model)
        kept = sum(len(v) for v in keep.values())
        row = evaluate_row(f"{name}-pruned + LoRA", m, sw.task, kept, lora_params(fit), fit.lr, list(sw.task.sets))
        row["latency"] = latency(orig, m, sw.task.cases.seqs[:16], pad_id(tok))
        _save_adapter(fit.model, adapter_dir(sw.out, budget, name))
    rec = {
        "budget": budget,
        "selector": name,
        "kept_fraction": kept / sw.deep_total,
        **row,
        "seconds": round(time.time() - t0, 1),
        "keep": {str(l): v for l, v in keep.items()},
    }
    append_cell(sw.out, rec)
    shutil.rmtree(state, ignore_errors=True)
    sw.cells[key] = rec
    return rec


def cell_state_dir(out: Path, key: str) -> Path:
    """Where a cell's recovery training saves its state while it runs (removed once the cell is written)."""
    return out / "state" / "cells" / key


def run_sweep(sw: Sweep, budgets: list[str]) -> None:
    """Every budget x selector, each written as it finishes; the report is rewritten after every cell. Cells another
    process holds are passed over, then waited for at the end (and trained here if that process died)."""
    keeps = {b: keeps_for(sw.sel, *parse_keep(b), sw.plan.uniform) for b in budgets}
    busy = []
    for budget in budgets:
        for name in sw.plan.selectors:
            if cell(sw, budget, name, keeps[budget][name], wait=False) is None:
                busy.append((budget, name))
            else:
                write_report(sw, budgets, None)
    for budget, name in busy:
        cell(sw, budget, name, keeps[budget][name])
        write_report(sw, budgets, None)


# ---- the budget search -------------------------------------------------------------------------------------
def search(sw: Sweep, max_drop: float, against: str, steps: int) -> dict:
    """Bisect the kept percentage (0, 100] of the main selector: a probe passes when its validation accuracy is
    at least the reference's (`against` = reference: the unpruned LoRA model; original: the original model) minus
    `max_drop` points. Returns the path and the smallest passing probe (None if none passed)."""
    base = sw.ref_rows[0 if against == "original" else 1]["validation"]["full_answer_acc"]
    target = base - max_drop / 100
    lo, hi, path, best = 0.0, 100.0, [], None
    main = sw.plan.selectors[0]
    for _ in range(steps):
        mid = round((lo + hi) / 2, 2)
        budget = f"{mid:g}%"
        rec = cell(sw, budget, main, keeps_for(sw.sel, "pct", mid, sw.plan.uniform)[main])
        acc = rec["validation"]["full_answer_acc"]
        ok = acc >= target - 1e-12
        path.append({"budget": budget, "kept": rec["kept"], "val_acc": acc, "passed": ok})
        if ok:
            hi, best = mid, rec
        else:
            lo = mid
        write_report(
            sw,
            [],
            {
                "path": path,
                "target": target,
                "against": against,
                "max_drop": max_drop,
                "best": None,
                "running": f"{len(path)} of {steps} probes done",
            },
        )
    return {
        "path": path,
        "target": target,
        "base": base,
        "against": against,
        "max_drop": max_drop,
        "best": best and {k: best[k] for k in ("budget", "selector", "kept", "kept_fraction")},
    }


def rebuild(sw: Sweep, rec: dict) -> tuple[Fit, nn.Module, Keep]:
    """A finished cell's model again: slice the original with its keep set (bias-compensated as trained), load its
    saved adapter: the same weights as when it was evaluated."""
    keep = {int(l): v for l, v in rec["keep"].items()}
    sliced = sliced_copy(sw.loaded.model, keep, sw.means, sw.plan.multiple)
    pm = PeftModel.from_pretrained(sliced, str(adapter_dir(sw.out, rec["budget"], rec["selector"])))
    fit = Fit(pm, rec["lr"], {}, [], 0.0)
    return fit, merged_copy(pm), keep


# ---- report ------------------------------------------------------------------------------------------------
def sweep_table(rows: list[dict], deep_total: int, labels: dict[str, str]) -> str:
    """One row per cell, widest budget first: every held-out set with its 95% interval, params, latency."""
    names = [n for n in labels if any(r.get(n) for r in rows)]
    out = []
    for r in sorted(rows, key=lambda r: (-r["kept_fraction"], r["selector"])):
        lat = r["latency"]
        out.append(
            [
                r["budget"],
                f"{r['kept']} ({100 * r['kept'] / deep_total:.1f}%)",
                r["selector"],
                *(ci_text(r[n]) if r.get(n) else "-" for n in names),
                f"{r['params']:,}",
                f"{lat['speedup']:.2f}x",
                f"{lat['flop_ratio']:.2f}",
                f"{r['seconds']:.0f}",
            ]
        )
    return md_table(
        [
            "budget",
            "kept",
            "selector",
            *(f"{labels[n]} % [95% CI]" for n in names),
            "params",
            "measured speedup",
            "FLOP ratio",
            "seconds",
        ],
        out,
    )


def verdict(ref_rows: list[dict], rows: list[dict], key: str) -> list[str]:
    """Plain statements the table supports, on held-out set `key`: the largest cut at which some pruned model
    matches the original, and at that cut how CNA compares with each other selector (95% intervals apart or
    overlapping)."""
    orig = ref_rows[0][key]["full_answer_acc"]
    by_budget: dict[str, list[dict]] = {}
    for r in rows:
        by_budget.setdefault(r["budget"], []).append(r)
    ok = [b for b, rs in by_budget.items() if any(r[key]["full_answer_acc"] >= orig for r in rs)]
    if not ok:
        return [f"No pruned + recovered model reaches the original's accuracy ({100 * orig:.1f}%) at any budget run."]
    b = min(ok, key=lambda b: by_budget[b][0]["kept_fraction"])
    rs = by_budget[b]
    best = max(rs, key=lambda r: r[key]["full_answer_acc"])
    lines = [
        f"Largest cut with a pruned + recovered model at or above the original ({100 * orig:.1f}%): **{b}** "
        f"kept ({100 * (1 - rs[0]['kept_fraction']):.1f}% of the pruned layers' FFN removed); best there: "
        f"{best['selector']} {ci_text(best[key])}."
    ]
    cna = next((r for r in rs if r["selector"] == "cna"), None)
    for r in rs if cna is not None else []:
        if r is not cna:
            a, o = cna[key]["full_answer_ci95"], r[key]["full_answer_ci95"]
            rel = (
                "ahead (intervals apart)"
                if a[0] > o[1]
                else "behind (intervals apart)"
                if a[1] < o[0]
                else "level (intervals overlap)"
            )
            lines.append(f"At {b}, CNA vs {r['selector']}: {rel}, {ci_text(cna[key])} vs {ci_text(r[key])}.")
    return lines


def plot(ref_rows: list[dict], rows: list[dict], key: str, label: str) -> bytes:
    """2-digit test accuracy against the kept fraction of the deep FFN, one line per selector, 95% CIs; the
    original and the unpruned LoRA model as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name in sorted({r["selector"] for r in rows}):
        rs = sorted((r for r in rows if r["selector"] == name), key=lambda r: r["kept_fraction"])
        x = [100 * r["kept_fraction"] for r in rs]
        y = [100 * r[key]["full_answer_acc"] for r in rs]
        lo = [v - 100 * r[key]["full_answer_ci95"][0] for v, r in zip(y, rs)]
        hi = [100 * r[key]["full_answer_ci95"][1] - v for v, r in zip(y, rs)]
        ax.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=3, label=name)
    for row, style in zip(ref_rows, ("--", ":")):
        ax.axhline(100 * row[key]["full_answer_acc"], color="gray", linestyle=style, label=row["name"])
    ax.set_xscale("log")
    ticks = sorted({100 * r["kept_fraction"] for r in rows})
    ax.set_xticks(ticks, [f"{t:.3g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("kept fraction of the pruned layers' FFN neurons (%)")
    ax.set_ylabel(f"{label} accuracy % (95% CI)")
    ax.legend(fontsize=8)
    return png_bytes(fig, dpi=100)


def markdown(sw: Sweep, budgets: list[str], found: dict | None) -> str:
    rows = list(sw.cells.values())
    r, plan = sw.r, sw.plan
    parts = [
        f"# prune {'sweep' if found is None else 'budget search'}: {sw.loaded.name}, recipe {r.name}",
        f"`{sw.run.command}`",
        f"layers {plan.layers[0]}-{plan.layers[-1]} ({sw.deep_total} FFN neurons), selectors "
        f"{', '.join(plan.selectors)} (the first sets every other's per-layer budget), LoRA at layer "
        f"{plan.lora_layer} (rank {r.lora.rank}, lr from {r.train.lrs}, max_steps {r.train.max_steps}), "
        f"distill {r.train.distill}, compensate {r.compensate}, lora.ffn {r.lora.ffn}",
        "## Unpruned",
        results_table(sw.ref_rows, sw.deep_total, sw.task.labels),
    ]
    if found is not None:
        parts += [
            f"## Budget search (--max-drop {found['max_drop']} against the {found['against']}: validation "
            f"accuracy >= {100 * found['target']:.1f}%)",
            md_table(
                ["probe", "budget", "kept", "validation acc %", "passed"],
                [
                    [i + 1, p["budget"], p["kept"], f"{100 * p['val_acc']:.1f}", "yes" if p["passed"] else "no"]
                    for i, p in enumerate(found["path"])
                ],
            ),
            (
                f"Searching: {found['running']}; nothing exported yet."
                if found.get("running")
                else f"Found: **{found['best']['budget']}** ({found['best']['kept']} neurons kept); exported to "
                f"`{sw.out / 'checkpoint'}`."
                if found.get("best")
                else "No probe passed: nothing exported (the cut the model can afford is above the largest probe, or "
                "recovery is too short)."
            ),
        ]
    if rows:
        parts += [
            "## Cells (full-answer accuracy; speedup = dense / sliced forward time of one batch, measured "
            "interleaved in the cell)",
            sweep_table(rows, sw.deep_total, sw.task.labels),
        ]
        parts += [
            "![accuracy against the kept fraction](sweep.png)",
            "## Verdict",
            "\n".join(f"- {v}" for v in verdict(sw.ref_rows, rows, sw.task.headline)),
        ]
        done = sum(1 for b in budgets for n in plan.selectors if cell_key(b, n) in sw.cells)
        if budgets:
            parts.append(f"{done} of {len(budgets) * len(plan.selectors)} cells of this sweep finished.")
    if sw.sel.certified is not None:
        parts.append(f"CNA: {100 * sw.sel.certified:.0f}% of cases have a certified exact top-{sw.sel.ranked}.")
    parts += ["## Timing (this run)", md_table(["step", "seconds"], list(sw.run.seconds.items()))]
    return "\n\n".join(parts)


def write_report(sw: Sweep, budgets: list[str], found: dict | None) -> dict:
    """report.json, report.md and sweep.png from every cell the folder holds (other workers' too)."""
    with folder_lock(sw.out, "report"):
        sw.cells.update(read_cells(sw.out))
        return _write_report(sw, budgets, found)


def _write_report(sw: Sweep, budgets: list[str], found: dict | None) -> dict:
    rows = list(sw.cells.values())
    data = make(
        "prune",
        sw.loaded.describe(),
        to_dict(sw.r),
        {
            "reference_rows": sw.ref_rows,
            "cells": [{k: v for k, v in c.items() if k != "keep"} for c in rows],
            "budgets": budgets,
            "search": found,
            "layers": sw.plan.layers,
            "lora_layer": sw.plan.lora_layer,
            "selectors": sw.plan.selectors,
            "cna_certified_fraction": sw.sel.certified,
            "verdict": verdict(sw.ref_rows, rows, sw.task.headline) if rows else [],
            "steps_seconds": sw.run.seconds,
        },
        sw.run.elapsed(),
    )
    md = markdown(sw, budgets, found)
    write_text_atomic(sw.out / "report.json", json_text(data))
    write_text_atomic(sw.out / "report.md", md + "\n")
    if rows:
        png = plot(sw.ref_rows, rows, sw.task.headline, sw.task.labels[sw.task.headline])
        tmp = sw.out / ".sweep.png.tmp"
        tmp.write_bytes(png)
        tmp.rename(sw.out / "sweep.png")
    return data


# ---- the command mode ----------------------------------------------------------------------------------------
def run(
    loaded_args: dict,
    r: PruneRecipe,
    out: str | None,
    force: bool,
    budgets: list[str] | None,
    against: str | None,
    trust_remote_code: bool,
    exports: Sequence[Export] = (),
) -> Report:
    """`--sweep` (budgets given) or `--keep auto` (budgets None): see the module docstring."""
    model = loaded_args["model"]
    run = Run("prune", out, force, default=f"prune-{Path(model).name}-{'sweep' if budgets else 'auto'}", fresh=False)
    if budgets is None and r.data.validation_size <= 0:
        raise UsageError(
            "--keep auto needs a validation split to choose the budget on, and this recipe has none; "
            "--set data.validation_size=400"
        )
    fp = fingerprint(r, model, loaded_args["dtype"], against)
    resuming = check_folder(run.out, fp, force)
    top_k = max([int(v) for k, v in map(parse_keep, budgets or []) if k == "top"], default=0)
    with run.step("load"):
        loaded = load_model(model, loaded_args["dtype"], loaded_args["device"], trust_remote_code=trust_remote_code)
        plan = make_plan(dataclasses.replace(r, keep=(budgets or ["50%"])[0]), loaded.model)
        for b in budgets or []:
            make_plan(dataclasses.replace(r, keep=b), loaded.model)  # every budget fits the model
        check_planned(loaded.model, list(exports), per_layer=not plan.uniform, multiple=plan.multiple)
    start_folder(run.out, fp, force, resuming)
    sw = prepare(loaded, r, plan, run.out, against, top_k, run, trust_remote_code)
    if budgets is not None:
        run_sweep(sw, budgets)
        data = write_report(sw, budgets, None)
        return Report(data, markdown(sw, budgets, None), [run.out])
    found = search(sw, r.search.max_drop, r.search.against, r.search.steps)
    if found["best"] is not None:
        with run.step("export"):
            rec = sw.cells[cell_key(found["best"]["budget"], found["best"]["selector"])]
            fit, merged, keep = rebuild(sw, rec)
            rr = dataclasses.replace(r, keep=rec["budget"])
            check = export_checkpoint(
                fit, merged, loaded.tokenizer, run.out / "checkpoint", True, rr, plan, keep, loaded.source, {}, exports
            )
        if not check["widths_match"] or check["max_logit_diff"] > 1e-3:
            raise RuntimeError(f"exported checkpoint does not match the evaluated model: {check}")
        found["reload"] = check
    data = write_report(sw, [], found)
    return Report(data, markdown(sw, [], found), [run.out])
