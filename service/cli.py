"""`classifier-gateway`: one command line for the gateway, the factory and the workflow between them.

This module is only the entry point: it builds the parser from the command groups registered in
`service/commands/__init__.py` and turns what a command raises into an exit code. Exit codes: 0
success, 1 a problem the user can fix (`UserError`: one line on stderr), 2 wrong usage (argparse),
130 interrupted.
"""

from __future__ import annotations

import argparse
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


def main(argv: Sequence[str] | None = None) -> int:
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


if __name__ == "__main__":
    sys.exit(main())
