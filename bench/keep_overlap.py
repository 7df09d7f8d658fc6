"""How alike are the selectors' keep sets? Jaccard index |A & B| / |A | B| of the kept (layer, neuron) pairs of
every two selectors at each budget of a prune sweep folder, beside what two random sets of the same sizes share
on average (for equal sizes n of N: n / (2N - n), e.g. 1/3 at 50%).

    python bench/keep_overlap.py --sweep runs/sweep-cpu
    python bench/keep_overlap.py --smoke        # made-up cells of 3 selectors at 2 budgets (smoke test)

Reads DIR/cells.jsonl only (no model). Last line: `overlap <budgets> budgets, <pairs> selector pairs`
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections import defaultdict
from pathlib import Path


def keep_pairs(cell: dict) -> set[tuple[int, int]]:
    return {(int(layer), int(i)) for layer, idx in cell["keep"].items() for i in idx}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / max(1, len(a | b))


def chance(n_a: int, n_b: int, total: int) -> float:
    """Expected |A & B| / |A | B| of two independent uniform sets of sizes n_a, n_b out of `total`."""
    inter = n_a * n_b / total
    return inter / (n_a + n_b - inter)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", help="a prune sweep folder (DIR/cells.jsonl)")
    ap.add_argument(
        "--total", type=int, default=None, help="neurons in the pruned layers (default: from the cells' kept_fraction)"
    )
    ap.add_argument("--smoke", action="store_true", help="made-up cells in a temporary folder (smoke test)")
    a = ap.parse_args()
    if a.smoke:
        from _smoke import cells, scratch

        a.sweep = str(cells(scratch("keep_overlap"), {2: 64, 3: 64}).parent)
    elif a.sweep is None:
        ap.error("--sweep is required")
    path = Path(a.sweep) / "cells.jsonl"
    if not path.is_file():
        sys.exit(f"{path} not found; --sweep needs a prune sweep folder with cells.jsonl")
    by_budget: dict[str, dict[str, dict]] = defaultdict(dict)
    for line in path.read_text().splitlines():
        try:
            c = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill
        by_budget[c["budget"]][c["selector"]] = c
    pairs = 0
    print("| budget | selector A | selector B | Jaccard | chance |")
    print("|---|---|---|---|---|")
    for budget, cells in by_budget.items():
        sets = {name: keep_pairs(c) for name, c in cells.items()}
        for x, y in itertools.combinations(sorted(sets), 2):
            total = a.total or round(len(sets[x]) / cells[x]["kept_fraction"])
            print(
                f"| {budget} | {x} | {y} | {jaccard(sets[x], sets[y]):.3f} | "
                f"{chance(len(sets[x]), len(sets[y]), total):.3f} |"
            )
            pairs += 1
    print(f"overlap {len(by_budget)} budgets, {pairs} selector pairs")


if __name__ == "__main__":
    main()
