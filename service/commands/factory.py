"""`classifier-gateway factory`: run the local, Mistral-compatible classifier factory.

Settings come from `FACTORY_*` variables, and the flags below override the most used ones; uvicorn
and the factory's app are imported when the command runs, so that the other commands do not pay
for them at every start.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, TypeAlias

from service.commands.errors import UserError
from service.commands.servers import run_until_stopped, settings_epilog
from service.factory.settings import FactorySettings

Sub: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def register(sub: Sub) -> None:
    p = sub.add_parser("factory", help="run the local Mistral-compatible classifier factory "
                                       "(settings from FACTORY_* variables or flags)",
                       description="Run the factory: Mistral's fine-tuning and classification API "
                                   "on this machine, training classifiers from JSONL.",
                       epilog=settings_epilog(FactorySettings, "FACTORY_"),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", help="bind address (FACTORY_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (FACTORY_PORT, default 8100)")
    p.add_argument("--data-dir", type=Path,
                   help="files, jobs and models (FACTORY_DATA_DIR, default ./factory-data)")
    p.add_argument("--log-level", help="debug|info|warning|error (FACTORY_LOG_LEVEL)")
    p.set_defaults(handler=cmd_factory)
    actions = p.add_subparsers(dest="factory_action", metavar="{migrate,gc}")
    m = actions.add_parser(
        "migrate", help="copy a data directory's metadata and blobs into Postgres and/or S3",
        description="Copy a factory data directory (read only) into a shared set-up: its "
                    "metadata into the database --to names, its files and models into the "
                    "store --storage names. Rows already there are kept, so it can be run again. "
                    "S3 credentials and endpoint come from the AWS_* variables.")
    m.add_argument("--data-dir", type=Path, required=True, help="the data directory to copy")
    m.add_argument("--to", help="the target database (postgresql://user:password@host/db)")
    m.add_argument("--storage", help="the target object store (s3://bucket/prefix)")
    m.set_defaults(handler=cmd_migrate)
    g = actions.add_parser(
        "gc", help="remove orphaned blobs: files and models no record names (a crash's leftovers)",
        description="Remove the blobs of the factory's store (FACTORY_STORAGE_URL, or the data "
                    "directory) that its database (FACTORY_DATABASE_URL) names nowhere and that "
                    "are older than --min-age; a factory also does this at every start. Safe "
                    "beside running replicas while --min-age exceeds any upload's duration.")
    g.add_argument("--data-dir", type=Path,
                   help="the data directory (FACTORY_DATA_DIR, default ./factory-data)")
    g.add_argument("--min-age", type=float, metavar="SECONDS",
                   help="only blobs last written longer ago than this (FACTORY_GC_MIN_AGE_S, "
                        "default 3600); 0 only when no factory is running")
    g.add_argument("--dry-run", action="store_true", help="list what would go, remove nothing")
    g.set_defaults(handler=cmd_gc)


def cmd_factory(args: argparse.Namespace) -> int:
    import uvicorn

    from service.factory.app import create_app

    overrides: dict[str, Any] = {
        key: value
        for key, value in {
            "host": args.host, "port": args.port, "data_dir": args.data_dir,
            "log_level": args.log_level,
        }.items()
        if value is not None
    }
    settings = FactorySettings(**overrides)
    check_stores(settings)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = uvicorn.Config(create_app(settings), host=settings.host, port=settings.port,
                            log_level=settings.log_level, loop="uvloop", http="httptools",
                            access_log=False)
    return run_until_stopped(uvicorn.Server(config))


def check_stores(settings: FactorySettings) -> None:
    """Open the database, the object store and the executor once before serving, so that a
    wrong FACTORY_DATABASE_URL, an unreachable FACTORY_STORAGE_URL or FACTORY_RAY_ADDRESS is one
    line naming the setting (exit 1), not a lifespan traceback from uvicorn."""
    from service.factory.blobs import StorageUnavailable, open_blobs
    from service.factory.executors.registry import ExecutorUnavailable, open_executor
    from service.factory.store import DatabaseUnavailable, Store

    data_dir = settings.resolved_data_dir
    database = settings.database_url.get_secret_value() if settings.database_url else None
    try:
        blobs = open_blobs(settings.storage_url, data_dir)
        blobs.check()
        Store(data_dir, database, blobs).close()
        if settings.executor != "local":  # FACTORY_RAY_ADDRESS reachable (Ray connects once)
            open_executor(settings, blobs)
    except (DatabaseUnavailable, StorageUnavailable, ExecutorUnavailable) as exc:
        raise UserError(str(exc)) from None


def cmd_migrate(args: argparse.Namespace) -> int:
    from service.factory.blobs import StorageUnavailable
    from service.factory.migrate import migrate
    from service.factory.store import DatabaseUnavailable

    if not args.to and not args.storage:
        raise UserError("factory migrate: say where to, with --to postgresql://... and/or "
                        "--storage s3://...")
    try:
        report = migrate(args.data_dir.expanduser().resolve(), args.to, args.storage)
    except (DatabaseUnavailable, StorageUnavailable, FileNotFoundError) as exc:
        raise UserError(str(exc).replace("FACTORY_DATABASE_URL", "--to")
                        .replace("FACTORY_STORAGE_URL", "--storage")) from None
    for line in report.lines():
        print(line)
    return 1 if report.missing else 0


def cmd_gc(args: argparse.Namespace) -> int:
    from service.factory.blobs import StorageUnavailable, open_blobs
    from service.factory.gc import sweep
    from service.factory.store import DatabaseUnavailable, Store

    settings = FactorySettings(**({"data_dir": args.data_dir} if args.data_dir else {}))
    if args.min_age is not None and args.min_age < 0:
        raise UserError(f"--min-age must be 0 or more seconds, not {args.min_age:g}")
    data_dir = settings.resolved_data_dir
    database = settings.database_url.get_secret_value() if settings.database_url else None
    try:
        blobs = open_blobs(settings.storage_url, data_dir)
        blobs.check()
        store = Store(data_dir, database, blobs)
    except (DatabaseUnavailable, StorageUnavailable) as exc:
        raise UserError(str(exc)) from None
    try:
        report = sweep(store, min_age_s=settings.gc_min_age_s if args.min_age is None
                       else args.min_age, dry_run=args.dry_run)
    finally:
        store.close()
    for line in report.lines():
        print(("would remove " + line.removeprefix("removed ")) if args.dry_run
              and line.startswith("removed ") else line)
    return 0
