"""Neuron selectors: ONE registry from a name to a function that scores every FFN neuron of the chosen layers.

Two kinds, by what the selection is about:
- "task": cases whose last position predicts a target token (prune keeps the highest-scoring neurons);
- "contrast": pairs of prompts A/B and a target per pair (debias removes the neurons behind the A/B difference).

    scores = selectors.score("task", "taylor", Inputs(view, layers, pad, seqs=..., targets=...))
    # {layer: [N] tensor on the CPU}; higher = keep (task) / edit (contrast)


`prune --selector`, its baselines, `debias --method` and the CLI's choices all read `names(kind)`. A new selector
is one function decorated with `@register(kind, name)`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from surgery.errors import UsageError
from surgery.find.cna import Scorer, Workspace, collect, scan
from surgery.find.neurons import by_layer, mean_coefficients, random_scores, top_n
from surgery.model.arch import ModelView
from surgery.model.batching import batches, device_of, left_pad, position_ids
from surgery.model.hooks import Hooks

Scores = dict[int, Tensor]


@dataclass
class Inputs:
    """What a selector may read. Task kind: `seqs` + `targets` (the correct next token of each case), and for
    CNA the tuned `reference` model. Contrast kind: `seqs` (A) and `seqs_b` (B) paired, `targets` per pair."""

    view: ModelView  # the model whose neurons are scored
    layers: list[int]
    pad: int
    seqs: list[list[int]] = field(default_factory=list)
    targets: list[int] | None = None
    seqs_b: list[list[int]] | None = None
    reference: ModelView | None = None
    seed: int = 0
    batch_size: int = 16
    candidates: int = 128  # contrast CNA: screened neurons rescored exactly in every pair
    keep_seqs: list[list[int]] | None = None  # contrast cna-specific: behaviour that must not move (contexts)
    keep_targets: list[int] | None = None  # ... and the token each keep context predicts
    keep_weight: float = 1.0  # cna-specific: lambda, the weight of the keep importance
    info: dict = field(default_factory=dict)  # a selector may report how it selected (e.g. CNA certification)


Selector = Callable[[Inputs], Scores]
REGISTRY: dict[str, dict[str, Selector]] = {"task": {}, "contrast": {}}


def register(kind: str, name: str) -> Callable[[Selector], Selector]:
    def add(fn: Selector) -> Selector:
        REGISTRY[kind][name] = fn
        return fn

    return add


def names(kind: str) -> tuple[str, ...]:
    return tuple(REGISTRY[kind])


def known(kind: str) -> Callable[[], tuple[str, ...]]:
    """The names of `kind` as read at check time (recipe rules and the CLI accept selectors registered later)."""
    return lambda: names(kind)


def score(kind: str, name: str, inputs: Inputs) -> Scores:
    """Scores {layer: [N]} of selector `name` of `kind`, or one error listing the known ones."""
    if name not in REGISTRY[kind]:
        raise UsageError(f"unknown {kind} selector {name!r}; use one of {', '.join(names(kind))}")
    return REGISTRY[kind][name](inputs)


def by_budget(scores: Scores, budget: dict[int, int]) -> dict[int, list[int]]:
    """The budget[l] highest-scoring neurons of each layer (sorted indices): every selector at the same
    per-layer budget."""
    return {l: sorted(scores[l].float().topk(n).indices.tolist()) if n else [] for l, n in budget.items()}


# ---- task selectors ----------------------------------------------------------------------------------------
@register("task", "random")
@register("contrast", "random")
def _random(inp: Inputs) -> Scores:
    """Seeded uniform scores: a uniform random subset (the paper's random baseline)."""
    return random_scores(inp.view, inp.layers, inp.seed)


@register("task", "magnitude")
@torch.no_grad()
def magnitude(inp: Inputs) -> Scores:
    """prod ||key rows|| * ||value vector|| per neuron (gate and up both count for gated FFNs); no data."""
    out = {}
    for l in inp.layers:
        s = inp.view.values(l).float().norm(dim=1)
        for k in inp.view.keys(l):
            s = s * k.float().norm(dim=1)
        out[l] = s.cpu()
    return out


@register("task", "activation")
def activation(inp: Inputs) -> Scores:
    """Mean |m_k| at the answer position over the task cases."""
    return mean_coefficients(inp.view, inp.seqs, inp.layers, inp.pad, absolute=True)


def _grad_times_m(
    inp: Inputs, objective: Callable[[Tensor, Tensor], Tensor]
) -> Iterator[tuple[int, Tensor, Tensor, Tensor]]:
    """Per batch of task cases and layer: (layer, m [B, T, N], d objective / d m [B, T, N], mask [B, T]) for
    objective(last-position logits [B, V], targets [B]) summed over the batch: one forward + backward per batch."""
    view, dev = inp.view, device_of(inp.view.model)
    for idx in batches(len(inp.seqs), inp.batch_size):
        ids, mask = (t.to(dev) for t in left_pad([inp.seqs[i] for i in idx], inp.pad))
        with torch.enable_grad(), Hooks(view) as h:
            h.capture("m", layers=inp.layers, positions=None, keep_grad=True)  # a slice would not be on the graph
            logits = (
                view.model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=position_ids(mask),
                    logits_to_keep=1,
                    use_cache=False,
                )
                .logits[:, -1]
                .float()
            )
            tgt = torch.tensor([inp.targets[i] for i in idx], device=dev)
            ms = [h.store["m", l] for l in inp.layers]
            grads = torch.autograd.grad(objective(logits, tgt), ms)
        for l, m, g in zip(inp.layers, ms, grads):
            yield l, m.detach(), g, mask


