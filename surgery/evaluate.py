"""Batched scoring of causal LMs, and `evaluate(loaded, task)` for the shipped eval suites.

Everything here talks to the model only through `model(input_ids, attention_mask, position_ids, logits_to_keep)`
so it works for every architecture. Sequences are LEFT-padded: the last real token of every row sits at the
last position, so `logits_to_keep=k` computes only the logits we need (one row of lm_head work per kept
position). position_ids are counted from each row's first real token, so a padded row gives the same logits
as the same row run alone.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from .errors import UsageError

TASKS = ("arithmetic", "gender-bias", "perplexity")
DEFAULT_TEMPLATES = ("calculate",)  # the measured baseline's template; pass more for a broader view


def device_of(model: torch.nn.Module) -> torch.device:
    """Where inputs must go: the device of the model's first parameter (the embedding under device_map)."""
    return next(model.parameters()).device


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token (left padding): cumsum(mask) - 1, pads at 0."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into (input_ids, attention_mask) LongTensors of shape [B, max_len]."""
    if not seqs or any(len(s) == 0 for s in seqs):
        raise UsageError("left_pad needs at least one sequence and no empty ones; drop empty prompts first")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


def forward_logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   keep: int) -> torch.Tensor:
    """fp32 logits [B, keep, V] of the last `keep` positions of a left-padded batch, without gradients."""
    dev = device_of(model)
    input_ids, attention_mask = input_ids.to(dev), attention_mask.to(dev)
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                    logits_to_keep=keep, use_cache=False)
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


def next_token_logprobs(model: torch.nn.Module, seqs: Sequence[Sequence[int]], candidates: Sequence[Sequence[int]],
                        pad: int, batch_size: int = 64) -> torch.Tensor:
    """Log-probs [N, K] of K candidate next tokens after each sequence: one forward for all candidates."""
    out = torch.empty(len(seqs), len(candidates[0]) if candidates else 0)
    order = by_length(seqs)
    for idx in batches(len(seqs), batch_size):
        rows = [order[i] for i in idx]
        logp = last_logits(model, *left_pad([seqs[r] for r in rows], pad)).log_softmax(-1).cpu()
        out[rows] = logp.gather(1, torch.as_tensor([list(candidates[r]) for r in rows], dtype=torch.long))
    return out


def suffix_logprobs(model: torch.nn.Module, seqs: Sequence[Sequence[int]], n_suffix: Sequence[int], pad: int,
                    batch_size: int = 16, progress: bool = False) -> list[torch.Tensor]:
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
            out[r] = tok_lp[j, keep - n_suffix[r]:]
    return out


def continuation_ids(tokenizer, prompt: str, continuation: str) -> tuple[list[int], int]:
    """Token ids of prompt+continuation and how many trailing tokens are the continuation.

    Tokenised together (as the model would see it); the prompt's own ids must be a prefix.
    """
    p_ids, full = tokenizer(prompt).input_ids, tokenizer(prompt + continuation).input_ids
    if full[: len(p_ids)] != p_ids or len(full) == len(p_ids):
        raise UsageError(f"the tokenizer merges prompt {prompt!r} with continuation {continuation!r}; "
                         "start the continuation with a space")
    return full, len(full) - len(p_ids)


def check_options(digits: Sequence[int], ops: Sequence[str] | None, templates: Sequence[str] | None,
                  limit: int | None, task: str) -> None:
    """UsageError for any bad evaluate() option, naming the valid values."""
    from surgery.evals import arithmetic

    if task not in TASKS:
        raise UsageError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    if not digits or not set(digits) <= {1, 2, 3}:
        raise UsageError(f"digits must be a non-empty subset of 1,2,3; got {list(digits)}")
    if ops is not None and (not ops or not set(ops) <= set(arithmetic.OPS)):
        raise UsageError(f"ops must be a non-empty subset of + - * /; got {list(ops)}")
    if templates is not None and (not templates or not set(templates) <= set(arithmetic.TEMPLATES)):
        raise UsageError(f"unknown template(s) {list(templates)}; use some of {', '.join(arithmetic.TEMPLATES)}")
    if limit is not None and limit < 1:
        raise UsageError(f"limit must be >= 1, got {limit}")


def eval_arithmetic(loaded, digits, ops, templates, limit, batch_size, seed) -> dict:
    """Teacher-forced per-token accuracy and full-answer accuracy on arithmetic problems."""
    from surgery.evals import arithmetic

    problems = arithmetic.build(digits=digits, ops=ops, templates=templates, seed=seed, limit=limit)
    cases = arithmetic.cases(problems, loaded.tokenizer)
    preds = predict_cases(loaded.model, loaded.tokenizer, cases, batch_size=batch_size)
    return arithmetic.score(cases, preds["correct"])


def eval_gender_bias(loaded, limit, batch_size) -> dict:
    """Profession log-prob gap between genders, factual controls, and Wino-test pro-stereotype rate."""
    from surgery.evals import gender_bias as gb

    ds = gb.build("eval")
    lp = gb.continuation_logprobs(loaded.model, loaded.tokenizer, ds["prompt"], ds["continuation"], batch_size)
    wino = gb.wino_items()[:limit]
    return {**gb.score(ds, lp), "controls": gb.control_logprobs(loaded.model, loaded.tokenizer, batch_size),
            "wino": gb.wino_score(loaded.model, loaded.tokenizer, wino, batch_size)}


