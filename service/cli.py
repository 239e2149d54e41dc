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


def _cmd_factory(args: argparse.Namespace) -> int:
    import uvicorn

    from service.factory.app import create_app as create_factory
    from service.factory.settings import FactorySettings

    overrides: dict[str, Any] = {
        key: value
        for key, value in {
            "host": args.host, "port": args.port, "data_dir": args.data_dir,
            "log_level": args.log_level,
        }.items()
        if value is not None
    }
    settings = FactorySettings(**overrides)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_factory(settings), host=settings.host, port=settings.port,
                log_level=settings.log_level, loop="uvloop", http="httptools", access_log=False)
    return 0


def _add_factory(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("factory", help="run the local Mistral-compatible classifier factory "
                                       "(settings from FACTORY_* variables or flags)")
    p.add_argument("--host", help="bind address (FACTORY_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (FACTORY_PORT, default 8100)")
    p.add_argument("--data-dir", type=Path,
                   help="files, jobs and models (FACTORY_DATA_DIR, default ./factory-data)")
    p.add_argument("--log-level", help="debug|info|warning|error (FACTORY_LOG_LEVEL)")
    p.set_defaults(handler=_cmd_factory)


def _cmd_demo(args: argparse.Namespace) -> int:
    import os

    from service.factory.demo.runner import DemoError, DemoOptions, run_demo

    options = DemoOptions(
        data_dir=args.data_dir or Path(os.environ.get("FACTORY_DATA_DIR", "factory-data")),
        port=args.port or int(os.environ.get("GATEWAY_PORT", "8000")),
        factory_port=args.factory_port or int(os.environ.get("FACTORY_PORT", "8100")),
        redis_url=args.redis_url, once=args.once,
    )
    try:
        return run_demo(options)
    except DemoError as exc:
        raise UserError(str(exc)) from None


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("demo", help="start the factory and the gateway, train two demo tasks, "
                                    "print ready curl lines")
    p.add_argument("--port", type=int, help="gateway port (GATEWAY_PORT, default 8000)")
    p.add_argument("--factory-port", type=int, help="factory port (FACTORY_PORT, default 8100)")
    p.add_argument("--data-dir", type=Path,
                   help="factory data, reused across runs (FACTORY_DATA_DIR, default "
                        "./factory-data)")
    p.add_argument("--redis-url", help="Redis for the gateway's cache (default GATEWAY_REDIS_URL "
                                       "or redis://127.0.0.1:6379 when it answers; empty for none)")
    p.add_argument("--once", action="store_true",
                   help="stop after the first classification answers (for scripts and CI)")
    p.set_defaults(handler=_cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="classifier-gateway",
        description="An inference gateway for fine-tuned text classifiers, and a local factory "
                    "that trains them.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve(sub)
    _add_factory(sub)
    _add_demo(sub)
    from service.commands import register as add_workflow_commands  # data, finetune, jobs, ...
    add_workflow_commands(sub)
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
    sys.modules.setdefault("service.cli", sys.modules[__name__])  # one UserError under `python -m`
    sys.exit(main())
