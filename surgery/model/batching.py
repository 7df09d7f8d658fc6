"""Batched forward passes over left-padded token sequences, and the scoring built on them.

Everything here talks to the model only through `model(input_ids, attention_mask, position_ids, logits_to_keep)`
so it works for every architecture. Sequences are LEFT-padded: the last real token of every row sits at the
last position, so `logits_to_keep=k` computes only the logits we need (one row of lm_head work per kept
position). position_ids are counted from each row's first real token, so a padded row gives the same logits
as the same row run alone. The engine (cna, heads, selection, lora) and the eval suites both import this module;
it imports nothing of theirs.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from surgery.errors import UsageError


def device_of(model: torch.nn.Module) -> torch.device:
    """Where inputs must go: the device of the model's first parameter, or, where accelerate placed the model
    (device_map, offload), the execution device of its input embedding (an offloaded weight sits on `meta`)."""
    get = getattr(model, "get_input_embeddings", None)
    hook = getattr(get(), "_hf_hook", None) if get is not None else None
    where = getattr(hook, "execution_device", None)
    if where is not None:
        return torch.device(where)
    return next(model.parameters()).device


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token (left padding): cumsum(mask) - 1, pads at 0."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def _contiguous_input(module: torch.nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(), *args[1:])


def contiguous_head(model: torch.nn.Module) -> torch.nn.Module:
    """Makes the LM head's input contiguous before its matmul (a forward pre-hook; idempotent; returns `model`).

    With `logits_to_keep`, transformers feeds the head `hidden[:, -k:, :]`, a strided view; torch's CPU linear
    then takes a batched-matmul path that is 4-5x slower than on the same values made contiguous (torch 2.13,
    d 576, vocabulary 49,152: 585 ms vs 116 ms for 64 rows at k = 1; the command is on
    docs/benchmarks/training.md). The head is the largest single matmul of a small model, so this is a third of a
    LoRA training step and most of an evaluation batch. The values, and so the logits, are the same."""
    head = model.get_output_embeddings()
    if head is not None and _contiguous_input not in head._forward_pre_hooks.values():
        head.register_forward_pre_hook(_contiguous_input)
    return model


def cache_kwargs(model: torch.nn.Module, cache) -> dict:
    """The keyword arguments that pass a KV cache into `model`'s forward (and ask for one back): transformers
    5.2x names it `cache`, earlier 5.x `past_key_values` (deprecated since, removed in 5.40)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {_cache_name(type(base)): cache, "use_cache": True}


@functools.cache
def _cache_name(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def output_cache(output):
    """The KV cache a forward returned, under either name (see `cache_kwargs`)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into (input_ids, attention_mask) LongTensors of shape [B, max_len]."""
    if not seqs or any(len(s) == 0 for s in seqs):
        raise UsageError("left_pad needs at least one sequence and no empty ones; drop empty prompts first")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, width - len(s) :] = 1
    return ids, mask


def forward_logits(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int
) -> torch.Tensor:
    """fp32 logits [B, keep, V] of the last `keep` positions of a left-padded batch, without gradients."""
    dev = device_of(model)
    input_ids, attention_mask = input_ids.to(dev), attention_mask.to(dev)
    with torch.no_grad():
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids(attention_mask),
            logits_to_keep=keep,
            use_cache=False,
        )
    return out.logits[:, -keep:].float()


def last_logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """fp32 next-token logits [B, V] at the last position of a left-padded batch (only that row is computed)."""
    return forward_logits(model, input_ids, attention_mask, keep=1)[:, -1]


def batches(n: int, batch_size: int) -> Iterator[range]:
    """Consecutive index ranges of at most batch_size covering 0..n-1."""
    if batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")
    return (range(i, min(i + batch_size, n)) for i in range(0, n, batch_size))


def by_length(seqs: Sequence[Sequence[int]]) -> list[int]:
    """Indices ordering sequences by length, so batches carry few pad tokens."""
    return sorted(range(len(seqs)), key=lambda i: len(seqs[i]))


