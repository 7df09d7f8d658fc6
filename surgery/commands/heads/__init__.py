"""Find the attention heads a task needs: ablate each head (or path-patch it) and measure the drop.

Ablate each attention head and measure arithmetic accuracy per operation (the paper's head scan).

Writes DIR/heads.json (baseline + one row per head: acc, drop, n per op / group / case type), DIR/heads.md
(Tables 1-3 of the paper) and DIR/heads.png (layer x head heatmaps of the accuracy drop). --mode screen ranks
all heads by a first-order attribution and exact-scans the top --verify K. Resumes from DIR after an
interruption; `accelerate launch -m surgery heads ...` splits the heads across processes.
--method path-patch: Zhang et al.'s path patching with a null-operator counterfactual instead (see
surgery.path_patch; --digits defaults to the given digits, key heads have an effect below -5%).
--data FILE (prompt, target, optional group; --columns to map names): scan your own cases instead, every
target token teacher forced, accuracy reported overall and per group.
"""

from surgery.commands.spec import DATA, MODEL, OFFLOAD, OUT, TASK, Command, heads, option, positive

COMMAND = Command(
    "heads",
    __doc__,
    [
        *MODEL,
        *OFFLOAD,
        *TASK,
        *DATA,
        *OUT,
        option("--ablation", default="zero", choices=["zero", "mean"]),
        option("--mode", default="exact", choices=["exact", "screen"]),
        option("--verify", type=positive, default=20, help="screen mode: exact-scan the top K screened heads"),
        option("--heads", dest="only_heads", type=heads, default=None, help="scan only these heads L.H,..."),
        option(
            "--method",
            default="ablation",
            choices=["ablation", "path-patch"],
            help="ablation (accuracy drop) or path-patch (Zhang et al., relative logit effect)",
        ),
        option(
            "--counterfactual",
            default="null-operator",
            choices=["null-operator"],
            help="path-patch: operator token replaced by ' nothing'",
        ),
    ],
    "surgery.commands.heads.job:run",
)
run = COMMAND.run
