"""Pruning steps (paper 6.1): the recipe, the plan, every selector's scores once (`select`), keep sets for any
budget (`keeps_for`), slice + fresh recovery LoRA (`prune_and_train`), evaluation rows, export + reload check.

`surgery prune` (surgery/commands/prune/job.py) chains them for one budget; `surgery prune --sweep` and `--keep auto`
(surgery/commands/prune/sweep.py) run them for many budgets from one set of scores.

CNA direction: scan(view_a = reference, view_b = original, targets = the correct answer token), so
delta = imp_reference - imp_original: the neurons that matter MORE once the task LoRA is in (the paper's pick).
`topN` keeps, per layer, the union over cases of each case's N highest-delta neurons within the layer range;
`P%` keeps the P% of the range's neurons with the highest summed delta over cases (a global budget).
"""

from __future__ import annotations

import copy
import re
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Sequence

import torch
from torch import nn

from surgery.edits.lora import Fit, LoraSpec, fit_lora
from surgery.edits.training import TrainSpec
from surgery.errors import UsageError
from surgery.evals import arithmetic, tasks
from surgery.evals.arithmetic import DataSpec, Splits, accuracy, build_splits
from surgery.find import selectors
from surgery.find.cna import parse_layers, scan
from surgery.find.neurons import by_layer, mean_coefficients, top_n
from surgery.io import checkpoint as export
from surgery.io import recipe as recipes
from surgery.io.deploy import Export
from surgery.io.recipe import rules, to_dict
from surgery.io.report import md_table
from surgery.model.arch import ModelView
from surgery.model.batching import pad_id
from surgery.model.slicing import PAD_MULTIPLE, base_width, ffn_param_count, fold_means, slice_ffn, sliced_width


# ---- the recipe --------------------------------------------------------------------------------------------
@dataclass
class CnaSpec:
    batch_size: int = field(default=16, metadata=rules(min=1))
    limit: int | None = field(
        default=None, metadata=rules(min=1)
    )  # cap the 1-digit problems used for CNA / activation / taylor (quick profiles)
    max_rescore: int = field(
        default=8192, metadata=rules(min=1)
    )  # exact rescoring cap per case; cases needing more are reported uncertified
    exact_top: int = field(
        default=100, metadata=rules(min=1)
    )  # P% mode: each case's top-k is scored exactly, the rest by their bound midpoints
    score: str = field(
        default="delta", metadata=rules(choices=("delta", "reference"))
    )  # delta: imp(reference) - imp(original) (the paper); reference: imp(reference) alone
    # P% budgets rank by the sum over cases of each case's score's magnitude (abs, the default: measured 27.2% vs
    # 2.7% 2-digit accuracy at 50% kept on SmolLM2, docs/results/pruning.md) or of the signed scores (sum: the paper)
    aggregate: str = field(default="abs", metadata=rules(choices=("sum", "abs")))


@dataclass
class SweepSpec:
    layers: str | None = None  # lora-sweep: layers to try (None: every layer)
    groups: int = field(default=4, metadata=rules(min=1))  # layer groups for the coefficient-amplification table
    top: int = field(
        default=50, metadata=rules(min=1)
    )  # CNA top-N per case whose coefficients are compared (paper Tables 9-10)


@dataclass
class TaskData(DataSpec):
    """`data:` of a prune recipe: the paper's arithmetic problems (DataSpec's fields), or, with `path`, a table of
    the user's (prompt, target[, group, split]) rows (surgery.tasks), split by row with `seed`; `test_size` and
    `validation_size` are fractions (< 1) or counts; `selection`: the CNA / selector cases are the first target
    token of every training row, or every target token teacher forced (all)."""

    test_size: float = field(default=2000, metadata=rules(min=0))
    validation_size: float = field(default=400, metadata=rules(min=0))
    path: str | None = None  # .jsonl / .csv / .parquet / datasets folder / a shipped table (capitals.csv)
    columns: str | None = None  # e.g. "prompt=question,target=answer"
    selection: str = field(default="first", metadata=rules(choices=("first", "all")))


