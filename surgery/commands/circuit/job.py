"""`surgery circuit`: run the activation-patching circuit search (surgery/find/circuit.py) per operator in a
resumable folder, and write circuit.json / circuit.md / the effect and faithfulness plots."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from surgery.errors import UsageError
from surgery.evals import arithmetic
from surgery.find import patching as P
from surgery.find.circuit import (
    SCORES,
    TEMPLATES_OK,
    Cache,
    agreement,
    groups,
    measure_groups,
    nl,
    parse_operands,
    problems,
    sample,
    save_means,
    select,
    study_op,
)
from surgery.io import report as rep
from surgery.io.loading import load_model
from surgery.io.state import read_circuit_run
from surgery.model.arch import ModelView

# ---- resumable runs ---------------------------------------------------------------------------------------------
RUN_FILE = "circuit.run.json"  # the configuration of the run that owns the folder
STAGE_DIR = "stages"  # one JSON per finished stage: {op}.effects / .heads / .neurons / .union, agreement
MEANS_FILE = "means.pt"  # in STAGE_DIR: every layout's means and predictions (the means pass, read back on resume)


def resuming(outdir: Path, run_config: dict, force: bool) -> bool:
    """Whether --out holds an unfinished run of this very configuration (then it continues). A finished folder
    needs --force, a folder of another configuration is refused naming the keys that differ, before any
    model loads."""
    if force or not outdir.exists():
        return False
    if (outdir / "circuit.json").exists():
        raise UsageError(
            f"{outdir} already holds a finished circuit; pass --force to overwrite it or choose another --out"
        )
    runf = outdir / RUN_FILE
    if not runf.is_file():
        if any(outdir.iterdir()):
            raise UsageError(
                f"{outdir} already exists and is not a circuit run; pass --force to overwrite it or choose "
                "another --out"
            )
        return False
    saved = read_circuit_run(runf)
    diff = [k for k in sorted(set(saved) | set(run_config)) if saved.get(k) != run_config.get(k)]
    if diff:
        what = "; ".join(f"{k}: {saved.get(k)!r} there, {run_config.get(k)!r} now" for k in diff)
        raise UsageError(
            f"{outdir} holds an unfinished circuit run with another configuration ({what}); rerun with "
            "its options to resume it, or pass --force / another --out"
        )
    return True


def stage_cache(outdir: Path, prefix: str) -> Cache:
    """A `cache(name, compute)` that returns DIR/stages/PREFIX.NAME.json if a run finished it, else computes,
    writes it atomically and returns what was written (so a resumed run sees exactly what a fresh one does). Beside
    each stage, PREFIX.NAME.commit holds the git commit that computed it (`stage_commits`)."""

    def cache(name: str, fn: Callable[[], object]) -> object:
        f = outdir / STAGE_DIR / f"{prefix}.{name}.json"
        if f.is_file():
            return json.loads(f.read_text())
        val = json.loads(rep.json_text(fn()))
        rep.write_json(f, val)  # the stage first: a kill between the two never names an unfinished stage
        rep.write_text_atomic(f.with_suffix(".commit"), (rep.git_commit() or "unknown") + "\n")
        return val

    return cache


def _needed(r: dict) -> str:
    """Neurons per layer reaching the target F, or what the curve reached instead."""
    if r["neurons_per_layer_needed"] is not None:
        return str(r["neurons_per_layer_needed"])
    nc = r["neuron_curve"]
    best = max(range(len(nc["faithfulness"])), key=lambda i: nc["faithfulness"][i])
    return f"not reached (best F {nc['faithfulness'][best]:.2f} at {nc['per_layer'][best]})"


def stage_commits(outdir: Path) -> dict[str, str]:
    """Which git commit computed each finished stage ("unknown" outside a checkout; stages of older runs: none)."""
    return {f.stem: f.read_text().strip() for f in sorted((outdir / STAGE_DIR).glob("*.commit"))}


def _write_bytes(path: Path, data: bytes) -> None:
    """A binary file via a temp file + rename (a kill never leaves half a PNG)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def start(outdir: Path, run_config: dict, resume: bool) -> None:
    """A fresh run owns the folder: anything there (only with --force) is replaced; the configuration goes in."""
    if not resume:
        rep.recover_stale(outdir)
        if outdir.exists():
            shutil.rmtree(outdir)
        outdir.mkdir(parents=True)
        rep.write_json(outdir / RUN_FILE, run_config)


