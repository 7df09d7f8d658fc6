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
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import cna
from . import heads as hs
from . import patching as P
from . import report as rep
from .arch import ModelView
from .batching import pad_id
from .errors import UsageError
from .evals import arithmetic
from .models import load_model

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
        raise UsageError(f"template {template!r} cannot name the operand positions or its answer does not follow "
                         f"'='; use one of {', '.join(TEMPLATES_OK)}")
    bad = [o for o in ops if o not in arithmetic.OPS]
    if bad or not ops:
        raise UsageError(f"operator(s) {bad or '(none)'} cannot be expressed by the arithmetic templates; use some of + - * /")
    rows = arithmetic.build(ops=tuple(ops), templates=(template,), operands=operands, seed=seed)
    out: dict[str, list[dict]] = {o: [] for o in ops}
    for r in rows:
        out[r["op"]].append(r)
    for o, rs in out.items():
        if len(rs) < MIN_MEAN:
            raise UsageError(f"operator {o} has {len(rs)} problems in operands {operands[0]}-{operands[1]}, fewer than "
                             f"the {MIN_MEAN} a mean needs; widen --operands")
    return out


def sample(probs: dict[str, list[dict]], n: int | None, seed: int, option: str = "--mean-sample") -> dict[str, list[dict]]:
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
        raise UsageError(f"the tokenizer merges the operands of {p['prompt']!r} with their neighbours; "
                         "use --template plain or calculate with a digit-level tokenizer")
    ends = np.cumsum([n_special] + [len(x) for x in parts])
    spans = [list(range(ends[1], ends[2])), list(range(ends[2], ends[3])), list(range(ends[3], ends[4])), [start - 1]]
    ans = full[start:] if score == "teacher-forced" else full[start:start + 1]
    key = f"{p['op']}|{len(parts[1])}|{len(parts[3])}" + (f"|{len(ans)}" if score == "teacher-forced" else "")
    return {"ids": full[:start], "roles": spans, "ans": ans, "r": ans[0], "key": key,
            "a": p["a"], "b": p["b"], "op": p["op"], "result": p["result"]}


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
        out.append(Group(key, xs[0]["op"], torch.tensor([x["ids"] for x in xs]), roles, torch.tensor([x["r"] for x in xs]), xs,
                         ans=torch.tensor([x["ans"] for x in xs])))
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
    torch.save({g.key: {"z": g.means.z, "ffn": g.means.ffn, "m": g.means.m, "count": g.means.count,
                        "pred": g.means.pred} for g in gs}, tmp)
    os.replace(tmp, path)


def select(gs: list[Group], op: str, limit: int, seed: int, batch_size: int,
           include_wrong: bool = False) -> list[tuple[Group, P.Pairs]]:
    """Up to `limit` correctly answered prompts of `op`, each with a same-layout counterfactual of a different
    answer (its scored tokens differ), as Pairs batches (one layout each); `include_wrong` drops the
    correctness requirement (for small or random models)."""
    rng = np.random.default_rng([seed, ord(op)])
    cand = [(gi, i) for gi, g in enumerate(gs) if g.op == op for i in range(len(g.rows)) if include_wrong or bool(g.correct()[i])]
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
            ci, fi = zip(*pairs[s:s + batch_size])
            out.append((g, P.Pairs(g.ids[list(ci)], g.ids[list(fi)], g.roles, g.ans[list(ci)], g.ans[list(fi)], g.key)))
    return out


# ---- per operator: effects, head circuit, neurons -----------------------------------------------------------
Batches = list[tuple[Group, P.Pairs]]


def head_components(view: ModelView) -> list[P.Component]:
    """Every head and every MLP at every role."""
    L, H, R = view.n_layers, view.n_heads, len(P.ROLES)
    return ([P.Component("head", l, h, r) for l in range(L) for h in range(H) for r in range(R)]
            + [P.Component("mlp", l, -1, r) for l in range(L) for r in range(R)])


def _screen_value(s: dict[str, Tensor], c: P.Component) -> float:
    if c.kind == "head":
        return float(s["head"][c.role, c.layer, c.index])
    if c.kind == "mlp":
        return float(s["mlp"][c.role, c.layer])
    return float(s["neuron"][c.layer, c.index])


