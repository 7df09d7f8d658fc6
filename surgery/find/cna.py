"""Neuron importance (the paper's score) for every FFN neuron, fast and exact; comparisons between settings (CNA).

Score of neuron (l, k) for target token w at the last position T (docs/design.md section 1):
    imp = log softmax(U(r + m_k v_k))[w] - log softmax(U(r))[w],   r = x^{l-1}_T + A^l_T,
    U(x) = softcap(W_U (g * centre(x)) / sigma + bias),   sigma frozen from the ORIGINAL final hidden state.
With sigma frozen, U(r + m v_k) = U(r) + m * D_k with D_k = W_U(g * centre(c * v_k)) / sigma, where c linearises a
post-FFN norm (Gemma) and is 1 elsewhere. Hence:
- first-order score  fo_k = m_k (D_k[w] - p . D_k) = m_k (c v_k) . centre(g * W_U^T(e_w - p)) / sigma: O(N d);
- without soft-capping, log-sum-exp is convex along D_k, so imp_k <= fo_k (an upper bound) and
  imp_k >= fo_k - m_k^2 range(D_k)^2 / 8 with range(D_k) <= 2 ||g * centre(c v_k)|| max_j ||W_U[j]|| / sigma;
- exact scores are computed for candidates only, in order of their upper bounds, until the k-th best exact score
  beats every unscored neuron's upper bound: the reported top-k is then certified equal to the exhaustive top-k.
A post-FFN RMS norm's c is gain / rms(y): one vector times a per-case scalar s, so c v_k = s (gain * v_k) and
D_k stays a case-independent row times s: the vocabulary ranges stay exact (cached) and the readout rows W_U(...)
of rescored neurons are shared across cases, as without the norm.
Cost (B cases, L layers, vocabulary V, width d): the bounds take two passes over W_U for all layers at once
([L B, d] x [d, V] for the base logits, [L B, V] x [V, d] for the tail means) plus one [N, d] x [d, |S union|]
product per layer; the exact scores take one [rows, d] x [d, V] block per group of candidate neurons, shared by
the cases and by both settings of a comparison on one model. Memory: base logits [L B, V] per setting (dataset
mode: B capped by `held` floats, whatever the batch size) and one shared [rows, V] work block (`chunk`, `budget`),
independent of the number of cases. Threads: the bookkeeping at one, the large products at the caller's (`serial`;
the [rows, V] elementwise passes stay at one: under `wide` they cost the loaded case 4x, docs/benchmarks/cna.md).
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from surgery.errors import UsageError
from surgery.find.neurons import offsets_of, unflatten
from surgery.io.loading import home
from surgery.model.arch import ModelView
from surgery.model.batching import device_of, left_pad, position_ids
from surgery.model.hooks import Hooks
from surgery.model.upcast import fp32_compute

HeadList = tuple[tuple[int, int], ...]
HELD = 1 << 24  # dataset mode: floats of base logits one setting holds at once (64 MiB), see `scan`
EXP_SAFE = 64.0  # |exponent| below which exp needs no max shift (fp32: e^64 x a vocabulary of 1e6 < 3.4e38)


# ---- threads: the large GEMMs on the caller's threads, the rest on one ----------------------------------------
_caller_threads: int | None = None  # the caller's torch thread count while a Scorer pass runs serially


def serial(fn):
    """Run `fn` with torch at one thread, except inside `wide()` (the large products). CNA's bookkeeping is many
    small elementwise passes; at two or more OpenMP threads each is a parallel region whose barrier a thread spins
    at, and when another job holds the cores the thread it waits for is descheduled: bench/cna.py measured 6-14x
    the reference's speed there instead of 78x with this (docs/benchmarks/cna.md). At one thread there is no barrier to
    wait at. On a GPU the thread count changes nothing. torch's thread count is process-wide: do not run Scorer
    passes from several Python threads at once."""

    @functools.wraps(fn)
    def run(*args, **kw):
        global _caller_threads
        n = torch.get_num_threads()
        if _caller_threads is not None or n == 1:
            return fn(*args, **kw)
        _caller_threads = n
        torch.set_num_threads(1)
        try:
            return fn(*args, **kw)
        finally:
            _caller_threads = None
            torch.set_num_threads(n)

    return run


@contextmanager
def wide():
    """The caller's threads for one large product (a [rows, d] x [d, V] GEMM) inside a `serial` pass."""
    n = _caller_threads
    if n is None:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(1)


# ---- one forward: everything the score needs at the last position ---------------------------------------
@dataclass
class State:
    """Per chosen layer: coefficients m [B, N], FFN input stream r [B, d], post-norm scale c [B, d] or None;
    and the final hidden state / logits at the last position."""

    layers: list[int]
    m: dict[int, Tensor]
    r: dict[int, Tensor]
    c: dict[int, Tensor | None]
    hfin: Tensor
    logits: Tensor

    def take(self, rows: slice) -> "State":
        """The state of some of the cases (views, no copies)."""
        return State(
            self.layers,
            {l: v[rows] for l, v in self.m.items()},
            {l: v[rows] for l, v in self.r.items()},
            {l: None if v is None else v[rows] for l, v in self.c.items()},
            self.hfin[rows],
            self.logits[rows],
        )


@torch.no_grad()
def collect(
    view: ModelView,
    input_ids: Tensor,
    attention_mask: Tensor,
    layers: list[int],
    ablate: HeadList = (),
    neuron_scale: dict[int, Tensor] | None = None,
) -> State:
    """One forward (optionally with heads zeroed / neurons scaled), captured at the last position."""
    last = view.n_layers - 1
    dev = device_of(view.model)
    with fp32_compute(view.model), Hooks(view) as h:  # a bf16 model: fp32 arithmetic on its bf16 weights
        for layer, mask in head_masks(view, ablate).items():
            h.ablate_heads(layer, mask)
        for layer, s in (neuron_scale or {}).items():
            h.scale_neurons(layer, s)
        h.capture("m", layers).capture("ffn", layers).capture("resid", sorted(set(layers) | {last}))
        pos = position_ids(attention_mask)  # left padding: count positions from the first token
        out = view.model(
            input_ids=input_ids.to(dev),
            attention_mask=attention_mask.to(dev),
            position_ids=pos.to(dev),
            logits_to_keep=1,
            use_cache=False,
        )
    m = {l: h.store["m", l].float() for l in layers}
    c = {l: _post_scale(view, l, m[l]) for l in layers}
    r = {l: (h.store["resid", l] - h.store["ffn", l]).float() for l in layers}
    return State(list(layers), m, r, c, h.store["resid", last].float(), out.logits[:, -1].float())


def _post_scale(view: ModelView, layer: int, m: Tensor) -> Tensor | None:
    if view.post_ffn_norm(layer) is None:
        return None
    y = m @ view.values(layer).float()
    b = view.ffn_out_bias(layer)
    return view.ffn_post_scale(layer, y + (b.float() if b is not None else 0))


def head_masks(view: ModelView, heads: HeadList) -> dict[int, Tensor]:
    """{layer: [H] mask} zeroing `heads` (checked against the model), for `Hooks.ablate_heads`."""
    masks: dict[int, Tensor] = {}
    for layer, head in heads:
        view.check_head(layer, head)
        masks.setdefault(layer, torch.ones(view.n_heads))[head] = 0.0
    return masks


# ---- the score ------------------------------------------------------------------------------------------
class Workspace:
    """The [rows, vocab] work blocks of the Scorers of one comparison, in ONE allocation they share.

    Slots: "z" (an exact block's logits) and "q" (the tail distributions of `_prepare`, never in use at the same
    time as "z": bounds come before rescoring), "z0" (the block's base logits) and "rows" (readout rows; in
    `exact_pairs` each scorer's rows are computed and consumed before the next scorer writes the slot). One block
    that large is mmapped by the C allocator and returned to the OS with the batch, so no [rows, vocab]
    temporaries churn the heap; sharing it between settings A and B halves it (SmolLM2, batch 16: 50 MB, not
    2 x 67 MB)."""

    SLOTS = {"z": 0, "q": 0, "z0": 1, "rows": 2}

    def __init__(self) -> None:
        self.buf: Tensor | None = None

    def get(self, name: str, n: int, V: int, size: int, like: Tensor) -> Tensor:
        if self.buf is None or self.buf.shape[1] < max(size, n * V) or self.buf.device != like.device:
            self.buf = like.new_empty(3, max(size, n * V))
        return self.buf[self.SLOTS[name], : n * V].view(n, V)


