"""Where dataset-mode CNA's peak memory sits: RSS against glibc's heap and mmapped blocks at the RSS peak.

    python bench/cna_peak.py [--cases 64] [--batch 16] [--held 16777216] [--model smollm2-135m]
    python bench/cna_peak.py --smoke    # a tiny random model, 4 cases at batch 2 (smoke test)

A thread samples VmRSS every 5 ms during `cna.scan` (SmolLM2, head 1.4 ablated as B, top-20, all layers) and, at
each new maximum, reads glibc's `mallinfo2()` (summed over arenas): heap arena bytes (in use / free) and mmapped
bytes. Printed: RSS after loading, after a one-case warm-up (which pages in the mapped weights), and the
breakdown at the peak. Linux with glibc only.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from surgery.evals import arithmetic  # noqa: E402
from surgery.find import cna  # noqa: E402
from surgery.io.loading import load_model  # noqa: E402
from surgery.model.arch import ModelView  # noqa: E402
from surgery.model.batching import pad_id  # noqa: E402


class MallInfo2(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
    ]


LIBC = ctypes.CDLL("libc.so.6")
LIBC.mallinfo2.restype = MallInfo2


def rss_mb() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    return 0


def heap() -> str:
    m = LIBC.mallinfo2()
    return (
        f"heap {m.arena >> 20} MB (in use {m.uordblks >> 20}, free {m.fordblks >> 20}), "
        f"mmapped {m.hblkhd >> 20} MB in {m.hblks} blocks"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--held", type=int, default=cna.HELD, help="base-logit floats per setting (cna.scan held)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--smoke", action="store_true", help="a tiny random model, 4 cases at batch 2 (smoke test)")
    args = ap.parse_args()
    if args.smoke:
        from _smoke import scratch, tiny_model

        args.model, args.cases, args.batch = tiny_model(scratch("cna_peak"), layers=2), 4, 2
    loaded = load_model(args.model)
    print(f"loaded: RSS {rss_mb()} MB; {heap()}")
    view = ModelView(loaded.model)
    seqs = list(
        arithmetic.cases(
            arithmetic.build(
                digits=(1,), templates=arithmetic.DEFAULT_TEMPLATES
            ),  # the cases of `surgery cna --digits 1`
            loaded.tokenizer,
        )["input_ids"]
    )[: args.cases]
    layers, pad = list(range(view.n_layers)), pad_id(loaded.tokenizer)
    cna.scan(view, seqs[:1], layers, 20, pad, ablate_b=((1, 4),), progress=False)
    print(f"after warm-up: RSS {rss_mb()} MB; {heap()}")
    peak = {"rss": 0, "at": ""}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            r = rss_mb()
            if r > peak["rss"]:
                peak.update(rss=r, at=heap())
            time.sleep(0.005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    start = time.time()
    cna.scan(view, seqs, layers, 20, pad, ablate_b=((1, 4),), batch_size=args.batch, held=args.held, progress=False)
    done.set()
    t.join()
    print(
        f"scan {len(seqs)} cases, "
        f"{cna.cases_per_pass(args.batch, args.held, len(layers), view.unembed_matrix().shape[0])}"
        f" per pass, {time.time() - start:.0f}s, threads {torch.get_num_threads()}: "
        f"peak RSS {peak['rss']} MB; at the peak {peak['at']}"
    )


if __name__ == "__main__":
    main()