@dataclass
class SearchSpec:
    """--keep auto: bisection over the kept percentage on the validation split."""

    max_drop: float = field(default=2.0, metadata=rules(min=0))  # points of validation accuracy the cut may cost
    against: str = field(
        default="reference", metadata=rules(choices=("reference", "original"))
    )  # the unpruned LoRA model, or the original
    steps: int = field(default=5, metadata=rules(min=1, max=20))  # probes: resolution 100 / 2^steps percent


@dataclass
class PruneRecipe:
    """recipes/arithmetic-prune.yaml, validated."""

    name: str = "arithmetic-prune"
    description: str = ""
    keep: str = "top500"  # topN (per-case top-N, union per layer) | P% (global budget of the range)
    layers: str = "deep"  # 'deep' (second half) | A-B | list
    selector: str = field(
        default="cna", metadata=rules(choices=selectors.known("task"))
    )  # the selector whose model is exported
    baselines: list[str] = field(
        default_factory=lambda: ["random", "magnitude", "activation", "taylor"],
        metadata=rules(choices=selectors.known("task")),
    )
    lora_layer: int | None = None  # None: round(lora_depth * n_layers)
    lora_depth: float = field(default=0.28125, metadata=rules(min=0, max=1))  # the paper's layer 9 of 32
    layout: str = field(default="sliced", metadata=rules(choices=("sliced", "padded")))
    # Minitron-style: EVERY layer keeps the same P% of its neurons (each layer's own best), so the checkpoint is
    # a stock config with one smaller intermediate size: plain from_pretrained, GGUF as the stock architecture
    uniform: bool = False
    # each sliced layer's physical width rounded UP to a multiple of this with zero padding neurons (recorded as
    # ffn.padding; model/slicing.py): 8 = GEMM-friendly (default), 32 = q8_0/q4_0 GGUF blocks, 1 = exact widths
    multiple: int = field(default=PAD_MULTIPLE, metadata=rules(min=1))
    compensate: bool = False  # fold removed neurons' mean contributions into the FFN output bias (FLAP)
    # where the means come from: last = the answer-reading position of every selection case (default); tokens =
    # every prompt token (FLAP's calibration), which on SmolLM2 folds first-token outliers (massive activations,
    # up to 3,188x a neuron's usual size in layers 27-29) into every position (bench/compensation_error.py)
    compensate_at: str = field(default="last", metadata=rules(choices=("last", "tokens")))
    seed: int = 0
    lora: LoraSpec = field(default_factory=LoraSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    data: TaskData = field(default_factory=TaskData)
    cna: CnaSpec = field(default_factory=CnaSpec)
    sweep: SweepSpec = field(default_factory=SweepSpec)
    search: SearchSpec = field(default_factory=SearchSpec)


def load_recipe(
    name: str, overrides: Sequence[str] = (), quick: bool = False, profile: str | None = None, **flags
) -> PruneRecipe:
    """The recipe with its profile (--quick / --profile), --set overrides, then the explicit CLI flags
    (None = recipe's); every value validated."""
    return recipes.resolve(name, PruneRecipe, list(overrides or []), quick, profile, **flags)


# ---- validation (all before any expensive work) -----------------------------------------------------------
@dataclass
class Plan:
    layers: list[int]
    keep_kind: str  # "top" | "pct"
    keep_value: float
    lora_layer: int
    selectors: list[str]
    uniform: bool = False
    multiple: int = PAD_MULTIPLE


def parse_keep(spec: str) -> tuple[str, float]:
    """'top500' -> ('top', 500); '5%' -> ('pct', 5.0); anything else is a one-line error."""
    s = str(spec).strip().lower()
    if m := re.fullmatch(r"top(\d+)", s):
        return "top", float(m.group(1))
    if m := re.fullmatch(r"(\d+(?:\.\d+)?)%", s):
        return "pct", float(m.group(1))
    raise UsageError(f"bad --keep {spec!r}; use topN (e.g. top500) or P% (e.g. 5%)")


def check_keep_syntax(spec: str) -> None:
    """The model-independent part of the keep check, done before loading anything."""
    kind, value = parse_keep(spec)
    if (kind == "top" and value < 1) or (kind == "pct" and not 0 < value <= 100):
        raise UsageError(f"--keep {spec}: use top1 or more, or a percentage in (0, 100]")


def make_plan(r: PruneRecipe, model: nn.Module) -> Plan:
    """Check keep, layers, lora layer and selectors against the model; one-line UsageError otherwise."""
    view = ModelView(model)
    if not str(r.layers).strip():
        raise UsageError("empty --layers; use 'deep', A-B or a list like 3,5,7")
    layers = parse_layers(str(r.layers), view.n_layers)
    kind, value = parse_keep(r.keep)
    if r.uniform:
        if kind != "pct":
            raise UsageError(f"--uniform keeps P% of every layer; give --keep as a percentage (not {r.keep})")
        if str(r.layers).strip() not in ("deep", "all") and layers != list(range(view.n_layers)):
            raise UsageError("--uniform cuts every layer to one width; drop --layers (it applies to all layers)")
        layers = list(range(view.n_layers))
    available = sum(view.ffn_width(l) for l in layers)
    if kind == "top" and not 1 <= value <= available:
        raise UsageError(f"--keep top{int(value)}: need 1..{available} (neurons in layers {r.layers})")
    if kind == "pct" and not (0 < value <= 100 and round(value / 100 * available) >= 1):
        raise UsageError(f"--keep {r.keep}: need a percentage in (0, 100] keeping at least one of {available} neurons")
    lora_layer = r.lora_layer if r.lora_layer is not None else round(r.lora_depth * view.n_layers)
    if not 0 <= lora_layer < view.n_layers:
        raise UsageError(f"--lora-layer {lora_layer} is outside the model (layers 0..{view.n_layers - 1})")
    bad = [s for s in [r.selector, *r.baselines] if s not in selectors.names("task")]
    if bad:
        raise UsageError(f"unknown selector(s) {bad}; use some of {', '.join(selectors.names('task'))}")
    if r.cna.score not in ("delta", "reference"):
        raise UsageError(f"cna.score {r.cna.score!r}: use delta (the paper) or reference")
    if r.layout not in ("sliced", "padded"):
        raise UsageError(f"--layout {r.layout!r}: use sliced or padded")
    if r.compensate and r.layout != "sliced" and not view.native_ffn_bias():
        raise UsageError(
            f"compensate=true adds FFN output biases that the native {model.config.model_type} class "
            "lacks; use --layout sliced"
        )
    if r.uniform and r.compensate:
        raise UsageError("--uniform writes a stock checkpoint, which has no place for compensate=true's FFN biases")
    order = [r.selector] + [s for s in r.baselines if s != r.selector]
    return Plan(layers, kind, value, lora_layer, order, r.uniform, r.multiple)


# ---- the task a model is pruned for ---------------------------------------------------------------------------
@dataclass
class TaskCases:
    seqs: list[list[int]]
    targets: list[int]


@dataclass
class PruneTask:
    """The behaviour a model is pruned for, as every step reads it: training rows (prompt + answer ids, labels
    -100 on the prompt), the lr-selection scorer (higher is better; None: first lr), the selection cases (CNA and
    every selector), and held-out sets scored by `score(model, set)` into {full_answer_acc, full_answer_ci95, acc,
    n_problems}. `headline` names the set the tables, plots, verdicts and the budget search's reference rows lead
    with; `validation` is the budget search's set. Built-in: `arithmetic_task`; user data: `data_task`."""

    train: list[dict]
    validate: Callable[[nn.Module], float] | None
    cases: TaskCases
    sets: dict[str, object]  # name -> held-out rows, in table order (headline first); may include "validation"
    score: Callable[[nn.Module, object], dict]
    labels: dict[str, str]  # name -> column label
    headline: str = "test2"

    def evaluate(self, model: nn.Module, names: Sequence[str] | None = None) -> dict[str, dict]:
        """Scores of `model` on the named held-out sets (default: all but validation)."""
        names = [n for n in self.sets if n != "validation"] if names is None else names
        return {n: self.score(model, self.sets[n]) for n in names}

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), **{n: len(v) for n, v in self.sets.items()}}


