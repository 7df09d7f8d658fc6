"""Head scan: ablate every attention head, one at a time, and measure task accuracy per operation (paper Tables 1-3).

    surgery heads --model smollm2-135m --task arithmetic --digits 1 [--ablation zero|mean] [--mode exact|screen]


Exact and fast, without ever copying the model:
- teacher-forced cases that are prefixes of one another (the answer tokens of one problem) share one sequence;
  sequences are left-padded so every case's logits sit in the last `keep` positions;
- per batch, ONE clean forward caches the residual input of every layer (prefix reuse); a head of layer l is then
  scanned by running only layers l.. on the cached states (`hooks.run_from`), many heads at once: the batch is
  stacked G times with a different head masked in each copy (`Hooks.ablate_heads` with a [G*B, H] mask);
- zero ablation = the head's o_proj input columns set to 0 (the paper); mean ablation replaces z_h by its mean
  over every non-pad position of every sequence of the dataset (one clean pass first).
Screen (`--mode screen`): the attribution -grad . z_h (mean: grad . (mean_h - z_h)) of the summed target log-prob,
summed over positions, for all heads from one forward + one backward per batch; only the top `--verify K` heads
get the exact scan, and the report names only heads with exact numbers.
Sharding: under `accelerate launch --multi_gpu --num_processes N -m surgery heads ...` (also on CPU, where it
starts N processes joined by gloo; `--cpu` would start only one) the work units (a layer's heads, in groups of G) are
split across processes;
each appends finished units to DIR/heads.partial.r<rank>.jsonl, which is also what an interrupted scan resumes
from; rank 0 merges. Units are the same whatever the process count, so merged results equal a 1-process run.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from surgery.errors import UsageError
from surgery.evals import arithmetic, tasks
from surgery.model.arch import ModelView
from surgery.model.batching import cache_kwargs, device_of, left_pad, pad_id, position_ids
from surgery.model.hooks import Hooks, run_from

Head = tuple[int, int]
RESID_CACHE_BYTES = 2 << 30  # keep every batch's clean residuals in memory up to this size; else recompute


# ---- data: cases -> packed, left-padded batches ------------------------------------------------------------
@dataclass
class Batch:
    """Left-padded sequences; case i of this batch is read at row rows[i], position keep-1-offs[i] of the logits."""

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    rows: Tensor
    offs: Tensor
    targets: Tensor
    case_idx: Tensor  # indices into the scan's case list
    keep: int
    prefix: int = 0  # leading tokens shared by every row (computed once per ablation, then reused via a KV cache)

    def inputs(self, device, repeat: int = 1) -> dict:
        def rep_(t: Tensor) -> Tensor:
            return t.to(device).repeat(repeat, 1)

        return dict(
            input_ids=rep_(self.input_ids),
            attention_mask=rep_(self.attention_mask),
            position_ids=rep_(self.position_ids),
            logits_to_keep=self.keep,
            use_cache=False,
        )


def pack(
    input_ids: Sequence[Sequence[int]],
    targets: Sequence[int],
    batch_size: int,
    pad_id: int = 0,
    window: int | None = None,
) -> list[Batch]:
    """Group cases whose context is a prefix of another case's context (same sequence, earlier position) and
    batch the sequences, `batch_size` per batch, in lexicographic order. Exactly one case per (sequence, position).
    Rows are laid out as shared prefix | left padding | suffix (positions count real tokens), so the tokens every
    row of a batch starts with (`share`) can be run once per ablation."""
    order = sorted(range(len(input_ids)), key=lambda i: -len(input_ids[i]))
    seqs: list[list[int]] = []
    home: dict[tuple, int] = {}  # every prefix of a sequence -> that sequence
    members: list[list[tuple[int, int]]] = []  # per sequence: (case, offset from its end)
    for i in order:
        key = tuple(input_ids[i])
        if key not in home:
            seqs.append(list(key))
            members.append([])
            for j in range(1, len(key) + 1):
                home.setdefault(key[:j], len(seqs) - 1)
        s = home[key]
        members[s].append((i, len(seqs[s]) - len(key)))
    share = window is None or max(map(len, seqs)) <= window
    order = sorted(range(len(seqs)), key=lambda s: (seqs[s], s))  # lexicographic: batches share long prefixes
    out = []
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        cs = [(r, i, o) for r, s in enumerate(chunk) for i, o in members[s]]
        keep = 1 + max(o for _, _, o in cs)
        # P <= (shortest row) - keep: every read position lies in the suffix. Clamped at 0: a row shorter than the
        # batch's longest target (" Paris" beside " Andorra la Vella") made P negative, and seqs[s][P:] /
        # expand(B, P) then swapped every row for the first row's prefix + its own last token (see
        # tests/test_pack_layout.py)
        P = (
            max(0, min(_common_prefix([seqs[s] for s in chunk]), min(len(seqs[s]) for s in chunk) - keep))
            if share
            else 0
        )
        ids, mask = left_pad([seqs[s][P:] for s in chunk], pad_id)  # layout: shared prefix | pad | suffix
        pre = torch.tensor([seqs[chunk[0]][:P]], dtype=torch.long).expand(len(chunk), P)
        ids, mask = torch.cat([pre, ids], 1), torch.cat([torch.ones_like(pre), mask], 1)
        out.append(
            Batch(
                ids,
                mask,
                position_ids(mask),
                torch.tensor([c[0] for c in cs]),
                torch.tensor([c[2] for c in cs]),
                torch.tensor([int(targets[c[1]]) for c in cs]),
                torch.tensor([c[1] for c in cs]),
                keep,
                max(P, 0),
            )
        )
    return out


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for j in range(n):
        if any(s[j] != seqs[0][j] for s in seqs):
            return j
    return n


# ---- the engine -------------------------------------------------------------------------------------------
def score(logits: Tensor, b: Batch, copies: int) -> tuple[Tensor, Tensor]:
    """(correct [copies, n], target log-prob [copies, n]) of b's cases from logits [copies*B, keep, V]."""
    B = b.input_ids.shape[0]
    rows = (torch.arange(copies)[:, None] * B + b.rows[None]).to(logits.device)
    pos = (b.keep - 1 - b.offs).to(logits.device).expand_as(rows)
    picked = logits[rows, pos].float()  # [copies, n, V]
    tgt = b.targets.to(logits.device).expand_as(rows)
    lp = picked.log_softmax(-1).gather(-1, tgt[..., None])[..., 0]
    return (picked.argmax(-1) == tgt).cpu(), lp.cpu()


