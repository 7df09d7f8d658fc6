"""`surgery heuristics`: label a circuit's neurons with arithmetic heuristics ("bag of heuristics", Nikankin et al.).

    surgery heuristics --circuit DIR --out DIR2 [--threshold 0.6] [--families ranges,modulo,digits,identical,multi-result]


For each operator of the circuit folder and each of its top neurons (last position, the neuron level of
`surgery circuit`), the ACTIVATION MAP is the coefficient m_k over the whole (op1, op2) grid of the operand range;
the DIRECT map weights it by the logit-lens value of the prompt's first result token, m_k * (W_U (g * v_k))[r]
(the final norm's sigma left out: a positive per-prompt scale).
A HEURISTIC H is a set of prompts, from these families on op1, op2 and the result: ranges [s, s+len) for
len 10/30/50/100 (stride len/2), modulo n = r for n = 2..9, 11, 13, 15, units / tens digit = d, and op1 == op2.
A neuron implements H when |top-k prompts of its map ∩ H| / k >= threshold (0.6), k = |H|; its label is the best
such H over both maps (none if no H reaches the threshold). Sets smaller than max(10, 1% of the grid) or larger
than half of it are not candidates: a random map scores |H| / n on H, so a tiny set is matched by chance and a big
one (result < 50 on a 0-29 grid) by any map.
Ablations, on correctly answered prompts, neurons zeroed at every position; "correct" follows the circuit's
--score (teacher-forced: every answer token is the argmax given the ones before it; first: the first token):
1. per heuristic: zero the neurons labelled H; first-token accuracy on prompts in H (associated) vs not in H,
   and with as many random neurons of the same layers (control);
2. per prompt: zero the labelled neurons whose heuristic contains the prompt vs as many labelled neurons whose
   heuristic does not. Accuracies are pooled over (heuristic, prompt) rows with 95% Wilson intervals.
MULTI-RESULT sets (division, after the paper's "multi-result" neurons that fire for a few quotients): per neuron
and map, the results are ranked by the map's mean over the even-numbered prompts with that result, and the
top n = 2..5 of them give candidates "result in {q1, .., qn}". Each is scored (the same |top-k ∩ H| / k rule) on
the odd-numbered prompts only, so choosing the set from the map cannot by itself make the score high; sets
outside the size bounds above are not candidates (pure noise stays unlabelled).
Grids up to 100 x 100 (operands 0-99) are handled: maps are captured at one position for the chosen neurons
only, and the ablations use at most --max-prompts prompts.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import circuit as C
from . import patching as P
from . import report as rep
from .arch import ModelView
from .errors import UsageError
from .hooks import Hooks
from .models import load_model

FAMILIES = ("ranges", "modulo", "digits", "identical", "multi-result")
MULTI_OPS = ("/",)  # operators whose results get multi-result sets (few distinct quotients; the paper: division)
MULTI_N = (2, 3, 4, 5)
MULTI_TOL = 0.05  # a larger set must beat a smaller one by more than this (one odd prompt's worth of noise)
RANGE_LENGTHS = (10, 30, 50, 100)
MODULI = (2, 3, 4, 5, 6, 7, 8, 9, 11, 13, 15)


# ---- heuristics as prompt sets, and the match score --------------------------------------------------------
def heuristic_sets(a: np.ndarray, b: np.ndarray, result: np.ndarray, families: Sequence[str] = FAMILIES,
                   min_size: int | None = None, max_frac: float = 0.5) -> dict[str, np.ndarray]:
    """Name -> bool mask over prompts, for every heuristic of the chosen families holding between min_size and
    max_frac of the prompts (a random map scores |H| / n on H, so bigger sets would match noise)."""
    n = len(a)
    min_size = max(10, n // 100) if min_size is None else min_size
    sets: dict[str, np.ndarray] = {}
    for name, v in (("op1", a), ("op2", b), ("result", result)):
        if "ranges" in families:
            for L in RANGE_LENGTHS:
                for s in range(int(v.min()), int(v.max()) + 1, max(1, L // 2)):
                    sets[f"{name} in [{s},{s + L})"] = (v >= s) & (v < s + L)
        if "modulo" in families:
            for m in MODULI:
                for r in range(m):
                    sets[f"{name} % {m} == {r}"] = v % m == r
        if "digits" in families:
            for d in range(10):
                sets[f"{name} units digit {d}"] = np.abs(v) % 10 == d
                sets[f"{name} tens digit {d}"] = (np.abs(v) >= 10) & (np.abs(v) // 10 % 10 == d)
    if "identical" in families:
        sets["op1 == op2"] = a == b
    return {k: m for k, m in sets.items() if min_size <= m.sum() <= max_frac * n}


def match_scores(scores: np.ndarray, sets: dict[str, np.ndarray]) -> dict[str, float]:
    """|top-k prompts by score ∩ H| / k, k = |H|, for every heuristic H (ties broken by prompt order)."""
    rank = np.empty(len(scores), int)
    rank[np.argsort(-scores, kind="stable")] = np.arange(len(scores))
    return {name: float((m & (rank < m.sum())).sum() / m.sum()) for name, m in sets.items()}


def multi_result(scores: np.ndarray, result: np.ndarray, min_size: int | None = None,
                 max_frac: float = 0.5) -> tuple[str, np.ndarray, float] | None:
    """The multi-result heuristic of one map, if any: (name, mask over all prompts, held-out match score).

    Results are ranked by the map's mean over the EVEN prompts with that result (results with >= 2 of them);
    S_n = the top n results (n = 2..5) and H_n = the prompts whose result is in S_n. Each H_n is scored by the
    match rule on the ODD prompts only, so choosing S from the map cannot by itself make the score high; the
    smallest n scoring within MULTI_TOL of the best is returned. Sets outside the size bounds are skipped."""
    scores, result = np.asarray(scores, float), np.asarray(result)
    n = len(scores)
    min_size = max(10, n // 100) if min_size is None else min_size
    fit, test = np.arange(0, n, 2), np.arange(1, n, 2)
    vals, inv, counts = np.unique(result[fit], return_inverse=True, return_counts=True)
    mean = np.bincount(inv, weights=scores[fit], minlength=len(vals)) / counts
    ok = counts >= 2
    order = [int(v) for v in vals[ok][np.argsort(-mean[ok], kind="stable")]]
    cands = []
    for m in MULTI_N:
        if m > len(order):
            break
        chosen = sorted(order[:m])
        mask = np.isin(result, chosen)
        h = mask[test]
        if not (min_size <= mask.sum() <= max_frac * n and h.sum() >= max(min_size // 2, 5)):
            continue
        cands.append(("result in {" + ", ".join(map(str, chosen)) + "}", mask, match_scores(scores[test], {"S": h})["S"]))
    if not cands:
        return None
    top = max(c[2] for c in cands)
    return next(c for c in cands if c[2] >= top - MULTI_TOL)  # the fewest results scoring about the best


def classify(maps: dict[str, np.ndarray], sets: dict[str, np.ndarray], threshold: float = 0.6,
             multi: np.ndarray | None = None) -> dict:
    """The best heuristic over the given maps ({"activation": [n], "direct": [n]}): label (None below the
    threshold), its score, and which map matched. With `multi` (the prompts' results, division) each map's
    multi-result set competes too; its mask is returned under "mask" when it is the best."""
    best = (None, -1.0, None, None)
    for kind, scores in maps.items():
        for name, s in match_scores(np.asarray(scores, float), sets).items():
            if s > best[1]:
                best = (name, s, kind, None)
        if multi is not None and (mr := multi_result(scores, multi)) is not None and mr[2] > best[1]:
            best = (mr[0], mr[2], kind, mr[1])
    name, s, kind, mask = best
    out = {"label": name if s >= threshold else None, "score": round(s, 4), "best": name, "map": kind}
    if mask is not None:
        out["mask"] = mask
    return out


# ---- activation maps on the model ----------------------------------------------------------------------------
@torch.no_grad()
def activation_maps(view: ModelView, gs: list[C.Group], neurons: dict[int, list[int]], batch_size: int
                    ) -> tuple[dict[tuple[int, int], np.ndarray], dict[tuple[int, int], np.ndarray], list[dict]]:
    """m_k at the last prompt position (the '=') over every prompt of the groups (activation) and m_k * logit-lens
    value of the first result token (direct: what the '=' position predicts), per neuron (layer, k); plus the
    prompt rows in map order. Sets each group's per-answer-token predictions (g.pred) from the same forwards
    (teacher forced on prompt + answer[:-1])."""
    rows = [row for g in gs for row in g.rows]
    r = torch.cat([g.r for g in gs])
    m = {l: [] for l in neurons}
    for g in gs:
        pred = []
        full, last = g.full(), g.ids.shape[1] - 1
        for s in range(0, len(full), batch_size):
            with Hooks(view) as h:
                h.capture("m", layers=list(neurons), positions=last)
                pred.append(view.model(**P._inputs(view, full[s:s + batch_size], keep=g.n_ans)).logits.argmax(-1).cpu())
            for l in neurons:
                m[l].append(h.store["m", l][:, neurons[l]].float().cpu())
        g.pred = torch.cat(pred)
    act, direct = {}, {}
    for l, idx in neurons.items():
        ml = torch.cat(m[l])  # [n, k]
        lens = view.readout(view.values(l)[idx].float(), torch.tensor(1.0)).cpu()  # [k, V]
        for j, k in enumerate(idx):
            act[l, k] = ml[:, j].numpy()
            direct[l, k] = (ml[:, j] * lens[j, r]).numpy()
    return act, direct, rows


# ---- ablations ------------------------------------------------------------------------------------------------
@torch.no_grad()
def zeroed_correct(view: ModelView, ids: Tensor, ans: Tensor, masks: dict[int, Tensor], batch_size: int) -> Tensor:
    """Correctness [B] of ids [B, T] (one layout; teacher forced: prompt + answer[:-1]) against the answer tokens
    ans [B, A] (every one the argmax) with, per row, the neurons masks[l][row] zeroed."""
    out = []
    for s in range(0, len(ids), batch_size):
        with Hooks(view) as h:
            for l, mk in masks.items():
                h.scale_neurons(l, (~mk[s:s + batch_size]).float())
            logits = view.model(**P._inputs(view, ids[s:s + batch_size], keep=ans.shape[1])).logits
        out.append((logits.argmax(-1).cpu() == ans[s:s + batch_size]).all(1))
    return torch.cat(out)


def _masks(view: ModelView, sets_per_row: list[list[tuple[int, int]]], layers: list[int]) -> dict[int, Tensor]:
    masks = {l: torch.zeros(len(sets_per_row), view.ffn_width(l), dtype=torch.bool) for l in layers}
    for i, ns in enumerate(sets_per_row):
        for l, k in ns:
            masks[l][i, k] = True
    return masks


def _acc(c: Tensor) -> dict:
    k, n = int(c.sum()), int(c.numel())
    return {"acc": round(k / n, 4) if n else None, "ci95": rep.wilson(k, n), "n": n}


def ablations(view: ModelView, g_rows: list[tuple[C.Group, int]], labels: dict[tuple[int, int], str],
              sets: dict[str, np.ndarray], order: dict[tuple[str, int], int], layers: list[int], rng: np.random.Generator,
              batch_size: int, max_heuristics: int, max_prompts: int) -> dict:
    """Both ablations over correctly answered prompts (g_rows: (group, row) in map order), pooled."""
    by_h: dict[str, list[tuple[int, int]]] = {}
    for n, h in labels.items():
        by_h.setdefault(h, []).append(n)
    hs = sorted(by_h, key=lambda h: -len(by_h[h]))[:max_heuristics]
    pick = rng.permutation(len(g_rows))[:max_prompts]
    prompts = [g_rows[i] for i in pick]
    idx = np.array([order[g.key, i] for g, i in prompts])
    pool = [(l, k) for l in layers for k in range(view.ffn_width(l))]
    res: dict[str, list] = {"assoc": [], "unassoc": [], "random_assoc": [], "prompt_assoc": [], "prompt_random": []}
    for h in hs:
        members = sets[h][idx]
        rand = [pool[j] for j in rng.choice(len(pool), len(by_h[h]), replace=False)]
        ok = _run_rows(view, prompts, [by_h[h]] * len(prompts), layers, batch_size)
        okr = _run_rows(view, prompts, [rand] * len(prompts), layers, batch_size)
        res["assoc"].append(ok[torch.from_numpy(members)])
        res["unassoc"].append(ok[torch.from_numpy(~members)])
        res["random_assoc"].append(okr[torch.from_numpy(members)])
    labelled = list(labels)
    own, other = [], []
    for j in idx:
        mine = [n for n in labelled if sets[labels[n]][j]]
        rest = [n for n in labelled if not sets[labels[n]][j]]
        take = min(len(mine), len(rest))
        own.append(mine)
        other.append([rest[t] for t in rng.permutation(len(rest))[:take]] if take else [])
    keep = [i for i, (a, b) in enumerate(zip(own, other)) if a and len(b) == len(a)]
    if keep:
        sub = [prompts[i] for i in keep]
        res["prompt_assoc"].append(_run_rows(view, sub, [own[i] for i in keep], layers, batch_size))
        res["prompt_random"].append(_run_rows(view, sub, [other[i] for i in keep], layers, batch_size))
    out = {k: _acc(torch.cat(v) if v else torch.zeros(0, dtype=torch.bool)) for k, v in res.items()}
    out["heuristics_ablated"] = hs
    out["prompts"] = len(prompts)
    out["prompts_with_associated_neurons"] = len(keep)
    return out


def _run_rows(view: ModelView, prompts: list[tuple[C.Group, int]], neuron_sets: list[list[tuple[int, int]]],
              layers: list[int], batch_size: int) -> Tensor:
    """Correctness per prompt with its own neuron set zeroed (prompts grouped by layout)."""
    ok = torch.zeros(len(prompts), dtype=torch.bool)
    by: dict[str, list[int]] = {}
    for i, (g, _) in enumerate(prompts):
        by.setdefault(g.key, []).append(i)
    for key, ii in by.items():
        g = prompts[ii[0]][0]
        rows = [prompts[i][1] for i in ii]
        ok[ii] = zeroed_correct(view, g.full(rows), g.ans[rows], _masks(view, [neuron_sets[i] for i in ii], layers), batch_size)
    return ok


# ---- the command ----------------------------------------------------------------------------------------------
def run(circuit: str, out: str | None = None, force: bool = False, model: str | None = None, dtype: str = "float32",
        device: str = "cpu", threshold: float = 0.6, families: Sequence[str] = FAMILIES, top: int = 20,
        batch_size: int = 64, seed: int = 0, max_heuristics: int = 10, max_prompts: int = 200,
        grid_sample: int | None = None, trust_remote_code: bool = False) -> rep.Report:
    """Label the circuit's top neurons with arithmetic heuristics (activation maps over the operand grid), and
    test the labels by ablation with random-neuron controls.

    Reads CIRCUIT/circuit.json (from `surgery circuit`); writes DIR/heuristics.json (label, match score and map
    per neuron; classified fraction; ablations with 95% intervals), DIR/heuristics.md and DIR/gallery.png."""
    t0 = time.time()
    data = C.load(circuit)
    bad = [f for f in families if f not in FAMILIES]
    if bad or not families:
        raise UsageError(f"unknown heuristic families {bad}; use some of {', '.join(FAMILIES)}")
    if not 0 < threshold <= 1:
        raise UsageError(f"--threshold {threshold} is outside (0, 1]; the paper uses 0.6")
    want = data["model"]
    if model is not None and model not in (want["name"], want["source"]):
        raise UsageError(f"{circuit} was made with model {want['name']} ({want['source']}), not {model}; "
                         "omit --model or pass that model")
    outdir = rep.new_out_dir(out, Path(circuit) / "heuristics", force)
    cfg = data["config"]
    probs = C.sample(C.problems(cfg["ops"], tuple(cfg["operands"]), cfg["template"], cfg["seed"]), grid_sample, seed, "--grid-sample")
    loaded = load_model(want["source"], dtype, device, trust_remote_code=trust_remote_code)
    view = ModelView(loaded.model)
    if (view.n_layers, view.n_heads) != (want["n_layers"], want["n_heads"]):
        raise UsageError(f"the model has {view.n_layers} layers x {view.n_heads} heads but {circuit} was made for "
                         f"{want['n_layers']} x {want['n_heads']}; pass the circuit's own model")
    rng = np.random.default_rng(seed)
    gs_all = C.groups(loaded.tokenizer, cfg["template"], probs, cfg.get("score", "first"))
    per_op = {}
    for op in tqdm(cfg["ops"], desc="operators"):
        per_op[op] = study_op(view, [g for g in gs_all if g.op == op], data["results"]["per_op"][op], families,
                              threshold, top, batch_size, rng, max_heuristics, max_prompts)
    labelled = sum(r["labelled"] for r in per_op.values())
    total = sum(r["neurons"] for r in per_op.values())
    results = {"per_op": {op: {k: v for k, v in r.items() if k != "maps"} for op, r in per_op.items()},
               "classified_fraction": round(labelled / total, 4) if total else None, "neurons": total}
    config = dict(circuit=str(circuit), threshold=threshold, families=list(families), top=top, seed=seed,
                  max_heuristics=max_heuristics, max_prompts=max_prompts, grid_sample=grid_sample,
                  score=cfg.get("score", "first"))
    rdata = rep.make("heuristics", dict(loaded.describe(), n_layers=view.n_layers, n_heads=view.n_heads), config,
                     results, time.time() - t0)
    md = markdown(rdata)
    with rep.atomic_dir(outdir, force) as tmp:
        rep.write_json(tmp / "heuristics.json", rdata)
        rep.write_text_atomic(tmp / "heuristics.md", md)
        (tmp / "gallery.png").write_bytes(gallery_png(per_op, tuple(cfg["operands"])))
    return rep.Report(data=rdata, markdown=md, files=[outdir / f for f in ("heuristics.json", "heuristics.md", "gallery.png")])


def top_neurons(op_result: dict, top: int) -> dict[int, list[int]]:
    """The circuit's neurons of one operator: per layer its first `top` in the circuit's exact-then-screen order."""
    return {int(l): idx[:top] for l, idx in op_result["neurons"].items() if idx}


def study_op(view: ModelView, gs: list[C.Group], op_result: dict, families, threshold: float, top: int,
             batch_size: int, rng: np.random.Generator, max_heuristics: int, max_prompts: int) -> dict:
    neurons = top_neurons(op_result, top)
    act, direct, rows = activation_maps(view, gs, neurons, batch_size)
    a, b, res = (np.array([r[k] for r in rows]) for k in ("a", "b", "result"))
    sets = heuristic_sets(a, b, res, families)
    multi = res if "multi-result" in families and gs and gs[0].op in MULTI_OPS else None
    labels, table, multi_sets = {}, [], {}
    for n in act:
        c = classify({"activation": act[n], "direct": direct[n]}, sets, threshold, multi)
        mask = c.pop("mask", None)
        table.append({"neuron": f"{n[0]}.{n[1]}", **c})
        if c["label"]:
            labels[n] = c["label"]
            if mask is not None:
                multi_sets[c["label"]] = mask  # the ablations need the prompts of every label
    preds = [(g, i) for g in gs for i in range(len(g.rows))]
    order = {(g.key, i): j for j, (g, i) in enumerate(preds)}
    correct = [(g, i) for g, i in preds if bool(g.correct()[i])]
    abl = ablations(view, correct, labels, {**sets, **multi_sets}, order, sorted(neurons), rng, batch_size, max_heuristics,
                    max_prompts) if labels and correct else None
    return {"neurons": len(table), "labelled": len(labels), "classified_fraction": round(len(labels) / max(len(table), 1), 4),
            "table": table, "ablations": abl, "maps": {"a": a, "b": b, "activation": act, "direct": direct, "table": table}}


# ---- rendering ------------------------------------------------------------------------------------------------
def markdown(data: dict) -> str:
    res = data["results"]
    lines = [f"# Heuristic neurons: {data['model']['name']}", "",
             f"Classified fraction: {res['classified_fraction']} of {res['neurons']} circuit neurons "
             f"(match >= {data['config']['threshold']}).", ""]
    for op, r in res["per_op"].items():
        lines += [f"## {op}: {r['labelled']} / {r['neurons']} labelled", ""]
        top = sorted(r["table"], key=lambda t: -t["score"])[:10]
        lines += [rep.md_table(["neuron", "label", "score", "map"], [[t["neuron"], t["label"], t["score"], t["map"]] for t in top]), ""]
        a = r["ablations"]
        if a:
            f = lambda k: _acc_md(a[k])  # noqa: E731
            lines += [f"Ablation 1 (per heuristic, {len(a['heuristics_ablated'])} heuristics): accuracy on associated "
                      f"prompts {f('assoc')}, unassociated {f('unassoc')}, associated with random neurons "
                      f"{f('random_assoc')}.", "",
                      f"Ablation 2 (per prompt, {a['prompts_with_associated_neurons']} prompts): own heuristics' neurons "
                      f"zeroed {f('prompt_assoc')}, as many other labelled neurons {f('prompt_random')}.", ""]
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
    plt = C._plt()
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
            ax.imshow(grid, origin="lower", cmap="viridis", extent=(lo - .5, hi + .5, lo - .5, hi + .5))
            ax.set_title(f"{op} {t['neuron']} ({t['map']})\n{t['label'] or '(none)'} {t['score']:.2f}", fontsize=6)
            ax.tick_params(labelsize=5)
        for ax in row[len(best):]:
            ax.axis("off")
    fig.supxlabel("op2")
    fig.supylabel("op1")
    return rep.png_bytes(fig)
