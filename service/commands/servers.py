"""What `serve` and `factory` share: their full settings in `--help`, and how they stop.

Their `--help` lists every environment variable of the process with its default (the flags cover
only the most used), generated from the settings class so that it cannot fall behind, and points to
the page that says what each one does.

How they stop, one convention: a server told to stop (Ctrl-C, SIGTERM) that shut down cleanly exits 0, as a
supervisor (Kubernetes, compose, systemd) expects of a normal stop. uvicorn re-raises the signal
it stopped on once it is done (so that an embedding program sees it): SIGINT then surfaces as
KeyboardInterrupt, which the command line would turn into 130, and SIGTERM meets Python's default
handling, which kills the process (143). Both are taken here instead.
"""

from __future__ import annotations

import signal
from typing import Any, Protocol

from pydantic import SecretStr
from pydantic_settings import BaseSettings

#: Where each setting is explained: the docs site's Configuration page, from this file in the repo.
SETTINGS_DOCS = "docs/configuration.md#settings"


class _Runnable(Protocol):
    def run(self) -> None: ...


class _StopRequested(Exception):
    """SIGTERM, re-raised by uvicorn after its clean shutdown."""


def _stop_requested(signum: int, frame: object) -> None:
    raise _StopRequested


def run_until_stopped(server: _Runnable) -> int:
    """Run the server until it is told to stop; 0 once it has stopped."""
    previous = signal.signal(signal.SIGTERM, _stop_requested)
    try:
        server.run()
    except (KeyboardInterrupt, _StopRequested):
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def settings_epilog(settings: type[BaseSettings], prefix: str) -> str:
    """Every variable of `settings` with its default, one per line, for `--help`."""
    lines = [f"settings: these environment variables (flags above override the first ones); what "
             f"each does: {SETTINGS_DOCS} in the repository, or the docs site's Configuration page",
             ""]
    for name, field in settings.model_fields.items():
        lines.append(f"  {prefix}{name.upper()}={_shown(field.default)}")
    return "\n".join(lines)


def _shown(value: Any) -> str:
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)
