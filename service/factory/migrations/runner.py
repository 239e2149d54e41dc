"""The factory's schema migrations (Alembic), run by the store itself at every start.

There is no `alembic.ini` and no `env.py`: `upgrade(connection)` drives Alembic's environment
directly, on the store's own connection, so that `make run`, the tests and every replica migrate
the same way with nothing to configure. A database written by the first factory (raw `sqlite3`,
the tables of revision 0001 but no `alembic_version`) is stamped 0001 first, then upgraded: an
existing data directory keeps working as it is. On Postgres a transaction-scoped advisory lock
makes replicas that start together migrate one after the other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

#: Any constant: the advisory lock that serialises replicas migrating one Postgres database.
_LOCK_KEY = 0x46414354  # "FACT"


def _config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent))
    return config


def script() -> ScriptDirectory:
    return ScriptDirectory.from_config(_config())


def head() -> str:
    revision = script().get_current_head()
    assert revision is not None
    return revision


def current(connection: sa.Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def upgrade(connection: sa.Connection) -> str:
    """Bring the database behind `connection` (inside its transaction) to the head revision;
    returns it."""
    if connection.dialect.name == "postgresql":
        connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
    scripts = script()
    if current(connection) is None and sa.inspect(connection).has_table("jobs"):
        _run(connection, scripts, lambda rev, _ctx: scripts._stamp_revs("0001", rev))
    _run(connection, scripts, lambda rev, _ctx: scripts._upgrade_revs("head", rev))
    return head()


def _run(connection: sa.Connection, scripts: ScriptDirectory, fn: Any) -> None:
    with EnvironmentContext(_config(), scripts, fn=fn) as env:
        env.configure(connection=connection)
        with env.begin_transaction():
            env.run_migrations()
