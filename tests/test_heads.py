"""Head scan: prefix reuse is exact, the batched scan equals a naive per-head weight-zeroing scan on every arch,
the screen is the first-order effect, and the command writes its reports, resumes, shards and rejects bad input."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ARCHS, VOCAB, make_tiny

from surgery.commands.heads import run as heads_run
from surgery.find import head_scan as H
from surgery.model.arch import ModelView
from surgery.model.hooks import Hooks, run_from

ROOT = Path(__file__).resolve().parents[1]
SMOL = ROOT / "checkpoints" / "base" / "smollm2-135m"


def _cases(n_seq: int = 5, seed: int = 3):
    """Random sequences of varied length, all but the first sharing a 3-token prefix (so batches take both the
    shared-prefix cache path and the plain one); each contributes 1-3 teacher-forced cases (its prefixes)."""
    g = torch.Generator().manual_seed(seed)
    ids, tgts = [], []
    for s in range(n_seq):
        seq = ([] if s == 0 else [5, 6, 7]) + torch.randint(3, VOCAB, (4 + s % 3,), generator=g).tolist()
        for cut in range(len(seq) - 1 - s % 3, len(seq)):
            ids.append(seq[:cut])
            tgts.append(seq[cut])
    return ids, tgts


def _naive(model, ids, tgts, layer, head, repl=None):
    """Reference: deep-copy, zero the head's o_proj columns (or hook the mean in), run every case on its own."""
    m = copy.deepcopy(model)
    v = ModelView(m)
    lps = []
    with Hooks(v) as h:
        if repl is not None:
            mask = torch.ones(v.n_heads)
            mask[head] = 0
            h.ablate_heads(layer, mask, replacement=repl)
        else:
            v.zero_head_weights(layer, head)
        for x, t in zip(ids, tgts):
            with torch.no_grad():
                logits = m(input_ids=torch.tensor([x])).logits[0, -1]
            lps.append(logits.log_softmax(-1)[t])
    return torch.stack(lps)


@pytest.mark.parametrize("arch", ARCHS)
def test_run_from_equals_full_forward(arch):
    model = make_tiny(arch)
    v = ModelView(model)
    ids, tgts = _cases()
    b = H.pack(ids, tgts, batch_size=8)[0]
    assert b.prefix == 0 and H.pack(ids[1:], tgts[1:], 8)[0].prefix == 3
    full, _, resid = H.clean(v, b, range(v.n_layers))
    types = getattr(v.config, "layer_types", None)
    with torch.no_grad():
        ref = model(**b.inputs("cpu")).logits
        for layer in range(v.n_layers):
            with run_from(v, layer, resid[layer]):
                out = model(**b.inputs("cpu")).logits
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert v.n_layers == 3 and getattr(v.config, "layer_types", None) == types  # restored


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_scan_equals_naive_weight_zeroing(arch):
    model = make_tiny(arch)
    v = ModelView(model)
    ids, tgts = _cases()
    window = getattr(v.config, "sliding_window", None)
    batches = H.pack(ids, tgts, batch_size=3, window=window)  # several batches and lengths, left padding
    assert {b.prefix for b in batches} == ({0} if arch == "gemma3" else {0, 3})  # gemma3: window 4 < length
    heads = [(l, h) for l in range(v.n_layers) for h in range(v.n_heads)]
    got = H.scan(v, batches, len(ids), heads, progress=False)
    for l, h in heads:
        ref = _naive(model, ids, tgts, l, h)
        torch.testing.assert_close(got[l, h]["logprob"], ref, atol=1e-4, rtol=0)
    base_ok, base_lp = H.baseline(v, batches, len(ids))
    assert any(
        not torch.equal(got[k]["correct"], base_ok) or not torch.allclose(got[k]["logprob"], base_lp) for k in heads
    )  # ablations do something


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_mean_ablation_scan_equals_naive(arch):
    model = make_tiny(arch)
    v = ModelView(model)
    ids, tgts = _cases()
    batches = H.pack(ids, tgts, batch_size=4, window=getattr(v.config, "sliding_window", None))
    means = H.head_means(v, batches)
    got = H.scan(v, batches, len(ids), [(1, 2), (2, 0)], repl=means, progress=False)
    for l, h in [(1, 2), (2, 0)]:
        torch.testing.assert_close(got[l, h]["logprob"], _naive(model, ids, tgts, l, h, means[l]), atol=1e-4, rtol=0)


