"""Arithmetic problems (n-digit +, -, *, /) in several prompt templates, expanded into per-answer-token cases.

A PROBLEM is (a, op, b, digits). Operands range over the n-digit numbers: 0..9 for 1 digit (so 0 is a
1-digit number), 10..99 for 2, 100..999 for 3. Subtraction keeps a >= b unless `negative=True`.
Division is exact; two rules (`division=`):
  "exact"   (default) both operands are n-digit and a is divisible by b != 0. For 1 digit that is 32 problems
            (e.g. 8/2=4, 0/7=0); for 2 digits only 196 exist, fewer than the other ops.
  "inverse" division undoes n-digit multiplication: b (!= 0) and the quotient q are n-digit, a = b*q may have
            up to 2n digits (72/8=9). Use it for balanced 2/3-digit training sets.
1-digit problems are enumerated; 2/3-digit problems are sampled deterministically (seed), up to `per_op` per op.

A CASE is one answer token to predict with teacher forcing: context = prompt + the answer tokens before it.
Each answer digit is labelled "memorize" or "change-one" (the paper's case types): for + and - a digit is
change-one iff a carry/borrow comes into its position from the position below; for * and / the last digit is
memorize and every other digit change-one; a leading minus sign is memorize.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from datasets import Dataset
from torch import nn

from surgery.errors import UsageError
from surgery.evals.registry import EvalOptions, Task, register
from surgery.io.recipe import rules
from surgery.io.report import wilson
from surgery.model.batching import batches, continuation_ids, forward_logits, left_pad, pad_id, predict_cases

OPS = {"+": "add", "-": "sub", "*": "mul", "/": "div"}
OP_WORDS = {"+": "plus", "-": "minus", "*": "times", "/": "divided by"}
TEMPLATES = {
    "plain": "{a}{op}{b}=",
    "calculate": "Calculate: {a}{op}{b}=",
    "words": "{A} {opw} {B} is",
    "question": "Question: What is {a}{op}{b}? Answer:",
}
DEFAULT_TEMPLATES = ("calculate",)  # the measured baseline's template; pass more for a broader view
SPLITS = ("train", "validation", "test", "all")
DIVISION_RULES = ("exact", "inverse")
ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen".split()
)
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """English words for 0..999 ("three hundred forty-two"), for the "words" template."""
    if not 0 <= n <= 999:
        raise UsageError(f"number_words supports 0..999, got {n}; use digits templates for larger numbers")
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])
    rest = n % 100
    return ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + number_words(rest))


def digit_range(digits: int) -> tuple[int, int]:
    """Inclusive range of n-digit numbers; 0 counts as a 1-digit number."""
    return (0 if digits == 1 else 10 ** (digits - 1)), 10**digits - 1


def candidate_pairs(
    digits: int, op: str, negative: bool, division: str, operands: tuple[int, int] | None = None
) -> np.ndarray:
    """All (a, b) pairs of one op at `digits` (or with both operands in the inclusive range `operands`), as an
    [N, 2] array in (a, b) order."""
    lo, hi = digit_range(digits) if operands is None else operands
    if op == "/" and division == "inverse":
        b, q = np.meshgrid(np.arange(max(lo, 1), hi + 1), np.arange(lo, hi + 1), indexing="ij")
        return np.stack([(b * q).ravel(), b.ravel()], 1)
    a, b = np.meshgrid(np.arange(lo, hi + 1), np.arange(lo, hi + 1), indexing="ij")
    a, b = a.ravel(), b.ravel()
    keep = {
        "+": np.ones_like(a, bool),
        "*": np.ones_like(a, bool),
        "-": (a >= b) | negative,
        "/": (b != 0) & (a % np.maximum(b, 1) == 0),
    }[op]
    return np.stack([a[keep], b[keep]], 1)


def sample_pairs(
    digits: int,
    op: str,
    *,
    negative: bool,
    division: str,
    per_op: int,
    seed: int,
    operands: tuple[int, int] | None = None,
) -> list[tuple]:
    """All pairs for 1 digit; for more, a seeded sample of at most `per_op`, sorted for a stable order."""
    pairs = candidate_pairs(digits, op, negative, division, operands)
    if digits > 1 and len(pairs) > per_op:
        rng = np.random.default_rng([seed, digits, ord(op)])
        pairs = pairs[np.sort(rng.choice(len(pairs), per_op, replace=False))]
    return [(int(a), int(b)) for a, b in pairs]


def solve(a: int, op: str, b: int) -> int:
    """The exact integer answer (division is exact by construction)."""
    return {"+": a + b, "-": a - b, "*": a * b, "/": a // b if b else 0}[op]


def carries(x: int, y: int, op: str, width: int) -> list[bool]:
    """carries[i] = a carry (for +) or borrow (for -, x >= y) comes INTO digit position i (0 = units)."""
    out, c = [False], 0
    for i in range(width - 1):
        dx, dy = x // 10**i % 10, y // 10**i % 10
        c = int(dx + dy + c >= 10) if op == "+" else int(dx - dy - c < 0)
        out.append(bool(c))
    return out


def digit_labels(a: int, op: str, b: int, answer: str) -> list[str]:
    """One case type per answer character ("memorize" | "change-one"), see the module docstring."""
    digits = answer.lstrip("-")
    if op in "*/":
        body = ["change-one"] * (len(digits) - 1) + ["memorize"]
    else:
        x, y = (a, b) if op == "+" or a >= b else (b, a)  # a negative answer is -(b - a)
        c = carries(x, y, op, len(digits))
        body = ["change-one" if c[len(digits) - 1 - i] else "memorize" for i in range(len(digits))]
    return ["memorize"] * (len(answer) - len(digits)) + body


def render(template: str, a: int, op: str, b: int) -> str:
    """The prompt of one problem in one template."""
    if template not in TEMPLATES:
        raise UsageError(f"unknown arithmetic template {template!r}; use one of {', '.join(TEMPLATES)}")
    words = dict(A=number_words(a), B=number_words(b)) if template == "words" else {}
    return TEMPLATES[template].format(a=a, op=op, b=b, opw=OP_WORDS[op], **words)


def problem_row(digits: int, op: str, a: int, b: int) -> dict:
    """The template-independent columns of one problem."""
    group = f"{digits}D{op}"
    return dict(
        problem_id=f"{group}|{a}|{b}",
        a=a,
        b=b,
        op=op,
        op_name=OPS[op],
        digits=digits,
        group=group,
        result=solve(a, op, b),
    )


def validate(digits: Sequence[int], ops: Sequence[str], templates: Sequence[str], split: str, division: str) -> None:
    """Raise UsageError naming the valid values for any bad option."""
    if not digits or not set(digits) <= {1, 2, 3}:
        raise UsageError(f"digits must be a non-empty subset of 1,2,3; got {list(digits)}")
    if not ops or not set(ops) <= set(OPS):
        raise UsageError(f"ops must be a non-empty subset of + - * /; got {list(ops)}")
    bad = [t for t in templates if t not in TEMPLATES]
    if bad or not templates:
        raise UsageError(f"unknown arithmetic template(s) {bad}; use some of {', '.join(TEMPLATES)}")
    if split not in SPLITS:
        raise UsageError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if division not in DIVISION_RULES:
        raise UsageError(f"unknown division rule {division!r}; use one of {', '.join(DIVISION_RULES)}")


def stratified_order(problems: list[dict], seed: int) -> list[dict]:
    """Shuffle each group (seeded), then interleave the groups, so any prefix keeps every group represented."""
    by_group: dict[str, list[dict]] = defaultdict(list)
    for p in problems:
        by_group[p["group"]].append(p)
    shuffled = []
    for i, g in enumerate(sorted(by_group)):
        rows = by_group[g]
        perm = np.random.default_rng([seed, 7, i]).permutation(len(rows))
        shuffled.append([(k / len(rows), rows[j]) for k, j in enumerate(perm)])
    merged = sorted((pos, gi, p["problem_id"], p) for gi, rows in enumerate(shuffled) for pos, p in rows)
    return [m[-1] for m in merged]


def allocate(sizes: dict[str, int], total: int) -> dict[str, int]:
    """Split `total` over groups proportionally to `sizes` (largest remainder), so counts add up exactly."""
    n = sum(sizes.values())
    if n == 0:
        return {g: 0 for g in sizes}
    exact = {g: total * s / n for g, s in sizes.items()}
    out = {g: math.floor(v) for g, v in exact.items()}
    for g in sorted(exact, key=lambda g: out[g] - exact[g])[: total - sum(out.values())]:
        out[g] += 1
    return out


def held_out_size(size: float | int | None, n: int, default: float = 0.1) -> int:
    """Number of held-out problems: a fraction (< 1) of the n problems or a count; None means `default`."""
    size = default if size is None else size
    return round(size * n) if isinstance(size, float) and size < 1 else int(size)


def split_problems(
    problems: list[dict], split: str, test_size: float | int | None, validation_size: float | int | None, seed: int
) -> list[dict]:
    """Keep one split. Per group, shuffled problems go to test first, then validation, then train.

    The split is by problem, so all templates of a problem share it; it depends only on the seed, the pool and
    the two sizes (validation is empty unless validation_size is given).
    """
    if split == "all":
        return problems
    n = len(problems)
    k_test, k_val = held_out_size(test_size, n), held_out_size(validation_size, n, default=0)
    if split == "validation" and k_val == 0:
        raise UsageError("split='validation' needs validation_size (a fraction or a count)")
    if k_test < 0 or k_val < 0 or k_test + k_val >= n:
        raise UsageError(
            f"test_size={test_size}, validation_size={validation_size} leave no training problems "
            f"out of {n}; use smaller sizes"
        )
    sizes = defaultdict(int)
    for p in problems:
        sizes[p["group"]] += 1
    q_test, q_val = allocate(sizes, k_test), allocate(sizes, k_val)
    seen: dict[str, int] = defaultdict(int)
    out = []
    for p in stratified_order(problems, seed):
        g = p["group"]
        rank, seen[g] = seen[g], seen[g] + 1
        which = "test" if rank < q_test[g] else "validation" if rank < q_test[g] + q_val[g] else "train"
        out += [p] if which == split else []
    return out


def build(
    digits: Sequence[int] = (1,),
    ops: Sequence[str] = tuple(OPS),
    templates: Sequence[str] = tuple(TEMPLATES),
    seed: int = 0,
    negative: bool = False,
    split: str = "all",
    test_size: float | int | None = None,
    limit: int | None = None,
    per_op: int = 10_000,
    division: str = "exact",
    validation_size: float | int | None = None,
    operands: tuple[int, int] | None = None,
) -> Dataset:
    """Arithmetic PROBLEMS x templates, one row each (see the module docstring for ranges and rules).

    split/test_size (default 0.1)/validation_size (default none) pick a part by problem; `limit` keeps the first N
    problems of a seeded,
    group-stratified shuffle (all their templates). Rows are ordered by problem, then template.
    `operands=(lo, hi)` replaces the n-digit ranges: both operands range over lo..hi (one group, `digits` = the
    digit count of hi), e.g. (0, 99) for the circuit studies.
    """
    digits, ops, templates = tuple(digits), tuple(ops), (templates,) if isinstance(templates, str) else tuple(templates)
    if operands is not None:
        if not 0 <= operands[0] <= operands[1]:
            raise UsageError(
                f"operand range {operands[0]}-{operands[1]} is empty or negative; use LO-HI with 0 <= LO <= HI"
            )
        digits = (len(str(operands[1])),)
    validate(digits, ops, templates, split, division)
    if limit is not None and limit < 1:
        raise UsageError(f"limit must be >= 1, got {limit}")
    problems = [
        problem_row(d, op, a, b)
        for d in digits
        for op in ops
        for a, b in sample_pairs(
            d, op, negative=negative, division=division, per_op=per_op, seed=seed, operands=operands
        )
    ]
    problems = split_problems(problems, split, test_size, validation_size, seed)
    if limit is not None:
        keep = {p["problem_id"] for p in stratified_order(problems, seed)[:limit]}
        problems = [p for p in problems if p["problem_id"] in keep]
    rows = [
        dict(
            p,
            template=t,
            prompt=(prompt := render(t, p["a"], p["op"], p["b"])),
            answer=("" if prompt.endswith("=") else " ") + str(p["result"]),
        )
        for p in problems
        for t in templates
    ]
    return Dataset.from_list(rows) if rows else Dataset.from_dict({k: [] for k in ("problem_id", "prompt", "answer")})


def answer_tokens(tokenizer, prompt: str, answer: str) -> tuple[list[int], int]:
    """Token ids of prompt+answer and where the answer starts (`batching.continuation_ids`)."""
    full, n = continuation_ids(tokenizer, prompt, answer, fix="end the template with '=' or a space-separated word")
    return full, len(full) - n


def token_cases(tokenizer, full: list[int], start: int, answer: str, labels: list[str]) -> list[dict]:
    """One case per non-whitespace answer token; whitespace-only tokens just join the next case's context.

    `labels` has one case type per non-whitespace answer character; a token covering several takes change-one
    if any of them is.
    """
    n_chars = sum(not ch.isspace() for ch in answer)
    answer_ids = full[start:]
    out, used = [], 0
    for j, tid in enumerate(answer_ids):
        width = len(tokenizer.decode([tid]).strip())
        if width == 0:
            continue
        covered = labels[used : used + width]
        used += width
        out.append(
            dict(
                input_ids=full[: start + j],
                target=tid,
                token_index=len(out),
                is_last=False,
                case_type="change-one" if "change-one" in covered else "memorize",
            )
        )
    if used != n_chars or not out:
        raise UsageError(
            f"answer {answer!r} does not decode back from its tokens {answer_ids}; "
            "use a tokenizer whose decode round-trips digits"
        )
    out[-1]["is_last"] = True
    return out


def cases(problems: Dataset, tokenizer) -> Dataset:
    """Expand problems into per-answer-token CASES (input_ids, target, case_type, token_index, is_last, + problem
    columns)."""
    rows = []
    for p in problems:
        full, start = answer_tokens(tokenizer, p["prompt"], p["answer"])
        labels = digit_labels(p["a"], p["op"], p["b"], p["answer"].strip())
        for c in token_cases(tokenizer, full, start, p["answer"], labels):
            rows.append(dict(p, **c))
    return Dataset.from_list(rows)


def summarize(correct: list[bool], problem_ok: list[bool]) -> dict:
    """One results entry: next-token accuracy over cases and full-answer accuracy over problems."""
    k, n, kp, npb = sum(correct), len(correct), sum(problem_ok), len(problem_ok)
    return {
        "acc": k / n if n else float("nan"),
        "ci95": wilson(k, n),
        "n": n,
        "full_answer_acc": kp / npb if npb else float("nan"),
        "full_answer_ci95": wilson(kp, npb),
        "n_problems": npb,
    }


def score(cases: Dataset, correct, stop_ok: Sequence[bool] | None = None) -> dict:
    """Accuracy by group ("1D+"...), "overall", "by_template" and "by_case_type".

    A problem (= problem_id x template) is fully correct iff every answer token is greedy-correct: with
    teacher forcing that is exactly greedy decoding producing the answer. `stop_ok` (one bool per problem,
    in order of first appearance) can additionally require that generation stops after the answer.
    """
    correct = [bool(c) for c in (correct.tolist() if hasattr(correct, "tolist") else correct)]
    if len(correct) != len(cases):
        raise UsageError(f"score got {len(correct)} correctness flags for {len(cases)} cases; pass one per case")
    keys = [f"{pid}|{t}" for pid, t in zip(cases["problem_id"], cases["template"])]
    full: dict[str, bool] = {}
    for key, ok in zip(keys, correct):
        full[key] = full.get(key, True) and ok
    if stop_ok is not None:
        full = {key: ok and bool(s) for (key, ok), s in zip(full.items(), stop_ok, strict=True)}

    def entry(mask: list[bool]) -> dict:
        members = {key for key, m in zip(keys, mask) if m}
        return summarize([c for c, m in zip(correct, mask) if m], [full[key] for key in full if key in members])

    def breakdown(column: str) -> dict:
        values = cases[column]
        return {v: entry([x == v for x in values]) for v in sorted(set(values))}

    return {
        **breakdown("group"),
        "overall": entry([True] * len(correct)),
        "by_template": breakdown("template"),
        "by_case_type": breakdown("case_type"),
    }


# ---- training / validation / test splits (recipes' `data:` section) ----------------------------------------
@dataclass
class DataSpec:
    """The 2-digit training/validation/test problems (paper: 18,000 train / 2,000 test) and the 1-digit sets."""

    digits: int = field(default=2, metadata=rules(choices=(1, 2, 3)))
    per_op: int = field(default=5000, metadata=rules(min=1))
    test_size: int = field(default=2000, metadata=rules(min=1))
    validation_size: int = field(default=400, metadata=rules(min=0))
    train_limit: int | None = field(default=None, metadata=rules(min=1))  # cap training problems (quick profiles)
    negative: bool = False  # SmolLM2's tokenizer merges "=-" into one token: negative answers break the cases
    division: str = "inverse"
    template: str = "calculate"
    one_digit_division: str = "exact"  # the 1-digit eval/CNA set: the measured baseline's problems
    one_digit_limit: int | None = field(
        default=None, metadata=rules(min=1)
    )  # cap 1-digit eval problems (quick profiles)
    seed: int = 0


@dataclass
class Splits:
    """Problems (datasets.Dataset rows) for each use."""

    train: object
    validation: object
    test: object
    one_digit: object


def build_splits(spec: DataSpec) -> Splits:
    """The paper's data: 2-digit problems split by problem into train / validation / test, plus 1-digit problems."""
    common = dict(
        digits=(spec.digits,),
        templates=(spec.template,),
        seed=spec.seed,
        negative=spec.negative,
        division=spec.division,
        per_op=spec.per_op,
        test_size=spec.test_size,
        validation_size=spec.validation_size or None,
    )
    train = build(split="train", limit=spec.train_limit, **common)
    val = build(split="validation", **common) if spec.validation_size else train.select([])
    test = build(split="test", **common)
    one = build(
        digits=(1,),
        templates=(spec.template,),
        division=spec.one_digit_division,
        limit=spec.one_digit_limit,
        seed=spec.seed,
    )
    return Splits(train, val, test, one)