@register("task", "taylor")
def taylor(inp: Inputs) -> Scores:
    """Mean |m_k * dL/dm_k| at the answer position over the task cases, L = cross-entropy of the answer token."""
    sums = {l: torch.zeros(inp.view.ffn_width(l)) for l in inp.layers}
    ce = lambda z, t: nn.functional.cross_entropy(z, t, reduction="sum")  # noqa: E731
    for l, m, g, _ in _grad_times_m(inp, ce):
        sums[l] += (m[:, -1] * g[:, -1]).float().abs().sum(0).cpu()
    return {l: s / len(inp.seqs) for l, s in sums.items()}


@register("task", "total-effect")
def total_effect(inp: Inputs) -> Scores:
    """Mean m_k * d log p(answer) / d m_k over the task cases (signed, through every later layer): the first-order
    change of the answer log-prob when neuron k is removed, direct AND indirect paths. CNA scores only the
    direct path (the neuron's value vector read out through the frozen final norm)."""
    sums = {l: torch.zeros(inp.view.ffn_width(l)) for l in inp.layers}
    logp = lambda z, t: z.log_softmax(-1).gather(1, t[:, None]).sum()  # noqa: E731
    for l, m, g, mask in _grad_times_m(inp, logp):  # m_k's effect at every position of the prompt
        sums[l] += (m * g * mask[..., None]).float().sum((0, 1)).cpu()
    return {l: s / len(inp.seqs) for l, s in sums.items()}


def token_coefficients(inp: Inputs) -> tuple[Scores, Scores, int]:
    """Per neuron, the sum and the sum of squares of m_k over EVERY real token of the task prompts (the
    calibration statistics of Wanda and FLAP), and the token count."""
    view, dev = inp.view, device_of(inp.view.model)
    s1 = {l: torch.zeros(view.ffn_width(l), dtype=torch.float64) for l in inp.layers}
    s2 = {l: torch.zeros(view.ffn_width(l), dtype=torch.float64) for l in inp.layers}
    n = 0
    for idx in batches(len(inp.seqs), inp.batch_size):
        ids, mask = left_pad([inp.seqs[i] for i in idx], inp.pad)
        with torch.no_grad(), Hooks(view) as h:
            h.capture("m", layers=inp.layers, positions=None)
            view.model(
                input_ids=ids.to(dev),
                attention_mask=mask.to(dev),
                position_ids=position_ids(mask).to(dev),
                logits_to_keep=1,
                use_cache=False,
            )
        on = mask.bool()
        n += int(on.sum())
        for l in inp.layers:
            m = h.store["m", l].cpu().double()[on]  # [tokens, N]
            s1[l] += m.sum(0)
            s2[l] += (m * m).sum(0)
    return s1, s2, n


