"""Activation patching, its attribution screen, and mean ablation: the engine behind `surgery circuit`.

A COMPONENT is (kind, layer, index, role): an attention head's output z_h (the o_proj input slice of head h),
an MLP's contribution F^l to the residual stream (after a post-FFN norm where the arch has one), or one FFN
neuron's coefficient m_k, at the token positions of a ROLE of the prompt: op1 (the tokens of the first operand),
operator, op2, last (the token the answer is read from). Role -1 means every position.

Patching (Nikankin et al., ICLR 2025). Clean prompt p with answer r, counterfactual p' with answer r' (same
token layout, so every role sits at the same positions). Run p, but take the component's activation from the run
on p'. With P the clean and P* the patched next-token distribution, the effect is their Eq. 1

    E = 1/2 [ (P*(r') - P(r')) / P(r')  +  (P(r) - P*(r)) / P*(r) ],


averaged over prompts.

Answer scoring. SmolLM2 writes one digit per token, so an answer is A >= 1 tokens. P(r) is the TEACHER-FORCED
probability of the whole answer, P(r) = prod_j P(r_j | p, r_<j), read from the positions of the '=' and of the
answer tokens before the last one, on the input p + r[:-1] (as the arithmetic suite scores every answer token).
P(r') likewise on p + r'[:-1]. So a pair runs as 2B rows, [p + r[:-1]; p + r'[:-1]], and its donor as
[p' + r[:-1]; p' + r'[:-1]]; a component patched at a role of the prompt (op1, operator, op2, last = the '=')
changes both continuations. With A = 1 (or "first answer token" scoring: r, r' cut to their first token) this
is the single-token case of the paper, B rows. Components are patched at prompt roles only; role -1 (every
position) also covers the answer positions, from the donor teacher-forced with the same answer.

Batched and exact: a component of layer l changes nothing below l, so the clean residual input of l is cached
once and only layers l.. run (`hooks.run_from`), on the batch stacked G times with a different component
patched in each copy (`Hooks.patch` with a [G*B, T, ...] mask). Patching a copy with its own clean activation
is bit-identical to the clean run.

Screen (attribution patching): to first order Eq. 1 is 1/2 [Δ log P(r') - Δ log P(r)] (differentiate both terms
at P* = P), so one forward + backward of M = 1/2 [log P(r') - log P(r)] on the clean run gives every component's
first-order effect (a' - a) . dM/da at once; the top of the screen is then re-measured exactly.

Mean ablation (faithfulness, their Eq. 2): a component outside a circuit is replaced, at every position, by its
mean over ALL prompts of the operand range with the same token layout (so position t means the same token slot);
NL = logit of the correct answer token / the largest logit at its position, averaged over the answer tokens
(teacher forced) and prompts; the means then cover the answer positions too (layouts keyed by answer length);
F(c) = (NL(c) - NL(empty)) / (NL(model) - NL(empty)).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from surgery.model.arch import ModelView
from surgery.model.batching import device_of
from surgery.model.hooks import Hooks, run_from

ROLES = ("op1", "operator", "op2", "last")
KINDS = ("head", "mlp", "neuron")


@dataclass(frozen=True, order=True)
class Component:
    """One patchable unit: kind head (index = head), mlp (index -1) or neuron (index = k), at a role (-1: all)."""

    kind: str
    layer: int
    index: int = -1
    role: int = -1

    def name(self) -> str:
        where = "all" if self.role < 0 else ROLES[self.role]
        unit = {
            "head": f"{self.layer}.{self.index}",
            "mlp": f"mlp{self.layer}",
            "neuron": f"n{self.layer}.{self.index}",
        }[self.kind]
        return f"{unit}@{where}"


@dataclass
class Pairs:
    """B clean prompts and their counterfactuals sharing ONE token layout (no padding): ids [B, T], the role
    positions [R, T] (bool), the answer tokens r / r_cf [B, A] (a [B] tensor is one token each; every answer of
    one Pairs has the same length A); `key` names the layout (op and shape).

    The engine runs `inputs()` (rows = B when A == 1, else 2B: p + r[:-1] then p + r'[:-1]) and takes donor
    activations from `donor_inputs()` (the counterfactual prompts with the same continuations)."""

    clean: Tensor
    cf: Tensor
    roles: Tensor
    r: Tensor
    r_cf: Tensor
    key: str = ""

    def __post_init__(self) -> None:
        self.r = self.r.reshape(self.clean.shape[0], -1)
        self.r_cf = self.r_cf.reshape(self.clean.shape[0], -1)
        if self.r.shape != self.r_cf.shape:
            raise ValueError(
                f"answers of one Pairs must have one length, got {tuple(self.r.shape)} and {tuple(self.r_cf.shape)}"
            )

    @property
    def n(self) -> int:
        return self.clean.shape[0]

    @property
    def n_ans(self) -> int:
        """A: answer tokens scored (teacher forced when > 1)."""
        return self.r.shape[1]

    @property
    def last(self) -> int:
        """Position of the prompt's last token (the '=' the first answer token is read from)."""
        return self.clean.shape[1] - 1

    def _rows(self, prompts: Tensor) -> Tensor:
        if self.n_ans == 1:
            return prompts
        return torch.cat([torch.cat([prompts, self.r[:, :-1]], 1), torch.cat([prompts, self.r_cf[:, :-1]], 1)])

    def inputs(self) -> Tensor:
        """The clean rows the engine runs: [B, T] or, teacher forced, [2B, T + A - 1]."""
        return self._rows(self.clean)

    def donor_inputs(self) -> Tensor:
        """The counterfactual rows the donor activations come from, aligned with `inputs()`."""
        return self._rows(self.cf)

    def where(self, role: int) -> Tensor:
        """Positions [T + A - 1] (bool) of a role (prompt positions); role -1: every position."""
        T = self.clean.shape[1] + self.n_ans - 1
        if role < 0:
            return torch.ones(T, dtype=torch.bool)
        out = torch.zeros(T, dtype=torch.bool)
        out[: self.clean.shape[1]] = self.roles[role]
        return out

    def fold(self, x: Tensor) -> Tensor:
        """Per-row values [rows, ...] summed back to per-pair [B, ...] (both continuations of a pair)."""
        return x if self.n_ans == 1 else x[: self.n] + x[self.n :]


@dataclass
class Acts:
    """One run's activations per layer (all positions): z [B, T, H, dh], ffn [B, T, d], residual inputs
    [B, T, d], FFN coefficients m [B, T, N] (when asked); and the logits of the last A positions [B, A, V]."""

    z: dict[int, Tensor] = field(default_factory=dict)
    ffn: dict[int, Tensor] = field(default_factory=dict)
    resid: dict[int, Tensor] = field(default_factory=dict)
    m: dict[int, Tensor] = field(default_factory=dict)
    logits: Tensor | None = None


def _wide(x: Tensor) -> Tensor:
    """fp32 (or fp64 when the model runs in fp64) for scoring."""
    return x if x.dtype == torch.float64 else x.float()


def model_inputs(view: ModelView, ids: Tensor, repeat: int = 1, keep: int = 1) -> dict:
    ids = ids.to(device_of(view.model)).repeat(repeat, 1)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, logits_to_keep=keep)


