"""Rank FFN neurons by their effect on the predicted token, or by its change between two settings (CNA).

Neuron importance (the paper's log-prob increase of the target when a neuron's subvalue is added, through
the frozen final norm and unembedding) for every FFN neuron, and CNA: the change of that importance between
setting A and B. The reported top neurons are certified equal to an exhaustive ranking. --validate runs the
paper's checks (mask: Table 5, pe: Table 6, fe: Table 8) with random-neuron controls.
--data FILE: your cases (prompt, target; target = every target token teacher forced, or its first with
--tokens first). --pairs FILE (prompt_a, prompt_b, optional target): CNA between prompt A and prompt B of
each pair (target = the pair's target, default the model's top-1 after A), summed over pairs.
--logits-mb bounds the memory of dataset and --data/--pairs mode: the MiB of base logits (layers x cases x
vocabulary, fp32) each setting holds at once; a pass takes at most that many cases (and --batch-size).
"""

from surgery.commands.spec import DATA, MODEL, OFFLOAD, OUT, TASK, Command, heads, option, positive, strs, text

COMMAND = Command(
    "cna",
    __doc__,
    [
        *MODEL,
        *OFFLOAD,
        *TASK,
        *DATA,
        *OUT,
        option("--pairs", default=None, help="contrast pairs file (prompt_a, prompt_b, optional target): CNA A vs B"),
        option(
            "--tokens",
            default=None,
            choices=["first", "all"],
            help="score the first target token or every "
            "one, teacher forced (default: all for --data, first for --pairs)",
        ),
        option("--prompt", type=text, default=None, help="single-prompt mode: the input text"),
        option("--prompt-b", type=text, default=None, help="compare against this second prompt (same model)"),
        option("--target", type=text, default=None, help="target token text (default: the model's own top-1)"),
        option("--ablate-head", type=heads, default=None, help="compare against the model with heads L.H[,L.H] zeroed"),
        option("--against", default=None, help="compare against another checkpoint folder or PEFT adapter"),
        option("--layers", default=None, help="layer range A-B or list (default all)"),
        option("--top", type=positive, default=20, help="neurons to report"),
        option("--exhaustive", action="store_true", help="exact score for every neuron (verification)"),
        option("--validate", type=strs, default=(), help="paper validations: mask,pe,fe"),
        option(
            "--logits-mb",
            type=float,
            default=64.0,
            help="memory bound of dataset mode: MiB of base logits "
            "held per setting (sets the cases per pass; raise it for speed)",
        ),
    ],
    "surgery.commands.cna.job:run",
)
run = COMMAND.run