def exact_mean(view: ModelView, batches: Batches, acts: list[tuple[P.Acts, P.Acts]], comps: list[P.Component],
               max_rows: int) -> Tensor:
    """Exact Eq. 1 of each component averaged over every prompt of the batches, [len(comps)]."""
    if not comps:
        return torch.zeros(0, dtype=torch.float64)
    per = [P.exact(view, pr, comps, cl, cf, max_rows) for (_, pr), (cl, cf) in zip(batches, acts)]
    return torch.cat(per, 1).mean(1)


def screen_mean(view: ModelView, batches: Batches, acts: list[tuple[P.Acts, P.Acts]]) -> dict[str, Tensor]:
    """The screen of every head, MLP (per role) and last-position neuron, averaged over prompts."""
    per = [P.screen(view, pr, cf, neurons=True) for (_, pr), (_, cf) in zip(batches, acts)]
    return {k: torch.cat([s[k] for s in per], -1).double().mean(-1) for k in per[0]}


def recall(screen: Sequence[float], exact: Sequence[float], k: int = 20) -> float:
    """|screen top-k ∩ exact top-k| / k over the same components (largest values)."""
    k = min(k, len(exact))
    top = lambda v: set(np.argsort(-np.asarray(v), kind="stable")[:k].tolist())  # noqa: E731
    return len(top(screen) & top(exact)) / k if k else float("nan")


def nl(view: ModelView, batches: Batches, circuit: P.Circuit, metric: str = "nl") -> float:
    """Mean NL (or P, with --metric prob) of the correct answer (teacher forced: NL averaged over its tokens, P
    their product) with everything outside `circuit` mean-ablated."""
    score = P.METRICS[metric]
    vals = [score(P.ablated(view, torch.cat([pr.clean, pr.r[:, :-1]], 1), g.means, circuit, pr.n_ans), pr.r)
            for g, pr in batches]
    return float(torch.cat(vals).mean())


def knee(ns: Sequence[int], fs: Sequence[float], total: int) -> int:
    """The Pareto knee of faithfulness vs size: the count maximising F(n) - n / total."""
    return int(ns[int(np.argmax([f - n / total for n, f in zip(ns, fs)]))])


def head_curve(view: ModelView, batches: Batches, order: list[tuple[int, int]], ends: tuple[float, float],
               metric: str = "nl") -> tuple[list[int], list[float]]:
    """Faithfulness with all MLPs and the first n heads of `order` kept, for n on the grid."""
    total = len(order)
    ns = sorted({n for n in HEAD_GRID if n < total} | {total})
    fs = []
    for n in ns:
        c = P.Circuit(torch.zeros(view.n_layers, view.n_heads, dtype=torch.bool), torch.ones(view.n_layers, dtype=torch.bool))
        for l, h in order[:n]:
            c.heads[l, h] = True
        fs.append(P.faithfulness(nl(view, batches, c, metric), *ends))
    return ns, fs


def neuron_curve(view: ModelView, batches: Batches, heads: list[tuple[int, int]], ranking: dict[int, list[int]],
                 ends: tuple[float, float], metric: str = "nl") -> tuple[list[int], list[float]]:
    """Faithfulness with the circuit's heads, all MLPs, and in each ranked layer only the top-k neurons at the
    last position (the rest mean-ablated there), for k on the grid."""
    width = min(view.ffn_width(l) for l in ranking)
    ks = sorted({k for k in NEURON_GRID if k < width} | {width})
    fs = []
    for k in ks:
        c = P.Circuit(torch.zeros(view.n_layers, view.n_heads, dtype=torch.bool), torch.ones(view.n_layers, dtype=torch.bool))
        for l, h in heads:
            c.heads[l, h] = True
        for l, order in ranking.items():
            keep = torch.zeros(view.ffn_width(l), dtype=torch.bool)
            keep[order[:k]] = True
            c.neurons[l] = keep
        fs.append(P.faithfulness(nl(view, batches, c, metric), *ends))
    return ks, fs


def first_reaching(xs: Sequence[int], fs: Sequence[float], target: float) -> int | None:
    return next((x for x, f in zip(xs, fs) if f >= target), None)