@register("task", "wanda")
def wanda(inp: Inputs) -> Scores:
    """Wanda, structured for FFN neurons: ||v_k|| * ||m_k||, the value vector's norm times the L2 norm of the
    neuron's coefficient over the calibration tokens (Sun et al. 2024's |W| * ||X|| with a neuron's column)."""
    _, s2, _ = token_coefficients(inp)
    return {l: (inp.view.values(l).float().norm(dim=1).cpu() * s2[l].sqrt().float()) for l in inp.layers}


@register("task", "flap")
def flap(inp: Inputs) -> Scores:
    """FLAP's fluctuation metric (An et al. 2024): the sample variance of m_k over the calibration tokens times
    ||v_k||^2: a neuron whose output barely varies can be replaced by its mean (bias compensation)."""
    s1, s2, n = token_coefficients(inp)
    out = {}
    for l in inp.layers:
        var = (s2[l] - s1[l] * s1[l] / n) / max(n - 1, 1)
        out[l] = var.clamp(min=0).float() * inp.view.values(l).float().norm(dim=1).cpu() ** 2
    return out


@register("task", "cna")
def cna_task(inp: Inputs) -> Scores:
    """CNA (the paper): importance in the tuned `reference` minus importance in the model, summed over cases
    (each case's top-k exact, the rest by certified-bound midpoints); without a reference, importance alone.
    info["aggregate"] = "abs" sums the per-case magnitudes instead (as `cna.aggregate=abs` in prune)."""
    k = inp.info.get("exact_top", 100)
    sc = scan(
        inp.reference or inp.view,
        inp.seqs,
        inp.layers,
        k,
        inp.pad,
        view_b=inp.view if inp.reference is not None else None,
        targets=inp.targets,
        batch_size=inp.batch_size,
        max_rescore=inp.info.get("max_rescore", 2048),
    )
    inp.info["scan"] = sc
    return sc.total_abs if inp.info.get("aggregate", "sum") == "abs" else sc.total


# ---- contrast selectors ------------------------------------------------------------------------------------
@register("contrast", "activation-diff")
def activation_diff(inp: Inputs) -> Scores:
    """|mean m_k(A) - mean m_k(B)| per neuron, at the last position."""
    a = mean_coefficients(inp.view, inp.seqs, inp.layers, inp.pad, inp.batch_size)
    b = mean_coefficients(inp.view, inp.seqs_b, inp.layers, inp.pad, inp.batch_size)
    return {l: (a[l] - b[l]).abs() for l in inp.layers}


