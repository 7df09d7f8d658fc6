"""Uniform widths (`prune --uniform`: every layer keeps P% of its own neurons, a stock config that any runtime loads)
against per-layer widths (CNA's global P% over the same layers, a `deci` GGUF / DeciLM config) at the same kept
fraction: 2-digit accuracy with 95% intervals after the same LoRA recovery.

Both runs are `surgery prune` over ALL layers (`--layers 0-N`) with the same recipe, profile, seed and budget, so
they keep the same number of neurons and differ only in where. Each run's folder is kept; a finished run (its
report.json) is not run again, so an interrupted comparison resumes.

    python bench/uniform.py --keep 50% --out runs/uniform-vs-per-layer        # demo profile, SmolLM2
    python bench/uniform.py --smoke                                         # tiny random model (smoke test)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def run_one(out: Path, model: str, keep: str, uniform: bool, profile: str, sets: list[str]) -> dict:
    from surgery.commands.prune import run

    if not (out / "report.json").exists():
        layers = None if uniform else "all"
        run(
            model=model,
            out=str(out),
            force=True,
            keep=keep,
            uniform=uniform,
            layers=layers,
            profile=profile,
            overrides=sets,
        )
    return json.loads((out / "report.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--keep", default="50%")
    p.add_argument("--profile", default="demo")
    p.add_argument("--set", dest="sets", action="append", default=["baselines=[]"], metavar="KEY=VALUE")
    p.add_argument("--out", default="runs/uniform-vs-per-layer")
    p.add_argument("--smoke", action="store_true", help="tiny random model, a few problems (smoke test)")
    a = p.parse_args()
    if a.smoke:
        import _smoke

        scratch = _smoke.scratch("uniform")
        a.model, a.out, a.profile = _smoke.tiny_model(scratch), str(scratch / "out"), "quick"
        a.sets = [*a.sets, *_smoke.RECIPE_SETS, "train.max_steps=2", "train.lrs=[0.001]"]
    out = Path(a.out)
    rows = {}
    for name, uniform in (("uniform", True), ("per-layer", False)):
        rep = run_one(out / name, a.model, a.keep, uniform, a.profile, a.sets)
        res = rep["results"]
        cna = next(r for r in res["rows"] if r["name"].startswith("cna-pruned"))
        widths = [sum(len(v) for v in res["kept_indices"].values())]
        rows[name] = {"test2": cna["test2"], "kept": widths[0], "per_layer": res["kept"]["cna"]}
        rows.setdefault("original", next(r for r in res["rows"] if r["name"] == "original")["test2"])
    lines = [
        f"`python bench/uniform.py {' '.join(sys.argv[1:])}`: keep {a.keep} of every FFN layer's neurons in total",
        "",
        "| model | 2-digit full-answer acc [95% CI] | kept neurons | widths |",
        "|---|---|---|---|",
        f"| original | {_ci(rows['original'])} | | |",
    ]
    for name in ("uniform", "per-layer"):
        w = list(rows[name]["per_layer"].values())
        shape = f"{w[0]} in every layer" if len(set(w)) == 1 else f"{min(w)}-{max(w)} per layer"
        lines.append(f"| {name} | {_ci(rows[name]['test2'])} | {rows[name]['kept']} | {shape} |")
    md = "\n".join(lines)
    (out / "report.md").write_text(md + "\n")
    (out / "report.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(md)


def _ci(e: dict) -> str:
    lo, hi = e["full_answer_ci95"]
    return f"{100 * e['full_answer_acc']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] (n={e['n_problems']})"


if __name__ == "__main__":
    main()
