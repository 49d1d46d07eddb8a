"""What both CLIs share: the error boundary, common flags and the command-module protocol.

A command module exposes ``register(subparsers)``, which adds its sub-parser and sets ``func=run`` where
``run(args) -> int`` returns an exit code. Known errors become one line and a hint on stderr with the error's
exit code; results go to stdout.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from pixcell_fed.errors import ExitCode, PixcellFedError

EXIT_CODES_EPILOG = """exit codes:
  0  ok
  1  failure
  2  usage or config error
  3  privacy gate refused (audit FAIL, refused approval, failed verification)
  4  partial success (some items failed; see the summary)"""


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps prose to the terminal; keeps text that has line breaks (the exit-code table) as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs) -> None:
        # Every sub-command documents the exit codes unless it writes its own epilog.
        kwargs.setdefault("epilog", EXIT_CODES_EPILOG)
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:  # argparse's own usage errors use our exit code 2 and format
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        print(f"hint: run '{self.prog} --help'", file=sys.stderr)
        raise SystemExit(int(ExitCode.USAGE))


def build_parser(prog: str, description: str, command_modules: Sequence[str]) -> argparse.ArgumentParser:
    """A parser with the common flags and one sub-command per module in ``command_modules``."""
    from pixcell_fed import __version__

    parser = _Parser(
        prog=prog,
        description=description,
        epilog=EXIT_CODES_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--no-progress", action="store_true", help="turn progress bars off")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in command_modules:
        importlib.import_module(name).register(sub)
    return parser


def run_cli(prog: str, description: str, command_modules: Sequence[str], argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run the chosen command inside the error boundary, return the exit code."""
    from pixcell_fed.progress import set_progress_enabled
    from pixcell_fed.runlog import configure_stderr_logging

    parser = build_parser(prog, description, command_modules)
    args = parser.parse_args(argv)
    if args.no_progress:
        set_progress_enabled(False)
    configure_stderr_logging(args.verbose)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return int(func(args))
    except PixcellFedError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to continue where it stopped", file=sys.stderr)
        return int(ExitCode.FAILURE)
