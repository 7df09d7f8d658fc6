"""Benchmark: batched exact activation patching (`surgery.patching.exact`) vs the one-component-per-forward loop.

Reference (what a TransformerLens patching loop does): for every component, one forward of all prompts from the
embeddings with a forward hook that overwrites the component's activation at its role positions with the
counterfactual's, logits at every position; Eq. 1 from the last position. Surgery: the clean and counterfactual
runs, then per layer one stacked forward of the layers above it (prefix reuse) patching many components at once;
its time includes the two runs. Same components (every head and MLP of --layers at every role), same prompts;
identical = every Eq. 1 effect equal to 1e-4 (relative to max(1, |effect|)). Also printed: the attribution
screen's recall of the exact top 20 of these components. Answers are scored by their first token here (`--score
first`, the single-token case both loops share); teacher-forced Eq. 1 is checked against one plain forward per
answer prefix in tests/test_circuit_tf.py.

    python bench/circuit.py [--model smollm2-135m] [--operands 0-29] [--op +] [--prompts 20] [--layers 0,10,20,29]
    python bench/circuit.py --smoke     # a tiny random model, operands 0-9, 4 prompts, layers 0,1 (the smoke test)

Last line: speedup <x>x (reference <s>s, surgery <s>s), identical=<true|false>
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from surgery.find import circuit as C  # noqa: E402
from surgery.find import patching as P  # noqa: E402
from surgery.io.loading import load_model  # noqa: E402
from surgery.model.arch import ModelView  # noqa: E402


def pairs_for(loaded, op: str, operands: tuple[int, int], n: int, seed: int = 0) -> P.Pairs:
    """n prompts of the biggest token layout of `op`, each with a same-layout counterfactual of another answer."""
    gs = C.groups(loaded.tokenizer, "calculate", C.problems((op,), operands, "calculate", seed), score="first")
    g = max(gs, key=lambda g: len(g.rows))
    rng = np.random.default_rng(seed)
    clean = rng.permutation(len(g.rows))[:n].tolist()
    cf = [int(rng.choice(torch.nonzero(g.r != g.r[i]).flatten().numpy())) for i in clean]
    return P.Pairs(g.ids[clean], g.ids[cf], g.roles, g.r[clean], g.r[cf], g.key)


@torch.no_grad()
def reference(view: ModelView, pr: P.Pairs, comps: list[P.Component]) -> torch.Tensor:
    """[len(comps), B] Eq. 1 effects: one full forward per component with a plain hook (no batching, no reuse)."""
    model = view.model
    clean = model(input_ids=pr.clean).logits[:, -1:]
    cache = {}
    hooks = []
    for l in range(view.n_layers):  # the counterfactual's activations, captured once
        hooks.append(
            view.attn_out(l).register_forward_pre_hook(lambda m, a, l=l: cache.__setitem__(("z", l), a[0].clone()))
        )
        hooks.append(
            view.ffn_contribution_module(l).register_forward_hook(
                lambda m, a, o, l=l: cache.__setitem__(("ffn", l), (o[0] if isinstance(o, tuple) else o).clone())
            )
        )
    model(input_ids=pr.cf)
    for h in hooks:
        h.remove()
    dh, out = view.head_dim, []
    for c in comps:
        pos = pr.where(c.role)
        if c.kind == "head":

            def pre(m, a, c=c, pos=pos):
                x = a[0].clone()
                sl = slice(c.index * dh, (c.index + 1) * dh)
                x[:, pos, sl] = cache["z", c.layer][:, pos, sl]
                return (x, *a[1:])

            h = view.attn_out(c.layer).register_forward_pre_hook(pre)
        else:

            def post(m, a, o, c=c, pos=pos):
                y = (o[0] if isinstance(o, tuple) else o).clone()
                y[:, pos] = cache["ffn", c.layer][:, pos]
                return (y, *o[1:]) if isinstance(o, tuple) else y

            h = view.ffn_contribution_module(c.layer).register_forward_hook(post)
        try:
            logits = model(input_ids=pr.clean).logits[:, -1:]
        finally:
            h.remove()
        out.append(P.eq1(clean, logits[None], pr)[0])
    return torch.stack(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--operands", default="0-29")
    p.add_argument("--op", default="+")
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--layers", default="0,10,20,29", help="every head and the MLP of these layers, at every role")
    p.add_argument("--smoke", action="store_true", help="a tiny random model at the smallest sizes (smoke test)")
    a = p.parse_args(argv)
    if a.smoke:
        from _smoke import scratch, tiny_model

        a.model, a.operands, a.prompts, a.layers = tiny_model(scratch("circuit"), layers=2), "0-9", 4, "0,1"
    loaded = load_model(a.model)
    view = ModelView(loaded.model)
    pr = pairs_for(loaded, a.op, C.parse_operands(a.operands), a.prompts)
    layers = [int(x) for x in a.layers.split(",")]
    comps = [c for c in C.head_components(view) if c.layer in layers]
    print(f"{len(comps)} components x {pr.n} prompts ({pr.key}), torch threads {torch.get_num_threads()}", flush=True)

    t = time.perf_counter()
    clean, cf = P.run_pair(view, pr)
    ours = P.exact(view, pr, comps, clean, cf)
    t_s = time.perf_counter() - t
    print(f"surgery: {t_s:.1f}s", flush=True)
    t = time.perf_counter()
    ref = reference(view, pr, comps)
    t_r = time.perf_counter() - t
    print(f"reference: {t_r:.1f}s", flush=True)
    err = ((ours - ref).abs() / ref.abs().clamp(min=1)).max().item()
    s = P.screen(view, pr, cf)
    sv = [
        float(s["head"][c.role, c.layer, c.index].mean() if c.kind == "head" else s["mlp"][c.role, c.layer].mean())
        for c in comps
    ]
    rec = C.recall(sv, ours.mean(1).tolist(), 20)
    print(f"max relative difference {err:.2e}; screen recall of the exact top 20: {rec:.2f}")
    print(
        f"speedup {t_r / t_s:.1f}x (reference {t_r:.1f}s, surgery {t_s:.1f}s), "
        f"identical={'true' if err <= 1e-4 else 'false'}"
    )


if __name__ == "__main__":
    main()
