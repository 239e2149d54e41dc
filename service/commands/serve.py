"""`classifier-gateway serve`: run the gateway.

Settings come from `GATEWAY_*` variables, and the flags below override the most used ones; the
server and the gateway's app are imported when the command runs, so that the other commands do not
pay for uvicorn and the gateway at every start.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, TypeAlias

from service.commands.servers import run_until_stopped, settings_epilog
from service.gateway.settings import Settings

Sub: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def register(sub: Sub) -> None:
    p = sub.add_parser("serve", help="run the gateway (settings from GATEWAY_* variables or flags)",
                       description="Run the gateway. It serves the tasks of its tasks file and "
                                   "reloads the file when it changes.",
                       epilog=settings_epilog(Settings, "GATEWAY_"),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", help="bind address (GATEWAY_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (GATEWAY_PORT, default 8000)")
    p.add_argument("--tasks", type=Path, help="tasks file (GATEWAY_TASKS_FILE, default tasks.yaml)")
    p.add_argument("--redis-url", help="Redis URL, empty for no cache (GATEWAY_REDIS_URL)")
    p.add_argument("--log-level", help="debug|info|warning|error (GATEWAY_LOG_LEVEL)")
    p.set_defaults(handler=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from service.gateway.app import create_app
    from service.gateway.server import GatewayServer

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
    return run_until_stopped(GatewayServer.for_app(app, settings, app.state.lifecycle))
