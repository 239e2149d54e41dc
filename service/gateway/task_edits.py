"""Edits of the tasks file, as pure functions on its parsed document.

The document is what ruamel.yaml's round trip reads (a mapping with `upstreams` and `tasks`, whose
comments, key order and quoting survive a change made in place); a plain dict works the same. The
keys these functions write and the roles they know come from the schema in
`service.gateway.registry`: a task's model roles are the fields marked with a `Role` there
(`role_fields()`), an entry's share is its model class's required number (`weight`, `sample`),
and what a promote moves is the fields of `ModelRef`. A new role is therefore one annotated field
of `TaskSpec`, and these edits, the parser's checks, `GET /tasks` and `models list` follow it.

Nothing here reads or writes a file, nor knows the command line: `service.commands.tasksfile`
applies these edits under its lock and writes the result atomically once `validate` (the gateway's
own parser) accepts it, and `classifier-gateway tasks` maps its arguments onto them. Every refusal
is an `EditError` whose message says what is wrong; `MissingRole` also says which role was
missing, so that a caller can add how to give one.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from service.gateway.registry import (
    ModelRef,
    ModelRole,
    Registry,
    RegistryError,
    RoleField,
    TaskSpec,
    parse_registry,
    role_field,
    role_fields,
)

#: The tasks file's parsed document; a task's entry, or an entry within it (a canary).
Document = MutableMapping[str, Any]
Entry = MutableMapping[str, Any]


class EditError(ValueError):
    """An edit that cannot be made; the message says why."""


class MissingRole(EditError):
    """The task has no entry in that role: no canary to change, nothing to promote, no previous
    model to roll back to. `present` lists the promotable roles it does have."""

    def __init__(self, message: str, role: str | None, present: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.role = role
        self.present = tuple(present)


@dataclass(frozen=True)
class Swap:
    """What `promote` or `rollback` did: which entry became the task's model, the model the task
    has now and the one it replaced (kept in `previous`), and what became of the canary or
    shadow that stayed (`shadow ft:v4 removed: ...`)."""

    source: str
    model: str
    replaced: str
    notes: tuple[str, ...]


def validate(doc: Document, source: str = "tasks file") -> Registry:
    """The registry the gateway would load from `doc`: its own parser, so that an edit is held
    to exactly the rules the gateway applies."""
    try:
        return parse_registry(doc, source)
    except RegistryError as exc:
        raise EditError(str(exc)) from None


def _tasks(doc: Document) -> Entry:
    tasks = doc.get("tasks")
    if tasks is None:
        tasks = doc["tasks"] = {}
    if not isinstance(tasks, MutableMapping):
        raise EditError("the tasks file's `tasks` is not a mapping of name -> settings")
    return tasks


def task_entry(doc: Document, name: str) -> Entry:
    """The task's mapping in the document, to edit in place."""
    task = _tasks(doc).get(name)
    if not isinstance(task, MutableMapping):
        known = ", ".join(sorted(map(str, _tasks(doc)))) or "none"
        raise EditError(f"no task named {name!r} in the tasks file (tasks: {known})")
    return task


def task_spec(doc: Document, name: str) -> TaskSpec:
    """The task as the gateway reads it (defaults filled in, a canary's upstream resolved)."""
    try:
        return TaskSpec.model_validate({**task_entry(doc, name), "name": name})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(map(str, (name, *first["loc"])))
        raise EditError(f"tasks.{where}: {first['msg']}") from None


def roles(doc: Document, name: str) -> list[ModelRole]:
    """Every model the task names, in order: its own, its fallbacks, canary, shadow, previous."""
    return task_spec(doc, name).roles()


def _settings_class(key: str) -> type[BaseModel] | None:
    """The model class of a task setting that is an entry of its own (canary, review), else
    None; a KeyError for a key that is no setting of a task."""
    field = TaskSpec.model_fields[key]
    return next((arg for arg in typing.get_args(field.annotation)
                 if isinstance(arg, type) and issubclass(arg, BaseModel)), None)


