"""One edit of `surgery edit` as a cell: what is chosen on the selection pairs, how it is applied while measuring
(hooks), how it is written into the weights (fold), and what it does on data it never saw (measure).

A cell is (method, edit, budget[, scale]):
- neuron edits (zero | scale | remove): `method` is a contrast selector (cna, cna-specific, activation-diff,
  random) and `budget` the number of neurons; `scale` None with edit scale means "chosen on the validation
  pairs" from SCALE_GRID: the smallest validation gap among the scales whose perplexity on the GUARD_DOCS
  validation XSum documents (never the evaluation documents) rises by at most GUARD_PPL, else the scale that
  raises it least (a gap closed by breaking the model is not a choice);
- representation edits (`surgery.edits.directions`: leace | project | steer | random-project): `budget` is the
  number of layers, the ones whose A/B outputs separate most on the fit pairs; steer's alpha is chosen on the
  validation pairs from ALPHA_GRID, with the same guard.
Nothing is chosen on the held-out pairs, the keep-data evaluation part or StereoSet: those only measure.
"""

from __future__ import annotations

import random
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Sequence

from surgery.edits import directions
from surgery.edits.neurons import edit_weights, scaled
from surgery.evals import perplexity, stereoset, tasks
from surgery.find.neurons import Neuron, top_n
from surgery.io.report import mcnemar
from surgery.model.arch import ModelView
from surgery.model.batching import pad_id

NEURON_EDITS = ("zero", "scale", "remove")
EDITS = (*NEURON_EDITS, *directions.METHODS)
SCALE_GRID = (-1.0, -0.5, 0.0, 0.5)  # edit scale with --scale auto: candidates, chosen on validation pairs
ALPHA_GRID = (0.5, 1.0, 2.0)  # steer: multiples of the mean A - B difference, chosen on validation pairs
RESAMPLES = 1000
GUARD_DOCS, GUARD_TOKENS, GUARD_PPL = 4, 128, 0.05  # validation text for choosing a scale / alpha: +5% at most


@dataclass(frozen=True)
class Cell:
    method: str  # contrast selector (neuron edits); the edit's own name for representation edits
    edit: str
    budget: int  # neurons, or layers
    scale: float | None = None  # edit scale: the factor; None: chosen on the validation pairs

    @property
    def name(self) -> str:
        if self.edit in directions.METHODS:
            return f"{self.edit}@{self.budget}L"
        s = "" if self.edit != "scale" else f"x{'auto' if self.scale is None else f'{self.scale:g}'}"
        return f"{self.method}-{self.edit}{s}@{self.budget}"

    @property
    def control(self) -> bool:
        return self.method == "random" or self.edit == "random-project"


@dataclass
class Applied:
    """A cell made concrete: the neurons and factor, or the per-layer affine maps, and what validation chose."""

    cell: Cell
    neurons: list[Neuron] = field(default_factory=list)
    factor: float = 0.0
    affines: list[directions.Affine] = field(default_factory=list)
    chosen: dict = field(default_factory=dict)

    def hooks(self, model):
        if self.cell.edit in directions.METHODS:
            return directions.hooked(ModelView(model), self.affines)
        return scaled(model, self.neurons, self.factor)

    def fold(self, model) -> None:
        """The same edit written into `model`'s weights, in place."""
        if self.cell.edit in directions.METHODS:
            directions.fold(model, self.affines)
        else:
            edit_weights(model, self.neurons, self.cell.edit, inplace=True, factor=self.factor)

    def describe(self) -> dict:
        out = {"cell": self.cell.name, **self.chosen}
        if self.affines:
            out["layers"] = directions.describe(self.affines)
        else:
            out["neurons"] = len(self.neurons)
        return out