# ---- training rows -------------------------------------------------------------------------------------------------
def encode(problems, tokenizer) -> list[dict]:
    """Token ids of prompt+answer with labels -100 on the prompt: the loss covers the answer only."""
    rows = []
    for p in problems:
        full, start = answer_tokens(tokenizer, p["prompt"], p["answer"])
        rows.append({"input_ids": full, "labels": [-100] * start + full[start:]})
    return rows


# ---- evaluation -------------------------------------------------------------------------------------------
def problem_predictions(model: nn.Module, tokenizer, cases, batch_size: int = 64) -> torch.Tensor:
    """Greedy-correct flag per case, teacher forced, with ONE forward per problem (cases of a problem are
    consecutive prefixes of the same sequence, as `cases` builds them)."""
    groups = problem_groups(cases)
    ids_col, tgt = list(cases["input_ids"]), list(cases["target"])
    correct = torch.zeros(len(ids_col), dtype=torch.bool)
    for idx in batches(len(groups), batch_size):
        rows = [groups[i] for i in idx]
        seqs = [ids_col[g[-1]] + [tgt[g[-1]]] for g in rows]
        keep = max(len(s) - len(ids_col[g[0]]) for s, g in zip(seqs, rows))
        pred = forward_logits(model, *left_pad(seqs, pad_id(tokenizer)), keep + 1).argmax(-1).cpu()
        for j, (s, g) in enumerate(zip(seqs, rows)):
            for c in g:
                correct[c] = int(pred[j, keep + 1 - (len(s) - len(ids_col[c])) - 1]) == tgt[c]
    return correct


