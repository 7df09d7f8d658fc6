"""`surgery circuit`: arithmetic circuits by activation patching, chosen by faithfulness (Nikankin et al. 2025).

    surgery circuit --model smollm2-135m --task arithmetic --ops +,- --operands 0-29 --limit 50 --out DIR


Per operator:
1. Prompts: every problem of the operand range (the arithmetic suite, one template) is run once; its activations
   give the MEANS for mean ablation, per token layout (op and digit counts, so position t is the same slot).
   Up to --limit problems the model answers correctly (first answer token) are the clean prompts; each gets a
   random counterfactual of the same layout whose first answer token differs.
2. Effects (Eq. 1, patching.py) of every head and every MLP at each role position (op1, operator, op2, last):
   an attribution screen of all of them, then the exact effect of all (--mode exact) or of the top --verify
   (--mode screen); the recall of the exact top-20 by the screen's top-20 is reported where all are exact.
3. Heads ranked by their largest exact effect over roles; faithfulness (Eq. 2, all MLPs kept, other heads
   mean-ablated) against head count; the circuit is the first count reaching --faithfulness F, or, without it,
   the knee (largest F(n) - n / #heads).
4. Neurons: at the last position, in layers >= --neuron-from (default the upper half), every neuron screened
   and the top --rescore per layer re-measured exactly; faithfulness of the circuit heads + the top-k neurons per
   layer (other neurons of those layers mean-ablated at the last position) against k; the circuit's neurons are
   the smallest k reaching F (0.9 without --faithfulness).
The top-level circuit is the union over operators. Agreement: IoU of its heads with `surgery heads`' top heads
(zero ablation, same prompts) and of its neurons with `surgery cna`'s top neurons (importance, same prompts).
Answer scoring (--score): SmolLM2 writes one digit per token, so answers are multi-token. `teacher-forced`
(default) scores the whole answer, every answer token given the ones before it (as the arithmetic suite does):
P(r) in Eq. 1 is the product of the per-token probabilities, NL in Eq. 2 is averaged over the answer tokens, a
prompt counts as answered when every answer token is the argmax, and layouts are keyed by answer length too so
the means cover the answer positions. `first` scores the first answer token only (the tens digit of a two-digit
result). The same choice applies to `surgery heuristics` (read from circuit.json).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from surgery.errors import UsageError
from surgery.evals import arithmetic
from surgery.find import cna
from surgery.find import head_scan as hs
from surgery.find import patching as P
from surgery.io import report as rep
from surgery.model.arch import ModelView
from surgery.model.batching import pad_id

MIN_MEAN = 8  # problems an operator needs in the operand range for a mean worth ablating with
TEMPLATES_OK = ("calculate", "plain")  # templates whose answer follows '=' directly, with named operand slots
SCORES = ("teacher-forced", "first")
HEAD_GRID = (0, 2, 4, 6, 8, 10, 15, 20, 30, 50, 80, 130, 200)
NEURON_GRID = (0, 10, 25, 50, 100, 200, 400, 800)


# ---- prompts ----------------------------------------------------------------------------------------------
def parse_operands(spec: str) -> tuple[int, int]:
    """'0-99' -> (0, 99); one line on anything else."""
    try:
        lo, hi = (int(x) for x in str(spec).split("-"))
    except ValueError:
        raise UsageError(f"--operands {spec!r}: expected LO-HI, e.g. 0-99") from None
    if not 0 <= lo <= hi:
        raise UsageError(f"--operands {spec}: the range is empty or negative; use LO-HI with 0 <= LO <= HI")
    return lo, hi


def problems(ops: Sequence[str], operands: tuple[int, int], template: str, seed: int) -> dict[str, list[dict]]:
    """Every problem of the operand range per operator (the arithmetic suite), checked for the study."""
    if template not in TEMPLATES_OK:
        raise UsageError(
            f"template {template!r} cannot name the operand positions or its answer does not follow "
            f"'='; use one of {', '.join(TEMPLATES_OK)}"
        )
    bad = [o for o in ops if o not in arithmetic.OPS]
    if bad or not ops:
        raise UsageError(
            f"operator(s) {bad or '(none)'} cannot be expressed by the arithmetic templates; use some of + - * /"
        )
    rows = arithmetic.build(ops=tuple(ops), templates=(template,), operands=operands, seed=seed)
    out: dict[str, list[dict]] = {o: [] for o in ops}
    for r in rows:
        out[r["op"]].append(r)
    for o, rs in out.items():
        if len(rs) < MIN_MEAN:
            raise UsageError(
                f"operator {o} has {len(rs)} problems in operands {operands[0]}-{operands[1]}, fewer than "
                f"the {MIN_MEAN} a mean needs; widen --operands"
            )
    return out


def sample(
    probs: dict[str, list[dict]], n: int | None, seed: int, option: str = "--mean-sample"
) -> dict[str, list[dict]]:
    """At most n problems per operator, a seeded sample in the suite's order (None: all). Bounds the time of the
    means (and of the heuristic maps) on big ranges: operands 0-99 are 10,000 prompts per operator for + and *."""
    if n is None:
        return probs
    if n < MIN_MEAN:
        raise UsageError(f"{option} {n} is fewer than the {MIN_MEAN} prompts a mean needs; use at least {MIN_MEAN}")
    out = {}
    for op, rows in probs.items():
        rng = np.random.default_rng([seed, ord(op), 7])
        keep = np.sort(rng.permutation(len(rows))[:n]) if len(rows) > n else np.arange(len(rows))
        out[op] = [rows[i] for i in keep]
    return out


def layout(tokenizer, template: str, p: dict, score: str = "teacher-forced") -> dict:
    """Token ids of one prompt, its role positions and its answer tokens (all of them, or with score="first" the
    first); the tokenizer must keep the operand, operator and '=' slots apart (checked by tokenising the pieces).
    The layout key is op | op1 tokens | op2 tokens (| answer tokens when teacher forced)."""
    pre, post = arithmetic.TEMPLATES[template].split("{a}{op}{b}")
    pieces = [pre, str(p["a"]), p["op"], str(p["b"]), post]
    full, start = arithmetic.answer_tokens(tokenizer, p["prompt"], p["answer"])
    parts = [tokenizer(x, add_special_tokens=False).input_ids if x else [] for x in pieces]
    n_special = start - sum(map(len, parts))
    if n_special < 0 or full[n_special:start] != [t for part in parts for t in part]:
        raise UsageError(
            f"the tokenizer merges the operands of {p['prompt']!r} with their neighbours; "
            "use --template plain or calculate with a digit-level tokenizer"
        )
    ends = np.cumsum([n_special] + [len(x) for x in parts])
    spans = [list(range(ends[1], ends[2])), list(range(ends[2], ends[3])), list(range(ends[3], ends[4])), [start - 1]]
    ans = full[start:] if score == "teacher-forced" else full[start : start + 1]
    key = f"{p['op']}|{len(parts[1])}|{len(parts[3])}" + (f"|{len(ans)}" if score == "teacher-forced" else "")
    return {
        "ids": full[:start],
        "roles": spans,
        "ans": ans,
        "r": ans[0],
        "key": key,
        "a": p["a"],
        "b": p["b"],
        "op": p["op"],
        "result": p["result"],
    }


@dataclass
class Group:
    """All prompts of one operator and token layout: prompt ids [n, T], roles [R, T], answer tokens ans [n, A]
    (A = 1 with first-token scoring), first answer tokens r [n]; pred [n, A] the model's argmax per answer token."""

    key: str
    op: str
    ids: Tensor
    roles: Tensor
    r: Tensor
    rows: list[dict]
    means: P.Means | None = None
    pred: Tensor | None = None
    ans: Tensor | None = None

    @property
    def n_ans(self) -> int:
        return self.ans.shape[1]

    def full(self, rows=None) -> Tensor:
        """The teacher-forced inputs prompt + answer[:-1] ([n, T + A - 1]) of all rows or the given ones."""
        ids, ans = (self.ids, self.ans) if rows is None else (self.ids[rows], self.ans[rows])
        return torch.cat([ids, ans[:, :-1]], 1)

    def correct(self) -> Tensor:
        """[n] bool: every scored answer token is the model's argmax (needs `pred`)."""
        return (self.pred == self.ans).all(1)


