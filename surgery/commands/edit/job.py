"""`surgery edit`: remove a difference between two kinds of prompts by editing FFN neurons (debias for any pairs).

Input: contrast pairs (prompt_a, prompt_b, optional target; `surgery.tasks`), split into a SELECTION part (split
column train/selection, or a seeded share of the rows) and a HELD-OUT part (test).
1. Select on the selection pairs with a registered contrast selector (`surgery.editing.contrast_scores`, the
   engine `surgery debias` uses): CNA sums imp(A) - imp(B) of the pair's target token (its first, or every token
   teacher forced with --tokens all) over pairs, the top --neurons are edited; random and activation-diff are
   the baselines at equal N.
2. Edit: zero (m_k -> 0; key rows and value vectors zeroed: native zeroed checkpoint), scale (m_k -> s m_k with
   --scale s; value vectors scaled: zeroed layout) or remove (sliced out: sliced layout).
3. Measure on the held-out pairs: gap = mean over pairs of |log p(target | A) - log p(target | B)| (every target
   token teacher forced), overall and per group, before and after; collateral: XSum perplexity and the
   --keep-data cases (behaviours that must not change: accuracy and log p(target) before/after).
Every measurement edits through hooks; the exported weights are checked against them (max |logit diff|).
The gender recipe of `surgery debias` is `--pairs gender-bias` (selection templates = train, evaluation
templates = test): same cases, same selector, same scores.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from surgery.commands.edit import cells
from surgery.commands.edit import compare as cmp
from surgery.commands.edit.cells import EDITS
from surgery.commands.edit.data import prepare
from surgery.edits import directions
from surgery.edits.neurons import probe_logits
from surgery.errors import UsageError
from surgery.evals import stereoset
from surgery.find import selectors
from surgery.find.cna import neuron_name, top_tokens
from surgery.find.neurons import by_layer
from surgery.io import checkpoint as export
from surgery.io import report as rep
from surgery.io.context import Run
from surgery.io.deploy import Export, parse_exports


def check(
    neurons: int,
    edit: str,
    scale: str | None,
    method: str,
    tokens: str,
    test_size: float,
    ppl_docs: int,
    ppl_tokens: int,
    edit_layers: int = 4,
    keep_test_size: float = 0.5,
) -> float | None:
    """One line for every option that needs no model; returns --scale as a number (None: auto / not given)."""
    if neurons < 1:
        raise UsageError(f"--neurons must be >= 1, got {neurons}")
    if edit not in EDITS:
        raise UsageError(f"unknown --edit {edit!r}; use one of {', '.join(EDITS)}")
    if scale is not None and edit != "scale":
        raise UsageError("--scale is the factor of --edit scale; add --edit scale or drop --scale")
    if method not in selectors.names("contrast"):
        raise UsageError(f"unknown --method {method!r}; use one of {', '.join(selectors.names('contrast'))}")
    if tokens not in ("first", "all"):
        raise UsageError(f"unknown --tokens {tokens!r}; use first or all")
    if not 0 < test_size:
        raise UsageError(f"--test-size must be > 0 (a fraction or a count), got {test_size}")
    if ppl_docs < 0 or ppl_tokens < 2:
        raise UsageError("--ppl-docs must be >= 0 and --ppl-tokens >= 2")
    if edit_layers < 1:
        raise UsageError(f"--edit-layers must be >= 1, got {edit_layers}")
    if not 0 < keep_test_size < 1:
        raise UsageError(f"--keep-test-size must be a fraction between 0 and 1, got {keep_test_size}")
    if scale is None or scale == "auto":
        return None
    try:
        return float(scale)
    except ValueError:
        raise UsageError(f"--scale must be a number or auto, got {scale!r}") from None


def parse_budgets(spec: str, name: str) -> list[int]:
    """'6,18,54' -> [6, 18, 54] (positive integers)."""
    try:
        out = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{name} must be comma-separated integers, e.g. 6,18,54; got {spec!r}") from None
    if not out or min(out) < 1:
        raise UsageError(f"{name} must list positive integers, got {spec!r}")
    return sorted(set(out))


def stereoset_types(spec: str | None, pairs: str) -> list[str]:
    """--stereoset: bias types measured as the held-out benchmark (default: gender for the gender-bias pairs)."""
    if spec is None:
        return ["gender"] if pairs == "gender-bias" else []
    if spec == "none":
        return []
    types = [t.strip() for t in spec.split(",") if t.strip()]
    bad = [t for t in types if t not in stereoset.BIAS_TYPES]
    if bad:
        raise UsageError(f"unknown --stereoset type(s) {bad}; use some of {', '.join(stereoset.BIAS_TYPES)} or none")
    return types


def run(
    *,
    model: str,
    dtype: str,
    device: str,
    out: str | None,
    force: bool,
    export: str | None,
    pairs: str | None,
    columns: str | None,
    neurons: int,
    edit: str,
    scale: str | None,
    method: str,
    baselines: Sequence[str],
    keep_data: str | None,
    keep_columns: str | None,
    eval_data: str | None,
    eval_columns: str | None,
    layers: str | None,
    tokens: str,
    test_size: float,
    seed: int,
    candidates: int,
    batch_size: int,
    ppl_docs: int,
    ppl_tokens: int,
    trust_remote_code: bool,
    edit_layers: int = 4,
    stereoset: str | None = None,
    stereoset_limit: int | None = None,
    keep_test_size: float = 0.5,
    compare: bool = False,
    budgets: str = "6,18,54",
    layer_budgets: str = "1,4,12",
) -> rep.Report:
    """`surgery edit` (its options and help: this package's __init__.py)."""
    t0 = time.time()
    if pairs is None:
        raise UsageError("--pairs FILE is required (columns prompt_a, prompt_b, optional target), or gender-bias")
    factor = check(neurons, edit, scale, method, tokens, test_size, ppl_docs, ppl_tokens, edit_layers, keep_test_size)
    bias_types = stereoset_types(stereoset, pairs)
    if stereoset_limit is not None and stereoset_limit < 1:
        raise UsageError(f"--stereoset-limit must be >= 1, got {stereoset_limit}")
    bad = [b for b in baselines if b not in selectors.names("contrast")]
    if bad:
        raise UsageError(f"unknown --baselines {bad}; use some of {', '.join(selectors.names('contrast'))}")
    config = dict(
        model=model,
        pairs=pairs,
        columns=columns,
        neurons=neurons,
        edit=edit,
        scale=scale,
        method=method,
        baselines=list(baselines),
        keep_data=keep_data,
        eval_data=eval_data,
        layers=layers,
        tokens=tokens,
        test_size=test_size,
        seed=seed,
        candidates=candidates,
        batch_size=batch_size,
        ppl_docs=ppl_docs,
        ppl_tokens=ppl_tokens,
        edit_layers=edit_layers,
        stereoset=bias_types,
        stereoset_limit=stereoset_limit,
        keep_test_size=keep_test_size,
    )
    common = dict(
        model=model,
        dtype=dtype,
        device=device,
        trust_remote_code=trust_remote_code,
        pairs=pairs,
        columns=columns,
        keep_data=keep_data,
        keep_columns=keep_columns,
        eval_data=eval_data,
        eval_columns=eval_columns,
        layers=layers,
        tokens=tokens,
        test_size=test_size,
        seed=seed,
        candidates=candidates,
        batch_size=batch_size,
        ppl_docs=ppl_docs,
        ppl_tokens=ppl_tokens,
        keep_test_size=keep_test_size,
        bias_types=bias_types,
        stereoset_limit=stereoset_limit,
    )
    if compare:
        if export:
            raise UsageError("--compare writes a comparison, not a checkpoint; drop --export (edit with the winner)")
        nb, lb = parse_budgets(budgets, "--budgets"), parse_budgets(layer_budgets, "--layer-budgets")
        return cmp.run(common, config, nb, lb, keep_data is not None, out, force, t0)
    exports = parse_exports(export)
    representation = edit in directions.METHODS
    main = cells.Cell(edit if representation else method, edit, edit_layers if representation else neurons, factor)
    extra_cells = (
        [cells.Cell("random-project", "random-project", edit_layers)] * ("random" in baselines)
        if representation
        else [cells.Cell(b, edit, neurons, factor) for b in baselines if b != method]
    )
    run_ = Run("edit", out, force, default=f"edit-{main.name.replace('@', '-')}")
    needed = [] if representation else list(dict.fromkeys([method, *baselines]))
    p = prepare(
        run_,
        **common,
        selectors_needed=needed,
        most_neurons=0 if representation else neurons,
        exports=exports,
        per_layer=edit == "remove",
        needs_bias=edit == "steer",
    )
    loaded, tok = p.loaded, p.loaded.tokenizer
    with run_.step("choose"):
        applied = {c.method: cells.realize(p.fit, c) for c in [main, *extra_cells]}
    with run_.step("measure"):  # every measurement before the weights are edited in place
        before = cells.measure(loaded.model, tok, None, p.measures)
        after = {m: cells.measure(loaded.model, tok, a, p.measures) for m, a in applied.items()}
    chosen = applied[main.method]
    view = p.fit.view
    table = [
        {
            "neuron": neuron_name(l, i),
            "layer": l,
            "index": i,
            "score": float(p.fit.scores[method][l][i]),
            "top_tokens": top_tokens(view, tok, l, i),
        }
        for l, i in chosen.neurons
    ]
    with run_.step("edit"):
        edited, diff = fold_and_check(loaded.model, tok, chosen, list(p.measures.test["prompt_a"][:16]))
    further = None
    if p.measures.extra is not None:
        further = {
            "pairs": len(p.measures.extra),
            "shared_with_selection": p.shared_with_selection,
            "before": {"gap": before["eval_data"]["gap"]},
            "after": {
                m: {
                    "gap": a["eval_data"]["gap"],
                    "reduction": cells.changes(before, a, seed)["eval_data_reduction"]["value"],
                }
                for m, a in after.items()
            },
        }
    results = {
        "selection": {**p.selection, "method": main.method, "edit": edit, "chosen": chosen.describe()},
        "held_out_pairs": p.eval_pairs,
        "duplicates": p.duplicates,
        "neurons": table,
        "before": _point(before),
        "after": {m: {**_point(a, before), "changes": cells.changes(before, a, seed)} for m, a in after.items()},
        "chosen": {m: a.describe() for m, a in applied.items()},
        "edit_check": diff,
        "eval_data": further,
    }
    data = rep.make(run_.command, loaded.describe(), config, results, time.time() - t0)
    return _export(loaded, edited, chosen, data, run_.out, force, exports)


def fold_and_check(model, tokenizer, applied: cells.Applied, probe: Sequence[str]) -> tuple[object, float]:
    """Fold the edit into the weights in place (every hook-based measurement is done by now); the max |logit
    difference| between the folded model and the hooked one on `probe` prompts (0: the export is what was measured)."""
    with applied.hooks(model):
        hooked = probe_logits(model, tokenizer, probe)
    applied.fold(model)
    return model, float((probe_logits(model, tokenizer, probe) - hooked).abs().max())


def _point(p: dict, base: dict | None = None) -> dict:
    """Gap (overall, per group), keep-data accuracy, perplexity, StereoSet; with `base`: the gap's relative
    reduction."""
    out = {"gap": p["gap"]}
    for k in ("keep", "perplexity", "stereoset"):
        if k in p:
            out[k] = p[k]
    if base is not None:
        b = base["gap"]["overall"]["abs_gap"]
        out["reduction"] = 1 - p["gap"]["overall"]["abs_gap"] / b if b else None
    return out


def markdown(d: dict) -> str:
    """report.md: the gap before/after per method (with the reduction's interval), per group, collateral,
    StereoSet, what was chosen, the neurons."""
    c, res = d["config"], d["results"]
    main = res["selection"]["method"]
    b = res["before"]
    rows = [["base (no edit)", b["gap"]["overall"]["abs_gap"], "", b.get("perplexity", ""), _keep(b), ""]]
    for m, p in res["after"].items():
        ch = p["changes"]
        rows.append(
            [
                m,
                p["gap"]["overall"]["abs_gap"],
                _interval(ch["gap_reduction"]),
                p.get("perplexity", ""),
                _keep(p),
                _mcnemar(ch.get("keep")),
            ]
        )
    groups = [
        [g, e["abs_gap"], res["after"][main]["gap"]["groups"][g]["abs_gap"], e["n"]]
        for g, e in b["gap"]["groups"].items()
    ]
    what = f"N={c['neurons']}" if not res["chosen"][main].get("layers") else f"{c['edit_layers']} layers"
    return "\n".join(
        [
            f"# surgery edit: {d['model']['name']}, {main}, {what}, edit {c['edit']}",
            "",
            f"Command: `{d['command']}`",
            "",
            f"Selection: {res['selection']['pairs']} pairs; scale / alpha chosen on: {res['selection']['validation']}; "
            f"held out: {res['held_out_pairs']} pairs (prompts shared with selection: {res['duplicates']}).",
            "",
            "## A/B gap on held-out pairs: mean |log p(target | A) - log p(target | B)|",
            "",
            rep.md_table(
                [
                    "method",
                    "gap",
                    "reduction [95% CI]",
                    "XSum ppl",
                    "keep-data acc / log p",
                    "keep acc change (McNemar p)",
                ],
                rows,
            ),
            "",
            f"## Per group ({main})",
            "",
            rep.md_table(["group", "before", "after", "pairs"], groups),
            "",
            *stereoset_lines(res),
            *_keep_groups(res, main),
            *_eval_data_lines(res.get("eval_data"), main),
            "## What was chosen (on the selection / validation pairs only)",
            "",
            *[f"- {m}: {rep.json_text(a).strip()}" for m, a in res["chosen"].items()],
            "",
            *(
                [
                    f"## Edited neurons ({main})",
                    "",
                    rep.md_table(
                        ["neuron", "score", "top tokens"],
                        [[r["neuron"], r["score"], " ".join(repr(t) for t in r["top_tokens"])] for r in res["neurons"]],
                    ),
                    "",
                ]
                if res["neurons"]
                else []
            ),
            f"Weight edit vs hook edit: max |logit diff| {res['edit_check']:.2e}. Time {d['timing']['seconds']:.0f} s.",
        ]
    )


def stereoset_lines(res: dict) -> list[str]:
    """StereoSet intrasentence (held out: never chooses anything), before and after each method."""
    b = res["before"].get("stereoset")
    if not b:
        return []
    out = ["## StereoSet intrasentence (held out): SS (50 = no preference), LMS, ICAT, 95% bootstrap intervals", ""]
    for t, r in b.items():
        rows = [["base (no edit)", *_ss(r)]] + [[m, *_ss(p["stereoset"][t])] for m, p in res["after"].items()]
        out += [f"{t} ({r['n']} items)", "", rep.md_table(["method", "SS", "LMS", "ICAT"], rows), ""]
    return out


def _ss(r: dict) -> list[str]:
    return [f"{r[k]:.1f} [{r[k + '_ci95'][0]:.1f}, {r[k + '_ci95'][1]:.1f}]" for k in ("ss", "lms", "icat")]


def _interval(x: dict | None) -> str:
    if not x:
        return ""
    return f"{100 * x['value']:.1f}% [{100 * x['ci95'][0]:.1f}, {100 * x['ci95'][1]:.1f}]"


def _mcnemar(k: dict | None) -> str:
    if not k:
        return ""
    return f"{100 * k['change']:+.1f} pts (p={k['p_value']:.3f})"


def _eval_data_lines(e: dict | None, method: str) -> list[str]:
    """--eval-data: the A/B gap on the further held-out pairs, before and after each method, and per group."""
    if not e:
        return []
    b = e["before"]["gap"]
    rows = [["base (no edit)", b["overall"]["abs_gap"], ""]]
    rows += [[m, p["gap"]["overall"]["abs_gap"], _pct(p.get("reduction"))] for m, p in e["after"].items()]
    edited = e["after"][method]["gap"]["groups"]
    groups = [[g, v["abs_gap"], edited[g]["abs_gap"], v["n"]] for g, v in b["groups"].items()]
    return [
        f"## --eval-data: {e['pairs']} further held-out pairs (never used for selection; prompts also among the "
        f"selection pairs: {e['shared_with_selection']})",
        "",
        rep.md_table(["method", "gap", "reduction"], rows),
        "",
        rep.md_table(["group", "before", f"after ({method})", "pairs"], groups),
        "",
    ]


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def _keep_groups(res: dict, method: str) -> list[str]:
    """Per group of --keep-data: full-target accuracy and mean log p(target) before and after."""
    b, a = res["before"].get("keep"), res["after"][method].get("keep")
    if not b:
        return []
    pick = lambda t, g: t["overall"] if g == "overall" else t["groups"][g]  # noqa: E731
    rows = [
        [g, pick(b, g)["acc"], pick(a, g)["acc"], pick(b, g)["logprob"], pick(a, g)["logprob"], pick(b, g)["n"]]
        for g in ["overall", *b["groups"]]
    ]
    return [
        f"## --keep-data cases ({method}): must not change",
        "",
        rep.md_table(["group", "acc before", "acc after", "log p before", "log p after", "n"], rows),
        "",
    ]


def _keep(p: dict) -> str:
    k = p.get("keep")
    return f"{k['overall']['acc']:.3f} / {k['overall']['logprob']:.3f}" if k else ""


def _export(
    loaded,
    edited,
    chosen: cells.Applied,
    data: dict,
    outdir: Path,
    force: bool,
    exports: Sequence[Export] = (),
) -> rep.Report:
    """The checkpoint (zero/scale and the representation edits: zeroed layout, native; remove: sliced) with
    report.json and report.md."""
    md = markdown(data)
    edit = chosen.cell.edit
    groups = by_layer(chosen.neurons)
    prov = {
        "operation": "edit",
        "recipe": data["config"],
        "method": chosen.cell.method,
        "edit": edit,
        "seed": data["config"]["seed"],
        "neurons": [neuron_name(l, i) for l, i in chosen.neurons],
        "base": {"id": loaded.name, "source": loaded.source},
        "layers": {
            str(l): {"edited": idx, "edit": edit, **({"scale": chosen.factor} if edit == "scale" else {})}
            for l, idx in groups.items()
        },
    }
    if edit == "remove":
        prov["layers"] = {
            str(l): {"kept": edited.surgery_kept[l], "removed": idx, "edit": "remove"} for l, idx in groups.items()
        }
    if chosen.affines:  # W_out <- (I - L R) W_out (+ shift in the bias): the rank and shift per layer
        prov["layers"] = {str(a.layer): {"edit": edit, **a.to_json()} for a in chosen.affines}
        prov.update({k: v for k, v in chosen.chosen.items() if k == "alpha"})
    extra = {"report.json": rep.json_text(data), "report.md": md + "\n"}
    export.save(
        edited,
        loaded.tokenizer,
        outdir,
        layout="sliced" if edit == "remove" else "zeroed",
        provenance=prov,
        force=force,
        extra_files=extra,
        base=loaded.source,
        exports=exports,
    )
    return rep.Report(data, md, files=[outdir / n for n in extra])
