"""Benchmark: one recovery-LoRA training step in fp32 vs bf16 autocast (`train.bf16=true`), same process.

The step is the prune recipe's recovery: a rank-8 PEFT LoRA on the attention of layer --layer (8 on SmolLM2), the
answer-only loss of a batch of 2-digit arithmetic training problems (`surgery.training.answer_loss`), backward,
AdamW step, zero_grad. bf16 wraps forward and loss in `torch.autocast(device, bfloat16)`, which is what the HF
Trainer does with `bf16=True` (accelerate's autocast); the LoRA weights and the optimiser state stay fp32. The two
models train on the same batches in alternation (interleaved, after warm-up steps), so load changes hit both; the
ratio of medians is reported, and the mean loss of the last steps of each, to show they train alike.

    python bench/train_step.py [--model smollm2-135m] [--layer 8] [--batch 16] [--steps 12] [--threads N]
    python bench/train_step.py --smoke  # a tiny random model, layer 1, batch 2, 2 steps after 1 warm-up (smoke test)

Last line: speedup <x>x (fp32 <s>s, bf16 <s>s), loss fp32 <l> bf16 <l>
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from surgery.edits.lora import LoraSpec, attach  # noqa: E402
from surgery.edits.training import Collator, answer_loss  # noqa: E402
from surgery.evals import arithmetic  # noqa: E402
from surgery.io.loading import load_model  # noqa: E402
from surgery.model.batching import pad_id  # noqa: E402


def batches(tok, n: int, size: int) -> list[dict]:
    probs = arithmetic.build(digits=(2,), templates=("calculate",), division="inverse", limit=n * size, seed=0)
    rows = arithmetic.encode(probs, tok)  # the prune recipe's training encoding (labels -100 on the prompt)
    collate = Collator(pad_id(tok))
    return [collate(rows[i * size : (i + 1) * size]) for i in range(n)]


def step(model, opt, b: dict, bf16: bool) -> tuple[float, float]:
    t = time.perf_counter()
    device = next(model.parameters()).device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = answer_loss(model, {k: v.to(device) for k, v in b.items()})
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t, float(loss)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layer", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--smoke", action="store_true", help="a tiny random model, batch 2, 2 steps (smoke test)")
    a = ap.parse_args()
    if a.smoke:
        from _smoke import scratch, tiny_model

        a.model, a.layer, a.batch, a.steps, a.warmup, a.threads = tiny_model(scratch("train_step")), 1, 2, 2, 1, 1
    if a.threads:
        torch.set_num_threads(a.threads)
    loaded = load_model(a.model)
    bs = batches(loaded.tokenizer, a.steps + a.warmup, a.batch)
    torch.manual_seed(0)
    models = {m: attach(loaded.model, [a.layer], LoraSpec(rank=8, alpha=16)).train() for m in ("fp32", "bf16")}
    opts = {m: torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-3) for m, pm in models.items()}
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    losses: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for i, b in enumerate(bs):
        for m in models:
            s, loss = step(models[m], opts[m], b, m == "bf16")
            if i >= a.warmup:
                times[m].append(s)
                losses[m].append(loss)
    f, h = statistics.median(times["fp32"]), statistics.median(times["bf16"])
    tail = max(1, len(losses["fp32"]) // 3)
    lf, lh = (statistics.mean(losses[m][-tail:]) for m in ("fp32", "bf16"))
    print(
        json.dumps(
            {
                "model": loaded.name,
                "layer": a.layer,
                "batch": a.batch,
                "threads": torch.get_num_threads(),
                "load": round(os.getloadavg()[0], 1),
                "fp32_s": [round(x, 3) for x in times["fp32"]],
                "bf16_s": [round(x, 3) for x in times["bf16"]],
            }
        )
    )
    print(
        f"bf16 faster in {sum(x > y for x, y in zip(times['fp32'], times['bf16']))} of {len(times['fp32'])} "
        f"paired steps"
    )
    print(f"speedup {f / h:.2f}x (fp32 {f:.3f}s, bf16 {h:.3f}s), loss fp32 {lf:.3f} bf16 {lh:.3f}")


if __name__ == "__main__":
    main()
