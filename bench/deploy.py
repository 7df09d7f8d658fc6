"""llama.cpp speed of a pruned GGUF against the dense one, beside the FLOP ratio and the file sizes.

Both models are written as GGUF of the same type and loaded in llama.cpp (llama-cpp-python) with the same
threads and context; each round times, for each model in a shuffled order, prompt processing (one batch of
`--prompt-tokens` tokens from an empty cache) and generation (`--gen-tokens` tokens one at a time after that
prompt). Tokens/s are medians over `--rounds` interleaved rounds; the speed-up is pruned / dense. The FLOP ratio
counts the whole model per token (attention projections, attention scores and values at the tokens' context
length, FFN, LM head) for the same two workloads: the goal is a measured speed-up of at least 80% of it.

    python bench/deploy.py                                  # SmolLM2: its deep half cut to 25% (fixed neurons)
    python bench/deploy.py --pruned checkpoints/demo        # a checkpoint (e.g. `make demo`'s) against its base
    python bench/deploy.py --pruned checkpoints/demo --gguf-type q8_0 --threads 2 --rounds 9
    python bench/deploy.py --smoke                          # tiny random model, 1 round (smoke test)

Without `--pruned` the cut is fixed (every other neuron of layers 15-29 down to `--keep` of the width; no search:
which neurons are kept does not change the speed). Writes report.json and report.md to --out.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def flops_per_token(model, context: float) -> dict[str, float]:
    """Multiply-adds x 2 per token at `context` tokens of attention context, by part."""
    from surgery.model.arch import ModelView

    view = ModelView(model)
    d, dh, h, kv = view.hidden_size, view.head_dim, view.n_heads, view.n_kv_heads
    per_ffn = {"gated": 3, "fused": 3, "plain": 2}[view.arch.ffn_kind]
    proj = 2 * d * dh * (2 * h + 2 * kv)  # q and o: h heads; k and v: kv heads
    scores = 2 * 2 * context * h * dh  # q.k over the context, then the weighted sum of values
    return {
        "attention": view.n_layers * (proj + scores),
        "ffn": sum(2 * per_ffn * d * w for w in view.ffn_widths()),
        "lm_head": 2 * d * int(model.config.vocab_size),
    }


def flop_ratio(dense, pruned, prompt: int, gen: int) -> dict[str, float]:
    """dense FLOPs / pruned FLOPs for prompt processing (mean context prompt/2) and generation (context prompt +
    gen/2), the speed-ups a FLOP-bound runtime would show."""
    out = {}
    for name, context in (("prompt", prompt / 2), ("generation", prompt + gen / 2)):
        a, b = flops_per_token(dense, context), flops_per_token(pruned, context)
        out[name] = sum(a.values()) / sum(b.values())
        out[f"{name}_parts_dense"] = a
        out[f"{name}_parts_pruned"] = b
    return out


def fixed_cut(model, layers: list[int], keep: float):
    """Every other neuron from the first of each listed layer, down to `keep` of its width (no search)."""
    from surgery.model.arch import ModelView
    from surgery.model.slicing import slice_ffn

    view = ModelView(model)
    cut = {}
    for l in layers:
        width = view.ffn_width(l)
        n = max(1, round(keep * width))
        step = max(1, width // n)
        cut[l] = list(range(0, width, step))[:n]
    slice_ffn(model, cut, multiple=32)  # q8_0 / q4_0 blocks fit whichever --gguf-type
    return model


def time_model(llm, prompt_ids: list[int], gen: int) -> tuple[float, float]:
    """(prompt tokens/s, generation tokens/s) of one run from an empty cache."""
    import numpy as np

    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt_ids)
    t1 = time.perf_counter()
    for _ in range(gen):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    t2 = time.perf_counter()
    return len(prompt_ids) / (t1 - t0), gen / (t2 - t1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="the dense model (registry name or folder)")
    p.add_argument("--pruned", default=None, help="a pruned checkpoint folder (default: a fixed cut of --model)")
    p.add_argument("--keep", type=float, default=0.25, help="without --pruned: kept fraction of layers 15-29")
    p.add_argument("--gguf-type", default="f32")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="checkpoints/bench-deploy")
    p.add_argument("--smoke", action="store_true", help="tiny random model, 1 round, few tokens (smoke test)")
    a = p.parse_args()
    import torch

    from surgery.io import llamacpp
    from surgery.io.gguf_file import write_gguf
    from surgery.io.loading import load_model
    from surgery.model.arch import ModelView

    if a.smoke:
        import _smoke

        scratch = _smoke.scratch("deploy")
        a.model, a.out = _smoke.tiny_model(scratch), str(scratch / "out")
        a.prompt_tokens, a.gen_tokens, a.rounds, a.threads = 16, 4, 1, 1
    torch.set_num_threads(a.threads)
    dense = load_model(a.model)
    if a.pruned:
        pruned = load_model(a.pruned)
    else:
        n = ModelView(dense.model).n_layers
        pruned = load_model(a.model)
        fixed_cut(pruned.model, list(range(n // 2, n)), a.keep)
    work = Path(tempfile.mkdtemp(prefix="bench-deploy-"))
    files = {
        "dense": write_gguf(dense.model, dense.tokenizer, work / "dense.gguf", a.gguf_type),
        "pruned": write_gguf(pruned.model, pruned.tokenizer, work / "pruned.gguf", a.gguf_type),
    }
    if not llamacpp.available():
        raise SystemExit("llama-cpp-python is not installed (make setup)")
    ctx = a.prompt_tokens + a.gen_tokens + 8
    llms = {k: llamacpp.open_gguf(f.path, ctx, a.threads, f32_cache=False, logits_all=False) for k, f in files.items()}
    text = "The quick brown fox jumps over the lazy dog. " * 64
    ids = dense.tokenizer.encode(text)[: a.prompt_tokens]
    runs: dict[str, dict[str, list[float]]] = {k: {"prompt": [], "generation": []} for k in llms}
    rng = random.Random(0)
    for k in llms:  # warm-up, not timed
        time_model(llms[k], ids[:8], 2)
    for r in range(a.rounds):
        order = list(llms)
        rng.shuffle(order)
        for k in order:
            pp, tg = time_model(llms[k], ids, a.gen_tokens)
            runs[k]["prompt"].append(pp)
            runs[k]["generation"].append(tg)
        print(f"round {r + 1}/{a.rounds}: " + ", ".join(f"{k} {runs[k]['generation'][-1]:.1f} tok/s" for k in llms))
    med = {k: {w: statistics.median(v) for w, v in runs[k].items()} for k in runs}
    ratio = flop_ratio(dense.model, pruned.model, a.prompt_tokens, a.gen_tokens)
    result = {
        "command": "python bench/deploy.py " + " ".join(sys.argv[1:]),
        "gguf_type": a.gguf_type,
        "threads": a.threads,
        "rounds": a.rounds,
        "prompt_tokens": a.prompt_tokens,
        "gen_tokens": a.gen_tokens,
        "dense": {"file_bytes": files["dense"].bytes, "ffn_widths": files["dense"].widths, **med["dense"]},
        "pruned": {
            "source": a.pruned or f"fixed cut of {a.model} (layers {ModelView(dense.model).n_layers // 2}+, {a.keep})",
            "file_bytes": files["pruned"].bytes,
            "ffn_widths": files["pruned"].widths,
            "arch": files["pruned"].arch,
            **med["pruned"],
        },
        "runs": runs,
        "speedup": {w: med["pruned"][w] / med["dense"][w] for w in ("prompt", "generation")},
        "flop_ratio": {w: ratio[w] for w in ("prompt", "generation")},
        "flops_per_token": ratio,
    }
    result["speedup_share_of_flop_ratio"] = {w: result["speedup"][w] / ratio[w] for w in ("prompt", "generation")}
    result["speedup_over_flop_ratio"] = {
        w: (result["speedup"][w] - 1) / (ratio[w] - 1) if ratio[w] > 1 else None for w in ("prompt", "generation")
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (out / "report.md").write_text(md + "\n")
    print(md)
    for f in files.values():
        f.path.unlink()
    work.rmdir()


def markdown(r: dict) -> str:
    mib = 2**20
    rows = [
        f"`{r['command']}` ({r['gguf_type']}, {r['threads']} threads, median of {r['rounds']} interleaved rounds)",
        "",
        "| | dense | pruned | pruned / dense | FLOP ratio (dense / pruned) |",
        "|---|---|---|---|---|",
        f"| file MiB | {r['dense']['file_bytes'] / mib:.1f} | {r['pruned']['file_bytes'] / mib:.1f} | "
        f"{r['pruned']['file_bytes'] / r['dense']['file_bytes']:.3f} | |",
    ]
    for w, label in (("prompt", f"prompt {r['prompt_tokens']} tok/s"), ("generation", "generation tok/s")):
        rows.append(
            f"| {label} | {r['dense'][w]:.1f} | {r['pruned'][w]:.1f} | {r['speedup'][w]:.3f}x | "
            f"{r['flop_ratio'][w]:.3f}x |"
        )
    share, of = r["speedup_over_flop_ratio"], r["speedup_share_of_flop_ratio"]
    rows += [
        "",
        "Speed-up / FLOP ratio: " + ", ".join(f"{w} {v:.0%}" for w, v in of.items()) + ". Share of the FLOP saving "
        "realised, (speed-up - 1) / (FLOP ratio - 1): "
        + ", ".join(f"{w} {v:.0%}" if v is not None else f"{w} n/a" for w, v in share.items()),
    ]
    return "\n".join(rows)


if __name__ == "__main__":
    main()