@dataclass
class Fit:
    """What cells are chosen from: the selection pairs' scores and outputs, and the validation pairs."""

    view: ModelView
    tok: object
    pairs: object  # selection pairs (Dataset)
    validation: object  # pairs to choose a scale / alpha on (the validation split, else the selection pairs)
    layers: list[int]
    scores: dict  # {selector: {layer: [N]}}
    batch_size: int = 32
    seed: int = 0
    outputs: tuple | None = None  # (A outputs, B outputs) per layer, computed once on first use
    guard: object | None = None  # validation XSum documents (after the evaluation ones), for the scale guard
    guard_base: float | None = None  # their perplexity without an edit

    def guard_ppl(self, applied: "Applied | None") -> float:
        with applied.hooks(self.view.model) if applied is not None else nullcontext():
            return perplexity.perplexity(self.view.model, self.tok, self.guard, GUARD_TOKENS, 8, progress=False)["ppl"]

    def ffn_outputs(self) -> tuple[dict, dict]:
        if self.outputs is None:
            pad = pad_id(self.tok)
            a = [self.tok(p).input_ids for p in self.pairs["prompt_a"]]
            b = [self.tok(p).input_ids for p in self.pairs["prompt_b"]]
            self.outputs = (
                directions.ffn_outputs(self.view, a, self.layers, pad, self.batch_size),
                directions.ffn_outputs(self.view, b, self.layers, pad, self.batch_size),
            )
        return self.outputs


def realize(fit: Fit, cell: Cell) -> Applied:
    """Choose what `cell` edits (and any scale / alpha on the validation pairs)."""
    if cell.edit in directions.METHODS:
        ya, yb = fit.ffn_outputs()
        layers = directions.choose_layers(ya, yb, cell.budget)
        if cell.edit != "steer":
            affines = directions.fit(fit.view, cell.edit, ya, yb, layers, seed=fit.seed)
            return Applied(cell, affines=affines, chosen={"layers_chosen": layers})
        options = {
            a: Applied(cell, affines=directions.fit(fit.view, "steer", ya, yb, layers, alpha=a)) for a in ALPHA_GRID
        }
        best, table = _choose(fit, options, prefer=lambda a: a)  # ties: the smaller alpha
        return Applied(
            cell, affines=options[best].affines, chosen={"layers_chosen": layers, "alpha": best, "validation": table}
        )
    neurons = top_n(fit.scores[cell.method], cell.budget)
    if cell.edit != "scale":
        return Applied(cell, neurons=neurons)
    if cell.scale is not None:
        return Applied(cell, neurons=neurons, factor=float(cell.scale))
    options = {s: Applied(cell, neurons=neurons, factor=s) for s in SCALE_GRID}
    best, table = _choose(fit, options, prefer=lambda s: -s)  # ties: the gentler scale
    return Applied(cell, neurons=neurons, factor=best, chosen={"scale": best, "validation": table})


def _choose(fit: Fit, options: dict, prefer) -> tuple[float, dict]:
    """The option with the smallest validation gap among those within the perplexity guard (else the one that
    raises the guard perplexity least), and the table it was chosen from."""
    if fit.guard is not None and fit.guard_base is None:
        fit.guard_base = fit.guard_ppl(None)
    table = {}
    for key, applied in options.items():
        row = {"gap": _validation_gap(fit, applied)}
        if fit.guard is not None:
            row["guard_ppl_change"] = fit.guard_ppl(applied) / fit.guard_base - 1
        table[key] = row
    ok = [k for k, r in table.items() if r.get("guard_ppl_change", 0.0) <= GUARD_PPL]
    if ok:
        best = min(ok, key=lambda k: (round(table[k]["gap"], 6), prefer(k)))
    else:
        best = min(table, key=lambda k: (table[k]["guard_ppl_change"], prefer(k)))
    return best, table


def _validation_gap(fit: Fit, applied: Applied) -> float:
    with applied.hooks(fit.view.model):
        gaps = tasks.pair_gaps(fit.view.model, fit.tok, fit.validation, fit.batch_size)
    return sum(map(abs, gaps)) / len(gaps)


@dataclass
class Measures:
    """The data every cell is measured on (none of it chooses anything)."""

    test: object  # held-out pairs
    keep: object | None = None  # keep-data evaluation cases
    docs: object | None = None  # XSum documents
    ppl_tokens: int = 128
    extra: object | None = None  # --eval-data pairs
    stereoset: Sequence[str] = ()
    stereoset_limit: int | None = None
    batch_size: int = 32
    seed: int = 0


