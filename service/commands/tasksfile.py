"""Safe edits of the gateway's tasks file.

A running gateway reloads the file whenever its stat() changes, so a half-written or invalid file
must never appear at the path: every edit is validated with the gateway's own parser, written to a
temporary file in the same directory, flushed to disk and renamed over the old one (atomic on
POSIX). An advisory lock next to the file keeps two CLI runs from losing each other's edits.
Edits go through ruamel.yaml's round trip, so an operator's comments, key order and quoting survive
them. What an edit does to the document (a canary set, a promote) is `service.gateway.task_edits`,
beside the schema; this module reads, locks, validates and writes. `tasks`, `finetune`, `jobs
wait` and `models delete` all use it.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import io
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from service.commands.api import Upstream, well_known_upstream
from service.commands.errors import UserError
from service.gateway import task_edits
from service.gateway.registry import Registry, RegistryError, parse_registry

Data = dict[str, Any]


def _round_trip() -> YAML:
    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    return yaml


def default_tasks_path() -> Path:
    """The same default as `classifier-gateway serve`, so both find the same file."""
    return Path(os.environ.get("GATEWAY_TASKS_FILE", "tasks.yaml"))


def absolute_path(value: str) -> Path:
    """A path made absolute where it is given: messages and `jobs wait` lines then name the file
    wherever they are read or run (a relative `tasks.yaml` is another file in another directory)."""
    return Path(value).absolute()


def add_tasks_file_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", type=absolute_path, default=default_tasks_path().absolute(),
                        metavar="FILE",
                        help="the gateway's tasks file (GATEWAY_TASKS_FILE, default %(default)s)")


def read(path: Path) -> Data:
    """The file's raw mapping (empty when the file does not exist yet)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {"upstreams": {}, "tasks": {}}
    except OSError as exc:
        raise UserError(f"cannot read the tasks file {path}: {exc.strerror or exc}") from None
    try:
        data = _round_trip().load(text)
    except YAMLError as exc:
        raise UserError(f"{path} is not valid YAML ({_first_line(exc)}); fix it first") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping with 'upstreams' and 'tasks'; fix it first")
    data.setdefault("upstreams", {})
    data.setdefault("tasks", {})
    if data["upstreams"] is None:
        data["upstreams"] = {}
    if data["tasks"] is None:
        data["tasks"] = {}
    return data


def load(path: Path) -> Registry:
    """The validated registry, as the gateway would see it."""
    try:
        return parse_registry(read(path), str(path))
    except RegistryError as exc:
        raise UserError(str(exc)) from None


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    lock_path = path.with_name(f".{path.name}.lock")
    try:
        handle = lock_path.open("a")
    except OSError as exc:
        raise UserError(f"cannot lock the tasks file ({lock_path}: {exc.strerror or exc}); "
                        "is its directory writable?") from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


#: Called with the registry before an edit (None when the file was invalid) and after it, under
#: the file's lock and before the write: raising `UserError` leaves the file as it was.
Check = Callable[[Registry | None, Registry], None]


def edit(path: Path, change: Callable[[Data], None], check: Check | None = None) -> Registry:
    """Apply `change` to the file's mapping under the lock; validate; replace the file atomically.
    A change that makes the file invalid, or that `check` refuses, raises `UserError` and leaves
    the file as it was."""
    with _locked(path):
        data = read(path)
        before: Registry | None = None
        if check is not None:
            with contextlib.suppress(task_edits.EditError):
                before = task_edits.validate(data, str(path))
        try:
            change(data)
        except task_edits.EditError as exc:
            raise UserError(str(exc)) from None
        try:
            registry = task_edits.validate(data, str(path))
        except task_edits.EditError as exc:
            raise UserError(f"not saved, the result would be invalid: {exc}") from None
        if check is not None:
            check(before, registry)
        out = io.StringIO()
        _round_trip().dump(data, out)
        write_atomically(path, out.getvalue())
        return registry


def write_atomically(path: Path, text: str) -> None:
    directory = path.parent if str(path.parent) else Path(".")
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = 0o644
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise UserError(f"cannot write next to {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise


def ensure_upstream(data: Data, upstream: Upstream) -> None:
    """Add the upstream under its name unless the file already defines one by that name (which
    then wins: an operator may point `local` at another host)."""
    if upstream.name not in data["upstreams"]:
        data["upstreams"][upstream.name] = {"base_url": upstream.base_url,
                                            "api_key_env": upstream.key_env}


def task_rows(path: Path) -> list[dict[str, Any]]:
    """The tasks of the file as `tasks list` shows them, sorted by name."""
    registry = load(path)
    return [{"name": t.name, "kind": t.kind, "upstream": t.upstream,
             "base_url": registry.upstreams[t.upstream].base_url, "model": t.model}
            for _, t in sorted(registry.tasks.items())]


def role_upstream(data: Data, upstream: Upstream | str | None) -> str | None:
    """The name of the upstream a canary or shadow is given (None: none given); a well-known one
    (`local`, `mistral`) is added to the file when missing, as for a task."""
    name = upstream if isinstance(upstream, str) or upstream is None else upstream.name
    spec = upstream if isinstance(upstream, Upstream) else well_known_upstream(name or "")
    if spec is not None:
        ensure_upstream(data, spec)
    return name or None


def register_task(path: Path, name: str, upstream: Upstream | str,
                  then: Callable[[Data], None] | None = None,
                  check: Check | None = None, **settings: Any) -> None:
    """Point a task at a model; adds a well-known upstream when the file lacks it. `then` makes
    more edits to the file's mapping under the same lock, once the task has its settings (a
    canary, whose upstream is then compared with the task's new one); `check` as for `edit`."""

    def change(data: Data) -> None:
        current = data["tasks"].get(name) or {}
        upstream_name = upstream if isinstance(upstream, str) else upstream.name
        if not upstream_name:
            upstream_name = current.get("upstream") or "local"
        spec = upstream if isinstance(upstream, Upstream) else well_known_upstream(upstream_name)
        if spec is not None:
            ensure_upstream(data, spec)
        if not current and not settings.get("model"):
            raise UserError(f"task {name!r} is new: give its --model")
        task_edits.set_task(data, name, {"upstream": upstream_name, **settings})
        if then is not None:
            then(data)

    edit(path, change, check)


def set_canary(path: Path, name: str, upstream: Upstream | str, *, model: str,
               weight: float) -> None:
    """Make `model` the task's canary with `weight` (`finetune --canary`, `jobs wait`)."""

    def change(data: Data) -> None:
        if not isinstance(data["tasks"].get(name), dict):
            raise UserError(f"task {name!r} is not in {path}: a canary needs a task to join")
        task_edits.set_role(data, name, "canary", model=model, share=weight,
                            upstream=role_upstream(data, upstream))

    edit(path, change)


def model_users(path: Path) -> dict[str, list[str]]:
    """Which tasks of the file use each model, and how: `news` (its model), `news (canary)`,
    `news (shadow)`, `news (fallback)`, `news (previous)`. Empty when the file does not exist."""
    if not path.exists():
        return {}
    users: dict[str, list[str]] = {}
    for name, task in sorted(load(path).tasks.items()):
        for role in task.roles():
            user = name if role.role == "model" else f"{name} ({role.role})"
            users.setdefault(role.model, []).append(user)
    return users