def test_head_means_are_over_non_pad_positions():
    model = make_tiny("qwen2")
    v = ModelView(model)
    seqs = [[5, 6, 7, 8], [9, 10]]
    means = H.head_means(v, H.pack(seqs, [1, 1], batch_size=2))
    zs = []
    for s in seqs:
        with Hooks(v) as h, torch.no_grad():
            h.capture("z", layers=[1], positions=None)
            model(input_ids=torch.tensor([s]))
        zs.append(h.store["z", 1][0])
    torch.testing.assert_close(means[1], torch.cat(zs).mean(0), atol=1e-5, rtol=0)


def test_pack_shares_prefix_cases_and_keeps_one_case_per_position():
    ids = [[1, 2, 3], [1, 2, 3, 4], [1, 2], [7, 8]]
    batches = H.pack(ids, [4, 5, 3, 9], batch_size=8)
    (b,) = batches
    assert b.input_ids.shape == (2, 4) and b.keep == 3
    got = {int(c): (int(r), int(o)) for c, r, o in zip(b.case_idx, b.rows, b.offs)}
    assert got[1][1] == 0 and got[0][1] == 1 and got[2][1] == 2 and got[0][0] == got[1][0] == got[2][0]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_screen_is_the_first_order_effect(arch):
    """-grad . z == d/d(alpha) of the summed target log-prob with z_h scaled by alpha, at alpha = 1 (times -1)."""
    model = make_tiny(arch)
    v = ModelView(model)
    ids, tgts = _cases()
    (b,) = H.pack(ids, tgts, batch_size=16)
    score = H.attribution(v, [b])
    layer, head = 1, 3
    alpha = torch.ones(v.n_heads, requires_grad=True)
    with Hooks(v) as h:
        h.ablate_heads(layer, alpha)
        logits = model(**b.inputs("cpu")).logits
    lp = logits[b.rows, b.keep - 1 - b.offs].log_softmax(-1).gather(-1, b.targets[:, None]).sum()
    (g,) = torch.autograd.grad(lp, alpha)
    torch.testing.assert_close(score[layer, head], -g[head], atol=1e-4, rtol=1e-4)


def test_spearman():
    assert H.spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert H.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


# ---- the command, on a tiny llama with the real SmolLM2 tokenizer -----------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    if not (SMOL / "tokenizer.json").exists():
        pytest.skip("SmolLM2 tokenizer not converted (checkpoints/base/smollm2-135m)")
    import transformers as T

    torch.manual_seed(0)
    cfg = T.LlamaConfig(
        vocab_size=49152,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=2,
        bos_token_id=1,
        eos_token_id=2,
    )
    d = tmp_path_factory.mktemp("tinyllama")
    T.AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    for f in SMOL.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, d / f.name)
    return d


def _cli(*args, cwd=ROOT):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "surgery", "heads", *args], cwd=cwd, env=env, capture_output=True, text=True
    )


def _rows(path: Path) -> dict:
    data = json.loads((path / "heads.json").read_text())["results"]
    return {(r["layer"], r["head"]): r for r in data["heads"]} | {"baseline": data["baseline"]}