def measure(model, tok, applied: Applied | None, m: Measures) -> dict:
    """Held-out gap (per pair and table), keep-data table and per-row correctness, XSum perplexity (per
    document), --eval-data gaps and StereoSet, with `applied` hooked in (None: the unedited model)."""
    bs = m.batch_size
    with applied.hooks(model) if applied is not None else nullcontext():
        gaps = tasks.pair_gaps(model, tok, m.test, bs)
        out: dict = {"gap": tasks.gap_table(m.test, gaps), "gaps": gaps}
        if m.keep is not None:
            rows = tasks.score_rows(model, tok, m.keep, bs)
            out["keep"] = tasks.table(m.keep, rows)
            out["keep_correct"] = rows["correct"]
        if m.docs is not None:
            out["perplexity_docs"] = perplexity.perplexity(
                model, tok, m.docs, m.ppl_tokens, batch_size=8, progress=False
            )
            out["perplexity"] = out["perplexity_docs"]["ppl"]
        if m.extra is not None:
            g = tasks.pair_gaps(model, tok, m.extra, bs)
            out["eval_data"] = {"gap": tasks.gap_table(m.extra, g), "gaps": g}
        if m.stereoset:
            out["stereoset"] = {
                t: stereoset.evaluate(model, tok, t, bs, m.stereoset_limit, seed=m.seed) for t in m.stereoset
            }
    return out


def changes(before: dict, after: dict, seed: int = 0) -> dict:
    """Paired changes of `after` against `before` on the same items, with 95% intervals: the held-out gap's
    reduction (bootstrap over pairs), the XSum perplexity ratio (bootstrap over documents), the keep-data
    accuracy (McNemar), and StereoSet's SS / LMS moves."""
    out: dict = {"gap_reduction": _reduction(before["gaps"], after["gaps"], seed)}
    if "eval_data" in before:
        out["eval_data_reduction"] = _reduction(before["eval_data"]["gaps"], after["eval_data"]["gaps"], seed)
    if "perplexity_docs" in before:
        out["perplexity_change"] = _ppl_ratio(before["perplexity_docs"], after["perplexity_docs"], seed)
    if "keep_correct" in before:
        out["keep"] = mcnemar(before["keep_correct"], after["keep_correct"])
    return out


def _reduction(b: Sequence[float], a: Sequence[float], seed: int) -> dict:
    """1 - mean|gap after| / mean|gap before| over the same pairs, with a percentile bootstrap interval."""
    b, a = [abs(x) for x in b], [abs(x) for x in a]
    point = 1 - sum(a) / sum(b) if sum(b) else 0.0
    rng = random.Random(seed)
    draws = []
    for _ in range(RESAMPLES):
        ix = [rng.randrange(len(b)) for _ in b]
        sb = sum(b[i] for i in ix)
        draws.append(1 - sum(a[i] for i in ix) / sb if sb else 0.0)
    draws.sort()
    return {"value": point, "ci95": [draws[int(0.025 * RESAMPLES)], draws[int(0.975 * RESAMPLES) - 1]]}


def _ppl_ratio(b: dict, a: dict, seed: int) -> dict:
    """ppl(after) / ppl(before) - 1 over the same documents, with a paired bootstrap interval over documents."""
    import math

    nb, na, toks = b["doc_nll"], a["doc_nll"], b["doc_tokens"]

    def ratio(ix):
        t = sum(toks[i] for i in ix)
        return math.exp((sum(na[i] for i in ix) - sum(nb[i] for i in ix)) / t) - 1

    rng = random.Random(seed)
    draws = sorted(ratio([rng.randrange(len(nb)) for _ in nb]) for _ in range(RESAMPLES))
    return {"value": ratio(range(len(nb))), "ci95": [draws[int(0.025 * RESAMPLES)], draws[int(0.975 * RESAMPLES) - 1]]}


def slim(point: dict) -> dict:
    """A measurement without its per-item lists (what report.json keeps per cell besides the changes)."""
    out = {k: v for k, v in point.items() if k not in ("gaps", "keep_correct", "perplexity_docs")}
    if "eval_data" in out:
        out["eval_data"] = {"gap": out["eval_data"]["gap"]}
    return out