# ---- the command ----------------------------------------------------------------------------------------------
def check_options(
    task: str,
    faithfulness: float | None,
    mode: str,
    limit: int,
    verify: int,
    rescore: int,
    templates: Sequence[str] | None,
    score: str = "teacher-forced",
) -> str:
    """Reject bad options before anything is loaded or written; returns the template."""
    if task != "arithmetic":
        raise UsageError(f"surgery circuit supports --task arithmetic, got {task!r}")
    if score not in SCORES:
        raise UsageError(f"unknown --score {score!r}; use {' or '.join(SCORES)}")
    if faithfulness is not None and not 0 < faithfulness <= 1:
        raise UsageError(f"--faithfulness {faithfulness} is outside (0, 1]; e.g. 0.9")
    if mode not in ("exact", "screen"):
        raise UsageError(f"unknown --mode {mode!r}; use exact or screen")
    if limit < 2:
        raise UsageError(f"--limit {limit}: Eq. 1 averages over prompts; use at least 2 per operator")
    if verify < 1 or rescore < 1:
        raise UsageError("--verify and --rescore must be >= 1")
    if templates and len(templates) != 1:
        raise UsageError(
            f"surgery circuit uses one template, got {list(templates)}; pass one of {', '.join(TEMPLATES_OK)}"
        )
    return templates[0] if templates else "calculate"


def run(
    *,
    model: str,
    dtype: str,
    device: str,
    task: str,
    ops: Sequence[str] | None,
    operands: str,
    templates: Sequence[str] | None,
    limit: int,
    batch_size: int,
    seed: int,
    out: str | None,
    force: bool,
    faithfulness: float | None,
    mode: str,
    verify: int,
    neuron_from: int | None,
    rescore: int,
    max_rows: int,
    agree: bool,
    metric: str,
    score: str,
    include_wrong: bool,
    mean_sample: int | None,
    trust_remote_code: bool,
    max_memory: dict | None = None,
) -> rep.Report:
    """`surgery circuit` (its options and help: this package's __init__.py)."""
    t0 = time.time()
    template = check_options(task, faithfulness, mode, limit, verify, rescore, templates, score)
    if metric not in P.METRICS:
        raise UsageError(f"unknown --metric {metric!r}; use {' or '.join(P.METRICS)}")
    lo_hi = parse_operands(operands)
    ops = tuple(ops) if ops else ("+", "-", "*", "/")
    probs = sample(problems(ops, lo_hi, template, seed), mean_sample, seed)
    outdir = rep.check_out_dir(out) or Path("checkpoints") / "circuit"
    run_config = dict(
        model=model,
        dtype=dtype,
        device=device,
        task=task,
        ops=list(ops),
        operands=list(lo_hi),
        template=template,
        limit=limit,
        batch_size=batch_size,
        seed=seed,
        faithfulness=faithfulness,
        mode=mode,
        verify=verify,
        neuron_from=neuron_from,
        rescore=rescore,
        max_rows=max_rows,
        metric=metric,
        score=score,
        include_wrong=include_wrong,
        mean_sample=mean_sample,
    )
    from accelerate import PartialState

    state = PartialState(cpu=device == "cpu")  # under `accelerate launch`: the operators split over processes
    resume = resuming(outdir, run_config, force)
    state.wait_for_everyone()  # every process has read the folder before the first one (re)starts it
    per_rank_gpu = device == "cuda" and state.num_processes > 1
    loaded = load_model(
        model, dtype, "cpu" if per_rank_gpu else device, trust_remote_code=trust_remote_code, max_memory=max_memory
    )
    if per_rank_gpu:
        loaded.model.to(state.device)
    view = ModelView(loaded.model)
    nfrom = view.n_layers // 2 if neuron_from is None else neuron_from
    if not 0 <= nfrom < view.n_layers:
        raise UsageError(f"--neuron-from {nfrom} is not a layer of this {view.n_layers}-layer model")
    gs = groups(loaded.tokenizer, template, probs, score)
    means_file = outdir / STAGE_DIR / MEANS_FILE
    reused = measure_groups(view, gs, batch_size, means_file if resume else None)
    chosen = {op: select(gs, op, limit, seed, batch_size, include_wrong) for op in ops}
    few = [op for op, b in chosen.items() if sum(pr.n for _, pr in b) < 2]
    if few:
        raise UsageError(
            f"the model answers fewer than 2 prompts of {few} correctly ({score} scoring) with a "
            "usable counterfactual; widen --operands or drop those --ops"
        )
    layers = list(range(nfrom, view.n_layers))
    if state.is_main_process:
        start(outdir, run_config, resume)
        if not reused:
            save_means(gs, means_file)
    state.wait_for_everyone()
    mine = [op for i, op in enumerate(ops) if i % state.num_processes == state.process_index]
    local = {}
    for op in tqdm(mine, desc="operators", disable=not state.is_main_process):
        cache = stage_cache(outdir, arithmetic.OPS[op])  # per operator: processes never share a stage file
        local[op] = study_op(view, chosen[op], mode, verify, layers, rescore, faithfulness, max_rows, metric, cache)
        local[op]["circuit"] = {"heads": local[op]["heads"], "mlps": list(range(view.n_layers))}
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        local = {op: r for part in gather_object([local]) for op, r in part.items()}
        if not state.is_main_process:  # every process studied its operators; the first one reports
            return rep.Report(data={})
    per_op = {op: local[op] for op in ops}
    union = sorted({h for r in per_op.values() for h in r["heads"]}, key=lambda s: tuple(map(int, s.split("."))))
    union_set = {tuple(map(int, h.split("."))) for h in union}
    for op in ops:
        c = P.Circuit.full(view)
        c.heads[:] = False
        for l, h in union_set:
            c.heads[l, h] = True
        r = per_op[op]
        u = stage_cache(outdir, arithmetic.OPS[op])(
            "union", lambda op=op, c=c: {"heads": union, "nl": nl(view, chosen[op], c, metric)}
        )
        r["union_faithfulness"] = round(P.faithfulness(u["nl"], r["nl_model"], r["nl_empty"]), 4)
    neurons = {(int(l), i) for r in per_op.values() for l, idx in r["neurons"].items() for i in idx}
    config = dict(
        task=task,
        ops=list(ops),
        operands=list(lo_hi),
        template=template,
        limit=limit,
        seed=seed,
        faithfulness=faithfulness,
        mode=mode,
        verify=verify,
        neuron_from=nfrom,
        rescore=rescore,
        batch_size=batch_size,
        score=score,
        metric=metric,
        include_wrong=include_wrong,
        mean_sample=mean_sample,
    )
    results = {"per_op": per_op, "union": {"heads": union, "n_neurons": len(neurons)}}
    if agree:
        all_b = [b for op in ops for b in chosen[op]]
        results["agreement"] = stage_cache(outdir, "all")(
            "agreement", lambda: agreement(view, loaded.tokenizer, all_b, union_set, neurons, layers, batch_size, 20)
        )
    data = rep.make(
        "circuit",
        dict(loaded.describe(), n_layers=view.n_layers, n_heads=view.n_heads),
        config,
        results,
        time.time() - t0,
    )
    data["circuit"] = {
        "heads": union,
        "mlps": list(range(view.n_layers)),
        "neurons": {str(l): sorted(i for ll, i in neurons if ll == l) for l in layers},
    }
    data["per_op"] = {op: r["circuit"] for op, r in per_op.items()}
    data["stage_commits"] = stage_commits(outdir)
    md = markdown(data)
    # each file atomically, circuit.json last: its presence marks the folder finished (the stages stay beside it)
    rep.write_text_atomic(outdir / "circuit.md", md)
    _write_bytes(outdir / "effects.png", effects_png(data, view.n_layers))
    _write_bytes(outdir / "faithfulness.png", faithfulness_png(data))
    rep.write_json(outdir / "circuit.json", data)
    return rep.Report(
        data=data,
        markdown=md,
        files=[outdir / f for f in ("circuit.json", "circuit.md", "effects.png", "faithfulness.png")],
    )


