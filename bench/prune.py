"""What the cut buys: dense vs physically sliced SmolLM2, deep FFN (layers 15-29) cut to 50/25/10/5%.

    python bench/prune.py [--model smollm2-135m] [--keep 50,25,10,5] [--batch 8] [--seq 32] [--repeats 9]
                          [--threads 1] [--no-memory]     # --threads 1 on a shared CPU (docs/benchmarks/prune.md)
    python bench/prune.py --sweep runs/SWEEP        # every cell of a prune sweep folder (DIR/cells.jsonl)
    python bench/prune.py --smoke   # a tiny random model, keep 50,25, batch 2x8, 7 rounds, then made-up sweep cells

Keep set: the given % of the deep layers' FFN neurons with the largest weight magnitude (one global budget); the
bench measures the shapes, not the selector. For every keep level three models run on the same batch:
- dense: the base model;
- sliced: `slice_ffn` as it slices by default (kept widths rounded up to a multiple of 8 with zero padding neurons,
  surgery/model/slicing.py);
- exact: `slice_ffn(..., multiple=1)` (widths = kept counts), to show what the rounding changes.
Timing: `--repeats` rounds; each round runs dense, sliced, exact for every level back to back (after one warm-up
each), so machine load hits all alike. Reported per level: the median of each model's times with the spread
(min..max), and the median (min..max) of the per-round ratio dense/sliced (adjacent runs: robust under load).
`FLOP ratio` = dense / sliced forward FLOPs per batch (2 x every Linear's weights x tokens + the attention
products), the bound a latency ratio can approach.
Memory (last level only; `--no-memory` skips it): checkpoint size on disk and the RSS of a fresh process loading
the exported checkpoint (after load, after one forward) and its peak (VmHWM), in a subprocess per model.

`--sweep DIR` reads DIR/cells.jsonl (one JSON object per line with "budget", "selector" and "keep":
{"<layer>": [kept indices]}), slices the base model with each cell's keep set (timing depends only on shapes) and
reports each cell's latency ratio vs dense with its FLOP ratio.

Last line: `speedup <x>x (dense <s>s, sliced <s>s), params <before> -> <after>` (the last keep level; sweep mode:
the last cell).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn


def batch(vocab: int, b: int, t: int) -> torch.Tensor:
    return torch.randint(100, vocab, (b, t), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def forward_seconds(model, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    model(input_ids=ids, use_cache=False)
    return time.perf_counter() - start


def flops(model: nn.Module, b: int, t: int) -> float:
    """Forward FLOPs of a batch of b sequences of t tokens: 2 per weight of every Linear per token (lm_head
    included, embeddings are lookups) + QK^T and AV (2 x 2 x t x heads x head_dim per token per layer)."""
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    cfg = model.config
    n_heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    attn = cfg.num_hidden_layers * 4 * t * n_heads * head_dim
    return float(b * t * (2 * linear + attn))


def global_keep(scores: dict[int, torch.Tensor], pct: float) -> dict[int, list[int]]:
    """The pct% highest-scoring neurons over all layers together, as kept indices per layer."""
    layers = sorted(scores)
    flat = torch.cat([scores[l].float() for l in layers])
    n = max(1, round(pct / 100 * flat.numel()))
    top = torch.zeros(flat.numel(), dtype=torch.bool)
    top[flat.topk(n).indices] = True
    out, start = {}, 0
    for l in layers:
        w = scores[l].numel()
        out[l] = top[start : start + w].nonzero().flatten().tolist()
        start += w
    return out


def magnitude_scores(model: nn.Module, layers: list[int]) -> dict[int, torch.Tensor]:
    """|keys| x |value| per neuron (weight magnitude; the selector does not matter for timing)."""
    from surgery.model.arch import ModelView

    view = ModelView(model)
    return {l: sum(k.norm(dim=1) for k in view.keys(l)) * view.values(l).norm(dim=1) for l in layers}


def sliced(model: nn.Module, keep: dict[int, list[int]], multiple: int | None) -> nn.Module:
    from surgery.model.slicing import slice_ffn

    # share every tensor with the base (memo): only the module tree and config are copied, and slice_ffn builds new
    # FFN tensors without writing the old ones, so the copies cost the sliced FFN weights alone
    m = copy.deepcopy(model, memo={id(t): t for t in [*model.parameters(), *model.buffers()]})
    slice_ffn(m, keep, multiple=multiple)
    return m.eval()


def spread(xs: list[float], fmt: str = ".3f") -> str:
    return f"{statistics.median(xs):{fmt}} ({min(xs):{fmt}}..{max(xs):{fmt}})"


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def timed_rounds(
    dense: nn.Module, variants: list[list[nn.Module]], ids: torch.Tensor, repeats: int
) -> tuple[list[list[float]], list[list[list[float]]]]:
    """Per group g (one keep level or sweep cell): dense times d[g] and each variant's times v[g][j], run as
    dense, variant 0, variant 1, ... for every group in every round (after one warm-up each)."""
    forward_seconds(dense, ids)
    for group in variants:
        for m in group:
            forward_seconds(m, ids)
    d = [[] for _ in variants]
    v = [[[] for _ in group] for group in variants]
    for r in range(repeats):
        print(f"round {r + 1}/{repeats}", file=sys.stderr, flush=True)
        for g, group in enumerate(variants):
            d[g].append(forward_seconds(dense, ids))
            for j, m in enumerate(group):
                v[g][j].append(forward_seconds(m, ids))
    return d, v


def folder_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*.safetensors"))


def child(path: str, b: int, t: int) -> None:
    """Subprocess: load a checkpoint, run one forward, print peak RSS (MiB) as JSON. The peak is this process's
    VmHWM (getrusage's ru_maxrss survives exec and would report the parent's peak)."""
    from surgery.io import checkpoint as export

    model = export.load(path)
    loaded = rss_mib()
    forward_seconds(model, batch(model.config.vocab_size, b, t))
    print(json.dumps({"peak_rss_mib": rss_mib("VmHWM"), "loaded_rss_mib": loaded, "after_forward_rss_mib": rss_mib()}))


def rss_mib(field: str = "VmRSS") -> float:
    """Current (VmRSS) or peak (VmHWM) resident set size of this process (Linux /proc), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory(path: Path, b: int, t: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(path), "--batch", str(b), "--seq", str(t)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def read_cells(folder: str) -> list[dict]:
    path = Path(folder) / "cells.jsonl"
    if not path.is_file():
        sys.exit(f"{path} not found; --sweep needs a prune sweep folder with cells.jsonl")
    cells = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        c = json.loads(line)
        if not isinstance(c.get("keep"), dict):
            sys.exit(f"{path}:{i + 1}: no 'keep' mapping of layer -> kept indices")
        cells.append(c)
    return cells


def param_count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def report_line(name: str, d: list[float], s: list[float], fl: float) -> str:
    ratios = [a / b for a, b in zip(d, s)]
    return (
        f"{name:<34} {spread(s)}  ratio {spread(ratios, '.2f')}  (of medians "
        f"{statistics.median(d) / statistics.median(s):.2f}x)  FLOP ratio {fl:.2f}x"
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--keep", default="50,25,10,5", help="percents of the deep FFN neurons kept, comma-separated")
    ap.add_argument("--layers", default="deep")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--sweep", default=None, help="a prune sweep folder: time every cell of DIR/cells.jsonl")
    ap.add_argument("--no-memory", action="store_true", help="skip the checkpoint size / RSS measurement")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument(
        "--smoke", action="store_true", help="a tiny random model, smallest sizes, then --sweep of made-up cells"
    )
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.smoke:
        from _smoke import cells, scratch, tiny_model

        tmp = scratch("prune")
        small = ["--model", tiny_model(tmp), "--keep", "50,25", "--batch", "2", "--seq", "8", "--repeats", "7"]
        main([*small, "--threads", "1"])
        return main([*small, "--threads", "1", "--sweep", str(cells(tmp, {2: 64, 3: 64}).parent)])
    if a.child:
        return child(a.child, a.batch, a.seq)
    if a.repeats < 7:
        sys.exit("--repeats must be >= 7 (median and spread need enough interleaved rounds)")

    if a.threads:
        torch.set_num_threads(a.threads)
    from surgery.find.cna import parse_layers
    from surgery.io.loading import load_model
    from surgery.model.slicing import ffn_param_count

    load_start = loadavg()
    dense = load_model(a.model)
    base = dense.model.eval()
    ids = batch(base.config.vocab_size, a.batch, a.seq)
    f_dense = flops(base, a.batch, a.seq)
    if a.sweep:
        cells = read_cells(a.sweep)
        names = [f"{c.get('budget', '?')} {c.get('selector', '?')}" for c in cells]
        keeps = [{int(l): list(map(int, v)) for l, v in c["keep"].items()} for c in cells]
        variants = [[sliced(base, k, None)] for k in keeps]
        what = f"sweep {a.sweep}: {len(cells)} cells"
    else:
        layers = parse_layers(a.layers, base.config.num_hidden_layers)
        levels = [float(x) for x in a.keep.split(",")]
        scores = magnitude_scores(base, layers)
        keeps = [global_keep(scores, p) for p in levels]
        names = [f"{p:g}%" for p in levels]
        variants = [[sliced(base, k, None), sliced(base, k, 1)] for k in keeps]
        what = f"deep layers {layers[0]}-{layers[-1]}, keep levels {a.keep}% (magnitude)"
    d, v = timed_rounds(base, variants, ids, a.repeats)
    load_end = loadavg()
    print(
        f"model {a.model}: {what}, batch {a.batch}x{a.seq}, {a.repeats} interleaved rounds, torch threads "
        f"{torch.get_num_threads()}, load average {load_start} -> {load_end}"
    )
    print("seconds per forward: median (min..max); ratio = dense/sliced per round, median (min..max)")
    all_ratios = []
    for g, name in enumerate(names):
        kept = sum(len(x) for x in keeps[g].values())
        ms = variants[g][0]
        print(
            f"== {name}: {kept} neurons kept in {len(keeps[g])} layers; params {param_count(base):,} -> "
            f"{param_count(ms):,}; FFN params {ffn_param_count(base):,} -> {ffn_param_count(ms):,}"
        )
        print(f"{'dense':<34} {spread(d[g])}")
        if len(variants[g]) > 1:
            with torch.no_grad():
                diff = (variants[g][0](input_ids=ids).logits - variants[g][1](input_ids=ids).logits).abs().max()
            print(f"max |logits rounded - exact widths| {float(diff):.2e}")
        labels = ["sliced (widths rounded up to 8)", "exact widths (multiple=1)"]
        for j, m in enumerate(variants[g]):
            print(report_line(labels[j], d[g], v[g][j], f_dense / flops(m, a.batch, a.seq)))
        all_ratios += [x / y for x, y in zip(d[g], v[g][0])]
    print(f"sliced faster than dense in {sum(r > 1 for r in all_ratios)} of {len(all_ratios)} paired runs")
    last, md, ms = variants[-1][0], statistics.median(d[-1]), statistics.median(v[-1][0])
    if not a.sweep and not a.no_memory:
        memory_lines(base, last, dense.tokenizer, a.batch, a.seq)
    print(
        f"speedup {md / ms:.2f}x (dense {md:.3f}s, sliced {ms:.3f}s), params {param_count(base):,} -> "
        f"{param_count(last):,}"
    )


def memory_lines(base: nn.Module, last: nn.Module, tokenizer, b: int, t: int) -> None:
    from surgery.io import checkpoint as export

    with tempfile.TemporaryDirectory(prefix="bench-prune-") as tmp:
        pd, ps = Path(tmp) / "dense", Path(tmp) / "sliced"
        export.save(base, tokenizer, pd, layout="zeroed")
        export.save(last, tokenizer, ps, layout="sliced")
        size_d, size_s = folder_bytes(pd), folder_bytes(ps)
        mem_d, mem_s = memory(pd, b, t), memory(ps, b, t)
    print(f"checkpoint tensors on disk {size_d / 2**20:.1f} MiB -> {size_s / 2**20:.1f} MiB (last level)")
    for key, what in (
        ("loaded_rss_mib", "RSS after loading the checkpoint"),
        ("after_forward_rss_mib", "RSS after one forward"),
        ("peak_rss_mib", "peak RSS (load + forward, fresh process)"),
    ):
        print(f"{what}: dense {mem_d[key]:.0f} MiB -> sliced {mem_s[key]:.0f} MiB")


if __name__ == "__main__":
    main()
