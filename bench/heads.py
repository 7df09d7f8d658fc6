"""Benchmark: `surgery heads --mode exact` vs the straightforward reference (the paper's code path), same process.

Reference: for every head, deep-copy the model, zero the head's o_proj input columns, and run every case on its
own (one prompt per forward, full logits, argmax of the last position). Surgery: `surgery.commands.heads.run`
(model load, packing, clean passes, batched prefix-reuse scan, reports all included in its time). Same heads, same
cases; the per-case correctness of every head must be identical.

    python bench/heads.py [--model smollm2-135m] [--digits 1] [--limit 100] [--layers 0,15,29]
    python bench/heads.py --smoke       # a tiny random model, 6 problems, layers 0,1 (seconds; the smoke test)

The default layers (first, middle, last; all their heads) give the same mean depth above the ablated layer as a
full scan, so the ratio is representative of scanning every head. Last line:
    speedup <x>x (reference <s>s, surgery <s>s), identical=<true|false>
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from surgery.commands import heads as heads_cmd  # noqa: E402
from surgery.evals import arithmetic  # noqa: E402
from surgery.io.loading import load_model  # noqa: E402
from surgery.model.arch import ModelView  # noqa: E402


def reference(model, cases, heads) -> dict:
    """{(layer, head): [bool per case]}: deep copy per head, zero its columns, one case per forward."""
    out = {}
    for l, h in heads:
        m = copy.deepcopy(model)
        ModelView(m).zero_head_weights(l, h)
        ok = []
        with torch.no_grad():
            for ids, tgt in zip(cases["input_ids"], cases["target"]):
                ok.append(int(m(input_ids=torch.tensor([ids])).logits[0, -1].argmax()) == tgt)
        out[l, h] = ok
        del m
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--digits", default="1")
    p.add_argument("--limit", type=int, default=100, help="problems (cases = their answer tokens)")
    p.add_argument("--layers", default="0,15,29", help="scan every head of these layers")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--smoke", action="store_true", help="a tiny random model at the smallest sizes (smoke test)")
    a = p.parse_args(argv)
    if a.smoke:
        from _smoke import scratch, tiny_model

        a.model, a.limit, a.layers, a.batch_size = tiny_model(scratch("heads"), layers=2), 6, "0,1", 8
    digits = tuple(int(x) for x in a.digits.split(","))
    loaded = load_model(a.model)
    view = ModelView(loaded.model)
    heads = [(int(l), h) for l in a.layers.split(",") for h in range(view.n_heads)]
    cases = arithmetic.cases(
        arithmetic.build(digits=digits, templates=arithmetic.DEFAULT_TEMPLATES, limit=a.limit), loaded.tokenizer
    )
    print(f"{len(heads)} heads x {len(cases)} cases, torch threads {torch.get_num_threads()}", flush=True)

    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        heads_cmd.run(model=a.model, digits=digits, limit=a.limit, batch_size=a.batch_size, out=out, only_heads=heads)
        t_surgery = time.perf_counter() - t
        rows = {}
        for line in (Path(out) / "heads.partial.r0.jsonl").read_text().splitlines():
            r = json.loads(line)
            rows[r["layer"], r["head"]] = [c == "1" for c in r["correct"]]
    print(f"surgery: {t_surgery:.1f}s", flush=True)

    t = time.perf_counter()
    ref = reference(loaded.model, cases, heads)
    t_ref = time.perf_counter() - t
    print(f"reference: {t_ref:.1f}s", flush=True)
    diff = [f"{l}.{h}" for l, h in heads if ref[l, h] != rows.get((l, h))]
    if diff:
        print(f"heads whose per-case correctness differs: {diff}")
    print(
        f"speedup {t_ref / t_surgery:.1f}x (reference {t_ref:.1f}s, surgery {t_surgery:.1f}s), "
        f"identical={'true' if not diff else 'false'}"
    )


if __name__ == "__main__":
    main()
