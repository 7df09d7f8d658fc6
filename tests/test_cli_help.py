"""`surgery --help` lists every verb with its purpose, and neither it nor `surgery VERB --help` imports torch,
transformers or peft (measured in a fresh interpreter). Every verb's declared options are exactly its job's
keyword parameters, so an option is declared once."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

import pytest

from surgery import __version__, commands
from surgery.cli import build_parser

HEAVY = ("torch", "transformers", "peft", "datasets", "matplotlib", "accelerate")
PROBE = """
import contextlib, io, json, sys
from surgery.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        main(sys.argv[1:])
    except SystemExit as e:
        code = e.code
print(json.dumps({"code": code, "text": out.getvalue(), "heavy": sorted(m for m in %r if m in sys.modules)}))
""" % (HEAVY,)


def _help(*argv: str) -> dict:
    r = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_top_help_lists_each_verb_with_its_purpose_and_imports_nothing_heavy():
    res = _help("--help")
    assert res["code"] == 0 and res["heavy"] == []
    for name in commands.names():
        summary = commands.get(name).summary
        assert summary and summary[:30] in " ".join(res["text"].split()), f"{name}: {summary!r} not in the help"


@pytest.mark.parametrize("verb", commands.BUILTIN)
def test_verb_help_imports_nothing_heavy(verb):
    res = _help(verb, "--help")
    assert res["code"] == 0 and res["heavy"] == [], res["heavy"]
    assert "--" in res["text"] or verb == "inspect"


def test_version():
    res = _help("--version")
    assert res["code"] == 0 and res["text"].strip() == f"surgery {__version__}"


@pytest.mark.parametrize("verb", commands.BUILTIN)
def test_options_are_declared_once_and_match_the_job(verb):
    command = commands.get(verb)
    params = inspect.signature(command.function()).parameters
    assert set(params) == {o.dest for o in command.options}
    defaults = command.defaults()
    parsed = vars(
        build_parser().parse_args(
            [
                verb,
                *(["PATH"] if verb in ("inspect", "export") else []),
                *(["A", "B"] if verb == "diff" else []),
                *(["--circuit", "C"] if verb == "heuristics" else []),
            ]
        )
    )
    parsed.pop("command")
    for k, v in defaults.items():
        assert parsed[k] == v, f"{verb} --{k}: parser default {parsed[k]!r}, declared {v!r}"