@torch.no_grad()
def run(view: ModelView, ids: Tensor, neurons: bool = False, n_ans: int = 1) -> Acts:
    """The unpatched model on ids [B, T]: every layer's z, ffn, residual input and (if `neurons`) m, at all
    positions, and the logits of the last `n_ans` positions [B, n_ans, V]."""
    with Hooks(view) as h:
        h.capture("z", positions=None).capture("ffn", positions=None).capture("resid_in", positions=None)
        if neurons:
            h.capture("m", positions=None)
        logits = view.model(**model_inputs(view, ids, keep=n_ans)).logits
    L = range(view.n_layers)
    return Acts(
        {l: h.store["z", l] for l in L},
        {l: h.store["ffn", l] for l in L},
        {l: h.store["resid_in", l] for l in L},
        {l: h.store["m", l] for l in L} if neurons else {},
        logits,
    )


def run_pair(view: ModelView, pairs: Pairs, neurons: bool = False) -> tuple[Acts, Acts]:
    """The clean run of `pairs.inputs()` and the donor run of `pairs.donor_inputs()`."""
    return (run(view, pairs.inputs(), neurons, pairs.n_ans), run(view, pairs.donor_inputs(), neurons, pairs.n_ans))


def _masks(view: ModelView, pairs: Pairs, comps: Sequence[Component]) -> dict[str, Tensor]:
    """Per kind, where [G, B, T, ...] each copy g patches component g (only kinds present)."""
    G, (B, T) = len(comps), pairs.inputs().shape
    layer = comps[0].layer
    out: dict[str, Tensor] = {}
    for g, c in enumerate(comps):
        pos = pairs.where(c.role)
        if c.kind == "head":
            w = out.setdefault("z", torch.zeros(G, B, T, view.n_heads, dtype=torch.bool))
            w[g, :, pos, c.index] = True
        elif c.kind == "mlp":
            w = out.setdefault("ffn", torch.zeros(G, B, T, dtype=torch.bool))
            w[g, :, pos] = True
        else:
            w = out.setdefault("m", torch.zeros(G, B, T, view.ffn_width(layer), dtype=torch.bool))
            w[g, :, pos, c.index] = True
    return out


