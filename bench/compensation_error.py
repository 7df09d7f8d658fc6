"""Why bias compensation can hurt: the FFN-output error it leaves at the answer position, per choice of means.

For a keep set (a sweep cell's saved `keep`), each deep layer's removed neurons R contribute sum_{k in R} m_k v_k.
Cutting them leaves that whole vector as the error; FLAP's compensation replaces it by sum_k (m_k - mu_k) v_k.
Measured at the position the answer is read from (the last prompt token) of every task case, relative to the
uncompensated error, for three choices of the means mu_k: over every prompt token (what `compensate=true` does),
over every token but the first (the attention-sink position, where a few neurons fire far above their usual
range), and over the last position only (the one the loss reads).

    python bench/compensation_error.py --cells runs/abl16-control/cells.jsonl [--model smollm2-135m]
    python bench/compensation_error.py --smoke      # a tiny random model, made-up cells, a few prompts (smoke test)

Last line: error ratio (compensated / uncompensated, sum over layers of squared norms): all <r>, no-first <r>, last <r>
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from surgery.edits.pruning import load_recipe, make_task  # noqa: E402
from surgery.io.loading import load_model  # noqa: E402
from surgery.model.arch import ModelView  # noqa: E402
from surgery.model.batching import batches, left_pad, pad_id, position_ids  # noqa: E402
from surgery.model.hooks import Hooks  # noqa: E402
from surgery.model.slicing import removed  # noqa: E402


def coefficients(view: ModelView, seqs: list[list[int]], layers: list[int], pad: int, bs: int = 32):
    """Per layer: m at every real token [tokens, N], which tokens are first / last of their prompt."""
    ms, first, last = {l: [] for l in layers}, [], []
    for idx in batches(len(seqs), bs):
        ids, mask = left_pad([seqs[i] for i in idx], pad)
        with torch.no_grad(), Hooks(view) as h:
            h.capture("m", layers=layers, positions=None)
            view.model(
                input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), logits_to_keep=1, use_cache=False
            )
        on = mask.bool()
        pos = position_ids(mask)
        first.append(pos[on] == 0)
        last.append((torch.arange(mask.shape[1]) == mask.shape[1] - 1).expand_as(mask)[on])
        for l in layers:
            ms[l].append(h.store["m", l][on].double())
    return {l: torch.cat(v) for l, v in ms.items()}, torch.cat(first), torch.cat(last)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--selector", default=None, help="the cell's selector (default: the first cell's)")
    ap.add_argument("--smoke", action="store_true", help="a tiny random model, made-up cells, few prompts (smoke test)")
    a = ap.parse_args()
    sets = []
    if a.smoke:
        from _smoke import RECIPE_SETS, cells, scratch, tiny_model

        tmp = scratch("compensation_error")
        a.model, a.cells, sets = tiny_model(tmp), str(cells(tmp, {2: 64, 3: 64})), RECIPE_SETS
    elif a.cells is None:
        ap.error("--cells is required")
    cells = [json.loads(x) for x in open(a.cells)]
    cell = next(c for c in cells if a.selector in (None, c["selector"]))
    keep = {int(l): torch.tensor(v) for l, v in cell["keep"].items()}
    loaded = load_model(a.model)
    view, tok = ModelView(loaded.model), loaded.tokenizer
    task = make_task(load_recipe("arithmetic-prune", sets, profile="cpu"), tok)
    m, first, last = coefficients(view, task.cases.seqs, sorted(keep), pad_id(tok))
    print(f"cell {cell['budget']} {cell['selector']}: {len(task.cases.seqs)} prompts, {len(first)} tokens")
    tot = {"none": 0.0, "all": 0.0, "no-first": 0.0, "last": 0.0}
    for l in sorted(keep):
        gone = removed(keep[l], view.ffn_width(l))
        v = view.values(l).double()[gone]  # [R, d]
        ml = m[l][:, gone]
        mus = {"all": ml.mean(0), "no-first": ml[~first].mean(0), "last": ml[last].mean(0)}
        at = ml[last]  # the answer-reading positions
        err = {"none": (at @ v).pow(2).sum(-1).mean()}
        err.update({k: ((at - mu) @ v).pow(2).sum(-1).mean() for k, mu in mus.items()})
        for k in tot:
            tot[k] += float(err[k].detach())
        top = ml[first].abs().mean(0).max() / ml[~first].abs().mean(0).clamp_min(1e-9).max()
        print(
            f"layer {l}: removed {len(gone)}, error / uncompensated: all {err['all'] / err['none']:.3f}, "
            f"no-first {err['no-first'] / err['none']:.3f}, last {err['last'] / err['none']:.3f}; "
            f"largest mean |m| at the first token / elsewhere {float(top):.1f}"
        )
    print(
        "error ratio (compensated / uncompensated, sum over layers of squared norms): "
        f"all {tot['all'] / tot['none']:.3f}, "
        f"no-first {tot['no-first'] / tot['none']:.3f}, last {tot['last'] / tot['none']:.3f}"
    )


if __name__ == "__main__":
    main()
