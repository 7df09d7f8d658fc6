"""Fine-tune only the heads and MLPs that carry a skill (precise SFT), against full, LoRA and random.

Precise fine-tuning (Zhang et al.): train only the heads (q/k/v rows, o_proj columns) and MLPs that carry
arithmetic, and compare with full fine-tuning, LoRA, random heads, + MLPs and a K sweep on the same data and
steps: math (2-digit arithmetic, ASDiv) and general ability (MMLU, CSQA, XSum perplexity), 95% intervals.
Writes DIR/report.json, report.md, tradeoff.png and DIR/checkpoint (the precise model, native load).
--data FILE (prompt, target, optional group, split; --columns to map names): train on your train split and
report your test split's teacher-forced full-target accuracy instead of the math columns (split by row with
data.seed, data.test_size); without --components the head/MLP scans run on your train rows.
"""

from surgery.commands.spec import DATA, EXPORT, FORCE, MODEL, OUT, RECIPE, Command, option, positive

COMMAND = Command(
    "finetune",
    __doc__,
    [
        *MODEL,
        *OUT,
        *FORCE,
        *EXPORT,
        *RECIPE,
        *DATA,
        option("--recipe", default="precise-sft", help="recipe name in recipes/ or a YAML path"),
        option(
            "--components",
            default=None,
            help="heads.json, circuit.json, or a list like '14.2, 1.4, mlp.20' (default: the recipe's own head scan)",
        ),
        option("--top-heads", type=positive, default=None, help="train the first K heads of --components"),
    ],
    "surgery.commands.finetune.job:run",
)
run = COMMAND.run
