"""The head scan's packed layout (shared prefix | left padding | suffix) scores every case exactly as one forward
of that case alone: variable-length rows with multi-token targets (the user-data shape, e.g. capitals.csv), every
architecture, eager and SDPA attention, the clean baseline and an ablated head; and, through the commands' own
packing, the capitals table and mixed-length arithmetic (digits 1 and 2) on a tiny model with the real tokenizer.

Regression: a batch whose shortest sequence is shorter than its `keep` (the longest target: " Paris" beside
" Andorra la Vella") made the shared-prefix length negative, and the slices seqs[P:] / expand(B, P) then replaced
every row by the first row's tokens plus the row's own last token (the clean SmolLM2 scored 5.1% per token on 20
capitals rows instead of 71.8%)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from conftest import ARCHS, VOCAB, make_tiny

from surgery.evals import tasks
from surgery.find import head_scan as H
from surgery.model.arch import ModelView


def _rows(n: int = 12, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """Teacher-forced cases of n rows: a shared 2-token prefix and a token of their own (all but two rows), prompts
    of 0-5 more tokens and targets of 1-4 tokens, so short rows (3 tokens) with one target token sit beside long
    targets in one batch."""
    g = torch.Generator().manual_seed(seed)
    ids, tgts = [], []
    for r in range(n):
        shared = r not in (3, 7)
        own = torch.randint(3, VOCAB, (r % 6 + (not shared),), generator=g).tolist()
        prompt = ([5, 6, 10 + r] if shared else []) + own
        target = torch.randint(3, VOCAB, (1 + (r * 5) % 4,), generator=g).tolist()
        full = prompt + target
        for j in range(len(target)):
            ids.append(full[: len(prompt) + j])
            tgts.append(full[len(prompt) + j])
    return ids, tgts


@torch.no_grad()
def _alone(model, ids, tgts) -> torch.Tensor:
    """Reference: log p(target) from one unpadded forward of each case's context."""
    return torch.stack(
        [model(input_ids=torch.tensor([x])).logits[0, -1].float().log_softmax(-1)[t] for x, t in zip(ids, tgts)]
    )


def _packed(model, ids, tgts, batch_size: int):
    return H.pack(ids, tgts, batch_size, 0, getattr(model.config, "sliding_window", None))


CONFIGS = [(a, "eager") for a in ARCHS] + [("llama", "sdpa"), ("gpt2", "sdpa")]


@pytest.mark.parametrize("arch,attn", CONFIGS)
def test_packed_baseline_equals_one_forward_per_case(arch, attn):
    model = make_tiny(arch)
    model.config._attn_implementation = attn
    v = ModelView(model)
    ids, tgts = _rows()
    ref = _alone(model, ids, tgts)
    seen = []
    for bs in (4, 64):
        batches = _packed(model, ids, tgts, bs)
        seen += batches
        _, lp = H.baseline(v, batches, len(ids))
        torch.testing.assert_close(lp, ref, atol=1e-4, rtol=0)
    assert any(min(int(m.sum()) for m in b.attention_mask) < b.keep for b in seen), "regression shape not exercised"
    if arch != "gemma3":  # gemma3's 4-token sliding window turns the shared prefix off
        assert any(b.prefix > 0 for b in seen)


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_head_ablation_equals_weight_zeroing(arch):
    model = make_tiny(arch)
    ids, tgts = _rows()
    m = copy.deepcopy(model)
    ModelView(m).zero_head_weights(1, 2)
    ref = _alone(m, ids, tgts)
    for bs in (4, 64):  # 4: batches with a shared prefix (KV-cache path); 64: short rows beside long targets
        got = H.scan(ModelView(model), _packed(model, ids, tgts, bs), len(ids), [(1, 2)], progress=False)
        torch.testing.assert_close(got[1, 2]["logprob"], ref, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def tiny_real_tok(tiny_smol_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_smol_dir, dtype=torch.float32).eval()
    return SimpleNamespace(model=model, tokenizer=AutoTokenizer.from_pretrained(tiny_smol_dir))


def _check_command_batches(loaded, labels: dict, batches: list, cases) -> None:
    n = len(labels["op"])
    assert n == len(cases)
    _, lp = H.baseline(ModelView(loaded.model), batches, n)
    torch.testing.assert_close(lp, _alone(loaded.model, cases["input_ids"], cases["target"]), atol=1e-4, rtol=0)


def test_user_rows_through_heads_packing(tiny_real_tok):
    """capitals.csv (targets of 1-4 tokens) as `surgery heads --data` packs it."""
    ds = tasks.load_cases("capitals.csv").select(range(40))
    labels, batches = H.user_batches(tiny_real_tok, ds, 16)
    _check_command_batches(tiny_real_tok, labels, batches, tasks.cases(tiny_real_tok.tokenizer, ds))
    assert any(b.prefix > 0 for b in batches)
    assert any(min(int(m.sum()) for m in b.attention_mask) < b.keep for b in batches)


def test_mixed_length_arithmetic_through_heads_packing(tiny_real_tok):
    """Digits 1 and 2 in one scan (answers of 1-4 tokens) as `surgery heads --digits 1 2` packs them."""
    from surgery.evals import arithmetic

    labels, batches = H.arithmetic_batches(tiny_real_tok, (1, 2), None, None, 30, 0, 16)
    assert {1, 2} <= set(labels["digits"])
    problems = arithmetic.build(digits=(1, 2), templates=arithmetic.DEFAULT_TEMPLATES, seed=0, limit=30)
    _check_command_batches(tiny_real_tok, labels, batches, arithmetic.cases(problems, tiny_real_tok.tokenizer))
