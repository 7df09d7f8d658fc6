"""`surgery heuristics`: label a circuit folder's neurons with arithmetic heuristics and test the labels by
ablation (the engine is surgery/find/heuristics.py); writes heuristics.json / heuristics.md / gallery.png."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from surgery.errors import UsageError
from surgery.find import circuit as C
from surgery.find.heuristics import FAMILIES, study_op
from surgery.io import report as rep
from surgery.io.loading import load_model
from surgery.io.state import check_circuit_study, read_circuit
from surgery.model.arch import ModelView


def run(
    *,
    circuit: str,
    out: str | None,
    force: bool,
    model: str | None,
    dtype: str,
    device: str,
    threshold: float,
    families: Sequence[str],
    top: int,
    batch_size: int,
    seed: int,
    max_heuristics: int,
    max_prompts: int,
    grid_sample: int | None,
    trust_remote_code: bool,
) -> rep.Report:
    """`surgery heuristics` (its options and help: this package's __init__.py)."""
    t0 = time.time()
    data = read_circuit(circuit)
    bad = [f for f in families if f not in FAMILIES]
    if bad or not families:
        raise UsageError(f"unknown heuristic families {bad}; use some of {', '.join(FAMILIES)}")
    if not 0 < threshold <= 1:
        raise UsageError(f"--threshold {threshold} is outside (0, 1]; the paper uses 0.6")
    want = data["model"]
    if model is not None and model not in (want["name"], want["source"]):
        raise UsageError(
            f"{circuit} was made with model {want['name']} ({want['source']}), not {model}; "
            "omit --model or pass that model"
        )
    check_circuit_study(data, circuit)
    outdir = rep.new_out_dir(out, Path(circuit) / "heuristics", force)
    cfg = data["config"]
    probs = C.sample(
        C.problems(cfg["ops"], tuple(cfg["operands"]), cfg["template"], cfg["seed"]), grid_sample, seed, "--grid-sample"
    )
    loaded = load_model(want["source"], dtype, device, trust_remote_code=trust_remote_code)
    view = ModelView(loaded.model)
    if (view.n_layers, view.n_heads) != (want["n_layers"], want["n_heads"]):
        raise UsageError(
            f"the model has {view.n_layers} layers x {view.n_heads} heads but {circuit} was made for "
            f"{want['n_layers']} x {want['n_heads']}; pass the circuit's own model"
        )
    rng = np.random.default_rng(seed)
    gs_all = C.groups(loaded.tokenizer, cfg["template"], probs, cfg.get("score", "first"))
    per_op = {}
    for op in tqdm(cfg["ops"], desc="operators"):
        per_op[op] = study_op(
            view,
            [g for g in gs_all if g.op == op],
            data["results"]["per_op"][op],
            families,
            threshold,
            top,
            batch_size,
            rng,
            max_heuristics,
            max_prompts,
        )
    labelled = sum(r["labelled"] for r in per_op.values())
    total = sum(r["neurons"] for r in per_op.values())
    results = {
        "per_op": {op: {k: v for k, v in r.items() if k != "maps"} for op, r in per_op.items()},
        "classified_fraction": round(labelled / total, 4) if total else None,
        "neurons": total,
    }
    config = dict(
        circuit=str(circuit),
        threshold=threshold,
        families=list(families),
        top=top,
        seed=seed,
        max_heuristics=max_heuristics,
        max_prompts=max_prompts,
        grid_sample=grid_sample,
        score=cfg.get("score", "first"),
    )
    rdata = rep.make(
        "heuristics",
        dict(loaded.describe(), n_layers=view.n_layers, n_heads=view.n_heads),
        config,
        results,
        time.time() - t0,
    )
    md = markdown(rdata)
    with rep.atomic_dir(outdir, force) as tmp:
        rep.write_json(tmp / "heuristics.json", rdata)
        rep.write_text_atomic(tmp / "heuristics.md", md)
        (tmp / "gallery.png").write_bytes(gallery_png(per_op, tuple(cfg["operands"])))
    return rep.Report(
        data=rdata, markdown=md, files=[outdir / f for f in ("heuristics.json", "heuristics.md", "gallery.png")]
    )


def markdown(data: dict) -> str:
    res = data["results"]
    lines = [
        f"# Heuristic neurons: {data['model']['name']}",
        "",
        f"Classified fraction: {res['classified_fraction']} of {res['neurons']} circuit neurons "
        f"(match >= {data['config']['threshold']}).",
        "",
    ]
    for op, r in res["per_op"].items():
        lines += [f"## {op}: {r['labelled']} / {r['neurons']} labelled", ""]
        top = sorted(r["table"], key=lambda t: -t["score"])[:10]
        lines += [
            rep.md_table(
                ["neuron", "label", "score", "map"], [[t["neuron"], t["label"], t["score"], t["map"]] for t in top]
            ),
            "",
        ]
        a = r["ablations"]
        if a:
            f = lambda k: _acc_md(a[k])  # noqa: E731
            lines += [
                f"Ablation 1 (per heuristic, {len(a['heuristics_ablated'])} heuristics): accuracy on associated "
                f"prompts {f('assoc')}, unassociated {f('unassoc')}, associated with random neurons "
                f"{f('random_assoc')}.",
                "",
                f"Ablation 2 (per prompt, {a['prompts_with_associated_neurons']} prompts): own heuristics' neurons "
                f"zeroed {f('prompt_assoc')}, as many other labelled neurons {f('prompt_random')}.",
                "",
            ]
    return "\n".join(lines)


def _acc_md(r: dict) -> str:
    """'0.896 [0.838, 0.935] (n=154)'; 'n/a (n=0)' when no prompt qualified."""
    if not r["n"]:
        return "n/a (n=0)"
    lo, hi = r["ci95"]
    return f"{r['acc']:.3f} [{lo:.3f}, {hi:.3f}] (n={r['n']})"


def gallery_png(per_op: dict, operands: tuple[int, int], n: int = 6) -> bytes:
    """Maps (op1 x op2; the activation or direct map that matched) of the best-matching neurons per operator,
    titled with their labels."""
    plt = rep.pyplot()
    ops = list(per_op)
    fig, axes = plt.subplots(len(ops), n, figsize=(2.1 * n, 2.2 * len(ops)), squeeze=False)
    lo, hi = operands
    for row, op in zip(axes, ops):
        m = per_op[op]["maps"]
        best = sorted(m["table"], key=lambda t: -t["score"])[:n]
        for ax, t in zip(row, best):
            l, k = (int(x) for x in t["neuron"].split("."))
            grid = np.full((hi - lo + 1, hi - lo + 1), np.nan)
            grid[m["a"] - lo, m["b"] - lo] = m[t["map"]][l, k]
            ax.imshow(grid, origin="lower", cmap="viridis", extent=(lo - 0.5, hi + 0.5, lo - 0.5, hi + 0.5))
            ax.set_title(f"{op} {t['neuron']} ({t['map']})\n{t['label'] or '(none)'} {t['score']:.2f}", fontsize=6)
            ax.tick_params(labelsize=5)
        for ax in row[len(best) :]:
            ax.axis("off")
    fig.supxlabel("op2")
    fig.supylabel("op1")
    return rep.png_bytes(fig)