@torch.no_grad()
def clean(view: ModelView, b: Batch, layers: Sequence[int] = ()) -> tuple[Tensor, Tensor, dict[int, Tensor]]:
    """The unablated model on b: (correct [n], log-prob [n], residual input of each of `layers` [B, T, d])."""
    with Hooks(view) as h:
        if layers:
            h.capture("resid_in", layers=layers, positions=None)
        logits = view.model(**b.inputs(_device(view))).logits
    ok, lp = score(logits, b, 1)
    return ok[0], lp[0], {l: h.store["resid_in", l] for l in layers}


@torch.no_grad()
def ablated(
    view: ModelView, b: Batch, layer: int, heads: Sequence[int], resid: Tensor, repl: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Each head of `layer` in `heads` ablated on its own (one stacked forward from `layer` upward, on the clean
    residual `resid`): (correct [len(heads), n], log-prob [len(heads), n])."""
    G, B, H, P = len(heads), b.input_ids.shape[0], view.n_heads, b.prefix
    mask = torch.ones(G, H)
    mask[torch.arange(G), torch.tensor(list(heads))] = 0.0
    mask, dev, cache = mask.to(resid.device), _device(view), None
    with Hooks(view) as h:
        if P:  # the shared prefix: one row per head, keys/values kept in a cache for every row of the batch
            cache = _tail_cache(view.config, layer)
            h.ablate_heads(layer, mask, replacement=repl)
            with run_from(view, layer, resid[:1, :P].repeat(G, 1, 1)):
                view.model(
                    input_ids=b.input_ids[:1, :P].to(dev).repeat(G, 1),
                    position_ids=b.position_ids[:1, :P].to(dev).repeat(G, 1),
                    logits_to_keep=1,
                    **cache_kwargs(view.model, cache),
                )
            cache.batch_repeat_interleave(B)
        h.ablate_heads(layer, mask.repeat_interleave(B, 0), replacement=repl)
        inp = b.inputs(dev, repeat=G)
        inp.update(input_ids=inp["input_ids"][:, P:], position_ids=inp["position_ids"][:, P:])
        if P:
            inp.update(cache_kwargs(view.model, cache))
        with run_from(view, layer, resid[:, P:].repeat(G, 1, 1)):
            logits = view.model(**inp).logits
    return score(logits, b, G)


def _tail_cache(config, first: int):
    """A DynamicCache that only layers >= `first` fill (prefix reuse); questions the model's forward asks about
    lower layers (past length, mask sizes) are answered by the first filled layer of the same kind."""
    from transformers import DynamicCache

    class TailCache(DynamicCache):
        def _map(self, i: int) -> int:
            if i >= first or i >= len(self.layers):
                return i
            kind = self.is_sliding[i]
            return next((j for j in range(first, len(self.layers)) if self.is_sliding[j] == kind), first)

        def get_seq_length(self, layer_idx: int = 0) -> int:
            return super().get_seq_length(self._map(layer_idx))

        def get_mask_sizes(self, query_length, layer_idx: int):
            return super().get_mask_sizes(query_length, self._map(layer_idx))

    return TailCache(config=config)


def _device(view: ModelView) -> torch.device:
    return device_of(view.model)


def _stop_at(view: ModelView, b: Batch, layer: int) -> Tensor:
    """The clean residual input of `layer` only, running layers below it and no further."""

    class Stop(Exception):
        pass

    box = {}

    def grab(mod, args, kwargs):
        box["h"] = args[0] if args else kwargs["hidden_states"]
        raise Stop

    hd = view.layer(layer).register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            view.model(**b.inputs(_device(view)))
    except Stop:
        pass
    finally:
        hd.remove()
    return box["h"]


class Residuals:
    """Clean residual inputs per (batch, layer): all cached after one forward per batch when they fit in
    RESID_CACHE_BYTES, else recomputed per layer (only the layers below it run)."""

    def __init__(self, view: ModelView, batches: list[Batch]):
        self.view, self.batches, self.cache = view, batches, {}
        tokens = sum(b.input_ids.numel() for b in batches)
        self.fits = tokens * view.n_layers * view.hidden_size * 4 <= RESID_CACHE_BYTES

    def get(self, i: int, layer: int) -> Tensor:
        if not self.fits:
            return _stop_at(self.view, self.batches[i], layer)
        if i not in self.cache:
            self.cache[i] = clean(self.view, self.batches[i], range(self.view.n_layers))[2]
        return self.cache[i][layer]


@torch.no_grad()
def head_means(view: ModelView, batches: list[Batch]) -> Tensor:
    """Mean head output z [L, H, dh] over every non-pad position of every sequence (mean ablation)."""
    total = torch.zeros(view.n_layers, view.n_heads, view.head_dim, dtype=torch.float64)
    count = 0
    for b in batches:
        with Hooks(view) as h:
            h.capture("z", positions=None)
            view.model(**b.inputs(_device(view)))
        m = b.attention_mask.to(torch.float64)[..., None, None]
        for l in range(view.n_layers):
            total[l] += (h.store["z", l].cpu().double() * m).sum((0, 1))
        count += int(b.attention_mask.sum())
    return (total / count).float()


def attribution(view: ModelView, batches: list[Batch], means: Tensor | None = None) -> Tensor:
    """First-order change of the summed target log-prob when each head is ablated, [L, H]:
    -grad_z . z (zero) or grad_z . (mean - z) (mean), summed over positions; one forward + backward per batch."""
    out = torch.zeros(view.n_layers, view.n_heads, dtype=torch.float64)
    for b in batches:
        with Hooks(view) as h, torch.enable_grad():
            h.capture("z", positions=None, keep_grad=True)
            logits = view.model(**b.inputs(_device(view))).logits
            rows, pos = b.rows.to(logits.device), (b.keep - 1 - b.offs).to(logits.device)
            lp = logits[rows, pos].float().log_softmax(-1).gather(-1, b.targets.to(logits.device)[:, None]).sum()
            zs = [h.store["z", l] for l in range(view.n_layers)]
            grads = torch.autograd.grad(lp, zs)
        for l, (z, g) in enumerate(zip(zs, grads)):
            delta = -z.detach() if means is None else means[l].to(z) - z.detach()
            out[l] += (g * delta).sum((0, 1, 3)).double().cpu()
    return out.float()


# ---- units of work, sharding and resumable state ----------------------------------------------------------
def units(view: ModelView, heads: Sequence[Head], group: int) -> list[tuple[int, tuple[int, ...]]]:
    """(layer, heads) work units: each layer's heads in scan order, `group` per unit."""
    per_layer: dict[int, list[int]] = defaultdict(list)
    for l, h in heads:
        per_layer[l].append(h)
    return [
        (l, tuple(per_layer[l][i : i + group])) for l in sorted(per_layer) for i in range(0, len(per_layer[l]), group)
    ]


def group_size(n_heads: int, batch_rows: int, max_rows: int = 2048) -> int:
    """Heads stacked per forward: all heads of a layer when rows (batch x heads) stay within max_rows."""
    return max(1, min(n_heads, max_rows // max(batch_rows, 1)))


def load_partial(out: Path, fingerprint: str) -> dict[Head, dict]:
    """Finished head rows persisted by earlier (maybe interrupted) runs with the same configuration."""
    done = {}
    for f in sorted(out.glob("heads.partial.r*.jsonl")):
        for line in f.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by an interruption
            if row.get("fingerprint") == fingerprint:
                done[(row["layer"], row["head"])] = row
    return done


def scan(
    view: ModelView,
    batches: list[Batch],
    n_cases: int,
    heads: Sequence[Head],
    repl: Tensor | None = None,
    done: dict[Head, dict] | None = None,
    sink=None,
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
) -> dict[Head, dict]:
    """Exact ablation of each head in `heads` on all cases: {head: {"correct": bool [n], "logprob": float [n]}}.

    Units are dealt round-robin to `world` processes (this one is `rank`); heads in `done` are skipped;
    `sink(rows)` receives each finished unit (persistence)."""
    done = done or {}
    G = group_size(view.n_heads, max(b.input_ids.shape[0] for b in batches))
    todo = [u for k, u in enumerate(units(view, heads, G)) if k % world == rank]
    todo = [u for u in todo if any((u[0], h) not in done for h in u[1])]
    res = Residuals(view, batches)
    results: dict[Head, dict] = {}
    for layer, hs in tqdm(todo, desc="heads", unit="unit", disable=not progress):
        ok = torch.zeros(len(hs), n_cases, dtype=torch.bool)
        lp = torch.zeros(len(hs), n_cases)
        for i, b in enumerate(batches):
            c, p = ablated(view, b, layer, hs, res.get(i, layer), None if repl is None else repl[layer])
            ok[:, b.case_idx], lp[:, b.case_idx] = c, p
        rows = {(layer, h): {"correct": ok[g], "logprob": lp[g]} for g, h in enumerate(hs)}
        results.update(rows)
        if sink is not None:
            sink(rows)
    return results


# ---- summaries ---------------------------------------------------------------------------------------------
def keys_of(labels: dict[str, list]) -> dict[str, np.ndarray]:
    """Masks for the keys accuracy is reported under: overall, each op, each group (1D+), each case type."""
    n = len(labels["op"])
    out = {"overall": np.ones(n, bool)}
    for col in ("op", "group", "case_type"):
        for v in sorted(set(labels[col])):
            out[v] = np.asarray(labels[col]) == v
    return out


def summary(correct, logprob, masks: dict[str, np.ndarray]) -> dict:
    c, lp = np.asarray(correct, bool), np.asarray(logprob, float)
    return {
        "acc": {k: float(c[m].mean()) if m.any() else float("nan") for k, m in masks.items()},
        "n": {k: int(m.sum()) for k, m in masks.items()},
        "logprob": float(lp.mean()),
    }


def head_row(layer: int, head: int, s: dict, base: dict) -> dict:
    drop = {k: round(base["acc"][k] - a, 6) for k, a in s["acc"].items()}
    return {
        "layer": layer,
        "head": head,
        "acc": {k: round(a, 6) for k, a in s["acc"].items()},
        "drop": drop,
        "n": s["n"],
        "logprob_drop": round(base["logprob"] - s["logprob"], 6),
    }


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""

    def ranks(x):
        x = np.asarray(x, float)
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for v in np.unique(x):
            r[x == v] = r[x == v].mean()
        return r

    if len(a) < 2:
        return float("nan")
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def heads_of(view: ModelView, only: Sequence[Head] | None) -> list[Head]:
    if only is None:
        return [(l, h) for l in range(view.n_layers) for h in range(view.n_heads)]
    for l, h in only:
        view.check_head(l, h)
    return list(dict.fromkeys((int(l), int(h)) for l, h in only))


def arithmetic_batches(loaded, digits, ops, templates, limit, seed, batch_size) -> tuple[dict, list[Batch]]:
    kw = dict(ops=tuple(ops)) if ops else {}
    problems = arithmetic.build(
        digits=tuple(digits), templates=tuple(templates or arithmetic.DEFAULT_TEMPLATES), seed=seed, limit=limit, **kw
    )
    if len(problems) == 0:
        raise UsageError("no arithmetic problems for these options; widen --digits/--ops or raise --limit")
    cases = arithmetic.cases(problems, loaded.tokenizer)
    labels = {c: list(cases[c]) for c in ("op", "group", "case_type", "digits")}
    window = getattr(loaded.model.config, "sliding_window", None)
    return labels, pack(cases["input_ids"], cases["target"], batch_size, pad_id(loaded.tokenizer), window)


def user_batches(loaded, ds, batch_size) -> tuple[dict, list[Batch]]:
    """The user's cases (`surgery.tasks`): every target token teacher forced; reported per group (as "op" and
    "group") and first vs later target token (as "case_type")."""
    cases = tasks.cases(loaded.tokenizer, ds)
    groups = list(cases["group"])
    labels = {
        "op": groups,
        "group": groups,
        "digits": [0] * len(groups),
        "case_type": ["first-token" if j == 0 else "later-token" for j in cases["token_index"]],
    }
    window = getattr(loaded.model.config, "sliding_window", None)
    return labels, pack(cases["input_ids"], cases["target"], batch_size, pad_id(loaded.tokenizer), window)


def fingerprint(loaded, config: dict, heads) -> str:
    keep = {k: v for k, v in config.items() if k not in ("mode", "verify", "processes")}
    blob = json.dumps([loaded.source, str(next(loaded.model.parameters()).dtype), keep], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def partial_sink(path: Path, fp: str):
    def write(rows: dict[Head, dict]) -> None:
        with open(path, "a") as f:
            for (l, h), r in rows.items():
                f.write(
                    json.dumps(
                        {
                            "fingerprint": fp,
                            "layer": l,
                            "head": h,
                            "correct": "".join("1" if x else "0" for x in r["correct"].tolist()),
                            "logprob": [round(float(x), 6) for x in r["logprob"].tolist()],
                        }
                    )
                    + "\n"
                )
            f.flush()

    return write


def baseline(view: ModelView, batches: list[Batch], n: int) -> tuple[Tensor, Tensor]:
    ok, lp = torch.zeros(n, dtype=torch.bool), torch.zeros(n)
    for b in batches:
        ok[b.case_idx], lp[b.case_idx] = clean(view, b)[:2]
    return ok, lp
