"""`FACTORY_EXECUTOR` names the executor: `local` (default) or `ray`. A new kind registers a
builder here; `ray` is imported only when chosen, since the `ray` package is in the `cluster`
extra."""

from __future__ import annotations

from collections.abc import Callable

from service.factory.blobs import Blobs
from service.factory.executors.base import Executor
from service.factory.executors.local import LocalExecutor
from service.factory.settings import FactorySettings

Builder = Callable[[FactorySettings, Blobs], Executor]


class ExecutorUnavailable(Exception):
    """The executor the settings name cannot be used; the message names the setting."""


def _local(settings: FactorySettings, blobs: Blobs) -> Executor:
    return LocalExecutor(blobs, settings.replica)


def _ray(settings: FactorySettings, blobs: Blobs) -> Executor:
    if not settings.ray_address:
        raise ExecutorUnavailable("FACTORY_EXECUTOR=ray needs FACTORY_RAY_ADDRESS: the Ray "
                                  "cluster's address (ray://head:10001, or host:6379)")
    try:
        from service.factory.executors.ray import RayExecutor
    except ImportError as exc:
        raise ExecutorUnavailable(
            f"FACTORY_EXECUTOR=ray needs the `ray` package ({exc}): pip install "
            "'classifier-gateway[cluster]'") from None
    return RayExecutor(settings, blobs)


EXECUTORS: dict[str, Builder] = {"local": _local, "ray": _ray}


def open_executor(settings: FactorySettings, blobs: Blobs) -> Executor:
    builder = EXECUTORS.get(settings.executor)
    if builder is None:
        raise ExecutorUnavailable(f"FACTORY_EXECUTOR={settings.executor!r}: use one of "
                                  f"{', '.join(sorted(EXECUTORS))}")
    return builder(settings, blobs)
