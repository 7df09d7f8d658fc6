"""Find an arithmetic circuit by activation patching, sized by faithfulness (Nikankin et al.).

Find the arithmetic circuit per operator by activation patching (Eq. 1) and faithfulness (Eq. 2).

Writes DIR/circuit.json (top-level "circuit": {"heads": ["L.H"], "mlps": [L]} = union over operators, "per_op"
with each operator's circuit, effects of every head/MLP at each role, faithfulness curves, neuron ranking),
DIR/circuit.md, DIR/effects.png (effect per layer x position) and DIR/faithfulness.png. --faithfulness F picks
the fewest heads reaching F (default: the Pareto knee) and the neurons per layer reaching F (default 0.9).
--score teacher-forced (default) scores every answer token given the ones before it; first: the first one.
"""

from surgery.commands.spec import FORCE, MODEL, OFFLOAD, OUT, Command, option, positive, strs

COMMAND = Command(
    "circuit",
    __doc__,
    [
        *MODEL,
        *OFFLOAD,
        *OUT,
        *FORCE,
        option("--task", default="arithmetic"),
        option(
            "--ops",
            type=strs,
            default=None,
            help="operators, e.g. +,- (default + - * /); a list that starts with - needs =: --ops=-,/",
        ),
        option("--operands", default="0-9", help="inclusive operand range LO-HI, e.g. 0-99"),
        option("--templates", type=strs, default=None, help="one template: calculate (default) or plain"),
        option("--limit", type=int, default=50, help="clean prompts per operator (correctly answered)"),
        option("--batch-size", type=positive, default=32),
        option("--seed", type=int, default=0),
        option(
            "--faithfulness",
            type=float,
            default=None,
            help="target F in (0, 1] (default: Pareto knee; 0.9 for neurons)",
        ),
        option("--mode", default="screen", choices=["exact", "screen"], help="exact: every component exactly"),
        option("--verify", type=positive, default=60, help="screen mode: components re-measured exactly"),
        option("--neuron-from", type=int, default=None, help="first layer of the neuron level (default L/2)"),
        option("--rescore", type=positive, default=16, help="neurons per layer re-measured exactly"),
        option("--max-rows", type=positive, default=1024, help="rows per stacked forward"),
        option("--no-agree", dest="agree", action="store_false", help="skip the heads/cna agreement"),
        option("--metric", default="nl", choices=["nl", "prob"], help="inside Eq. 2: nl (paper) or prob"),
        option(
            "--score",
            default="teacher-forced",
            help="answer scoring: teacher-forced (every answer token, default) or first (first answer token)",
        ),
        option("--include-wrong", action="store_true", help="also patch prompts the model answers wrongly"),
        option(
            "--mean-sample",
            type=int,
            default=None,
            help="means over a seeded sample of N prompts per operator (default all; bounds time at 0-99)",
        ),
    ],
    "surgery.commands.circuit.job:run",
)
run = COMMAND.run
