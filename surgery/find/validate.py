"""The paper's validations of CNA-selected neurons, each against a random-neuron control of equal size.

- mask (Table 5): zero the top-k neurons -> accuracy drop; keep only the top-k in the deep layers (zero the rest
  there) -> drop; coefficient drop of the top neurons under the head ablation (when the comparison ablates heads).
- pe (Table 6, prediction enhancing): inner products (cosine) between the lowest top neuron's value and the keys
  of the upper top neurons; the upper neurons' coefficient change when that lowest neuron is zeroed.
- fe (Table 8, feature enhancing): shallow neurons whose value, passed through the summed attention OV maps of the
  following layers up to mid-depth and the unembedding, has >= M number/operator tokens among its top-50 tokens;
  their count, and the accuracy drop when zeroing them vs the same number of random shallow neurons.
All accuracies are teacher-forced next-token accuracy on the task cases, neurons edited with hooks (no copies).
"""

from __future__ import annotations

import random
import re
from typing import Sequence

import torch
from torch import Tensor

from surgery.evals import arithmetic
from surgery.find.cna import head_masks
from surgery.find.neurons import Neuron, mean_coefficients, zero_scales
from surgery.io import report as rep
from surgery.model.arch import ModelView
from surgery.model.batching import pad_id, predict_cases
from surgery.model.hooks import Hooks

KS = (10, 20, 30, 50, 99)
NUMBER_WORDS = {
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "hundred",
    "plus",
    "minus",
    "times",
    "divided",
    "sum",
    "equals",
}


def run_validations(
    loaded,
    view: ModelView,
    data: dict,
    which: Sequence[str],
    digits,
    ops,
    templates,
    limit,
    seed: int,
    ablate,
    batch_size: int,
) -> dict:
    """Run the requested validations on the task cases; returns {name: results}."""
    kw = dict(ops=tuple(ops)) if ops else {}
    problems = arithmetic.build(
        digits=tuple(digits), templates=tuple(templates or arithmetic.DEFAULT_TEMPLATES), seed=seed, limit=limit, **kw
    )
    cases = arithmetic.cases(problems, loaded.tokenizer)
    top = [(r["layer"], r["index"]) for r in data["neurons"]]
    ctx = _Ctx(loaded, view, cases, batch_size, random.Random(seed))
    out = {}
    if "mask" in which:
        out["mask"] = mask(ctx, top, ablate)
    if "pe" in which:
        out["pe"] = prediction_enhancing(ctx, top[:30])
    if "fe" in which:
        out["fe"] = feature_enhancing(ctx, top)
    return out


class _Ctx:
    """What every validation needs: model, cases, a seeded RNG and cached baselines."""

    def __init__(self, loaded, view: ModelView, cases, batch_size: int, rng: random.Random):
        self.loaded, self.view, self.cases, self.batch_size, self.rng = loaded, view, cases, batch_size, rng
        self.base = self.accuracy({})

    def accuracy(self, scales: dict[int, Tensor]) -> float:
        with Hooks(self.view) as h:
            for layer, s in scales.items():
                h.scale_neurons(layer, s)
            pred = predict_cases(self.loaded.model, self.loaded.tokenizer, self.cases, self.batch_size, progress=False)
        return float(pred["correct"].float().mean())

    def zeroed(self, neurons: Sequence[Neuron]) -> dict[int, Tensor]:
        return zero_scales(self.view, neurons)

    def random_like(self, neurons: Sequence[Neuron], layers: Sequence[int] | None = None) -> list[Neuron]:
        """Random neurons disjoint from `neurons`: the same per-layer counts, or as many spread over `layers`
        (fewer if the pool runs out)."""
        taken = set(neurons)
        if layers is None:
            out: list[Neuron] = []
            for layer in sorted({l for l, _ in neurons}):
                pool = [(layer, i) for i in range(self.view.ffn_width(layer)) if (layer, i) not in taken]
                out += self.rng.sample(pool, min(len(pool), sum(l == layer for l, _ in neurons)))
            return out
        pool = [(l, i) for l in layers for i in range(self.view.ffn_width(l)) if (l, i) not in taken]
        return self.rng.sample(pool, min(len(pool), len(neurons)))

    def coefficients(self, ablate=(), scales: dict[int, Tensor] | None = None) -> dict[int, Tensor]:
        """Mean coefficient m [N] per layer at the answer position over all cases."""
        return mean_coefficients(
            self.view,
            list(self.cases["input_ids"]),
            list(range(self.view.n_layers)),
            pad_id(self.loaded.tokenizer),
            self.batch_size,
            head_masks=head_masks(self.view, ablate),
            scales=scales,
        )