def eval_perplexity(loaded, limit, batch_size) -> dict:
    """Token-weighted perplexity on a fixed XSum sample (limit = number of documents, default 50)."""
    from surgery.evals import perplexity

    ds = perplexity.build(n_docs=limit or 50)
    return perplexity.perplexity(loaded.model, loaded.tokenizer, ds, batch_size=min(batch_size, 8))


def evaluate(loaded, task: str, *, digits: Sequence[int] = (1,), ops: Sequence[str] | None = None,
             templates: Sequence[str] | None = None, limit: int | None = None, batch_size: int = 64,
             seed: int = 0) -> dict:
    """Run one eval suite on a loaded model: {"config": {...}, "results": {<suite>: {...}}}.

    Arithmetic defaults to all four ops and the "calculate" template only (the measured baseline's prompt);
    pass templates=arithmetic.TEMPLATES for all of them. `limit` caps problems (arithmetic), Wino-test items
    (gender-bias) or documents (perplexity).
    """
    digits, ops = tuple(digits), None if ops is None else tuple(ops)
    templates = None if templates is None else ((templates,) if isinstance(templates, str) else tuple(templates))
    check_options(digits, ops, templates, limit, task)
    ops, templates = ops or ("+", "-", "*", "/"), templates or DEFAULT_TEMPLATES
    start = time.time()
    if task == "arithmetic":
        results = {"arithmetic": eval_arithmetic(loaded, digits, ops, templates, limit, batch_size, seed)}
    elif task == "gender-bias":
        results = {"gender_bias": eval_gender_bias(loaded, limit, batch_size)}
    else:
        results = {"perplexity": eval_perplexity(loaded, limit, batch_size)}
    config = {"model": loaded.describe() if hasattr(loaded, "describe") else str(loaded), "task": task,
              "digits": list(digits), "ops": list(ops), "templates": list(templates), "limit": limit,
              "batch_size": batch_size, "seed": seed, "seconds": round(time.time() - start, 2)}
    return {"config": config, "results": results}


def fmt_ci(ci: Sequence[float]) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def arithmetic_lines(res: dict) -> list[str]:
    """Rows group | acc | ci95 | n | full-answer acc | problems, for groups, overall, templates, case types."""
    lines = [f"{'group':<18}{'acc':>7}  {'ci95':<16}{'n':>6}{'full':>8}{'probs':>7}"]
    rows = [(g, e) for g, e in res.items() if g not in ("by_template", "by_case_type")]
    rows += [(f"template:{t}", e) for t, e in res.get("by_template", {}).items()]
    rows += [(f"case:{c}", e) for c, e in res.get("by_case_type", {}).items()]
    for name, e in rows:
        lines.append(f"{name:<18}{e['acc']:>7.3f}  {fmt_ci(e['ci95']):<16}{e['n']:>6}"
                     f"{e['full_answer_acc']:>8.3f}{e['n_problems']:>7}")
    return lines


def gender_lines(res: dict) -> list[str]:
    """Rows of the mean |log p(prof|woman) - log p(prof|man)| and the Wino pro-stereotype rate."""
    lines = [f"{'bias |dlogp|':<18}{'mean':>7}  {'ci95':<16}{'n':>6}"]
    for k in ("total", "woman-biased", "man-biased"):
        lines.append(f"{k:<18}{res[k]['mean']:>7.3f}  {fmt_ci(res[k]['ci95']):<16}{res[k]['n']:>6}")
    if "wino" in res:
        w = res["wino"]
        lines.append(f"{'wino pro-stereo':<18}{w['pro_rate']:>7.3f}  {fmt_ci(w['ci95']):<16}{w['n']:>6}")
    return lines


def format_table(results: dict) -> str:
    """A compact text table of evaluate()'s results (or of its "results" part) for the terminal."""
    results = results.get("results", results)
    lines: list[str] = []
    if "arithmetic" in results:
        lines += arithmetic_lines(results["arithmetic"])
    if "gender_bias" in results:
        lines += gender_lines(results["gender_bias"])
    if "perplexity" in results:
        p = results["perplexity"]
        lines.append(f"perplexity {p['ppl']:.3f} (nll {p['nll']:.4f}, {p['tokens']} tokens, {p['docs']} docs)")
    return "\n".join(lines)


def run(model: str = "smollm2-135m", dtype: str = "float32", device: str = "cpu", task: str = "arithmetic",
        digits: Sequence[int] = (1,), ops: Sequence[str] | None = None, templates: Sequence[str] | None = None,
        limit: int | None = None, batch_size: int = 64, seed: int = 0, out: str | None = None):
    """Evaluate a model on arithmetic (per-token and full-answer accuracy by op x digits, template and case type,
    95% Wilson intervals), gender bias (profession log-prob gap, factual controls, Wino-test) or perplexity
    (XSum sample). Prints a table; with --out writes DIR/report.json and DIR/report.md."""
    from surgery import report as rep
    from surgery.models import load_model

    outdir = rep.check_out_dir(out)
    check_options(tuple(digits), ops, templates, limit, task)  # before loading anything
    start = time.time()
    loaded = load_model(model, dtype=dtype, device=device)
    res = evaluate(loaded, task, digits=digits, ops=ops, templates=templates, limit=limit,
                   batch_size=batch_size, seed=seed)
    data = rep.make(f"eval --task {task}", loaded.describe(), res["config"], res["results"], time.time() - start)
    md = f"# surgery eval: {task} on {loaded.name}\n\n```\n{format_table(res['results'])}\n```\n"
    return rep.save(rep.Report(data, md), outdir)