@register("contrast", "cna")
def cna_contrast(inp: Inputs) -> Scores:
    """Summed CNA deltas imp(A) - imp(B) per neuron over all pairs (each prompt with its own sigma, both with
    the pair's target).

    Pass 1 screens every neuron with the first-order score (O(N d) per pair) summed over pairs; pass 2 rescores
    the top `candidates` of that screen exactly (the paper's score) in every pair. The returned sums are exact
    for the candidates and first-order elsewhere, so the top N (N <= candidates) are ranked by exact sums."""
    view, layers = inp.view, inp.layers
    fo = {l: torch.zeros(view.ffn_width(l)) for l in layers}
    for a, b in _pair_scorers(inp, layers, "cna screen"):
        for l in layers:
            fo[l] += (a.first_order(l) - b.first_order(l)).sum(0)
    cand = by_layer(top_n(fo, min(inp.candidates, sum(len(v) for v in fo.values()))))
    exact = {l: torch.zeros(len(idx)) for l, idx in cand.items()}
    for a, b in _pair_scorers(inp, sorted(cand), "cna exact"):
        for l, idx in cand.items():
            i = torch.tensor(idx)
            rows = a.shared_rows(l, i)  # one model: the rows serve both prompts
            exact[l] += (a.exact_same(l, i, rows) - b.exact_same(l, i, rows)).sum(0)
    total = copy.deepcopy(fo)
    for l, idx in cand.items():
        total[l][idx] = exact[l]
    screen = torch.cat([fo[l][idx] for l, idx in cand.items()])
    ex = torch.cat(list(exact.values()))
    inp.info["candidate_neurons"] = cand  # {layer: [index]}: the neurons whose sums are exact
    inp.info.update(
        {
            "cases": len(inp.targets),
            "screen": "first-order",
            "rescored_exactly": len(ex),
            "screen_exact_corr": float(torch.corrcoef(torch.stack([screen, ex]))[0, 1]) if len(ex) > 1 else None,
        }
    )
    return total


@register("contrast", "cna-specific")
def cna_specific(inp: Inputs) -> Scores:
    """CNA on the pairs minus CNA on the keep cases: mean over pairs of imp(A) - imp(B) minus lambda times the mean
    over keep cases of |imp| for the keep target (`keep_weight`, default 1; both log-probability units per case).
    A neuron that moves A/B but also carries the keep behaviour ranks below one that moves A/B alone. Exact for
    the pair screen's candidates (both terms), first-order elsewhere, as `cna`."""
    if not inp.keep_seqs:
        raise UsageError("cna-specific needs the --keep-data cases (behaviour the edit must not move)")
    pair = cna_contrast(inp)
    n_pairs, n_keep = len(inp.targets), len(inp.keep_targets)
    layers = inp.layers
    cand = inp.info["candidate_neurons"]
    keep = {l: torch.zeros(inp.view.ffn_width(l)) for l in layers}
    for s in tqdm(range(0, n_keep, inp.batch_size), desc="cna keep", unit="batch"):
        w = torch.tensor(inp.keep_targets[s : s + inp.batch_size])
        st = collect(inp.view, *left_pad(inp.keep_seqs[s : s + inp.batch_size], inp.pad), layers)
        sc = Scorer(inp.view, st, inp.view.final_sigma(st.hfin), w, work=Workspace())
        for l in layers:
            fo = sc.first_order(l).abs().sum(0)
            if l in cand:
                i = torch.tensor(cand[l])
                fo[i] = sc.exact_same(l, i).abs().sum(0)
            keep[l] += fo
    inp.info.update({"keep_cases": n_keep, "keep_weight": inp.keep_weight})
    return {l: pair[l] / n_pairs - inp.keep_weight * keep[l] / n_keep for l in layers}


def _pair_scorers(inp: Inputs, layers: list[int], desc: str) -> Iterator[tuple[Scorer, Scorer]]:
    """(Scorer A, Scorer B) per batch of pairs: each prompt with its own sigma, both with the pair's target."""
    view, bs = inp.view, inp.batch_size
    for s in tqdm(range(0, len(inp.targets), bs), desc=desc, unit="batch"):
        w = torch.tensor(inp.targets[s : s + bs])
        sa = collect(view, *left_pad(inp.seqs[s : s + bs], inp.pad), layers)
        sb = collect(view, *left_pad(inp.seqs_b[s : s + bs], inp.pad), layers)
        work = Workspace()
        yield (
            Scorer(view, sa, view.final_sigma(sa.hfin), w, work=work),
            Scorer(view, sb, view.final_sigma(sb.hfin), w, work=work),
        )
