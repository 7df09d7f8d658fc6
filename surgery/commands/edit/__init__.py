"""Remove the difference between two kinds of prompts by editing FFN neurons (debias for any pairs).

Remove the difference between prompt A and prompt B of your pairs (--pairs FILE: prompt_a, prompt_b,
optional target, group, split; or gender-bias, the debias recipe): select --neurons FFN neurons by CNA
between A and B on the selection split (--method cna | random | activation-diff), edit them (--edit zero |
scale [--scale S] | remove), measure the A/B gap (mean |log p(target|A) - log p(target|B)|) on held-out pairs
before and after, the collateral (XSum perplexity; --keep-data FILE: cases that must not change) and
export the edited checkpoint with report.json/report.md and provenance.
"""

from surgery.commands.spec import (
    CONTRAST_SELECTORS,
    EXPORT,
    FORCE,
    MODEL,
    OUT,
    Command,
    option,
    positive,
    registered,
    strs,
)

COMMAND = Command(
    "edit",
    __doc__,
    [
        *MODEL,
        *OUT,
        *FORCE,
        *EXPORT,
        option(
            "--pairs",
            default=None,
            help="contrast pairs (prompt_a, prompt_b, optional target, group, split) "
            "as .jsonl/.csv/.parquet/datasets folder, or gender-bias (the debias recipe)",
        ),
        option("--columns", default=None, help="map your column names: prompt_a=NAME,prompt_b=NAME,target=NAME"),
        option("--neurons", type=positive, default=18, help="how many neurons to edit"),
        option(
            "--edit",
            default="zero",
            choices=["zero", "scale", "remove", "leace", "project", "steer"],
            help="neuron edits: zero | scale | remove; representation edits: leace | project | steer",
        ),
        option(
            "--scale",
            default=None,
            help="--edit scale: multiply the coefficients by S, or auto (chosen on the validation pairs; default)",
        ),
        option(
            "--edit-layers",
            type=positive,
            default=4,
            help="representation edits: how many layers (those whose A/B outputs differ most on the selection pairs)",
        ),
        option(
            "--method",
            default="cna",
            type=registered("contrast"),
            help=f"{CONTRAST_SELECTORS} (or any registered contrast selector)",
        ),
        option("--baselines", type=strs, default=(), help="other selectors measured at the same N, e.g. random"),
        option("--keep-data", default=None, help="cases that must not change (prompt, target): collateral"),
        option("--keep-columns", default=None, help="column mapping of --keep-data"),
        option(
            "--keep-test-size",
            type=float,
            default=0.5,
            help="cna-specific reads --keep-data: the share held out to measure the collateral on",
        ),
        option(
            "--stereoset",
            default=None,
            help="StereoSet bias types measured as held-out benchmark (gender,profession,race,religion or none; "
            "default: gender for --pairs gender-bias)",
        ),
        option("--stereoset-limit", type=positive, default=None, help="StereoSet items per type (default all)"),
        option(
            "--eval-data",
            default=None,
            help="more held-out pairs (other phrasings, other groups; columns as --pairs): the gap before and after, "
            "never used for selection",
        ),
        option("--eval-columns", default=None, help="column mapping of --eval-data"),
        option("--layers", default=None, help="selection layers A-B or list (default all)"),
        option("--tokens", default="first", choices=["first", "all"], help="CNA on the first target token or all"),
        option("--test-size", type=float, default=0.5, help="held-out share of pairs without a split column"),
        option("--seed", type=int, default=0),
        option("--candidates", type=positive, default=100, help="CNA: screened neurons rescored exactly"),
        option("--batch-size", type=positive, default=32),
        option("--ppl-docs", type=int, default=6, help="XSum documents for the perplexity collateral (0: skip)"),
        option("--ppl-tokens", type=int, default=128),
        option(
            "--compare",
            action="store_true",
            help="run every method at several budgets with random controls (resumable: <out>.partial) and write a "
            "Pareto table and plot; no checkpoint",
        ),
        option("--budgets", default="6,18,54", help="--compare: neuron budgets"),
        option("--layer-budgets", default="1,4,12", help="--compare: layer budgets of the representation edits"),
    ],
    "surgery.commands.edit.job:run",
)
run = COMMAND.run
