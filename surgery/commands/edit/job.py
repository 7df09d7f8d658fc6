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

from surgery.edits.neurons import EDITS, contrast_scores, edit_and_check, scaled
from surgery.errors import UsageError
from surgery.evals import perplexity, tasks
from surgery.find import selectors
from surgery.find.cna import neuron_name, parse_layers, top_tokens
from surgery.find.neurons import Neuron, by_layer, top_n
from surgery.io import checkpoint as export
from surgery.io import report as rep
from surgery.io.context import Run
from surgery.io.deploy import Export, check_planned, parse_exports
from surgery.io.loading import load_model
from surgery.model.arch import ModelView
from surgery.model.batching import pad_id
from surgery.model.slicing import PAD_MULTIPLE


def check(
    neurons: int,
    edit: str,
    scale: float | None,
    method: str,
    tokens: str,
    test_size: float,
    ppl_docs: int,
    ppl_tokens: int,
) -> None:
    """One line for every option that needs no model."""
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


def measure(
    model, tokenizer, neurons: Sequence[Neuron], factor: float, test, keep, docs, ppl_tokens: int, batch_size: int
) -> dict:
    """Held-out gap table, keep-data table and perplexity with `neurons` scaled by `factor` through hooks."""
    with scaled(model, neurons, factor):
        gaps = tasks.pair_gaps(model, tokenizer, test, batch_size)
        out = {"gap": tasks.gap_table(test, gaps), "gaps": gaps}
        if keep is not None:
            out["keep"] = tasks.evaluate(model, tokenizer, keep, batch_size)
        if docs is not None:
            out["perplexity"] = perplexity.perplexity(model, tokenizer, docs, ppl_tokens, batch_size=8, progress=False)[
                "ppl"
            ]
    return out


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
    scale: float | None,
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
) -> rep.Report:
    """`surgery edit` (its options and help: this package's __init__.py)."""
    t0 = time.time()
    if pairs is None:
        raise UsageError("--pairs FILE is required (columns prompt_a, prompt_b, optional target), or gender-bias")
    check(neurons, edit, scale, method, tokens, test_size, ppl_docs, ppl_tokens)
    exports = parse_exports(export)
    bad = [b for b in baselines if b not in selectors.names("contrast")]
    if bad:
        raise UsageError(f"unknown --baselines {bad}; use some of {', '.join(selectors.names('contrast'))}")
    factor = 0.0 if edit != "scale" else (0.0 if scale is None else float(scale))
    ds = tasks.load_pairs(pairs, columns)
    parts = tasks.split(ds, seed, test_size)
    tasks.require(parts, "train", "test")
    sel, test = parts["train"], parts["test"]
    dup = tasks.warn_duplicates(sel, test, "prompt_a")
    keep = tasks.load_cases(keep_data, keep_columns) if keep_data is not None else None
    extra = tasks.load_pairs(eval_data, eval_columns) if eval_data is not None else None  # bad file: one line now
    run_ = Run("edit", out, force, default=f"edit-{method}-{neurons}")
    loaded = load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    view, tok = ModelView(loaded.model), loaded.tokenizer
    chosen_layers = parse_layers(layers, view.n_layers)
    total = sum(view.ffn_width(l) for l in chosen_layers)
    if neurons > total:
        raise UsageError(f"asked to edit {neurons} neurons but the selection layers hold only {total}")
    check_planned(
        loaded.model, exports, per_layer=edit == "remove", multiple=PAD_MULTIPLE if edit == "remove" else None
    )
    with run_.step("targets"):
        sel = tasks.fill_targets(loaded.model, tok, sel, batch_size)
        test = tasks.fill_targets(loaded.model, tok, test, batch_size)
        tasks.pair_ids(tok, test)  # every held-out target must tokenise after both prompts
        if extra is not None:
            extra = tasks.fill_targets(loaded.model, tok, extra, batch_size)
            tasks.pair_ids(tok, extra)
    methods = list(dict.fromkeys([method, *baselines]))
    with run_.step("select"):
        scores, info = select(
            view, tok, sel, chosen_layers, methods, tokens, seed, batch_size, max(candidates, neurons)
        )
    docs = perplexity.build(n_docs=ppl_docs) if ppl_docs else None
    with run_.step("measure"):
        before = measure(loaded.model, tok, [], 0.0, test, keep, docs, ppl_tokens, batch_size)
        after = {
            m: measure(loaded.model, tok, top_n(scores[m], neurons), factor, test, keep, docs, ppl_tokens, batch_size)
            for m in methods
        }
    chosen = top_n(scores[method], neurons)
    table = [
        {
            "neuron": neuron_name(l, i),
            "layer": l,
            "index": i,
            "score": float(scores[method][l][i]),
            "top_tokens": top_tokens(view, tok, l, i),
        }
        for l, i in chosen
    ]
    further = None
    if extra is not None:
        with run_.step("eval-data"):  # before the edit: edit_and_check edits the weights in place
            gap = {
                m: measure(loaded.model, tok, top_n(scores[m], neurons), factor, extra, None, None, 0, batch_size)
                for m in methods
            }
            base = measure(loaded.model, tok, [], 0.0, extra, None, None, 0, batch_size)
            after_each = {m: _point(g, base) for m, g in gap.items()}
            chosen_from = set(sel["prompt_a"])
            further = {
                "pairs": len(extra),
                "shared_with_selection": sum(prompt in chosen_from for prompt in extra["prompt_a"]),
                "before": _point(base),
                "after": after_each,
            }
    with run_.step("edit"):
        edited, diff = edit_and_check(loaded.model, tok, chosen, edit, list(test["prompt_a"][:16]), factor)
    results = {
        "selection": {
            "pairs": len(sel),
            "method": method,
            "tokens": tokens,
            "info": _jsonable(info),
            "layers": [chosen_layers[0], chosen_layers[-1]],
        },
        "held_out_pairs": len(test),
        "duplicates": dup,
        "neurons": table,
        "before": _point(before),
        "after": {m: _point(p, before) for m, p in after.items()},
        "edit_check": diff,
        "eval_data": further,
    }
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
    )
    data = rep.make(run_.command, loaded.describe(), config, results, time.time() - t0)
    return _export(loaded, edited, chosen, edit, factor, data, run_.out, force, exports)