def mask(ctx: _Ctx, top: list[Neuron], ablate) -> dict:
    """Table 5: zero top-k / keep only top-k in the deep layers, each vs random; coefficient drop under ablation."""
    n = ctx.view.n_layers
    deep = list(range(n // 2, n))
    rows = []
    for k in [k for k in KS if k <= len(top)] or [len(top)]:
        sel = top[:k]
        rnd = ctx.random_like(sel)
        keep_deep = [x for x in sel if x[0] in deep]
        rows.append(
            {
                "k": k,
                "zero_top_drop": ctx.base - ctx.accuracy(ctx.zeroed(sel)),
                "zero_random_drop": ctx.base - ctx.accuracy(ctx.zeroed(rnd)),
                "keep_top_deep_drop": ctx.base - ctx.accuracy(_keep_only(ctx, keep_deep, deep)),
                "keep_random_deep_drop": ctx.base
                - ctx.accuracy(_keep_only(ctx, ctx.random_like(keep_deep, deep), deep)),
                "kept_in_deep": len(keep_deep),
            }
        )
    out = {"baseline_acc": ctx.base, "n_cases": len(ctx.cases), "rows": rows}
    if ablate:
        out["coefficient_drop"] = _coef_drop(ctx, top[: KS[0]], ablate)
    return out


def _keep_only(ctx: _Ctx, keep: list[Neuron], layers: list[int]) -> dict[int, Tensor]:
    scales = {l: torch.zeros(ctx.view.ffn_width(l)) for l in layers}
    for l, i in keep:
        scales[l][i] = 1.0
    return scales


def _coef_drop(ctx: _Ctx, top: list[Neuron], ablate) -> dict:
    """Relative change of mean coefficients when the heads are ablated: top neurons vs random ones."""
    clean, abl = ctx.coefficients(), ctx.coefficients(ablate=ablate)
    return {
        "top_relative_change": _mean_abs_change(clean, abl, top),
        "random_relative_change": _mean_abs_change(clean, abl, ctx.random_like(top)),
        "k": len(top),
    }


def _mean_abs_change(clean: dict[int, Tensor], after: dict[int, Tensor], ns: Sequence[Neuron]) -> float:
    """(mean |m| after - mean |m| before) / mean |m| before over neurons ns: stable when some m are near 0."""
    before = sum(float(clean[l][i].abs()) for l, i in ns)
    return (sum(float(after[l][i].abs()) for l, i in ns) - before) / max(before, 1e-9)


def prediction_enhancing(ctx: _Ctx, top: list[Neuron]) -> dict:
    """Table 6 (PE-DAG): lowest top neuron's value vs upper top neurons' keys, and the effect of zeroing it."""
    v = ctx.view
    low = min(top)
    upper = [x for x in top if x[0] > low[0]]
    if not upper:
        return {"skipped": "all top neurons sit in one layer"}
    rnd_upper = ctx.random_like(upper)
    value = v.values(low[0])[low[1]].float()
    cos = lambda ns: sum(_key_cos(v, value, n) for n in ns) / len(ns)  # noqa: E731
    clean = ctx.coefficients()
    zero_low = ctx.coefficients(scales=ctx.zeroed([low]))
    zero_rnd = ctx.coefficients(scales=ctx.zeroed(ctx.random_like([low])))
    return {
        "lowest": f"{low[0]}_{low[1]}",
        "n_upper": len(upper),
        "cos_value_key_upper": cos(upper),
        "cos_value_key_random_upper": cos(rnd_upper),
        "upper_coef_change_zero_lowest": _mean_abs_change(clean, zero_low, upper),
        "upper_coef_change_zero_random_same_layer": _mean_abs_change(clean, zero_rnd, upper),
    }


def _key_cos(view: ModelView, value: Tensor, n: Neuron) -> float:
    """Cosine between a value vector and neuron n's (first) key: the gate for gated FFNs, fc1 for plain ones."""
    key = view.keys(n[0])[0][n[1]].float()
    return float(torch.nn.functional.cosine_similarity(value, key, dim=0))


@torch.no_grad()
def feature_enhancing(ctx: _Ctx, top: list[Neuron], candidates: int = 512, ms: Sequence[int] = (1, 2, 3)) -> dict:
    """Table 8: shallow neurons whose value, through the following layers' summed OV maps (to mid-depth) and the
    unembedding, has >= M number/operator tokens in its top-50. Candidates: the shallow neurons of the CNA
    ranking plus the `candidates` shallow neurons with the largest mean |m_k| * ||v_k|| on the task."""
    v, tok = ctx.view, ctx.loaded.tokenizer
    mid = v.n_layers // 2
    special = _number_tokens(tok)
    coef = ctx.coefficients()
    cands = _fe_candidates(v, coef, top, mid, candidates)
    counts = []
    for l, i in cands:
        vec = _summed_ov(v, l + 1, mid) @ v.values(l)[i].float()
        proj = v.readout(vec[None], torch.ones(1, 1, device=vec.device))[0]
        top50 = proj.topk(50).indices.tolist()
        counts.append(sum(t in special for t in top50))
    out = {"candidates": len(cands), "layers": f"0-{mid - 1}"}
    for m in ms:
        out[f"M>={m}"] = sum(c >= m for c in counts)
    fe = [n for n, c in zip(cands, counts) if c >= ms[0]]
    if fe:
        out["zero_fe_drop"] = ctx.base - ctx.accuracy(ctx.zeroed(fe))
        out["zero_random_shallow_drop"] = ctx.base - ctx.accuracy(ctx.zeroed(ctx.random_like(fe, range(mid))))
        out["examples"] = [f"{l}_{i}" for l, i in fe[:10]]
    return out


def _fe_candidates(v: ModelView, coef: dict[int, Tensor], top: list[Neuron], mid: int, n: int) -> list[Neuron]:
    shallow_top = [x for x in top if x[0] < mid]
    scored = [
        (float(coef[l].abs()[i] * v.values(l)[i].norm()), (l, i)) for l in range(mid) for i in range(v.ffn_width(l))
    ]
    best = [x for _, x in sorted(scored, reverse=True)[:n]]
    return list(dict.fromkeys(shallow_top + best))


_OV_CACHE: dict[tuple[int, int, int], Tensor] = {}


def _summed_ov(v: ModelView, start: int, stop: int) -> Tensor:
    """Sum over heads of layers start..stop-1 of W_O^h W_V^h diag(g_ln): [d, d] (identity if empty)."""
    key = (id(v.model), start, stop)
    if key not in _OV_CACHE:
        dev = v.values(0).device
        total = torch.zeros(v.hidden_size, v.hidden_size, device=dev)
        for layer in range(start, stop):
            total += v.ov_matrix(layer)
        _OV_CACHE[key] = total if start < stop else torch.eye(v.hidden_size, device=dev)
    return _OV_CACHE[key]


def _number_tokens(tok) -> set[int]:
    ids = set()
    for i in range(len(tok)):
        s = tok.decode([i]).strip().lower()
        if s and (re.fullmatch(r"[0-9]+|[+\-*/=×÷]", s) or s in NUMBER_WORDS):
            ids.add(i)
    return ids


def markdown(v: dict) -> str:
    """The validations as Markdown tables."""
    parts = []
    if "mask" in v:
        m = v["mask"]
        parts.append(
            f"## Mask / keep (Table 5 form) — baseline accuracy {m['baseline_acc']:.3f} on {m['n_cases']} cases\n\n"
            + rep.md_table(
                ["k", "zero top", "zero random", "keep top (deep)", "keep random (deep)"],
                [
                    [
                        r["k"],
                        r["zero_top_drop"],
                        r["zero_random_drop"],
                        r["keep_top_deep_drop"],
                        r["keep_random_deep_drop"],
                    ]
                    for r in m["rows"]
                ],
            )
            + "\n\nValues are accuracy drops."
        )
        if "coefficient_drop" in m:
            c = m["coefficient_drop"]
            parts.append(
                f"Coefficient change under the head ablation: top-{c['k']} {c['top_relative_change']:+.3f} "
                f"vs random {c['random_relative_change']:+.3f} (relative)."
            )
    if "pe" in v:
        parts.append(
            "## Prediction enhancing (Table 6 form)\n\n"
            + rep.md_table(["measure", "value"], [[k, x] for k, x in v["pe"].items()])
        )
    if "fe" in v:
        parts.append(
            "## Feature enhancing (Table 8 form)\n\n"
            + rep.md_table(["measure", "value"], [[k, x] for k, x in v["fe"].items()])
        )
    return "\n\n".join(parts)
