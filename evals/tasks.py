"""User tasks: any behaviour given as data (cases or contrast pairs), one protocol shared with the built-in suites.

A TASK is a `datasets.Dataset` of CASES with the columns
    prompt   the text the model reads
    target   the continuation it should produce (tokenised together with the prompt, `batching.continuation_ids`:
             write the leading space yourself, " Paris" after "The capital of France is")
    group    optional: rows are also reported per group
    split    optional: train (also "selection"), validation or test; without it rows are split by a seeded shuffle
CONTRAST PAIRS are a Dataset with prompt_a, prompt_b, optional target, group, split.

`--data PATH` reads JSONL/JSON, CSV, Parquet (`datasets.load_dataset`) or a folder written by
`Dataset.save_to_disk` (`load_from_disk`); `--columns prompt=question,target=answer` maps other column names.
The tables the package ships (evals/data: capitals.csv, capitals-europe-pairs.csv) can be named bare.
A registered built-in task name (arithmetic, gender-bias, perplexity) is accepted wherever a path is: the
built-in suites fill the same tables (`builtin`).

Scoring (teacher forced, as the arithmetic suite does): every target token is one prediction whose context is the
prompt plus the target tokens before it; one forward per row scores all of them. Per row: log p(target) = sum of
the token log-probs, token accuracy (argmax == token), full-target accuracy (every token right). Per group and
overall: those means and the perplexity exp(-sum log p / tokens).

Pairs: gap = log p(target | A) - log p(target | B) (no target: the model's own top-1 token after A). CNA between
A and B (`pair_cases`) uses the pair's first target token, or every target token teacher forced (`target="all"`).

Bad input is one `UsageError` line raised before a model loads or anything is written: a missing column (naming
the columns found), an empty file, an unreadable format, a target that tokenises to nothing, a split with no rows,
pairs of unequal token length where a method needs equal lengths. Prompts shared by train and test are a warning
with the count (`warn_duplicates`).
"""

from __future__ import annotations

import csv
import io
import math
import sys
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import datasets
import numpy as np
import torch
from datasets import Dataset, DatasetDict, concatenate_datasets, load_dataset, load_from_disk

from surgery.errors import UsageError
from surgery.evals import registry
from surgery.io.report import wilson
from surgery.model.batching import batches, by_length, continuation_ids, forward_logits, left_pad, pad_id

CASE_COLUMNS = ("prompt", "target")
PAIR_COLUMNS = ("prompt_a", "prompt_b")
OPTIONAL = ("group", "split")
FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
DATA_DIR = Path(__file__).resolve().parent / "data"  # the shipped example tables (capitals.csv, ...)
SPLIT_NAMES = {
    "train": "train",
    "selection": "train",
    "select": "train",
    "validation": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
    "eval": "test",
    "heldout": "test",
}


# ---- reading ------------------------------------------------------------------------------------------------
def parse_columns(spec: str | dict | None, allowed: Sequence[str]) -> dict[str, str]:
    """'prompt=question,target=answer' -> {"prompt": "question", "target": "answer"} (ours = theirs)."""
    if spec is None or isinstance(spec, dict):
        out = dict(spec or {})
    else:
        out = {}
        for part in (p.strip() for p in str(spec).split(",") if p.strip()):
            ours, eq, theirs = part.partition("=")
            if not eq or not ours.strip() or not theirs.strip():
                raise UsageError(f"--columns {spec!r}: write OURS=THEIRS pairs, e.g. prompt=question,target=answer")
            out[ours.strip()] = theirs.strip()
    bad = [k for k in out if k not in allowed]
    if bad:
        raise UsageError(f"--columns names unknown field(s) {bad}; map some of {', '.join(allowed)}")
    return out


@contextmanager
def quiet() -> Iterator[None]:
    """No datasets progress bars or info logs while reading (a bad-input error stays the only stderr line)."""
    bars, level = datasets.are_progress_bars_disabled(), datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its readers log a parse error before raising it
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)
        if not bars:
            datasets.enable_progress_bars()


def read_table(path: str | Path) -> Dataset:
    """See `_read`, without progress bars."""
    with quiet():
        return _read(path)


