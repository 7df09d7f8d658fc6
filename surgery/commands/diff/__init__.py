"""Show which heads, neurons and tensors differ between a base model and an edited checkpoint.

Which FFN neurons and attention heads were removed, zeroed or scaled, and which other tensors changed,
from the weights alone (no manifest needed). BASE may be a registry name. Scaled neurons report their factor;
amplified ones (factor > 1) are flagged. Either side may be a GGUF file `surgery export` wrote (the other side a
checkpoint folder, whose config names both sides' tensors); in q8_0 / q4_0 files a change smaller than the block
rounding cannot be seen.
"""

from surgery.commands.spec import Command, option

COMMAND = Command(
    "diff",
    __doc__,
    [
        option("base", help="base model folder or registry name"),
        option("other", help="edited checkpoint folder, or a GGUF file exported from one"),
        option("--out", default=None),
    ],
    "surgery.commands.diff.job:diff",
)
run = COMMAND.run