def groups(tokenizer, template: str, probs: dict[str, list[dict]], score: str = "teacher-forced") -> list[Group]:
    by: dict[str, list[dict]] = defaultdict(list)
    for rows in probs.values():
        for p in rows:
            x = layout(tokenizer, template, p, score)
            by[x["key"]].append(x)
    out = []
    for key, xs in sorted(by.items()):
        T = len(xs[0]["ids"])
        roles = torch.zeros(len(P.ROLES), T, dtype=torch.bool)
        for r, pos in enumerate(xs[0]["roles"]):
            roles[r, pos] = True
        out.append(
            Group(
                key,
                xs[0]["op"],
                torch.tensor([x["ids"] for x in xs]),
                roles,
                torch.tensor([x["r"] for x in xs]),
                xs,
                ans=torch.tensor([x["ans"] for x in xs]),
            )
        )
    return out


@torch.no_grad()
def measure_groups(view: ModelView, gs: list[Group], batch_size: int, saved: Path | None = None) -> bool:
    """Means over every prompt of each layout (teacher forced: over prompt + answer[:-1]), and the model's
    prediction of each scored answer token. When `saved` (a resumed run's means file) holds every layout, they
    are read back instead of recomputed (the means pass is most of a 0-99 run's first half hour); returns
    whether they were."""
    if saved is not None and saved.is_file():
        got = torch.load(saved, weights_only=True)
        if set(got) == {g.key for g in gs}:
            for g in gs:
                d = got[g.key]
                g.means = P.Means(d["z"], d["ffn"], d["m"], int(d["count"]), d["pred"])
                g.pred = g.means.pred
            return True
    for g in tqdm(gs, desc="means", unit="layout"):
        g.means = P.means(view, g.full(), batch_size, g.n_ans)
        g.pred = g.means.pred
    return False


