"""The task registry: which logical task maps to which model on which upstream.

The tasks file is the domain configuration that operators change at run time (a ConfigMap in
Kubernetes), so it is validated in full before it replaces anything: a bad new file is rejected with a
message naming the task and the field, and the last good registry stays in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit, urlunsplit

import watchfiles
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from service.gateway import protocols
from service.gateway.protocols import Route, UpstreamProtocol

log = logging.getLogger("service.gateway.registry")
# watchfiles logs every change it reports at INFO; the reload that may follow is what matters.
logging.getLogger("watchfiles.main").setLevel(logging.WARNING)

TaskKind = Literal["text", "chat"]


class UpstreamSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    base_url: str
    api_key_env: str | None = Field(
        default=None, description="Name of the environment variable that holds the upstream's key."
    )
    proxy: str | None = Field(
        default=None, description="HTTP(S) proxy to reach the upstream through, e.g. an egress "
        "proxy in front of api.mistral.ai: http://[user:password@]host:port.")
    protocol: str = Field(
        default="mistral", description="The server's classification API: "
        + " | ".join(protocols.NAMES) + ".")
    max_batch_size: int | None = Field(
        default=None, ge=1, description="Most inputs per upstream call; larger batches are split. "
        "Default: what the server says (TEI's /info), else the gateway's batch size.")

    @field_validator("protocol")
    @classmethod
    def _known_protocol(cls, value: str) -> str:
        if value not in protocols.PROTOCOLS:
            raise ValueError(f"unknown protocol {value!r}; expected one of "
                             f"{', '.join(protocols.NAMES)}")
        return value

    @property
    def wire(self) -> UpstreamProtocol:
        return protocols.get(self.protocol)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("proxy")
    @classmethod
    def _proxy_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https:// (e.g. http://proxy.internal:3128)")
        return value

    @property
    def proxy_shown(self) -> str | None:
        """The proxy URL without its credentials, for /tasks and logs."""
        if self.proxy is None:
            return None
        parts = urlsplit(self.proxy)
        if parts.username is None and parts.password is None:
            return self.proxy
        host = parts.netloc.rpartition("@")[2]
        return urlunsplit(parts._replace(netloc=f"***@{host}"))

    def secrets(self) -> list[str]:
        """What must never appear in a message: the key, and the proxy's password."""
        found = [self.api_key() or ""]
        if self.proxy is not None:
            parts = urlsplit(self.proxy)
            found += [parts.password or "", unquote(parts.password or "")]
        return [secret for secret in found if secret]

    def api_key(self) -> str | None:
        """Read at call time, so that a rotated key in the environment needs no reload."""
        if not self.api_key_env:
            return None
        return os.environ.get(self.api_key_env) or None


@dataclass(frozen=True)
class Role:
    """Marks a field of `TaskSpec` that names models besides the task's own, and says what they
    are for. Everything that lists a task's models (its metric labels, `GET /tasks`, `models
    list`, the parser's checks, the edits of `service.gateway.task_edits`) reads these marks
    through `role_fields()`, so that a new role is one annotated field here."""

    #: Whether items go to it (a fallback, canary or shadow), or it is only kept (`previous`).
    served: bool = True
    #: A candidate on live traffic, which `tasks promote` can make the task's model.
    rollout: bool = False
    #: The share (`weight`, `sample`) an entry added by an edit gets when none is given.
    share_default: float | None = None
    #: How one entry is named beside its task ("news (fallback)"); default: the field's name.
    label: str | None = None


@dataclass(frozen=True)
class RoleField:
    """A field of `TaskSpec` marked with a `Role`, with the model class of its entries."""

    name: str
    spec: type[BaseModel]
    many: bool
    role: Role

    @property
    def label(self) -> str:
        return self.role.label or self.name

    @property
    def share(self) -> str | None:
        """The entry's share of the items (`weight`, `sample`): the number its model class
        requires; None for a role without one (fallbacks, `previous`)."""
        return next((key for key, field in self.spec.model_fields.items()
                     if field.is_required() and field.annotation is float), None)


