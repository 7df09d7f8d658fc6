"""CNA per case, one code tree against another: run it once per tree, alternating, in the same session.

    python bench/cna_ab.py ROOT [--ablate]        # ROOT: a checkout (e.g. `git worktree add /tmp/base <commit>`)
    python bench/cna_ab.py --smoke                # this tree, a tiny random model, 4 cases, both settings

Imports surgery from ROOT, scores 32 one-digit cases (calculate template) at batch 16, top-100, over all layers:
the score (or with --ablate the delta clean - head 1.4 zeroed), 4 timed repeats after a warm-up, and the batched
forward of the same cases. Prints min and median ms per case.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root", nargs="?", help="a checkout of surgery (its bench/cna.py and surgery/ are imported)")
    ap.add_argument("--ablate", action="store_true", help="the delta clean - head 1.4 zeroed instead of the score")
    ap.add_argument("--smoke", action="store_true", help="this tree, a tiny random model, 4 cases (smoke test)")
    a = ap.parse_args()
    if a.root is None and not a.smoke:
        ap.error("give ROOT, a checkout to import surgery from")
    root = str(Path(__file__).resolve().parents[1]) if a.smoke else a.root
    sys.path.insert(0, root + "/bench")
    sys.path.insert(0, root)

    import cna as bench_cna  # (ROOT/bench/cna.py)

    from surgery.model.batching import pad_id

    if a.smoke:
        from _smoke import scratch, tiny_model

        tiny = tiny_model(scratch("cna_ab"), layers=2)
        for ablate in ((), ((1, 4),)):
            run(bench_cna, root, bench_cna._setup(6, tiny), pad_id, ablate, warm=2, n=4, batch=2, k=5, repeats=1)
    else:
        ablate = ((1, 4),) if a.ablate else ()
        run(bench_cna, root, bench_cna._setup(48), pad_id, ablate)


def run(bench_cna, root, setup, pad_id, ablate, warm=16, n=32, batch=16, k=100, repeats=4) -> None:
    view, tok, seqs = setup
    pad = pad_id(tok)
    bench_cna.surgery_cases(view, seqs[:warm], k, batch, pad)
    ts, fs = [], []
    cases = seqs[warm : warm + n]
    for _ in range(repeats):
        t = time.perf_counter()
        bench_cna.forward_cases(view, cases, batch, pad)
        fs.append(time.perf_counter() - t)
        t = time.perf_counter()
        bench_cna.surgery_cases(view, cases, k, batch, pad, ablate=ablate)
        ts.append(time.perf_counter() - t)
    ms = n * 1e-3
    print(
        f"{root} {'ablate 1.4' if ablate else 'score'}: surgery per case ms: min {min(ts) / ms:.1f} "
        f"med {statistics.median(ts) / ms:.1f} | forward min {min(fs) / ms:.1f} "
        f"med {statistics.median(fs) / ms:.1f}"
    )


if __name__ == "__main__":
    main()
