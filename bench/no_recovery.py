"""What a cut does before any recovery training: the original model sliced to each selector's keep set at the
given budgets (from a prune sweep folder's saved scores), optionally with FLAP's bias compensation, scored on the
1-digit problems and the first N 2-digit test problems. A check that the selection, not the recovery, is judged.

    python bench/no_recovery.py --folder runs/sweep-cpu --budgets 50 --compensate --test 300
    python bench/no_recovery.py --smoke     # a tiny random model, made-up scores, --compensate, few problems
"""

from __future__ import annotations

import argparse

import torch

from surgery.edits.pruning import keeps_for, load_recipe, make_task, sliced_copy, token_means
from surgery.io.loading import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", help="a `surgery prune --sweep` folder (state/scores.pt)")
    ap.add_argument("--budgets", default="50", help="kept percentages, e.g. 50,25")
    ap.add_argument("--compensate", action="store_true", help="fold the removed neurons' means into the bias")
    ap.add_argument("--test", type=int, default=300, help="2-digit test problems to score")
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--set", dest="sets", action="append", default=["data.validation_size=400"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default="smollm2-135m", help="the sweep's base model")
    ap.add_argument(
        "--smoke", action="store_true", help="a tiny random model, made-up scores, --compensate (smoke test)"
    )
    a = ap.parse_args()
    if a.smoke:
        from _smoke import RECIPE_SETS, scratch, sweep_scores, tiny_model

        tmp = scratch("no_recovery")
        a.model, a.folder = tiny_model(tmp), str(sweep_scores(tmp, {2: 64, 3: 64}))
        a.compensate, a.test, a.sets = True, 4, a.sets + RECIPE_SETS
    elif a.folder is None:
        ap.error("--folder is required")
    torch.set_num_threads(a.threads)
    sel = torch.load(f"{a.folder}/state/scores.pt", weights_only=False)["sel"]
    r = load_recipe("arithmetic-prune", a.sets, profile=a.profile)
    loaded = load_model(a.model)
    task = make_task(r, loaded.tokenizer)
    test = task.sets["test2"].select(range(min(a.test, len(task.sets["test2"]))))
    means = (
        token_means(loaded.model, loaded.tokenizer, task.cases, sel.layers, r.compensate_at) if a.compensate else None
    )
    print(
        f"original: 1-digit {task.score(loaded.model, task.sets['one_digit'])['full_answer_acc']:.3f}, "
        f"2-digit({len(test)}) {task.score(loaded.model, test)['full_answer_acc']:.3f}",
        flush=True,
    )
    for pct in (float(b) for b in a.budgets.split(",")):
        keeps = keeps_for(sel, "pct", pct)
        for name in sel.order:
            m = sliced_copy(loaded.model, keeps[name], means)
            one = task.score(m, task.sets["one_digit"])["full_answer_acc"]
            two = task.score(m, test)["full_answer_acc"]
            print(
                f"{'compensated ' if a.compensate else ''}{pct:g}% {name}: 1-digit {one:.3f}, "
                f"2-digit({len(test)}) {two:.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
