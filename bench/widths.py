"""GEMM time against FFN width on this machine: does rounding a sliced layer's width up to a multiple of 8 / 16 /
64 (zero rows and columns) make it faster?

For each width w the FFN of one layer is timed as a plain PyTorch computation (gate and up: x @ W[w, d]^T, SiLU,
product, down: h @ W[d, w]^T) on `--tokens` tokens, fp32, in interleaved repeats (every width once per round, in a
shuffled order), median and spread over rounds. Run it on the machine that will serve the model (a GPU user:
`--device cuda`); the decision to pad is only worth it where the table shows a rounded width beats the exact one.

    python bench/widths.py --d 576 --tokens 64 --rounds 15 --threads 2
    python bench/widths.py --smoke      # 2 widths, 8 tokens, 1 round of 2 calls, 1 thread (smoke test)
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch


def ffn_time(d: int, w: int, tokens: int, device: str, reps: int) -> float:
    """Seconds per FFN call of width w (median inside one timing block of `reps` calls)."""
    g = torch.Generator().manual_seed(w)
    x = torch.randn(tokens, d, generator=g).to(device)
    gate, up = (torch.randn(w, d, generator=g).to(device) for _ in range(2))
    down = torch.randn(d, w, generator=g).to(device)

    def run():
        h = torch.nn.functional.silu(x @ gate.T) * (x @ up.T)
        return h @ down.T

    run()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        run()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d", type=int, default=576)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--widths", default="76,77,80,96,100,109,112,128,150,152,160,256,563,564,576,768,1000,1024,1536")
    p.add_argument("--smoke", action="store_true", help="2 widths, 1 round, 1 thread (smoke test)")
    a = p.parse_args()
    if a.smoke:
        a.widths, a.tokens, a.rounds, a.reps, a.threads = "76,80", 8, 1, 2, 1
    torch.set_num_threads(a.threads)
    widths = [int(w) for w in a.widths.split(",")]
    times: dict[int, list[float]] = {w: [] for w in widths}
    rng = random.Random(0)
    for _ in range(a.rounds):
        order = widths[:]
        rng.shuffle(order)
        for w in order:
            times[w].append(ffn_time(a.d, w, a.tokens, a.device, a.reps))
    print(f"d={a.d} tokens={a.tokens} threads={a.threads} device={a.device} rounds={a.rounds} reps={a.reps}")
    print(f"{'width':>6} {'median us':>10} {'min us':>8} {'max us':>8} {'ns/neuron':>10}")
    for w in widths:
        t = times[w]
        print(
            f"{w:>6} {1e6 * statistics.median(t):>10.1f} {1e6 * min(t):>8.1f} {1e6 * max(t):>8.1f} "
            f"{1e9 * statistics.median(t) / w:>10.1f}"
        )


if __name__ == "__main__":
    main()
