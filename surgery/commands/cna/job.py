"""`surgery cna`: rank FFN neurons by importance, or by the change of importance between two settings (CNA).

Settings B (the comparison): the same model with heads zeroed (--ablate-head), another checkpoint or a PEFT
adapter on the same input (--against), or the same model on a second prompt (--prompt-b). Single-prompt mode
(--prompt) or dataset mode (the task's cases: per-case certified top-k lists, aggregated by summing deltas).
Writes DIR/cna.json, DIR/cna.md (the paper's Table 4 form) and DIR/cna_layers.png.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import torch

from surgery.edits.lora import load_against
from surgery.errors import UsageError
from surgery.evals import arithmetic, tasks
from surgery.find import cna
from surgery.find.neurons import offsets_of, unflatten
from surgery.find.validate import markdown as vmd
from surgery.find.validate import run_validations
from surgery.io import report as rep
from surgery.io.loading import load_model
from surgery.model.arch import ModelView
from surgery.model.batching import pad_id


def run(
    *,
    model: str,
    dtype: str,
    device: str,
    task: str,
    digits: Sequence[int],
    ops: Sequence[str] | None,
    templates: Sequence[str] | None,
    limit: int | None,
    batch_size: int,
    seed: int,
    out: str | None,
    prompt: str | None,
    prompt_b: str | None,
    target: str | None,
    ablate_head: Sequence[tuple[int, int]] | None,
    against: str | None,
    layers: str | None,
    top: int,
    exhaustive: bool,
    validate: Sequence[str],
    trust_remote_code: bool,
    max_memory: dict | None,
    data: str | None,
    columns: str | None,
    pairs: str | None,
    tokens: str | None,
    logits_mb: float,
):
    """`surgery cna` (its options and help: this package's __init__.py)."""
    t0 = time.time()
    if not logits_mb > 0:
        raise UsageError(f"--logits-mb must be > 0 (MiB of base logits held per setting), got {logits_mb}")
    held = int(logits_mb * (1 << 20)) // 4
    outdir = rep.check_out_dir(out)
    user = _check_data(data, pairs, columns, tokens, prompt, validate, against or ablate_head)
    _check(prompt, prompt_b, against, ablate_head, "arithmetic" if user is not None else task, validate)
    from accelerate import PartialState

    state = PartialState(cpu=device == "cpu")  # under `accelerate launch`: dataset cases split over processes
    if state.num_processes > 1 and prompt is not None:
        raise UsageError("--prompt is one case: run it in one process (drop accelerate launch)")
    per_rank_gpu = device == "cuda" and state.num_processes > 1  # one GPU per process
    loaded = load_model(
        model,
        dtype=dtype,
        device="cpu" if per_rank_gpu else device,
        trust_remote_code=trust_remote_code,
        max_memory=max_memory,
    )
    if per_rank_gpu:
        loaded.model.to(state.device)
    va = ModelView(loaded.model)
    chosen = cna.parse_layers(layers, va.n_layers)
    for lh in ablate_head or ():
        va.check_head(*lh)
    vb = ModelView(load_against(against, loaded, trust_remote_code)) if against else None
    tgt = cna.target_id(loaded.tokenizer, target) if target else None
    rank = max(top, 99) if "mask" in validate else top  # Table 5 masks up to the top-99
    if user is not None:
        tokens = tokens or ("first" if pairs is not None else "all")
        res = _user(
            loaded,
            va,
            vb,
            chosen,
            user,
            pairs is not None,
            tokens,
            batch_size,
            tuple(ablate_head or ()),
            rank,
            tgt,
            held,
            state,
        )
    elif prompt is not None:
        res = _single(loaded, va, vb, chosen, prompt, prompt_b, tgt, tuple(ablate_head or ()), rank, exhaustive)
    else:
        res = _dataset(
            loaded,
            va,
            vb,
            chosen,
            digits,
            ops,
            templates,
            limit,
            seed,
            batch_size,
            tuple(ablate_head or ()),
            rank,
            tgt,
            held,
            state,
        )
    if not state.is_main_process:  # every process computed its share; the first one reports
        return rep.Report(data={})
    config = dict(
        prompt=prompt,
        prompt_b=prompt_b,
        target=target,
        ablate_head=[list(x) for x in ablate_head or ()],
        against=against,
        layers=layers,
        top=top,
        exhaustive=exhaustive,
        task=None if prompt else task,
        digits=list(digits),
        ops=list(ops) if ops else None,
        limit=limit,
        seed=seed,
        data=data,
        pairs=pairs,
        columns=columns,
        tokens=tokens if user is not None else None,
    )
    if validate:
        res["validations"] = run_validations(
            loaded, va, res, validate, digits, ops, templates, limit, seed, tuple(ablate_head or ()), batch_size
        )
    report = rep.Report(rep.make("cna", loaded.describe(), config, res, time.time() - t0), markdown(res, config))
    if outdir is not None:
        report.files += [
            rep.write_json(outdir / "cna.json", report.data),
            rep.write_text_atomic(outdir / "cna.md", report.markdown),
            layer_plot(res, outdir / "cna_layers.png", va.n_layers),
        ]
    return report


def _check(prompt, prompt_b, against, ablate_head, task, validate) -> None:
    settings = sum(x is not None and x != () for x in (prompt_b, against, ablate_head))
    if settings > 1:
        raise UsageError("give at most one comparison: --ablate-head, --against or --prompt-b")
    if prompt_b is not None and prompt is None:
        raise UsageError("--prompt-b needs --prompt (the A side)")
    if prompt is None and task != "arithmetic":
        raise UsageError(f"dataset mode supports --task arithmetic, got {task!r}; or give --prompt")
    bad = set(validate) - {"mask", "pe", "fe"}
    if bad:
        raise UsageError(f"unknown --validate {sorted(bad)}; use mask, pe, fe")


def _check_data(data, pairs, columns, tokens, prompt, validate, other_b):
    """The user's cases or pairs, read and checked before the model loads (None without --data/--pairs)."""
    tasks.check_data_args(data, pairs, columns)
    if data is None and pairs is None:
        return None
    if pairs is not None and other_b:
        raise UsageError("--pairs compares prompt A with prompt B; drop --against/--ablate-head (or use --data)")
    if prompt is not None or validate:
        raise UsageError("--data/--pairs replace --prompt and the task; --validate needs the arithmetic task")
    if tokens not in (None, "first", "all"):
        raise UsageError(f"unknown --tokens {tokens!r}; use first or all")
    return tasks.load_pairs(pairs, columns) if pairs is not None else tasks.load_cases(data, columns)


def _user(loaded, va, vb, layers, ds, is_pairs, tokens, batch_size, ablate, top, tgt, held, state=None) -> dict:
    """CNA over the user's cases (A = the model on each context; B = --ablate-head / --against if given) or
    over pairs (A = prompt A, B = prompt B, both scored on the pair's target token)."""
    tok = loaded.tokenizer
    if is_pairs:
        ds = tasks.fill_targets(loaded.model, tok, ds, batch_size)
        pc = tasks.pair_cases(tok, ds, tokens)
        groups = [ds["group"][i] for i in pc.pair]
        return _scan_rows(
            loaded,
            va,
            None,
            layers,
            pc.seqs_a,
            pc.targets,
            groups,
            batch_size,
            (),
            top,
            seqs_b=pc.seqs_b,
            kind="pairs A-B",
            n_rows=len(ds),
            held=held,
            state=state,
        )
    cases = tasks.cases(tok, ds)
    if tokens == "first":
        cases = cases.filter(lambda r: r["token_index"] == 0)
    targets = list(cases["target"]) if tgt is None else [tgt] * len(cases)
    return _scan_rows(
        loaded,
        va,
        vb,
        layers,
        list(cases["input_ids"]),
        targets,
        list(cases["group"]),
        batch_size,
        ablate,
        top,
        n_rows=len(ds),
        held=held,
        state=state,
    )


def _single(loaded, va, vb, layers, prompt, prompt_b, tgt, ablate, top, exhaustive) -> dict:
    tok = loaded.tokenizer
    ids = torch.tensor([tok(prompt).input_ids])
    batch_a = (ids, torch.ones_like(ids))
    batch_b = None
    if prompt_b is not None:
        ids_b = torch.tensor([tok(prompt_b).input_ids])
        batch_b = (ids_b, torch.ones_like(ids_b))
    t = None if tgt is None else torch.tensor([tgt])
    res = cna.compare(
        va, batch_a, layers, top, view_b=vb, batch_b=batch_b, ablate_b=ablate, target=t, exhaustive=exhaustive
    )
    w = int(res.target[0])
    rows = [
        _row(loaded, va, res, int(l), int(i), float(s))
        for l, i, s in zip(res.top.layer[0], res.top.index[0], res.top.score[0])
    ]
    return {
        "mode": "prompt",
        "comparison": _kind(vb, prompt_b, ablate),
        "target": {"id": w, "text": tok.decode([w])},
        "certified": bool(res.top.certified[0]),
        "rescored": res.top.rescored,
        "neurons": rows,
        "per_layer_top": _per_layer(rows, va.n_layers),
    }


def _row(loaded, va, res: cna.Comparison, layer: int, idx: int, score: float) -> dict:
    """One neuron of a single-prompt result: exact importance in A (and B), coefficients, top tokens."""
    ix = torch.tensor([[idx]])
    imp_a = float(res.scorer_a.exact(layer, ix)[0, 0])
    coef_a = float(res.coef_a[layer][0, idx])
    row = {
        "neuron": cna.neuron_name(layer, idx),
        "layer": layer,
        "index": idx,
        "score": round(score, 6),
        "imp_a": round(imp_a, 6),
        "coef_a": round(coef_a, 4),
    }
    if res.scorer_b is not None:
        row |= {
            "imp_b": round(float(res.scorer_b.exact(layer, ix)[0, 0]), 6),
            "coef_b": round(float(res.coef_b[layer][0, idx]), 4),
            "delta": round(score, 6),
        }
    row["top_tokens"] = cna.top_tokens(va, loaded.tokenizer, layer, idx, sign=coef_a)
    return row


def _kind(vb, prompt_b, ablate) -> str | None:
    if ablate:
        return "ablate-head " + ",".join(f"{l}.{h}" for l, h in ablate)
    if vb is not None:
        return "against"
    return "prompt-b" if prompt_b is not None else None


def _dataset(
    loaded, va, vb, layers, digits, ops, templates, limit, seed, batch_size, ablate, top, tgt, held, state=None
) -> dict:
    """CNA over every case of the task: per-case top-k (kept for the pruner) and the sum of deltas."""
    kw = dict(ops=tuple(ops)) if ops else {}
    problems = arithmetic.build(
        digits=tuple(digits), templates=tuple(templates or arithmetic.DEFAULT_TEMPLATES), seed=seed, limit=limit, **kw
    )
    cases = arithmetic.cases(problems, loaded.tokenizer)
    targets = None if tgt is None else [tgt] * len(cases)
    return _scan_rows(
        loaded,
        va,
        vb,
        layers,
        list(cases["input_ids"]),
        targets,
        list(cases["group"]),
        batch_size,
        ablate,
        top,
        held=held,
        state=state,
    )


def _scan_rows(
    loaded,
    va,
    vb,
    layers,
    seqs,
    targets,
    groups,
    batch_size,
    ablate,
    top,
    seqs_b=None,
    kind: str | None = None,
    n_rows: int | None = None,
    held: int = cna.HELD,
    state=None,
) -> dict:
    """cna.scan over cases (and B contexts; split over the processes of `state` under accelerate launch), then the
    dataset-mode table: top neurons by summed score."""
    sc = cna.sharded_scan(
        state or _one_process(),
        va,
        seqs,
        layers,
        top,
        pad_id(loaded.tokenizer),
        view_b=vb,
        seqs_b=seqs_b,
        ablate_b=ablate,
        targets=targets,
        batch_size=batch_size,
        held=held,
    )
    n_cases = len(seqs)
    flat = torch.cat([sc.total[l] for l in layers])
    best = flat.topk(min(top, len(flat)))
    where = unflatten(best.indices, layers, offsets_of([va.ffn_width(l) for l in layers]))
    hits = _hit_counts(sc)
    rows = []
    for s, layer, idx in zip(best.values.tolist(), *(w.tolist() for w in where)):
        coef_a = float(sc.coef_a[layer][idx])
        row = {
            "neuron": cna.neuron_name(layer, idx),
            "layer": layer,
            "index": idx,
            "score_sum": round(s, 5),
            "score_mean": round(s / n_cases, 6),
            "in_case_topk": hits.get((layer, idx), 0),
            "coef_a_mean": round(coef_a, 4),
        }
        if sc.coef_b is not None:
            row["coef_b_mean"] = round(float(sc.coef_b[layer][idx]), 4)
        row["top_tokens"] = cna.top_tokens(va, loaded.tokenizer, layer, idx, sign=coef_a)
        rows.append(row)
    per_case = [
        [cna.neuron_name(int(l), int(i)) for l, i in zip(ls, ix)]
        for ls, ix in zip(sc.top_layer.tolist(), sc.top_index.tolist())
    ]
    out = {
        "mode": "dataset",
        "comparison": kind or _kind(vb, None, ablate),
        "n_cases": n_cases,
        "groups": list(groups),
        "targets": sc.targets.tolist(),
        "certified": int(sc.certified.sum()),
        "rescored": sc.rescored,
        "cases_per_pass": cna.cases_per_pass(batch_size, held, len(layers), va.unembed_matrix().shape[0]),
        "neurons": rows,
        "per_case_top": per_case,
        "per_layer_top": _per_layer(rows, va.n_layers),
    }
    if n_rows is not None:
        out["n_rows"] = n_rows
    return out


class _one_process:
    num_processes, process_index, is_main_process = 1, 0, True


def _hit_counts(sc: cna.Scan) -> dict[tuple[int, int], int]:
    out: dict[tuple[int, int], int] = {}
    for l, i in zip(sc.top_layer.flatten().tolist(), sc.top_index.flatten().tolist()):
        out[(l, i)] = out.get((l, i), 0) + 1
    return out


def _per_layer(rows: list[dict], n_layers: int) -> list[int]:
    counts = [0] * n_layers
    for r in rows:
        counts[r["layer"]] += 1
    return counts


def markdown(data: dict, config: dict) -> str:
    """Table 4 form: neuron, importance (A, B, delta), coefficients, top tokens."""
    what = data.get("comparison") or "importance"
    head = f"# surgery cna ({data['mode']} mode, {what})\n\n"
    if data["mode"] == "prompt":
        head += (
            f"Prompt: `{config['prompt']}` -> target `{data['target']['text']}`"
            f"{' vs prompt B `' + config['prompt_b'] + '`' if config.get('prompt_b') else ''}. "
            f"Top-{len(data['neurons'])} certified exact: {data['certified']} ({data['rescored']} exact "
            "evaluations).\n\n"
        )
        cols = ["neuron", "imp A", "imp B", "delta", "coef A", "coef B", "top tokens"]
        rows = [
            [
                r["neuron"],
                r["imp_a"],
                r.get("imp_b", ""),
                r.get("delta", ""),
                r["coef_a"],
                r.get("coef_b", ""),
                _tokens(r["top_tokens"]),
            ]
            for r in data["neurons"][: config["top"]]
        ]
    else:
        head += (
            f"{data['n_cases']} cases; {data['certified']} with certified per-case top-k; "
            "score = sum over cases of the (delta of) importance.\n\n"
        )
        cols = ["neuron", "sum", "mean", "in case top-k", "coef A", "coef B", "top tokens"]
        rows = [
            [
                r["neuron"],
                r["score_sum"],
                r["score_mean"],
                r["in_case_topk"],
                r["coef_a_mean"],
                r.get("coef_b_mean", ""),
                _tokens(r["top_tokens"]),
            ]
            for r in data["neurons"][: config["top"]]
        ]
    body = rep.md_table(cols, rows)
    if "validations" in data:
        body += "\n\n" + vmd(data["validations"])
    return head + body + "\n"


def _tokens(toks: list[str]) -> str:
    return ", ".join(repr(t)[1:-1].replace("|", "\\|") for t in toks)


def layer_plot(data: dict, path: Path, n_layers: int) -> Path:
    """Where the top neurons sit: count per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3))
    ax.bar(range(n_layers), data["per_layer_top"], color="tab:blue")
    ax.set_xlabel("layer")
    ax.set_ylabel(f"top-{len(data['neurons'])} neurons (count)")
    ax.set_title(f"CNA: where the top neurons sit ({data.get('comparison') or 'importance'})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