def _read(path: str | Path) -> Dataset:
    """The rows of a JSONL/JSON, CSV or Parquet file or of a `save_to_disk` folder (a DatasetDict's parts are
    concatenated, each part's name becoming the split of its rows unless a split column exists)."""
    p = Path(path)
    if not p.exists() and (DATA_DIR / p.name).is_file() and len(p.parts) <= 3:
        p = DATA_DIR / p.name  # a shipped table named bare ("capitals.csv") or by its repository path
    if not p.exists():
        raise UsageError(f"{p} does not exist; give a .jsonl, .csv, .parquet file or a datasets folder")
    if p.is_dir():
        try:
            ds = load_from_disk(str(p))
        except Exception as e:  # not a save_to_disk folder
            raise UsageError(
                f"cannot read {p} as a datasets folder ({type(e).__name__}); "
                "write it with Dataset.save_to_disk or give a .jsonl/.csv/.parquet file"
            ) from None
        if isinstance(ds, DatasetDict):
            parts = [d if "split" in d.column_names else d.add_column("split", [k] * len(d)) for k, d in ds.items()]
            ds = concatenate_datasets(parts) if parts else Dataset.from_dict({})
        return ds
    kind = FORMATS.get(p.suffix.lower())
    if kind is None:
        raise UsageError(
            f"cannot read {p.name}: unknown format {p.suffix or '(no suffix)'!r}; "
            f"use {', '.join(FORMATS)} or a datasets folder"
        )
    if p.stat().st_size == 0 or not p.read_bytes().strip():
        raise UsageError(f"{p} is empty; put one case per row (columns prompt, target)")
    if kind == "csv":
        _check_csv(p)
    try:
        return load_dataset(kind, data_files=str(p), split="train")
    except Exception as e:
        raise UsageError(f"cannot read {p} as {kind} ({type(e).__name__}); check the file's format") from None


def _check_csv(p: Path) -> None:
    """One line for what the CSV reader would reject: text that is not UTF-8, a row with more fields than the
    header (an unquoted comma)."""
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UsageError(f"{p} is not UTF-8 text; save the CSV as UTF-8") from None
    try:
        reader = csv.reader(io.StringIO(text, newline=""))
        width = None
        for row in reader:
            if not row:
                continue
            if width is None:
                width = len(row)
            elif len(row) > width:
                raise UsageError(
                    f"{p} line {reader.line_num} has {len(row)} fields but the header {width}; quote fields "
                    'that hold a comma ("Paris, France")'
                )
    except csv.Error:
        return  # left to the datasets reader, whose failure is one line below


def _normalise(
    ds: Dataset, required: Sequence[str], optional: Sequence[str], columns: dict[str, str], where: str
) -> Dataset:
    """Rename mapped columns, check the required ones, keep only ours as strings (defaults: group 'all')."""
    found = list(ds.column_names)
    want = {f: columns.get(f, f) for f in (*required, *optional)}
    missing = [f"{f}" + (f" (mapped to {want[f]!r})" if f in columns else "") for f in required if want[f] not in found]
    if missing:
        raise UsageError(
            f"{where} has no column {', '.join(missing)}; found {found or 'none'}; "
            f"map yours with --columns {required[0]}=NAME,..."
        )
    if len(ds) == 0:
        raise UsageError(f"{where} has no rows; put one case per row")
    out: dict[str, list[str]] = {}
    for f, col in want.items():
        if col in found:
            out[f] = ["" if v is None else str(v) for v in ds[col]]
        elif f == "group":
            out[f] = ["all"] * len(ds)
        else:
            out[f] = [""] * len(ds)
    for f in required:
        empty = [i for i, v in enumerate(out[f]) if not v.strip()]
        if empty:
            what = "a target that tokenizes to nothing" if f == "target" else "nothing to read"
            raise UsageError(
                f"{where}: column {want[f]!r} is empty in {len(empty)} row(s) (first: row {empty[0]}): "
                f"{what}; fill or drop them"
            )
    out["group"] = [g or "all" for g in out["group"]]
    return Dataset.from_dict(out)


