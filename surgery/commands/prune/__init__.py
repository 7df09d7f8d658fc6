"""Cut the FFN down to the neurons a task needs (CNA), retrain a LoRA, export a smaller checkpoint.

Prune a model's FFN with CNA (paper 6.1): reference LoRA, CNA on 1-digit cases, keep topN / P% of the
chosen layers, slice, fresh LoRA, train on 2-digit problems, compare with random / magnitude / activation /
taylor at the same per-layer budget, export a checkpoint (sliced by default) with report and plots.
`--sweep 50%,25%,10%,5%`: every budget x selector from one set of scores, resumable in --out, with an
accuracy-vs-kept plot. `--keep auto --max-drop D`: the smallest kept percentage whose recovered validation
accuracy is within D points of the unpruned LoRA model (`--against original`: of the original), exported.
`--uniform --keep P%`: every layer cut to the same width (Minitron-style), a stock checkpoint with no remote code.
`--data FILE` prunes for your own (prompt, target) rows instead (recipe key data.path; e.g. custom-prune).
"""

from surgery.commands.spec import DATA, EXPORT, FORCE, MODEL, OUT, RECIPE, TASK_SELECTORS, Command, option, registered

COMMAND = Command(
    "prune",
    __doc__,
    [
        *MODEL,
        *DATA,
        *OUT,
        *FORCE,
        *EXPORT,
        *RECIPE,
        option("--recipe", default="arithmetic-prune", help="recipe name in recipes/ or a YAML path"),
        option(
            "--keep",
            default=None,
            help="topN (per-case top-N union), P%% (global budget), or auto "
            "(smallest budget within --max-drop points; needs a validation split)",
        ),
        option("--sweep", default=None, help="budgets to compare, e.g. 50%%,25%%,10%%,5%% (resumable in --out)"),
        option(
            "--max-drop",
            type=float,
            default=None,
            help="--keep auto: validation accuracy points the cut may cost (default: the recipe's search.max_drop)",
        ),
        option("--layers", default=None, help="'deep' or A-B"),
        option(
            "--selector",
            default=None,
            type=registered("task"),
            help=f"{TASK_SELECTORS} (or any selector registered with surgery.find.selectors.register)",
        ),
        option("--lora-layer", type=int, default=None),
        option(
            "--against",
            default=None,
            help="reference adapter/checkpoint for CNA instead of training one; "
            "with --keep auto, 'original' measures the drop against the original model",
        ),
        option("--layout", default=None, choices=["sliced", "padded"]),
        option(
            "--uniform",
            action="store_true",
            help="with --keep P%%: EVERY layer keeps P%% of its neurons, so the checkpoint is a stock config "
            "(plain from_pretrained; GGUF as the stock llama.cpp architecture)",
        ),
        option(
            "--multiple",
            type=int,
            default=None,
            help="pad every sliced layer's width up to a multiple of this with zero neurons (default 8; 32: "
            "q8_0/q4_0 GGUF blocks; 1: exact widths); recorded as ffn.padding",
        ),
    ],
    "surgery.commands.prune.job:run",
)
run = COMMAND.run
