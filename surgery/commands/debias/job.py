"""Gender debiasing by neuron editing (the paper's section 6.2): select neurons with CNA, zero or remove them.

Selection (on SELECTION templates only): for every (template, biased profession) case, CNA compares the same model
on the stereotyped-gender prompt (A) and the other-gender prompt (B) with target = the profession's first token
(or every token of it, teacher forced). Woman-biased professions put the woman prompt in A, man-biased ones the man
prompt, so a large delta imp(A) - imp(B) always means "pushes towards the stereotype". The deltas are summed over
cases and the top N neurons are edited. Baselines at equal N: seeded random neurons, and activation-diff
(largest |mean m_k(woman) - mean m_k(man)| at the last position).

Evaluation (on the disjoint EVALUATION templates): bias before/after (total / woman-biased / man-biased, per
profession), a sweep over N for every method with hook-based zeroing (identical to zeroing the weights; no model
copies), collateral (XSum perplexity, 1-digit arithmetic, gendered factual controls), and Wino-test. Only the
exported model is edited in its weights (zeroed layout: native; remove: sliced layout).

This is the gender recipe of `surgery edit` (any contrast pairs): selection scores and edits come from the same
engine, `surgery.editing`; `surgery edit --pairs gender-bias` selects the same neurons on the same cases and
measures the same bias as its A/B gap. debias adds the recipe's sweep over N, the factual controls and Wino-test.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from surgery.edits.neurons import (  # noqa: F401 (debias API)
    contrast_scores,
    edit_and_check,
    edit_weights,
    probe_logits,
    zeroed,
)
from surgery.errors import UsageError
from surgery.evals import arithmetic, perplexity, stereoset
from surgery.evals import gender_bias as gb
from surgery.find import selectors
from surgery.find.cna import neuron_name, parse_layers, top_tokens
from surgery.find.neurons import Neuron, by_layer, mean_coefficients, top_n
from surgery.io import checkpoint as export
from surgery.io import recipe as recipes
from surgery.io import report as rep
from surgery.io.context import Run
from surgery.io.deploy import Export, check_planned, parse_exports
from surgery.io.loading import load_model
from surgery.io.recipe import rules
from surgery.io.report import png_bytes as png
from surgery.model.arch import ModelView
from surgery.model.batching import (
    cache_kwargs,
    continuation_ids,
    device_of,
    left_pad,
    output_cache,
    pad_id,
    position_ids,
    predict_cases,
)
from surgery.model.slicing import PAD_MULTIPLE

EDITS = ("zero", "remove")
TARGETS = ("first", "all")
ORIENTATIONS = ("label", "measured")


# ---- recipe -------------------------------------------------------------------------------------------------
@dataclass
class Sweep:
    ns: list[int] = field(default_factory=lambda: [1, 2, 5, 10, 18, 50], metadata=rules(min=1, nonempty=True))
    methods: list[str] = field(
        default_factory=lambda: ["cna", "random", "activation-diff"],
        metadata=rules(choices=selectors.known("contrast"), nonempty=True),
    )


@dataclass
class Collateral:
    perplexity_docs: int = field(default=6, metadata=rules(min=1))  # XSum documents (first in file order)
    perplexity_tokens: int = field(default=128, metadata=rules(min=2))  # tokens per document
    arithmetic_limit: int | None = field(
        default=60, metadata=rules(min=1)
    )  # 1-digit problems (calculate template); None = all 287
    wino_limit: int | None = field(default=300, metadata=rules(min=1))  # Wino-test items; None = all


@dataclass
class HeldOut:
    """The held-out benchmark the edit is judged on: StereoSet intrasentence (evals/stereoset.py), never used to
    select or tune anything."""

    stereoset: list[str] = field(default_factory=lambda: ["gender"])  # bias types; [] skips it
    stereoset_limit: int | None = field(default=None, metadata=rules(min=1))  # items per type (None = all)


@dataclass
class DebiasRecipe:
    name: str = "gender-debias"
    neurons: int = field(default=18, metadata=rules(min=1))
    method: str = "cna"
    edit: str = "zero"
    target: str = "first"  # first: the profession's first token; all: every token, teacher forced, summed
    orientation: str = "label"  # CNA case direction: label (the profession's stereotype) | measured (model's own)
    layers: str = "all"  # selection layers: all | deep | A-B | list
    professions: list[str] | None = None  # None: all 32 biased professions of evals/gender_bias.py
    selection_templates: str | list[str] = "select"
    eval_templates: str | list[str] = "eval"
    candidates: int = field(
        default=100, metadata=rules(min=1)
    )  # CNA: the top of the first-order screen rescored exactly in every case
    seed: int = 0
    batch_size: int = field(default=32, metadata=rules(min=1))
    sweep: Sweep = field(default_factory=Sweep)
    collateral: Collateral = field(default_factory=Collateral)
    heldout: HeldOut = field(default_factory=HeldOut)


def load_recipe(
    name: str, overrides: Sequence[str] = (), quick: bool = False, profile: str | None = None, **flags
) -> DebiasRecipe:
    """The resolved recipe: file, profile (--quick / --profile), --set overrides, then the CLI flags (None =
    the recipe's); validated (same signature as prune.load_recipe)."""
    r = recipes.resolve(name, DebiasRecipe, list(overrides), quick, profile, **flags)
    check_recipe(r)
    return r


def check_recipe(r: DebiasRecipe) -> None:
    """One-line UsageErrors for every option that does not need the model."""
    if r.neurons < 1:
        raise UsageError(f"--neurons must be >= 1, got {r.neurons}")
    for what, value, allowed in (
        ("--method", r.method, selectors.names("contrast")),
        ("--edit", r.edit, EDITS),
        ("target", r.target, TARGETS),
        ("orientation", r.orientation, ORIENTATIONS),
    ):
        if value not in allowed:
            raise UsageError(f"unknown {what} {value!r}; use one of {', '.join(allowed)}")
    bad = [m for m in r.sweep.methods if m not in selectors.names("contrast")]
    if bad or not r.sweep.methods:
        raise UsageError(
            f"sweep.methods must be a non-empty subset of {', '.join(selectors.names('contrast'))}; got "
            f"{r.sweep.methods}"
        )
    if "cna-specific" in (r.method, *r.sweep.methods):
        raise UsageError(
            "cna-specific needs cases the edit must not move; use surgery edit --pairs gender-bias --method "
            "cna-specific --keep-data FILE"
        )
    if not r.sweep.ns or min(r.sweep.ns) < 1:
        raise UsageError(f"sweep.ns must be a non-empty list of counts >= 1; got {r.sweep.ns}")
    if r.professions is not None and not r.professions:
        raise UsageError("the recipe's profession list is empty; list some biased professions or remove the key")
    unknown = [p for p in r.professions or [] if p not in gb.PROFESSIONS]
    if unknown:
        raise UsageError(f"unknown profession(s) {unknown}; use some of: {', '.join(gb.PROFESSIONS)}")
    selection, evaluation = gb.template_set(r.selection_templates), gb.template_set(r.eval_templates)  # both checked
    if set(selection[1]) & set(evaluation[1]):
        raise UsageError("selection and evaluation templates overlap; keep them disjoint so the evaluation is fair")


def check_neurons(r: DebiasRecipe, view: ModelView, layers: list[int]) -> None:
    """--neurons (and every sweep N) must fit in the selection layers."""
    total = sum(view.ffn_width(l) for l in layers)
    worst = max([r.neurons, *r.sweep.ns])
    if worst > total:
        raise UsageError(
            f"asked to edit {worst} neurons but the selection layers hold only {total}; "
            f"use --neurons (and sweep.ns) <= {total}"
        )


# ---- selection cases ----------------------------------------------------------------------------------------
@dataclass
class Cases:
    """CNA cases: A = stereotyped-gender prompt, B = other gender; targets = profession token to score."""

    seqs_a: list[list[int]]
    seqs_b: list[list[int]]
    targets: list[int]
    profession: list[str]
    template: list[str]


def _pair(gender: str) -> tuple[str, str]:
    return (gender, "man" if gender == "woman" else "woman")


def stereotype(profession: str) -> tuple[str, str]:
    """(stereotyped gender, other gender) of a biased profession."""
    return ("woman", "man") if gb.PROFESSIONS[profession] == "woman-biased" else ("man", "woman")


def favoured_genders(
    model: nn.Module, tokenizer, templates: Sequence[str], professions: Sequence[str]
) -> dict[str, str]:
    """The gender the MODEL favours for each (template, profession) pair ("template|profession" -> gender), from
    its own log p(profession | woman) - log p(profession | man) on those (selection) templates."""
    ds = gb.build(list(templates), professions)
    diffs = gb.pair_diffs(ds, prefix_logprobs(model, tokenizer, ds["prompt"], ds["continuation"]))
    return {pid: "woman" if d > 0 else "man" for pid, d in diffs.items()}


def selection_cases(
    tokenizer,
    templates: Sequence[str],
    professions: Sequence[str],
    target: str = "first",
    favoured: dict[str, str] | None = None,
) -> Cases:
    """One case per (template, profession) (target first) or per profession token (target all). A is the
    stereotyped gender (orientation label) or the gender the model favours (`favoured`, orientation measured)."""
    out = Cases([], [], [], [], [])
    for t in templates:
        for p in professions:
            genders = stereotype(p) if favoured is None else _pair(favoured[f"{t}|{p}"])
            (fa, ka), (fb, kb) = [continuation_ids(tokenizer, *gb.prompt_for(t, g, p)) for g in genders]
            steps = range(1) if target == "first" else range(ka)
            for j in steps:
                out.seqs_a.append(fa[: len(fa) - ka + j])
                out.seqs_b.append(fb[: len(fb) - kb + j])
                out.targets.append(fa[len(fa) - ka + j])
                out.profession.append(p)
                out.template.append(t)
    return out


# ---- selection methods: each returns a score per neuron (higher = edit first) ---------------------------------
@torch.no_grad()
def gender_prompts(tokenizer, templates: Sequence[str], professions: Sequence[str]) -> dict[str, list[list[int]]]:
    """Token ids of every selection prompt, per gender ({"woman": [...], "man": [...]})."""
    return {
        g: [tokenizer(gb.prompt_for(t, g, p)[0]).input_ids for t in templates for p in professions] for g in gb.GENDERS
    }


# ---- scoring with a shared prompt prefix ------------------------------------------------------------------------
@torch.no_grad()
def prefix_logprobs(
    model: nn.Module, tokenizer, prompts: Sequence[str], continuations: Sequence[str], batch_size: int = 128
) -> Tensor:
    """Sum of each continuation's token log-probs given its prompt (same numbers as
    gender_bias.continuation_logprobs), computing each DISTINCT prompt once: the prompts run in one left-padded
    batch with a KV cache, then every row's continuation runs on its prompt's cached keys/values."""
    pairs = [continuation_ids(tokenizer, p, c) for p, c in zip(prompts, continuations)]
    heads = [tuple(f[: len(f) - k]) for f, k in pairs]
    uniq = sorted(set(heads))
    group = torch.tensor([uniq.index(h) for h in heads])
    conts = [f[len(f) - k :] for f, k in pairs]
    dev = device_of(model)
    ids, mask = left_pad(uniq, pad_id(tokenizer))
    out = model(
        input_ids=ids.to(dev),
        attention_mask=mask.to(dev),
        position_ids=position_ids(mask).to(dev),
        use_cache=True,
        logits_to_keep=1,
    )
    first = out.logits[:, -1].float().log_softmax(-1).cpu()
    total = torch.tensor([float(first[g, c[0]]) for g, c in zip(group.tolist(), conts)])
    rest = [i for i, c in enumerate(conts) if len(c) > 1]
    for s in range(0, len(rest), batch_size):
        rows = rest[s : s + batch_size]
        total[rows] += _continue(model, output_cache(out), mask, group[rows], [conts[r] for r in rows], dev)
    return total


def _continue(model: nn.Module, cache, prompt_mask: Tensor, group: Tensor, conts: list[list[int]], dev) -> Tensor:
    """Log-prob of tokens 1.. of each continuation, run on a copy of the cached prompts selected per row."""
    c = copy.deepcopy(cache)
    c.batch_select_indices(group.to(dev))
    width = max(len(x) for x in conts) - 1
    ids = torch.zeros(len(conts), width, dtype=torch.long)
    cmask = torch.zeros(len(conts), width, dtype=torch.long)
    for i, x in enumerate(conts):
        ids[i, : len(x) - 1], cmask[i, : len(x) - 1] = torch.tensor(x[:-1]), 1
    pmask = prompt_mask[group]
    pos = pmask.sum(-1, keepdim=True) + torch.arange(width)[None]
    logits = (
        model(
            input_ids=ids.to(dev),
            attention_mask=torch.cat([pmask, cmask], 1).to(dev),
            position_ids=pos.to(dev),
            **cache_kwargs(model, c),
        )
        .logits.float()
        .log_softmax(-1)
        .cpu()
    )
    tgt = torch.zeros_like(ids)
    for i, x in enumerate(conts):
        tgt[i, : len(x) - 1] = torch.tensor(x[1:])
    return (logits.gather(2, tgt[..., None])[..., 0] * cmask).sum(1)


# ---- evaluation -------------------------------------------------------------------------------------------------
@dataclass
class EvalData:
    """Everything one evaluation point needs, prepared once: bias rows, XSum docs, arithmetic cases, Wino items."""

    bias: object  # datasets.Dataset from gender_bias.build
    docs: object  # datasets.Dataset from perplexity.build
    arithmetic: object  # per-token cases from arithmetic.cases
    wino: list[dict]
    ppl_tokens: int


def eval_data(tokenizer, r: DebiasRecipe, professions: Sequence[str]) -> EvalData:
    """Build the evaluation sets of recipe `r` (eval templates only; selection templates never appear)."""
    c = r.collateral
    problems = arithmetic.build(
        digits=(1,), templates=arithmetic.DEFAULT_TEMPLATES, limit=c.arithmetic_limit, seed=r.seed
    )
    wino = gb.wino_items()
    return EvalData(
        gb.build(r.eval_templates, professions),
        perplexity.build(n_docs=c.perplexity_docs),
        arithmetic.cases(problems, tokenizer),
        wino[: c.wino_limit] if c.wino_limit else wino,
        c.perplexity_tokens,
    )


def bias_score(model: nn.Module, tokenizer, ds) -> dict:
    """gender_bias.score of the model on the rows of `ds` (prefix-shared scoring)."""
    return gb.score(ds, prefix_logprobs(model, tokenizer, ds["prompt"], ds["continuation"]))


def collateral(model: nn.Module, tokenizer, data: EvalData, batch_size: int = 32) -> dict:
    """Perplexity on the XSum sample, 1-digit arithmetic accuracy, factual-control log-probs."""
    ppl = perplexity.perplexity(model, tokenizer, data.docs, data.ppl_tokens, batch_size=8, progress=False)
    pred = predict_cases(model, tokenizer, data.arithmetic, batch_size=64, progress=False)
    acc = arithmetic.score(data.arithmetic, pred["correct"])["overall"]
    return {
        "perplexity": ppl["ppl"],
        "perplexity_tokens": ppl["tokens"],
        "arithmetic_acc": acc["acc"],
        "arithmetic_full_answer_acc": acc["full_answer_acc"],
        "arithmetic_n": acc["n"],
        "controls": gb.control_logprobs(model, tokenizer, batch_size),
    }


def evaluate_point(model: nn.Module, tokenizer, neurons: Sequence[Neuron], data: EvalData, wino: bool = False) -> dict:
    """Bias + collateral (+ Wino-test) with `neurons` zeroed by hooks (none: the base model)."""
    with zeroed(model, neurons):
        out = {"n": len(neurons), "bias": bias_score(model, tokenizer, data.bias), **collateral(model, tokenizer, data)}
        if wino and data.wino:
            out["wino"] = gb.wino_score(model, tokenizer, data.wino)
    return out


def control_changes(base: list[dict], after: list[dict]) -> list[dict]:
    """Per factual control: log-prob before, after, change (a debias edit should keep these near 0)."""
    return [
        dict(
            prompt=b["prompt"],
            continuation=b["continuation"],
            before=b["logprob"],
            after=a["logprob"],
            change=a["logprob"] - b["logprob"],
        )
        for b, a in zip(base, after)
    ]


def summary(point: dict, base: dict) -> dict:
    """One sweep row: bias totals, relative reduction, collateral and its change vs the base model."""
    b, b0 = point["bias"], base["bias"]
    ch = [c["change"] for c in control_changes(base["controls"], point["controls"])]
    return {
        "n": point["n"],
        "bias_total": b["total"]["mean"],
        "bias_woman": b["woman-biased"]["mean"],
        "bias_man": b["man-biased"]["mean"],
        "reduction": 1 - b["total"]["mean"] / b0["total"]["mean"],
        "perplexity": point["perplexity"],
        "arithmetic_acc": point["arithmetic_acc"],
        "control_mean_change": sum(ch) / len(ch),
        "control_min_change": min(ch),
    }


def sweep(
    model: nn.Module, tokenizer, scores: dict[str, dict[int, Tensor]], ns: Sequence[int], data: EvalData
) -> dict[tuple[str, int], dict]:
    """For each method and N: zero the top N by hooks and measure bias and collateral ({(method, N): point})."""
    grid = [(m, n) for m in scores for n in sorted(set(ns))]
    return {
        (m, n): evaluate_point(model, tokenizer, top_n(scores[m], n), data)
        for m, n in tqdm(grid, desc="sweep", unit="point")
    }


def wino_point(model: nn.Module, tokenizer, neurons: Sequence[Neuron], data: EvalData) -> dict | None:
    """Wino-test pro-stereotype rate with `neurons` zeroed by hooks (None without items)."""
    if not data.wino:
        return None
    with zeroed(model, neurons):
        return gb.wino_score(model, tokenizer, data.wino)


# ---- selection orchestration --------------------------------------------------------------------------------------
@dataclass
class Selection:
    """Scores per method, the mean coefficients per gender, and what the CNA scan certified."""

    scores: dict[str, dict[int, Tensor]]
    means: dict[str, dict[int, Tensor]]
    cna: dict | None
    templates: list[str]


def select_all(
    view: ModelView, tokenizer, r: DebiasRecipe, layers: list[int], professions: Sequence[str], methods: Sequence[str]
) -> Selection:
    """Scores of every requested method on the selection templates (the coefficients are always computed)."""
    pad = pad_id(tokenizer)
    templates = list(gb.template_set(r.selection_templates)[1])
    prompts = gender_prompts(tokenizer, templates, professions)
    means = {g: mean_coefficients(view, prompts[g], layers, pad, r.batch_size) for g in prompts}
    scores: dict[str, dict[int, Tensor]] = {}
    cna_info = None
    cases = Cases([], [], [], [], [])
    if "cna" in methods:
        fav = favoured_genders(view.model, tokenizer, templates, professions) if r.orientation == "measured" else None
        cases = selection_cases(tokenizer, templates, professions, r.target, fav)
    for m in methods:  # CNA pairs: the stereotyped-gender prompt (A) vs the other gender (B), profession target;
        # the baselines: every selection prompt, woman (A) vs man (B) -- the engine `surgery edit` uses too
        scores[m], info = contrast_scores(
            view,
            layers,
            pad,
            m,
            seqs_a=cases.seqs_a,
            seqs_b=cases.seqs_b,
            targets=cases.targets,
            prompts_a=prompts["woman"],
            prompts_b=prompts["man"],
            seed=r.seed,
            batch_size=r.batch_size,
            candidates=max([r.candidates, r.neurons, *r.sweep.ns]),
        )
        cna_info = info if m == "cna" else cna_info
    return Selection(scores, means, cna_info, templates)


def neuron_rows(
    view: ModelView, tokenizer, neurons: Sequence[Neuron], sel: Selection, method: str, n_tokens: int = 10
) -> list[dict]:
    """Table 12 rows: name, layer, index, selection score, coefficient for woman vs man prompts, top tokens."""
    rows = []
    for l, i in neurons:
        mw, mm = float(sel.means["woman"][l][i]), float(sel.means["man"][l][i])
        sign = mw if abs(mw) >= abs(mm) else mm
        rows.append(
            {
                "neuron": neuron_name(l, i),
                "layer": l,
                "index": i,
                "score": float(sel.scores[method][l][i]),
                "cna_score": float(sel.scores["cna"][l][i]) if "cna" in sel.scores else None,
                "coef_woman": mw,
                "coef_man": mm,
                "top_tokens": top_tokens(view, tokenizer, l, i, sign=sign, n=n_tokens),
            }
        )
    return rows


# ---- report --------------------------------------------------------------------------------------------------------
def bias_table(before: dict, after: dict) -> list[dict]:
    """Table 13 rows: total / woman-biased / man-biased bias before, after, relative reduction."""
    return [
        {
            "group": g,
            "before": before[g]["mean"],
            "after": after[g]["mean"],
            "reduction": 1 - after[g]["mean"] / before[g]["mean"] if before[g]["mean"] else None,
            "n": before[g]["n"],
        }
        for g in ("total", "woman-biased", "man-biased")
    ]


def profession_rows(before: dict, after: dict) -> list[dict]:
    """Per profession: group, signed and absolute bias before and after."""
    rows = []
    for p, b in before["per_profession"].items():
        a = after["per_profession"][p]
        rows.append(
            {
                "profession": p,
                "group": b["bias_group"],
                "before": b["abs_diff"],
                "after": a["abs_diff"],
                "signed_before": b["signed_diff"],
                "signed_after": a["signed_diff"],
            }
        )
    return rows


def plot_sweep(rows: dict[str, list[dict]], base: dict) -> dict[str, bytes]:
    """bias_vs_n.png and collateral_vs_n.png (PNG bytes by file name)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for m, rs in rows.items():
        ax.plot([x["n"] for x in rs], [x["bias_total"] for x in rs], marker="o", label=m)
    ax.axhline(base["bias"]["total"]["mean"], color="grey", ls="--", label="base")
    ax.set(
        xscale="log",
        xlabel="neurons zeroed (N)",
        ylabel="bias: mean |dlogp| (eval templates)",
        title="gender bias vs N",
    )
    ax.legend()
    out = {"bias_vs_n.png": png(fig)}
    keys = [
        ("perplexity", "XSum perplexity", base["perplexity"]),
        ("arithmetic_acc", "1-digit arithmetic acc", base["arithmetic_acc"]),
        ("control_mean_change", "factual controls: mean dlogp", 0.0),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (k, label, ref) in zip(axes, keys):
        for m, rs in rows.items():
            ax.plot([x["n"] for x in rs], [x[k] for x in rs], marker="o", label=m)
        ax.axhline(ref, color="grey", ls="--")
        ax.set(xscale="log", xlabel="neurons zeroed (N)", title=label)
    axes[0].legend()
    out["collateral_vs_n.png"] = png(fig)
    return out


def _heldout_lines(st: dict) -> list[str]:
    """The held-out StereoSet table: SS (50 = no stereotype preference), LMS, ICAT, before and after."""
    if not st:
        return []

    def ci(r: dict, k: str) -> str:
        lo, hi = r[f"{k}_ci95"]
        return f"{r[k]:.1f} [{lo:.1f}, {hi:.1f}]"

    rows = []
    for kind, pair in st.items():
        rows += [[kind, name, ci(r, "ss"), ci(r, "lms"), ci(r, "icat"), r["n"]] for name, r in pair.items()]
    return [
        "## Held out: StereoSet intrasentence (never used for selection)",
        "",
        rep.md_table(["bias type", "model", "SS [95% CI]", "LMS [95% CI]", "ICAT [95% CI]", "items"], rows),
        "",
        "SS: % of items preferring the stereotype over the anti-stereotype (50 = none); LMS: % of comparisons "
        "preferring a meaningful over the unrelated sentence; ICAT = LMS x min(SS, 100 - SS) / 50.",
        "",
    ]


def markdown(d: dict) -> str:
    """report.md: the headline (Table 13 form), methods at N, neurons (Table 12 form), sweep, collateral."""
    c, res = d["config"], d["results"]
    n, m = c["neurons"], c["method"]
    lines = [
        f"# surgery debias: {d['model']['name']}, {m}, N={n}, edit {c['edit']}",
        "",
        f"Command: `{d['command']}`",
        "",
        f"Selection templates ({len(res['selection']['templates'])}, never evaluated on): "
        + "; ".join(f"`{t}`" for t in res["selection"]["templates"]),
        "",
        f"Evaluation templates ({len(res['eval_templates'])}, disjoint): "
        + "; ".join(f"`{t}`" for t in res["eval_templates"]),
        "",
        "## Bias on the evaluation templates (Table 13 form)",
        "",
        rep.md_table(
            ["group", "before", "after", "reduction", "pairs"],
            [[r["group"], r["before"], r["after"], f"{100 * r['reduction']:.1f}%", r["n"]] for r in res["bias_table"]],
        ),
        "",
        f"## Methods at N={n}",
        "",
        _methods_table(res),
        "",
        f"## Selected neurons ({m}; Table 12 form)",
        "",
        rep.md_table(
            ["neuron", "score", "coef woman", "coef man", "top tokens"],
            [
                [r["neuron"], r["score"], r["coef_woman"], r["coef_man"], " ".join(repr(t) for t in r["top_tokens"])]
                for r in res["neurons"]
            ],
        ),
        "",
        *_heldout_lines(res.get("heldout", {}).get("stereoset", {})),
        "## Sweep over N (bias and collateral; hook zeroing)",
        "",
        _sweep_table(res["sweep"]),
        "",
        "![bias vs N](bias_vs_n.png)",
        "",
        "![collateral vs N](collateral_vs_n.png)",
        "",
        "## Factual controls (must keep their answers)",
        "",
        rep.md_table(
            ["prompt", "answer", "before", "after", "change"],
            [[r["prompt"], r["continuation"], r["before"], r["after"], r["change"]] for r in res["controls"]],
        ),
        "",
        "## Per profession (mean |dlogp| over evaluation templates)",
        "",
        rep.md_table(
            ["profession", "group", "before", "after", "signed before", "signed after"],
            [
                [r["profession"], r["group"], r["before"], r["after"], r["signed_before"], r["signed_after"]]
                for r in res["per_profession"]
            ],
        ),
        "",
        f"Weight edit vs hook zeroing: max |logit diff| {res['edit_check']:.2e}. Time {d['timing']['seconds']:.0f} s.",
    ]
    return "\n".join(lines)


def _methods_table(res: dict) -> str:
    base = res["base"]
    rows = [
        [
            "base (no edit)",
            base["bias_total"],
            base["bias_woman"],
            base["bias_man"],
            "",
            base["perplexity"],
            base["arithmetic_acc"],
            "",
            _wino(res["wino"].get("base")),
        ]
    ]
    for m, r in res["at_n"].items():
        rows.append(
            [
                m,
                r["bias_total"],
                r["bias_woman"],
                r["bias_man"],
                f"{100 * r['reduction']:.1f}%",
                r["perplexity"],
                r["arithmetic_acc"],
                r["control_mean_change"],
                _wino(res["wino"].get(m)),
            ]
        )
    return rep.md_table(
        [
            "method",
            "bias total",
            "woman-biased",
            "man-biased",
            "reduction",
            "perplexity",
            "arith acc",
            "controls dlogp",
            "Wino pro-stereo rate",
        ],
        rows,
    )


def _wino(w: dict | None) -> str:
    return f"{w['pro_rate']:.3f} (n={w['n']})" if w else "-"


def _sweep_table(sw: dict[str, list[dict]]) -> str:
    rows = [
        [
            m,
            r["n"],
            r["bias_total"],
            f"{100 * r['reduction']:.1f}%",
            r["perplexity"],
            r["arithmetic_acc"],
            r["control_mean_change"],
            r["control_min_change"],
        ]
        for m, rs in sw.items()
        for r in rs
    ]
    return rep.md_table(
        [
            "method",
            "N",
            "bias total",
            "reduction",
            "perplexity",
            "arith acc",
            "controls mean dlogp",
            "controls min dlogp",
        ],
        rows,
    )


# ---- the command ----------------------------------------------------------------------------------------------------
def run(
    *,
    model: str,
    dtype: str,
    device: str,
    out: str | None,
    force: bool,
    export: str | None,
    quick: bool,
    overrides: Sequence[str],
    recipe: str,
    neurons: int | None,
    method: str | None,
    edit: str | None,
    profile: str | None,
    trust_remote_code: bool,
) -> rep.Report:
    """`surgery debias` (its options and help: this package's __init__.py)."""
    r = load_recipe(recipe, overrides, quick, profile, neurons=neurons, method=method, edit=edit)
    exports = parse_exports(export)
    run = Run("debias", out, force, default=f"debias-{r.method}-{r.neurons}")
    loaded = load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    view, tok = ModelView(loaded.model), loaded.tokenizer
    layers = parse_layers(None if r.layers == "all" else r.layers, view.n_layers)
    check_neurons(r, view, layers)
    removing = r.edit == "remove"
    check_planned(loaded.model, exports, per_layer=removing, multiple=PAD_MULTIPLE if removing else None)
    professions = list(r.professions or gb.PROFESSIONS)
    methods = list(dict.fromkeys([r.method, *r.sweep.methods]))
    sel = select_all(view, tok, r, layers, professions, methods)
    data = eval_data(tok, r, professions)
    base = evaluate_point(loaded.model, tok, [], data)
    points = sweep(loaded.model, tok, sel.scores, [*r.sweep.ns, r.neurons], data)
    wino = {"base": wino_point(loaded.model, tok, [], data)}
    wino.update({m: wino_point(loaded.model, tok, top_n(sel.scores[m], r.neurons), data) for m in sel.scores})
    chosen = top_n(sel.scores[r.method], r.neurons)
    table = neuron_rows(view, tok, chosen, sel, r.method)  # before the edit: top tokens read the value vectors
    before = heldout(loaded.model, tok, r)  # before edit_and_check edits the weights in place
    edited, check = edit_and_check(loaded.model, tok, chosen, r.edit, data.bias["prompt"][:16])
    results = _results(r, sel, base, points, wino, table, check, professions)
    after = heldout(edited, tok, r)
    results["heldout"] = {"stereoset": {k: {"before": before[k], "after": after[k]} for k in before}}
    cmd = _command(model, recipe, r, "quick" if quick else profile, overrides, run.out)
    config = {
        **recipes.to_dict(r),
        "model": model,
        "quick": quick,
        "profile": profile,
        "selection_layers": [layers[0], layers[-1]],
    }
    data_ = rep.make(cmd, loaded.describe(), config, results, run.elapsed())
    return _export(loaded, edited, r, chosen, data_, run.out, force, exports)


def heldout(model: nn.Module, tok, r: DebiasRecipe) -> dict:
    """StereoSet SS / LMS / ICAT (95% bootstrap intervals) of `model`, per bias type of the recipe."""
    limit, seed = r.heldout.stereoset_limit, r.seed
    return {kind: stereoset.evaluate(model, tok, kind, r.batch_size, limit, seed=seed) for kind in r.heldout.stereoset}


def _results(
    r: DebiasRecipe,
    sel: Selection,
    base: dict,
    points: dict,
    wino: dict,
    table: list[dict],
    check: float,
    professions: list[str],
) -> dict:
    after = points[(r.method, r.neurons)]
    rows = {m: [summary(points[(m, n)], base) for n in sorted({*r.sweep.ns, r.neurons})] for m in sel.scores}
    base_row = summary(base, base)
    at_n = {m: summary(points[(m, r.neurons)], base) for m in sel.scores}
    return {
        "selection": {
            "templates": sel.templates,
            "professions": professions,
            "cna": sel.cna,
            "target": r.target,
            "orientation": r.orientation,
            "layers": r.layers,
        },
        "eval_templates": list(gb.template_set(r.eval_templates)[1]),
        "bias_before": base["bias"],
        "bias_after": after["bias"],
        "bias_table": bias_table(base["bias"], after["bias"]),
        "per_profession": profession_rows(base["bias"], after["bias"]),
        "neurons": table,
        "base": base_row,
        "at_n": at_n,
        "sweep": rows,
        "wino": wino,
        "collateral": {
            "before": {k: base[k] for k in ("perplexity", "arithmetic_acc", "arithmetic_n")},
            "after": {k: after[k] for k in ("perplexity", "arithmetic_acc", "arithmetic_n")},
        },
        "controls": control_changes(base["controls"], after["controls"]),
        "edit_check": check,
    }


def _command(model: str, recipe: str, r: DebiasRecipe, profile: str | None, overrides: Sequence[str], out: Path) -> str:
    parts = [
        "surgery debias",
        f"--model {model}",
        f"--recipe {recipe}",
        f"--neurons {r.neurons}",
        f"--method {r.method}",
        f"--edit {r.edit}",
        *([f"--profile {profile}"] if profile else []),
        *[f"--set {o}" for o in overrides],
        f"--out {out}",
    ]
    return " ".join(parts)


def _export(
    loaded,
    edited: nn.Module,
    r: DebiasRecipe,
    chosen: list[Neuron],
    data: dict,
    outdir: Path,
    force: bool,
    exports: Sequence[Export] = (),
) -> rep.Report:
    """Write the checkpoint (zeroed: native; remove: sliced) with report.json, report.md and the plots inside."""
    md = markdown(data)
    pngs = plot_sweep(data["results"]["sweep"], _base_point(data))
    groups = by_layer(chosen)
    prov = {
        "operation": "debias",
        "recipe": data["config"],
        "method": r.method,
        "seed": r.seed,
        "neurons": [neuron_name(l, i) for l, i in chosen],
        "base": {"id": loaded.name, "source": loaded.source},
        "layers": {str(l): {"edited": idx, "edit": r.edit} for l, idx in groups.items()},
    }
    if r.edit == "remove":
        prov["layers"] = {
            str(l): {"kept": edited.surgery_kept[l], "removed": idx, "edit": "remove"} for l, idx in groups.items()
        }
    extra = {"report.json": rep.json_text(data), "report.md": md + "\n", **pngs}
    export.save(
        edited,
        loaded.tokenizer,
        outdir,
        layout="zeroed" if r.edit == "zero" else "sliced",
        provenance=prov,
        force=force,
        extra_files=extra,
        base=loaded.source,
        exports=exports,
    )
    files = [outdir / name for name in extra]
    return rep.Report(data, md, files=files)


def _base_point(data: dict) -> dict:
    b = data["results"]["base"]
    return {
        "bias": {"total": {"mean": b["bias_total"]}},
        "perplexity": b["perplexity"],
        "arithmetic_acc": b["arithmetic_acc"],
    }