def arithmetic_task(r: PruneRecipe, tokenizer) -> PruneTask:
    """The paper's task: 2-digit problems to train on and test (`data:`), every 1-digit case to select with."""
    splits = build_splits(r.data)
    bs = r.train.eval_batch_size

    def score(model: nn.Module, rows) -> dict:
        return accuracy(model, tokenizer, rows, bs)["overall"]

    train, validate = training_data(r, splits, tokenizer)
    sets = {"test2": splits.test, "one_digit": splits.one_digit}
    if len(splits.validation):
        sets["validation"] = splits.validation
    return PruneTask(
        train,
        validate,
        task_cases(splits, tokenizer, r.cna.limit),
        sets,
        score,
        {"test2": "2-digit test", "one_digit": "1-digit", "validation": "validation"},
        "test2",
    )


def make_task(r: PruneRecipe, tokenizer) -> PruneTask:
    """The recipe's task: the user's table when `data.path` is set, else the paper's arithmetic."""
    return data_task(r, tokenizer) if r.data.path else arithmetic_task(r, tokenizer)


def data_task(r: PruneRecipe, tokenizer) -> PruneTask:
    """A task from the user's rows (`data.path`, surgery.tasks): train / validation / test split by row with
    `data.seed` (or the table's split column); recovery trains on prompt + target (loss on the target); the
    selection cases are the training rows' first target tokens (`data.selection: all`: every target token) capped
    at `cna.limit`; held-out sets are scored teacher forced (full target correct)."""
    bs = r.train.eval_batch_size
    pd = tasks.prune_data(
        tokenizer,
        tasks.load_cases(r.data.path, r.data.columns),
        r.data.seed,
        r.data.test_size,
        r.data.validation_size,
        bs,
        r.data.selection,
    )

    def score(model: nn.Module, rows) -> dict:
        e = tasks.evaluate(model, tokenizer, rows, bs)["overall"]
        return {
            "full_answer_acc": e["acc"],
            "full_answer_ci95": e["ci95"],
            "acc": e["token_acc"],
            "n_problems": e["n"],
            "logprob": e["logprob"],
        }

    n = len(pd.selection_seqs) if r.cna.limit is None else min(r.cna.limit, len(pd.selection_seqs))
    sets = {"test": pd.splits["test"]}
    if len(pd.splits["validation"]):
        sets["validation"] = pd.splits["validation"]
    return PruneTask(
        pd.train,
        pd.validate,
        TaskCases(pd.selection_seqs[:n], pd.selection_targets[:n]),
        sets,
        score,
        {"test": "test", "validation": "validation"},
        "test",
    )


