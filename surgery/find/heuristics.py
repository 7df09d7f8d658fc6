"""`surgery heuristics`: label a circuit's neurons with arithmetic heuristics ("bag of heuristics", Nikankin et al.).

    surgery heuristics --circuit DIR --out DIR2 [--threshold 0.6] [--families
    ranges,modulo,digits,identical,multi-result]


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

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from surgery.find import circuit as C
from surgery.find import patching as P
from surgery.io import report as rep
from surgery.model.arch import ModelView
from surgery.model.hooks import Hooks

FAMILIES = ("ranges", "modulo", "digits", "identical", "multi-result")
MULTI_OPS = ("/",)  # operators whose results get multi-result sets (few distinct quotients; the paper: division)
MULTI_N = (2, 3, 4, 5)
MULTI_TOL = 0.05  # a larger set must beat a smaller one by more than this (one odd prompt's worth of noise)
RANGE_LENGTHS = (10, 30, 50, 100)
MODULI = (2, 3, 4, 5, 6, 7, 8, 9, 11, 13, 15)


# ---- heuristics as prompt sets, and the match score --------------------------------------------------------
def heuristic_sets(
    a: np.ndarray,
    b: np.ndarray,
    result: np.ndarray,
    families: Sequence[str] = FAMILIES,
    min_size: int | None = None,
    max_frac: float = 0.5,
) -> dict[str, np.ndarray]:
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


def multi_result(
    scores: np.ndarray, result: np.ndarray, min_size: int | None = None, max_frac: float = 0.5
) -> tuple[str, np.ndarray, float] | None:
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
        cands.append(
            ("result in {" + ", ".join(map(str, chosen)) + "}", mask, match_scores(scores[test], {"S": h})["S"])
        )
    if not cands:
        return None
    top = max(c[2] for c in cands)
    return next(c for c in cands if c[2] >= top - MULTI_TOL)  # the fewest results scoring about the best


def classify(
    maps: dict[str, np.ndarray], sets: dict[str, np.ndarray], threshold: float = 0.6, multi: np.ndarray | None = None
) -> dict:
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
def activation_maps(
    view: ModelView, gs: list[C.Group], neurons: dict[int, list[int]], batch_size: int
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
                pred.append(
                    view.model(**P.model_inputs(view, full[s : s + batch_size], keep=g.n_ans)).logits.argmax(-1).cpu()
                )
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
                h.scale_neurons(l, (~mk[s : s + batch_size]).float())
            logits = view.model(**P.model_inputs(view, ids[s : s + batch_size], keep=ans.shape[1])).logits
        out.append((logits.argmax(-1).cpu() == ans[s : s + batch_size]).all(1))
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


def ablations(
    view: ModelView,
    g_rows: list[tuple[C.Group, int]],
    labels: dict[tuple[int, int], str],
    sets: dict[str, np.ndarray],
    order: dict[tuple[str, int], int],
    layers: list[int],
    rng: np.random.Generator,
    batch_size: int,
    max_heuristics: int,
    max_prompts: int,
) -> dict:
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


def _run_rows(
    view: ModelView,
    prompts: list[tuple[C.Group, int]],
    neuron_sets: list[list[tuple[int, int]]],
    layers: list[int],
    batch_size: int,
) -> Tensor:
    """Correctness per prompt with its own neuron set zeroed (prompts grouped by layout)."""
    ok = torch.zeros(len(prompts), dtype=torch.bool)
    by: dict[str, list[int]] = {}
    for i, (g, _) in enumerate(prompts):
        by.setdefault(g.key, []).append(i)
    for key, ii in by.items():
        g = prompts[ii[0]][0]
        rows = [prompts[i][1] for i in ii]
        ok[ii] = zeroed_correct(
            view, g.full(rows), g.ans[rows], _masks(view, [neuron_sets[i] for i in ii], layers), batch_size
        )
    return ok


def top_neurons(op_result: dict, top: int) -> dict[int, list[int]]:
    """The circuit's neurons of one operator: per layer its first `top` in the circuit's exact-then-screen order."""
    return {int(l): idx[:top] for l, idx in op_result["neurons"].items() if idx}


def study_op(
    view: ModelView,
    gs: list[C.Group],
    op_result: dict,
    families,
    threshold: float,
    top: int,
    batch_size: int,
    rng: np.random.Generator,
    max_heuristics: int,
    max_prompts: int,
) -> dict:
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
    abl = (
        ablations(
            view,
            correct,
            labels,
            {**sets, **multi_sets},
            order,
            sorted(neurons),
            rng,
            batch_size,
            max_heuristics,
            max_prompts,
        )
        if labels and correct
        else None
    )
    return {
        "neurons": len(table),
        "labelled": len(labels),
        "classified_fraction": round(len(labels) / max(len(table), 1), 4),
        "table": table,
        "ablations": abl,
        "maps": {"a": a, "b": b, "activation": act, "direct": direct, "table": table},
    }


# ---- rendering ------------------------------------------------------------------------------------------------
