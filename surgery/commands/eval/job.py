"""`surgery eval`: run one shipped eval suite on a model and print or write its report.

The batched scoring it relies on lives in `surgery.batching`; the suites (arithmetic, gender bias, perplexity)
in `surgery.evals`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from surgery.errors import UsageError
from surgery.evals import arithmetic, registry, tasks
from surgery.evals.registry import EvalOptions
from surgery.io import report as rep
from surgery.io.loading import load_model


def check_options(
    digits: Sequence[int], ops: Sequence[str] | None, templates: Sequence[str] | None, limit: int | None, task: str
) -> None:
    """UsageError for any bad evaluate() option, naming the valid values."""
    registry.get(task, "suite")
    if not digits or not set(digits) <= {1, 2, 3}:
        raise UsageError(f"digits must be a non-empty subset of 1,2,3; got {list(digits)}")
    if ops is not None and (not ops or not set(ops) <= set(arithmetic.OPS)):
        raise UsageError(f"ops must be a non-empty subset of + - * /; got {list(ops)}")
    if templates is not None and (not templates or not set(templates) <= set(arithmetic.TEMPLATES)):
        raise UsageError(f"unknown template(s) {list(templates)}; use some of {', '.join(arithmetic.TEMPLATES)}")
    if limit is not None and limit < 1:
        raise UsageError(f"limit must be >= 1, got {limit}")


def evaluate(
    loaded,
    task: str,
    *,
    digits: Sequence[int] = (1,),
    ops: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
    limit: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
) -> dict:
    """Run one eval suite on a loaded model: {"config": {...}, "results": {<suite>: {...}}}.

    Arithmetic defaults to all four ops and the "calculate" template only (the measured baseline's prompt);
    pass templates=arithmetic.TEMPLATES for all of them. `limit` caps problems (arithmetic), Wino-test items
    (gender-bias) or documents (perplexity).
    """
    digits, ops = tuple(digits), None if ops is None else tuple(ops)
    templates = None if templates is None else ((templates,) if isinstance(templates, str) else tuple(templates))
    check_options(digits, ops, templates, limit, task)
    ops, templates = ops or ("+", "-", "*", "/"), templates or arithmetic.DEFAULT_TEMPLATES
    start = time.time()
    s = registry.get(task, "suite")
    results = {s.result_key: s.suite(loaded, EvalOptions(digits, ops, templates, limit, batch_size, seed))}
    config = {
        "model": loaded.describe() if hasattr(loaded, "describe") else str(loaded),
        "task": task,
        "digits": list(digits),
        "ops": list(ops),
        "templates": list(templates),
        "limit": limit,
        "batch_size": batch_size,
        "seed": seed,
        "seconds": round(time.time() - start, 2),
    }
    return {"config": config, "results": results}


def format_table(results: dict) -> str:
    """A compact text table of evaluate()'s results (or of its "results" part) for the terminal."""
    results = results.get("results", results)
    suites = [registry.get(n, "suite") for n in registry.names("suite")]
    return "\n".join(line for s in suites if s.result_key in results for line in s.lines(results[s.result_key]))


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
    force: bool,
    trust_remote_code: bool,
    data: str | None,
    columns: str | None,
    max_memory: dict | None = None,
):
    """`surgery eval` (its options and help: this package's __init__.py)."""
    outdir = None if out is None else rep.new_out_dir(out, Path(out), force)
    if data is not None or columns is not None:
        return run_data(model, dtype, device, data, columns, limit, batch_size, outdir, trust_remote_code, max_memory)
    check_options(tuple(digits), ops, templates, limit, task)  # before loading anything
    start = time.time()
    loaded = load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code, max_memory=max_memory)
    res = evaluate(
        loaded, task, digits=digits, ops=ops, templates=templates, limit=limit, batch_size=batch_size, seed=seed
    )
    data = rep.make(f"eval --task {task}", loaded.describe(), res["config"], res["results"], time.time() - start)
    md = f"# surgery eval: {task} on {loaded.name}\n\n```\n{format_table(res['results'])}\n```\n"
    return rep.save(rep.Report(data, md), outdir)


def run_data(
    model: str,
    dtype: str,
    device: str,
    data: str | None,
    columns: str | None,
    limit: int | None,
    batch_size: int,
    outdir,
    trust_remote_code: bool = False,
    max_memory: dict | None = None,
):
    """`surgery eval --data`: the user's cases through `surgery.tasks` (checked before the model loads)."""
    tasks.check_data_args(data, None, columns)
    ds = tasks.load_cases(data, columns)
    if limit is not None:
        if limit < 1:
            raise UsageError(f"limit must be >= 1, got {limit}")
        ds = ds.select(range(min(limit, len(ds))))
    start = time.time()
    loaded = load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code, max_memory=max_memory)
    res = tasks.evaluate(loaded.model, loaded.tokenizer, ds, batch_size)
    config = {"data": data, "columns": columns, "limit": limit, "rows": len(ds), "batch_size": batch_size}
    report = rep.make(f"eval --data {data}", loaded.describe(), config, {"data": res}, time.time() - start)
    md = f"# surgery eval: {data} on {loaded.name}\n\n```\n" + "\n".join(tasks.table_lines(res)) + "\n```\n"
    return rep.save(rep.Report(report, md), outdir)
