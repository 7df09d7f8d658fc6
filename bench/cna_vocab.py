"""CNA on large vocabularies: random-init Llama (128,256 tokens) and Gemma 3 (262,144 tokens, post-FFN norm)
models with SmolLM2-135M's widths (d 576, FFN 1536, 9/3 heads) against SmolLM2-135M itself, same process,
interleaved repeats; cost per case per unit of (neurons x vocabulary).

    python bench/cna_vocab.py [--cases 8] [--k 100] [--layers 6] [--repeats 3]
    python bench/cna_vocab.py --smoke   # the same vocabularies on tiny widths, 1 layer, 2 cases, against a tiny
                                        # random model with SmolLM2's vocabulary (smoke test)

--layers 30 gives the random models SmolLM2's layer count, so only the vocabulary differs. With fewer layers, the
per-case cost of the k exact scores (about k x vocab x d, whatever the layer count) weighs more per unit of
(neurons x layers x vocabulary) than it does on SmolLM2 (docs/benchmarks/cna.md).

Each model scores the same number of cases (random token prompts for the random models, 1-digit arithmetic for
SmolLM2) with `cna.compare` (certified top-k over all layers). Last line:
vocab <model>: <x>x SmolLM2's cost per neuron x vocabulary (median), certified <c>/<n>
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import transformers as T

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from surgery.evals import arithmetic  # noqa: E402
from surgery.find import cna  # noqa: E402
from surgery.io.loading import load_model  # noqa: E402
from surgery.model.arch import ModelView  # noqa: E402
from surgery.model.batching import left_pad, pad_id  # noqa: E402

SMOL_WIDTHS = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, head_dim=64)
TINY_WIDTHS = dict(hidden_size=48, intermediate_size=64, num_attention_heads=6, num_key_value_heads=2, head_dim=8)


def random_model(kind: str, layers: int, widths: dict = SMOL_WIDTHS) -> torch.nn.Module:
    """SmolLM2's widths, a large vocabulary; fp32 random init (seed 0), tied embeddings, no soft-capping."""
    torch.manual_seed(0)
    w = {k: v for k, v in widths.items() if k != "head_dim"}
    common = dict(
        **w,
        num_hidden_layers=layers,
        tie_word_embeddings=True,
        pad_token_id=0,
    )
    if kind == "llama":
        model = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=128256, **common))
    else:
        cfg = T.Gemma3TextConfig(vocab_size=262144, head_dim=widths["head_dim"], final_logit_softcapping=None, **common)
        model = T.Gemma3ForCausalLM(cfg)
    return model.eval()


def units(view: ModelView) -> int:
    return sum(view.ffn_width(l) for l in range(view.n_layers)) * view.unembed_matrix().shape[0]


def run_once(view: ModelView, seqs: list[list[int]], k: int, pad: int) -> tuple[float, int, int]:
    t = time.time()
    res = cna.compare(view, left_pad(seqs, pad), list(range(view.n_layers)), k)
    return (time.time() - t) / len(seqs), int(res.top.certified.sum()), res.top.rescored


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default="llama,gemma3")
    ap.add_argument("--smoke", action="store_true", help="tiny widths, 1 layer, 2 cases, 1 repeat (smoke test)")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 2)
    smol_model, widths = "smollm2-135m", SMOL_WIDTHS
    if args.smoke:
        from _smoke import scratch, tiny_model

        smol_model, widths = tiny_model(scratch("cna_vocab"), layers=1), TINY_WIDTHS
        args.cases, args.k, args.layers, args.repeats = 2, 5, 1, 1
        torch.set_num_threads(1)
    loaded = load_model(smol_model)
    problems = arithmetic.build(digits=(1,), templates=("calculate",), limit=args.cases)
    smol = (
        ModelView(loaded.model),
        list(arithmetic.cases(problems, loaded.tokenizer)["input_ids"])[: args.cases],
        pad_id(loaded.tokenizer),
    )
    g = torch.Generator().manual_seed(1)
    models = {"smollm2": smol}
    for kind in args.models.split(","):
        view = ModelView(random_model(kind, args.layers, widths))
        seqs = [torch.randint(3, 32000, (10,), generator=g).tolist() for _ in range(args.cases)]
        models[kind] = (view, seqs, 0)
    for view, seqs, pad in models.values():
        run_once(view, seqs[:1], args.k, pad)  # one-time vocabulary ranges (disk-cached)
    per_unit: dict[str, list[float]] = {m: [] for m in models}
    info: dict[str, tuple[int, int]] = {}
    for rep in range(args.repeats):
        for name, (view, seqs, pad) in models.items():
            t, cert, spent = run_once(view, seqs, args.k, pad)
            per_unit[name].append(t / units(view))
            info[name] = (cert, spent)
            print(
                f"repeat {rep} {name}: {1000 * t:.0f} ms per case, {units(view) / 1e9:.2f}G neuron x vocab, "
                f"certified {cert}/{len(seqs)}, {spent / len(seqs):.0f} exact per case",
                flush=True,
            )
    print(f"load average at the end {os.getloadavg()[0]:.1f}, threads {torch.get_num_threads()}")
    for name in list(models)[1:]:
        ratio = [a / b for a, b in zip(per_unit[name], per_unit["smollm2"])]
        print(
            f"vocab {name}: {statistics.median(ratio):.2f}x SmolLM2's cost per neuron x vocabulary (median; "
            f"spread {min(ratio):.2f}-{max(ratio):.2f}x), certified {info[name][0]}/{args.cases}"
        )


if __name__ == "__main__":
    main()
