"""`classifier-gateway demo`: the factory and the gateway with two trained demo tasks, from a fresh
checkout (`make run`). The work is the helper `service.commands.demo_runner` (imported when the
command runs, so that `--help` stays quick); its `DemoError` is a `UserError`, so the command line
reports it like any other."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TypeAlias

Sub: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def register(sub: Sub) -> None:
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
    p.set_defaults(handler=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from service.commands.demo_runner import DemoOptions, run_demo

    options = DemoOptions(
        data_dir=args.data_dir or Path(os.environ.get("FACTORY_DATA_DIR", "factory-data")),
        port=args.port or int(os.environ.get("GATEWAY_PORT", "8000")),
        factory_port=args.factory_port or int(os.environ.get("FACTORY_PORT", "8100")),
        redis_url=args.redis_url, once=args.once,
    )
    return run_demo(options)
