"""CNA per case, one code tree against another: run it once per tree, alternating, in the same session.

    python bench/cna_ab.py ROOT [--ablate]        # ROOT: a checkout (e.g. `git worktree add /tmp/base <commit>`)

Imports surgery from ROOT, scores 32 one-digit cases (calculate template) at batch 16, top-100, over all layers:
the score (or with --ablate the delta clean - head 1.4 zeroed), 4 timed repeats after a warm-up, and the batched
forward of the same cases. Prints min and median ms per case.
"""

from __future__ import annotations

import statistics
import sys
import time

root = sys.argv[1]
ablate = ((1, 4),) if "--ablate" in sys.argv[2:] else ()
sys.path.insert(0, root + "/bench")
sys.path.insert(0, root)

import cna as bench_cna  # noqa: E402  (ROOT/bench/cna.py)

from surgery.model.batching import pad_id  # noqa: E402

view, tok, seqs = bench_cna._setup(48)
pad = pad_id(tok)
bench_cna.surgery_cases(view, seqs[:16], 100, 16, pad)
ts, fs = [], []
for _ in range(4):
    t = time.perf_counter()
    bench_cna.forward_cases(view, seqs[16:48], 16, pad)
    fs.append(time.perf_counter() - t)
    t = time.perf_counter()
    bench_cna.surgery_cases(view, seqs[16:48], 100, 16, pad, ablate=ablate)
    ts.append(time.perf_counter() - t)
print(
    f"{root} {'ablate 1.4' if ablate else 'score'}: surgery per case ms: min {min(ts) / 32e-3:.1f} "
    f"med {statistics.median(ts) / 32e-3:.1f} | forward min {min(fs) / 32e-3:.1f} "
    f"med {statistics.median(fs) / 32e-3:.1f}"
)
