"""Verify a checkpoint's manifest and file hashes and show how it was made.

Summarise a checkpoint's provenance (surgery.json) and verify it: the manifest's own hash, the size and
sha256 of every file it lists, that no other file is in the folder (subfolders included), and that every
tensor file parses. Exit code 0 when all match, 1 when anything was altered, added, removed or truncated,
2 when PATH is not a readable surgery checkpoint.
"""

from surgery.commands.spec import Command, option

COMMAND = Command(
    "inspect",
    __doc__,
    [
        option("path", help="checkpoint folder, or a .gguf file written by `surgery export`"),
    ],
    "surgery.commands.inspect.job:inspect",
)
run = COMMAND.run
