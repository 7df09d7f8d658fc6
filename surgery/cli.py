"""surgery: find the heads and FFN neurons behind a behaviour, cut them, ship the result.

This module only parses: every verb is a `Command` declared in surgery/commands/<verb>/__init__.py (options with
their defaults and checks, once), whose job returns a `Report`. Printing the help imports no torch.
"""

from __future__ import annotations

import argparse
import sys

from surgery import __version__, commands
from surgery.errors import UsageError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse would print the whole usage first)
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    commands.load_plugins()
    p = _Parser(
        prog="surgery", description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--version", action="version", version=f"surgery {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="VERB")
    for name in commands.names():
        cmd = commands.get(name)
        sp = sub.add_parser(
            name, help=cmd.summary, description=cmd.doc.strip(), formatter_class=argparse.RawDescriptionHelpFormatter
        )
        cmd.add_to(sp)
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    command = commands.get(args.pop("command"))
    try:
        report = command.function()(**args)
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
