"""Path patching with a null-operator counterfactual (Zhang et al., ICML 2024, section 3): which heads carry arithmetic.

    surgery heads --method path-patch --counterfactual null-operator --digits 2 --limit 60 --out runs/pp


Clean prompt "Calculate: 42+34=", counterfactual "Calculate: 42 nothing34=": the operator TOKEN is replaced by the
null word's single token, so both prompts have the same length and every position lines up. For a sender head
(l, h) the patched run is the clean run in which
- z_h at layer l is the counterfactual run's z_h (every position),
- every head of every later layer is frozen to its clean output z (so the change reaches the logits only through
  the residual stream and the MLPs, which are recomputed: the path sender -> logits),
and the effect is (logit_patched - logit_clean) / logit_clean of the answer's first token at the last position,
averaged over problems. Key heads: effect below -5% (the paper's threshold). Runs use prefix reuse: the patched
run starts at layer l from the clean residual (`hooks.run_from`); a test checks it against a plain full forward.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from surgery.errors import UsageError
from surgery.evals import arithmetic
from surgery.model.arch import ModelView
from surgery.model.batching import device_of, left_pad, position_ids
from surgery.model.hooks import Hooks, run_from

NULL_WORD = " nothing"
THRESHOLD = -0.05
COUNTERFACTUALS = ("null-operator",)


def null_operator_pairs(tokenizer, problems, null: str = NULL_WORD) -> tuple[list, list, list]:
    """(clean ids, counterfactual ids, answer's first token) per problem whose operator is exactly one token."""
    null_ids = tokenizer(null, add_special_tokens=False).input_ids
    if len(null_ids) != 1:
        raise UsageError(f"the null word {null!r} is {len(null_ids)} tokens for this tokenizer; it must be one")

    clean, cf, targets = [], [], []
    for p in problems:
        full, start = arithmetic.answer_tokens(tokenizer, p["prompt"], p["answer"])
        ids = full[:start]
        ops = [i for i, t in enumerate(ids) if tokenizer.decode([t]).strip() == p["op"]]
        if len(ops) != 1:
            continue
        c = list(ids)
        c[ops[0]] = null_ids[0]
        clean.append(ids)
        cf.append(c)
        targets.append(full[start])
    if not clean:
        raise UsageError(
            "no problem has a single-token operator for the null-operator counterfactual; "
            "use the calculate or plain template"
        )
    return clean, cf, targets


@torch.no_grad()
def _capture(view: ModelView, ids: Tensor, mask: Tensor) -> tuple[Tensor, dict, dict]:
    """Last-position logits [B, V], head outputs z per layer [B, T, H, dh], residual inputs per layer."""
    layers = range(view.n_layers)
    with Hooks(view) as h:
        h.capture("z", layers=layers, positions=None)
        h.capture("resid_in", layers=layers, positions=None)
        logits = (
            view.model(
                input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), logits_to_keep=1, use_cache=False
            )
            .logits[:, -1]
            .float()
        )
    return logits, {l: h.store["z", l] for l in layers}, {l: h.store["resid_in", l] for l in layers}


@torch.no_grad()
def patched_logits(
    view: ModelView, ids: Tensor, mask: Tensor, layer: int, head: int, z_clean: dict, z_cf: dict, resid: dict
) -> Tensor:
    """Last-position logits [B, V] with head (layer, head) patched from the counterfactual and every later head
    frozen to its clean output, run from `layer` on the clean residual."""
    H = view.n_heads
    keep = torch.ones(H, device=ids.device)
    keep[head] = 0.0
    with Hooks(view) as h:
        h.ablate_heads(layer, keep, replacement=z_cf[layer])
        for l in range(layer + 1, view.n_layers):
            h.ablate_heads(l, torch.zeros(H, device=ids.device), replacement=z_clean[l])
        with run_from(view, layer, resid[layer]):
            out = view.model(
                input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), logits_to_keep=1, use_cache=False
            )
    return out.logits[:, -1].float()


def effects(
    view: ModelView,
    clean: list,
    cf: list,
    targets: list,
    pad: int,
    heads: Sequence[tuple[int, int]] | None = None,
    progress: bool = True,
) -> tuple[Tensor, Tensor]:
    """(effect [L, H] (nan where not scanned), clean answer logit per problem [B])."""
    dev = device_of(view.model)
    ids, mask = (t.to(dev) for t in left_pad(clean, pad))
    ids_cf, mask_cf = (t.to(dev) for t in left_pad(cf, pad))
    tgt = torch.tensor(targets, device=dev)
    rows = torch.arange(len(targets), device=dev)
    base, z_clean, resid = _capture(view, ids, mask)
    _, z_cf, _ = _capture(view, ids_cf, mask_cf)
    base_logit = base[rows, tgt]
    out = torch.full((view.n_layers, view.n_heads), float("nan"))
    todo = heads or [(l, h) for l in range(view.n_layers) for h in range(view.n_heads)]
    for l, h in tqdm(todo, desc="path patching", disable=not progress):
        p = patched_logits(view, ids, mask, l, h, z_clean, z_cf, resid)[rows, tgt]
        out[l, h] = float(((p - base_logit) / base_logit).mean())
    return out, base_logit.cpu()
