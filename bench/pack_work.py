"""Benchmark: what the head scan's shared-prefix layout saves, in token rows per ablation forward (no model runs).

`surgery.heads.pack` lays a batch out as shared prefix | left padding | suffix; an ablated forward runs the prefix
once (then reuses its keys/values) and the suffix for every row: P + B * (T - P) token rows instead of B * T with
plain left padding (window=0). Counted with the real SmolLM2 tokenizer on the capitals table and on the arithmetic
suite (calculate template), batch 64, as `surgery heads` packs them. Deterministic: a count, not a timing.

    python bench/pack_work.py
    python bench/pack_work.py --smoke   # 20 rows of each table (smoke test)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transformers import AutoTokenizer

from surgery.evals import arithmetic, tasks
from surgery.find import head_scan as H


def work(ids, targets, batch_size: int = 64) -> dict:
    """Token rows per ablation forward (all batches) with plain padding and with the shared prefix."""
    out = {}
    for name, window in (("plain", 0), ("shared", None)):
        bs = H.pack(ids, targets, batch_size, 0, window)
        out[name] = sum(b.prefix + b.input_ids.shape[0] * (b.input_ids.shape[1] - b.prefix) for b in bs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="20 rows of each table (smoke test)")
    a = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(Path(__file__).resolve().parents[1] / "checkpoints" / "base" / "smollm2-135m")
    rows = tasks.load_cases("capitals.csv")
    if a.smoke:
        rows = rows.select(range(20))
    c = tasks.cases(tok, rows)
    sets = {f"capitals.csv ({len(rows)} rows)": c}
    for d, limit in (((1,), 20 if a.smoke else None), ((1, 2), 20 if a.smoke else 200)):
        sets[f"arithmetic digits {d} (limit {limit})"] = arithmetic.cases(
            arithmetic.build(digits=d, templates=arithmetic.DEFAULT_TEMPLATES, limit=limit), tok
        )
    for name, cs in sets.items():
        w = work(cs["input_ids"], cs["target"])
        print(
            f"{name}: {len(cs)} cases, token rows per ablation: plain {w['plain']}, shared prefix {w['shared']} "
            f"({100 * (1 - w['shared'] / w['plain']):.0f}% fewer)"
        )


if __name__ == "__main__":
    main()
