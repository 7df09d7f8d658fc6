"""Remove gender bias by editing the few FFN neurons that CNA finds (the gender-debias recipe).

Find the FFN neurons behind gender-biased profession predictions (CNA between "A woman ..." and "A man ..."
prompts on selection templates), zero (--edit zero, native checkpoint) or remove (--edit remove, sliced) the top
--neurons, and write a checkpoint with report.json/report.md/plots: bias before/after on disjoint evaluation
templates (total, woman-/man-biased, per profession), the random and activation-diff baselines, a sweep over N,
collateral (XSum perplexity, 1-digit arithmetic, factual gender controls) and the Wino-test rate.
"""

from surgery.commands.spec import CONTRAST_SELECTORS, EXPORT, FORCE, MODEL, OUT, RECIPE, Command, option, registered

COMMAND = Command(
    "debias",
    __doc__,
    [
        *MODEL,
        *OUT,
        *FORCE,
        *EXPORT,
        *RECIPE,
        option("--recipe", default="gender-debias", help="recipe name in recipes/ or a YAML path"),
        option("--neurons", type=int, default=None, help="how many neurons to edit"),
        option(
            "--method",
            default=None,
            type=registered("contrast"),
            help=f"{CONTRAST_SELECTORS} (or any registered contrast selector)",
        ),
        option("--edit", default=None, choices=["zero", "remove"]),
    ],
    "surgery.commands.debias.job:run",
)
run = COMMAND.run
