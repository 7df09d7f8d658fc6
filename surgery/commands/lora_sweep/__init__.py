"""Train one LoRA per layer on 2-digit arithmetic to see where it helps (paper Figure 2).

Train one LoRA per layer on 2-digit arithmetic, report test accuracy per layer (paper Figure 2, PNG) and
the coefficient amplification of each LoRA model's CNA top neurons per layer group vs the original
(paper Tables 9-10).
"""

from surgery.commands.spec import FORCE, MODEL, OUT, RECIPE, Command, option

COMMAND = Command(
    "lora-sweep",
    __doc__,
    [
        *MODEL,
        *OUT,
        *FORCE,
        *RECIPE,
        option("--recipe", default="arithmetic-prune"),
        option("--layers", default=None, help="layers to try, A-B or list (default: every layer)"),
    ],
    "surgery.commands.lora_sweep.job:run",
)
run = COMMAND.run