def _check_keys(keys: Sequence[str], allowed: Mapping[str, Any], where: str) -> None:
    unknown = [key for key in keys if key not in allowed or key == "name"]
    if unknown:
        raise EditError(f"{where} has no setting {', '.join(map(repr, unknown))}; its settings: "
                        f"{', '.join(k for k in allowed if k != 'name')}")


def set_task(doc: Document, name: str, settings: Mapping[str, Any]) -> None:
    """Create the task or update it in place (so that the comments on its lines stay). A value
    of None keeps the setting as it is; `[]` removes it, leaving the gateway's default."""
    _check_keys(list(settings), TaskSpec.model_fields, "a task")
    tasks = _tasks(doc)
    task = tasks.get(name)
    if not isinstance(task, MutableMapping):
        task = tasks[name] = {}
    for key, value in settings.items():
        if value == []:
            task.pop(key, None)
        elif value is not None:
            task[key] = value


def remove_task(doc: Document, name: str) -> None:
    task_entry(doc, name)
    del _tasks(doc)[name]


def clear(doc: Document, name: str, key: str) -> None:
    """Remove one of the task's optional entries (`canary`, `shadow`, `review`)."""
    _check_keys([key], TaskSpec.model_fields, "a task")
    task_entry(doc, name).pop(key, None)


def update_entry(doc: Document, name: str, key: str, values: Mapping[str, Any]) -> None:
    """Merge `values` (None: keep) into the task's `key` entry (`review`), creating it; the keys
    are those of the entry's model class."""
    spec = _settings_class(key)
    if spec is None:
        raise EditError(f"a task's {key!r} is a single value, not an entry of settings")
    _check_keys(list(values), spec.model_fields, f"a task's {key}")
    task = task_entry(doc, name)
    entry = task.get(key)
    if not isinstance(entry, MutableMapping):
        entry = task[key] = {}
    for part, value in values.items():
        if value is not None:
            entry[part] = value


def set_stage_margin(doc: Document, name: str, stage: int, min_margin: float) -> None:
    """Set `min_margin` of the task's cascade stage `stage` (0: the first), in place; `validate`
    then holds it to the schema's rules (0-1, not on the last stage)."""
    stages = task_entry(doc, name).get("cascade")
    if not isinstance(stages, list) or not stages:
        raise EditError(f"task {name!r} has no cascade to calibrate")
    if not 0 <= stage < len(stages) - 1 or not isinstance(stages[stage], MutableMapping):
        raise EditError(f"task {name!r}: stage [{stage}] is not a stage before the last of its "
                        f"cascade ({len(stages)} stages)")
    stages[stage]["min_margin"] = min_margin


def rollout_roles() -> list[RoleField]:
    """The roles that try a candidate on live traffic (canary, shadow), in the schema's order:
    the first present one is what `promote` takes by default."""
    return [field for field in role_fields() if field.role.rollout]


def _rollout(role: str) -> RoleField:
    names = [field.name for field in rollout_roles()]
    if role not in names:
        raise EditError(f"{role!r} is not a rollout role; those are: {', '.join(names)}")
    return role_field(role)


def set_role(doc: Document, name: str, role: str, *, model: str | None = None,
             share: float | None = None, upstream: str | None = None) -> None:
    """Give the task a canary or shadow, or change the one it has. A new model starts a new entry
    (its share the role's default unless given); without a model, the entry the task has is
    changed in place. An upstream that is the task's own is left implicit, as the gateway
    defaults it, and one that is not is named."""
    field = _rollout(role)
    task = task_entry(doc, name)
    entry = task.get(role)
    if not isinstance(entry, MutableMapping):
        entry = None
    if model is not None and (entry is None or entry.get("model") != model):
        entry = task[role] = {"model": model}
    elif entry is None:
        raise MissingRole(f"task {name!r} has no {role} to change", role)
    assert field.share is not None
    if share is not None:
        entry[field.share] = share
    elif field.share not in entry and field.role.share_default is not None:
        entry[field.share] = field.role.share_default
    if upstream is not None:
        if upstream == task.get("upstream"):
            entry.pop("upstream", None)
        else:
            entry["upstream"] = upstream