@torch.no_grad()
def patched(view: ModelView, pairs: Pairs, comps: Sequence[Component], donor: Acts, clean: Acts) -> Tensor:
    """Answer-position logits [G, rows, A, V] of the clean rows (`pairs.inputs()`) with component g (all of ONE
    layer) taking its activation from `donor` (the run of `pairs.donor_inputs()`, or any run of the same
    layout); only layers l.. run. Neuron components need the donor's m (`run(..., neurons=True)`)."""
    layer = comps[0].layer
    if any(c.layer != layer for c in comps):
        raise ValueError("patched() takes components of one layer (they share the prefix run)")
    G = len(comps)
    masks = _masks(view, pairs, comps)
    src = {"z": donor.z.get(layer), "ffn": donor.ffn.get(layer), "m": donor.m.get(layer)}
    with Hooks(view) as h:
        for what, w in masks.items():
            h.patch(what, layer, src[what].repeat(G, *[1] * (src[what].dim() - 1)), w.flatten(0, 1))
        with run_from(view, layer, clean.resid[layer].repeat(G, 1, 1)):
            logits = view.model(**model_inputs(view, pairs.inputs(), G, pairs.n_ans)).logits
    return logits.view(G, -1, *logits.shape[1:])


def answer_logp(logits: Tensor, pairs: Pairs) -> tuple[Tensor, Tensor]:
    """Teacher-forced log P(r) and log P(r') per prompt [..., B] from answer-position logits [..., rows, A, V]
    of `pairs.inputs()`: sum over answer tokens of log P(token | prompt, answer tokens before it)."""
    lp = _wide(logits).log_softmax(-1)
    B, dev = pairs.n, lp.device

    def tok(rows: Tensor, ans: Tensor) -> Tensor:
        return rows.gather(-1, ans.to(dev).expand(*rows.shape[:-1])[..., None])[..., 0].sum(-1)

    if pairs.n_ans == 1:
        return tok(lp, pairs.r), tok(lp, pairs.r_cf)
    return tok(lp[..., :B, :, :], pairs.r), tok(lp[..., B:, :, :], pairs.r_cf)


def eq1(clean_logits: Tensor, patched_logits: Tensor, pairs: Pairs) -> Tensor:
    """Nikankin et al. Eq. 1 per copy and prompt [G, B] from the clean run's answer-position logits [rows, A, V]
    and the patched ones [G, rows, A, V]; P is the teacher-forced probability of the whole answer."""
    p_r, p_rc = (x.double().exp() for x in answer_logp(clean_logits, pairs))
    s_r, s_rc = (x.double().exp() for x in answer_logp(patched_logits, pairs))
    return (0.5 * ((s_rc - p_rc) / p_rc + (p_r - s_r) / s_r)).cpu()