def test_run_writes_reports_and_screen_matches_exact(tiny_dir, tmp_path):
    common = dict(model=str(tiny_dir), digits=(1,), ops=("+", "*"), limit=40, batch_size=16)
    exact = heads_run(**common, out=str(tmp_path / "exact"))
    for f in ("heads.json", "heads.md", "heads.png"):
        assert (tmp_path / "exact" / f).stat().st_size > 0
    rows = _rows(tmp_path / "exact")
    assert len(rows) == 12 + 1 and set(rows[0, 0]["acc"]) >= {"overall", "+", "*", "1D+", "memorize"}
    assert "Table 1" in exact.markdown and "Table 2" in exact.markdown and "Table 3" in exact.markdown
    screen = heads_run(**common, out=str(tmp_path / "screen"), mode="screen", verify=5)
    srows = _rows(tmp_path / "screen")
    assert len(srows) == 5 + 1
    for k, r in srows.items():
        assert r == rows[k] if k != "baseline" else r == rows["baseline"]
    sc = screen.data["results"]["screen"]
    assert "spearman_vs_exact_acc_drop" in sc
    pred = {(l, h): sc["predicted_logprob_drop_sum"][l][h] for l in range(3) for h in range(4)}
    chosen = {tuple(map(int, k.split("."))) for k in sc["verified"]}
    assert min(pred[k] for k in chosen) >= max(pred[k] for k in pred if k not in chosen)  # the top-K predicted drops


def test_interrupted_scan_resumes(tiny_dir, tmp_path, monkeypatch):
    common = dict(model=str(tiny_dir), digits=(1,), ops=("-",), limit=20, batch_size=8, out=str(tmp_path))
    real = H.ablated

    def flaky(view, b, layer, *a, **k):
        if layer == 2:  # units are per layer here: layers 0 and 1 finish, then the scan is interrupted
            raise KeyboardInterrupt
        return real(view, b, layer, *a, **k)

    monkeypatch.setattr(H, "ablated", flaky)
    with pytest.raises(KeyboardInterrupt):
        heads_run(**common)
    persisted = H.load_partial(
        tmp_path,
        next(
            iter(json.loads(l)["fingerprint"] for l in (tmp_path / "heads.partial.r0.jsonl").read_text().splitlines())
        ),
    )
    assert sorted(persisted) == [(l, h) for l in (0, 1) for h in range(4)]
    seen = []
    monkeypatch.setattr(
        H, "ablated", lambda v, b, layer, hs, *a, **k: (seen.append((layer, hs)), real(v, b, layer, hs, *a, **k))[1]
    )
    heads_run(**common)
    assert all((l, h) not in persisted for l, hs in seen for h in hs)
    fresh = tmp_path.parent / "fresh"
    heads_run(**{**common, "out": str(fresh)})
    assert seen and _rows(tmp_path) == _rows(fresh)


@pytest.mark.parametrize(
    "args, msg",
    [
        (["--heads", "3.0"], "layer 3 is outside"),
        (["--heads", "0.9"], "head 0.9 is outside"),
        (["--ops", "+,^"], "ops must be"),
        (["--mode", "screen", "--verify", "13"], "--verify 13 is more than the 12 heads"),
        (["--task", "perplexity"], "supports --task arithmetic"),
    ],
)
def test_bad_input_is_one_line_exit_2(tiny_dir, tmp_path, args, msg, capfd):
    """In this process (file-descriptor capture: nothing from transformers may precede the error); the first case
    also as a real `python -m surgery` child, which is what a user sees."""
    from surgery.cli import main

    out = tmp_path / "out"
    argv = ["--model", str(tiny_dir), "--out", str(out), "--limit", "4", *args]
    assert main(["heads", *argv]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("surgery: error:") and msg in err[0], err
    assert not out.exists()
    if args[0:2] == ["--heads", "3.0"]:
        r = _cli(*argv)
        assert r.returncode == 2 and r.stderr.strip().splitlines() == err, r.stderr


@pytest.mark.slow
def test_two_processes_equal_one(tiny_dir, tmp_path):
    launcher = Path(sys.executable).with_name("accelerate")  # the venv's, also when PATH lacks .venv/bin
    if not launcher.exists():
        launcher = shutil.which("accelerate")
    assert launcher, "accelerate (a dependency) must provide its CLI"
    args = ["--model", str(tiny_dir), "--digits", "1", "--ops", "+,/", "--limit", "30", "--batch-size", "8"]
    one = _cli(*args, "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    two = subprocess.run(
        [
            str(launcher),
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "-m",
            "surgery",
            "heads",
            *args,
            "--out",
            str(tmp_path / "two"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert len(list((tmp_path / "two").glob("heads.partial.r*.jsonl"))) == 2
    assert _rows(tmp_path / "one") == _rows(tmp_path / "two")