Cache = Callable[[str, Callable[[], object]], object]


def no_cache(name: str, fn: Callable[[], object]) -> object:
    """Compute a stage without persisting it (the result still goes through JSON, like a resumed one)."""
    return json.loads(rep.json_text(fn()))


def study_op(view: ModelView, batches: Batches, mode: str, verify: int, neuron_layers: list[int], rescore: int,
             target: float | None, max_rows: int, metric: str = "nl", cache: Cache = no_cache) -> dict:
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
        todo = list(range(len(comps))) if mode == "exact" else np.argsort(-np.asarray(sv), kind="stable")[:verify].tolist()
        ex = exact_mean(view, batches, acts(), [comps[i] for i in todo], max_rows).tolist()
        return {"screen": sv, "exact": [[i, e] for i, e in zip(todo, ex)],
                "neuron_screen": {str(l): s["neuron"][l].tolist() for l in neuron_layers}}

    eff = cache("effects", effects)
    sv = eff["screen"]
    ex = {comps[i]: e for i, e in eff["exact"]}
    effect = {c: ex.get(c, v) for c, v in zip(comps, sv)}
    head_score = {(c.layer, c.index): max(effect[P.Component("head", c.layer, c.index, r)] for r in range(len(P.ROLES)))
                  for c in comps if c.kind == "head"}
    order = sorted(head_score, key=lambda lh: -head_score[lh])

    def head_stage() -> dict:
        ends = (nl(view, batches, P.Circuit.full(view), metric), nl(view, batches, P.Circuit.empty(view), metric))
        ns, fs = head_curve(view, batches, order, ends, metric)
        paper = ends if metric == "nl" else (nl(view, batches, P.Circuit.full(view)), nl(view, batches, P.Circuit.empty(view)))
        return {"ends": ends, "paper": paper, "n": ns, "f": fs}

    hd = cache("heads", head_stage)
    ends, ns, fs = tuple(hd["ends"]), hd["n"], hd["f"]
    n_heads = first_reaching(ns, fs, target) if target is not None else knee(ns, fs, len(order))
    n_heads = len(order) if n_heads is None else n_heads
    heads = order[:n_heads]

    def neuron_stage() -> dict:
        screen = torch.zeros(view.n_layers, max(view.ffn_width(l) for l in neuron_layers), dtype=torch.float64)
        for l in neuron_layers:
            screen[l, :view.ffn_width(l)] = torch.tensor(eff["neuron_screen"][str(l)], dtype=torch.float64)
        ranking, neuron_exact = rank_neurons(view, batches, acts(), screen, neuron_layers, rescore, max_rows)
        ks, nfs = neuron_curve(view, batches, heads, ranking, ends, metric)
        return {"ranking": {str(l): r for l, r in ranking.items()}, "exact": neuron_exact, "k": ks, "f": nfs}

    nd = cache("neurons", neuron_stage)
    ranking = {int(l): r for l, r in nd["ranking"].items()}
    ks, nfs = nd["k"], nd["f"]
    k_needed = first_reaching(ks, nfs, target if target is not None else 0.9)
    paper = hd["paper"]
    out = {"n_prompts": sum(pr.n for _, pr in batches), "nl_model": ends[0], "nl_empty": ends[1],
           "paper_nl_model": paper[0], "paper_nl_empty": paper[1],
           "components": [{"name": c.name(), "kind": c.kind, "layer": c.layer, "index": c.index,
                           "role": P.ROLES[c.role], "effect": round(effect[c], 6), "screen": round(v, 6),
                           "exact": c in ex} for c, v in zip(comps, sv)],
           "head_curve": {"n": ns, "faithfulness": [round(f, 4) for f in fs]},
           "heads": [f"{l}.{h}" for l, h in heads], "faithfulness": round(fs[ns.index(n_heads)], 4),
           "neuron_curve": {"per_layer": ks, "faithfulness": [round(f, 4) for f in nfs],
                            "layers": neuron_layers},
           "neurons_per_layer_needed": k_needed,
           "neurons": {str(l): ranking[l][:k_needed or 50] for l in neuron_layers},
           "neuron_exact": nd["exact"]}
    if mode == "exact":
        out["screen_recall_top20"] = recall(sv, [ex[c] for c in comps])
    else:
        # among the verified only (the screen's top), so k is at most half of them to mean anything
        todo = [comps[i] for i, _ in eff["exact"]]
        out["screen_recall_of_verified"] = recall([sv[comps.index(c)] for c in todo], [ex[c] for c in todo],
                                                  min(20, len(todo) // 2))
    return out


def rank_neurons(view: ModelView, batches: Batches, acts, screen: Tensor, layers: list[int], rescore: int,
                 max_rows: int) -> tuple[dict[int, list[int]], list[dict]]:
    """Per layer: the top `rescore` screened neurons re-measured exactly and ranked by that, then the rest by
    the screen. Returns the ranking and the exact rows (with the screen's value beside them)."""
    comps = [P.Component("neuron", l, int(k), len(P.ROLES) - 1) for l in layers
             for k in torch.argsort(screen[l][:view.ffn_width(l)], descending=True, stable=True)[:rescore].tolist()]
    ex = exact_mean(view, batches, acts, comps, max_rows).tolist()
    ranking = {}
    for l in layers:
        mine = sorted(((e, c.index) for c, e in zip(comps, ex) if c.layer == l), key=lambda t: -t[0])
        head = [k for _, k in mine]
        seen = set(head)
        rest = [k for k in torch.argsort(screen[l][:view.ffn_width(l)], descending=True, stable=True).tolist() if k not in seen]
        ranking[l] = head + rest
    rows = [{"layer": c.layer, "index": c.index, "effect": round(e, 6), "screen": round(float(screen[c.layer, c.index]), 6)}
            for c, e in zip(comps, ex)]
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


def agreement(view: ModelView, tokenizer, batches: Batches, heads: set[tuple[int, int]],
              neurons: set[tuple[int, int]], layers: list[int], batch_size: int, verify: int) -> dict:
    """IoU of the circuit's heads with the top heads of `surgery heads` (zero ablation: attribution screen, then
    the exact drop of the mean answer-token log-prob for the top `verify`), and of its neurons with the
    top neurons of `surgery cna` (importance summed over the same prompts), each top list as long as ours.
    One case per scored answer token (teacher forced: prompt + the answer tokens before it)."""
    seqs = [row.tolist() + ans[:j].tolist() for _, pr in batches for row, ans in zip(pr.clean, pr.r)
            for j in range(pr.n_ans)]
    tgt = [int(t) for _, pr in batches for ans in pr.r for t in ans]
    packed = hs.pack(seqs, tgt, batch_size, pad_id(tokenizer))
    att = hs.attribution(view, packed)
    cand = sorted(((l, h) for l in range(view.n_layers) for h in range(view.n_heads)), key=lambda lh: float(att[lh]))
    cand = cand[:max(verify, len(heads))]
    rows = hs.scan(view, packed, len(seqs), cand, progress=False)
    _, base = hs._baseline(view, packed, len(seqs))
    drop = {lh: float(base.mean() - r["logprob"].mean()) for lh, r in rows.items()}
    top_heads = set(sorted(drop, key=lambda lh: -drop[lh])[:len(heads)])
    sc = cna.scan(view, seqs, layers, 10, pad_id(tokenizer), targets=tgt, batch_size=batch_size, progress=False)
    def top_by(total: dict[int, Tensor]) -> set[tuple[int, int]]:
        flat = [(float(v), l, i) for l in layers for i, v in enumerate(total[l].tolist())]
        return {(l, i) for _, l, i in sorted(flat, reverse=True)[:len(neurons)]}

    width = sum(view.ffn_width(l) for l in layers)
    return {"heads_iou": iou(heads, top_heads), "heads_top": sorted(f"{l}.{h}" for l, h in top_heads),
            "neurons_iou": iou(neurons, top_by(sc.total)), "neurons_iou_abs": iou(neurons, top_by(sc.total_abs)),
            "heads_chance": chance_iou(len(heads), view.n_layers * view.n_heads),
            "neurons_chance": chance_iou(len(neurons), width), "n_heads": len(heads), "n_neurons": len(neurons),
            "heads_note": "surgery heads: zero ablation, exact drop of the mean log-prob of each scored answer token",
            "neurons_note": "surgery cna: importance of each neuron for each scored answer token, summed over cases "
                            "(neurons_iou: signed sum, the paper's; neurons_iou_abs: sum of magnitudes)"}


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
        raise UsageError(f"{outdir} already holds a finished circuit; pass --force to overwrite it or choose another --out")
    runf = outdir / RUN_FILE
    if not runf.is_file():
        if any(outdir.iterdir()):
            raise UsageError(f"{outdir} already exists and is not a circuit run; pass --force to overwrite it or choose another --out")
        return False
    saved = json.loads(runf.read_text())
    diff = [k for k in sorted(set(saved) | set(run_config)) if saved.get(k) != run_config.get(k)]
    if diff:
        what = "; ".join(f"{k}: {saved.get(k)!r} there, {run_config.get(k)!r} now" for k in diff)
        raise UsageError(f"{outdir} holds an unfinished circuit run with another configuration ({what}); rerun with "
                         "its options to resume it, or pass --force / another --out")
    return True


def stage_cache(outdir: Path, prefix: str) -> Cache:
    """A `cache(name, compute)` that returns DIR/stages/PREFIX.NAME.json if a run finished it, else computes,
    writes it atomically and returns what was written (so a resumed run sees exactly what a fresh one does)."""
    def cache(name: str, fn: Callable[[], object]) -> object:
        f = outdir / STAGE_DIR / f"{prefix}.{name}.json"
        if f.is_file():
            return json.loads(f.read_text())
        val = json.loads(rep.json_text(fn()))
        rep.write_json(f, val)
        return val
    return cache


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
def check_options(task: str, faithfulness: float | None, mode: str, limit: int, verify: int, rescore: int,
                  templates: Sequence[str] | None, score: str = "teacher-forced") -> str:
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
        raise UsageError(f"surgery circuit uses one template, got {list(templates)}; pass one of {', '.join(TEMPLATES_OK)}")
    return templates[0] if templates else "calculate"


def run(model: str = "smollm2-135m", dtype: str = "float32", device: str = "cpu", task: str = "arithmetic",
        ops: Sequence[str] | None = None, operands: str = "0-9", templates: Sequence[str] | None = None,
        limit: int = 50, batch_size: int = 32, seed: int = 0, out: str | None = None, force: bool = False,
        faithfulness: float | None = None, mode: str = "screen", verify: int = 60, neuron_from: int | None = None,
        rescore: int = 16, max_rows: int = 1024, agree: bool = True, metric: str = "nl",
        score: str = "teacher-forced", include_wrong: bool = False, mean_sample: int | None = None,
        trust_remote_code: bool = False) -> rep.Report:
    """Find the arithmetic circuit per operator by activation patching (Eq. 1) and faithfulness (Eq. 2).

    Writes DIR/circuit.json (top-level "circuit": {"heads": ["L.H"], "mlps": [L]} = union over operators, "per_op"
    with each operator's circuit, effects of every head/MLP at each role, faithfulness curves, neuron ranking),
    DIR/circuit.md, DIR/effects.png (effect per layer x position) and DIR/faithfulness.png. --faithfulness F picks
    the fewest heads reaching F (default: the Pareto knee) and the neurons per layer reaching F (default 0.9).
    --score teacher-forced (default) scores every answer token given the ones before it; first: the first one."""
    t0 = time.time()
    template = check_options(task, faithfulness, mode, limit, verify, rescore, templates, score)
    if metric not in P.METRICS:
        raise UsageError(f"unknown --metric {metric!r}; use {' or '.join(P.METRICS)}")
    lo_hi = parse_operands(operands)
    ops = tuple(ops) if ops else ("+", "-", "*", "/")
    probs = sample(problems(ops, lo_hi, template, seed), mean_sample, seed)
    outdir = rep.check_out_dir(out) or Path("checkpoints") / "circuit"
    run_config = dict(model=model, dtype=dtype, device=device, task=task, ops=list(ops), operands=list(lo_hi),
                      template=template, limit=limit, batch_size=batch_size, seed=seed, faithfulness=faithfulness,
                      mode=mode, verify=verify, neuron_from=neuron_from, rescore=rescore, max_rows=max_rows,
                      metric=metric, score=score, include_wrong=include_wrong, mean_sample=mean_sample)
    resume = resuming(outdir, run_config, force)
    loaded = load_model(model, dtype, device, trust_remote_code=trust_remote_code)
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
        raise UsageError(f"the model answers fewer than 2 prompts of {few} correctly ({score} scoring) with a "
                         "usable counterfactual; widen --operands or drop those --ops")
    layers = list(range(nfrom, view.n_layers))
    start(outdir, run_config, resume)
    if not reused:
        save_means(gs, means_file)
    per_op = {}
    for op in tqdm(ops, desc="operators"):
        cache = stage_cache(outdir, arithmetic.OPS[op])
        per_op[op] = study_op(view, chosen[op], mode, verify, layers, rescore, faithfulness, max_rows, metric, cache)
        per_op[op]["circuit"] = {"heads": per_op[op]["heads"], "mlps": list(range(view.n_layers))}
    union = sorted({h for r in per_op.values() for h in r["heads"]}, key=lambda s: tuple(map(int, s.split("."))))
    union_set = {tuple(map(int, h.split("."))) for h in union}
    for op in ops:
        c = P.Circuit.full(view)
        c.heads[:] = False
        for l, h in union_set:
            c.heads[l, h] = True
        r = per_op[op]
        u = stage_cache(outdir, arithmetic.OPS[op])(
            "union", lambda op=op, c=c: {"heads": union, "nl": nl(view, chosen[op], c, metric)})
        r["union_faithfulness"] = round(P.faithfulness(u["nl"], r["nl_model"], r["nl_empty"]), 4)
    neurons = {(int(l), i) for r in per_op.values() for l, idx in r["neurons"].items() for i in idx}
    config = dict(task=task, ops=list(ops), operands=list(lo_hi), template=template, limit=limit, seed=seed,
                  faithfulness=faithfulness, mode=mode, verify=verify, neuron_from=nfrom, rescore=rescore,
                  batch_size=batch_size, score=score, metric=metric, include_wrong=include_wrong,
                  mean_sample=mean_sample)
    results = {"per_op": per_op, "union": {"heads": union, "n_neurons": len(neurons)}}
    if agree:
        all_b = [b for op in ops for b in chosen[op]]
        results["agreement"] = stage_cache(outdir, "all")("agreement", lambda: agreement(
            view, loaded.tokenizer, all_b, union_set, neurons, layers, batch_size, 20))
    data = rep.make("circuit", dict(loaded.describe(), n_layers=view.n_layers, n_heads=view.n_heads), config,
                    results, time.time() - t0)
    data["circuit"] = {"heads": union, "mlps": list(range(view.n_layers)),
                       "neurons": {str(l): sorted(i for ll, i in neurons if ll == l) for l in layers}}
    data["per_op"] = {op: r["circuit"] for op, r in per_op.items()}
    md = markdown(data)
    # each file atomically, circuit.json last: its presence marks the folder finished (the stages stay beside it)
    rep.write_text_atomic(outdir / "circuit.md", md)
    _write_bytes(outdir / "effects.png", effects_png(data, view.n_layers))
    _write_bytes(outdir / "faithfulness.png", faithfulness_png(data))
    rep.write_json(outdir / "circuit.json", data)
    return rep.Report(data=data, markdown=md, files=[outdir / f for f in ("circuit.json", "circuit.md", "effects.png", "faithfulness.png")])


# ---- rendering ------------------------------------------------------------------------------------------------
def markdown(data: dict) -> str:
    res, cfg = data["results"], data["config"]
    lines = [f"# Circuit: {data['model']['name']}, operands {cfg['operands'][0]}-{cfg['operands'][1]} "
             f"({cfg['mode']} mode, answers scored {cfg.get('score', 'first')})", "",
             rep.md_table(["op", "prompts", f"{cfg['metric']} model", f"{cfg['metric']} empty", "heads", "faithfulness", "union F",
                           "neurons/layer for F", "screen recall@20"],
                          [[op, r["n_prompts"], round(r["nl_model"], 3), round(r["nl_empty"], 3), len(r["heads"]),
                            r["faithfulness"], r["union_faithfulness"], r["neurons_per_layer_needed"],
                            r.get("screen_recall_top20", r.get("screen_recall_of_verified"))]
                           for op, r in res["per_op"].items()]), "",
             f"Union circuit: {len(res['union']['heads'])} heads ({_first(res['union']['heads'], 30)}), all "
             f"{data['model']['n_layers']} MLPs, {res['union']['n_neurons']} neurons.", ""]
    for op, r in res["per_op"].items():
        top = sorted(r["components"], key=lambda c: -c["effect"])[:8]
        hc, nc = r["head_curve"], r["neuron_curve"]
        lines += [f"## {op}", "", f"Heads: {', '.join(r['heads']) or '(none)'}", "",
                  rep.md_table(["component", "effect (Eq. 1)", "screen", "exact"],
                               [[c["name"], round(c["effect"], 4), round(c["screen"], 4), c["exact"]] for c in top]), "",
                  "Faithfulness vs heads kept (all MLPs): " + _curve(hc["n"], hc["faithfulness"]) + ".", "",
                  f"Faithfulness vs neurons kept per layer ({len(r['heads'])} circuit heads; layers "
                  f"{min(map(int, r['neurons']))}-{max(map(int, r['neurons']))} at the last position): "
                  + _curve(nc["per_layer"], nc["faithfulness"]) + ".", ""]
    if "agreement" in res:
        a = res["agreement"]
        lines += ["## Agreement", "", f"IoU(circuit heads, `surgery heads` top {a['n_heads']}): {a['heads_iou']} "
                  f"(chance {a.get('heads_chance')}); IoU(circuit neurons, `surgery cna` top {a['n_neurons']}): "
                  f"{a['neurons_iou']} signed sum, {a.get('neurons_iou_abs')} summed magnitudes "
                  f"(chance {a.get('neurons_chance')}).", ""]
    return "\n".join(lines)


def _curve(xs: Sequence[int], fs: Sequence[float]) -> str:
    return ", ".join(f"{x}: {f:.2f}" for x, f in zip(xs, fs))


def _first(names: Sequence[str], n: int) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def effects_png(data: dict, n_layers: int) -> bytes:
    """Per operator: layer x (MLP at each role, best head at each role) of the Eq. 1 effect."""
    plt = _plt()
    per_op = data["results"]["per_op"]
    R = len(P.ROLES)
    fig, axes = plt.subplots(1, len(per_op), figsize=(2.6 * len(per_op) + 1, 0.18 * n_layers + 1.5), squeeze=False)
    for ax, (op, r) in zip(axes[0], per_op.items()):
        grid = np.full((n_layers, 2 * R), -np.inf)
        for c in r["components"]:
            col = P.ROLES.index(c["role"]) + (0 if c["kind"] == "mlp" else R)
            grid[c["layer"], col] = max(grid[c["layer"], col], c["effect"])
        shown = np.sign(grid) * np.log10(1 + np.abs(grid))  # Eq. 1 spans decades (1 / P(r') can be huge)
        im = ax.imshow(shown, aspect="auto", origin="lower", cmap="RdBu_r", vmin=-np.abs(shown).max(), vmax=np.abs(shown).max())
        ax.set_xticks(range(2 * R), [f"mlp {x}" for x in P.ROLES] + [f"head {x}" for x in P.ROLES], rotation=90, fontsize=7)
        ax.set_title(op)
        fig.colorbar(im, ax=ax, shrink=0.7)
    axes[0][0].set_ylabel("layer")
    fig.suptitle("Eq. 1 effect, sign(E) log10(1 + |E|) (best head per layer and role)", fontsize=9)
    return rep.png_bytes(fig)


def faithfulness_png(data: dict) -> bytes:
    plt = _plt()
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


def load(path: str | Path) -> dict:
    """A circuit folder's circuit.json, with a clear error when it is not one."""
    f = Path(path) / "circuit.json"
    if not f.is_file():
        raise UsageError(f"{path} has no circuit.json; pass a folder written by `surgery circuit --out`")
    return json.loads(f.read_text())