def save_means(gs: list[Group], path: Path) -> None:
    """Every layout's means and predictions (float32 as computed, so a resumed run sees exactly these), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(
        {
            g.key: {"z": g.means.z, "ffn": g.means.ffn, "m": g.means.m, "count": g.means.count, "pred": g.means.pred}
            for g in gs
        },
        tmp,
    )
    os.replace(tmp, path)


def select(
    gs: list[Group], op: str, limit: int, seed: int, batch_size: int, include_wrong: bool = False
) -> list[tuple[Group, P.Pairs]]:
    """Up to `limit` correctly answered prompts of `op`, each with a same-layout counterfactual of a different
    answer (its scored tokens differ), as Pairs batches (one layout each); `include_wrong` drops the
    correctness requirement (for small or random models)."""
    rng = np.random.default_rng([seed, ord(op)])
    cand = [
        (gi, i)
        for gi, g in enumerate(gs)
        if g.op == op
        for i in range(len(g.rows))
        if include_wrong or bool(g.correct()[i])
    ]
    cand = [cand[j] for j in rng.permutation(len(cand))]
    chosen: dict[int, list[tuple[int, int]]] = defaultdict(list)
    n = 0
    for gi, i in cand:
        g = gs[gi]
        others = torch.nonzero((g.ans != g.ans[i]).any(1)).flatten().tolist()
        if not others or n >= limit:
            continue
        chosen[gi].append((i, int(rng.choice(others))))
        n += 1
    out = []
    for gi, pairs in sorted(chosen.items()):
        g = gs[gi]
        for s in range(0, len(pairs), batch_size):
            ci, fi = zip(*pairs[s : s + batch_size])
            out.append((g, P.Pairs(g.ids[list(ci)], g.ids[list(fi)], g.roles, g.ans[list(ci)], g.ans[list(fi)], g.key)))
    return out


# ---- per operator: effects, head circuit, neurons -----------------------------------------------------------
Batches = list[tuple[Group, P.Pairs]]


def head_components(view: ModelView) -> list[P.Component]:
    """Every head and every MLP at every role."""
    L, H, R = view.n_layers, view.n_heads, len(P.ROLES)
    return [P.Component("head", l, h, r) for l in range(L) for h in range(H) for r in range(R)] + [
        P.Component("mlp", l, -1, r) for l in range(L) for r in range(R)
    ]


def _screen_value(s: dict[str, Tensor], c: P.Component) -> float:
    if c.kind == "head":
        return float(s["head"][c.role, c.layer, c.index])
    if c.kind == "mlp":
        return float(s["mlp"][c.role, c.layer])
    return float(s["neuron"][c.layer, c.index])


def exact_mean(
    view: ModelView, batches: Batches, acts: list[tuple[P.Acts, P.Acts]], comps: list[P.Component], max_rows: int
) -> Tensor:
    """Exact Eq. 1 of each component averaged over every prompt of the batches, [len(comps)]."""
    if not comps:
        return torch.zeros(0, dtype=torch.float64)
    pairs = tqdm(list(zip(batches, acts)), desc=f"exact ({len(comps)} components)", unit="batch", leave=False)
    per = [P.exact(view, pr, comps, cl, cf, max_rows) for (_, pr), (cl, cf) in pairs]
    return torch.cat(per, 1).mean(1)


def screen_mean(view: ModelView, batches: Batches, acts: list[tuple[P.Acts, P.Acts]]) -> dict[str, Tensor]:
    """The screen of every head, MLP (per role) and last-position neuron, averaged over prompts."""
    pairs = tqdm(list(zip(batches, acts)), desc="screen", unit="batch", leave=False)
    per = [P.screen(view, pr, cf, neurons=True) for (_, pr), (_, cf) in pairs]
    return {k: torch.cat([s[k] for s in per], -1).double().mean(-1) for k in per[0]}


def recall(screen: Sequence[float], exact: Sequence[float], k: int = 20) -> float:
    """|screen top-k ∩ exact top-k| / k over the same components (largest values)."""
    k = min(k, len(exact))
    top = lambda v: set(np.argsort(-np.asarray(v), kind="stable")[:k].tolist())  # noqa: E731
    return len(top(screen) & top(exact)) / k if k else float("nan")


def nl_values(view: ModelView, batches: Batches, circuit: P.Circuit, metric: str = "nl") -> Tensor:
    """Per-prompt NL (or P, with --metric prob) of the correct answer (teacher forced: NL averaged over its
    tokens, P their product) with everything outside `circuit` mean-ablated: [prompts], in batch order."""
    score = P.METRICS[metric]
    vals = [
        score(P.ablated(view, torch.cat([pr.clean, pr.r[:, :-1]], 1), g.means, circuit, pr.n_ans), pr.r)
        for g, pr in batches
    ]
    return torch.cat(vals).double()


def nl(view: ModelView, batches: Batches, circuit: P.Circuit, metric: str = "nl") -> float:
    """Mean of `nl_values` over the prompts."""
    return float(nl_values(view, batches, circuit, metric).mean())


def faithfulness_interval(
    circuit: Sequence[float], model: Sequence[float], empty: Sequence[float], draws: int = 2000, seed: int = 0
) -> dict[str, float] | None:
    """Bootstrap over prompts (paired: one resample of prompts for all three) of Eq. 2's ratio of means: its
    standard error and 95% percentile interval. None without per-prompt values (a stage cached by older code)."""
    if not circuit or not len(circuit) == len(model) == len(empty):
        return None
    c, m, e = (np.asarray(v, dtype=np.float64) for v in (circuit, model, empty))
    idx = np.random.default_rng(seed).integers(0, len(c), size=(draws, len(c)))
    cm, mm, em = c[idx].mean(1), m[idx].mean(1), e[idx].mean(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        f = (cm - em) / (mm - em)
    f = f[np.isfinite(f)]
    if len(f) < draws // 2:
        return None
    lo, hi = np.percentile(f, [2.5, 97.5])
    return {"se": round(float(f.std(ddof=1)), 4), "low": round(float(lo), 4), "high": round(float(hi), 4)}


def knee(ns: Sequence[int], fs: Sequence[float], total: int) -> int:
    """The Pareto knee of faithfulness vs size: the count maximising F(n) - n / total."""
    return int(ns[int(np.argmax([f - n / total for n, f in zip(ns, fs)]))])


def head_curve(
    view: ModelView, batches: Batches, order: list[tuple[int, int]], ends: tuple[float, float], metric: str = "nl"
) -> tuple[list[int], list[float]]:
    """Faithfulness with all MLPs and the first n heads of `order` kept, for n on the grid."""
    total = len(order)
    ns = sorted({n for n in HEAD_GRID if n < total} | {total})
    fs, per_prompt = [], []
    for n in tqdm(ns, desc="heads curve", unit="point", leave=False):
        c = P.Circuit(
            torch.zeros(view.n_layers, view.n_heads, dtype=torch.bool), torch.ones(view.n_layers, dtype=torch.bool)
        )
        for l, h in order[:n]:
            c.heads[l, h] = True
        v = nl_values(view, batches, c, metric)
        per_prompt.append(v.tolist())
        fs.append(P.faithfulness(float(v.mean()), *ends))
    return ns, fs, per_prompt


def neuron_curve(
    view: ModelView,
    batches: Batches,
    heads: list[tuple[int, int]],
    ranking: dict[int, list[int]],
    ends: tuple[float, float],
    metric: str = "nl",
) -> tuple[list[int], list[float], list[list[float]]]:
    """Faithfulness with the circuit's heads, all MLPs, and in each ranked layer only the top-k neurons at the
    last position (the rest mean-ablated there), for k on the grid, and the per-prompt values behind each point."""
    width = min(view.ffn_width(l) for l in ranking)
    ks = sorted({k for k in NEURON_GRID if k < width} | {width})
    fs, per_prompt = [], []
    for k in tqdm(ks, desc="neurons curve", unit="point", leave=False):
        c = P.Circuit(
            torch.zeros(view.n_layers, view.n_heads, dtype=torch.bool), torch.ones(view.n_layers, dtype=torch.bool)
        )
        for l, h in heads:
            c.heads[l, h] = True
        for l, order in ranking.items():
            keep = torch.zeros(view.ffn_width(l), dtype=torch.bool)
            keep[order[:k]] = True
            c.neurons[l] = keep
        v = nl_values(view, batches, c, metric)
        per_prompt.append(v.tolist())
        fs.append(P.faithfulness(float(v.mean()), *ends))
    return ks, fs, per_prompt


def first_reaching(xs: Sequence[int], fs: Sequence[float], target: float) -> int | None:
    return next((x for x, f in zip(xs, fs) if f >= target), None)


Cache = Callable[[str, Callable[[], object]], object]


def no_cache(name: str, fn: Callable[[], object]) -> object:
    """Compute a stage without persisting it (the result still goes through JSON, like a resumed one)."""
    return json.loads(rep.json_text(fn()))


def study_op(
    view: ModelView,
    batches: Batches,
    mode: str,
    verify: int,
    neuron_layers: list[int],
    rescore: int,
    target: float | None,
    max_rows: int,
    metric: str = "nl",
    cache: Cache = no_cache,
) -> dict:
    """Everything for one operator: effects (screen + exact), the head circuit, the neuron ranking and curves.

    Three stages, each passed through `cache(name, compute)` (persisted by a resumable run): "effects" (the
    screen of every component and neuron, the exact effects), "heads" (end points, faithfulness vs heads) and
    "neurons" (exact rescoring, ranking, faithfulness vs neurons per layer)."""
    box: list = []

    def acts():
        if not box:
            box.append([P.run_pair(view, pr, neurons=True) for _, pr in batches])
        return box[0]

    comps = head_components(view)

    def effects() -> dict:
        s = screen_mean(view, batches, acts())
        sv = [_screen_value(s, c) for c in comps]
        todo = (
            list(range(len(comps))) if mode == "exact" else np.argsort(-np.asarray(sv), kind="stable")[:verify].tolist()
        )
        ex = exact_mean(view, batches, acts(), [comps[i] for i in todo], max_rows).tolist()
        return {
            "screen": sv,
            "exact": [[i, e] for i, e in zip(todo, ex)],
            "neuron_screen": {str(l): s["neuron"][l].tolist() for l in neuron_layers},
        }

    eff = cache("effects", effects)
    sv = eff["screen"]
    ex = {comps[i]: e for i, e in eff["exact"]}
    effect = {c: ex.get(c, v) for c, v in zip(comps, sv)}
    head_score = {
        (c.layer, c.index): max(effect[P.Component("head", c.layer, c.index, r)] for r in range(len(P.ROLES)))
        for c in comps
        if c.kind == "head"
    }
    order = sorted(head_score, key=lambda lh: -head_score[lh])

    def head_stage() -> dict:
        model_v = nl_values(view, batches, P.Circuit.full(view), metric)
        empty_v = nl_values(view, batches, P.Circuit.empty(view), metric)
        ends = (float(model_v.mean()), float(empty_v.mean()))
        ns, fs, curve_v = head_curve(view, batches, order, ends, metric)
        paper = (
            ends
            if metric == "nl"
            else (nl(view, batches, P.Circuit.full(view)), nl(view, batches, P.Circuit.empty(view)))
        )
        per_prompt = {"model": model_v.tolist(), "empty": empty_v.tolist(), "curve": curve_v}
        return {"ends": ends, "paper": paper, "n": ns, "f": fs, "per_prompt": per_prompt}

    hd = cache("heads", head_stage)
    ends, ns, fs = tuple(hd["ends"]), hd["n"], hd["f"]
    n_heads = first_reaching(ns, fs, target) if target is not None else knee(ns, fs, len(order))
    n_heads = len(order) if n_heads is None else n_heads
    heads = order[:n_heads]

    def neuron_stage() -> dict:
        screen = torch.zeros(view.n_layers, max(view.ffn_width(l) for l in neuron_layers), dtype=torch.float64)
        for l in neuron_layers:
            screen[l, : view.ffn_width(l)] = torch.tensor(eff["neuron_screen"][str(l)], dtype=torch.float64)
        ranking, neuron_exact = rank_neurons(view, batches, acts(), screen, neuron_layers, rescore, max_rows)
        ks, nfs, curve_v = neuron_curve(view, batches, heads, ranking, ends, metric)
        return {
            "ranking": {str(l): r for l, r in ranking.items()},
            "exact": neuron_exact,
            "k": ks,
            "f": nfs,
            "per_prompt": curve_v,
        }

    nd = cache("neurons", neuron_stage)
    ranking = {int(l): r for l, r in nd["ranking"].items()}
    ks, nfs = nd["k"], nd["f"]
    k_needed = first_reaching(ks, nfs, target if target is not None else 0.9)
    paper = hd["paper"]
    pp = hd.get("per_prompt") or {}

    def interval(curve: list | None, i: int | None) -> dict | None:
        if not pp or not curve or i is None:
            return None
        return faithfulness_interval(curve[i], pp["model"], pp["empty"])

    out = {
        "n_prompts": sum(pr.n for _, pr in batches),
        "nl_model": ends[0],
        "nl_empty": ends[1],
        "paper_nl_model": paper[0],
        "paper_nl_empty": paper[1],
        "components": [
            {
                "name": c.name(),
                "kind": c.kind,
                "layer": c.layer,
                "index": c.index,
                "role": P.ROLES[c.role],
                "effect": round(effect[c], 6),
                "screen": round(v, 6),
                "exact": c in ex,
            }
            for c, v in zip(comps, sv)
        ],
        "head_curve": {"n": ns, "faithfulness": [round(f, 4) for f in fs]},
        "heads": [f"{l}.{h}" for l, h in heads],
        "faithfulness": round(fs[ns.index(n_heads)], 4),
        "faithfulness_interval": interval(pp.get("curve"), ns.index(n_heads)),
        "neuron_faithfulness_interval": interval(
            nd.get("per_prompt"), None if k_needed is None else ks.index(k_needed)
        ),
        "neuron_curve": {"per_layer": ks, "faithfulness": [round(f, 4) for f in nfs], "layers": neuron_layers},
        "neurons_per_layer_needed": k_needed,
        "neurons": {str(l): ranking[l][: k_needed or 50] for l in neuron_layers},
        "neuron_exact": nd["exact"],
    }
    if mode == "exact":
        out["screen_recall_top20"] = recall(sv, [ex[c] for c in comps])
    else:
        # among the verified only (the screen's top), so k is at most half of them to mean anything
        todo = [comps[i] for i, _ in eff["exact"]]
        out["screen_recall_of_verified"] = recall(
            [sv[comps.index(c)] for c in todo], [ex[c] for c in todo], min(20, len(todo) // 2)
        )
    return out


def rank_neurons(
    view: ModelView, batches: Batches, acts, screen: Tensor, layers: list[int], rescore: int, max_rows: int
) -> tuple[dict[int, list[int]], list[dict]]:
    """Per layer: the top `rescore` screened neurons re-measured exactly and ranked by that, then the rest by
    the screen. Returns the ranking and the exact rows (with the screen's value beside them)."""
    comps = [
        P.Component("neuron", l, int(k), len(P.ROLES) - 1)
        for l in layers
        for k in torch.argsort(screen[l][: view.ffn_width(l)], descending=True, stable=True)[:rescore].tolist()
    ]
    ex = exact_mean(view, batches, acts, comps, max_rows).tolist()
    ranking = {}
    for l in layers:
        mine = sorted(((e, c.index) for c, e in zip(comps, ex) if c.layer == l), key=lambda t: -t[0])
        head = [k for _, k in mine]
        seen = set(head)
        rest = [
            k
            for k in torch.argsort(screen[l][: view.ffn_width(l)], descending=True, stable=True).tolist()
            if k not in seen
        ]
        ranking[l] = head + rest
    rows = [
        {"layer": c.layer, "index": c.index, "effect": round(e, 6), "screen": round(float(screen[c.layer, c.index]), 6)}
        for c, e in zip(comps, ex)
    ]
    return ranking, rows


# ---- agreement with `surgery heads` and `surgery cna` ---------------------------------------------------------
def iou(a: set, b: set) -> float | None:
    return round(len(a & b) / len(a | b), 4) if a | b else None


def chance_iou(n: int, total: int) -> float | None:
    """Expected IoU of two independent uniformly random n-subsets of `total` items (to first order:
    E|A & B| = n^2 / total), the baseline every agreement figure is read against."""
    if not n or not total:
        return None
    inter = n * n / total
    return round(inter / (2 * n - inter), 4)


def agreement(
    view: ModelView,
    tokenizer,
    batches: Batches,
    heads: set[tuple[int, int]],
    neurons: set[tuple[int, int]],
    layers: list[int],
    batch_size: int,
    verify: int,
) -> dict:
    """IoU of the circuit's heads with the top heads of `surgery heads` (zero ablation: attribution screen, then
    the exact drop of the mean answer-token log-prob for the top `verify`), and of its neurons with the
    top neurons of `surgery cna` (importance summed over the same prompts), each top list as long as ours.
    One case per scored answer token (teacher forced: prompt + the answer tokens before it)."""
    seqs = [
        row.tolist() + ans[:j].tolist()
        for _, pr in batches
        for row, ans in zip(pr.clean, pr.r)
        for j in range(pr.n_ans)
    ]
    tgt = [int(t) for _, pr in batches for ans in pr.r for t in ans]
    packed = hs.pack(seqs, tgt, batch_size, pad_id(tokenizer))
    att = hs.attribution(view, packed)
    cand = sorted(((l, h) for l in range(view.n_layers) for h in range(view.n_heads)), key=lambda lh: float(att[lh]))
    cand = cand[: max(verify, len(heads))]
    rows = hs.scan(view, packed, len(seqs), cand)  # progress: hundreds of heads at 0-99 take minutes
    _, base = hs.baseline(view, packed, len(seqs))
    drop = {lh: float(base.mean() - r["logprob"].mean()) for lh, r in rows.items()}
    top_heads = set(sorted(drop, key=lambda lh: -drop[lh])[: len(heads)])
    sc = cna.scan(view, seqs, layers, 10, pad_id(tokenizer), targets=tgt, batch_size=batch_size)

    def top_by(total: dict[int, Tensor]) -> set[tuple[int, int]]:
        flat = [(float(v), l, i) for l in layers for i, v in enumerate(total[l].tolist())]
        return {(l, i) for _, l, i in sorted(flat, reverse=True)[: len(neurons)]}

    width = sum(view.ffn_width(l) for l in layers)
    return {
        "heads_iou": iou(heads, top_heads),
        "heads_top": sorted(f"{l}.{h}" for l, h in top_heads),
        "neurons_iou": iou(neurons, top_by(sc.total)),
        "neurons_iou_abs": iou(neurons, top_by(sc.total_abs)),
        "heads_chance": chance_iou(len(heads), view.n_layers * view.n_heads),
        "neurons_chance": chance_iou(len(neurons), width),
        "n_heads": len(heads),
        "n_neurons": len(neurons),
        "heads_note": "surgery heads: zero ablation, exact drop of the mean log-prob of each scored answer token",
        "neurons_note": "surgery cna: importance of each neuron for each scored answer token, summed over cases "
        "(neurons_iou: signed sum, the paper's; neurons_iou_abs: sum of magnitudes)",
    }
