"""Is CNA's P% ranking what CNA says? The summed-delta score a `--keep P%` prune ranks by (each case's top
`exact_top` exact, every other neuron at the middle of its certified interval) against the same sum with EVERY
neuron scored exactly (`cna.compare(..., exhaustive=True)`), on a sample of the prune recipe's selection cases.

    python bench/cna_aggregate.py --against runs/sweep-cpu/state/reference --cases 24 [--score delta|reference]
    python bench/cna_aggregate.py --smoke   # a tiny random model and adapter, 4 cases, small data (smoke test)

Printed: Pearson and Spearman correlation of the two sums over the layers' neurons, and the overlap (Jaccard) of
the global top P% sets at 50/25/10/5%; then, for scale, the Jaccard of the exact top 50% with activation's top 50%
(mean |m_k| at the answer position) and the chance level of two random halves (1/3). A low agreement between the
midpoint sum and the exact sum would mean the P% budget ranks by bound artefacts, not by CNA.
"""

from __future__ import annotations

import argparse

import torch

from surgery.edits.lora import load_against
from surgery.edits.pruning import load_recipe, make_plan, make_task
from surgery.find import selectors
from surgery.find.cna import compare
from surgery.io.loading import load_model
from surgery.model.arch import ModelView
from surgery.model.batching import left_pad, pad_id


def top_set(scores: torch.Tensor, frac: float) -> set[int]:
    n = max(1, round(frac * scores.numel()))
    return set(scores.topk(n).indices.tolist())


def jaccard(a: set[int], b: set[int]) -> float:
    return len(a & b) / max(1, len(a | b))


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    rx, ry = x.argsort().argsort().double(), y.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([rx, ry]))[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--against", help="the reference LoRA adapter (a sweep's state/reference)")
    ap.add_argument("--cases", type=int, default=24, help="selection cases, spread evenly over all of them")
    ap.add_argument("--score", default="delta", choices=("delta", "reference"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default="smollm2-135m", help="the base model the adapter was trained on")
    ap.add_argument("--smoke", action="store_true", help="a tiny random model and adapter, 4 cases (smoke test)")
    a = ap.parse_args()
    sets = ["data.validation_size=400"]
    if a.smoke:
        from _smoke import RECIPE_SETS, adapter, scratch, tiny_model

        tmp = scratch("cna_aggregate")
        a.model = tiny_model(tmp)
        a.against, a.cases, a.batch, a.threads, sets = adapter(a.model, tmp), 4, 2, 1, sets + RECIPE_SETS
    elif a.against is None:
        ap.error("--against is required")
    torch.set_num_threads(a.threads)
    r = load_recipe("arithmetic-prune", sets, profile="cpu")
    loaded = load_model(a.model)
    ref = load_against(a.against, loaded)
    cases = make_task(r, loaded.tokenizer).cases
    layers = make_plan(r, loaded.model).layers
    step = max(1, len(cases.seqs) // a.cases)
    idx = list(range(0, len(cases.seqs), step))[: a.cases]
    seqs, targets = [cases.seqs[i] for i in idx], [cases.targets[i] for i in idx]
    va, vb = ModelView(ref), (ModelView(loaded.model) if a.score == "delta" else None)
    pad = pad_id(loaded.tokenizer)
    approx = {l: torch.zeros(va.ffn_width(l)) for l in layers}
    exact = {l: torch.zeros(va.ffn_width(l)) for l in layers}
    for s in range(0, len(seqs), a.batch):
        batch = left_pad(seqs[s : s + a.batch], pad)
        tgt = torch.tensor(targets[s : s + a.batch])
        for out, ex in ((approx, False), (exact, True)):
            c = compare(
                va, batch, layers, r.cna.exact_top, view_b=vb, target=tgt, exhaustive=ex, max_rescore=r.cna.max_rescore
            )
            for l in layers:
                out[l] += c.delta[l].sum(0)
        print(f"cases {min(s + a.batch, len(seqs))}/{len(seqs)}", flush=True)
    x, y = torch.cat([approx[l] for l in layers]), torch.cat([exact[l] for l in layers])
    print(
        f"{len(seqs)} cases, layers {layers[0]}-{layers[-1]}, score {a.score}: "
        f"pearson {float(torch.corrcoef(torch.stack([x, y]))[0, 1]):.3f}, spearman {spearman(x, y):.3f}"
    )
    for frac in (0.5, 0.25, 0.10, 0.05):
        print(f"top {frac:.0%}: Jaccard(midpoint sum, exact sum) = {jaccard(top_set(x, frac), top_set(y, frac)):.3f}")
    inp = selectors.Inputs(ModelView(loaded.model), layers, pad, seqs, targets)
    act = torch.cat([v for _, v in sorted(selectors.score("task", "activation", inp).items())])
    print(
        f"top 50%: Jaccard(exact CNA, activation) = {jaccard(top_set(y, 0.5), top_set(act, 0.5)):.3f} "
        f"(two random halves: 0.333)"
    )


if __name__ == "__main__":
    main()
