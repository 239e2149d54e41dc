"""`FACTORY_EXECUTOR=ray`: each training as a detached Ray actor on an existing cluster
(`FACTORY_RAY_ADDRESS`, the `cluster` extra).

Why an actor, and a detached one: a Ray task belongs to the driver that submitted it and dies
with it, but a replica that supervises a run may die (or roll over) mid-training; a detached,
named actor (`train-<job id>`, namespace `classifier-factory`) outlives it, and the replica that
takes the job's lease finds it by name and follows it to its end. The actor is threaded
(`max_concurrency`): the training runs in one thread while `poll` answers from another, so the
supervisor reads the trainer's messages (checkpoints, events, progress) every half second, from
its cursor on. The actor reads the training files from the store itself and publishes the model
to it (the manifest last) before it says `result`; the supervisor records the model and then
kills the actor, which frees its CPUs or GPU. A cancel from any replica kills the actor
(`ray.kill`, at once); its supervisor sees it gone and records CANCELLED.

Resources: `FACTORY_RAY_NUM_CPUS` CPUs (1), and one GPU when the job trains on `cuda` (its own
`device`, else the factory's FACTORY_DEVICE), so Ray places it on a GPU worker; otherwise no GPU,
and Ray's CUDA_VISIBLE_DEVICES hides any from the model, which then trains on CPU. A cuda job on
a cluster with no GPU at all would wait for one forever (Ray keeps an actor it cannot place
pending): `device_problem` refuses it instead, at creation (422) and again before the actor is
made (a FAILED job), from `ray.cluster_resources()`. An autoscaling cluster whose GPU workers
are all scaled down reads as having none, yet one comes when an actor asks: there
FACTORY_RAY_GPU_AUTOSCALING=true skips the check (the cluster overlay sets it).

Ray workers import `service` from their own environment: the training image (see
docs/deployment.md), with the store's credentials in their own environment (the AWS_* variables),
never passed through Ray.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import tempfile
import threading
import warnings
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayActorError, RayError

from service.factory.blobs import Blobs, open_blobs
from service.factory.executors.base import Executor, Message, TrainingRun, localised
from service.factory.models.base import TrainingSpec
from service.factory.settings import FactorySettings

log = logging.getLogger("service.factory.executors.ray")

NAMESPACE = "classifier-factory"
#: How often a supervisor asks the actor for new messages: a step of a small model is a few ms,
#: so progress is shown at most half a second late, at two small calls per second and run.
POLL_S = 0.5


class TrainerActor:
    """The training of one job, on a Ray worker (decorated as an actor below)."""

    def __init__(self, spec: dict[str, Any], storage_url: str) -> None:
        self._messages: list[Message] = []
        self._lock = threading.Lock()
        self._finished = False
        self._thread = threading.Thread(target=self._train, args=(spec, storage_url),
                                        daemon=True, name="factory-training")
        self._thread.start()

    def _emit(self, message: Message) -> None:
        if message.get("type") == "result":
            return  # said by _train itself, once the model is published
        with self._lock:
            self._messages.append(message)

    def _train(self, doc: dict[str, Any], storage_url: str) -> None:
        from service.factory import trainer

        outcome: Message
        try:
            scratch = Path(tempfile.mkdtemp(prefix="factory-train-"))
            blobs = open_blobs(storage_url, scratch)
            spec = TrainingSpec.from_json(doc)
            local = localised(spec, blobs)
            result = trainer.run(local, trainer.Control(self._emit))
            blobs.publish_dir(spec.output_dir, Path(local.output_dir))
            outcome = result
        except MemoryError:
            outcome = {"type": "failed", "reason": "training failed: out of memory on the Ray "
                       "worker; train on fewer or shorter examples, or give the workers more "
                       "memory"}
        except Exception as exc:
            outcome = {"type": "failed", "reason": f"training failed on Ray: "
                       f"{type(exc).__name__}: {exc}"}
        with self._lock:
            self._messages.append(outcome)
            self._finished = True

    def poll(self, cursor: int) -> tuple[list[Message], bool]:
        """The messages from `cursor` on, and whether the training is over."""
        with self._lock:
            return self._messages[cursor:], self._finished


_Actor: Any = ray.remote(TrainerActor)


def actor_name(job_id: str) -> str:
    return f"train-{job_id}"


class RayRun(TrainingRun):
    def __init__(self, actor: Any, name: str, cursor: int = 0) -> None:
        self.actor = actor
        self.ref = {"executor": "ray", "actor": name}
        self._cursor = cursor
        self._abandoned = False

    @property
    def cursor(self) -> int:
        return self._cursor

    async def messages(self) -> AsyncIterator[Message]:
        while not self._abandoned:
            try:
                batch, finished = await self.actor.poll.remote(self._cursor)
            except RayActorError as exc:
                yield {"type": "failed", "reason": "the Ray actor running this training died "
                       f"({' '.join(str(exc).split())[:300]}); see the Ray cluster's logs, and "
                       "create the job again"}
                return
            for message in batch:
                self._cursor += 1
                yield message
            if finished:
                return
            if not batch:
                await asyncio.sleep(POLL_S)

    async def cancel(self) -> None:
        await asyncio.to_thread(_kill, self.actor)

    async def abandon(self) -> None:
        self._abandoned = True  # the run goes on; the next supervisor follows it

    async def close(self) -> None:
        await asyncio.to_thread(_kill, self.actor)


def _has_grpc() -> bool:
    """Ray Client (ray://) needs grpcio: `ray[client]`, not plain `ray`. Without it, Ray's own
    error said the cluster could not be reached, which sent people to the network."""
    try:
        importlib.import_module("grpc")
    except ImportError:
        return False
    return True


def _kill(actor: Any) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except (RayError, ValueError) as exc:  # already gone
        log.debug("ray.kill: %s", exc)


class RayExecutor(Executor):
    name = "ray"

    def __init__(self, settings: FactorySettings, blobs: Blobs) -> None:
        from service.factory.executors.registry import ExecutorUnavailable

        self.settings = settings
        self.storage_url = blobs.url  # s3://..., or a directory the Ray workers share
        address = settings.ray_address or ""
        client = address.startswith("ray://")
        if client and not _has_grpc():
            raise ExecutorUnavailable(
                f"FACTORY_RAY_ADDRESS={address!r} is a Ray Client address, and Ray Client needs "
                f"grpcio, which is not installed: pip install 'ray[client]=={ray.__version__}' "
                "(or give the GCS address, host:6379, from a Ray node)")
        try:
            with warnings.catch_warnings():
                # Ray Client's timeout also warns on stderr: the one line below says it all.
                warnings.simplefilter("ignore")
                ray.init(address=address, namespace=NAMESPACE, ignore_reinit_error=True,
                         log_to_driver=False, logging_level=logging.WARNING)
        except Exception as exc:
            hint = (" (Ray Client: the head serves it on that port, `ray start --head` on "
                    "10001 when grpcio is installed; check that the port is reachable from "
                    "here)") if client else ""
            raise ExecutorUnavailable(
                f"cannot reach the Ray cluster FACTORY_RAY_ADDRESS={address!r}: "
                f"{' '.join(str(exc).split())[:300]}{hint}") from None

    def _resources(self, spec: TrainingSpec) -> dict[str, float]:
        gpu = (spec.device or "").startswith("cuda")
        return {"num_cpus": self.settings.ray_num_cpus, "num_gpus": 1 if gpu else 0}

    def device_problem(self, device: str) -> str | None:
        if not device.startswith("cuda") or self.settings.ray_gpu_autoscaling:
            return None
        gpus = float(ray.cluster_resources().get("GPU", 0))  # type: ignore[no-untyped-call]
        if gpus <= 0:
            return (f"device {device!r}: the Ray cluster has no GPU (ray.cluster_resources() "
                    "lists none), so the training would wait for one forever; set device to "
                    "\"cpu\", leave it out, or add a GPU worker to the cluster")
        return None

    async def submit(self, job_id: str, spec: TrainingSpec, job_dir: Path) -> TrainingRun:
        # Nothing secret goes to the actor (its arguments and runtime_env show in Ray's
        # dashboard): the job's experiment trackers run in the supervising replica.
        name = actor_name(job_id)

        def create() -> Any:
            # max_concurrency 4: a threaded actor, so `poll` answers while it trains; no
            # restart: a training that died is reported, not silently begun again.
            return _Actor.options(name=name, namespace=NAMESPACE, lifetime="detached",
                                  get_if_exists=True, max_concurrency=4, max_restarts=0,
                                  **self._resources(spec)) \
                .remote(spec.to_json(), self.storage_url)

        actor = await asyncio.to_thread(create)
        return RayRun(actor, name)

    async def follow(self, job_id: str, ref: Mapping[str, str],
                     cursor: int = 0) -> TrainingRun | None:
        actor = await asyncio.to_thread(_find, ref.get("actor", actor_name(job_id)))
        return None if actor is None else RayRun(actor, ref["actor"], cursor)

    async def stop(self, ref: Mapping[str, str]) -> None:
        actor = await asyncio.to_thread(_find, ref.get("actor", ""))
        if actor is not None:
            await asyncio.to_thread(_kill, actor)


def _find(name: str) -> Any:
    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return None
