"""The small measurements behind the 2026-12-03 CNA changes (docs/benchmarks/cna.md, "Issue 16, 2026-12-03").

    python bench/cna_parts.py [--threads 2]

Prints, on this machine:
- topk: torch.topk vs cna._topk (blocked) for k 32 of [11, 49152] at 1 and 2 threads (ms, best of 50);
- gemm: GMAC/s of [rows, d] x [d, V] (the readout) and [rows, V] x [V, d] (the tail mean) for several row counts;
- tail mean: exact scores per case of SmolLM2's certified top-k (32 cases, batch 32) with the tail-mean bounds
  and with bounds from the vocabulary range only (what dropping the q @ W_U product would cost);
- mm share: the fraction of CPU time in aten::mm for a batch-16 score run (torch profiler).
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
from surgery.find import cna  # noqa: E402
from surgery.io.loading import load_model  # noqa: E402
from surgery.model.arch import ModelView  # noqa: E402
from surgery.model.batching import left_pad, pad_id  # noqa: E402


def best_ms(f, n: int = 50) -> float:
    f()
    best = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def topk_line() -> None:
    z = torch.randn(11, 49152) * 3
    for th in (1, 2):
        torch.set_num_threads(th)
        print(
            f"topk k 32 of [11, 49152], {th} thread(s): torch.topk {best_ms(lambda: z.topk(32, -1)):.2f} ms, "
            f"blocked {best_ms(lambda: cna._topk(z, 32)):.2f} ms"
        )


def gemm_lines(threads: int) -> None:
    torch.set_num_threads(threads)
    V, d = 49152, 576
    wu = torch.randn(V, d)
    for rows in (16, 44, 77, 154, 330):
        x, q, out = torch.randn(rows, d), torch.rand(rows, V), torch.empty(rows, V)
        r = best_ms(lambda: torch.matmul(x, wu.T, out=out), 10)
        t = best_ms(lambda: q @ wu, 10)
        print(
            f"gemm {rows} rows, {threads} threads: readout {rows * V * d / r / 1e6:.0f} GMAC/s, "
            f"tail mean {rows * V * d / t / 1e6:.0f} GMAC/s"
        )


def _range_only(self, a, log_a, lin, log_zr, mean_d, hi_d, lo_d):
    up, dn = torch.maximum(a * hi_d, a * lo_d), torch.minimum(a * hi_d, a * lo_d)
    return lin - torch.logaddexp(log_a, log_zr + up), lin - torch.logaddexp(log_a, log_zr + dn)


def model_lines(threads: int) -> None:
    torch.set_num_threads(threads)
    loaded = load_model("smollm2-135m")
    view, tok = ModelView(loaded.model), loaded.tokenizer
    probs = arithmetic.build(digits=(1,), templates=("calculate",), limit=48)
    seqs = list(arithmetic.cases(probs, tok)["input_ids"])[:48]
    layers, pad = list(range(view.n_layers)), pad_id(tok)
    batch = left_pad(seqs[:32], pad)
    real = cna.Scorer._tail_bounds
    for name, f in (("tail mean", real), ("vocabulary range only", _range_only)):
        cna.Scorer._tail_bounds = f
        r = cna.compare(view, batch, layers, 100)
        print(
            f"bounds with {name}: {r.top.rescored / 32:.1f} exact scores per case, "
            f"certified {int(r.top.certified.sum())}/32"
        )
    cna.Scorer._tail_bounds = real
    mass = [float((r.scorer_a.tail_cache[l][3] - r.scorer_a.tail_cache[l][2]).exp().median()) for l in layers]
    print("tail mass (median over cases) at layers 0, 5, ..., 29: " + ", ".join(f"{m:.3f}" for m in mass[::5]))
    from torch.profiler import ProfilerActivity, profile

    cna.compare(view, left_pad(seqs[32:48], pad), layers, 100)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        cna.compare(view, left_pad(seqs[32:48], pad), layers, 100)
    ev = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ev)
    mm = sum(e.self_cpu_time_total for e in ev if e.key == "aten::mm")
    print(f"mm share of a batch-16 score run's CPU time: {100 * mm / total:.0f}%")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()
    topk_line()
    gemm_lines(args.threads)
    model_lines(args.threads)


if __name__ == "__main__":
    main()