class Scorer:
    """Exact and first-order importance of every neuron of the chosen layers, for B cases at once.

    sigma [B, 1] and target [B] are fixed by the caller (frozen from the original model's forward)."""

    def __init__(
        self,
        view: ModelView,
        state: State,
        sigma: Tensor,
        target: Tensor,
        chunk: int = 256,
        budget: int = 1 << 22,
        work: Workspace | None = None,
    ):
        dev = (
            state.logits.device
        )  # the model's device: the state, sigma and target live there; scores come back on the CPU
        self.view, self.s, self.sigma, self.target, self.chunk = view, state, sigma.to(dev), target.to(dev), chunk
        self.gain = view.final_gain()
        self.WU = view.unembed_matrix().float()
        self.wu_max = self.WU.norm(dim=1).max()
        self.cap = view.softcap
        self.top_tokens = 32  # |S|: the tokens whose log-sum-exp terms are computed exactly for every neuron
        self.budget = budget  # floats per temporary [rows, vocab] block: bounds memory whatever the candidates
        self.layer_cache: dict[int, tuple[Tensor, Tensor]] = {}
        self.tail_cache: dict[int, tuple[Tensor, ...]] = {}
        self.bounds_cache: dict[int, tuple[Tensor, Tensor]] = {}
        self.factor_cache: dict[int, tuple[Tensor, Tensor | None]] = {}
        self.work = Workspace() if work is None else work  # see _work; the Scorers of one comparison share one
        self.z0_all: Tensor | None = None  # base logits of every layer [L, B, V], see _prepare
        self.slot = {l: i for i, l in enumerate(state.layers)}  # layer -> its row of z0_all
        self.zmax_cache: dict[int, Tensor] = {}

    def _centre(self, x: Tensor) -> Tensor:
        return x - x.mean(-1, keepdim=True) if self.view.arch.norm_kind == "layer" else x

    @torch.no_grad()
    def _base(self, layer: int) -> tuple[Tensor, Tensor]:
        """Pre-softcap base logits z0 [B, V] and log p0(w) [B] of the FFN input stream r (frozen sigma)."""
        if layer not in self.layer_cache:
            self._prepare([layer], tails=False)
        return self.layer_cache[layer]

    @torch.no_grad()
    def _prepare(self, layers: list[int], tails: bool = True) -> None:
        """Base logits (and with `tails` the tail statistics of the bounds) for many layers at once: the readouts
        W_U x of all (layer, case) rows go through ONE matmul per group of layers (one pass over W_U instead of
        one per layer: large products run near the GEMM peak), and so does the tail mean q @ W_U, in groups of at
        most `budget` floats (its [rows, vocab] temporary). Base logits live in one [layers, B, V] block per
        Scorer (written in place, kept: the same values serve the bounds and the exact scores); the tail
        distributions go into a reused work block. The log-sum-exp of a layer's logits comes with its tail
        statistics (one exp pass, `_tail`)."""
        B, V = self.target.shape[0], self.WU.shape[0]
        per = max(1, self.budget // max(1, B * V))
        if self.z0_all is None:
            self.z0_all = self.WU.new_empty(len(self.s.layers), B, V)
        bias = self.view.readout_bias()
        new = sorted((l for l in layers if l not in self.layer_cache), key=self.slot.__getitem__)
        for run in _runs(new, self.slot, len(new)):  # written in place: no temporary, so no budget
            z0 = self.z0_all[self.slot[run[0]] : self.slot[run[-1]] + 1]
            with wide():
                self.view.readout(torch.stack([self.s.r[l] for l in run]), self.sigma, out=z0)  # [G, B, V]
            if isinstance(bias, Tensor) or bias:
                z0 += bias
        todo = [l for l in dict.fromkeys(layers) if l not in self.tail_cache] if tails else []
        for g in range(0, len(todo), per):
            group = todo[g : g + per]
            q = self._work("q", len(group) * B)
            mass = []
            for i, layer in enumerate(group):
                z = self._z0(layer)
                z = self.view.softcap_logits(z) if self.cap else z
                mass.append(self._tail(layer, z, q[i * B : (i + 1) * B]))
            if self.cap:  # soft-capped: the tail statistics of the capped logits, no mean
                for layer in group:
                    self.tail_cache[layer] += (None,)
                continue
            with wide():
                mean_u = q @ self.WU  # [G * B, d]: sum_j q_j W_U[j] on each case's tail, q unnormalised
            for i, layer in enumerate(group):
                self.tail_cache[layer] += (mean_u[i * B : (i + 1) * B] / mass[i],)
        for layer in new:  # log p0(w): the target's (capped) logit minus the log-sum-exp of the tail statistics
            z = self._z0(layer)
            if layer in self.tail_cache:
                lse = self.tail_cache[layer][2]
            else:
                lse = self.view.softcap_logits(z).logsumexp(-1, keepdim=True)
            zw = self.view.softcap_logits(z.gather(1, self.target[:, None]))
            self.layer_cache[layer] = (z, (zw - lse)[:, 0])

    def _z0(self, layer: int) -> Tensor:
        """The layer's pre-softcap base logits [B, V] (a view into the Scorer's [layers, B, V] block)."""
        return self.z0_all[self.slot[layer]]

    def _tail(self, layer: int, z0: Tensor, out: Tensor) -> Tensor:
        """Split the vocabulary into each case's top tokens S (with the target) and the tail R; cache
        (S [B, s], target column [B], lse0 [B, 1], log Z_R [B, 1]). The tail's unnormalised
        distribution exp(z_j - t) (t: the s-th largest logit, >= every tail logit, so no overflow; S set to 0) is
        written there; returns its mass [B, 1] (q = out / mass). One exp pass gives both log-sum-exps:
        log Z_R = t + log(mass) and lse0 = logaddexp(lse over S, log Z_R)."""
        B, V = z0.shape
        s = min(self.top_tokens, V)
        vals, top = _topk(z0, s)  # any split of the vocabulary is valid:
        missing = ~(top == self.target[:, None]).any(1)  # make sure the target is in S
        top[missing, -1] = self.target[missing]
        wcol = (top == self.target[:, None]).float().argmax(1)  # [B]
        t = vals[:, -1:]  # every tail logit is <= the s-th largest (the target may have displaced it into R)
        q = torch.sub(z0, t, out=out).scatter_(1, top, float("-inf")).exp_()
        mass = q.sum(-1, keepdim=True)
        log_zr = t + mass.log()  # -inf when the tail is empty
        lse0 = torch.logaddexp(z0.gather(1, top).logsumexp(-1, keepdim=True), log_zr)
        self.tail_cache[layer] = (top, wcol, lse0, log_zr)
        if not self.cap:  # z0 is the pre-softcap block: its max comes with the top-k (see `_zmax`)
            self.zmax_cache[layer] = vals[:, 0]
        return mass.clamp_min(torch.finfo(mass.dtype).tiny)

    def _factor(self, layer: int) -> tuple[Tensor, Tensor | None]:
        """(dirs, s) with case b's direction of neuron k = s_b * dirs_k: dirs [N, d] shared by every case and
        s [B, 1] (None: 1). A post-FFN RMS norm scales its input by gain / rms(y): one vector times a per-case
        scalar, so the directions stay shared (v_k * gain) and their vocabulary ranges stay exact and cached.
        A scale that is not of that form falls back to per-case directions [B, N, d] (s None)."""
        if layer not in self.factor_cache:
            v = self.view.values(layer).float()
            c = self.s.c[layer]
            out: tuple[Tensor, Tensor | None] = (v, None)
            if c is not None:
                ref = self.view.ffn_post_scale(
                    layer, torch.ones(1, c.shape[-1], device=c.device)
                )  # gain, up to a scalar
                sc = (c * ref).sum(-1, keepdim=True) / (ref * ref).sum(-1, keepdim=True).clamp_min(1e-30)
                if torch.allclose(c, sc * ref, rtol=1e-5, atol=1e-6 * float(c.abs().max())):
                    out = (v * ref, sc)
                else:
                    out = (v[None] * c[:, None, :], None)
            self.factor_cache[layer] = out
        return self.factor_cache[layer]

    def _a(self, layer: int) -> Tensor:
        """a [B, N]: the step along the neuron's (factored) readout direction, m_k * s / sigma."""
        s = self._factor(layer)[1]
        m = self.s.m[layer]
        return (m if s is None else m * s) / self.sigma

    def _rows_per_chunk(self) -> int:
        """Readout rows [rows, vocab] per block: at most `chunk` and `budget` floats."""
        return max(1, min(self.chunk, self.budget // self.WU.shape[0]))

    @torch.no_grad()
    def _direction(self, layer: int) -> Tensor:
        """u [B, d] with fo_k = m_k (c v_k) . u: centre(g * W_U^T (e_w - p) * softcap') / sigma."""
        z0 = self._base(layer)[0]
        grad = -torch.softmax(self.view.softcap_logits(z0), -1)
        grad[torch.arange(len(grad)), self.target] += 1.0
        if self.cap:
            grad = grad * (1 - torch.tanh(z0 / self.cap) ** 2)
        with wide():
            gu = grad @ self.WU
        return self._centre(self.gain * gu) / self.sigma

    def _dirs(self, layer: int) -> Tensor:
        """Value vectors, post-norm scaled per case when the arch has one: [N, d] or [B, N, d]."""
        v = self.view.values(layer).float()
        c = self.s.c[layer]
        return v if c is None else v[None] * c[:, None, :]

    @serial
    @torch.no_grad()
    def first_order(self, layer: int) -> Tensor:
        """fo [B, N] on the CPU: m_k (D_k[w] - p . D_k); an upper bound of the exact score without soft-capping."""
        return self._first_order(layer).cpu()

    def _first_order(self, layer: int) -> Tensor:
        u = self._direction(layer)
        d = self._dirs(layer)
        proj = u @ d.T if d.dim() == 2 else torch.einsum("bnd,bd->bn", d, u)
        return self.s.m[layer] * proj

    @serial
    @torch.no_grad()
    def bounds(self, layer: int) -> tuple[Tensor, Tensor]:
        """(lo, hi) [B, N] with lo <= exact score <= hi, for every neuron.

        The new log-sum-exp is split into each case's base top tokens S (computed exactly for every neuron:
        N x |S| work) and the tail R. With q the base distribution on R and X = D_k[j], j ~ q:
        Jensen gives E exp(aX) >= exp(a E X) (E X is linear: O(N d)), and Hoeffding's lemma with the neuron's
        vocabulary range gives E exp(aX) <= exp(a E X + a^2 range^2 / 8), also <= exp(max(a max D, a min D)).
        Soft-capped models get the monotone / Lipschitz bound of `_capped_bounds`.
        The top-token block is one [N, d] x [d, |union of the batch's S|] product per layer when the cases'
        top tokens overlap (shared across the batch), else one per case. Cached per layer."""
        if layer not in self.bounds_cache:
            self.bounds_cache[layer] = self._bounds(layer)
        return self.bounds_cache[layer]

    def _bounds(self, layer: int) -> tuple[Tensor, Tensor]:
        if layer not in self.tail_cache:  # all the state's layers in one go: fewer, larger passes
            self._prepare([layer] + [l for l in self.s.layers if l not in self.tail_cache and l != layer])
        dirs = self._factor(layer)[0]
        top = self.tail_cache[layer][0]
        union, inv = torch.unique(top, return_inverse=True)
        if self.cap or dirs.dim() == 3 or len(union) == top.numel():
            return self._bounds_per_case(layer)
        z0 = self._z0(layer)
        _, wcol, lse0, log_zr, mean_u = self.tail_cache[layer]
        B, s = top.shape
        a = self._a(layer)  # [B, N]
        with wide():  # centre(x) . (g * w) = x . centre(g * w): the gain and the centring go on the few token rows
            dT = self._centre(self.WU[union] * self.gain) @ dirs.T  # [U, N]: D_k at the batch's top tokens, sigma 1
        dS = torch.index_select(dT, 0, inv.view(-1)).view(B, s, -1)  # [B, s, N]: each case's S, rows copied
        dw = dS[torch.arange(B, device=dS.device), wcol]  # [B, N]: the target's
        zS = z0.gather(1, top)
        zmax = zS.amax(1, keepdim=True)
        t = dS.mul_(a[:, None, :])  # a D_kj on S
        if float(a.abs().amax()) * float(dT.abs().amax()) < EXP_SAFE:  # exp(a D) neither overflows nor loses the sum
            log_a = zmax + torch.bmm(torch.exp(zS - zmax)[:, None, :], t.exp_())[:, 0].log_()
        else:
            log_a = (zS[:, :, None] + t).logsumexp(1)
        mean_d = self._centre(mean_u * self.gain) @ dirs.T  # E_q D_k [B, N]
        return self._tail_bounds(a, log_a, a * dw + lse0, log_zr, mean_d, *self.vocab_range(layer))

    def _tail_bounds(
        self, a: Tensor, log_a: Tensor, lin: Tensor, log_zr: Tensor, mean_d: Tensor, hi_d: Tensor, lo_d: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(lo, hi) from the exact top-token part log_a, the linear part `lin` and the tail's Jensen / Hoeffding
        bounds (see `bounds`)."""
        hoeffding = a * mean_d + (a * (hi_d - lo_d)) ** 2 / 8
        worst = torch.minimum(torch.maximum(a * hi_d, a * lo_d), hoeffding)
        return lin - torch.logaddexp(log_a, log_zr + worst), lin - torch.logaddexp(log_a, log_zr + a * mean_d)

    def _bounds_per_case(self, layer: int) -> tuple[Tensor, Tensor]:
        """`_bounds` where the batch shares no top token, the directions depend on the case, or the logits are
        soft-capped: the top-token block per case, [B, N, s]."""
        z0 = self._z0(layer)
        top, wcol, lse0, log_zr, mean_u = self.tail_cache[layer]
        B = z0.shape[0]
        dirs = self._factor(layer)[0]
        d = self._centre(dirs) * self.gain  # [N, d] or [B, N, d]
        a = self._a(layer)  # [B, N]
        union, inv = torch.unique(top, return_inverse=True)
        with wide():
            if d.dim() == 2 and len(union) < top.numel():
                dS = (d @ self.WU[union].T)[:, inv].permute(1, 0, 2)  # [B, N, s], shared across the batch
            else:
                ws = self.WU[top]  # [B, s, d]: each case's own top tokens
                dS = d @ ws.transpose(1, 2) if d.dim() == 2 else torch.bmm(d, ws.transpose(1, 2))  # [B, N, s]
        hi_d, lo_d = self.vocab_range(layer)
        if self.cap:
            return self._capped_bounds(z0, top, wcol, lse0, log_zr, a, dS, hi_d, lo_d)
        log_a = (z0.gather(1, top)[:, None, :] + a[..., None] * dS).logsumexp(-1)
        mean_d = mean_u @ d.T if d.dim() == 2 else torch.einsum("bnd,bd->bn", d, mean_u)  # E_q D_k [B, N]
        lin = a * dS.gather(2, wcol.view(B, 1, 1).expand(B, dS.shape[1], 1))[..., 0] + lse0
        return self._tail_bounds(a, log_a, lin, log_zr, mean_d, hi_d, lo_d)

    def _capped_bounds(
        self,
        z0: Tensor,
        top: Tensor,
        wcol: Tensor,
        lse0: Tensor,
        log_zr: Tensor,
        a: Tensor,
        dS: Tensor,
        hi_d: Tensor,
        lo_d: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """Soft-capped logits l_j = cap * tanh(z_j / cap): exact on the top tokens S for every neuron; on the tail,
        l_j is monotone and 1-Lipschitz in z_j, so a shift a D_kj in [t_lo, t_hi] (the neuron's vocabulary range)
        moves every tail logit by at most min(t_lo, 0) .. max(t_hi, 0): the tail log-sum-exp (of the base capped
        logits, lse0/log_zr here) moves by no more. Valid for every neuron, no vocabulary-sized work per neuron."""
        B = z0.shape[0]
        cap = self.view.softcap_logits
        zs = z0.gather(1, top)  # [B, s] pre-cap
        new_s = cap(zs[:, None, :] + a[..., None] * dS)  # [B, N, s]
        log_a = new_s.logsumexp(-1)
        w_new = new_s.gather(2, wcol.view(B, 1, 1).expand(B, dS.shape[1], 1))[..., 0]
        lin = w_new - cap(zs.gather(1, wcol[:, None])) + lse0
        t_hi = torch.maximum(a * hi_d, a * lo_d).clamp_min(0)
        t_lo = torch.minimum(a * hi_d, a * lo_d).clamp_max(0)
        return lin - torch.logaddexp(log_a, log_zr + t_hi), lin - torch.logaddexp(log_a, log_zr + t_lo)

    def vocab_range(self, layer: int) -> tuple[Tensor, Tensor]:
        """(max_j D_kj, min_j D_kj) of the factored directions (`_factor`) over the whole vocabulary at sigma = 1:
        [N] each (exact, cached per layer), or a Cauchy-Schwarz bound [B, N] for per-case directions."""
        d = self._factor(layer)[0]
        if d.dim() == 3:
            r = self._centre(self.gain * d).norm(dim=-1) * self.wu_max
            return r, -r
        return _vocab_range(self, layer, d)

    @serial
    @torch.no_grad()
    def exact(self, layer: int, idx: Tensor) -> Tensor:
        """Exact scores [B, C] of neurons idx [B, C] (per-case candidate lists) of `layer`."""
        z0, logp0 = self._base(layer)
        out = torch.empty(idx.shape, dtype=torch.float32)  # CPU: each row is copied over from the device
        idx = idx.to(z0.device)
        union, inv = torch.unique(idx, return_inverse=True)
        d = self._dirs(layer)
        shared = None if d.dim() == 3 else self._readout_rows(d[union])
        for b in range(idx.shape[0]):
            rows = shared[inv[b]] if shared is not None else self._readout_rows(d[b, idx[b]])
            a = (self.s.m[layer][b, idx[b]] / self.sigma[b])[:, None]
            out[b] = self._logp_w(z0[b] + a * rows, self.target[b]) - logp0[b]
        return out

    @torch.no_grad()
    def shared_rows(self, layer: int, idx: Tensor) -> Tensor | None:
        """W_U (g * centre(v_k)) [C, V] of neurons idx [C] without sigma: the same for every case and for every
        Scorer of the same model (pass it to `exact_same` of both settings); None when a post-FFN norm makes the
        direction depend on the case."""
        return None if self.s.c[layer] is not None else self._readout_rows(self._dirs(layer)[idx])

    @serial
    @torch.no_grad()
    def exact_same(self, layer: int, idx: Tensor, rows: Tensor | None = None, chunk: int = 32) -> Tensor:
        """Exact scores [B, C] of the SAME neurons idx [C] in every case: `exact` vectorised over cases (one
        [B, chunk, V] log-sum-exp per chunk instead of a loop over cases)."""
        B = self.target.shape[0]
        rows = self.shared_rows(layer, idx) if rows is None else rows
        if rows is None or self.cap:
            return self.exact(layer, idx.expand(B, -1))
        z0, logp0 = self._base(layer)
        idx = idx.to(z0.device)
        a = self.s.m[layer][:, idx] / self.sigma  # [B, C]
        zw = z0.gather(1, self.target[:, None]) + a * rows[:, self.target].T
        lse = torch.cat(
            [
                (z0[:, None, :] + a[:, s : s + chunk, None] * rows[None, s : s + chunk]).logsumexp(-1)
                for s in range(0, len(idx), chunk)
            ],
            1,
        )
        return (zw - lse - logp0[:, None]).cpu()

    def _pair_scores(self, layer: Tensor, case: Tensor, idx: Tensor, rows: Tensor, row: Tensor) -> Tensor:
        """Exact scores [P] (CPU) of pairs (layer, case, neuron idx), sorted by (layer, neuron), given the neurons'
        factored readout rows [R, V] and each pair's row index. Blocks of `_rows_per_chunk` pairs; a block's
        logits z = z0[case] + a * row are built in place (one rank-1 update per run of pairs sharing a neuron) and
        exponentiated without a max pass: the vocabulary range bounds every z_j by the case's max base logit
        + max(a hi, a lo) and the largest z_j from below by the max base logit + min(a hi, a lo), so exp cannot
        overflow or lose the sum while those stay within +-EXP_SAFE (else the block takes the max-shifted `_lse_`)."""
        V, B = self.WU.shape[0], self.target.shape[0]
        n = len(case)
        a, logp0, up, down = (case.new_empty(n, dtype=torch.float32) for _ in range(4))
        zrow = torch.empty_like(case)
        pos = 0
        for l, cnt in zip(*(t.tolist() for t in torch.unique_consecutive(layer, return_counts=True))):
            sl, c, i = slice(pos, pos + cnt), case[pos : pos + cnt], idx[pos : pos + cnt]
            a[sl] = self._a(l)[c, i]
            logp0[sl] = self._base(l)[1][c]
            hi, lo = self.vocab_range(l)
            zmax = self._zmax(l)[c]
            up[sl] = zmax + torch.maximum(a[sl] * hi[i], a[sl] * lo[i])
            down[sl] = zmax + torch.minimum(a[sl] * hi[i], a[sl] * lo[i])
            zrow[sl] = self.slot[l] * B + c
            pos += cnt
        z0 = self.z0_all.view(-1, V)
        plain = (up < EXP_SAFE) & (down > -EXP_SAFE) if not self.cap else torch.zeros_like(up, dtype=torch.bool)
        tw = self.target[case]
        step, res = self._rows_per_chunk(), []
        for s in range(0, n, step):
            e = min(s + step, n)
            z = torch.index_select(z0, 0, zrow[s:e], out=self._work("z", e - s))
            q = 0
            for r, cnt in zip(*(t.tolist() for t in torch.unique_consecutive(row[s:e], return_counts=True))):
                z[q : q + cnt].addr_(a[s + q : s + q + cnt], rows[r])
                q += cnt
            if self.cap:
                z = self.view.softcap_logits(z)
            zw = z.gather(1, tw[s:e, None])[:, 0]
            lse = z.exp_().sum(-1).log_() if bool(plain[s:e].all()) else _lse_(z)
            res.append(zw - lse - logp0[s:e])
        return torch.cat(res).cpu()

    def _pair_scores_per_case(self, layer: int, case: Tensor, idx: Tensor) -> Tensor:
        """Exact scores [P] (CPU) of pairs whose directions depend on the case (an unfactorable post-FFN norm):
        each pair's readout row is computed for it. Blocks of `_rows_per_chunk` pairs."""
        z0, logp0 = self._base(layer)
        a = self._a(layer)[case, idx]
        dirs = self._factor(layer)[0]
        step, res = self._rows_per_chunk(), []
        for s in range(0, len(case), step):
            c = case[s : s + step]
            z = self._readout_rows(dirs[c, idx[s : s + step]], out=self._work("z", len(c)))
            z.mul_(a[s : s + step, None]).add_(torch.index_select(z0, 0, c, out=self._work("z0", len(c))))
            if self.cap:
                z = self.view.softcap_logits(z)
            zw = z.gather(1, self.target[c][:, None])[:, 0]
            res.append(zw - _lse_(z) - logp0[c])
        return torch.cat(res).cpu()

    def _zmax(self, layer: int) -> Tensor:
        """Each case's largest base logit [B] (pre-softcap), cached per layer (by `_tail` when it ran)."""
        if layer not in self.zmax_cache:
            self.zmax_cache[layer] = self._base(layer)[0].amax(-1)
        return self.zmax_cache[layer]

    def _block_rows(self, layer: Tensor, idx: Tensor) -> Tensor:
        """Readout rows [R, V] of neurons (layer[i], idx[i]) (sorted by layer; any layers) in one GEMM, in the
        "rows" work slot: one large product instead of one small one per layer."""
        parts, pos = [], 0
        for l, cnt in zip(*(t.tolist() for t in torch.unique_consecutive(layer, return_counts=True))):
            parts.append(self._factor(l)[0][idx[pos : pos + cnt]])
            pos += cnt
        dirs = torch.cat(parts)
        return self._readout_rows(dirs, out=self._work("rows", len(dirs)))

    def _work(self, name: str, n: int) -> Tensor:
        """A reused [n, vocab] float buffer (n <= `_rows_per_chunk()`, or a group of tail rows) from the Scorer's
        `Workspace`: the loops write their [rows, vocab] blocks into these instead of allocating fresh ones."""
        V = self.WU.shape[0]
        size = max(self.budget, V * max(self._rows_per_chunk(), self.target.shape[0]))
        return self.work.get(name, n, V, size, self.WU)

    def _readout_rows(self, dirs: Tensor, out: Tensor | None = None) -> Tensor:
        """W_U (g * centre(dirs)) without sigma: [C, V] (into `out` when given), chunked over rows."""
        out = dirs.new_empty(len(dirs), self.WU.shape[0]) if out is None else out
        for s in range(0, len(dirs), self.chunk):
            x = self._centre(dirs[s : s + self.chunk]) * self.gain
            with wide():
                torch.matmul(x, self.WU.T, out=out[s : s + self.chunk])
        return out

    def _logp_w(self, z: Tensor, w: Tensor) -> Tensor:
        z = self.view.softcap_logits(z)
        return z[:, w] - torch.logsumexp(z, -1)

    @serial
    def exhaustive(self, layer: int) -> Tensor:
        """Exact scores of every neuron [B, N] (the paper's computation, chunked)."""
        n = self.view.ffn_width(layer)
        B = self.target.shape[0]
        return torch.cat(
            [self.exact(layer, torch.arange(s, min(s + self.chunk, n)).expand(B, -1)) for s in range(0, n, self.chunk)],
            dim=1,
        )


# ---- certified top-k over all chosen layers -----------------------------------------------------------------
@dataclass
class TopK:
    """Per case: the top-k neurons (layer, index) with exact scores, and whether the top-k is certified exact."""

    layer: Tensor  # [B, k]
    index: Tensor  # [B, k]
    score: Tensor  # [B, k] exact scores (or exact deltas)
    certified: Tensor  # [B] bool
    rescored: int  # exact evaluations spent


@torch.no_grad()
@serial
def certified_topk(
    a: Scorer, k: int, b: Scorer | None = None, margin: int = 8, max_rescore: int = 2048
) -> tuple[TopK, dict[int, Tensor]]:
    """Top-k neurons per case by exact score (one setting) or by exact delta a - b (comparison).

    Round 1 rescores, per case, the k + margin neurons with the highest guesses (`_stack_bounds`: the likeliest
    top-k, so its k-th best exact value tau starts close to the final one). tau is a
    lower bound of the final k-th value; every later round rescores the k + margin unscored neurons with the
    highest upper bounds above tau (which raises tau), until no unscored upper bound exceeds it. Nothing unscored
    can then enter the top-k: the result equals the exhaustive top-k (certified). Soft-capped models use their
    monotone / Lipschitz bound (`Scorer._capped_bounds`); a case needing more than `max_rescore` exact scores is
    left uncertified. Returns the top-k and a dense [B, N] estimate per layer (exact where rescored, the middle of
    the certified interval elsewhere) for aggregation."""
    layers = a.s.layers
    est, hi, lo, guess = _stack_bounds(a, b, layers)
    offsets = offsets_of([a.view.ffn_width(l) for l in layers])
    B, total = est.shape
    kk, step = min(k, total), min(total, k + margin)
    exact = torch.full((B, total), float("nan"))
    scored = torch.zeros(B, total, dtype=torch.bool)
    pick = guess.topk(step, dim=1).indices
    want = torch.ones(B, step, dtype=torch.bool)
    while True:
        _rescore(a, b, layers, offsets, want, pick, exact)
        scored.scatter_(1, pick, want | scored.gather(1, pick))
        tau = exact.nan_to_num(float("-inf")).topk(kk, dim=1).values[:, -1:]
        open_ = (hi > tau) & ~scored
        left = (max_rescore - scored.sum(1, keepdim=True)).clamp_min(0)
        n = int(torch.minimum(open_.sum(1, keepdim=True), left).max())
        if n == 0:
            break
        pick = hi.masked_fill(~open_, float("-inf")).topk(min(n, step), dim=1).indices
        want = open_.gather(1, pick) & (torch.arange(pick.shape[1]) < left)
    top = exact.nan_to_num(float("-inf")).topk(kk, dim=1)
    unscored = hi.masked_fill(scored, float("-inf")).amax(1)
    certified = (top.values[:, -1] >= unscored) | scored.all(1)
    dense = torch.where(scored, exact, est)
    per_layer = {l: dense[:, offsets[i] : offsets[i + 1]] for i, l in enumerate(layers)}
    return TopK(*unflatten(top.indices, layers, offsets), top.values, certified, int(scored.sum())), per_layer


def _stack_bounds(a: Scorer, b: Scorer | None, layers: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(estimate, hi, lo, guess) [B, sum N] over the chosen layers, for a score or a delta a - b. estimate: the
    middle of the certified interval; guess: the rescoring order, each setting's upper (Jensen) bound, which
    sits much closer to the exact score than the Hoeffding lower one (for a delta: hi_a - hi_b, where the
    interval's upper end hi_a - lo_b carries B's loose side)."""
    est, hi, lo, guess = [], [], [], []
    for layer in layers:
        la, ha = a.bounds(layer)
        g = ha
        if b is not None:
            lb, hb = b.bounds(layer)
            la, ha, g = la - hb, ha - lb, ha - hb
        la, ha = la.cpu(), ha.cpu()  # the top-k bookkeeping runs on the CPU; exact scores come back there
        hi.append(ha)
        lo.append(la)
        guess.append(g.cpu())
        est.append(torch.where(la.isinf(), ha, (la + ha) / 2))
    return torch.cat(est, 1), torch.cat(hi, 1), torch.cat(lo, 1), torch.cat(guess, 1)


def _rescore(
    a: Scorer, b: Scorer | None, layers: list[int], offsets: Tensor, want: Tensor, cand: Tensor, exact: Tensor
) -> None:
    """Exact (delta) scores of the flat neuron indices cand[want] (per case row), written into `exact`: one
    `exact_pairs` call over all layers (its readout GEMMs mix layers: fewer, larger products)."""
    case, cols = want.nonzero(as_tuple=True)
    if len(case) == 0:
        return
    flat = cand[case, cols]
    slot = torch.bucketize(flat.contiguous(), offsets[1:], right=True)
    vals = exact_pairs([a] if b is None else [a, b], torch.tensor(layers)[slot], case, flat - offsets[slot])
    exact[case, flat] = vals[0] - (vals[1] if b is not None else 0.0)


@serial
@torch.no_grad()
def exact_pairs(scorers: list[Scorer], layer: int | Tensor, case: Tensor, idx: Tensor) -> list[Tensor]:
    """Exact scores [P] (CPU) of the (layer, case, neuron) triples, one tensor per scorer; `layer` is one layer for
    every pair or a [P] tensor.

    Pairs are grouped by neuron, across layers; the readout rows W_U (g * centre(dirs_k)) of a block of neurons
    are computed in one GEMM and serve every case that asks for them, and every scorer of the same model
    (settings A and B of one model: one matmul, not two). Memory: one [rows, vocab] block of rows and one of
    logits at a time. Layers whose directions depend on the case (an unfactorable post-FFN norm) go pair by pair."""
    out = [torch.empty(len(idx)) for _ in scorers]
    if len(idx) == 0:
        return out
    dev = scorers[0].s.logits.device
    case, idx = case.to(dev), idx.to(dev)
    layer = torch.as_tensor(layer, device=dev).expand(len(idx))
    shared_ok = torch.ones(len(idx), dtype=torch.bool, device=dev)
    for l in layer.unique().tolist():
        if any(sc._factor(l)[0].dim() == 3 for sc in scorers):
            sel = layer == l
            shared_ok &= ~sel
            for j, sc in enumerate(scorers):
                out[j][sel.cpu()] = sc._pair_scores_per_case(l, case[sel], idx[sel])
    keep = shared_ok.nonzero()[:, 0]
    if len(keep) == 0:
        return out
    layer, case, idx = layer[keep], case[keep], idx[keep]
    width = int(idx.max()) + 1
    union, inv = torch.unique(layer * width + idx, return_inverse=True)  # sorted by (layer, neuron)
    order = inv.argsort(stable=True)
    bounds = torch.searchsorted(inv[order], torch.arange(0, len(union) + 1, device=dev)).tolist()
    step = min(sc._rows_per_chunk() for sc in scorers)
    for s in range(0, len(union), step):
        e = min(s + step, len(union))
        p = order[bounds[s] : bounds[e]]
        ul, ui = union[s:e] // width, union[s:e] % width
        shared: dict[int, Tensor] = {}
        for j, sc in enumerate(scorers):
            key = id(sc.view.model)
            if key not in shared:  # each scorer's pairs are scored before the next model writes the slot
                shared[key] = sc._block_rows(ul, ui)
            out[j][keep[p].cpu()] = sc._pair_scores(layer[p], case[p], idx[p], shared[key], inv[p] - s)
    return out


def _runs(layers: list[int], slot: dict[int, int], most: int) -> list[list[int]]:
    """`layers` (sorted by slot) cut into runs of consecutive slots of at most `most` layers."""
    runs: list[list[int]] = []
    for l in layers:
        if runs and len(runs[-1]) < most and slot[l] == slot[runs[-1][-1]] + 1:
            runs[-1].append(l)
        else:
            runs.append([l])
    return runs


def _topk(z: Tensor, k: int, block: int = 256) -> tuple[Tensor, Tensor]:
    """Row-wise top-k (values descending, indices) of z [B, V], reading most of each row once: the top k
    elements lie in the k blocks of `block` columns with the largest maxima (an element outside them has k block
    maxima above it), so topk runs on k x block candidates. 1.5-1.7x torch.topk for k 32 of 49,152
    (bench/cna_parts.py)."""
    B, V = z.shape
    nb = V // block
    if nb <= 2 * k:
        return z.topk(k, -1)
    head = z[:, : nb * block].view(B, nb, block)
    blocks = head.amax(-1).topk(k, -1).indices  # [B, k]
    cols = (blocks[:, :, None] * block + torch.arange(block, device=z.device)).view(B, k * block)
    if nb * block < V:  # the ragged end always competes
        cols = torch.cat([cols, torch.arange(nb * block, V, device=z.device).expand(B, -1)], 1)
    vals, pos = z.gather(1, cols).topk(k, -1)
    return vals, cols.gather(1, pos)


def _lse_(z: Tensor) -> Tensor:
    """log-sum-exp over the last dim, overwriting z (no [rows, vocab] temporary beside it)."""
    top = z.amax(-1, keepdim=True)
    return z.sub_(top).exp_().sum(-1).log_() + top[:, 0]


def _vocab_range(sc: Scorer, layer: int, d: Tensor) -> tuple[Tensor, Tensor]:
    """Exact per-neuron max/min of W_U (g * centre(v_k)) over the vocabulary (the paper's N x V x d product, once).

    Cached on the weight tensor (lives and dies with the model, recomputed when an input weight is edited) and on
    disk under $SURGERY_HOME/cache: a whole layer keyed by a hash of its weights (`_fingerprint`), and row by row
    (`RowStore`), so that an edited, pruned or fine-tuned copy of a model pays only for the rows that changed."""
    w = sc.view.ffn_out(layer).weight
    post = sc.view.post_ffn_norm(layer)
    version = (
        w._version,
        sc.view.unembed_matrix()._version,
        sc.view.final_norm.weight._version,
        post.weight._version if post is not None else 0,
    )
    hit = getattr(w, "_surgery_vocab_range", None)
    if hit is None or hit[0] != version:
        key = _fingerprint(d, sc)
        path = home() / "cache" / "vocab-range" / f"{key}.pt"
        if path.exists():
            hi, lo = torch.load(path, map_location=d.device)
        else:
            hi, lo = _rows_range(sc, d)
            _save_quietly(path, (hi, lo))
        hit = (version, hi, lo)
        w._surgery_vocab_range = hit
    return hit[1], hit[2]


def _rows_range(sc: Scorer, d: Tensor) -> tuple[Tensor, Tensor]:
    """(max, min) over the vocabulary of each row of d, reusing every row already in the row store of this
    unembedding and computing (then storing) only the others."""
    store = RowStore(home() / "cache" / "vocab-range" / f"rows-{_unembed_key(sc)}")
    keys = row_keys(d)
    found, hi, lo = store.lookup(keys)
    todo = (~found).nonzero().flatten()
    if len(todo):
        new, back = torch.unique(keys[todo], dim=0, return_inverse=True)  # equal rows (e.g. zeroed ones) once
        first = torch.full((len(new),), len(todo), dtype=torch.long).scatter_reduce(
            0, back, torch.arange(len(todo)), "amin"
        )
        with wide():
            parts = [
                ((sc._centre(ch) * sc.gain) @ sc.WU.T).aminmax(dim=-1)
                for ch in d[todo[first].to(d.device)].split(sc._rows_per_chunk())
            ]
        new_hi, new_lo = torch.cat([p.max for p in parts]).cpu(), torch.cat([p.min for p in parts]).cpu()
        hi[todo], lo[todo] = new_hi[back], new_lo[back]
        store.add(new, new_hi, new_lo)
    return hi.to(d.device), lo.to(d.device)


def row_keys(d: Tensor) -> Tensor:
    """[N, 2] int64: the first 128 bits of the sha256 of each row's float32 bytes."""
    import numpy as np

    rows = d.detach().float().cpu().contiguous().numpy()
    digest = b"".join(hashlib.sha256(r).digest()[:16] for r in rows)
    return torch.from_numpy(np.frombuffer(digest, dtype=np.int64).reshape(-1, 2).copy())


class RowStore:
    """Vocabulary ranges of single rows (value vectors) under one unembedding, addressed by `row_keys`: a folder
    of shard files, one per computation (no two writers share a file), read once per process and again when new
    shards appear."""

    _memo: dict[Path, tuple[frozenset[str], Tensor, Tensor, Tensor]] = {}

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _index(self) -> tuple[Tensor, Tensor, Tensor]:
        names = frozenset(p.name for p in self.folder.glob("*.pt")) if self.folder.is_dir() else frozenset()
        memo = self._memo.get(self.folder)
        if memo is None or memo[0] != names:
            parts = []
            for name in sorted(names):
                try:
                    parts.append(torch.load(self.folder / name, map_location="cpu"))
                except Exception:  # a torn or foreign file only costs recomputation
                    continue
            keys = torch.cat([p[0] for p in parts]) if parts else torch.zeros(0, 2, dtype=torch.long)
            hi = torch.cat([p[1] for p in parts]) if parts else torch.zeros(0)
            lo = torch.cat([p[2] for p in parts]) if parts else torch.zeros(0)
            order = keys[:, 0].argsort()
            memo = (names, keys[order], hi[order].float(), lo[order].float())
            self._memo[self.folder] = memo
        return memo[1], memo[2], memo[3]

    def lookup(self, keys: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(found [N] bool, hi [N], lo [N]) for the rows `keys` [N, 2] (hi, lo are 0 where not found)."""
        known, k_hi, k_lo = self._index()
        n = len(keys)
        hi, lo = torch.zeros(n), torch.zeros(n)
        if not len(known):
            return torch.zeros(n, dtype=torch.bool), hi, lo
        pos = torch.searchsorted(known[:, 0].contiguous(), keys[:, 0].contiguous()).clamp_max(len(known) - 1)
        found = (known[pos] == keys).all(-1)
        hi[found], lo[found] = k_hi[pos[found]], k_lo[pos[found]]
        return found, hi, lo

    def add(self, keys: Tensor, hi: Tensor, lo: Tensor) -> None:
        name = hashlib.sha256(keys.numpy().tobytes()).hexdigest()[:32]
        _save_quietly(self.folder / f"{name}.pt", (keys.clone(), hi.float().clone(), lo.float().clone()))


def _unembed_key(sc: Scorer) -> str:
    """sha256 of the unembedding, the final gain and the norm kind (cached on the unembedding tensor)."""
    wu = sc.view.unembed_matrix()
    mem = getattr(wu, "_surgery_sha", None)
    if mem is None or mem[0] != wu._version:
        h = hashlib.sha256(wu.detach().float().cpu().contiguous().numpy())  # the buffer itself: no 4 x V x d copy
        h.update(sc.gain.detach().float().cpu().contiguous().numpy())
        h.update(sc.view.arch.norm_kind.encode())
        mem = (wu._version, h.hexdigest())
        wu._surgery_sha = mem
    return mem[1]


def _fingerprint(d: Tensor, sc: Scorer) -> str:
    """sha256 of the value vectors, the unembedding and the final gain (what the vocabulary range depends on)."""
    h = hashlib.sha256(_unembed_key(sc).encode())
    h.update(d.detach().float().cpu().contiguous().numpy())
    return h.hexdigest()[:32]


def _save_quietly(path: Path, obj) -> None:
    """Best-effort cache write (atomic); a read-only disk only costs recomputation."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except OSError:
        pass


def _ragged(rows: Tensor, vals: Tensor, B: int) -> tuple[Tensor, Tensor]:
    """Group vals by row into a padded [B, C] tensor (pad with the row's first value) and its pad mask."""
    counts = torch.bincount(rows, minlength=B)
    C = int(counts.max())
    out = torch.zeros(B, C, dtype=torch.long)
    pad = torch.ones(B, C, dtype=torch.bool)
    pos = torch.arange(len(rows)) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    out[rows, pos] = vals
    pad[rows, pos] = False
    return out, pad


# ---- vocabulary projection ----------------------------------------------------------------------------------
@torch.no_grad()
def top_tokens(view: ModelView, tokenizer, layer: int, index: int, sign: float = 1.0, n: int = 10) -> list[str]:
    """Top-n tokens of value vector v_k through the unembedding (W_U g v_k); a negative coefficient promotes
    the bottom tokens, so sign < 0 returns those."""
    v = view.values(layer)[index].float()
    logits = view.readout(v[None], torch.ones(1, 1, device=v.device))[0]
    ids = (logits * (1.0 if sign >= 0 else -1.0)).topk(n).indices
    return [tokenizer.decode([int(i)]) for i in ids]


# ---- settings and comparisons -------------------------------------------------------------------------------
def parse_layers(spec: str | None, n_layers: int) -> list[int]:
    """'deep' (second half), 'A-B' (inclusive), '3,5,7', or None (all) -> sorted layer list."""
    if spec is None or spec == "all":
        return list(range(n_layers))
    if not str(spec).strip():
        raise UsageError("empty layer range; use A-B, a list like 3,5,7, 'deep' or 'all'")
    if spec == "deep":
        return list(range(n_layers // 2, n_layers))
    try:
        spans = [(int(lo), int(hi or lo)) for lo, _, hi in (part.partition("-") for part in spec.split(","))]
    except ValueError:
        raise UsageError(f"bad layer range {spec!r}; use A-B, a list like 3,5,7, 'deep' or 'all'") from None
    out: set[int] = set()
    for a, b in spans:
        if a > b:
            raise UsageError(f"layer range {a}-{b} is empty; write the lower layer first: {b}-{a}")
        out.update(range(a, b + 1))
    layers = sorted(out)
    if not layers or layers[0] < 0 or layers[-1] >= n_layers:
        raise UsageError(f"layer range {spec!r} is outside the model (layers 0..{n_layers - 1})")
    return layers


def target_id(tokenizer, text: str) -> int:
    """The single token id of `text`, or one clear error."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        raise UsageError(f"target {text!r} is {len(ids)} tokens {pieces}; give one token, e.g. {pieces[:1]}")
    return ids[0]


@dataclass
class Comparison:
    """Result of scoring B cases in setting A (and optionally B)."""

    top: TopK
    target: Tensor  # [B]
    coef_a: dict[int, Tensor]  # layer -> [B, N]
    coef_b: dict[int, Tensor] | None
    imp_a: dict[int, Tensor]  # layer -> [B, N] exact where rescored, first-order elsewhere
    delta: dict[int, Tensor]
    scorer_a: Scorer
    scorer_b: Scorer | None = None


@torch.no_grad()
def compare(
    view_a: ModelView,
    batch_a: tuple[Tensor, Tensor],
    layers: list[int],
    k: int,
    view_b: ModelView | None = None,
    batch_b: tuple[Tensor, Tensor] | None = None,
    ablate_b: HeadList = (),
    target: Tensor | None = None,
    exhaustive: bool = False,
    chunk: int = 256,
    max_rescore: int = 2048,
    margin: int = 8,
    budget: int = 1 << 22,
) -> Comparison:
    """Importance in setting A, and (when a B setting is given) the change A - B, for a batch of cases.

    B is: the same model with heads ablated (ablate_b), another model on the same input (view_b), or the same
    model on another input (batch_b). Same input: B uses A's sigma and target (the paper); other input: its own
    sigma, A's target."""
    sa = collect(view_a, *batch_a, layers)
    sb = None
    if view_b is not None or batch_b is not None or ablate_b:
        sb = collect(view_b or view_a, *(batch_b or batch_a), layers, ablate=ablate_b)
    return compare_states(
        view_a, sa, k, view_b, sb, batch_b is not None, target, exhaustive, chunk, max_rescore, margin, budget
    )


@torch.no_grad()
def compare_states(
    view_a: ModelView,
    sa: State,
    k: int,
    view_b: ModelView | None = None,
    sb: State | None = None,
    other_input: bool = False,
    target: Tensor | None = None,
    exhaustive: bool = False,
    chunk: int = 256,
    max_rescore: int = 2048,
    margin: int = 8,
    budget: int = 1 << 22,
) -> Comparison:
    """`compare` from the settings' collected forwards (B's state None: one setting; `other_input`: B ran on
    its own prompts, so it gets its own sigma)."""
    layers = sa.layers
    w = sa.logits.argmax(-1) if target is None else target.to(sa.logits.device).expand(sa.logits.shape[0])
    sigma_a = view_a.final_sigma(sa.hfin)
    work = Workspace()
    a = Scorer(view_a, sa, sigma_a, w, chunk, budget, work)
    b = None
    if sb is not None:
        vb = view_b or view_a
        sigma_b = vb.final_sigma(sb.hfin) if other_input else sigma_a
        b = Scorer(vb, sb, sigma_b, w, chunk, budget, work)
    if exhaustive:
        return _exhaustive(a, b, layers, k, w)
    top, dense = certified_topk(a, k, b, margin=margin, max_rescore=max_rescore)
    imp_a = dense if b is None else {l: (sum(a.bounds(l)) / 2).cpu() for l in layers}
    return Comparison(top, w.cpu(), _cpu(sa.m), _cpu(b.s.m) if b else None, imp_a, dense, a, b)


def _cpu(d: dict[int, Tensor]) -> dict[int, Tensor]:
    return {k: v.cpu() for k, v in d.items()}


def _exhaustive(a: Scorer, b: Scorer | None, layers: list[int], k: int, w: Tensor) -> Comparison:
    ea = {l: a.exhaustive(l) for l in layers}
    delta = {l: ea[l] - b.exhaustive(l) for l in layers} if b else ea
    flat = torch.cat([delta[l] for l in layers], 1)
    top = flat.topk(min(k, flat.shape[1]), dim=1)
    tk = TopK(
        *unflatten(top.indices, layers, offsets_of([a.view.ffn_width(l) for l in layers])),
        top.values,
        torch.ones(flat.shape[0], dtype=torch.bool),
        flat.numel(),
    )
    return Comparison(tk, w.cpu(), _cpu(a.s.m), _cpu(b.s.m) if b else None, ea, delta, a, b)


def neuron_name(layer: int, index: int) -> str:
    """Paper notation: 28_3696."""
    return f"{layer}_{index}"


def finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


# ---- dataset mode ---------------------------------------------------------------------------------------------
def cases_per_pass(batch_size: int, held: int, n_layers: int, vocab: int) -> int:
    """Cases one `scan` pass holds: at most `batch_size`, and at most `held` floats of base logits per setting."""
    return max(1, min(batch_size, held // max(1, n_layers * vocab)))


@dataclass
class Scan:
    """CNA over many cases: per-case certified top-k lists and per-neuron aggregates."""

    layers: list[int]
    k: int
    top_layer: Tensor  # [C, k]
    top_index: Tensor  # [C, k]
    top_score: Tensor  # [C, k] exact scores / deltas
    certified: Tensor  # [C] bool
    targets: Tensor  # [C]
    total: dict[int, Tensor]  # layer -> [N] sum over cases (exact where rescored, interval middle elsewhere)
    total_abs: dict[int, Tensor]  # layer -> [N] sum over cases of the magnitudes of the same per-case values
    coef_a: dict[int, Tensor]  # layer -> [N] mean coefficient over cases, setting A
    coef_b: dict[int, Tensor] | None
    rescored: int = 0

    def per_case_sets(self) -> dict[int, set[int]]:
        """Union over cases of each case's top-k, per layer: the pruner's 'topN' keep set."""
        keep: dict[int, set[int]] = {l: set() for l in self.layers}
        for l, i in zip(self.top_layer.flatten().tolist(), self.top_index.flatten().tolist()):
            keep[l].add(i)
        return keep


def merge(parts: list[tuple[list[int], "Scan"]], n_cases: int) -> "Scan":
    """One Scan from scans of disjoint case subsets (`parts`: (case indices, scan of those cases), e.g. one per
    process): per-case results back in case order, sums added, mean coefficients weighted by case counts. Equal to
    scanning all cases at once up to the order of the float sums."""
    first = parts[0][1]
    k = first.top_layer.shape[1]

    def placed(name: str, dtype) -> Tensor:
        out = torch.zeros((n_cases, k) if getattr(first, name).dim() == 2 else (n_cases,), dtype=dtype)
        for idx, sc in parts:
            if idx:
                out[torch.tensor(idx)] = getattr(sc, name).to(dtype)
        return out

    def summed(name: str) -> dict[int, Tensor] | None:
        if getattr(first, name) is None:
            return None
        return {l: sum(getattr(sc, name)[l] for _, sc in parts) for l in first.layers}

    def mean(name: str) -> dict[int, Tensor] | None:
        if getattr(first, name) is None:
            return None
        return {l: sum(getattr(sc, name)[l] * len(idx) for idx, sc in parts) / max(n_cases, 1) for l in first.layers}

    return Scan(
        layers=list(first.layers),
        k=first.k,
        top_layer=placed("top_layer", first.top_layer.dtype),
        top_index=placed("top_index", first.top_index.dtype),
        top_score=placed("top_score", first.top_score.dtype),
        certified=placed("certified", torch.bool),
        targets=placed("targets", first.targets.dtype),
        total=summed("total"),
        total_abs=summed("total_abs"),
        coef_a=mean("coef_a"),
        coef_b=mean("coef_b"),
        rescored=sum(sc.rescored for _, sc in parts),
    )


def sharded_scan(state, view_a: ModelView, seqs: list[list[int]], *args, **kw) -> "Scan":
    """`scan` with the cases split over the processes of `state` (accelerate's PartialState: `accelerate launch`,
    gloo on CPUs, NCCL on GPUs): case i goes to process i mod P, every process gets the merged Scan. One process:
    plain `scan`."""
    if state.num_processes <= 1:
        return scan(view_a, seqs, *args, **kw)
    from accelerate.utils import gather_object

    mine = list(range(state.process_index, len(seqs), state.num_processes))
    part = dict(kw)
    for name in ("seqs_b", "targets"):
        if part.get(name) is not None:
            part[name] = [part[name][i] for i in mine]
    local = scan(view_a, [seqs[i] for i in mine], *args, **part) if mine else None
    parts = [p for p in gather_object([(mine, local)]) if p[1] is not None]
    return merge(parts, len(seqs))


def scan(
    view_a: ModelView,
    seqs: list[list[int]],
    layers: list[int],
    k: int,
    pad_id: int,
    *,
    view_b: ModelView | None = None,
    seqs_b: list[list[int]] | None = None,
    ablate_b: HeadList = (),
    targets: list[int] | None = None,
    batch_size: int = 16,
    progress: bool = True,
    max_rescore: int = 2048,
    chunk: int = 256,
    budget: int = 1 << 22,
    held: int = HELD,
) -> Scan:
    """Run `compare` over all cases and aggregate; see `compare` for the settings.

    The forwards run `batch_size` cases at once (left padded, grouped by length: the model's matrices see large
    blocks); the scoring passes take at most held / (layers x vocab) of them at a time. Memory is bounded by `held`
    (floats of base logits [layers, cases, vocab] one setting holds at once), `chunk` (readout rows [chunk, vocab]
    held at once) and `budget` (floats per [rows, vocab] work block, see Scorer), whatever the number of cases:
    each pass is aggregated and dropped; a forward batch keeps only its [cases, FFN width] coefficients and
    [cases, d] streams per layer. Default 2^24 floats (64 MiB): 11 cases per pass on all 30
    layers of SmolLM2 (vocabulary 49,152), 4 on a 32-layer model with Llama 3's 128k vocabulary. Per-case results
    do not depend on the batching (every score and bound is per case)."""
    from tqdm.auto import tqdm

    V = view_a.unembed_matrix().shape[0]
    per = cases_per_pass(batch_size, held, len(layers), V)

    tops: list[tuple[Tensor, ...]] = []
    total = {l: torch.zeros(view_a.ffn_width(l)) for l in layers}
    total_abs = {l: torch.zeros(view_a.ffn_width(l)) for l in layers}
    coef: dict[str, dict[int, Tensor]] = {}
    rescored = 0
    two = view_b is not None or seqs_b is not None or bool(ablate_b)
    # cases of similar length share a forward: less left padding (per-case results do not depend on the
    # batching); the per-case outputs go back to the input order at the end
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]) + (len(seqs_b[i]) if seqs_b is not None else 0))
    bar = tqdm(total=len(seqs), desc="cna", disable=not progress, unit="case")
    for s in range(0, len(seqs), batch_size):
        ids = order[s : s + batch_size]
        sa = collect(view_a, *left_pad([seqs[i] for i in ids], pad_id), layers)
        sb = (
            collect(view_b or view_a, *left_pad([(seqs_b or seqs)[i] for i in ids], pad_id), layers, ablate=ablate_b)
            if two
            else None
        )
        tgt = torch.tensor([targets[i] for i in ids]) if targets is not None else None
        for t in range(0, len(ids), per):  # the scoring passes: `per` cases' base logits at a time
            rows = slice(t, t + per)
            c = compare_states(
                view_a,
                sa.take(rows),
                k,
                view_b,
                sb.take(rows) if sb is not None else None,
                seqs_b is not None,
                None if tgt is None else tgt[rows],
                max_rescore=max_rescore,
                chunk=chunk,
                budget=budget,
            )
            # aggregate now and drop the pass (its scorers and dense estimates): memory does not grow with cases
            tops.append((c.top.layer, c.top.index, c.top.score, c.top.certified, c.target))
            for l in layers:
                total[l] += c.delta[l].sum(0)
                total_abs[l] += c.delta[l].abs().sum(0)
                for side, m in (("a", c.coef_a), ("b", c.coef_b)):
                    if m is not None:
                        coef.setdefault(side, {}).setdefault(l, torch.zeros_like(m[l][0], dtype=torch.float32))
                        coef[side][l] += m[l].float().sum(0)
            rescored += c.top.rescored
            bar.update(len(c.target))
            del c
        del sa, sb
    bar.close()
    n = len(seqs)
    mean = {side: {l: v / n for l, v in m.items()} for side, m in coef.items()}
    back = torch.empty(n, dtype=torch.long)
    back[torch.tensor(order)] = torch.arange(n)  # sorted position of each input case
    return Scan(
        layers, k, *(torch.cat(col)[back] for col in zip(*tops)), total, total_abs, mean["a"], mean.get("b"), rescored
    )
