"""Label a circuit's neurons with arithmetic heuristics and ablate them (bag of heuristics).

Label the circuit's top neurons with arithmetic heuristics (activation maps over the operand grid), and
test the labels by ablation with random-neuron controls.

Reads CIRCUIT/circuit.json (from `surgery circuit`); writes DIR/heuristics.json (label, match score and map
per neuron; classified fraction; ablations with 95% intervals), DIR/heuristics.md and DIR/gallery.png.
"""

from surgery.commands.spec import FORCE, OUT, Command, option, positive, strs

COMMAND = Command(
    "heuristics",
    __doc__,
    [
        *OUT,
        *FORCE,
        option("--circuit", required=True, help="a folder written by `surgery circuit`"),
        option("--model", default=None, help="default: the circuit's own model (another one is refused)"),
        option("--dtype", default="float32"),
        option("--device", default="cpu"),
        option("--trust-remote-code", action="store_true", help="allow the model folder's own Python code"),
        option("--threshold", type=float, default=0.6, help="match score needed for a label (paper: 0.6)"),
        option("--families", type=strs, default=("ranges", "modulo", "digits", "identical", "multi-result")),
        option("--top", type=positive, default=20, help="circuit neurons per layer and operator to label"),
        option("--batch-size", type=positive, default=64),
        option("--seed", type=int, default=0),
        option("--max-heuristics", type=positive, default=10, help="ablation 1: heuristics with most neurons"),
        option("--max-prompts", type=positive, default=200, help="ablations: correctly answered prompts used"),
        option(
            "--grid-sample",
            type=int,
            default=None,
            help="maps over a seeded sample of N prompts per operator (default the whole operand grid)",
        ),
    ],
    "surgery.commands.heuristics.job:run",
)
run = COMMAND.run