def task_cases(splits: Splits, tokenizer, limit: int | None) -> TaskCases:
    """Every per-token case of the 1-digit problems (or the first `limit` problems, stratified)."""
    probs = splits.one_digit
    if limit is not None and limit < len(probs):
        keep = {p["problem_id"] for p in arithmetic.stratified_order(list(probs), 0)[:limit]}
        probs = probs.filter(lambda p: p["problem_id"] in keep)
    cases = arithmetic.cases(probs, tokenizer)
    return TaskCases(list(cases["input_ids"]), list(cases["target"]))


# ---- selection: every selector's scores once, then keep sets for any budget ------------------------------------
Scores = dict[int, torch.Tensor]
Keep = dict[int, list[int]]


@dataclass
class Selection:
    """Every selector's scores over the chosen layers, computed once: a sweep derives every budget's keep sets
    from them (`keeps_for`) without scoring again."""

    layers: list[int]
    order: list[str]  # the main selector first: its keep set fixes every other selector's per-layer budget
    scores: dict[str, Scores]
    case_top: tuple[torch.Tensor, torch.Tensor] | None = None  # CNA: each case's ranked top-k (layer, index) [C, k]
    ranked: int = 0  # how deep case_top ranks each case (topN budgets need N <= ranked)
    certified: float | None = None  # fraction of cases whose CNA top-k is certified exact
    seconds: dict[str, float] = field(default_factory=dict)


