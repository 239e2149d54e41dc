"""`classifier-gateway`: one command line for the gateway, the factory and the workflow between them.

Exit codes: 0 success, 1 a user error (one-line reason on stderr), 2 wrong usage (argparse).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

Handler = Callable[[argparse.Namespace], int]


class UserError(Exception):
    """A problem the user can fix; printed as one line, exit code 1."""


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.gateway.app import create_app
    from service.gateway.server import GatewayServer
    from service.gateway.settings import Settings

    overrides: dict[str, Any] = {
        key: value
        for key, value in {
            "host": args.host, "port": args.port, "tasks_file": args.tasks,
            "redis_url": args.redis_url, "log_level": args.log_level,
        }.items()
        if value is not None
    }
    settings = Settings(**overrides)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port,
                            log_level=settings.log_level, loop="uvloop", http="httptools",
                            access_log=False,
                            timeout_graceful_shutdown=math.ceil(settings.drain_timeout_s))
    GatewayServer(config, app.state.lifecycle, settings.shutdown_delay_s).run()
    return 0


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="run the gateway (settings from GATEWAY_* variables or flags)")
    p.add_argument("--host", help="bind address (GATEWAY_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (GATEWAY_PORT, default 8000)")
    p.add_argument("--tasks", type=Path, help="tasks file (GATEWAY_TASKS_FILE, default tasks.yaml)")
    p.add_argument("--redis-url", help="Redis URL, empty for no cache (GATEWAY_REDIS_URL)")
    p.add_argument("--log-level", help="debug|info|warning|error (GATEWAY_LOG_LEVEL)")
    p.set_defaults(handler=_cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="classifier-gateway",
        description="An inference gateway for fine-tuned text classifiers, and a local factory "
                    "that trains them.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve(sub)
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