def select(
    view: ModelView,
    tok,
    pairs,
    layers: list[int],
    methods: Sequence[str],
    tokens: str,
    seed: int,
    batch_size: int,
    candidates: int,
) -> tuple[dict, dict]:
    """Scores of every method on the selection pairs (the engine debias uses) and CNA's report."""
    pc = tasks.pair_cases(tok, pairs, tokens)
    prompts_a = [tok(p).input_ids for p in pairs["prompt_a"]]
    prompts_b = [tok(p).input_ids for p in pairs["prompt_b"]]
    scores, info = {}, {}
    for m in methods:
        scores[m], i = contrast_scores(
            view,
            layers,
            pad_id(tok),
            m,
            seqs_a=pc.seqs_a,
            seqs_b=pc.seqs_b,
            targets=pc.targets,
            prompts_a=prompts_a,
            prompts_b=prompts_b,
            seed=seed,
            batch_size=batch_size,
            candidates=candidates,
        )
        info = i if m == methods[0] else info
    return scores, info


def _jsonable(info: dict) -> dict:
    return {k: v for k, v in info.items() if isinstance(v, (int, float, str, type(None)))}


def _point(p: dict, base: dict | None = None) -> dict:
    """Gap (overall, per group), keep-data accuracy, perplexity; with `base`: the gap's relative reduction."""
    out = {"gap": p["gap"]}
    if "keep" in p:
        out["keep"] = p["keep"]
    if "perplexity" in p:
        out["perplexity"] = p["perplexity"]
    if base is not None:
        b = base["gap"]["overall"]["abs_gap"]
        out["reduction"] = 1 - p["gap"]["overall"]["abs_gap"] / b if b else None
    return out


def markdown(d: dict) -> str:
    """report.md: the gap before/after per method, per group, collateral, the neurons."""
    c, res = d["config"], d["results"]
    b = res["before"]
    rows = [
        [
            "base (no edit)",
            b["gap"]["overall"]["abs_gap"],
            "",
            b.get("perplexity", ""),
            _keep(b),
            b["gap"]["overall"]["signed_gap"],
        ]
    ]
    for m, p in res["after"].items():
        rows.append(
            [
                m,
                p["gap"]["overall"]["abs_gap"],
                f"{100 * p['reduction']:.1f}%",
                p.get("perplexity", ""),
                _keep(p),
                p["gap"]["overall"]["signed_gap"],
            ]
        )
    groups = [
        [g, e["abs_gap"], res["after"][c["method"]]["gap"]["groups"][g]["abs_gap"], e["n"]]
        for g, e in b["gap"]["groups"].items()
    ]
    return "\n".join(
        [
            f"# surgery edit: {d['model']['name']}, {c['method']}, N={c['neurons']}, edit {c['edit']}",
            "",
            f"Command: `{d['command']}`",
            "",
            f"Selection: {res['selection']['pairs']} pairs; held out: {res['held_out_pairs']} pairs "
            f"(prompts shared with selection: {res['duplicates']}).",
            "",
            "## A/B gap on held-out pairs: mean |log p(target | A) - log p(target | B)|",
            "",
            rep.md_table(["method", "gap", "reduction", "XSum ppl", "keep-data acc / log p", "signed gap"], rows),
            "",
            f"## Per group ({c['method']})",
            "",
            rep.md_table(["group", "before", "after", "pairs"], groups),
            "",
            *_keep_groups(res, c["method"]),
            *_eval_data_lines(res.get("eval_data"), c["method"]),
            f"## Edited neurons ({c['method']})",
            "",
            rep.md_table(
                ["neuron", "score", "top tokens"],
                [[r["neuron"], r["score"], " ".join(repr(t) for t in r["top_tokens"])] for r in res["neurons"]],
            ),
            "",
            f"Weight edit vs hook edit: max |logit diff| {res['edit_check']:.2e}. Time {d['timing']['seconds']:.0f} s.",
        ]
    )


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
    chosen: list[Neuron],
    edit: str,
    factor: float,
    data: dict,
    outdir: Path,
    force: bool,
    exports: Sequence[Export] = (),
) -> rep.Report:
    """The checkpoint (zero/scale: zeroed layout, native; remove: sliced) with report.json and report.md."""
    md = markdown(data)
    groups = by_layer(chosen)
    prov = {
        "operation": "edit",
        "recipe": data["config"],
        "method": data["config"]["method"],
        "seed": data["config"]["seed"],
        "neurons": [neuron_name(l, i) for l, i in chosen],
        "base": {"id": loaded.name, "source": loaded.source},
        "layers": {
            str(l): {"edited": idx, "edit": edit, **({"scale": factor} if edit == "scale" else {})}
            for l, idx in groups.items()
        },
    }
    if edit == "remove":
        prov["layers"] = {
            str(l): {"kept": edited.surgery_kept[l], "removed": idx, "edit": "remove"} for l, idx in groups.items()
        }
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
