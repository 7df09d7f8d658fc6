"""Eval suites: problem sets, case labels, splits, tokenised cases, batched scoring; real-model checks marked."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import transformers as T

from surgery.commands.eval.job import evaluate, format_table
from surgery.errors import UsageError
from surgery.evals import arithmetic as A
from surgery.evals import gender_bias as G
from surgery.evals import perplexity as P
from surgery.model.batching import last_logits, left_pad, predict_cases, suffix_logprobs

SMOL_DIR = Path(__file__).resolve().parents[1] / "checkpoints" / "base" / "smollm2-135m"


@pytest.fixture(scope="module")
def tok():
    """The SmolLM2 tokenizer from the converted checkpoint (left padding as load_model sets it)."""
    if not (SMOL_DIR / "tokenizer.json").exists():
        pytest.skip("SmolLM2 not converted into checkpoints/base/ yet")
    t = T.AutoTokenizer.from_pretrained(str(SMOL_DIR))
    t.padding_side = "left"
    return t


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    cfg = T.LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
    )
    return T.LlamaForCausalLM(cfg).eval()


# --- arithmetic problems -------------------------------------------------------------------------------


def counts(ds) -> dict:
    return {g: ds["group"].count(g) for g in set(ds["group"])}


def test_one_digit_counts_and_exact_division():
    ds = A.build(templates=("plain",))
    assert counts(ds) == {"1D+": 100, "1D-": 55, "1D*": 100, "1D/": 32}
    for row in ds:
        assert eval(row["prompt"][:-1].replace("/", "//")) == int(row["answer"])
        if row["op"] == "/":
            assert row["b"] != 0 and row["a"] % row["b"] == 0
    neg = A.build(ops=("-",), templates=("plain",), negative=True)
    assert len(neg) == 100 and "-2" in neg.filter(lambda r: r["problem_id"] == "1D-|3|5")["answer"]


def test_inverse_division_and_multi_digit_ranges():
    inv = A.build(ops=("/",), templates=("plain",), division="inverse")
    assert len(inv) == 90 and "72/8=" in inv["prompt"]
    two = A.build(digits=(2,), templates=("plain",), per_op=300)
    assert all(10 <= r["a"] <= 99 and 10 <= r["b"] <= 99 for r in two)
    assert counts(two) == {"2D+": 300, "2D-": 300, "2D*": 300, "2D/": 196}


def test_templates_and_answers():
    rows = {
        r["template"]: r for r in A.build(templates=tuple(A.TEMPLATES)).filter(lambda r: r["problem_id"] == "1D+|3|5")
    }
    assert rows["plain"]["prompt"] == "3+5=" and rows["plain"]["answer"] == "8"
    assert rows["calculate"]["prompt"] == "Calculate: 3+5="
    assert rows["words"]["prompt"] == "three plus five is" and rows["words"]["answer"] == " 8"
    assert rows["question"]["prompt"] == "Question: What is 3+5? Answer:"


def test_number_words():
    assert [A.number_words(n) for n in (0, 13, 40, 42, 100, 342, 999)] == [
        "zero",
        "thirteen",
        "forty",
        "forty-two",
        "one hundred",
        "three hundred forty-two",
        "nine hundred ninety-nine",
    ]
    with pytest.raises(UsageError):
        A.number_words(1000)


@pytest.mark.parametrize(
    "a,op,b,answer,labels",
    [
        (15, "+", 17, "32", ["change-one", "memorize"]),
        (3, "+", 8, "11", ["change-one", "memorize"]),
        (12, "+", 13, "25", ["memorize", "memorize"]),
        (52, "-", 17, "35", ["change-one", "memorize"]),
        (57, "-", 12, "45", ["memorize", "memorize"]),
        (3, "-", 5, "-2", ["memorize", "memorize"]),
        (7, "*", 8, "56", ["change-one", "memorize"]),
        (96, "/", 12, "8", ["memorize"]),
    ],
)
def test_digit_labels(a, op, b, answer, labels):
    assert A.digit_labels(a, op, b, answer) == labels


def test_splits_disjoint_deterministic_and_stratified():
    kw = dict(digits=(2,), templates=("plain", "calculate"), test_size=200, per_op=500)
    train, test = A.build(split="train", **kw), A.build(split="test", **kw)
    assert not set(train["problem_id"]) & set(test["problem_id"])
    assert len(set(test["problem_id"])) == 200 and len(set(train["problem_id"])) == 1696 - 200
    assert A.build(split="test", **kw)["problem_id"] == test["problem_id"]
    assert A.build(split="test", seed=1, **kw)["problem_id"] != test["problem_id"]
    val = A.build(split="validation", validation_size=0.1, **kw)
    assert not set(val["problem_id"]) & (
        set(test["problem_id"]) | set(A.build(split="train", validation_size=0.1, **kw)["problem_id"])
    )
    limited = A.build(limit=8, templates=("plain",))
    assert len(limited) == 8 and len(counts(limited)) == 4  # proportional, every group kept


def test_bad_options_raise_usage_error():
    for kw in (
        dict(digits=(4,)),
        dict(ops=("^",)),
        dict(templates=("nope",)),
        dict(split="dev"),
        dict(limit=0),
        dict(split="test", test_size=5000),
    ):
        with pytest.raises(UsageError):
            A.build(**kw)


# --- cases on the real tokenizer -----------------------------------------------------------------------


def test_cases_two_digit_answer(tok):
    probs = A.build(digits=(2,), ops=("+",), templates=("plain",), per_op=8100).filter(
        lambda r: r["problem_id"] == "2D+|15|32"
    )
    cs = A.cases(probs, tok)
    assert len(cs) == 2
    assert [tok.decode(c["input_ids"]) for c in cs] == ["15+32=", "15+32=4"]
    assert [tok.decode([c["target"]]) for c in cs] == ["4", "7"]
    assert cs["is_last"] == [False, True] and cs["case_type"] == ["memorize", "memorize"]


def test_cases_fold_whitespace(tok):
    probs = A.build(templates=("words", "question", "calculate")).filter(lambda r: r["problem_id"] == "1D+|3|8")
    cs = A.cases(probs, tok)
    assert len(cs) == 6  # "11" is two digit tokens in every template; the space token is never a case
    ctx = {c["template"]: tok.decode(c["input_ids"]) for c in cs if c["token_index"] == 0}
    assert ctx["words"] == "three plus eight is " and ctx["question"].endswith("Answer: ")
    assert all(tok.decode([t]).strip() for t in cs["target"])
    assert cs.filter(lambda c: c["template"] == "calculate")["case_type"] == ["change-one", "memorize"]


def test_score_breakdown():
    import datasets

    cs = datasets.Dataset.from_list(
        [
            dict(problem_id="1D+|7|8", template="plain", group="1D+", case_type="change-one"),
            dict(problem_id="1D+|7|8", template="plain", group="1D+", case_type="memorize"),
            dict(problem_id="1D-|5|3", template="plain", group="1D-", case_type="memorize"),
        ]
    )
    res = A.score(cs, [True, False, True])
    assert res["1D+"]["acc"] == 0.5 and res["1D+"]["full_answer_acc"] == 0.0 and res["1D+"]["n_problems"] == 1
    assert res["overall"]["n"] == 3 and res["overall"]["full_answer_acc"] == 0.5
    assert res["by_case_type"]["memorize"]["acc"] == 0.5 and res["by_case_type"]["change-one"]["acc"] == 1.0
    lo, hi = res["overall"]["ci95"]
    assert 0 < lo < 2 / 3 < hi < 1


# --- gender bias, wino, perplexity data ------------------------------------------------------------------


def test_gender_build():
    ds = G.build()
    assert len(ds) == 8 * 32 * 2 and len(set(ds["pair_id"])) == 8 * 32
    assert not set(G.TEMPLATES) & set(G.SELECTION_TEMPLATES) and len(G.build("select")) == 4 * 32 * 2
    row = ds.filter(lambda r: r["template"] == "The job of a {g} is" and r["profession"] == "nurse")[0]
    assert row["prompt"] in ("The job of a woman is a", "The job of a man is a") and row["continuation"] == " nurse"
    assert G.prompt_for("A {g} works as a", "man", "engineer") == ("A man works as an", " engineer")
    with pytest.raises(UsageError):
        G.build(professions=["astronaut"])


def test_gender_score_signs():
    ds = G.build(templates=["A {g} works as a"], professions=["nurse", "miner"])
    lp = [-1.0 if (g == "woman") == (p == "nurse") else -3.0 for g, p in zip(ds["gender"], ds["profession"])]
    res = G.score(ds, lp)
    assert res["total"]["mean"] == 2.0 and res["per_profession"]["nurse"]["signed_diff"] == 2.0
    assert res["per_profession"]["miner"]["signed_diff"] == -2.0 and res["man-biased"]["n"] == 1


def test_wino_items_and_perplexity_docs():
    items = G.wino_items()
    assert len(items) > 700 and all("[" not in it["prompt"] and it["pro"] != it["anti"] for it in items)
    assert {it["pro"] for it in items} >= {"he", "she", "his", "her"}
    docs = P.build(n_docs=5, max_chars=100)
    assert len(docs) == 5 and all(0 < len(d) <= 100 for d in docs["document"])


# --- batched scoring on a tiny random Llama -------------------------------------------------------------


def test_left_pad_last_logits_match_unpadded(tiny_llama):
    seqs = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
    ids, mask = left_pad(seqs, pad_id=0)
    assert ids.tolist()[1] == [0, 0, 0, 0, 11, 12] and mask.tolist()[1] == [0, 0, 0, 0, 1, 1]
    batched = last_logits(tiny_llama, ids, mask)
    assert batched.dtype == torch.float32 and batched.shape == (3, 96)
    for i, s in enumerate(seqs):
        with torch.no_grad():
            alone = tiny_llama(input_ids=torch.tensor([s])).logits[0, -1]
        torch.testing.assert_close(batched[i], alone, atol=1e-5, rtol=0)


def test_predict_cases_and_suffix_logprobs_match_full_forward(tiny_llama):
    class Tok:
        pad_token_id, eos_token_id = 0, 2

    seqs = [[5, 6, 7, 8, 9, 10], [11, 12, 3], [13, 14, 15, 16]]
    cases = {"input_ids": [s[:-1] for s in seqs], "target": [s[-1] for s in seqs]}
    out = predict_cases(tiny_llama, Tok(), cases, batch_size=2, progress=False)
    lps = suffix_logprobs(tiny_llama, seqs, [3, 2, 1], pad=0, batch_size=2)
    for i, s in enumerate(seqs):
        with torch.no_grad():
            full = tiny_llama(input_ids=torch.tensor([s])).logits[0].log_softmax(-1)
        want = full[:-1].gather(1, torch.tensor(s[1:])[:, None])[:, 0]
        torch.testing.assert_close(out["logprob"][i], want[-1], atol=1e-5, rtol=0)
        assert out["pred"][i] == full[-2].argmax() and out["correct"][i] == (full[-2].argmax() == s[-1])
        torch.testing.assert_close(lps[i], want[-len(lps[i]) :], atol=1e-5, rtol=0)


def test_evaluate_validates_options():
    for kw in (
        dict(task="nope"),
        dict(task="arithmetic", digits=(5,)),
        dict(task="arithmetic", ops=("%",)),
        dict(task="arithmetic", templates=("bad",)),
        dict(task="arithmetic", limit=0),
    ):
        with pytest.raises(UsageError):
            evaluate(None, **kw)


# --- the real model ---------------------------------------------------------------------------------------


@pytest.mark.real
def test_real_arithmetic_addition(smol):
    start = time.time()
    out = evaluate(smol, "arithmetic", digits=(1,), ops=("+",))
    res = out["results"]["arithmetic"]
    print(f"\n{format_table(out)}\n({time.time() - start:.1f}s)")
    assert res["1D+"]["n_problems"] == 100 and res["1D+"]["n"] == 145  # 45 sums have two digits
    assert 0.5 < res["1D+"]["acc"] < 0.95


@pytest.mark.real
def test_real_gender_continuations_and_perplexity(smol):
    ds = G.build(templates=["A {g} works as a"], professions=["nurse", "miner"])
    lp = G.continuation_logprobs(smol.model, smol.tokenizer, ds["prompt"], ds["continuation"])
    res = G.score(ds, lp)
    print(f"\nnurse {res['per_profession']['nurse']}, miner {res['per_profession']['miner']}")
    nurse, miner = (res["per_profession"][p]["signed_diff"] for p in ("nurse", "miner"))
    assert nurse > 0.5 and nurse > miner  # "A woman works as a nurse" is clearly more likely than for a man
    ppl = P.perplexity(smol.model, smol.tokenizer, P.build(n_docs=2), max_length=48, progress=False)
    print(f"perplexity (2 docs, 48 tokens): {ppl}")
    assert 5 < ppl["ppl"] < 200 and ppl["tokens"] == 2 * 47


@pytest.mark.real
def test_real_wino_fast_path_matches_generic(smol):
    items = G.wino_items()[:2]
    fast = G.pronoun_logprobs(smol.model, smol.tokenizer, items, batch_size=2)
    prompts = [it["prompt"] for it in items for _ in range(2)]
    conts = [" " + it[k] for it in items for k in ("pro", "anti")]
    slow = G.continuation_logprobs(smol.model, smol.tokenizer, prompts, conts).view(-1, 2)
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=0)