def select(
    orig: nn.Module,
    ref: nn.Module,
    tokenizer,
    task: TaskCases,
    layers: list[int],
    order: Sequence[str],
    r: PruneRecipe,
    top_k: int = 0,
    step: Callable[[str], ContextManager] = lambda _: nullcontext(),
) -> Selection:
    """Score every neuron of `layers` once per selector in `order`. CNA (ranked in the tuned `ref` against `orig`,
    cna.score) runs one scan whose per-case ranked tops serve every topN budget up to `top_k` and whose summed
    scores serve P% budgets (each case's max(top_k, cna.exact_top) neurons exact, the rest by bound midpoints);
    the other selectors come from the registry (`surgery.selectors`). `step(name)` times each selector."""
    if r.cna.score not in ("delta", "reference"):
        raise UsageError(f"cna.score {r.cna.score!r}: use delta (the paper) or reference")
    sel = Selection(list(layers), list(order), {})
    pad = pad_id(tokenizer)
    if "cna" in order or top_k:
        sel.ranked = max(top_k, r.cna.exact_top)
        with step("select (cna)"):
            sc = scan(
                ModelView(ref),
                task.seqs,
                sel.layers,
                sel.ranked,
                pad,
                view_b=ModelView(orig) if r.cna.score == "delta" else None,
                targets=task.targets,
                batch_size=r.cna.batch_size,
                max_rescore=r.cna.max_rescore,
            )
        sel.case_top, sel.certified = (sc.top_layer, sc.top_index), float(sc.certified.float().mean())
        if "cna" in order:
            sel.scores["cna"] = sc.total if r.cna.aggregate == "sum" else sc.total_abs
    for name in order:
        if name != "cna":
            inp = selectors.Inputs(
                ModelView(orig), sel.layers, pad, task.seqs, task.targets, seed=r.seed, reference=ModelView(ref)
            )
            with step(f"select ({name})"):
                sel.scores[name] = selectors.score("task", name, inp)
    return sel


def keeps_for(sel: Selection, kind: str, value: float, uniform: bool = False) -> dict[str, Keep]:
    """Keep sets of every selector at one budget. The main selector's set: topN = the union over cases of each
    case's N highest-CNA neurons per layer (CNA's rule sets the per-layer budget whichever selector is main, since
    only CNA ranks per case; a non-CNA main then keeps its own best neurons at those counts); P% = the main
    selector's global top P% of the layers; P% uniform = P% of EVERY layer, each layer's own best. Every other
    selector keeps its best neurons at the main set's per-layer counts."""
    main = sel.order[0]
    if uniform:
        budget = {l: max(1, round(value / 100 * len(v))) for l, v in sel.scores[main].items()}
        return {n: selectors.by_budget(sel.scores[n], budget) for n in sel.order}
    if kind == "top":
        union = case_union(sel, int(value))
        main_keep = union if main == "cna" else selectors.by_budget(sel.scores[main], counts(union))
    else:
        main_keep = global_budget(sel.scores[main], value)
    budget = counts(main_keep)
    return {main: main_keep, **{n: selectors.by_budget(sel.scores[n], budget) for n in sel.order[1:]}}


