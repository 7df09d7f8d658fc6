"""Dataset-mode CNA time and memory: `cna.scan` over the first N one-digit arithmetic cases of SmolLM2 with head 1.4
ablated as setting B (the `surgery cna --ablate-head 1.4 --digits 1 --top 20` computation), top-20 per case.

    python bench/cna_scan.py [--cases 32] [--batch 16] [--threads 2] [--block-floats 4194304] [--model smollm2-135m]
    python bench/cna_scan.py --smoke    # a tiny random model, 4 cases at batch 2, 1 thread (smoke test)

Beside the time it prints the scan's arithmetic, counted while it runs (multiply-accumulates: two forwards per
batch, the base logits W_U r_l and tail means q W_U of every layer in both settings, the [N, d] x [d, |S|]
top-token block per layer and setting, one [d] x [d, V] readout row per DISTINCT neuron rescored in a batch and
layer, shared by its cases and both settings; and the elementwise vocabulary passes of the exact pair scores),
and this CPU's GEMM rate at the scan's own shape ([16 x 5 layers, d] x [d, V], the same threads), so that
"seconds the arithmetic needs at that rate" stands beside the measured seconds.

--batch is an upper bound: `cna.scan` holds at most 64 MiB of base logits per setting (11 cases on SmolLM2).
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

from surgery.commands.prune.sweep import matmul_params  # noqa: E402
from surgery.evals import arithmetic  # noqa: E402
from surgery.find import cna  # noqa: E402
from surgery.io.loading import load_model  # noqa: E402
from surgery.model.arch import ModelView  # noqa: E402
from surgery.model.batching import pad_id  # noqa: E402


def _kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class Count:
    """Tallies of the scan's large products, by wrapping the Scorer methods that do them."""

    def __init__(self) -> None:
        self.rows = self.pairs = self.tail_rows = self.top = 0
        self.real = {n: getattr(cna.Scorer, n) for n in ("_readout_rows", "_pair_scores", "_prepare", "_bounds")}
        count = self

        def rows(sc, dirs, out=None):
            count.rows += len(dirs)
            return count.real["_readout_rows"](sc, dirs, out)

        def pairs(sc, layer, case, *a):
            count.pairs += len(case)
            return count.real["_pair_scores"](sc, layer, case, *a)

        def prepare(sc, layers, tails=True):
            new = [l for l in layers if l not in sc.layer_cache] + (
                [l for l in layers if l not in sc.tail_cache] if tails else []
            )
            count.tail_rows += len(new) * sc.target.shape[0]
            return count.real["_prepare"](sc, layers, tails)

        def bounds(sc, layer):
            out = count.real["_bounds"](sc, layer)
            count.top += sc.view.ffn_width(layer) * int(sc.tail_cache[layer][0].unique().numel())
            return out

        for n, f in (("_readout_rows", rows), ("_pair_scores", pairs), ("_prepare", prepare), ("_bounds", bounds)):
            setattr(cna.Scorer, n, f)

    def gmac(self, view: ModelView, seqs: list[list[int]]) -> dict[str, float]:
        V, d = view.unembed_matrix().shape
        body = matmul_params(view.model) - V * d  # every token's matrices; the unembedding at the last position only
        tokens = sum(len(s) for s in seqs)
        return {
            "forwards": 2 * (body * tokens + len(seqs) * V * d) / 1e9,
            "base + tails": self.tail_rows * V * d / 1e9,
            "top block": self.top * d / 1e9,
            "readout rows": self.rows * V * d / 1e9,
        }


def gemm_rate(V: int, d: int, rows: int, repeats: int = 5) -> float:
    """GMAC/s of [rows, d] x [d, V] (best of `repeats`) on this process's threads."""
    w, x = torch.randn(V, d), torch.randn(rows, d)
    out = torch.empty(rows, V)
    torch.matmul(x, w.T, out=out)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.matmul(x, w.T, out=out)
        best = min(best, time.perf_counter() - t)
    return rows * V * d / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--block-floats", type=int, default=1 << 22, help="floats per temporary [rows, vocab] block")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--smoke", action="store_true", help="a tiny random model, 4 cases at batch 2 (smoke test)")
    args = ap.parse_args()
    if args.smoke:
        from _smoke import scratch, tiny_model

        args.model, args.cases, args.batch, args.threads = tiny_model(scratch("cna_scan"), layers=2), 4, 2, 1
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
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
    cna.scan(view, seqs[:1], layers, 20, pad, ablate_b=((1, 4),), progress=False)  # vocabulary ranges (disk-cached)
    print(f"loaded: VmRSS {_kb('VmRSS') / 1024:.0f} MB", flush=True)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before, count, t = _kb("VmRSS"), Count(), time.time()
    sc = cna.scan(
        view, seqs, layers, 20, pad, ablate_b=((1, 4),), batch_size=args.batch, progress=False, budget=args.block_floats
    )
    took, n = time.time() - t, len(seqs)
    hwm = _kb("VmHWM")
    V, d = view.unembed_matrix().shape
    work = count.gmac(view, seqs)
    rate = gemm_rate(V, d, args.batch * 5)
    total = sum(work.values())
    print(
        "arithmetic (GMAC): " + ", ".join(f"{k} {v:.0f}" for k, v in work.items()) + f"; total {total:.0f}; "
        f"exact pairs {count.pairs} (elementwise passes over {count.pairs * V / 1e9:.1f} G logits)"
    )
    print(
        f"GEMM rate [{args.batch * 5}, {d}] x [{d}, {V}]: {rate:.1f} GMAC/s -> the arithmetic alone needs "
        f"{total / rate:.0f} s at that rate; measured {took:.0f} s ({took * rate / total:.2f}x)"
    )
    print(f"load average {os.getloadavg()[0]:.1f}, threads {torch.get_num_threads()}")
    print(
        f"scan {n} cases: {took:.0f}s, certified {int(sc.certified.sum())}/{n}, rescored/case "
        f"{sc.rescored / n:.0f}, HWM growth above loaded {(hwm - before) / 1024:.0f} MB, "
        f"VmHWM {hwm / 1024:.0f} MB"
    )


if __name__ == "__main__":
    main()
