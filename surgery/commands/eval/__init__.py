"""Score a model on a shipped suite (arithmetic, gender bias, perplexity) or on your own cases.

Evaluate a model on arithmetic (per-token and full-answer accuracy by op x digits, template and case type,
95% Wilson intervals), gender bias (profession log-prob gap, factual controls, Wino-test) or perplexity
(XSum sample). --data FILE (jsonl/csv/parquet/datasets folder, columns prompt, target, optional group;
--columns prompt=NAME,target=NAME) scores your own cases instead: full-target and per-token accuracy
(teacher forced), log p(target) and perplexity, overall and per group. Prints a table; with --out writes
DIR/report.json and DIR/report.md (an existing DIR needs --force).
"""

from surgery.commands.spec import DATA, FORCE, MODEL, OFFLOAD, OUT, TASK, Command

COMMAND = Command(
    "eval",
    __doc__,
    [
        *MODEL,
        *OFFLOAD,
        *TASK,
        *DATA,
        *OUT,
        *FORCE,
    ],
    "surgery.commands.eval.job:run",
)
run = COMMAND.run
