"""The small measurements behind the 2026-12-03 CNA changes (docs/benchmarks/cna.md, "Issue 16, 2026-12-03").

    python bench/cna_parts.py [--threads 2]
    python bench/cna_parts.py --smoke   # few timing repeats, one GEMM shape, a tiny random model (smoke test)

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


def topk_line(n: int = 50) -> None:
    z = torch.randn(11, 49152) * 3
    for th in (1, 2):
        torch.set_num_threads(th)
        print(
            f"topk k 32 of [11, 49152], {th} thread(s): torch.topk {best_ms(lambda: z.topk(32, -1), n):.2f} ms, "
            f"blocked {best_ms(lambda: cna._topk(z, 32), n):.2f} ms"
        )


def gemm_lines(threads: int, rows_list=(16, 44, 77, 154, 330), n: int = 10) -> None:
    torch.set_num_threads(threads)
    V, d = 49152, 576
    wu = torch.randn(V, d)
    for rows in rows_list:
        x, q, out = torch.randn(rows, d), torch.rand(rows, V), torch.empty(rows, V)
        r = best_ms(lambda: torch.matmul(x, wu.T, out=out), n)
        t = best_ms(lambda: q @ wu, n)
        print(
            f"gemm {rows} rows, {threads} threads: readout {rows * V * d / r / 1e6:.0f} GMAC/s, "
            f"tail mean {rows * V * d / t / 1e6:.0f} GMAC/s"
        )


def _range_only(self, a, log_a, lin, log_zr, mean_d, hi_d, lo_d):
    up, dn = torch.maximum(a * hi_d, a * lo_d), torch.minimum(a * hi_d, a * lo_d)
    return lin - torch.logaddexp(log_a, log_zr + up), lin - torch.logaddexp(log_a, log_zr + dn)


def model_lines(threads: int, model: str = "smollm2-135m", n: int = 32, m: int = 16, k: int = 100) -> None:
    """The tail-mean ablation on n cases, then the mm share of a batch-m score run (top-k each)."""
    torch.set_num_threads(threads)
    loaded = load_model(model)
    view, tok = ModelView(loaded.model), loaded.tokenizer
    probs = arithmetic.build(digits=(1,), templates=("calculate",), limit=n + m)
    seqs = list(arithmetic.cases(probs, tok)["input_ids"])[: n + m]
    layers, pad = list(range(view.n_layers)), pad_id(tok)
    batch = left_pad(seqs[:n], pad)
    real = cna.Scorer._tail_bounds
    for name, f in (("tail mean", real), ("vocabulary range only", _range_only)):
        cna.Scorer._tail_bounds = f
        r = cna.compare(view, batch, layers, k)
        print(
            f"bounds with {name}: {r.top.rescored / n:.1f} exact scores per case, "
            f"certified {int(r.top.certified.sum())}/{n}"
        )
    cna.Scorer._tail_bounds = real
    mass = [float((r.scorer_a.tail_cache[l][3] - r.scorer_a.tail_cache[l][2]).exp().median()) for l in layers]
    print(
        f"tail mass (median over cases) at layers 0, 5, ..., {layers[-1]}: " + ", ".join(f"{x:.3f}" for x in mass[::5])
    )
    from torch.profiler import ProfilerActivity, profile

    cna.compare(view, left_pad(seqs[n : n + m], pad), layers, k)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        cna.compare(view, left_pad(seqs[n : n + m], pad), layers, k)
    ev = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ev)
    mm = sum(e.self_cpu_time_total for e in ev if e.key == "aten::mm")
    print(f"mm share of a batch-{m} score run's CPU time: {100 * mm / total:.0f}%")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument(
        "--smoke", action="store_true", help="few repeats, one GEMM shape, a tiny random model (smoke test)"
    )
    args = ap.parse_args()
    if args.smoke:
        from _smoke import scratch, tiny_model

        tiny = tiny_model(scratch("cna_parts"), layers=2)
        topk_line(2)
        gemm_lines(1, (16,), 1)
        model_lines(1, tiny, 4, 2, 5)
        return
    topk_line()
    gemm_lines(args.threads)
    model_lines(args.threads)


if __name__ == "__main__":
    main()