def pad_id(tokenizer) -> int:
    """The tokenizer's pad id (falling back to eos); its value never matters under the attention mask."""
    pid = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return 0 if pid is None else int(pid)


def predict_cases(model: torch.nn.Module, tokenizer, cases, batch_size: int = 64, progress: bool = True) -> dict:
    """Next-token predictions for cases (columns input_ids, target), in case order.

    Returns tensors "pred" (argmax id), "correct" (pred == target) and "logprob" (log-prob of the target).
    """
    seqs, targets = list(cases["input_ids"]), torch.as_tensor(list(cases["target"]), dtype=torch.long)
    pred = torch.empty(len(seqs), dtype=torch.long)
    logprob = torch.empty(len(seqs), dtype=torch.float32)
    order = by_length(seqs)
    for idx in tqdm(list(batches(len(seqs), batch_size)), desc="cases", disable=None if progress else True):
        rows = [order[i] for i in idx]
        logits = last_logits(model, *left_pad([seqs[r] for r in rows], pad_id(tokenizer))).cpu()
        pred[rows] = logits.argmax(-1)
        logprob[rows] = logits.log_softmax(-1).gather(1, targets[rows, None])[:, 0]
    return {"pred": pred, "correct": pred == targets, "logprob": logprob}


def next_token_logprobs(
    model: torch.nn.Module,
    seqs: Sequence[Sequence[int]],
    candidates: Sequence[Sequence[int]],
    pad: int,
    batch_size: int = 64,
) -> torch.Tensor:
    """Log-probs [N, K] of K candidate next tokens after each sequence: one forward for all candidates."""
    out = torch.empty(len(seqs), len(candidates[0]) if candidates else 0)
    order = by_length(seqs)
    for idx in batches(len(seqs), batch_size):
        rows = [order[i] for i in idx]
        logp = last_logits(model, *left_pad([seqs[r] for r in rows], pad)).log_softmax(-1).cpu()
        out[rows] = logp.gather(1, torch.as_tensor([list(candidates[r]) for r in rows], dtype=torch.long))
    return out


def suffix_logprobs(
    model: torch.nn.Module,
    seqs: Sequence[Sequence[int]],
    n_suffix: Sequence[int],
    pad: int,
    batch_size: int = 16,
    progress: bool = False,
) -> list[torch.Tensor]:
    """Per-token log-probs of the last n_suffix[i] tokens of each sequence (teacher forced), in input order.

    Left padding puts every suffix at the end, so only max(n_suffix)+1 logit rows per batch are computed.
    """
    if any(not 0 < k < len(s) for s, k in zip(seqs, n_suffix)):
        raise UsageError("each suffix must be non-empty and leave at least one context token; check the prompts")
    out: list[torch.Tensor] = [torch.empty(0)] * len(seqs)
    order = by_length(seqs)
    for idx in tqdm(list(batches(len(seqs), batch_size)), desc="sequences", disable=None if progress else True):
        rows = [order[i] for i in idx]
        ids, mask = left_pad([seqs[r] for r in rows], pad)
        keep = max(n_suffix[r] for r in rows)
        logp = forward_logits(model, ids, mask, keep + 1)[:, :-1].log_softmax(-1).cpu()
        targets = ids[:, -keep:]
        tok_lp = logp.gather(2, targets[..., None])[..., 0]
        for j, r in enumerate(rows):
            out[r] = tok_lp[j, keep - n_suffix[r] :]
    return out


def continuation_ids(
    tokenizer, prompt: str, continuation: str, fix: str = "start the continuation with a space"
) -> tuple[list[int], int]:
    """Token ids of prompt+continuation and how many trailing tokens are the continuation.

    Tokenised together (as the model would see it); the prompt's own ids must be a prefix.
    """
    p_ids, full = tokenizer(prompt).input_ids, tokenizer(prompt + continuation).input_ids
    if full[: len(p_ids)] != p_ids or len(full) == len(p_ids):
        raise UsageError(f"the tokenizer merges prompt {prompt!r} with continuation {continuation!r}; {fix}")
    return full, len(full) - len(p_ids)