@dataclass(frozen=True)
class ModelRole:
    """One model a task names: its role (`model`, `fallback`, `canary`, ...), the upstream it is
    asked on (a canary's or shadow's defaults to the task's), and whether items go to it."""

    role: str
    upstream: str
    model: str
    served: bool


class ModelRef(BaseModel):
    """A model on an upstream, as a fallback names it. `target` and `labels` as on a task, for
    single-target servers; default: the task's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    upstream: str
    model: str = Field(min_length=1)
    target: str | None = Field(default=None, min_length=1)
    labels: tuple[str, ...] | None = None


class _RolloutSpec(BaseModel):
    """What a canary and a shadow share: a second model of the task, on the task's upstream
    unless it names another, with `target` and `labels` as on a task. Each adds its share
    (`weight` or `sample`); one base so that a field every rollout role needs is added once."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1)
    upstream: str | None = Field(default=None, description="Default: the task's upstream.")
    target: str | None = Field(default=None, min_length=1)
    labels: tuple[str, ...] | None = None


class CanarySpec(_RolloutSpec):
    """A candidate model that answers a sticky share of the task's items (`weight`, 0-1)."""

    weight: float = Field(ge=0.0, le=1.0)


class ShadowSpec(_RolloutSpec):
    """A model that also sees a sampled share of the task's items (`sample`, 0-1), only to be
    compared with the task's model; its answers never reach the caller."""

    sample: float = Field(ge=0.0, le=1.0)


class CascadeStage(BaseModel):
    """One stage of a cascade: a model that answers the items it is sure of. Its certainty on the
    task's target is the top-two margin of a single-label target (top score minus the second), or
    the top score of a multi-label one; an item whose certainty is at least `min_margin` is
    answered here, the others go on to the next stage. The last stage has no `min_margin`: it
    answers whatever reaches it. `upstream`, `target` and `labels` as for a fallback; default:
    the task's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1)
    min_margin: float | None = Field(default=None, ge=0.0, le=1.0)
    upstream: str | None = Field(default=None, description="Default: the task's upstream.")
    target: str | None = Field(default=None, min_length=1)
    labels: tuple[str, ...] | None = None


class ReviewSpec(BaseModel):
    """Which answers go to the review queue: top-two margin under `max_margin`, plus a random
    control share `sample`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_margin: float = Field(default=0.2, ge=0.0, le=1.0)
    sample: float = Field(default=0.0, ge=0.0, le=1.0)


