"""surgery: find the heads and FFN neurons behind a behaviour, cut them, ship the result.

The CLI is a table from subcommand to one function (an operation that returns a `Report`); this module only
parses. Every option maps 1:1 to a keyword argument of that function, whose docstring is the subcommand's help.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable

from . import selectors
from .errors import UsageError
from .evaluate import SUITES


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse would print the whole usage first)
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


# ---- value parsers: turn one option string into a typed value, or fail with one line ---------------------
def text(s: str) -> str:
    """A non-blank string (an empty --prompt or --target is a mistake, not a request for the default)."""
    if not s.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return s


def strs(s: str) -> tuple[str, ...]:
    """'a, b' -> ('a', 'b'); at least one item."""
    out = tuple(x.strip() for x in s.split(",") if x.strip())
    if not out:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {s!r}")
    return out


def ints(s: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in strs(s))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}")


def heads(s: str) -> tuple[tuple[int, int], ...]:
    """'17.4,20.1' -> ((17, 4), (20, 1))."""
    try:
        return tuple((int(a), int(b)) for a, b in (x.split(".") for x in strs(s)))
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"expected heads as LAYER.HEAD[,LAYER.HEAD], got {s!r}")


def registered(kind: str) -> Callable[[str], str]:
    """A selector name of `kind`, checked against the registry when the command line is parsed."""
    def check(s: str) -> str:
        if s not in selectors.names(kind):
            raise argparse.ArgumentTypeError(f"unknown selector {s!r}; use one of {', '.join(selectors.names(kind))}")
        return s
    return check


def positive(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


# ---- shared option groups -----------------------------------------------------------------------------
MODEL = [
    (("--model",), dict(default="smollm2-135m", help="registry name, local HF folder, or hub id")),
    (("--dtype",), dict(default="float32", help="float32 | bfloat16 | float16")),
    (("--device",), dict(default="cpu", help="cpu | cuda | auto (accelerate device_map for big models)")),
    (("--trust-remote-code",), dict(action="store_true", help="run the model folder's own Python code (auto_map); "
                                    "only for authors you trust (surgery's own sliced checkpoints need no flag)")),
]
TASK = [
    (("--task",), dict(default="arithmetic", help=" | ".join(SUITES))),
    (("--digits",), dict(type=ints, default=(1,), help="digit counts, e.g. 1,2")),
    (("--ops",), dict(type=strs, default=None, help="operations, e.g. +,-,*,/ (default all)")),
    (("--templates",), dict(type=strs, default=None, help="prompt templates: plain,calculate,words,question")),
    (("--limit",), dict(type=int, default=None, help="at most N problems (quick runs)")),
    (("--batch-size",), dict(type=positive, default=64)),
    (("--seed",), dict(type=int, default=0)),
]
DATA = [
    (("--data",), dict(default=None, help="your cases: .jsonl/.csv/.parquet or a datasets folder (columns prompt, "
                       "target, optional group, split); or a built-in task name")),
    (("--columns",), dict(default=None, help="map your column names: prompt=question,target=answer")),
]
OUT = [(("--out",), dict(default=None, help="output folder for report.json / report.md / plots"))]
FORCE = [(("--force",), dict(action="store_true", help="overwrite an existing output folder"))]
RECIPE = [
    (("--quick",), dict(action="store_true", help="the recipe's quick profile (CPU-sized smoke run)")),
    (("--profile",), dict(default=None, help="a named profile of the recipe (e.g. cpu); --quick = --profile quick")),
    (("--set",), dict(dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override any recipe field, e.g. --set lora.rank=8 (repeatable)")),
]

COMMANDS: dict[str, tuple[str, list]] = {
    "eval": ("surgery.evaluate:run", MODEL + TASK + DATA + OUT),
    "heads": ("surgery.heads:run", MODEL + TASK + DATA + OUT + [
        (("--ablation",), dict(default="zero", choices=["zero", "mean"])),
        (("--mode",), dict(default="exact", choices=["exact", "screen"])),
        (("--verify",), dict(type=positive, default=20, help="screen mode: exact-scan the top K screened heads")),
        (("--heads",), dict(dest="only_heads", type=heads, default=None, help="scan only these heads L.H,...")),
        (("--method",), dict(default="ablation", choices=["ablation", "path-patch"],
                             help="ablation (accuracy drop) or path-patch (Zhang et al., relative logit effect)")),
        (("--counterfactual",), dict(default="null-operator", choices=["null-operator"],
                                     help="path-patch: operator token replaced by ' nothing'")),
    ]),
    "cna": ("surgery.cna_run:run", MODEL + TASK + DATA + OUT + [
        (("--pairs",), dict(default=None, help="contrast pairs file (prompt_a, prompt_b, optional target): CNA A vs B")),
        (("--tokens",), dict(default=None, choices=["first", "all"], help="score the first target token or every "
                             "one, teacher forced (default: all for --data, first for --pairs)")),
        (("--prompt",), dict(type=text, default=None, help="single-prompt mode: the input text")),
        (("--prompt-b",), dict(type=text, default=None, help="compare against this second prompt (same model)")),
        (("--target",), dict(type=text, default=None, help="target token text (default: the model's own top-1)")),
        (("--ablate-head",), dict(type=heads, default=None, help="compare against the model with heads L.H[,L.H] zeroed")),
        (("--against",), dict(default=None, help="compare against another checkpoint folder or PEFT adapter")),
        (("--layers",), dict(default=None, help="layer range A-B or list (default all)")),
        (("--top",), dict(type=positive, default=20, help="neurons to report")),
        (("--exhaustive",), dict(action="store_true", help="exact score for every neuron (verification)")),
        (("--validate",), dict(type=strs, default=(), help="paper validations: mask,pe,fe")),
        (("--logits-mb",), dict(type=float, default=64.0, help="memory bound of dataset mode: MiB of base logits "
                                "held per setting (sets the cases per pass; raise it for speed)")),
    ]),
    "prune": ("surgery.prune:run", MODEL + DATA + OUT + FORCE + RECIPE + [
        (("--recipe",), dict(default="arithmetic-prune", help="recipe name in recipes/ or a YAML path")),
        (("--keep",), dict(default=None, help="topN (per-case top-N union), P%% (global budget), or auto "
                           "(smallest budget within --max-drop points; needs a validation split)")),
        (("--sweep",), dict(default=None, help="budgets to compare, e.g. 50%%,25%%,10%%,5%% (resumable in --out)")),
        (("--max-drop",), dict(type=float, default=None, help="--keep auto: validation accuracy points the cut may "
                               "cost (default: the recipe's search.max_drop)")),
        (("--layers",), dict(default=None, help="'deep' or A-B")),
        (("--selector",), dict(default=None, type=registered("task"), help=f"{' | '.join(selectors.names('task'))} "
                               "(or any selector registered with surgery.selectors.register)")),
        (("--lora-layer",), dict(type=int, default=None)),
        (("--against",), dict(default=None, help="reference adapter/checkpoint for CNA instead of training one; "
                              "with --keep auto, 'original' measures the drop against the original model")),
        (("--layout",), dict(default=None, choices=["sliced", "padded"])),
    ]),
    "debias": ("surgery.debias:run", MODEL + OUT + FORCE + RECIPE + [
        (("--recipe",), dict(default="gender-debias", help="recipe name in recipes/ or a YAML path")),
        (("--neurons",), dict(type=int, default=None, help="how many neurons to edit")),
        (("--method",), dict(default=None, type=registered("contrast"),
                             help=f"{' | '.join(selectors.names('contrast'))} (or any registered contrast selector)")),
        (("--edit",), dict(default=None, choices=["zero", "remove"])),
    ]),
    "edit": ("surgery.edit:run", MODEL + OUT + FORCE + [
        (("--pairs",), dict(default=None, help="contrast pairs (prompt_a, prompt_b, optional target, group, split) "
                            "as .jsonl/.csv/.parquet/datasets folder, or gender-bias (the debias recipe)")),
        (("--columns",), dict(default=None, help="map your column names: prompt_a=NAME,prompt_b=NAME,target=NAME")),
        (("--neurons",), dict(type=positive, default=18, help="how many neurons to edit")),
        (("--edit",), dict(default="zero", choices=["zero", "scale", "remove"])),
        (("--scale",), dict(type=float, default=None, help="--edit scale: multiply the coefficients by S")),
        (("--method",), dict(default="cna", type=registered("contrast"),
                             help=f"{' | '.join(selectors.names('contrast'))} (or any registered contrast selector)")),
        (("--baselines",), dict(type=strs, default=(), help="other selectors measured at the same N, e.g. random")),
        (("--keep-data",), dict(default=None, help="cases that must not change (prompt, target): collateral")),
        (("--keep-columns",), dict(default=None, help="column mapping of --keep-data")),
        (("--layers",), dict(default=None, help="selection layers A-B or list (default all)")),
        (("--tokens",), dict(default="first", choices=["first", "all"], help="CNA on the first target token or all")),
        (("--test-size",), dict(type=float, default=0.5, help="held-out share of pairs without a split column")),
        (("--seed",), dict(type=int, default=0)),
        (("--candidates",), dict(type=positive, default=100, help="CNA: screened neurons rescored exactly")),
        (("--batch-size",), dict(type=positive, default=32)),
        (("--ppl-docs",), dict(type=int, default=6, help="XSum documents for the perplexity collateral (0: skip)")),
        (("--ppl-tokens",), dict(type=int, default=128)),
    ]),
    "lora-sweep": ("surgery.lora_sweep:run", MODEL + OUT + FORCE + RECIPE + [
        (("--recipe",), dict(default="arithmetic-prune")),
        (("--layers",), dict(default=None, help="layers to try, A-B or list (default: every layer)")),
    ]),
    "finetune": ("surgery.finetune:run", MODEL + OUT + FORCE + RECIPE + DATA + [
        (("--recipe",), dict(default="precise-sft", help="recipe name in recipes/ or a YAML path")),
        (("--components",), dict(default=None, help="heads.json, circuit.json, or a list like '14.2, 1.4, mlp.20' "
                                                    "(default: the recipe's own head scan)")),
        (("--top-heads",), dict(type=positive, default=None, help="train the first K heads of --components")),
    ]),
    "circuit": ("surgery.circuit:run", MODEL + OUT + FORCE + [
        (("--task",), dict(default="arithmetic")),
        (("--ops",), dict(type=strs, default=None, help="operators, e.g. +,- (default + - * /)")),
        (("--operands",), dict(default="0-9", help="inclusive operand range LO-HI, e.g. 0-99")),
        (("--templates",), dict(type=strs, default=None, help="one template: calculate (default) or plain")),
        (("--limit",), dict(type=int, default=50, help="clean prompts per operator (correctly answered)")),
        (("--batch-size",), dict(type=positive, default=32)),
        (("--seed",), dict(type=int, default=0)),
        (("--faithfulness",), dict(type=float, default=None, help="target F in (0, 1] (default: Pareto knee; 0.9 for neurons)")),
        (("--mode",), dict(default="screen", choices=["exact", "screen"], help="exact: every component exactly")),
        (("--verify",), dict(type=positive, default=60, help="screen mode: components re-measured exactly")),
        (("--neuron-from",), dict(type=int, default=None, help="first layer of the neuron level (default L/2)")),
        (("--rescore",), dict(type=positive, default=16, help="neurons per layer re-measured exactly")),
        (("--max-rows",), dict(type=positive, default=1024, help="rows per stacked forward")),
        (("--no-agree",), dict(dest="agree", action="store_false", help="skip the heads/cna agreement")),
        (("--metric",), dict(default="nl", choices=["nl", "prob"], help="inside Eq. 2: nl (paper) or prob")),
        (("--score",), dict(default="teacher-forced", help="answer scoring: teacher-forced (every answer token, "
                                                           "default) or first (first answer token)")),
        (("--include-wrong",), dict(action="store_true", help="also patch prompts the model answers wrongly")),
        (("--mean-sample",), dict(type=int, default=None, help="means over a seeded sample of N prompts per "
                                                               "operator (default all; bounds time at 0-99)")),
    ]),
    "heuristics": ("surgery.heuristics:run", OUT + FORCE + [
        (("--circuit",), dict(required=True, help="a folder written by `surgery circuit`")),
        (("--model",), dict(default=None, help="default: the circuit's own model (another one is refused)")),
        (("--dtype",), dict(default="float32")),
        (("--device",), dict(default="cpu")),
        (("--trust-remote-code",), dict(action="store_true", help="allow the model folder's own Python code")),
        (("--threshold",), dict(type=float, default=0.6, help="match score needed for a label (paper: 0.6)")),
        (("--families",), dict(type=strs, default=("ranges", "modulo", "digits", "identical", "multi-result"))),
        (("--top",), dict(type=positive, default=20, help="circuit neurons per layer and operator to label")),
        (("--batch-size",), dict(type=positive, default=64)),
        (("--seed",), dict(type=int, default=0)),
        (("--max-heuristics",), dict(type=positive, default=10, help="ablation 1: heuristics with most neurons")),
        (("--max-prompts",), dict(type=positive, default=200, help="ablations: correctly answered prompts used")),
        (("--grid-sample",), dict(type=int, default=None, help="maps over a seeded sample of N prompts per operator "
                                                               "(default the whole operand grid)")),
    ]),
    "inspect": ("surgery.export:inspect", [(("path",), dict(help="checkpoint folder"))]),
    "diff": ("surgery.export:diff", [
        (("base",), dict(help="base model folder or registry name")),
        (("other",), dict(help="edited checkpoint folder")),
        (("--out",), dict(default=None)),
    ]),
}


def _target(spec: str) -> Callable:
    module, fn = spec.split(":")
    return getattr(importlib.import_module(module), fn)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="surgery", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (spec, options) in COMMANDS.items():
        module = spec.split(":")[0]
        sp = sub.add_parser(name, help=f"see `surgery {name} --help` ({module})", description=_doc(spec))
        for flags, kw in options:
            sp.add_argument(*flags, **kw)
    return p


def _doc(spec: str) -> str:
    try:
        return (_target(spec).__doc__ or "").strip()
    except (ImportError, AttributeError):
        return ""


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    fn = _target(COMMANDS[args.pop("command")][0])
    try:
        report = fn(**args)
    except UsageError as e:
        sys.stderr.write(f"surgery: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("surgery: interrupted\n")
        return 130
    if report.markdown:
        print(report.markdown)
    for f in report.files:
        print(f"wrote {f}")
    return report.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