def changed_roles(before: TaskSpec | None, after: TaskSpec) -> list[ModelRole]:
    """The served roles of `after` that `before` did not have (a new model, or one on another
    upstream): what an edit may ask the upstream about."""
    old = before.roles() if before is not None else []
    return [role for role in after.roles() if role.served and role not in old]


def repeated_rollout(task: TaskSpec) -> tuple[ModelRole, ModelRole] | None:
    """Two rollout roles that name the same model on the same upstream (a shadow that is the
    canary), first in the schema's order first; None when there are none. The gateway loads
    such a task, but the second only repeats the first."""
    names = {field.label for field in rollout_roles()}
    seen: dict[tuple[str, str], ModelRole] = {}
    for role in task.roles():
        if role.role not in names:
            continue
        first = seen.setdefault((role.upstream, role.model), role)
        if first is not role:
            return first, role
    return None


def _kept() -> RoleField:
    """The role that keeps the model a promote replaced (`previous`): the one not served."""
    (field,) = (field for field in role_fields() if not field.role.served and not field.many)
    return field


def promotable(doc: Document, name: str) -> list[str]:
    """The rollout roles the task has, in the order `promote` prefers them."""
    task = task_entry(doc, name)
    return [field.name for field in rollout_roles() if task.get(field.name)]


def promote(doc: Document, name: str, source: str | None = None) -> Swap:
    """Make the task's canary (by default, when it has one) or shadow its model; the model it
    replaces becomes `previous`, for `rollback`."""
    task = task_entry(doc, name)
    present = promotable(doc, name)
    if not present:
        wanted = " or ".join(field.name for field in rollout_roles())
        raise MissingRole(f"task {name!r} has no {wanted} model to promote", None)
    chosen = source or present[0]
    _rollout(chosen)
    if chosen not in present:
        raise MissingRole(f"task {name!r} has no {chosen} to promote; it has a {present[0]}",
                          chosen, present)
    entry = dict(task.pop(chosen))
    return _swap(task, chosen, entry)


def rollback(doc: Document, name: str) -> Swap:
    """Make the task's `previous` model its model again; the one it replaces becomes
    `previous`, so that a rollback can be undone."""
    task = task_entry(doc, name)
    kept = _kept()
    previous = task.get(kept.name)
    if not isinstance(previous, Mapping):
        raise MissingRole(f"task {name!r} has no {kept.name} model to roll back to", kept.name)
    return _swap(task, kept.name, dict(previous))


def _swap(task: Entry, source: str, new: Mapping[str, Any]) -> Swap:
    """Make `new` (an entry with the fields of `ModelRef`: model, upstream, target, labels) the
    task's model, and keep the replaced one in `previous` in that shape.

    A canary or shadow that stays keeps the upstream it had: one that named none had the
    task's, which it now names when the task moves to another upstream (else it would silently
    follow it). One that is now the task's own model is removed (the gateway refuses a canary or
    shadow of the task's model, and it has nothing left to try or compare)."""
    keys = list(ModelRef.model_fields)
    old = {key: task[key] for key in keys if key in task}
    for key in keys:
        if new.get(key) is not None:
            task[key] = new[key]
    notes: list[str] = []
    for field in rollout_roles():
        entry = task.get(field.name)
        if not isinstance(entry, MutableMapping):
            continue
        upstream = entry.get("upstream") or old["upstream"]
        if (upstream, entry.get("model")) == (task["upstream"], task["model"]):
            del task[field.name]
            notes.append(f"{field.name} {task['model']} removed: it is the task's model now")
        elif upstream == task["upstream"]:
            entry.pop("upstream", None)
        else:
            entry["upstream"] = upstream
    task[_kept().name] = old
    return Swap(source, str(task["model"]), str(old["model"]), tuple(notes))