def problem_groups(cases) -> list[list[int]]:
    """Case indices grouped by (problem, template), in order."""
    groups: dict[str, list[int]] = {}
    for i, (pid, t) in enumerate(zip(cases["problem_id"], cases["template"])):
        groups.setdefault(f"{pid}|{t}", []).append(i)
    return list(groups.values())


def accuracy(model: nn.Module, tokenizer, problems, batch_size: int = 64) -> dict:
    """`score` of a model on problems: per-token and full-answer accuracy with 95% Wilson CIs."""
    model.eval()
    c = cases(problems, tokenizer)
    return score(c, problem_predictions(model, tokenizer, c, batch_size))


# ---- the task -------------------------------------------------------------------------------------------------
def as_cases() -> Dataset:
    """1-digit problems, calculate template: prompt, answer (teacher forced), group = 1D+ ..."""
    p = build(digits=(1,), templates=DEFAULT_TEMPLATES)
    return Dataset.from_dict(
        {"prompt": p["prompt"], "target": p["answer"], "group": p["group"], "split": [""] * len(p)}
    )


def suite(loaded, o: EvalOptions) -> dict:
    """Teacher-forced per-token accuracy and full-answer accuracy on arithmetic problems."""
    problems = build(digits=o.digits, ops=o.ops, templates=o.templates, seed=o.seed, limit=o.limit)
    c = cases(problems, loaded.tokenizer)
    preds = predict_cases(loaded.model, loaded.tokenizer, c, batch_size=o.batch_size)
    return score(c, preds["correct"])


def ci_text(ci: Sequence[float]) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def lines(res: dict) -> list[str]:
    """Rows group | acc | ci95 | n | full-answer acc | problems, for groups, overall, templates, case types."""
    out = [f"{'group':<18}{'acc':>7}  {'ci95':<16}{'n':>6}{'full':>8}{'probs':>7}"]
    rows = [(g, e) for g, e in res.items() if g not in ("by_template", "by_case_type")]
    rows += [(f"template:{t}", e) for t, e in res.get("by_template", {}).items()]
    rows += [(f"case:{c}", e) for c, e in res.get("by_case_type", {}).items()]
    for name, e in rows:
        out.append(
            f"{name:<18}{e['acc']:>7.3f}  {ci_text(e['ci95']):<16}{e['n']:>6}"
            f"{e['full_answer_acc']:>8.3f}{e['n_problems']:>7}"
        )
    return out


register(Task("arithmetic", cases=as_cases, suite=suite, lines=lines))
