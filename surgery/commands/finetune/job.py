"""`surgery finetune`: precise SFT (Zhang et al., ICML 2024) against full fine-tuning, LoRA and controls.

    surgery finetune --model smollm2-135m --recipe precise-sft --components runs/pp/heads.json --top-heads 8 \
        --profile cpu --out runs/ft


One report, the same training rows, steps, batch and seed for every row:
  base | full fine-tuning | LoRA on the attention of every layer (PEFT) | precise (K heads) | precise with K random
  heads (control) | precise + MLPs | precise with K in the sweep list.
Training data: 2-digit arithmetic (train split) + ASDiv word problems (train part of a by-problem split), the loss on
the answer tokens only (`surgery.training`). Math: held-out 2-digit arithmetic and the ASDiv test part (teacher-
forced full-answer accuracy). Must not get worse: MMLU and CommonsenseQA multiple choice by log-likelihood, XSum
perplexity. Every number has a 95% interval (Wilson for accuracies, paired normal intervals for changes against the
base on the same items, a bootstrap over documents for perplexity). Components: --components (heads.json,
circuit.json, list) or, without it, the recipe's own zero-ablation head scan on 2-digit problems; MLPs for the
"+ MLPs" row: the components' MLPs, else the MLPs whose zero-ablation costs the most answer log-prob.
--data FILE (a user task, `surgery.tasks`): the training rows are the user's train split (seeded split by row, or
the split column), the answer-only loss on the teacher-forced target tokens; the "task" column is the test split's
full-target accuracy (per group too) instead of arithmetic/ASDiv; MMLU/CSQA/XSum stay as the collateral; without
--components the head and MLP scans run on the first scan.limit train rows through `heads --data`'s engine.
The precise (K heads) model is exported as an ordinary checkpoint (layout zeroed: base shapes, native load) whose
surgery.json lists the trained components and the recipe. Finished rows are kept in <out>.partial/rows.jsonl
(keyed by the resolved recipe and, with --data, the data file's sha256), so an interrupted run continues where
it stopped; <out>.partial/progress.md shows the finished rows' table and contrasts after every row.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from surgery.edits.lora import LoraSpec, attach, merged_copy
from surgery.edits.precise import Precise, check_optimizer_settings, select, state_bytes
from surgery.edits.training import TrainSpec, answer_trainer, log_of, saved_step
from surgery.errors import UsageError
from surgery.evals import arithmetic, asdiv, multiple_choice, perplexity, tasks
from surgery.find import head_scan as hd
from surgery.find.components import Components, parse, shape_of, take
from surgery.io import recipe as recipes
from surgery.io.checkpoint import save
from surgery.io.deploy import Export, check_now, parse_exports
from surgery.io.loading import check_training_dtype, home, load_model, resolve
from surgery.io.report import (
    Report,
    atomic_dir,
    git_commit,
    make,
    md_table,
    new_out_dir,
    png_bytes,
    wilson,
    write_text_atomic,
)
from surgery.model.arch import ModelView
from surgery.model.batching import (
    batches,
    by_length,
    device_of,
    forward_logits,
    left_pad,
    pad_id,
    suffix_logprobs,
)
from surgery.model.hooks import Hooks

METHODS = ("full", "lora", "precise", "random", "precise+mlp", "sweep")


# ---- the recipe ------------------------------------------------------------------------------------------
@dataclass
class FtData:
    arithmetic_train: int = 4000  # 2-digit training problems (all four ops)
    arithmetic_test: int = 500
    asdiv_test: int = 300  # ASDiv problems held out; the rest (minus asdiv_train cap) train
    asdiv_train: int | None = None
    template: str = "calculate"
    seed: int = 0
    test_size: float = 0.2  # --data: the held-out part of the user's rows (seeded split by row unless a split column)


@dataclass
class GeneralSpec:
    mmlu: int = 300
    csqa: int = 300
    xsum_docs: int = 40
    xsum_max_length: int = 256
    batch_size: int = 16


@dataclass
class ScanSpec:
    limit: int = 80  # 2-digit problems for the recipe's own head scan (no --components)
    mlps: int = 2  # MLPs of the "+ MLPs" row when the components name none


@dataclass
class LrSpec:
    full: float = 5e-5
    lora: float = 1e-3
    precise: float = 1e-3


@dataclass
class FinetuneRecipe:
    """recipes/precise-sft.yaml, validated."""

    name: str = "precise-sft"
    description: str = ""
    top_heads: int = 8
    sweep: list[int] = field(default_factory=lambda: [4, 8, 16, 32])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    grad_scale: float | None = None  # None: H/h (the paper); 1: off
    random_seeds: int = 1  # how many random-heads control rows (each its own draw of K heads)
    save_steps: int = 0  # > 0: a row saves its training state (weights, AdamW, scheduler, RNG) every N steps
    lr: LrSpec = field(default_factory=LrSpec)
    train: TrainSpec = field(
        default_factory=lambda: TrainSpec(lrs=[1e-3], epochs=1, max_steps=200, batch_size=16, weight_decay=0.0)
    )
    lora: LoraSpec = field(default_factory=LoraSpec)
    data: FtData = field(default_factory=FtData)
    general: GeneralSpec = field(default_factory=GeneralSpec)
    scan: ScanSpec = field(default_factory=ScanSpec)
    seed: int = 0


def load_recipe(name: str, quick: bool, overrides: list[str] | None, profile: str | None) -> FinetuneRecipe:
    r = recipes.load(name, FinetuneRecipe, list(overrides or []), quick, profile)
    bad = [m for m in r.methods if m not in METHODS]
    if bad:
        raise UsageError(f"unknown method(s) {bad} in the recipe; use some of {', '.join(METHODS)}")
    if r.top_heads < 1 or any(k < 1 for k in r.sweep):
        raise UsageError("top_heads and every sweep entry must be >= 1")
    if r.train.max_steps < 1:
        raise UsageError("train.max_steps must be >= 1: every row trains the same number of steps")
    check_optimizer_settings(r.train.weight_decay)
    return r


# ---- data ------------------------------------------------------------------------------------------------
@dataclass
class Sets:
    train_rows: list[dict]
    arith_test: list[tuple[str, str]]  # (prompt, answer)
    asdiv_test: list[tuple[str, str]]
    mmlu: object
    csqa: object
    xsum: list[list[int]]
    task_test: object = None  # --data: the user's test split (cases); replaces arith_test / asdiv_test


def user_splits(user, r: FinetuneRecipe) -> dict:
    """--data: the user's rows split by row with the recipe's seed (or their split column); train and test must
    have rows; prompts shared by both are a warning with the count (`surgery.tasks`)."""
    parts = tasks.split(user, r.data.seed, r.data.test_size, 0.0)
    tasks.require(parts, "train", "test")
    tasks.warn_duplicates(parts["train"], parts["test"])
    return parts


def build_sets(r: FinetuneRecipe, tok, parts: dict | None = None) -> Sets:
    """Training rows (2-digit arithmetic + ASDiv train, shuffled; with --data the user's train split, answer-only
    loss on the teacher-forced target tokens as `surgery.tasks` encodes them) and every evaluation set."""
    if parts is not None:
        rows = tasks.training_rows(tok, parts["train"])
        tasks.encode(tok, parts["test"])  # a target that tokenises to nothing: one line before any training
        random.Random(r.seed).shuffle(rows)
        return Sets(rows, [], [], *_general(r, tok), task_test=parts["test"])
    d = r.data
    common = dict(
        digits=(2,), templates=(d.template,), seed=d.seed, division="inverse", per_op=5000, test_size=d.arithmetic_test
    )
    a_train = arithmetic.build(split="train", limit=d.arithmetic_train, **common)
    a_test = arithmetic.build(split="test", **common)
    s_train = asdiv.build("train", d.asdiv_test, d.asdiv_train, d.seed)
    s_test = asdiv.build("test", d.asdiv_test, None, d.seed)
    rows = [
        _encode(tok, p, a)
        for p, a in zip(
            list(a_train["prompt"]) + list(s_train["prompt"]), list(a_train["answer"]) + list(s_train["answer"])
        )
    ]
    random.Random(r.seed).shuffle(rows)
    return Sets(
        rows,
        list(zip(list(a_test["prompt"]), list(a_test["answer"]))),
        list(zip(list(s_test["prompt"]), list(s_test["answer"]))),
        *_general(r, tok),
    )


def _general(r: FinetuneRecipe, tok) -> tuple:
    """The must-not-get-worse sets: MMLU, CSQA, XSum documents (token ids, cut to xsum_max_length)."""
    docs = perplexity.build(r.general.xsum_docs)
    xs = [ids[: r.general.xsum_max_length] for ids in tok(list(docs["document"])).input_ids]
    return (
        multiple_choice.build("mmlu", r.general.mmlu),
        multiple_choice.build("csqa", r.general.csqa),
        [x for x in xs if len(x) >= 2],
    )


def _encode(tok, prompt: str, answer: str) -> dict:
    full, start = arithmetic.answer_tokens(tok, prompt, answer)
    return {"input_ids": full, "labels": [-100] * start + full[start:]}


# ---- evaluation ------------------------------------------------------------------------------------------
def answer_correct(model: nn.Module, tok, pairs: list[tuple[str, str]], batch_size: int = 32) -> list[bool]:
    """Teacher-forced full-answer correctness per (prompt, answer): every answer token is the argmax."""
    rows = [_encode(tok, p, a) for p, a in pairs]
    seqs = [r["input_ids"] for r in rows]
    n_ans = [sum(1 for x in r["labels"] if x != -100) for r in rows]
    out = [False] * len(rows)
    order = by_length(seqs)
    for idx in batches(len(seqs), batch_size):
        rs = [order[i] for i in idx]
        ids, mask = left_pad([seqs[i] for i in rs], pad_id(tok))
        keep = max(n_ans[i] for i in rs)
        pred = forward_logits(model, ids, mask, keep + 1)[:, :-1].argmax(-1).cpu()
        for j, i in enumerate(rs):
            k = n_ans[i]
            out[i] = bool((pred[j, keep - k :] == ids[j, -k:]).all())
    return out


def doc_nll(model: nn.Module, tok, docs: list[list[int]], batch_size: int = 8) -> list[tuple[float, int]]:
    """(summed NLL, tokens) per XSum document (every token but the first scored)."""
    lps = suffix_logprobs(model, docs, [len(s) - 1 for s in docs], pad_id(tok), batch_size)
    return [(-float(lp.double().sum()), len(lp)) for lp in lps]


def evaluate(model: nn.Module, tok, sets: Sets, bs: int) -> dict:
    """Per-item results of every suite (kept so rows can be compared on the same items)."""
    model.eval()
    if sets.task_test is not None:
        math_ = {"task": tasks.score_rows(model, tok, sets.task_test, bs)["correct"]}
    else:
        math_ = {
            "arith": answer_correct(model, tok, sets.arith_test, 2 * bs),
            "asdiv": answer_correct(model, tok, sets.asdiv_test, bs),
        }
    return {
        **math_,
        "mmlu": multiple_choice.correct(model, tok, sets.mmlu, bs),
        "csqa": multiple_choice.correct(model, tok, sets.csqa, bs),
        "xsum": doc_nll(model, tok, sets.xsum, max(1, bs // 2)),
    }


ACC = ("arith", "asdiv", "task", "mmlu", "csqa")  # "task": --data, the test split's full-target accuracy


def summarize(items: dict, base: dict | None, seed: int = 0) -> dict:
    """Accuracy with Wilson 95% CIs, perplexity with a bootstrap CI, and paired changes against `base`."""
    out = {}
    for k in (k for k in ACC if k in items):
        x = np.asarray(items[k], float)
        out[k] = {"acc": float(x.mean()), "ci95": wilson(int(x.sum()), len(x)), "n": len(x)}
        if base is not None:
            out[k]["delta"] = _paired(x - np.asarray(base[k], float))
    nll = np.array([a for a, _ in items["xsum"]])
    tok = np.array([b for _, b in items["xsum"]], float)
    rng = np.random.default_rng(seed)
    boots = rng.integers(0, len(nll), (1000, len(nll)))
    ppl_b = np.exp(nll[boots].sum(1) / tok[boots].sum(1))
    out["xsum"] = {"ppl": float(math.exp(nll.sum() / tok.sum())), "ci95": _q(ppl_b), "docs": len(nll)}
    if base is not None:
        bn = np.array([a for a, _ in base["xsum"]])
        rel = np.exp(nll[boots].sum(1) / tok[boots].sum(1)) / np.exp(bn[boots].sum(1) / tok[boots].sum(1)) - 1
        out["xsum"]["rel_change"] = {
            "mean": float(math.exp(nll.sum() / tok.sum()) / math.exp(bn.sum() / tok.sum()) - 1),
            "ci95": _q(rel),
        }
    return out


def _paired(d: np.ndarray) -> dict:
    half = 1.96 * d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
    return {"mean": float(d.mean()), "ci95": [round(float(d.mean() - half), 4), round(float(d.mean() + half), 4)]}


def _q(x: np.ndarray) -> list[float]:
    return [round(float(np.quantile(x, 0.025)), 4), round(float(np.quantile(x, 0.975)), 4)]


# ---- components when none are given ------------------------------------------------------------------------
def _scan_cases(loaded, r: FinetuneRecipe, selection=None) -> tuple[dict, list, str]:
    """(labels, packed batches, description) of the scan cases: `scan.limit` 2-digit problems, or with --data the
    first `scan.limit` rows of the user's train split (selection), every target token teacher forced, packed by
    the same `surgery.heads` engine `heads --data` uses."""
    if selection is None:
        labels, bl = hd.arithmetic_batches(loaded, (2,), None, (r.data.template,), r.scan.limit, r.seed, 64)
        return labels, bl, f"{len(labels['op'])} cases, 2-digit"
    rows = selection.select(range(min(r.scan.limit, len(selection))))
    labels, bl = hd.user_batches(loaded, rows, 64)
    return labels, bl, f"{len(labels['op'])} target-token cases of {len(rows)} train rows of --data"


def scan_components(loaded, r: FinetuneRecipe, selection=None) -> Components:
    """Heads ranked by the answer log-prob drop under zero ablation on the scan cases (`surgery.heads` engine)."""
    view = ModelView(loaded.model)
    labels, bl, what = _scan_cases(loaded, r, selection)
    n = len(labels["op"])
    all_heads = [(l, h) for l in range(view.n_layers) for h in range(view.n_heads)]
    res = hd.scan(view, bl, n, all_heads)
    _, base_lp = hd.baseline(view, bl, n)
    drop = {k: float(base_lp.mean() - v["logprob"].mean()) for k, v in res.items()}
    ranked = sorted(all_heads, key=lambda k: -drop[k])
    return Components(ranked, [], f"zero-ablation scan ({what})")


@torch.no_grad()
def scan_mlps(loaded, r: FinetuneRecipe, k: int, selection=None) -> list[int]:
    """The k MLPs whose zero-ablation lowers the mean answer log-prob the most (the scan cases)."""
    view = ModelView(loaded.model)
    labels, bl, _ = _scan_cases(loaded, r, selection)
    n = len(labels["op"])
    _, base_lp = hd.baseline(view, bl, n)
    drops = []
    for l in range(view.n_layers):
        lp = torch.zeros(n)
        for b in bl:
            with Hooks(view) as h:
                h.scale_neurons(l, torch.zeros(view.ffn_width(l)))
                logits = view.model(**b.inputs(device_of(view.model))).logits
            lp[b.case_idx] = hd.score(logits, b, 1)[1][0]
        drops.append(float(base_lp.mean() - lp.mean()))
    return sorted(range(view.n_layers), key=lambda l: -drops[l])[:k]


# ---- training ----------------------------------------------------------------------------------------------
@dataclass
class Trained:
    model: nn.Module
    log: list[dict]
    seconds: float
    trained_params: int
    state_bytes: int
    grad_bytes: int


def _train(
    model: nn.Module, rows: list[dict], r: FinetuneRecipe, lr: float, pad: int, state_dir: Path | None = None
) -> tuple[list, float, int]:
    """Train in place. With `state_dir` and recipe save_steps > 0 the Trainer saves its whole state there every
    save_steps steps (weights, AdamW, scheduler, RNG, data position; the last one kept) and a killed row resumes
    from it: the same batches in the same order, the same result as an uninterrupted row. Seconds exclude the
    steps a resumed row did not run (they are scaled up to the full row)."""
    from transformers import set_seed

    set_seed(r.seed)
    keep = state_dir is not None and r.save_steps > 0
    with tempfile.TemporaryDirectory(prefix="surgery-ft-") as tmp:
        out = str(state_dir) if keep else tmp
        extra = {"save_steps": r.save_steps} if keep else {}
        trainer = answer_trainer(model, rows, r.train, lr, out, pad, device=str(device_of(model)), **extra)
        start = saved_step(Path(out)) if keep else 0
        t0 = time.time()
        trainer.train(resume_from_checkpoint=True if start else None)
        seconds = time.time() - t0
        done = trainer.state.global_step
        if start and done > start:
            seconds *= done / (done - start)
        return log_of(trainer), seconds, state_bytes(trainer.optimizer)


def _grad_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def train_full(base: nn.Module, rows, r: FinetuneRecipe, pad: int, state_dir: Path | None = None) -> Trained:
    m = copy.deepcopy(base)
    for p in m.parameters():
        p.requires_grad_(True)
    g = _grad_bytes(m)
    log, s, st = _train(m, rows, r, r.lr.full, pad, state_dir)
    return Trained(m.eval(), log, s, sum(p.numel() for p in m.parameters()), st, g)


def train_lora(base: nn.Module, rows, r: FinetuneRecipe, pad: int, state_dir: Path | None = None) -> Trained:
    pm = attach(base, list(range(ModelView(base).n_layers)), r.lora)
    g = _grad_bytes(pm)
    n = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    log, s, st = _train(pm, rows, r, r.lr.lora, pad, state_dir)
    return Trained(merged_copy(pm), log, s, n, st, g)


def train_precise(
    base: nn.Module, comps: Components, rows, r: FinetuneRecipe, pad: int, state_dir: Path | None = None
) -> Trained:
    m = copy.deepcopy(base)
    sel = select(m, comps)
    with Precise(m, sel, r.grad_scale):
        g = _grad_bytes(m)
        log, s, st = _train(m, rows, r, r.lr.precise, pad, state_dir)
    return Trained(m.eval(), log, s, sel.trained_entries(m), st, g)


# ---- the rows ----------------------------------------------------------------------------------------------
@dataclass
class Row:
    name: str
    kind: str  # base | full | lora | precise
    comps: Components | None = None


def plan_rows(r: FinetuneRecipe, comps: Components, mlps: list[int], n_heads_total: int, k: int) -> list[Row]:
    """The report's rows in run order, the core first (base, full, precise K, the random-heads controls), then
    LoRA, + MLPs and the K sweep; sweep entries larger than the ranked heads are dropped (said in the report)."""
    rows = [Row("base", "base")]
    top = take(comps, k)
    want = set(r.methods)
    if "full" in want:
        rows.append(Row("full fine-tuning", "full"))
    if "precise" in want:
        rows.append(Row(f"precise, {k} heads", "precise", Components(top.heads, [], comps.source)))
    if "random" in want:
        rng = random.Random(r.seed)  # draw s of the seed-0 generator: the first draw is the single control's
        pool = [(l, h) for l, h in _all_heads(n_heads_total) if (l, h) not in set(top.heads)]
        for draw in range(r.random_seeds):
            name = f"precise, {k} random heads (control)" + (f" draw {draw + 1}" if r.random_seeds > 1 else "")
            rows.append(Row(name, "precise", Components(sorted(rng.sample(pool, k)), [], "random")))
    if "lora" in want:  # after the core (full, precise, its random controls): a long run finishes those first
        rows.append(Row(f"LoRA r={r.lora.rank}, attention, all layers", "lora"))
    if "precise+mlp" in want and mlps:
        rows.append(
            Row(
                f"precise, {k} heads + MLPs {','.join(map(str, mlps))}",
                "precise",
                Components(top.heads, mlps, comps.source),
            )
        )
    if "sweep" in want:
        for kk in r.sweep:
            if kk != k and kk <= len(comps.heads):
                rows.append(Row(f"precise, {kk} heads", "precise", Components(comps.heads[:kk], [], comps.source)))
    return rows


def _all_heads(total: tuple[int, int]) -> list[tuple[int, int]]:
    L, H = total
    return [(l, h) for l in range(L) for h in range(H)]


def _fingerprint(
    model_source: str, r: FinetuneRecipe, comps: Components, mlps: list[int], data: dict | None = None
) -> str:
    blob = json.dumps(
        [model_source, _resume_key(r), comps.to_dict(), mlps] + ([data] if data else []),
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _resume_key(r: FinetuneRecipe) -> dict:
    """The recipe as the resume key sees it: fields added after a run started, at their defaults (which keep the
    old behaviour), are left out, so a run started before they existed still resumes. save_steps never changes a
    result and is always left out."""
    fields = recipes.to_dict(r)
    fields.pop("save_steps", None)
    for name, default in LATER_FIELDS.items():
        if fields.get(name) == default:
            fields.pop(name)
    return fields


LATER_FIELDS = {"random_seeds": 1}  # recipe fields added after the first resumable runs, at their old behaviour


def data_identity(data: str, columns: str | None) -> dict:
    """What a resumed --data run must match: the path, the column mapping and the sha256 of the content (every
    file of a datasets folder; a built-in task by its name), so an edited file never resumes old rows."""
    p = Path(data)
    if not p.exists() and (tasks.DATA_DIR / p.name).is_file():
        p = tasks.DATA_DIR / p.name
    h = hashlib.sha256()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p] if p.is_file() else []
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
        h.update(f.read_bytes())
    return {"data": data, "columns": columns, "sha256": h.hexdigest() if files else None}


def _log(msg: str) -> None:
    sys.stderr.write(f"[finetune] {time.strftime('%H:%M:%S')} {msg}\n")
    sys.stderr.flush()


# ---- the command -------------------------------------------------------------------------------------------
def run(
    *,
    model: str,
    dtype: str,
    device: str,
    out: str | None,
    force: bool,
    export: str | None,
    quick: bool,
    profile: str | None,
    overrides: list[str] | None,
    recipe: str,
    components: str | None,
    top_heads: int | None,
    trust_remote_code: bool,
    data: str | None,
    columns: str | None,
) -> Report:
    """`surgery finetune` (its options and help: this package's __init__.py)."""
    from transformers import AutoConfig

    t0 = time.time()
    r = load_recipe(recipe, quick, overrides, profile)
    check_training_dtype(dtype, device)
    exports = parse_exports(export)
    tasks.check_data_args(data, None, columns)
    parts = user_splits(tasks.load_cases(data, columns), r) if data is not None else None
    k = top_heads or r.top_heads
    outp = new_out_dir(out, home() / f"finetune-{Path(model).name}", force)
    name, where = resolve(model)
    shape = shape_of(AutoConfig.from_pretrained(str(where)), name)
    given = parse(components, shape) if components is not None else None
    if given is not None:
        if not given.heads:
            raise UsageError(
                "--components names no heads; precise SFT trains heads (add LAYER.HEAD entries, MLPs are optional)"
            )
        k = top_heads or min(r.top_heads, len(given.heads))  # a short list without --top-heads: all of it
        take(given, k)  # an explicit K larger than the heads given: an error before any weights load
    _log(f"loading {model}")
    loaded = load_model(model, dtype, device, trust_remote_code=trust_remote_code)
    base, tok = loaded.model, loaded.tokenizer
    check_now(base, exports)  # fine-tuning keeps every width: the unchanged model's checks hold
    if parts is not None:
        tasks.encode(tok, parts["train"])  # bad targets: one line before the scan or any training
    selection = parts["train"] if parts is not None else None
    if given is None:
        _log("no --components: zero-ablation head scan")
        given = scan_components(loaded, r, selection)
        take(given, k)
    mlps = list(given.mlps) or (scan_mlps(loaded, r, r.scan.mlps, selection) if "precise+mlp" in r.methods else [])
    _log(f"components: heads {given.names()[:k]} mlps {mlps}")
    sets = build_sets(r, tok, parts)
    rows = plan_rows(r, given, mlps, (shape.n_layers, shape.n_heads), k)
    partial = outp.with_name(outp.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    ident = data_identity(data, columns) if data is not None else None
    fp = _fingerprint(loaded.source, r, given, mlps, ident)
    done = _load_partial(partial / "rows.jsonl", fp)
    commit = git_commit()
    results, base_items = [], None
    ckpt = partial / "checkpoint"
    for row in rows:
        if row.name in done:
            rec = done[row.name]
        else:
            _log(f"row: {row.name}")
            state = partial / "state" / f"{fp}-{hashlib.sha256(row.name.encode()).hexdigest()[:8]}"
            rec = _run_row(row, base, tok, sets, r, pad_id(tok), state)
            rec["commit"] = commit
            if (
                row.kind == "precise"
                and row.comps.source != "random"
                and not row.comps.mlps
                and len(row.comps.heads) == k
            ):
                _export(rec.pop("_model"), tok, ckpt, loaded, r, row.comps, exports)
            rec.pop("_model", None)
            _append(partial / "rows.jsonl", fp, rec)
            shutil.rmtree(state, ignore_errors=True)
        if row.kind == "base":
            base_items = rec["items"]
        results.append(rec)
        write_text_atomic(partial / "progress.md", progress_md(results, base_items, len(rows), r.seed))
    for rec in results:
        rec["metrics"] = summarize(rec["items"], None if rec["kind"] == "base" else base_items, r.seed)
    user = (
        None
        if parts is None
        else dict(ident, **{s: len(parts[s]) for s in ("train", "test")}, groups=_group_tables(parts["test"], results))
    )
    report = _report(loaded, r, given, mlps, k, results, outp, ckpt, force, time.time() - t0, user)
    shutil.rmtree(partial, ignore_errors=True)
    return report


def _run_row(
    row: Row, base: nn.Module, tok, sets: Sets, r: FinetuneRecipe, pad: int, state_dir: Path | None = None
) -> dict:
    bs = r.general.batch_size
    if row.kind == "base":
        t = Trained(base, [], 0.0, 0, 0, 0)
    elif row.kind == "full":
        t = train_full(base, sets.train_rows, r, pad, state_dir)
    elif row.kind == "lora":
        t = train_lora(base, sets.train_rows, r, pad, state_dir)
    else:
        t = train_precise(base, row.comps, sets.train_rows, r, pad, state_dir)
    items = evaluate(t.model, tok, sets, bs)
    steps = r.train.max_steps
    return {
        "name": row.name,
        "kind": row.kind,
        "components": row.comps.to_dict() if row.comps else None,
        "trained_params": t.trained_params,
        "train_seconds": round(t.seconds, 2),
        "step_seconds": round(t.seconds / steps, 4) if t.seconds else None,
        "optimizer_state_bytes": t.state_bytes,
        "grad_bytes": t.grad_bytes,
        "log": t.log,
        "items": items,
        "_model": t.model,
    }


def _load_partial(path: Path, fp: str) -> dict:
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.pop("fingerprint", None) == fp:
                done[rec["name"]] = rec
    return done


def _append(path: Path, fp: str, rec: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps({"fingerprint": fp, **rec}) + "\n")


def _export(
    model: nn.Module, tok, ckpt: Path, loaded, r: FinetuneRecipe, comps: Components, exports: Sequence[Export] = ()
) -> None:
    view = ModelView(model)
    layers: dict[str, dict] = {}
    for l, h in comps.heads:
        layers.setdefault(str(l), {}).setdefault("heads_trained", []).append(h)
    for l in comps.mlps:
        layers.setdefault(str(l), {})["mlp_trained"] = True
    prov = {
        "command": "finetune",
        "recipe": recipes.to_dict(r),
        "seed": r.seed,
        "layers": layers,
        "finetune": {
            "method": "precise-sft",
            "components": comps.to_dict(),
            "gqa": f"{view.n_heads} query heads, {view.n_kv_heads} key/value heads: a selected query "
            "head trains its key/value head's k/v rows (shared with its group)",
        },
    }
    if ckpt.exists():
        shutil.rmtree(ckpt)
    save(model, tok, ckpt, layout="zeroed", provenance=prov, base=loaded.source, exports=exports)


# ---- report ------------------------------------------------------------------------------------------------
def _pp(x: float) -> str:
    return f"{100 * x:.1f}"


def _ci(c: list[float]) -> str:
    return f"[{100 * c[0]:.1f}, {100 * c[1]:.1f}]"


def _delta(m: dict) -> str:
    d = m.get("delta")
    return "" if d is None else f" ({100 * d['mean']:+.1f} {_ci(d['ci95'])})"


NAMES = {"arith": "2-digit arith %", "asdiv": "ASDiv %", "task": "task %", "mmlu": "MMLU %", "csqa": "CSQA %"}


def table(results: list[dict]) -> str:
    keys = [k for k in ACC if k in results[0]["metrics"]]
    head = ["method", "trained params"] + [NAMES[k] for k in keys] + ["XSum ppl", "s/step"]
    rows = []
    for rec in results:
        m = rec["metrics"]
        x = m["xsum"]
        rel = x.get("rel_change")
        rows.append(
            [rec["name"], f"{rec['trained_params']:,}"]
            + [f"{_pp(m[k]['acc'])} {_ci(m[k]['ci95'])}{_delta(m[k])}" for k in keys]
            + [
                f"{x['ppl']:.2f} [{x['ci95'][0]:.2f}, {x['ci95'][1]:.2f}]"
                + (f" ({100 * rel['mean']:+.1f}%)" if rel else ""),
                "-" if rec["step_seconds"] is None else f"{rec['step_seconds']:.2f}",
            ]
        )
    return md_table(head, rows)


def progress_md(results: list[dict], base_items: dict | None, planned: int, seed: int = 0) -> str:
    """The rows finished so far, as the final report will show them (table and contrasts): written to
    <out>.partial/progress.md after every row, so a long run can be read (and quoted) before it ends."""
    done = [
        dict(rec, metrics=summarize(rec["items"], None if rec["kind"] == "base" else base_items, seed))
        for rec in results
    ]
    parts = [f"# Progress: {len(done)} of {planned} rows finished\n", table(done)]
    c = contrasts_md(contrasts(done))
    return "\n".join(parts + ([f"\n## Contrasts\n\n{c}"] if c else [])) + "\n"


def contrasts(results: list[dict]) -> dict:
    """The paper's two questions, as paired differences on the same evaluation items (points, 95% CI):
    chosen vs random, precise K minus each random-heads control draw and minus their per-item mean, on the math
    columns; and forgetting, full fine-tuning minus precise K on the general columns (MMLU, CSQA). "apart" when the
    interval excludes 0 (for the random contrast: the pooled one and every draw's, all on one side)."""
    chosen = next(
        (
            rec
            for rec in results
            if rec["kind"] == "precise" and _source(rec) not in ("random", None) and not rec["components"]["mlps"]
        ),
        None,
    )
    k = len(chosen["components"]["heads"]) if chosen else 0
    randoms = [
        rec
        for rec in results
        if rec["kind"] == "precise" and _source(rec) == "random" and len(rec["components"]["heads"]) == k
    ]
    full = next((rec for rec in results if rec["kind"] == "full"), None)
    out: dict = {}
    if chosen and randoms:
        vs: dict = {}
        for m in (m for m in ("arith", "asdiv", "task") if m in chosen["items"]):
            x = np.asarray(chosen["items"][m], float)
            draws = [_paired(x - np.asarray(r["items"][m], float)) for r in randoms]
            pooled = _paired(x - np.mean([np.asarray(r["items"][m], float) for r in randoms], axis=0))
            signs = {_side(d) for d in draws + [pooled]}
            vs[m] = {"pooled": pooled, "draws": draws, "apart": signs in ({1}, {-1}), "n_draws": len(draws)}
        out["chosen_vs_random"] = {"chosen": chosen["name"], "random": [r["name"] for r in randoms], **vs}
    if chosen and full:
        fg: dict = {}
        for m in (m for m in ("mmlu", "csqa") if m in chosen["items"]):
            d = _paired(np.asarray(full["items"][m], float) - np.asarray(chosen["items"][m], float))
            fg[m] = dict(d, apart=_side(d) != 0)
        out["full_vs_precise"] = {"full": full["name"], "precise": chosen["name"], **fg}
    return out


def _source(rec: dict) -> str | None:
    return (rec.get("components") or {}).get("source")


def _side(d: dict) -> int:
    """+1 / -1 when the 95% interval lies above / below 0, else 0."""
    lo, hi = d["ci95"]
    return 1 if lo > 0 else -1 if hi < 0 else 0


def contrasts_md(c: dict) -> str:
    """The contrasts as a table with a plain verdict per line."""
    rows = []
    cr = c.get("chosen_vs_random")
    if cr:
        for m in (m for m in ("arith", "asdiv", "task") if m in cr):
            e = cr[m]
            per = ", ".join(f"{100 * d['mean']:+.1f}" for d in e["draws"])
            verdict = (
                "chosen better, apart"
                if e["apart"] and e["pooled"]["mean"] > 0
                else ("random better, apart" if e["apart"] else "not apart")
            )
            rows.append(
                [
                    f"{cr['chosen']} minus {e['n_draws']} random draws",
                    NAMES[m],
                    f"{100 * e['pooled']['mean']:+.1f} {_ci(e['pooled']['ci95'])} (draws: {per})",
                    verdict,
                ]
            )
    fp = c.get("full_vs_precise")
    if fp:
        for m in (m for m in ("mmlu", "csqa") if m in fp):
            e = fp[m]
            verdict = (
                "full loses more, apart"
                if e["apart"] and e["mean"] < 0
                else ("full keeps more, apart" if e["apart"] else "not apart")
            )
            rows.append(
                [f"{fp['full']} minus {fp['precise']}", NAMES[m], f"{100 * e['mean']:+.1f} {_ci(e['ci95'])}", verdict]
            )
    return md_table(["contrast", "metric", "paired change, points [95% CI]", "verdict"], rows) if rows else ""


def memory_table(results: list[dict]) -> str:
    rows = [
        [
            rec["name"],
            f"{rec['trained_params']:,}",
            f"{rec['grad_bytes'] / 2**20:.2f}",
            f"{rec['optimizer_state_bytes'] / 2**20:.2f}",
        ]
        for rec in results
        if rec["kind"] != "base"
    ]
    return md_table(["method", "trained entries", "gradient MiB", "AdamW state MiB (measured)"], rows)


def _group_tables(test, results: list[dict]) -> dict:
    """--data: per row of the report, the test split's full-target accuracy per group (Wilson 95%)."""
    by: dict[str, list[int]] = {}
    for i, g in enumerate(test["group"]):
        by.setdefault(g, []).append(i)
    out = {}
    for rec in results:
        ok = rec["items"]["task"]
        out[rec["name"]] = {
            g: {"acc": sum(ok[i] for i in ix) / len(ix), "ci95": wilson(sum(ok[i] for i in ix), len(ix)), "n": len(ix)}
            for g, ix in sorted(by.items())
        }
    return out


def _report(loaded, r, comps, mlps, k, results, outp, ckpt, force, seconds, user: dict | None = None) -> Report:
    cfg = {
        "recipe": recipes.to_dict(r),
        "components": comps.to_dict(),
        "top_heads": k,
        "mlps": mlps,
        "heads_trained": [f"{l}.{h}" for l, h in comps.heads[:k]],
    }
    if user is not None:
        cfg["data"] = {kk: v for kk, v in user.items() if kk != "groups"}
    slim = [{kk: v for kk, v in rec.items() if kk != "items"} for rec in results]
    data = make(
        "finetune",
        loaded.describe(),
        cfg,
        {"rows": slim, "items": {rec["name"]: rec["items"] for rec in results}},
        seconds,
    )
    n_train = r.train.max_steps * r.train.batch_size
    what = (
        "2-digit arithmetic + ASDiv training rows"
        if user is None
        else f"train split of {user['data']} ({user['train']} rows; task = its test split, {user['test']} rows)"
    )
    groups = (
        []
        if user is None or len(next(iter(user["groups"].values()))) < 2
        else [
            "## Task accuracy per group (test split, full target, 95% Wilson interval)",
            md_table(
                ["method"] + list(next(iter(user["groups"].values()))),
                [
                    [name] + [f"{_pp(e['acc'])} {_ci(e['ci95'])} (n={e['n']})" for e in gs.values()]
                    for name, gs in user["groups"].items()
                ],
            ),
        ]
    )
    if user is not None:
        data["results"]["task_groups"] = user["groups"]
    c = contrasts(results)
    data["results"]["contrasts"] = c
    c_md = contrasts_md(c)
    md = "\n\n".join(
        [
            f"# finetune: {loaded.name}, recipe {r.name}",
            f"Every row: {r.train.max_steps} steps of batch {r.train.batch_size} ({n_train} answer rows seen) "
            "on the same "
            f"shuffled {what}, seed {r.seed}; lr full {r.lr.full}, LoRA {r.lr.lora}, "
            f"precise {r.lr.precise}; gradient rescale {'H/h' if r.grad_scale is None else r.grad_scale}. "
            f"Components ({comps.source}): heads {', '.join(cfg['heads_trained'])}; MLPs {mlps or 'none'}. "
            f"Sweep K: {[x for x in r.sweep if x <= len(comps.heads)]}.",
            "Accuracy % with 95% Wilson interval; in brackets the paired change against base (points, 95% CI on the "
            "same items). XSum: perplexity with a bootstrap 95% interval over documents and the relative change.",
            table(results),
            *(["## Contrasts: chosen vs random heads, full vs precise (paired, same items)", c_md] if c_md else []),
            *groups,
            "## Memory (gradients and optimiser state, measured from the tensors)",
            memory_table(results),
            f"Checkpoint: {outp / 'checkpoint'} (precise, {k} heads; layout zeroed, native load).",
        ]
    )
    rep = Report(data, md)
    with atomic_dir(outp, force) as tmp:
        (tmp / "report.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
        (tmp / "report.md").write_text(md + "\n")
        (tmp / "tradeoff.png").write_bytes(tradeoff_png(results))
        if ckpt.exists():
            shutil.copytree(ckpt, tmp / "checkpoint")
    rep.files = [outp / "report.json", outp / "report.md", outp / "tradeoff.png"] + (
        [outp / "checkpoint"] if ckpt.exists() else []
    )
    return rep


def tradeoff_png(results: list[dict]) -> bytes:
    """Math gain (2-digit arithmetic, points) vs general change (mean of MMLU and CSQA, points), 95% CIs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    key = "task" if "task" in results[0]["metrics"] else "arith"
    for rec in results:
        m = rec["metrics"]
        if "delta" not in m[key]:
            continue
        y, yc = 100 * m[key]["delta"]["mean"], m[key]["delta"]["ci95"]
        gx = [m[k]["delta"] for k in ("mmlu", "csqa")]
        x = 50 * (gx[0]["mean"] + gx[1]["mean"])
        xlo = 50 * (gx[0]["ci95"][0] + gx[1]["ci95"][0])
        xhi = 50 * (gx[0]["ci95"][1] + gx[1]["ci95"][1])
        ax.errorbar(
            [x],
            [y],
            xerr=[[x - xlo], [xhi - x]],
            yerr=[[y - 100 * yc[0]], [100 * yc[1] - y]],
            marker="o",
            capsize=3,
            label=rec["name"],
        )
    ax.axhline(0, color="gray", lw=0.5)
    ax.axvline(0, color="gray", lw=0.5)
    ax.set_xlabel("general change: mean of MMLU and CSQA (points, CI = mean of the two CIs)")
    ax.set_ylabel("task gain (points, test split)" if key == "task" else "2-digit arithmetic gain (points)")
    ax.legend(fontsize=7, loc="best")
    return png_bytes(fig)