def case_union(sel: Selection, n: int) -> Keep:
    """Per layer, the union over cases of each case's n best CNA neurons (a prefix of the ranked scan tops)."""
    if sel.case_top is None or n > sel.ranked:
        raise ValueError(f"the selection ranks each case {sel.ranked} deep, not {n}; pass top_k >= {n} to select()")
    keep: dict[int, set[int]] = {l: set() for l in sel.layers}
    for l, i in zip(sel.case_top[0][:, :n].flatten().tolist(), sel.case_top[1][:, :n].flatten().tolist()):
        keep[l].add(i)
    return {l: sorted(v) for l, v in keep.items()}


def counts(keep: Keep) -> dict[int, int]:
    return {l: len(v) for l, v in keep.items()}


def global_budget(scores: Scores, pct: float) -> Keep:
    """The pct% highest-scoring neurons over all layers together, as kept indices per layer."""
    n = max(1, round(pct / 100 * sum(len(v) for v in scores.values())))
    kept = by_layer(top_n(scores, n))
    return {l: kept.get(l, []) for l in sorted(scores)}


# ---- slicing + fresh LoRA ----------------------------------------------------------------------------------
def sliced_copy(
    orig: nn.Module,
    keep: dict[int, list[int]],
    means: dict[int, torch.Tensor] | None = None,
    multiple: int = PAD_MULTIPLE,
) -> nn.Module:
    """A deep copy of `orig` with each listed layer's FFN physically cut to the kept neurons (widths padded up to
    `multiple` with zero neurons); with `means` (mean coefficient per neuron) the removed neurons' mean
    contributions are folded into the FFN output bias first."""
    m = copy.deepcopy(orig)
    if means is not None:
        fold_means(m, keep, means)
    slice_ffn(m, keep, multiple)
    return m.eval()


def token_means(
    orig: nn.Module, tokenizer, task: TaskCases, layers: list[int], at: str = "last"
) -> dict[int, torch.Tensor]:
    """Bias compensation's means: the mean coefficient of every neuron at the last position of every task case
    (`at="last"`: the positions the answer is read from) or over every real token of the prompts (`"tokens"`)."""
    view, pad = ModelView(orig), pad_id(tokenizer)
    if at == "last":
        return {l: v.float() for l, v in mean_coefficients(view, task.seqs, layers, pad).items()}
    s1, _, n = selectors.token_coefficients(selectors.Inputs(view, layers, pad, task.seqs))
    return {l: (s / n).float() for l, s in s1.items()}


def prune_and_train(
    orig: nn.Module,
    tokenizer,
    keep: dict[int, list[int]],
    r: PruneRecipe,
    plan: Plan,
    task: PruneTask,
    teacher: nn.Module | None = None,
    means: dict[int, torch.Tensor] | None = None,
    state_dir: Path | None = None,
    save_steps: int = 0,
) -> tuple[nn.Module, Fit]:
    """Slice a copy (bias-compensated with `means` when given), attach a fresh LoRA at the plan's layer, train it
    on the task's rows (lr chosen on validation; distilled from `teacher` when train.distill > 0). `state_dir`,
    `save_steps`: the training saves its state there and a killed one resumes (`fit_lora`)."""
    sliced = sliced_copy(orig, keep, means, plan.multiple)
    ffn = sorted(keep) if r.lora.ffn else ()  # lora.ffn: the recovery LoRA also adapts the pruned FFNs
    how = dict(teacher=teacher, ffn_layers=ffn, state_dir=state_dir, save_steps=save_steps)
    fit = fit_lora(sliced, tokenizer, plan.lora_layer, r.lora, r.train, task.train, task.validate, **how)
    return sliced, fit


def training_data(r: PruneRecipe, splits: Splits, tokenizer):
    """(encoded 2-digit training rows, the lr-selection scorer: full-answer accuracy on the validation split)."""

    def validate(model: nn.Module) -> float:
        return accuracy(model, tokenizer, splits.validation, r.train.eval_batch_size)["overall"]["full_answer_acc"]

    return arithmetic.encode(splits.train, tokenizer), validate if len(splits.validation) else None


