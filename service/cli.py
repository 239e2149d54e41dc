"""`classifier-gateway`: one command line for the gateway, the factory and the workflow between them.

This module is only the entry point: it builds the parser from the command groups registered in
`service/commands/__init__.py` and turns what a command raises into an exit code. Exit codes: 0
success, 1 a problem the user can fix (`UserError`: one line on stderr), 2 wrong usage (argparse),
130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
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
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register(sub)
    return parser


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
