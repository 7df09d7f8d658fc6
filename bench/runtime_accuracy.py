"""A checkpoint's 2-digit arithmetic accuracy through llama.cpp against the tool's own evaluation, problem by problem.

The checkpoint is written as GGUF (or its own `--export`ed GGUF is used) and every held-out 2-digit test problem of
its recipe (test split rebuilt with at least `--problems` problems, same seed and generator) is scored twice with
the same rule: teacher-forced argmax at every answer token (greedy decoding of the answer), once by
`evals.arithmetic` in transformers and once from llama.cpp's logits of the same token ids. It reports both
accuracies with 95% intervals and lists every problem on which they disagree, for llama.cpp's KV cache in f32 and
in f16 (its default).

    python bench/runtime_accuracy.py checkpoints/demo --problems 600
    python bench/runtime_accuracy.py --smoke          # tiny random model, 8 problems (smoke test)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def spec_of(folder: Path, problems: int):
    """The checkpoint recipe's DataSpec (surgery.json), its test split grown to at least `problems`."""
    from surgery.evals.arithmetic import DataSpec

    spec = DataSpec()
    manifest = folder / "surgery.json"
    if manifest.exists():
        data = json.loads(manifest.read_text()).get("recipe", {}).get("data", {})
        known = {f.name for f in dataclasses.fields(DataSpec)}
        spec = DataSpec(**{k: v for k, v in data.items() if k in known})
    return dataclasses.replace(spec, test_size=max(problems, spec.test_size))


def llama_flags(llm, cases) -> list[bool]:
    """Per case: llama.cpp's argmax after the case's input ids equals its target (one eval per problem)."""
    import numpy as np

    from surgery.evals.arithmetic import problem_groups
    from surgery.io import llamacpp

    ids_col, tgt = list(cases["input_ids"]), list(cases["target"])
    flags = [False] * len(ids_col)
    for group in problem_groups(cases):
        full = ids_col[group[-1]] + [tgt[group[-1]]]
        logits = llamacpp.logits(llm, full)
        for c in group:
            flags[c] = int(np.argmax(logits[len(ids_col[c]) - 1])) == tgt[c]
    return flags


def by_problem(cases, flags) -> dict[str, bool]:
    from surgery.evals.arithmetic import problem_groups

    return {f"{cases[g[0]]['prompt']}{cases[g[0]]['answer']}": all(flags[c] for c in g) for g in problem_groups(cases)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", nargs="?", default="checkpoints/demo")
    p.add_argument("--problems", type=int, default=600, help="at least this many 2-digit test problems")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="report folder (default: CHECKPOINT-runtime-accuracy)")
    p.add_argument("--smoke", action="store_true", help="tiny random model, 8 problems (smoke test)")
    a = p.parse_args()
    import torch

    from surgery.evals import arithmetic
    from surgery.io import llamacpp
    from surgery.io.gguf_file import write_gguf
    from surgery.io.loading import load_model
    from surgery.io.report import wilson

    if a.smoke:
        import _smoke

        scratch = _smoke.scratch("runtime-accuracy")
        a.checkpoint, a.problems, a.threads, a.out = _smoke.tiny_model(scratch), 8, 1, str(scratch / "out")
    torch.set_num_threads(a.threads)
    folder = Path(a.checkpoint)
    spec = spec_of(folder, a.problems)
    if a.smoke:
        spec = dataclasses.replace(spec, per_op=20, validation_size=0, test_size=a.problems)
    t0 = time.time()
    loaded = load_model(str(folder))
    test = arithmetic.build_splits(spec).test
    cases = arithmetic.cases(test, loaded.tokenizer)
    hf = arithmetic.problem_predictions(loaded.model, loaded.tokenizer, cases).tolist()
    hf_problems = by_problem(cases, hf)
    work = Path(tempfile.mkdtemp(prefix="runtime-accuracy-"))
    gguf = write_gguf(loaded.model, loaded.tokenizer, work / "model-f32.gguf", "f32").path
    result = {
        "command": "python bench/runtime_accuracy.py " + " ".join(sys.argv[1:]),
        "checkpoint": str(folder),
        "problems": len(hf_problems),
        "data": dataclasses.asdict(spec),
        "transformers": _acc(hf_problems, wilson),
    }
    for cache in ("f32", "f16"):
        llm = llamacpp.open_gguf(gguf, n_ctx=64, threads=a.threads, f32_cache=cache == "f32")
        cpp = by_problem(cases, llama_flags(llm, cases))
        differ = [k for k in hf_problems if hf_problems[k] != cpp[k]]
        result[f"llama_cpp_{cache}_cache"] = {
            **_acc(cpp, wilson),
            "disagreements": len(differ),
            "problems_that_differ": [
                {"problem": k, "transformers": hf_problems[k], "llama_cpp": cpp[k]} for k in differ
            ],
        }
        del llm
    gguf.unlink()
    work.rmdir()
    result["seconds"] = round(time.time() - t0, 1)
    out = Path(a.out or f"{str(folder).rstrip('/')}-runtime-accuracy")
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (out / "report.md").write_text(md + "\n")
    print(md)


def _acc(problems: dict[str, bool], wilson) -> dict:
    k, n = sum(problems.values()), len(problems)
    return {"full_answer_acc": k / n if n else float("nan"), "full_answer_ci95": list(wilson(k, n)), "correct": k}


def markdown(r: dict) -> str:
    def cell(e: dict) -> str:
        lo, hi = e["full_answer_ci95"]
        return f"{100 * e['full_answer_acc']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] ({e['correct']}/{r['problems']})"

    rows = [
        f"`{r['command']}`: {r['problems']} held-out 2-digit problems of {r['checkpoint']}, {r['seconds']} s",
        "",
        "| runtime | full-answer accuracy [95% CI] | problems that differ from transformers |",
        "|---|---|---|",
        f"| transformers (the tool's evaluation) | {cell(r['transformers'])} | |",
    ]
    for cache in ("f32", "f16"):
        e = r[f"llama_cpp_{cache}_cache"]
        rows.append(f"| llama.cpp, {cache} KV cache | {cell(e)} | {e['disagreements']} |")
    for cache in ("f32", "f16"):
        for d in r[f"llama_cpp_{cache}_cache"]["problems_that_differ"]:
            rows.append(
                f"- {cache} cache: `{d['problem']}`: transformers {'right' if d['transformers'] else 'wrong'}, "
                f"llama.cpp {'right' if d['llama_cpp'] else 'wrong'}"
            )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
