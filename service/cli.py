"""`classifier-gateway`: one command line for the gateway, the factory and the workflow between them.

This module is only the entry point: it builds the parser from the command groups registered in
`service/commands/__init__.py` and turns what a command raises into an exit code. Exit codes: 0
success, 1 a problem the user can fix (`UserError`: one line on stderr), 2 wrong usage (argparse),
130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import os
import sys
from collections.abc import Callable, Sequence

from service.commands import register
from service.commands.errors import UserError

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="classifier-gateway",
        description="An inference gateway for fine-tuned text classifiers, and a local factory "
                    "that trains them.",
        epilog="`classifier-gateway COMMAND --help` tells more about each command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    register(sub)
    _help_when_incomplete(parser)
    return parser


def version() -> str:
    try:
        return importlib.metadata.version("classifier-gateway")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that is not installed
        return "(not installed)"


def _help_when_incomplete(parser: argparse.ArgumentParser) -> None:
    """`classifier-gateway` alone, or a command group without its action (`jobs`), prints that
    parser's help instead of argparse's "the following arguments are required" error: someone who
    types it is asking what there is. A command that runs on its own and also has actions
    (`factory`, and `factory migrate`) keeps its own handler."""
    if parser.get_default("handler") is None:
        parser.set_defaults(handler=_printing_help(parser))
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            action.required = False
            for child in action.choices.values():
                if any(isinstance(a, argparse._SubParsersAction) for a in child._actions):
                    _help_when_incomplete(child)


def _printing_help(parser: argparse.ArgumentParser) -> Handler:
    def show(args: argparse.Namespace) -> int:
        parser.print_help()
        return 0

    return show


#: The exit status of a Unix tool killed by SIGPIPE (128 + 13), which is what a reader that stops
#: early (`| head`) leaves the writer with.
EXIT_BROKEN_PIPE = 141


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        handler: Handler = args.handler
        try:
            return handler(args)
        except UserError as exc:
            print(f"classifier-gateway: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130
        finally:
            sys.stdout.flush()  # inside the try: a closed pipe shows here, not at exit
    except BrokenPipeError:
        _quiet_after_broken_pipe()
        return EXIT_BROKEN_PIPE


def _quiet_after_broken_pipe() -> None:
    """The reader of our output has gone (`classifier-gateway ... | head`): stop quietly, as Unix
    tools do. Python would otherwise report the error again when it flushes the streams at exit;
    pointing them at /dev/null leaves nothing to flush into the closed pipe."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            os.dup2(devnull, stream.fileno())
    os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