# ---- rendering ------------------------------------------------------------------------------------------------
def _with_interval(f: float, ci: dict | None) -> str:
    """F with its bootstrap standard error and 95% interval over prompts, where the run recorded them."""
    return f"{f} ({ci['se']}) [{ci['low']}, {ci['high']}]" if ci else f"{f}"


def markdown(data: dict) -> str:
    res, cfg = data["results"], data["config"]
    lines = [
        f"# Circuit: {data['model']['name']}, operands {cfg['operands'][0]}-{cfg['operands'][1]} "
        f"({cfg['mode']} mode, answers scored {cfg.get('score', 'first')})",
        "",
        rep.md_table(
            [
                "op",
                "prompts",
                f"{cfg['metric']} model",
                f"{cfg['metric']} empty",
                "heads",
                "faithfulness (SE) [95% CI]",
                "union F",
                "neurons/layer for F",
                "screen recall@20",
            ],
            [
                [
                    op,
                    r["n_prompts"],
                    round(r["nl_model"], 3),
                    round(r["nl_empty"], 3),
                    len(r["heads"]),
                    _with_interval(r["faithfulness"], r.get("faithfulness_interval")),
                    r["union_faithfulness"],
                    _needed(r),
                    r.get("screen_recall_top20", r.get("screen_recall_of_verified")),
                ]
                for op, r in res["per_op"].items()
            ],
        ),
        "",
        f"Union circuit: {len(res['union']['heads'])} heads ({_first(res['union']['heads'], 30)}), all "
        f"{data['model']['n_layers']} MLPs, {res['union']['n_neurons']} neurons.",
        "",
    ]
    for op, r in res["per_op"].items():
        top = sorted(r["components"], key=lambda c: -c["effect"])[:8]
        hc, nc = r["head_curve"], r["neuron_curve"]
        lines += [
            f"## {op}",
            "",
            f"Heads: {', '.join(r['heads']) or '(none)'}",
            "",
            rep.md_table(
                ["component", "effect (Eq. 1)", "screen", "exact"],
                [[c["name"], round(c["effect"], 4), round(c["screen"], 4), c["exact"]] for c in top],
            ),
            "",
            "Faithfulness vs heads kept (all MLPs): " + _curve(hc["n"], hc["faithfulness"]) + ".",
            "",
            f"Faithfulness vs neurons kept per layer ({len(r['heads'])} circuit heads; layers "
            f"{min(map(int, r['neurons']))}-{max(map(int, r['neurons']))} at the last position): "
            + _curve(nc["per_layer"], nc["faithfulness"])
            + "."
            + (
                f" At {r['neurons_per_layer_needed']} per layer: SE {ci['se']}, 95% CI [{ci['low']}, {ci['high']}]"
                " (bootstrap over prompts)."
                if (ci := r.get("neuron_faithfulness_interval"))
                else ""
            ),
            "",
        ]
    if "agreement" in res:
        a = res["agreement"]
        lines += [
            "## Agreement",
            "",
            f"IoU(circuit heads, `surgery heads` top {a['n_heads']}): {a['heads_iou']} "
            f"(chance {a.get('heads_chance')}); IoU(circuit neurons, `surgery cna` top {a['n_neurons']}): "
            f"{a['neurons_iou']} signed sum, {a.get('neurons_iou_abs')} summed magnitudes "
            f"(chance {a.get('neurons_chance')}).",
            "",
        ]
    return "\n".join(lines)