def load_cases(path: str | Path, columns: str | dict | None = None) -> Dataset:
    """Cases (prompt, target, group, split) from a file/folder, or a built-in task's when `path` names one."""
    if str(path) in registry.names("cases"):
        return registry.get(str(path), "cases").cases()
    cols = parse_columns(columns, (*CASE_COLUMNS, *OPTIONAL))
    return _normalise(read_table(path), CASE_COLUMNS, OPTIONAL, cols, str(path))


def load_pairs(path: str | Path, columns: str | dict | None = None) -> Dataset:
    """Contrast pairs (prompt_a, prompt_b, target ('' = the model's top-1 after A), group, split)."""
    if str(path) in registry.names("pairs"):
        return registry.get(str(path), "pairs").pairs()
    cols = parse_columns(columns, (*PAIR_COLUMNS, "target", *OPTIONAL))
    return _normalise(read_table(path), PAIR_COLUMNS, ("target", *OPTIONAL), cols, str(path))


def check_data_args(data: str | None, pairs: str | None, columns: str | None) -> None:
    """One line for flag combinations that make no sense (before anything loads)."""
    if data is not None and pairs is not None:
        raise UsageError("give --data (cases) or --pairs (contrast pairs), not both")
    if columns is not None and data is None and pairs is None:
        raise UsageError("--columns maps the columns of --data or --pairs; give one of them")


# ---- splits --------------------------------------------------------------------------------------------------
def split(ds: Dataset, seed: int = 0, test_size: float = 0.2, validation_size: float = 0.0) -> dict[str, Dataset]:
    """{"train", "validation", "test"}: the split column when any row has one (train/selection, validation/val/dev,
    test/eval/heldout; blank = train), else a seeded shuffle by row (fractions of the rows or counts)."""
    n = len(ds)
    labels = list(ds["split"]) if "split" in ds.column_names else [""] * n
    if any(labels):
        bad = sorted({s for s in labels if s and s.lower() not in SPLIT_NAMES})
        if bad:
            raise UsageError(f"unknown split value(s) {bad}; use train (or selection), validation, test")
        names = [SPLIT_NAMES[s.lower()] if s else "train" for s in labels]
    else:
        k_test = _count(test_size, n)
        k_val = _count(validation_size, n)
        if k_test + k_val >= n:
            raise UsageError(
                f"test_size={test_size}, validation_size={validation_size} leave no training rows "
                f"out of {n}; use smaller sizes"
            )
        perm = np.random.default_rng(seed).permutation(n)
        names = [""] * n
        for rank, i in enumerate(perm):
            names[i] = "test" if rank < k_test else "validation" if rank < k_test + k_val else "train"
    return {s: ds.select([i for i, x in enumerate(names) if x == s]) for s in ("train", "validation", "test")}


def _count(size: float, n: int) -> int:
    return round(size * n) if isinstance(size, float) and size < 1 else int(size)


def require(parts: dict[str, Dataset], *names: str) -> None:
    """One line when a split a command needs has no rows."""
    for s in names:
        if len(parts[s]) == 0:
            raise UsageError(
                f"split {s!r} has no rows; add rows with split={s} or let the seeded split make one "
                "(remove the split column)"
            )


def warn_duplicates(train: Dataset, test: Dataset, column: str = "prompt") -> int:
    """Count the test prompts that also occur in train, and warn on stderr (one line) when there are any."""
    seen = set(train[column])
    k = sum(p in seen for p in test[column])
    if k:
        sys.stderr.write(f"surgery: warning: {k} test prompt(s) also appear in the training rows\n")
    return k


# ---- encoding --------------------------------------------------------------------------------------------------
def encode_row(tokenizer, prompt: str, target: str, where: str = "") -> tuple[list[int], int]:
    """(prompt+target ids, number of target tokens); UsageError when the target tokenises to nothing."""
    p_ids = tokenizer(prompt).input_ids
    full = tokenizer(prompt + target).input_ids
    if len(full) <= len(p_ids):
        raise UsageError(f"target {target!r}{where} tokenizes to nothing after its prompt; give a non-empty target")
    return continuation_ids(
        tokenizer, prompt, target, fix='start the target with a space (" Paris") or end the prompt with one'
    )


def encode(tokenizer, ds: Dataset) -> list[tuple[list[int], int]]:
    """Every row's (ids, n_target)."""
    return [encode_row(tokenizer, p, t, f" (row {i})") for i, (p, t) in enumerate(zip(ds["prompt"], ds["target"]))]