def exact(
    view: ModelView, pairs: Pairs, comps: Sequence[Component], clean: Acts, cf: Acts, max_rows: int = 1024
) -> Tensor:
    """Exact Eq. 1 effect of every component on every prompt, [len(comps), B]: components grouped by layer,
    as many per forward as fit in max_rows rows."""
    out = torch.zeros(len(comps), pairs.n, dtype=torch.float64)
    by_layer: dict[int, list[int]] = {}
    for i, c in enumerate(comps):
        by_layer.setdefault(c.layer, []).append(i)
    G = max(1, max_rows // pairs.n)
    for layer, idx in sorted(by_layer.items()):
        for s in range(0, len(idx), G):
            chunk = idx[s : s + G]
            logits = patched(view, pairs, [comps[i] for i in chunk], cf, clean)
            out[chunk] = eq1(clean.logits, logits, pairs)
    return out


def screen(view: ModelView, pairs: Pairs, cf: Acts, neurons: bool = False) -> dict[str, Tensor]:
    """First-order Eq. 1 of every component from one forward + backward on the clean rows, per prompt:
    "head" [R, L, H, B], "mlp" [R, L, B] (role positions summed, both continuations of a pair summed), and with
    `neurons` "neuron" [L, N, B] at the last prompt position (cf: the donor run, `run_pair(..., neurons=True)`)."""
    L, R = view.n_layers, len(ROLES)
    with Hooks(view) as h, torch.enable_grad():
        h.capture("z", positions=None, keep_grad=True).capture("ffn", positions=None, keep_grad=True)
        if neurons:
            h.capture("m", positions=None, keep_grad=True)
        logits = view.model(**model_inputs(view, pairs.inputs(), keep=pairs.n_ans)).logits
        lp_r, lp_rc = answer_logp(logits, pairs)
        dev = logits.device
        metric = 0.5 * (lp_rc - lp_r).sum()
        acts = [h.store[w, l] for w in (("z", "ffn", "m") if neurons else ("z", "ffn")) for l in range(L)]
        grads = torch.autograd.grad(metric, acts)
    roles = torch.stack([pairs.where(r) for r in range(R)]).to(dev).to(logits.dtype)  # [R, T + A - 1]
    out = {"head": torch.zeros(R, L, view.n_heads, pairs.n), "mlp": torch.zeros(R, L, pairs.n)}
    for l in range(L):
        dz = pairs.fold(((cf.z[l].to(dev) - acts[l].detach()) * grads[l]).sum(-1))  # [B, T, H]
        out["head"][:, l] = torch.einsum("bth,rt->rhb", dz, roles).cpu()
        df = pairs.fold(((cf.ffn[l].to(dev) - acts[L + l].detach()) * grads[L + l]).sum(-1))  # [B, T]
        out["mlp"][:, l] = torch.einsum("bt,rt->rb", df, roles).cpu()
    if neurons:
        t = pairs.last
        out["neuron"] = torch.stack(
            [
                pairs.fold((cf.m[l][:, t].to(dev) - acts[2 * L + l][:, t].detach()) * grads[2 * L + l][:, t]).T.cpu()
                for l in range(L)
            ]
        )
    return out


# ---- mean ablation and faithfulness -----------------------------------------------------------------------
@dataclass
class Means:
    """Mean activations over many prompts of one token layout: z [T, H, dh], ffn [T, d], m [T, N] per layer;
    and, as a by-product of the same forwards, each prompt's argmax at its last n_ans positions (pred [n, n_ans])."""

    z: dict[int, Tensor]
    ffn: dict[int, Tensor]
    m: dict[int, Tensor]
    count: int
    pred: Tensor | None = None


@torch.no_grad()
def means(view: ModelView, ids: Tensor, batch_size: int = 64, n_ans: int = 1) -> Means:
    """Means over all rows of ids [N, T] (one layout; teacher forced: prompt + answer[:-1]), in float64."""
    L = range(view.n_layers)
    tot: dict[str, dict[int, Tensor]] = {"z": {}, "ffn": {}, "m": {}}
    pred = []
    for s in range(0, ids.shape[0], batch_size):
        with Hooks(view) as h:
            for w in tot:
                h.capture(w, positions=None)
            pred.append(view.model(**model_inputs(view, ids[s : s + batch_size], keep=n_ans)).logits.argmax(-1).cpu())
        for w in tot:
            for l in L:
                x = h.store[w, l].double().sum(0)
                tot[w][l] = tot[w][l] + x if l in tot[w] else x
    n = ids.shape[0]
    f = {w: {l: (t / n).float() for l, t in d.items()} for w, d in tot.items()}
    return Means(f["z"], f["ffn"], f["m"], n, torch.cat(pred))


@dataclass
class Circuit:
    """What a faithfulness run keeps: heads [L, H] and MLPs [L] (bool); optionally, per layer, the FFN neurons
    [N] kept at the last position (the others mean-ablated there) for the neuron-level circuit."""

    heads: Tensor
    mlps: Tensor
    neurons: dict[int, Tensor] = field(default_factory=dict)

    @staticmethod
    def full(view: ModelView) -> "Circuit":
        return Circuit(
            torch.ones(view.n_layers, view.n_heads, dtype=torch.bool), torch.ones(view.n_layers, dtype=torch.bool)
        )

    @staticmethod
    def empty(view: ModelView) -> "Circuit":
        return Circuit(
            torch.zeros(view.n_layers, view.n_heads, dtype=torch.bool), torch.zeros(view.n_layers, dtype=torch.bool)
        )


@torch.no_grad()
def ablated(view: ModelView, ids: Tensor, mean: Means, circuit: Circuit, n_ans: int = 1) -> Tensor:
    """Logits of the last n_ans positions [B, n_ans, V] with every component outside `circuit` mean-ablated at
    every position; a circuit's neurons are kept (the others mean-ablated) at the last PROMPT position
    (T - n_ans: ids are prompt + answer[:-1] when teacher forced)."""
    B, T = ids.shape
    last = torch.zeros(T, dtype=torch.bool)
    last[T - n_ans] = True
    with Hooks(view) as h:
        for l in range(view.n_layers):
            if not bool(circuit.heads[l].all()):
                h.patch("z", l, mean.z[l], (~circuit.heads[l]).expand(B, T, -1))
            if not bool(circuit.mlps[l]):
                h.patch("ffn", l, mean.ffn[l], torch.ones(B, T, dtype=torch.bool))
            elif l in circuit.neurons:
                h.patch("m", l, mean.m[l], last[None, :, None] & ~circuit.neurons[l][None, None])
        return view.model(**model_inputs(view, ids, keep=n_ans)).logits


def _per_token(logits: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    """Logits as [B, A, V] and answers as [B, A] ([B, V] / [B] is one token)."""
    logits = _wide(logits)
    logits = logits[:, None] if logits.dim() == 2 else logits
    return logits, r.to(logits.device).reshape(logits.shape[0], -1)


def normalized_logit(logits: Tensor, r: Tensor) -> Tensor:
    """NL per prompt [B]: logit of the correct token / the largest logit (their Eq. 2), averaged over the
    answer tokens (teacher forced: logits [B, A, V], r [B, A])."""
    logits, r = _per_token(logits, r)
    return (logits.gather(-1, r[..., None])[..., 0] / logits.max(-1).values).mean(-1).double().cpu()


def answer_prob(logits: Tensor, r: Tensor) -> Tensor:
    """P(correct answer) per prompt [B], teacher forced (the product over answer tokens): a better-conditioned
    stand-in for NL in Eq. 2 (docs/results/circuits.md)."""
    logits, r = _per_token(logits, r)
    return logits.log_softmax(-1).gather(-1, r[..., None])[..., 0].sum(-1).exp().double().cpu()


METRICS = {"nl": normalized_logit, "prob": answer_prob}


def faithfulness(nl_c: float, nl_model: float, nl_empty: float) -> float:
    """Eq. 2: (NL(c) - NL(empty)) / (NL(model) - NL(empty))."""
    return (nl_c - nl_empty) / (nl_model - nl_empty)