def _curve(xs: Sequence[int], fs: Sequence[float]) -> str:
    return ", ".join(f"{x}: {f:.2f}" for x, f in zip(xs, fs))


def _first(names: Sequence[str], n: int) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def effects_png(data: dict, n_layers: int) -> bytes:
    """Per operator: layer x (MLP at each role, best head at each role) of the Eq. 1 effect."""
    plt = rep.pyplot()
    per_op = data["results"]["per_op"]
    R = len(P.ROLES)
    fig, axes = plt.subplots(1, len(per_op), figsize=(2.6 * len(per_op) + 1, 0.18 * n_layers + 1.5), squeeze=False)
    for ax, (op, r) in zip(axes[0], per_op.items()):
        grid = np.full((n_layers, 2 * R), -np.inf)
        for c in r["components"]:
            col = P.ROLES.index(c["role"]) + (0 if c["kind"] == "mlp" else R)
            grid[c["layer"], col] = max(grid[c["layer"], col], c["effect"])
        shown = np.sign(grid) * np.log10(1 + np.abs(grid))  # Eq. 1 spans decades (1 / P(r') can be huge)
        im = ax.imshow(
            shown, aspect="auto", origin="lower", cmap="RdBu_r", vmin=-np.abs(shown).max(), vmax=np.abs(shown).max()
        )
        ax.set_xticks(
            range(2 * R), [f"mlp {x}" for x in P.ROLES] + [f"head {x}" for x in P.ROLES], rotation=90, fontsize=7
        )
        ax.set_title(op)
        fig.colorbar(im, ax=ax, shrink=0.7)
    axes[0][0].set_ylabel("layer")
    fig.suptitle("Eq. 1 effect, sign(E) log10(1 + |E|) (best head per layer and role)", fontsize=9)
    return rep.png_bytes(fig)


def faithfulness_png(data: dict) -> bytes:
    plt = rep.pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for op, r in data["results"]["per_op"].items():
        a.plot(r["head_curve"]["n"], r["head_curve"]["faithfulness"], marker=".", label=op)
        b.plot(r["neuron_curve"]["per_layer"], r["neuron_curve"]["faithfulness"], marker=".", label=op)
    a.set(xlabel="heads kept (all MLPs kept)", ylabel="faithfulness (Eq. 2)", xscale="symlog")
    b.set(xlabel="neurons kept per layer (upper layers, last position)", ylabel="faithfulness", xscale="symlog")
    for ax in (a, b):
        ax.axhline(0.9, ls=":", c="gray")
        ax.legend(fontsize=8)
    return rep.png_bytes(fig)
