"""What an edit is chosen from and measured on: the pair file split into selection / validation / held-out parts,
the keep data (split when a selector reads it), the model with every blank target filled, and the selection
scores of every contrast selector needed (the engine `surgery debias` uses).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from surgery.commands.edit import cells
from surgery.edits.neurons import contrast_scores
from surgery.errors import UsageError
from surgery.evals import perplexity, tasks
from surgery.find.cna import parse_layers
from surgery.io.context import Run
from surgery.io.deploy import Export, check_planned
from surgery.io.loading import load_model
from surgery.model.arch import ModelView
from surgery.model.batching import pad_id
from surgery.model.slicing import PAD_MULTIPLE


@dataclass
class Prepared:
    """Everything a single edit or a comparison shares: the model, the split data and the selection scores."""

    loaded: object
    fit: cells.Fit
    measures: cells.Measures
    selection: dict
    duplicates: int
    eval_pairs: int
    shared_with_selection: int


def prepare(
    run_: Run,
    *,
    model: str,
    dtype: str,
    device: str,
    trust_remote_code: bool,
    pairs: str,
    columns: str | None,
    keep_data: str | None,
    keep_columns: str | None,
    eval_data: str | None,
    eval_columns: str | None,
    layers: str | None,
    tokens: str,
    test_size: float,
    seed: int,
    candidates: int,
    batch_size: int,
    ppl_docs: int,
    ppl_tokens: int,
    selectors_needed: Sequence[str],
    most_neurons: int,
    keep_test_size: float,
    bias_types: Sequence[str],
    stereoset_limit: int | None,
    exports: Sequence[Export] = (),
    per_layer: bool = False,
    needs_bias: bool = False,
) -> Prepared:
    """Load the data (one line for a bad file, before the model), the model, fill targets, split the keep data
    when a selector reads it, and score the selection pairs with every selector needed."""
    ds = tasks.load_pairs(pairs, columns)
    parts = tasks.split(ds, seed, test_size)
    tasks.require(parts, "train", "test")
    sel, test, val = parts["train"], parts["test"], parts["validation"]
    dup = tasks.warn_duplicates(sel, test, "prompt_a")
    keep = tasks.load_cases(keep_data, keep_columns) if keep_data is not None else None
    extra = tasks.load_pairs(eval_data, eval_columns) if eval_data is not None else None  # bad file: one line now
    specific = "cna-specific" in selectors_needed
    if specific and keep is None:
        raise UsageError("--method cna-specific needs --keep-data FILE (the behaviour the edit must not move)")
    keep_fit = None
    if specific:  # the keep data chooses too: only its held-out part measures the collateral
        kparts = tasks.split(
            keep.remove_columns("split") if "split" in keep.column_names else keep, seed, keep_test_size
        )
        keep_fit, keep = kparts["train"], kparts["test"]
    loaded = load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    view, tok = ModelView(loaded.model), loaded.tokenizer
    chosen_layers = parse_layers(layers, view.n_layers)
    total = sum(view.ffn_width(l) for l in chosen_layers)
    if most_neurons > total:
        raise UsageError(f"asked to edit {most_neurons} neurons but the selection layers hold only {total}")
    if needs_bias and not view.native_ffn_bias():
        raise UsageError(
            f"--edit steer folds a constant into the FFN output bias, which {view.config.model_type} has not; "
            "use --edit project or leace (no bias needed)"
        )
    check_planned(loaded.model, exports, per_layer=per_layer, multiple=PAD_MULTIPLE if per_layer else None)
    with run_.step("targets"):
        sel = tasks.fill_targets(loaded.model, tok, sel, batch_size)
        test = tasks.fill_targets(loaded.model, tok, test, batch_size)
        tasks.pair_ids(tok, test)  # every held-out target must tokenise after both prompts
        if len(val):
            val = tasks.fill_targets(loaded.model, tok, val, batch_size)
        if extra is not None:
            extra = tasks.fill_targets(loaded.model, tok, extra, batch_size)
            tasks.pair_ids(tok, extra)
    keep_seqs = keep_targets = None
    if keep_fit is not None:
        enc = tasks.encode(tok, keep_fit)
        keep_seqs = [ids[: len(ids) - k] for ids, k in enc]
        keep_targets = [ids[len(ids) - k] for ids, k in enc]
    with run_.step("select"):
        scores, info = select(
            view,
            tok,
            sel,
            chosen_layers,
            list(selectors_needed),
            tokens,
            seed,
            batch_size,
            max(candidates, most_neurons),
            keep_seqs=keep_seqs,
            keep_targets=keep_targets,
        )
    guard = perplexity.build(n_docs=ppl_docs + cells.GUARD_DOCS).select(
        range(ppl_docs, ppl_docs + cells.GUARD_DOCS)
    )  # validation text after the evaluation documents: chooses, never reports
    fit = cells.Fit(
        view, tok, sel, val if len(val) else sel, chosen_layers, scores, batch_size=batch_size, seed=seed, guard=guard
    )
    measures = cells.Measures(
        test=test,
        keep=keep,
        docs=perplexity.build(n_docs=ppl_docs) if ppl_docs else None,
        ppl_tokens=ppl_tokens,
        extra=extra,
        stereoset=list(bias_types),
        stereoset_limit=stereoset_limit,
        batch_size=batch_size,
        seed=seed,
    )
    selection = {
        "pairs": len(sel),
        "validation_pairs": len(val),
        "validation": "validation split" if len(val) else "selection pairs",
        "keep_fit_cases": len(keep_fit) if keep_fit is not None else 0,
        "tokens": tokens,
        "info": jsonable(info),
        "layers": [chosen_layers[0], chosen_layers[-1]],
    }
    shared = sum(p in set(sel["prompt_a"]) for p in extra["prompt_a"]) if extra is not None else 0
    return Prepared(loaded, fit, measures, selection, dup, len(test), shared)


def select(
    view: ModelView,
    tok,
    pairs,
    layers: list[int],
    methods: Sequence[str],
    tokens: str,
    seed: int,
    batch_size: int,
    candidates: int,
    keep_seqs: list[list[int]] | None = None,
    keep_targets: list[int] | None = None,
) -> tuple[dict, dict]:
    """Scores of every method on the selection pairs (the engine debias uses) and the first method's report."""
    pc = tasks.pair_cases(tok, pairs, tokens)
    prompts_a = [tok(p).input_ids for p in pairs["prompt_a"]]
    prompts_b = [tok(p).input_ids for p in pairs["prompt_b"]]
    scores, info = {}, {}
    for m in methods:
        scores[m], i = contrast_scores(
            view,
            layers,
            pad_id(tok),
            m,
            seqs_a=pc.seqs_a,
            seqs_b=pc.seqs_b,
            targets=pc.targets,
            prompts_a=prompts_a,
            prompts_b=prompts_b,
            seed=seed,
            batch_size=batch_size,
            candidates=candidates,
            keep_seqs=keep_seqs,
            keep_targets=keep_targets,
        )
        info = i if m == methods[0] else info
    return scores, info


def jsonable(info: dict) -> dict:
    return {k: v for k, v in info.items() if isinstance(v, (int, float, str, type(None)))}