# ---- evaluation --------------------------------------------------------------------------------------------
def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def evaluate_row(
    name: str,
    model: nn.Module,
    task: PruneTask,
    kept: int | None,
    extra_params: int = 0,
    lr: float | None = None,
    sets: Sequence[str] | None = None,
) -> dict:
    """One table row: accuracy on each held-out set (per token and full answer, 95% CIs; default all but
    validation), kept neurons, params."""
    return {
        "name": name,
        **task.evaluate(model, sets),
        "kept": kept,
        "lr": lr,
        "params": param_count(model) + extra_params,
        "ffn_params": ffn_param_count(model),
    }


def lora_params(fit: Fit) -> int:
    return sum(p.numel() for n, p in fit.model.named_parameters() if "lora_" in n)


# ---- report ------------------------------------------------------------------------------------------------
def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def ci_text(acc: dict) -> str:
    """'32.7 [29.9, 35.7]': full-answer accuracy % with its 95% Wilson interval."""
    lo, hi = acc["full_answer_ci95"]
    return f"{_pct(acc['full_answer_acc'])} [{_pct(lo)}, {_pct(hi)}]"


def results_table(rows: list[dict], deep_total: int, labels: dict[str, str]) -> str:
    """The Table 11 form: one row per model, each held-out set (the headline with n and token accuracy) with 95%
    Wilson intervals, kept neurons and params. `labels`: set name -> column label, headline first."""
    names = [n for n in labels if all(n in r for r in rows)]
    out = []
    for r in rows:
        head = r[names[0]]
        kept = "all" if r["kept"] is None else f"{r['kept']} ({100 * r['kept'] / deep_total:.1f}%)"
        out.append(
            [
                r["name"],
                ci_text(head),
                head["n_problems"],
                _pct(head["acc"]),
                *(ci_text(r[n]) for n in names[1:]),
                kept,
                f"{r['params']:,}",
            ]
        )
    first = labels[names[0]]
    return md_table(
        [
            "model",
            f"{first} acc % [95% CI]",
            "n",
            f"{first} token acc %",
            *(f"{labels[n]} acc % [95% CI]" for n in names[1:]),
            "kept deep FFN neurons",
            "params",
        ],
        out,
    )


# ---- export ------------------------------------------------------------------------------------------------
def export_checkpoint(
    fit: Fit,
    merged: nn.Module,
    tokenizer,
    out: Path,
    force: bool,
    r: PruneRecipe,
    plan: Plan,
    keep: dict[int, list[int]],
    base: str,
    extra: dict,
    exports: Sequence[Export] = (),
) -> dict:
    """Write the chosen model (LoRA merged) with provenance (and `exports`, e.g. GGUF), then reload it and
    compare logits."""
    prov = {
        "recipe": to_dict(r),
        "seed": r.seed,
        "selector": r.selector,
        "lora_layer": plan.lora_layer,
        "layers": {l: {"kept": keep[l]} for l in sorted(keep)},
    }
    export.save(
        fit.model.get_base_model(),
        tokenizer,
        out,
        layout=r.layout,
        provenance=prov,
        force=force,
        adapter_model=fit.model,
        merge=True,
        extra_files=extra,
        base=base,
        exports=exports,
    )
    return check_reload(out, merged, keep, r.layout)


@torch.no_grad()
def check_reload(out: Path, merged: nn.Module, keep: dict[int, list[int]], layout: str = "sliced") -> dict:
    """Reload the checkpoint with transformers; sliced widths must equal the kept counts rounded up by width
    rounding (padded: the base width) and logits must match the in-memory model."""
    back = export.load(out)
    widths = ModelView(back).ffn_widths()
    base = base_width(merged) if layout == "padded" else None
    ok_widths = all(widths[l] == (base or sliced_width(merged, len(k))) for l, k in keep.items())
    ids = torch.tensor([[1, 44345, 42, 216, 33, 34, 27, 35, 36, 45]]) % back.config.vocab_size
    diff = float((back(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max())
    return {"widths_match": ok_widths, "max_logit_diff": diff, "widths": widths}