def cases(tokenizer, ds: Dataset) -> Dataset:
    """Per target token CASES (input_ids = context, target = token id, row, token_index, is_last, group), the
    shape `batching.predict_cases`, the head scan and CNA read."""
    rows = []
    for r, ((full, k), g) in enumerate(zip(encode(tokenizer, ds), ds["group"])):
        for j in range(k):
            rows.append(
                dict(
                    input_ids=full[: len(full) - k + j],
                    target=full[len(full) - k + j],
                    row=r,
                    token_index=j,
                    is_last=j == k - 1,
                    group=g,
                )
            )
    return Dataset.from_list(rows)


def training_rows(tokenizer, ds: Dataset) -> list[dict]:
    """Token ids of prompt+target with labels -100 on the prompt (the loss covers the target only)."""
    return [
        {"input_ids": full, "labels": [-100] * (len(full) - k) + full[len(full) - k :]}
        for full, k in encode(tokenizer, ds)
    ]


# ---- scoring -----------------------------------------------------------------------------------------------------
@torch.no_grad()
def teacher_forced(
    model: torch.nn.Module, seqs: Sequence[Sequence[int]], n_target: Sequence[int], pad: int, batch_size: int = 32
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per sequence (log-probs [k], argmax-correct [k]) of its last k = n_target tokens, teacher forced: one
    forward per sequence, only max(k)+1 logit rows per batch (left padding puts every target at the end)."""
    if any(not 0 < k < len(s) for s, k in zip(seqs, n_target)):
        raise UsageError("each target needs at least one token and a prompt of at least one token")
    out: list = [None] * len(seqs)
    order = by_length(seqs)
    for idx in batches(len(seqs), batch_size):
        rows = [order[i] for i in idx]
        ids, mask = left_pad([seqs[r] for r in rows], pad)
        keep = max(n_target[r] for r in rows)
        logits = forward_logits(model, ids, mask, keep + 1)[:, :-1].cpu()
        tgt = ids[:, -keep:]
        lp = logits.log_softmax(-1).gather(2, tgt[..., None])[..., 0]
        ok = logits.argmax(-1) == tgt
        for j, r in enumerate(rows):
            out[r] = (lp[j, keep - n_target[r] :], ok[j, keep - n_target[r] :])
    return out


def score_rows(model: torch.nn.Module, tokenizer, ds: Dataset, batch_size: int = 32) -> dict:
    """Per row: "logprob" (sum over target tokens), "tokens", "token_correct" (count), "correct" (all tokens)."""
    enc = encode(tokenizer, ds)
    res = teacher_forced(model, [f for f, _ in enc], [k for _, k in enc], pad_id(tokenizer), batch_size)
    return {
        "logprob": [float(lp.double().sum()) for lp, _ in res],
        "tokens": [len(lp) for lp, _ in res],
        "token_correct": [int(ok.sum()) for _, ok in res],
        "correct": [bool(ok.all()) for _, ok in res],
        "first_correct": [bool(ok[0]) for _, ok in res],
    }


def summarize(per_row: dict, rows: Sequence[int]) -> dict:
    """acc (full target, Wilson 95%), token_acc, first-token acc, mean log p(target), perplexity, n, tokens."""
    n = len(rows)
    if n == 0:
        return {"n": 0}
    k = sum(per_row["correct"][i] for i in rows)
    toks = sum(per_row["tokens"][i] for i in rows)
    lp = sum(per_row["logprob"][i] for i in rows)
    return {
        "acc": k / n,
        "ci95": wilson(k, n),
        "token_acc": sum(per_row["token_correct"][i] for i in rows) / toks,
        "first_token_acc": sum(per_row["first_correct"][i] for i in rows) / n,
        "logprob": lp / n,
        "ppl": math.exp(-lp / toks),
        "n": n,
        "tokens": toks,
    }


def table(ds: Dataset, per_row: dict) -> dict:
    """{"overall": summary, "groups": {group: summary}} (groups sorted)."""
    by: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(ds["group"]):
        by[g].append(i)
    return {"overall": summarize(per_row, range(len(ds))), "groups": {g: summarize(per_row, by[g]) for g in sorted(by)}}


def evaluate(model: torch.nn.Module, tokenizer, ds: Dataset, batch_size: int = 32) -> dict:
    """`table` of a model on cases `ds` (teacher forced)."""
    return table(ds, score_rows(model, tokenizer, ds, batch_size))


def table_lines(t: dict) -> list[str]:
    """Terminal rows: group | full acc | ci95 | token acc | first acc | mean log p | ppl | n."""
    lines = [f"{'group':<22}{'acc':>7}  {'ci95':<16}{'tok acc':>8}{'first':>7}{'logp':>9}{'ppl':>9}{'n':>6}"]
    for name, e in [("overall", t["overall"]), *t["groups"].items()]:
        if e.get("n"):
            lines.append(
                f"{name[:21]:<22}{e['acc']:>7.3f}  [{e['ci95'][0]:.3f}, {e['ci95'][1]:.3f}]  "
                f"{e['token_acc']:>8.3f}{e['first_token_acc']:>7.3f}{e['logprob']:>9.3f}{e['ppl']:>9.2f}"
                f"{e['n']:>6}"
            )
    return lines


# ---- contrast pairs --------------------------------------------------------------------------------------------
@dataclass
class PairCases:
    """CNA cases between A and B: contexts per side and the token both are scored on; `pair` = source row."""

    seqs_a: list[list[int]]
    seqs_b: list[list[int]]
    targets: list[int]
    pair: list[int]


@torch.no_grad()
def top1_targets(model: torch.nn.Module, tokenizer, prompts: Sequence[str], batch_size: int = 32) -> list[str]:
    """The model's greedy next token after each prompt, as text (the target of pairs that give none)."""
    seqs = [tokenizer(p).input_ids for p in prompts]
    out: list[str] = [""] * len(seqs)
    order = by_length(seqs)
    for idx in batches(len(seqs), batch_size):
        rows = [order[i] for i in idx]
        top = forward_logits(model, *left_pad([seqs[r] for r in rows], pad_id(tokenizer)), 1)[:, -1].argmax(-1)
        for j, r in enumerate(rows):
            out[r] = tokenizer.decode([int(top[j])])
    return out


def fill_targets(model: torch.nn.Module, tokenizer, pairs: Dataset, batch_size: int = 32) -> Dataset:
    """Pairs with every blank target replaced by the model's own top-1 token after prompt A."""
    blank = [i for i, t in enumerate(pairs["target"]) if not t]
    if not blank:
        return pairs
    top = top1_targets(model, tokenizer, [pairs["prompt_a"][i] for i in blank], batch_size)
    tg = list(pairs["target"])
    for i, t in zip(blank, top):
        tg[i] = t
    return pairs.remove_columns("target").add_column("target", tg)


def pair_ids(
    tokenizer, pairs: Dataset, equal_lengths: bool = False
) -> list[tuple[tuple[list[int], int], tuple[list[int], int]]]:
    """Per pair ((A+target ids, k), (B+target ids, k)); `equal_lengths` (methods that align A and B position by
    position, e.g. activation patching) refuses pairs whose prompts differ in token length."""
    out = []
    for i, (a, b, t) in enumerate(zip(pairs["prompt_a"], pairs["prompt_b"], pairs["target"])):
        ea, eb = encode_row(tokenizer, a, t, f" (pair {i}, A)"), encode_row(tokenizer, b, t, f" (pair {i}, B)")
        if ea[1] != eb[1]:
            raise UsageError(f"pair {i}: target {t!r} tokenizes differently after A and B; end both prompts alike")
        if equal_lengths and len(ea[0]) != len(eb[0]):
            raise UsageError(
                f"pair {i}: prompt A is {len(ea[0]) - ea[1]} tokens and B {len(eb[0]) - eb[1]}; this "
                "method needs equal token lengths: reword one of them"
            )
        out.append((ea, eb))
    return out


def pair_cases(tokenizer, pairs: Dataset, target: str = "first") -> PairCases:
    """One CNA case per pair (its first target token), or per target token teacher forced (target="all"):
    A's context and B's context each end before the scored token; both are scored on A's token."""
    out = PairCases([], [], [], [])
    for i, ((fa, ka), (fb, kb)) in enumerate(pair_ids(tokenizer, pairs)):
        for j in range(1 if target == "first" else ka):
            out.seqs_a.append(fa[: len(fa) - ka + j])
            out.seqs_b.append(fb[: len(fb) - kb + j])
            out.targets.append(fa[len(fa) - ka + j])
            out.pair.append(i)
    return out


def pair_gaps(model: torch.nn.Module, tokenizer, pairs: Dataset, batch_size: int = 32) -> list[float]:
    """Per pair: log p(target | A) - log p(target | B), teacher forced over every target token."""
    enc = pair_ids(tokenizer, pairs)
    seqs = [s for ea, eb in enc for s in (ea[0], eb[0])]
    ks = [k for ea, eb in enc for k in (ea[1], eb[1])]
    res = teacher_forced(model, seqs, ks, pad_id(tokenizer), batch_size)
    lp = [float(r[0].double().sum()) for r in res]
    return [lp[2 * i] - lp[2 * i + 1] for i in range(len(enc))]


def gap_table(pairs: Dataset, gaps: Sequence[float]) -> dict:
    """Mean |gap| and mean signed gap, overall and per group (the A/B difference an edit should remove)."""

    def one(ix: list[int]) -> dict:
        v = [gaps[i] for i in ix]
        n = len(v)
        mean_abs = sum(map(abs, v)) / n
        sd = math.sqrt(sum((abs(x) - mean_abs) ** 2 for x in v) / (n - 1)) if n > 1 else 0.0
        return {
            "abs_gap": mean_abs,
            "ci95": [mean_abs - 1.96 * sd / math.sqrt(n), mean_abs + 1.96 * sd / math.sqrt(n)],
            "signed_gap": sum(v) / n,
            "n": n,
        }

    by: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(pairs["group"]):
        by[g].append(i)
    return {"overall": one(list(range(len(gaps)))), "groups": {g: one(ix) for g, ix in sorted(by.items())}}


# ---- what prune needs from a user dataset ---------------------------------------------------------------------
@dataclass
class PruneData:
    """A user dataset cut for `surgery prune`: training rows (prompt + target ids, labels -100 on the prompt), the
    lr-selection scorer (full-target accuracy on the validation split, None without one), the test cases, and
    the CNA/selector cases (the first target token of every training row: seqs + targets)."""

    train: list[dict]
    validate: Callable[[torch.nn.Module], float] | None
    test: Dataset
    selection_seqs: list[list[int]]
    selection_targets: list[int]
    splits: dict[str, Dataset]
    duplicates: int


def prune_splits(
    ds: Dataset, seed: int = 0, test_size: float = 0.2, validation_size: float = 0.1
) -> dict[str, Dataset]:
    """`split`, and one line when the train or test split is empty (model-free: checked before a model loads)."""
    parts = split(ds, seed, test_size, validation_size)
    if not len(parts["test"]) and not any(ds["split"] if "split" in ds.column_names else ()):
        raise UsageError(
            f"{len(ds)} row(s) at test_size={test_size} leave the seeded split no test rows; add rows, or give "
            "a count (--set data.test_size=1)"
        )
    require(parts, "train", "test")
    return parts


def prune_data(
    tokenizer,
    ds: Dataset,
    seed: int = 0,
    test_size: float = 0.2,
    validation_size: float = 0.1,
    batch_size: int = 32,
    selection: str = "first",
) -> PruneData:
    """Split `ds` by row with `seed` (or its split column) and encode what prune needs (see PruneData).
    selection="all" makes one selection case per target token (teacher forced) instead of the first only."""
    parts = prune_splits(ds, seed, test_size, validation_size)
    dup = warn_duplicates(parts["train"], parts["test"])
    c = cases(tokenizer, parts["train"])
    if selection == "first":
        c = c.filter(lambda r: r["token_index"] == 0)
    val = parts["validation"]

    def validate(model: torch.nn.Module) -> float:
        return evaluate(model, tokenizer, val, batch_size)["overall"]["acc"]

    return PruneData(
        training_rows(tokenizer, parts["train"]),
        validate if len(val) else None,
        parts["test"],
        list(c["input_ids"]),
        list(c["target"]),
        parts,
        dup,
    )
