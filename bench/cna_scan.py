"""Dataset-mode CNA time and memory: `cna.scan` over the first N one-digit arithmetic cases of SmolLM2 with head 1.4
ablated as setting B (the `surgery cna --ablate-head 1.4 --digits 1 --top 20` computation), top-20 per case.

    python bench/cna_scan.py [--cases 32] [--batch 16]

Peak memory = VmHWM growth above the loaded model after a one-case warm-up (Linux clear_refs 5). Run it at two
case counts: memory set by the batch and block settings does not grow with the number of cases.
Last line: scan <n> cases: <s>s, certified <c>/<n>, rescored/case <r>, HWM growth above loaded <MB> MB, VmHWM <MB> MB
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from surgery.evals import arithmetic  # noqa: E402

from surgery import cna  # noqa: E402
from surgery.arch import ModelView  # noqa: E402
from surgery.batching import pad_id  # noqa: E402
from surgery.models import load_model  # noqa: E402


def _kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model("smollm2-135m")
    view = ModelView(loaded.model)
    seqs = list(arithmetic.cases(arithmetic.build(digits=(1,)), loaded.tokenizer)["input_ids"])[:args.cases]
    layers, pad = list(range(view.n_layers)), pad_id(loaded.tokenizer)
    cna.scan(view, seqs[:1], layers, 20, pad, ablate_b=((1, 4),), progress=False)  # vocabulary ranges (disk-cached)
    print(f"loaded: VmRSS {_kb('VmRSS') / 1024:.0f} MB", flush=True)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before, t = _kb("VmRSS"), time.time()
    sc = cna.scan(view, seqs, layers, 20, pad, ablate_b=((1, 4),), batch_size=args.batch, progress=False)
    n = len(seqs)
    print(f"load average {os.getloadavg()[0]:.1f}, threads {torch.get_num_threads()}")
    print(f"scan {n} cases: {time.time() - t:.0f}s, certified {int(sc.certified.sum())}/{n}, rescored/case "
          f"{sc.rescored / n:.0f}, HWM growth above loaded {(_kb('VmHWM') - before) / 1024:.0f} MB, "
          f"VmHWM {_kb('VmHWM') / 1024:.0f} MB")


if __name__ == "__main__":
    main()
