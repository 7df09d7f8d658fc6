"""Benchmark: one training step of full fine-tuning vs precise fine-tuning (surgery.precise), same process.

Both models are copies of the same weights and see the same batch (2-digit arithmetic, answer-only loss, left
padded, `surgery.training.answer_loss`). A step = forward + backward + AdamW step + zero_grad. Full: every parameter
trains. Precise: the K heads (q/k/v rows, o_proj columns) of --heads train, everything else frozen
(`surgery.precise.Precise`); the backward skips the weight gradients of frozen matrices and every layer below the
lowest trained one. Steps alternate full / precise (interleaved repeats, after warm-up steps) so load changes on a
shared machine hit both; the ratio of medians is reported.

    python bench/finetune.py [--model smollm2-135m] [--heads 14.2,...] [--batch 16] [--repeats 5]
    python bench/finetune.py --smoke    # a tiny random model, heads 1.2,3.4, batch 2, 1 repeat (smoke test)

Last line: speedup <x>x (full <s>s, precise <s>s), trained <n> of <N> params
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from surgery.edits.precise import Precise, select  # noqa: E402
from surgery.edits.training import Collator, answer_loss  # noqa: E402
from surgery.evals import arithmetic  # noqa: E402
from surgery.find.components import from_list, parse, shape_of  # noqa: E402
from surgery.io.loading import load_model  # noqa: E402
from surgery.model.batching import pad_id  # noqa: E402


def batch(tok, n: int) -> dict:
    probs = arithmetic.build(digits=(2,), templates=("calculate",), division="inverse", limit=n, seed=0)
    rows = []
    for p in probs:
        full, start = arithmetic.answer_tokens(tok, p["prompt"], p["answer"])
        rows.append({"input_ids": full, "labels": [-100] * start + full[start:]})
    return Collator(pad_id(tok))(rows)


def step(model, opt, b) -> tuple[float, float, float]:
    """(forward, backward, optimizer) seconds of one step."""
    t0 = time.perf_counter()
    loss = answer_loss(model, b)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return t1 - t0, t2 - t1, time.perf_counter() - t2


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--heads", default=None, help="list L.H,... or a heads.json (default: 8 heads spread over depth)")
    ap.add_argument(
        "--top-heads", type=int, default=None, help="of a heads.json: its top K (default 8); of a list: all (default)"
    )
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--smoke", action="store_true", help="a tiny random model, 2 heads, batch 2 (smoke test)")
    a = ap.parse_args()
    if a.smoke:
        from _smoke import scratch, tiny_model

        a.model, a.heads, a.batch, a.repeats = tiny_model(scratch("finetune")), "1.2,3.4", 2, 1
    loaded = load_model(a.model)
    shape = shape_of(loaded.model.config, loaded.name)
    if a.heads:
        listed = not (a.heads.strip().endswith(".json") or Path(a.heads.strip()).is_file())
        comps = parse(a.heads, shape, a.top_heads if a.top_heads is not None or listed else 8)
    else:
        comps = from_list("2.1,8.4,12.0,14.2,17.5,20.3,23.7,26.1")
    full = copy.deepcopy(loaded.model).train()
    prec = copy.deepcopy(loaded.model).train()
    b = batch(loaded.tokenizer, a.batch)
    sel = select(prec, comps)
    n_total = sum(p.numel() for p in full.parameters())
    with Precise(prec, sel):
        opt_f = torch.optim.AdamW(full.parameters(), lr=1e-5, weight_decay=0.0)
        opt_p = torch.optim.AdamW([p for p in prec.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.0)
        for _ in range(a.warmup):
            step(full, opt_f, b), step(prec, opt_p, b)
        phases_f, phases_p = [], []
        for _ in range(a.repeats):
            phases_f.append(step(full, opt_f, b))
            phases_p.append(step(prec, opt_p, b))
    tf, tp = [sum(x) for x in phases_f], [sum(x) for x in phases_p]
    f, p = statistics.median(tf), statistics.median(tp)
    lowest = min([l for l, _ in comps.heads] + list(comps.mlps))
    med = lambda xs, i: statistics.median(x[i] for x in xs)  # noqa: E731
    (ff, fb, fo), (pf, pb, po) = [[med(xs, i) for i in range(3)] for xs in (phases_f, phases_p)]
    print(
        f"phases (median s): full forward {ff:.3f} backward {fb:.3f} optimizer {fo:.3f}; precise forward {pf:.3f} "
        f"backward {pb:.3f} optimizer {po:.3f}; the precise backward is {pb / fb:.0%} of full's, its floor the "
        f"activation gradients of every layer above the lowest trained head (lowest: layer {lowest})"
    )
    print(
        json.dumps(
            {
                "model": loaded.name,
                "heads": comps.names(),
                "batch": a.batch,
                "tokens": int(b["input_ids"].numel()),
                "threads": torch.get_num_threads(),
                "full_s": [round(x, 3) for x in tf],
                "precise_s": [round(x, 3) for x in tp],
            }
        )
    )
    print(
        f"speedup {f / p:.2f}x (full {f:.3f}s, precise {p:.3f}s), trained {sel.trained_entries(prec):,} of "
        f"{n_total:,} params"
    )


if __name__ == "__main__":
    main()
