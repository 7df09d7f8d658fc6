"""Cost and memory at the model sizes users have: shape-true random models from real configs (no download), in bf16.

    python bench/scale.py [--shapes llama-3.2-1b,qwen2.5-1.5b,gemma-3-1b] [--cases 8] [--cna-layers all|A-B]
                          [--steps build,eval,heads,cna,export] [--out runs/scale]
    python bench/scale.py --shapes llama-3.1-8b --cna-layers 28-31 --steps build,eval,cna,export   # alone: 16 GB
    python bench/scale.py --smoke        # a tiny shape, every step (seconds; the smoke test)

Each shape is built directly in bf16 from its config (hidden size, layers, heads / KV heads, FFN width, vocabulary,
tied embeddings, Gemma's norms, soft-caps and sliding windows), seeded, and speaks SmolLM2's tokenizer (its ids lie
inside every vocabulary here; the unembedding still has the shape's full width). Steps, through the package's own
code paths, each timed with its peak resident memory (sampled every 20 ms):
  build    random init in bf16 (an 8B model never exists in fp32: 32 GB)
  eval     one batched forward of `--cases` 2-digit problems (logits at the last position): s/case
  heads    the head screen (`heads --mode screen`: first-order attribution, one forward + backward): s/case
  cna      `cna` certified top-100 per case on --cna-layers: first run (pays the vocabulary-range cache of those
           layers, kept under a scratch $SURGERY_HOME) and a second run (cached): s/case, and the cache's time
  export   every FFN cut to half its width (`slice_ffn`), saved as a checkpoint (sliced layout), loaded back with
           `load_model`, and its logits compared with the sliced model's
  offload  the model saved whole, freed, and loaded back through `load_model(device="auto", max_memory=...)` under
           a cap of --offload-cap of its size (the rest on disk, accelerate), then `cna` on the same layers and
           cases: s/case, peak memory, and whether every case's certified top-100 equals the in-memory run's
  journey  the user's first hour, timed end to end on --journey-cases cases: the head screen, `cna` on --cna-layers
           with a cold vocabulary cache (a new model), the 18 neurons of largest summed effect zeroed in place (an
           edit), and the edited model's answers on the same cases; then the same `cna` again on the edited model
           (its unchanged rows come from the cache: the user's check of the edit)
Peak memory is the process's resident set (RSS, sampled every 20 ms) and, beside it, its anonymous part (RssAnon:
memory that is not a page of a file; weights read from disk through mmap count in RSS but the kernel can drop them).
Writes OUT/scale.jsonl (one line per shape, appended: a killed run keeps the finished shapes), OUT/scale.md (the
table) and OUT/scale.png (CNA's cached s/case and the cache's seconds per layer against neurons x vocabulary x hidden,
what the bounds scale with, with a least-squares power-law fit). The models and the export are deleted as soon as
a shape is done (an 8B copy is 16 GB).
Last line: scale <shape>: cna <s>/case (<x>x a batched forward) (or the journey's time), peak <GB> GB
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench import _smoke  # noqa: E402

SHAPES = {  # the real configs' shapes (published config.json values)
    "llama-3.2-1b": ("LlamaConfig", dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                     num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                     tie_word_embeddings=True, rope_theta=500000.0, max_position_embeddings=131072)),
    "qwen2.5-1.5b": ("Qwen2Config", dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                     num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                     tie_word_embeddings=True, rope_theta=1000000.0, max_position_embeddings=32768)),
    "gemma-3-1b": ("Gemma3TextConfig", dict(vocab_size=262144, hidden_size=1152, intermediate_size=6912,
                   num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                   sliding_window=512, query_pre_attn_scalar=256, rope_theta=1000000.0,
                   rope_local_base_freq=10000.0, final_logit_softcapping=None, max_position_embeddings=32768)),
    "llama-3.1-8b": ("LlamaConfig", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                     tie_word_embeddings=False, rope_theta=500000.0, max_position_embeddings=131072)),
    "tiny": ("LlamaConfig", dict(vocab_size=49152, hidden_size=48, intermediate_size=64, num_hidden_layers=4,
             num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True)),
}  # fmt: skip
STEPS = ("build", "eval", "heads", "cna", "export", "offload", "journey")


class Peak:
    """Peak resident set size of this process while the block runs (a sampling thread, every 20 ms)."""

    def __enter__(self) -> "Peak":
        import psutil

        self.proc, self.peak, self.anon, self.stop = psutil.Process(), 0, 0, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        self.t0 = time.perf_counter()
        return self

    def _sample(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self.anon = max(self.anon, _rss_anon())
            self.stop.wait(0.02)

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def _rss_anon() -> int:
    """Anonymous resident memory of this process in bytes (Linux /proc; 0 elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def build(name: str, seed: int = 0, layers: int | None = None):
    import transformers as T

    cls, kw = SHAPES[name]
    kw = dict(kw, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if layers:
        kw["num_hidden_layers"] = layers
    cfg = getattr(T, cls)(**kw)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return T.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()


def tokenizer():
    import transformers as T

    if not (_smoke.SMOL / "tokenizer.json").exists():
        raise SystemExit(f"needs SmolLM2's tokenizer in {_smoke.SMOL} (make setup)")
    tok = T.AutoTokenizer.from_pretrained(_smoke.SMOL)
    from surgery.io.loading import prepare_tokenizer

    prepare_tokenizer(tok)
    return tok


def cases(tok, n: int) -> list[list[int]]:
    from surgery.evals import arithmetic

    probs = arithmetic.build(digits=(2,), seed=0, limit=max(1, n // 4 + 1))
    return [tok(p).input_ids for p in list(probs["prompt"])[:n]]


def run_shape(name: str, args, scratch: Path) -> dict:
    from surgery.find import cna, head_scan
    from surgery.io.checkpoint import save
    from surgery.io.loading import Loaded, load_model
    from surgery.model.arch import ModelView
    from surgery.model.batching import forward_logits, left_pad, pad_id
    from surgery.model.slicing import slice_ffn

    rec: dict = {"shape": name, "steps": {}}
    tok = tokenizer()
    seqs = cases(tok, args.cases)
    pad = pad_id(tok)
    with Peak() as p:
        model = build(name, layers=args.layers)
    view = ModelView(model)
    N, V, d, L = view.ffn_width(0), model.config.vocab_size, model.config.hidden_size, view.n_layers
    rec.update(N=N, V=V, d=d, L=L, params=sum(p.numel() for p in model.parameters()))
    rec["steps"]["build"] = {"seconds": p.seconds, "peak_gb": p.peak / 2**30, "anon_gb": p.anon / 2**30}
    n = len(seqs)
    if "eval" in args.steps:
        with Peak() as p, torch.no_grad():
            forward_logits(model, *left_pad(seqs, pad), 1)
        rec["steps"]["eval"] = {
            "seconds": p.seconds,
            "per_case": p.seconds / n,
            "peak_gb": p.peak / 2**30,
            "anon_gb": p.anon / 2**30,
        }
    if "heads" in args.steps:
        loaded = Loaded(model, tok, name, "random")
        _, batches = head_scan.arithmetic_batches(loaded, [2], None, None, n, 0, n)
        with Peak() as p:
            head_scan.attribution(view, batches)
        rec["steps"]["heads"] = {
            "seconds": p.seconds,
            "per_case": p.seconds / n,
            "peak_gb": p.peak / 2**30,
            "anon_gb": p.anon / 2**30,
        }
    if "cna" in args.steps:
        layers = cna.parse_layers(args.cna_layers, L)
        runs = []
        for _ in range(2):  # cold (pays the vocabulary ranges of these layers), then cached
            with Peak() as p:
                sc = cna.scan(view, seqs, layers, 100, pad, batch_size=args.batch, progress=not args.smoke)
            runs.append(p)
        rec["steps"]["cna"] = {
            "layers": [layers[0], layers[-1]],
            "n_layers": len(layers),
            "cold_seconds": runs[0].seconds,
            "seconds": runs[1].seconds,
            "per_case": runs[1].seconds / n,
            "cache_seconds": max(0.0, runs[0].seconds - runs[1].seconds),
            "cache_per_layer": max(0.0, runs[0].seconds - runs[1].seconds) / len(layers),
            "peak_gb": max(r.peak for r in runs) / 2**30,
            "anon_gb": max(r.anon for r in runs) / 2**30,
            "certified": bool(torch.as_tensor(getattr(sc, "certified", True)).all()),
        }
        if "eval" in rec["steps"]:
            rec["steps"]["cna"]["x_forward"] = rec["steps"]["cna"]["per_case"] / rec["steps"]["eval"]["per_case"]
    if "journey" in args.steps:
        rec["steps"]["journey"] = journey(model, view, tok, args, scratch / f"journey-{name}")
    full = scratch / f"full-{name}"
    if "offload" in args.steps:  # saved whole now (export below cuts the model), loaded capped after
        with Peak() as p:
            model.save_pretrained(full)
            tok.save_pretrained(full)
        rec["steps"]["save"] = {"seconds": p.seconds, "peak_gb": p.peak / 2**30, "anon_gb": p.anon / 2**30}
    if "export" in args.steps:
        folder = scratch / f"export-{name}"
        with Peak() as p:
            slice_ffn(model, {l: torch.arange(0, view.ffn_width(l), 2) for l in range(L)})
            with torch.no_grad():
                want = forward_logits(model, *left_pad(seqs[:2], pad), 1).float()
            save(model, tok, folder, layout="sliced", force=True)
            del model, view
            back = load_model(str(folder), dtype="bfloat16").model
            with torch.no_grad():
                got = forward_logits(back, *left_pad(seqs[:2], pad), 1).float()
        rec["steps"]["export"] = {
            "seconds": p.seconds,
            "peak_gb": p.peak / 2**30,
            "anon_gb": p.anon / 2**30,
            "bytes": sum(f.stat().st_size for f in folder.iterdir()),
            "max_logit_diff": float((got - want).abs().max()),
        }
        del back
        shutil.rmtree(folder, ignore_errors=True)
    else:
        del model, view
    if "offload" in args.steps:
        rec["steps"]["offload"] = offload_step(full, tok, seqs, pad, args, sc if "cna" in args.steps else None)
        shutil.rmtree(full, ignore_errors=True)
    rec["peak_gb"] = max(s["peak_gb"] for s in rec["steps"].values())
    rec["threads"] = torch.get_num_threads()
    return rec


def journey(model, view, tok, args, home: Path) -> dict:
    """heads screen + CNA (cold cache) + an 18-neuron edit + its evaluation on args.journey_cases cases."""
    from surgery.find import cna, head_scan
    from surgery.io.loading import Loaded
    from surgery.model.batching import forward_logits, left_pad, pad_id

    before = os.environ.get("SURGERY_HOME")
    os.environ["SURGERY_HOME"] = str(home)  # a fresh cache: the vocabulary ranges are paid as on a new model
    n, pad = args.journey_cases, pad_id(tok)
    seqs = cases(tok, n)
    t = {}
    with Peak() as p:
        t0 = time.perf_counter()
        _, batches = head_scan.arithmetic_batches(Loaded(model, tok, "shape", "random"), [2], None, None, n, 0, 16)
        head_scan.attribution(view, batches)
        t["heads"] = time.perf_counter() - t0
        layers = cna.parse_layers(args.cna_layers, view.n_layers)
        t0 = time.perf_counter()
        sc = cna.scan(view, seqs, layers, 100, pad, batch_size=args.batch, progress=not args.smoke)
        t["cna_cold"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        flat = torch.cat([sc.total[l].abs() for l in layers])
        top = flat.topk(min(18, flat.numel())).indices
        widths = [sc.total[l].numel() for l in layers]
        starts = [sum(widths[:i]) for i in range(len(layers))]
        saved = []  # the zeroed rows, put back afterwards (the later steps measure the unedited model)
        for l, s0, w in zip(layers, starts, widths):
            idx = torch.tensor([int(i) - s0 for i in top if s0 <= int(i) < s0 + w], dtype=torch.long)
            if len(idx):
                saved.append((l, idx, [k[idx].clone() for k in view.keys(l)], view.values(l)[idx].clone()))
                view.zero_neuron_weights(l, idx)
        with torch.no_grad():
            for i in range(0, n, args.batch):
                forward_logits(model, *left_pad(seqs[i : i + args.batch], pad), 1)
        t["edit_and_eval"] = time.perf_counter() - t0
    with Peak() as q:
        cna.scan(view, seqs, layers, 100, pad, batch_size=args.batch, progress=not args.smoke)
    with torch.no_grad():
        for l, idx, keys, values in saved:
            for k, old in zip(view.keys(l), keys):
                k[idx] = old
            view.values(l)[idx] = values
    if before is not None:
        os.environ["SURGERY_HOME"] = before
    total = t["heads"] + t["cna_cold"] + t["edit_and_eval"]
    return {
        "cases": n,
        "cna_layers": [layers[0], layers[-1]],
        **{f"{k}_seconds": v for k, v in t.items()},
        "cna_cached_seconds": q.seconds,
        "seconds": total,
        "seconds_cached": total - t["cna_cold"] + q.seconds,
        "peak_gb": max(p.peak, q.peak) / 2**30,
        "anon_gb": max(p.anon, q.anon) / 2**30,
    }


def offload_step(folder: Path, tok, seqs, pad: int, args, ref) -> dict:
    """CNA on the model loaded from `folder` under a memory cap (device_map="auto", the rest offloaded to disk),
    compared case by case with the in-memory scan `ref`."""
    import gc

    from surgery.find import cna
    from surgery.io.loading import load_model
    from surgery.model.arch import ModelView

    gc.collect()
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    cap = int(size * args.offload_cap)
    with Peak() as p:
        loaded = load_model(str(folder), dtype="bfloat16", device="auto", max_memory={"cpu": cap})
    load = {"seconds": p.seconds, "peak_gb": p.peak / 2**30, "anon_gb": p.anon / 2**30}
    placed = loaded.model.hf_device_map
    view = ModelView(loaded.model)
    layers = cna.parse_layers(args.cna_layers, view.n_layers)
    with Peak() as p:
        sc = cna.scan(view, seqs, layers, 100, pad, batch_size=args.batch, progress=not args.smoke)
    same = None
    if ref is not None:
        same = bool(
            torch.equal(sc.top_layer, ref.top_layer)
            and torch.equal(sc.top_index, ref.top_index)
            and torch.equal(sc.certified, ref.certified)
        )
    return {
        "cap_gb": cap / 2**30,
        "model_gb": size / 2**30,
        "on_disk": sum(1 for v in placed.values() if v == "disk"),
        "modules": len(placed),
        "load_seconds": load["seconds"],
        "seconds": p.seconds,
        "per_case": p.seconds / len(seqs),
        "peak_gb": max(p.peak, load["peak_gb"] * 2**30) / 2**30,
        "anon_gb": max(p.anon, load["anon_gb"] * 2**30) / 2**30,
        "same_topk_as_in_memory": same,
    }


def table(recs: list[dict]) -> str:
    head = "| shape | N x V x d | build s | eval s/case | heads s/case | CNA s/case (cached) | CNA / forward | "
    head += "vocab cache s/layer | export s | offloaded CNA s/case (cap GB, same top-k) | peak GB (anon) |\n|"
    head += "---|" * 11
    nan = float("nan")
    rows = []
    for r in recs:
        s = r["steps"]
        c = s.get("cna", {})
        cells = [
            r["shape"],
            f"{r['N'] * r['V'] * r['d']:.2e}",
            f"{s['build']['seconds']:.1f}",
            f"{s.get('eval', {}).get('per_case', nan):.3f}",
            f"{s.get('heads', {}).get('per_case', nan):.3f}",
            f"{c.get('per_case', nan):.2f} ({c.get('n_layers', 0)} layers)",
            f"{c.get('x_forward', nan):.1f}x",
            f"{c.get('cache_per_layer', nan):.1f}",
            f"{s.get('export', {}).get('seconds', nan):.1f}",
            _offload_cell(s.get("offload")),
            f"{r['peak_gb']:.1f} ({max(v.get('anon_gb', nan) for v in s.values()):.1f})",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    for r in recs:
        j = r["steps"].get("journey")
        if j:
            rows.append(
                f"\nJourney on {r['shape']}, {j['cases']} cases: head screen {j['heads_seconds']:.0f} s + CNA, layers "
                f"{j['cna_layers'][0]}-{j['cna_layers'][1]} {j['cna_cold_seconds']:.0f} s (cold vocabulary cache) + "
                f"18-neuron edit and its evaluation {j['edit_and_eval_seconds']:.0f} s = {j['seconds'] / 60:.1f} min; "
                f"{j['seconds_cached'] / 60:.1f} min with the cache warm."
            )
    return "\n".join([head, *rows])


def _offload_cell(o: dict | None) -> str:
    if not o:
        return "-"
    same = {True: "yes", False: "NO", None: "-"}[o["same_topk_as_in_memory"]]
    return f"{o['per_case']:.2f} ({o['cap_gb']:.1f} of {o['model_gb']:.1f}, {same}; peak {o['peak_gb']:.1f})"


def fit(xs: list[float], ys: list[float]) -> tuple[float, float] | None:
    """y = a x^b by least squares on logs; None with fewer than 2 positive points."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len(pts) < 2:
        return None
    mx, my = sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts)
    var = sum((p[0] - mx) ** 2 for p in pts)
    b = sum((p[0] - mx) * (p[1] - my) for p in pts) / var if var else 0.0
    return math.exp(my - b * mx), b


def plot(recs: list[dict], path: Path) -> None:
    from surgery.io.report import png_bytes, pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for key, label in (("per_case", "CNA s/case per layer (cached)"), ("cache_per_layer", "vocab cache s/layer")):
        pts = [
            (
                r["N"] * r["V"] * r["d"],
                r["steps"]["cna"][key] / (1 if key != "per_case" else r["steps"]["cna"]["n_layers"]),
            )
            for r in recs
            if "cna" in r["steps"]
        ]
        if not pts:
            continue
        xs, ys = zip(*pts)
        ax.loglog(xs, ys, "o", label=label)
        f = fit(list(xs), list(ys))
        if f:
            a, b = f
            grid = [min(xs), max(xs)]
            ax.loglog(grid, [a * x**b for x in grid], "--", label=f"fit ~ (NVd)^{b:.2f}")
        for r, (x, y) in zip([r for r in recs if "cna" in r["steps"]], pts):
            ax.annotate(r["shape"], (x, y), fontsize=7)
    ax.set_xlabel("neurons x vocabulary x hidden (one layer)")
    ax.set_ylabel("seconds")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    path.write_bytes(png_bytes(fig))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="llama-3.2-1b,qwen2.5-1.5b,gemma-3-1b")
    ap.add_argument("--steps", default=",".join(STEPS))
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--cna-layers", default="all", help="all, or A-B (e.g. the last 4 layers of the 8B shape)")
    ap.add_argument("--layers", type=int, default=None, help="build the shape with this many layers (a slice)")
    ap.add_argument("--journey-cases", type=int, default=100, help="journey step: cases")
    ap.add_argument("--offload-cap", type=float, default=0.4, help="offload step: CPU cap as a fraction of the model")
    ap.add_argument("--out", default="runs/scale")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        scratch = _smoke.scratch("scale")
        args.shapes, args.cases, args.batch, args.out = "tiny", 2, 2, str(scratch / "out")
        args.journey_cases = 4
    else:
        scratch = Path(tempfile.mkdtemp(prefix="bench-scale-"))
        os.environ.setdefault("SURGERY_HOME", str(scratch))  # the random models' vocabulary caches land here
    args.steps = [s for s in args.steps.split(",") if s]
    bad = [s for s in args.steps if s not in STEPS] + [s for s in args.shapes.split(",") if s not in SHAPES]
    if bad:
        raise SystemExit(f"unknown step or shape {bad}; steps {STEPS}, shapes {list(SHAPES)}")
    if args.cna_layers == "all":
        args.cna_layers = None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        for name in args.shapes.split(","):
            rec = run_shape(name, args, scratch)
            with open(out / "scale.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            c = rec["steps"].get("cna", {})
            print(json.dumps(rec))
            j = rec["steps"].get("journey")
            what = (
                f"cna {c['per_case']:.3f}/case ({c.get('x_forward', float('nan')):.1f}x a batched forward)"
                if "per_case" in c
                else f"journey {j['seconds']:.0f} s for {j['cases']} cases"
                if j
                else "no cna step"
            )
            print(f"scale {name}: {what}, peak {rec['peak_gb']:.1f} GB", flush=True)
        recs = [json.loads(line) for line in (out / "scale.jsonl").read_text().splitlines() if line.strip()]
        (out / "scale.md").write_text(table(recs) + "\n")
        plot(recs, out / "scale.png")
    finally:
        if not args.smoke:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