class LogSpec(BaseModel):
    """The sampled prediction log (predictions.py): a share `sample` of the task's answered items,
    with the input itself only when `inputs` (else a keyed hash of it), kept `retention_days`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sample: float = Field(default=0.01, ge=0.0, le=1.0)
    inputs: bool = False
    retention_days: float = Field(default=7.0, gt=0.0, le=3650.0)


class TaskSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    upstream: str
    model: str = Field(min_length=1)
    kind: TaskKind = "text"
    target: str | None = Field(
        default=None, min_length=1, description="Single-target servers (TEI, vLLM, Infinity, "
        "KServe v2): the key the scores appear under. Default: the task's name.")
    labels: tuple[str, ...] = Field(
        default=(), description="The model's classes in index order, for servers that answer "
        "with unnamed probabilities (vLLM; KServe v2 unless its model metadata gives them).")
    fallbacks: Annotated[tuple[ModelRef, ...], Role(label="fallback")] = Field(
        default=(), description="Tried in order when the upstream fails after its retries or "
        "its circuit is open; never for a 4xx caused by the request itself.")
    cascade: Annotated[tuple[CascadeStage, ...], Role(label="cascade stage")] = Field(
        default=(), description="Stages asked in turn, cheapest first; each answers the items "
        "it is sure of (`min_margin`) and hands the rest to the next in one batch. The last "
        "stage is the task's `model` (default: it), and the task's fallbacks apply to it.")
    canary: Annotated[CanarySpec | None, Role(rollout=True, share_default=0.1)] = None
    shadow: Annotated[ShadowSpec | None, Role(rollout=True, share_default=1.0)] = None
    review: ReviewSpec | None = None
    log: LogSpec | None = Field(
        default=None, description="The sampled prediction log: `{sample, inputs, "
        "retention_days}`; read back with GET /predictions/{task}.")
    feedback: bool = Field(
        default=False, description="Remember each response for GATEWAY_FEEDBACK_WINDOW_S so that "
        "POST /feedback may name it by `id` and item index.")
    previous: Annotated[ModelRef | None, Role(served=False)] = Field(
        default=None, description="The model before the last `tasks promote`, for `tasks "
        "rollback`; not served.")
    cache_ttl_s: int | None = Field(default=None, ge=0, description="0 disables caching.")
    cache_scope: Literal["tenant", "shared"] = Field(
        default="tenant", description="`tenant`: a tenant is answered only from its own cache "
        "entries; `shared`: one cache for all tenants (a hit then reveals that another tenant "
        "sent the same input: for public content only).")
    timeout_s: float | None = Field(default=None, gt=0)
    threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    multi_label_targets: tuple[str, ...] = Field(
        default=(), description="Targets that get a `labels` list (scores >= threshold)."
    )

    @model_validator(mode="before")
    @classmethod
    def _model_of_a_cascade(cls, data: Any) -> Any:
        """A cascade names its models in its stages: the task's `model` defaults to the last."""
        if isinstance(data, dict) and "model" not in data:
            stages = data.get("cascade")
            if isinstance(stages, list | tuple) and stages and isinstance(stages[-1], dict) \
                    and "model" in stages[-1]:
                return {**data, "model": stages[-1]["model"]}
        return data

    @field_validator("cascade")
    @classmethod
    def _cascade_shape(cls, value: tuple[CascadeStage, ...]) -> tuple[CascadeStage, ...]:
        if len(value) < 2:
            raise ValueError(f"a cascade needs at least two stages, not {len(value)}; for one "
                             "model, set the task's `model` instead")
        for index, stage in enumerate(value[:-1]):
            if stage.min_margin is None:
                raise ValueError(f"stage [{index}] ({stage.model!r}) needs `min_margin` (0-1): "
                                 "how sure it must be to answer an item")
        if value[-1].min_margin is not None:
            raise ValueError(f"the last stage [{len(value) - 1}] ({value[-1].model!r}) has "
                             "`min_margin`; it answers every item that reaches it, so remove it")
        return value

    @field_validator("labels")
    @classmethod
    def _distinct_labels(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError("labels must be distinct")
        return value

    def route(self) -> Route:
        """The primary model, as its upstream's protocol needs to know it."""
        return Route(self.kind, self.model, self.target or self.name, self.labels)

    def fallback_route(self, ref: ModelRef) -> Route:
        return Route(self.kind, ref.model, ref.target or self.target or self.name,
                     self.labels if ref.labels is None else ref.labels)

    def candidates(self) -> list[tuple[str, Route]]:
        """(upstream name, route) for the primary, then each fallback in order."""
        return [(self.upstream, self.route()),
                *((ref.upstream, self.fallback_route(ref)) for ref in self.fallbacks)]

    def other_route(self, spec: CanarySpec | ShadowSpec) -> tuple[str, Route]:
        return (spec.upstream or self.upstream,
                Route(self.kind, spec.model, spec.target or self.target or self.name,
                      self.labels if spec.labels is None else spec.labels))

    def stage_route(self, stage: CascadeStage) -> tuple[str, Route]:
        return (stage.upstream or self.upstream,
                Route(self.kind, stage.model, stage.target or self.target or self.name,
                      self.labels if stage.labels is None else stage.labels))

    def cascade_chains(self) -> list[tuple[list[tuple[str, Route]], float | None]]:
        """Per stage: the models to ask (a stage alone; the last one, then the task's
        fallbacks) and its `min_margin` (None for the last)."""
        last = len(self.cascade) - 1
        return [([self.stage_route(stage), *(self.candidates()[1:] if i == last else [])],
                 stage.min_margin) for i, stage in enumerate(self.cascade)]

    def canary_candidates(self) -> list[tuple[str, Route]]:
        """The canary, then the task's own chain: a failing canary falls back to the model it
        is compared with, so that trying a candidate never costs callers an error."""
        assert self.canary is not None
        return [self.other_route(self.canary), *self.candidates()]

    def shadow_route(self) -> tuple[str, Route]:
        assert self.shadow is not None
        return self.other_route(self.shadow)

    def entries(self, field: RoleField) -> tuple[Any, ...]:
        """The entries of one role field: none, one, or (fallbacks) several."""
        value = getattr(self, field.name)
        if field.many:
            return tuple(value)
        return () if value is None else (value,)

    def roles(self) -> list[ModelRole]:
        """Every model the task names, its own first, then the role fields in their order."""
        found = [ModelRole("model", self.upstream, self.model, served=True)]
        for field in role_fields():
            found += [ModelRole(field.label, entry.upstream or self.upstream, entry.model,
                                field.role.served) for entry in self.entries(field)]
        return found

    def models(self) -> list[str]:
        """Every model that items may go to: the bounded set of `model` metric label values."""
        return list(dict.fromkeys(role.model for role in self.roles() if role.served))


@functools.cache
def role_fields() -> tuple[RoleField, ...]:
    """The fields of `TaskSpec` marked with a `Role`, in their order in the class."""
    found: list[RoleField] = []
    for name, field in TaskSpec.model_fields.items():
        role = next((mark for mark in field.metadata if isinstance(mark, Role)), None)
        if role is None:
            continue
        many = typing.get_origin(field.annotation) is tuple
        spec = next(arg for arg in typing.get_args(field.annotation)
                    if isinstance(arg, type) and issubclass(arg, BaseModel))
        found.append(RoleField(name, spec, many, role))
    return tuple(found)


def role_field(name: str) -> RoleField:
    """The role field called `name` (`canary`); KeyError for a field that is not one."""
    for field in role_fields():
        if field.name == name:
            return field
    raise KeyError(name)


class RegistryError(ValueError):
    """The tasks file is unreadable or invalid; the message says where and how to fix it."""


@dataclass(frozen=True)
class Registry:
    upstreams: Mapping[str, UpstreamSpec]
    tasks: Mapping[str, TaskSpec]

    def task(self, name: str) -> TaskSpec | None:
        return self.tasks.get(name)

    def resolve_model(self, name_or_model: str, kind: TaskKind) -> TaskSpec | None:
        """A task by name, else the first task of that kind serving that model id (for /v1/...)."""
        task = self.tasks.get(name_or_model)
        if task is not None:
            return task
        for task in self.tasks.values():
            if task.model == name_or_model and task.kind == kind:
                return task
        return None


def _format_errors(prefix: str, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        parts.append(f"{prefix}.{loc}: {err['msg']}" if loc else f"{prefix}: {err['msg']}")
    return "; ".join(parts)


def parse_registry(data: Any, source: str = "tasks file") -> Registry:
    if not isinstance(data, dict):
        raise RegistryError(f"{source}: expected a mapping with 'upstreams' and 'tasks'")
    unknown = set(data) - {"upstreams", "tasks"}
    if unknown:
        raise RegistryError(f"{source}: unknown top-level keys {sorted(unknown)}; "
                            "expected only 'upstreams' and 'tasks'")
    raw_upstreams = data.get("upstreams") or {}
    raw_tasks = data.get("tasks") or {}
    if not isinstance(raw_upstreams, dict) or not isinstance(raw_tasks, dict):
        raise RegistryError(f"{source}: 'upstreams' and 'tasks' must be mappings of name -> settings")
    errors: list[str] = []
    upstreams: dict[str, UpstreamSpec] = {}
    for name, body in raw_upstreams.items():
        try:
            upstreams[str(name)] = UpstreamSpec.model_validate({**(body or {}), "name": str(name)})
        except ValidationError as exc:
            errors.append(_format_errors(f"upstreams.{name}", exc))
        except TypeError:
            errors.append(f"upstreams.{name}: expected a mapping of settings")
    tasks: dict[str, TaskSpec] = {}
    for name, body in raw_tasks.items():
        try:
            task = TaskSpec.model_validate({**(body or {}), "name": str(name)})
        except ValidationError as exc:
            errors.append(_format_errors(f"tasks.{name}", exc))
            continue
        except TypeError:
            errors.append(f"tasks.{name}: expected a mapping of settings")
            continue
        errors.extend(_check_task(task, upstreams, raw_upstreams, f"tasks.{name}"))
        tasks[task.name] = task
    if errors:
        raise RegistryError(f"{source}: " + "; ".join(errors))
    return Registry(upstreams=upstreams, tasks=tasks)


def _check_task(task: TaskSpec, upstreams: Mapping[str, UpstreamSpec], declared: Mapping[Any, Any],
                where: str) -> list[str]:
    """What the task's fields cannot say alone: its upstreams exist, their protocols can name
    the model's classes, no fallback repeats a model tried before it, and a canary or shadow
    is another model than the task's."""
    errors: list[str] = []
    seen: set[tuple[str, str]] = set()
    chain = [(f"{where}.upstream" if i == 0 else f"{where}.fallbacks[{i - 1}]", upstream, route)
             for i, (upstream, route) in enumerate(task.candidates())]
    for role in role_fields():
        if not role.role.rollout or not task.entries(role):
            continue
        name, (spec_,) = role.name, task.entries(role)
        upstream, route = task.other_route(spec_)
        if (upstream, route.model) == (task.upstream, task.model):
            errors.append(f"{where}.{name}.model: {route.model!r} on {upstream!r} is the task's "
                          f"own model; a {name} must be another model (or upstream)")
        errors.extend(_check_route(f"{where}.{name}", upstream, route, upstreams, declared))
    errors.extend(_check_cascade(task, upstreams, declared, where))
    for field, upstream, route in chain:
        spec = upstreams.get(upstream)
        if spec is None:
            if upstream not in declared:  # an invalid upstream already has its own error
                errors.append(f"{field}: unknown upstream {upstream!r}; defined upstreams: "
                              f"{sorted(map(str, declared)) or 'none'}")
            continue
        if (upstream, route.model) in seen:
            errors.append(f"{field}: model {route.model!r} on upstream {upstream!r} is already "
                          "tried before this one; a fallback must be another model or upstream")
        seen.add((upstream, route.model))
        wire = spec.wire
        if wire.labels_by_index and not route.labels and not wire.labels_from_server:
            errors.append(f"{field}: upstream {upstream!r} speaks {wire.name}, which answers with "
                          "unnamed probabilities; list the model's classes in index order "
                          "under the task's `labels` (its config's id2label)")
    return errors


def _check_cascade(task: TaskSpec, upstreams: Mapping[str, UpstreamSpec],
                   declared: Mapping[Any, Any], where: str) -> list[str]:
    """A cascade's stages are distinct models, its last is the task's model, and it does not
    share the task with a canary (which items would the canary's share be taken from?)."""
    if not task.cascade:
        return []
    errors: list[str] = []
    if task.canary is not None:
        errors.append(f"{where}.cascade: a task cannot have both a cascade and a canary (the "
                      "canary's share would bypass the cascade); try the canary on a copy of "
                      "the task, or remove one of them")
    seen: dict[tuple[str, str], int] = {}
    for index, stage in enumerate(task.cascade):
        upstream, route = task.stage_route(stage)
        field = f"{where}.cascade[{index}]"
        if (upstream, route.model) in seen:
            errors.append(f"{field}.model: {route.model!r} on {upstream!r} is already stage "
                          f"[{seen[upstream, route.model]}]; each stage must be another model "
                          "(or upstream)")
        seen.setdefault((upstream, route.model), index)
        errors.extend(_check_route(field, upstream, route, upstreams, declared))
    last_upstream, last = task.stage_route(task.cascade[-1])
    if (last_upstream, last.model) != (task.upstream, task.model):
        errors.append(f"{where}.model: {task.model!r} on {task.upstream!r} is not the cascade's "
                      f"last stage ({last.model!r} on {last_upstream!r}); leave `model` out, or "
                      "make it the last stage's")
    return errors


def _check_route(field: str, upstream: str, route: Route, upstreams: Mapping[str, UpstreamSpec],
                 declared: Mapping[Any, Any]) -> list[str]:
    spec = upstreams.get(upstream)
    if spec is None:
        if upstream in declared:
            return []
        return [f"{field}.upstream: unknown upstream {upstream!r}; defined upstreams: "
                f"{sorted(map(str, declared)) or 'none'}"]
    wire = spec.wire
    if wire.labels_by_index and not route.labels and not wire.labels_from_server:
        return [f"{field}: upstream {upstream!r} speaks {wire.name}, which answers with unnamed "
                "probabilities; list the model's classes in index order under `labels`"]
    return []


def load_registry(path: Path) -> Registry:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RegistryError(f"{path}: cannot read the tasks file ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise RegistryError(f"{path}: not UTF-8 text (byte {exc.start}); save the file as "
                            "UTF-8") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RegistryError(f"{path}: not valid YAML ({exc})") from exc
    return parse_registry(data if data is not None else {}, str(path))


class RegistryWatcher:
    """Holds the current registry and swaps it when the file changes or on `reload()` (SIGHUP).

    Two ways to notice a change, both ending in the same cheap `stat()` comparison:

    - a watch on the file's directory (inotify, through the `watchfiles` package that uvicorn also
      uses), so that a file written by `classifier-gateway finetune` is served within
      milliseconds. The directory, not the file: the CLI replaces the file by a rename, and a
      Kubernetes ConfigMap update swaps the `..data` symlink beside it, neither of which an inotify
      watch on the file itself would report;
    - polling every `poll_interval_s`, always on, for what raises no event: network and some
      overlay filesystems, a symlinked file edited in another directory, a directory that does not
      exist yet, or a platform where the watch cannot start.
    """

    def __init__(self, path: Path, poll_interval_s: float = 2.0,
                 on_reload: Callable[[str], None] | None = None, *, watch: bool = True) -> None:
        self.path = path
        #: The path as `GET /tasks` shows it: absolute, symlinks kept (a ConfigMap's path is the
        #: one operators know, not the kubelet's timestamped directory behind it).
        self.absolute_path = os.path.abspath(path)
        self.poll_interval_s = poll_interval_s
        self.watch = watch
        self._on_reload = on_reload
        self._signature: tuple[float, int, int] | None = None
        self.last_error: str | None = None
        self.current = Registry(upstreams={}, tasks={})
        self.loaded = False
        self._tasks: list[asyncio.Task[None]] = []
        self._stop_watch = asyncio.Event()
        self._directory_exists = asyncio.Event()
        #: Whether the directory watch is running (else only polling notices changes).
        self.watching = False

    def _file_signature(self) -> tuple[float, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime, st.st_size, st.st_ino)

    def _is_blank(self) -> bool:
        try:
            return not self.path.read_bytes().strip()
        except OSError:
            return False  # load_registry says what is wrong with it

    def reload(self) -> bool:
        """Load the file; keep the last good registry on error. Returns whether it was swapped."""
        self._signature = self._file_signature()
        if self._signature is None and not self.loaded:
            # Not an error at start-up: `classifier-gateway finetune` writes it later.
            self.last_error = (f"{self.path}: no tasks file yet; create it or register a model "
                               "with `classifier-gateway finetune` (it is picked up when it "
                               "appears)")
            log.warning("%s", self.last_error)
            if self._on_reload:
                self._on_reload("error")
            return False
        try:
            if self.loaded and self._is_blank():
                # A writer that truncates, then writes (`open(path, "w")`, most editors' plain
                # save, `echo > file`) shows an empty file for a moment, and the watch fires on
                # it: taken as "no tasks", it answered 404 for every task until the next write
                # (a CI run caught it between two writes). Removing every task is `tasks: {}`.
                raise RegistryError(f"{self.path}: the tasks file is empty (a write in "
                                    "progress?); to remove every task, write `tasks: {}`")
            registry = load_registry(self.path)
        except RegistryError as exc:
            self.last_error = str(exc)
            log.error("tasks file rejected, keeping the last good registry: %s", exc)
            if self._on_reload:
                self._on_reload("error")
            return False
        self.current = registry
        self.loaded = True
        self.last_error = None
        log.info("tasks file loaded: %d tasks (%s)", len(registry.tasks),
                 ", ".join(sorted(registry.tasks)) or "none")
        if self._on_reload:
            self._on_reload("success")
        return True

    async def start(self) -> None:
        """Start polling and the watch. Once this returns, the watch is set up: a change made
        after it raises an event (the watch task runs up to its first await, and watchfiles adds
        the inotify watch before that)."""
        loop = asyncio.get_running_loop()
        self._stop_watch = asyncio.Event()
        self._directory_exists = asyncio.Event()
        self._tasks = [loop.create_task(self._poll(), name="registry-poll")]
        if self.watch:
            self._tasks.append(loop.create_task(self._watch(), name="registry-watch"))
            await asyncio.sleep(0)

    async def stop(self) -> None:
        self._stop_watch.set()  # ends the watch's thread, which a cancel alone leaves running
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    def _check(self) -> None:
        """Reload when the file at the path is another file, or the same one changed."""
        if self._file_signature() == self._signature:
            return
        try:
            self.reload()
        except Exception as exc:  # the watcher must outlive any one bad file
            self.last_error = f"{self.path}: {exc!r}"
            log.exception("reloading the tasks file failed; keeping the last good one")

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            self._check()
            if not self._directory_exists.is_set() and self._directory().is_dir():
                self._directory_exists.set()

    def _directory(self) -> Path:
        return self.path.parent if str(self.path.parent) else Path(".")

    async def _watch(self) -> None:
        directory = self._directory()
        if not directory.is_dir():  # watchfiles would wait on it silently, never reporting
            log.warning("cannot watch %s for changes, it does not exist; the tasks file is "
                        "checked every %gs until it does", directory, self.poll_interval_s)
            await self._directory_exists.wait()  # set by polling
        try:
            # Every entry of the directory, unfiltered and not recursive: what changed does not
            # matter, only whether the path now stats differently. step=50: changes are reported
            # once 50 ms pass without another, so a burst (a ConfigMap swap) is one check.
            watch = watchfiles.awatch(directory, watch_filter=None, recursive=False, step=50,
                                      stop_event=self._stop_watch, rust_timeout=1000,
                                      ignore_permission_denied=True)
            self.watching = True
            log.debug("watching %s for changes to %s", directory, self.path.name)
            async for _changes in watch:
                self._check()
        except Exception as exc:  # no inotify, no such directory, too many watches, ...
            log.warning("cannot watch %s for changes (%s); the tasks file is checked every %gs "
                        "instead", directory, exc, self.poll_interval_s)
        finally:
            self.watching = False
