"""Safe edits of the gateway's tasks file.

A running gateway reloads the file whenever its stat() changes, so a half-written or invalid file
must never appear at the path: every edit is validated with the gateway's own parser, written to a
temporary file in the same directory, flushed to disk and renamed over the old one (atomic on
POSIX). An advisory lock next to the file keeps two CLI runs from losing each other's edits.
Edits go through ruamel.yaml's round trip, so an operator's comments, key order and quoting survive
them. `tasks`, `finetune`, `jobs wait` and `models delete` all use this module.
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
            with contextlib.suppress(RegistryError):
                before = parse_registry(data, str(path))
        change(data)
        try:
            registry = parse_registry(data, str(path))
        except RegistryError as exc:
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


def set_task(data: Data, name: str, settings: dict[str, Any]) -> None:
    """Update a task, keeping the settings the caller did not give (cache TTL, threshold, ...).
    An existing task is changed in place, so that the comments on its lines stay."""
    current = data["tasks"].get(name)
    if not isinstance(current, dict):
        current = data["tasks"][name] = {}
    for key, value in settings.items():
        if value == []:  # an empty list means "none": leave the gateway's default
            current.pop(key, None)
        elif value is not None:
            current[key] = value


def remove_task(data: Data, name: str) -> None:
    if name not in data["tasks"]:
        known = ", ".join(sorted(data["tasks"])) or "none"
        raise UserError(f"no task named {name!r} in the tasks file (tasks: {known})")
    del data["tasks"][name]


def task_rows(path: Path) -> list[dict[str, Any]]:
    """The tasks of the file as `tasks list` shows them, sorted by name."""
    registry = load(path)
    return [{"name": t.name, "kind": t.kind, "upstream": t.upstream,
             "base_url": registry.upstreams[t.upstream].base_url, "model": t.model}
            for _, t in sorted(registry.tasks.items())]


def role_upstream(data: Data, task_upstream: str, upstream: Upstream | str | None) -> str | None:
    """The upstream a canary or shadow names: none when it is the task's own (the default), and a
    well-known one (`local`, `mistral`) is added to the file when missing, as for a task."""
    name = upstream if isinstance(upstream, str) or upstream is None else upstream.name
    spec = upstream if isinstance(upstream, Upstream) else well_known_upstream(name or "")
    if spec is not None:
        ensure_upstream(data, spec)
    return name if name and name != task_upstream else None


def register_task(path: Path, name: str, upstream: Upstream | str,
                  merge: Callable[[Data, dict[str, Any]], dict[str, Any]] | None = None,
                  check: Check | None = None, **settings: Any) -> None:
    """Point a task at a model; adds a well-known upstream when the file lacks it. `merge` gets
    the file's mapping and the task's (with its upstream as it will be) under the file's lock and
    returns more settings (for those merged with what is there, such as a canary's weight);
    `check` as for `edit`."""

    def change(data: Data) -> None:
        current = data["tasks"].get(name) or {}
        upstream_name = upstream if isinstance(upstream, str) else upstream.name
        if not upstream_name:
            upstream_name = current.get("upstream") or "local"
        spec = upstream if isinstance(upstream, Upstream) else well_known_upstream(upstream_name)
        if spec is not None:
            ensure_upstream(data, spec)
        if merge is not None:
            settings.update(merge(data, {**current, "upstream": upstream_name}))
        if not current and not settings.get("model"):
            raise UserError(f"task {name!r} is new: give its --model")
        set_task(data, name, {"upstream": upstream_name, **settings})

    edit(path, change, check)


def set_canary(path: Path, name: str, upstream: Upstream | str, *, model: str,
               weight: float) -> None:
    """Make `model` the task's canary with `weight`; its upstream is named only when it is not
    the task's own."""

    def change(data: Data) -> None:
        task = data["tasks"].get(name)
        if not isinstance(task, dict):
            raise UserError(f"task {name!r} is not in {path}: a canary needs a task to join")
        canary: dict[str, Any] = {"model": model, "weight": weight}
        named = role_upstream(data, str(task.get("upstream")), upstream)
        if named:
            canary["upstream"] = named
        task["canary"] = canary

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
