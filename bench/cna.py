"""CNA speed and exactness: the paper-style reference vs surgery's certified top-k, same cases, same process.

Reference (the paper's code path): per case and per layer, build r + m_k v_k for EVERY neuron, push all of them
through the frozen final norm and the unembedding, full log-softmax, read the target. surgery: one batched pass,
first-order/bounded screen of all neurons, exact rescoring of the candidates (certified top-k).

    python bench/cna.py [--cases 8] [--k 100] [--batch 8] [--repeats 3] [--threads 2] [--no-memory] [--no-reference]
                        [--margin 8] [--ablate-head L.H (with --no-reference)] [--model smollm2-135m]
    python bench/cna.py --smoke     # a tiny random model, 2 cases, k 5, 1 repeat, --no-memory, then
                                    # --no-reference --ablate-head 1.4 (seconds; the smoke test)

Repeats are interleaved (forward, surgery, reference, forward, ...) so that a shared machine slows every side
alike; each repeat gives a ratio, and the bench reports their median and spread (min-max), in wall time and in
CPU time of the process (on a machine whose cores other jobs hold, wall time measures the scheduler more than the
work; at --threads 1 CPU time is the work). The batched forward
pass of the same cases (logits at the last position only) is the floor CNA is measured against.
Last line: speedup <x>x (reference <s>s, surgery <s>s), identical=<true|false>
identical = the same top-k set per case and max |score difference| <= 1e-4 on it. Times are per case (medians).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from surgery.evals import arithmetic  # noqa: E402
from surgery.find import cna  # noqa: E402
from surgery.io.loading import load_model  # noqa: E402
from surgery.model.arch import ModelView  # noqa: E402
from surgery.model.batching import left_pad, pad_id, position_ids  # noqa: E402


@torch.no_grad()
def reference_case(view: ModelView, ids: list[int], k: int) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """The paper's computation for one case: [N, vocab] logits per layer, full log-softmax."""
    x = torch.tensor([ids])
    st = cna.collect(view, x, torch.ones_like(x), list(range(view.n_layers)))
    sigma = view.final_sigma(st.hfin)[0]
    w = int(st.logits[0].argmax())
    g, WU = view.final_gain(), view.unembed_matrix().float()
    scores = []
    for layer in range(view.n_layers):
        r = st.r[layer][0]
        base = torch.log_softmax((g * r / sigma) @ WU.T, -1)[w]
        x_all = r[None] + st.m[layer][0][:, None] * view.values(layer).float()  # r + m_k v_k, every neuron
        scores.append(torch.log_softmax((g * x_all / sigma) @ WU.T, -1)[:, w] - base)
    flat = torch.cat(scores)
    top = flat.topk(k)
    n = view.ffn_width(0)
    return [(int(i) // n, int(i) % n) for i in top.indices], top.values


RESCORED = [0]  # exact scores spent by the last surgery_cases call


def surgery_cases(
    view: ModelView, seqs: list[list[int]], k: int, batch: int, pad: int, margin: int = 8, ablate: tuple = ()
) -> list:
    """Certified top-k per case: of the score (the paper's setting), or with `ablate` heads ((layer, head), ...)
    of the delta clean - ablated (comparison mode, `surgery cna --ablate-head`)."""
    out = []
    RESCORED[0] = 0
    for s in range(0, len(seqs), batch):
        res = cna.compare(
            view, left_pad(seqs[s : s + batch], pad), list(range(view.n_layers)), k, margin=margin, ablate_b=ablate
        )
        RESCORED[0] += res.top.rescored
        out += [
            (list(zip(l.tolist(), i.tolist())), v, bool(c))
            for l, i, v, c in zip(res.top.layer, res.top.index, res.top.score, res.top.certified)
        ]
    return out


def work_model(view: ModelView, seqs: list[list[int]], rescored: float, settings: int = 1) -> str:
    """Multiply-accumulates per case, from the shapes: the forward (every layer's matrices per prompt token, the
    unembedding at the last position) vs CNA's (its own forward, base logits W_U r_l and the tail mean q W_U at every
    layer, the [N, |S|] top-token block per layer, one W_U row per exact score). Sharing across the cases of a
    batch (top tokens, readout rows) only lowers CNA's side; elementwise vocabulary passes only raise it. A
    comparison (`settings` 2) runs the forward, base logits, tail means and top block per setting; the exact rows
    serve both settings (computed once)."""
    V, d = view.unembed_matrix().shape
    body = sum(
        m.weight.numel()
        for name, m in view.model.named_modules()
        if isinstance(m, torch.nn.Linear) and "lm_head" not in name
    )
    tokens = statistics.mean(len(s) for s in seqs)
    fwd = body * tokens + V * d
    L = view.n_layers
    n = sum(view.ffn_width(l) for l in range(L))
    base, top, exact = 2 * L * V * d * settings, n * 32 * d * settings, rescored * V * d
    total = fwd * settings + base + top + exact
    return (
        f"work model per case (GMAC): forward {fwd / 1e9:.2f}; CNA = {settings} x forward + base logits and tail means "
        f"{base / 1e9:.2f} + top-token block {top / 1e9:.2f} + exact rows {exact / 1e9:.2f} ({rescored:.0f} "
        f"per case) = {total / 1e9:.2f}, {total / fwd:.1f}x the forward before any sharing"
    )


@torch.no_grad()
def forward_cases(view: ModelView, seqs: list[list[int]], batch: int, pad: int) -> None:
    """The floor: one batched forward per batch of cases, logits at the last position only."""
    for s in range(0, len(seqs), batch):
        ids, mask = left_pad(seqs[s : s + batch], pad)
        view.model(
            input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), logits_to_keep=1, use_cache=False
        )


def _peak_rss_mb(side: str, k: int, batch: int, model: str = "smollm2-135m") -> float:
    """Peak RSS growth (MB) of one side, measured in a fresh process after the model is loaded."""
    out = subprocess.run(
        [sys.executable, __file__, "--measure", side, "--k", str(k), "--batch", str(batch), "--model", model],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def _status_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _measure(side: str, k: int, batch: int, model: str = "smollm2-135m") -> None:
    """Peak RSS above the loaded model: reset the high-water mark (Linux clear_refs 5), run, read VmHWM."""
    view, tok, seqs = _setup(batch, model)
    if side == "surgery":
        surgery_cases(view, seqs[:1], k, 1, pad_id(tok))  # load the disk-cached vocabulary ranges first
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kb("VmRSS")
    if side == "reference":
        reference_case(view, seqs[0], k)
    else:
        surgery_cases(view, seqs, k, batch, pad_id(tok))
    print((_status_kb("VmHWM") - before) / 1024)


def _setup(n: int, model: str = "smollm2-135m"):
    loaded = load_model(model)
    problems = arithmetic.build(digits=(1,), templates=("calculate",), limit=n)
    seqs = list(arithmetic.cases(problems, loaded.tokenizer)["input_ids"])[:n]
    return ModelView(loaded.model), loaded.tokenizer, seqs


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-RSS subprocesses")
    ap.add_argument("--no-reference", action="store_true", help="forward vs surgery only (no exactness check)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--margin", type=int, default=8, help="spare candidates per case per round (cna default 8)")
    ap.add_argument(
        "--ablate-head",
        default=None,
        help="L.H: comparison mode, delta against the model with that head ablated (needs --no-reference)",
    )
    ap.add_argument("--model", default="smollm2-135m", help="the model whose CNA is timed")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="a tiny random model at the smallest sizes, then the --no-reference --ablate-head path (smoke test)",
    )
    ap.add_argument("--measure", choices=["reference", "surgery"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.ablate_head and not args.no_reference:
        ap.error("--ablate-head times the comparison only; add --no-reference")
    if args.smoke:
        from _smoke import scratch, tiny_model

        tiny = tiny_model(scratch("cna"), layers=2)
        small = ["--model", tiny, "--cases", "2", "--k", "5", "--batch", "2", "--repeats", "1", "--threads", "1"]
        main([*small, "--no-memory"])  # the peak-RSS children would cost a fresh interpreter each, most of a minute
        return main([*small, "--no-reference", "--ablate-head", "1.4"])
    ablate = tuple(tuple(int(x) for x in h.split(".")) for h in args.ablate_head.split(",")) if args.ablate_head else ()
    torch.set_num_threads(args.threads)
    if args.measure:
        return _measure(args.measure, args.k, args.batch, args.model)
    view, tok, seqs = _setup(args.cases, args.model)
    t = time.time()
    surgery_cases(view, seqs[:1], args.k, 1, pad_id(tok))  # one-time per-model vocabulary ranges (disk-cached)
    cold = time.time() - t
    n, runs, cpu = len(seqs), [], []
    for rep in range(args.repeats):
        t, c = time.time(), time.process_time()
        forward_cases(view, seqs, args.batch, pad_id(tok))
        t_fwd, c_fwd = (time.time() - t) / n, (time.process_time() - c) / n
        t, c = time.time(), time.process_time()
        fast = surgery_cases(view, seqs, args.k, args.batch, pad_id(tok), args.margin, ablate)
        t_fast, c_fast = (time.time() - t) / n, (time.process_time() - c) / n
        t, c = time.time(), time.process_time()
        ref = [reference_case(view, s, args.k) for s in seqs] if not args.no_reference else []
        t_ref, c_ref = (time.time() - t) / n, (time.process_time() - c) / n
        runs.append((t_fwd, t_fast, t_ref))
        cpu.append((c_fwd, c_fast, c_ref))
        print(
            f"repeat {rep}: wall per case: forward {1000 * t_fwd:.1f} ms, surgery {1000 * t_fast:.1f} ms, "
            f"reference {t_ref:.2f} s; CPU per case: forward {1000 * c_fwd:.1f} ms, surgery {1000 * c_fast:.1f} ms, "
            f"reference {c_ref:.2f} s",
            flush=True,
        )
    if args.no_reference:
        ratio = [f / w for w, f, _ in cpu]
        print(
            f"surgery / batched forward (CPU time): median {statistics.median(ratio):.1f}x (spread "
            f"{min(ratio):.1f}-{max(ratio):.1f}x, {len(cpu)} repeats, threads {torch.get_num_threads()}, load "
            f"{os.getloadavg()[0]:.1f}); certified {sum(f[2] for f in fast)}/{len(fast)}; margin {args.margin}"
            f"{', ablated ' + args.ablate_head if ablate else ''}"
        )
        print(work_model(view, seqs, RESCORED[0] / n, 2 if ablate else 1))
        return
    for name, rows in (("wall", runs), ("CPU", cpu)):
        over_fwd = [f / w for w, f, _ in rows]
        speed = [r / f for _, f, r in rows]
        print(
            f"{name} time: surgery / batched forward median {statistics.median(over_fwd):.1f}x (spread "
            f"{min(over_fwd):.1f}-{max(over_fwd):.1f}x); reference / surgery median {statistics.median(speed):.1f}x "
            f"(spread {min(speed):.1f}-{max(speed):.1f}x), {len(rows)} repeats"
        )
    same = all(set(f[0]) == set(r[0]) for f, r in zip(fast, ref))
    err = max(float((f[1] - r[1]).abs().max()) for f, r in zip(fast, ref))
    print(
        f"cases {n}, k {args.k}, batch {args.batch}, threads {torch.get_num_threads()}, "
        f"load average at the end {os.getloadavg()[0]:.1f}"
    )
    print(
        f"certified {sum(f[2] for f in fast)}/{len(fast)}; max |score diff| {err:.2e}; one-time vocab ranges "
        f"{cold:.1f}s (cached on disk after the first run)",
        flush=True,
    )
    if not args.no_memory:
        mem_ref = _peak_rss_mb("reference", args.k, 1, args.model)
        mem_fast = _peak_rss_mb("surgery", args.k, args.batch, args.model)
        print(
            f"peak RSS growth after loading: reference {mem_ref:.0f} MB (1 case), "
            f"surgery {mem_fast:.0f} MB ({args.batch} cases per batch)"
        )
    speed = [r / f for _, f, r in runs]
    t_fast, t_ref = (statistics.median(x) for x in ([f for _, f, _ in runs], [r for _, _, r in runs]))
    print(
        f"speedup {statistics.median(speed):.1f}x (reference {t_ref:.2f}s, surgery {t_fast:.3f}s), "
        f"identical={'true' if same and err <= 1e-4 else 'false'}"
    )


if __name__ == "__main__":
    main()
