"""`FACTORY_EXECUTOR=local` (the default): each training in a child process of this replica.

The child (`python -m service.factory.trainer spec.json`) gets SIGKILL when the replica dies
(PR_SET_PDEATHSIG), so a run never outlives its supervisor: `follow` has nothing to follow, and
the replica that takes the lapsed lease fails the job with that reason. A cancel is a SIGKILL:
effective at once, nothing to clean up (the model directory is published only once whole).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import orjson

import service
from service.factory.blobs import Blobs
from service.factory.executors.base import Executor, Message, TrainingRun, localised
from service.factory.models.base import TrainingSpec
from service.factory.trainer import PARENT_ENV

# The directory holding the `service` package: the trainer child imports it from there even when
# the factory runs from another working directory without the package installed.
_PACKAGE_ROOT = str(Path(service.__file__).resolve().parent.parent)


class LocalRun(TrainingRun):
    def __init__(self, process: asyncio.subprocess.Process, blobs: Blobs, key: str,
                 output_dir: Path, log_path: Path, replica: str) -> None:
        self.process = process
        self.blobs = blobs
        self.key = key
        self.output_dir = output_dir
        self.log_path = log_path
        self.ref = {"executor": "local", "replica": replica}
        self._count = 0

    @property
    def cursor(self) -> int:
        return self._count

    async def messages(self) -> AsyncIterator[Message]:
        assert self.process.stdout is not None
        result: Message | None = None
        async for raw in self.process.stdout:
            message: Message = orjson.loads(raw)
            self._count += 1
            if message["type"] == "result":
                result = message  # handed on once the model is published
                continue
            yield message
        code = await self.process.wait()
        if code != 0 or result is None:
            tail = self.log_path.read_text(errors="replace").strip().splitlines()
            yield {"type": "failed", "reason": tail[-1] if tail else exit_reason(code)}
            return
        # The model's files, whole, before the result that lets the manager record it.
        await asyncio.to_thread(self.blobs.publish_dir, self.key, self.output_dir)
        yield result

    def _kill(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()

    async def cancel(self) -> None:
        self._kill()

    async def abandon(self) -> None:
        self._kill()  # a child process cannot outlive its supervisor


class LocalExecutor(Executor):
    name = "local"

    def __init__(self, blobs: Blobs, replica: str) -> None:
        self.blobs = blobs
        self.replica = replica

    def device_problem(self, device: str) -> str | None:
        """A CUDA device needs PyTorch with CUDA on this replica's machine (the child trains
        here). Importing torch costs a second or two, once, and only when a job asks for CUDA."""
        if not device.startswith("cuda"):
            return None
        if importlib.util.find_spec("torch") is None:
            return (f"device {device!r}: PyTorch is not installed on this factory, so it cannot "
                    "train on a GPU; leave device out or set it to \"cpu\"")
        import torch

        if not torch.cuda.is_available():
            return (f"device {device!r}: this factory has no CUDA GPU (torch.cuda.is_available() "
                    "is false); set device to \"cpu\", leave it out, or send the job to a "
                    "factory with a GPU (or FACTORY_EXECUTOR=ray on a cluster with GPU workers)")
        return None

    async def submit(self, job_id: str, spec: TrainingSpec, job_dir: Path) -> TrainingRun:
        local = await asyncio.to_thread(localised, spec, self.blobs)
        spec_path = job_dir / "spec.json"
        spec_path.write_bytes(orjson.dumps(local.to_json()))
        child_env = dict(os.environ)
        child_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_PACKAGE_ROOT, child_env.get("PYTHONPATH")) if p)
        child_env[PARENT_ENV] = str(os.getpid())
        log_path = job_dir / "trainer.log"
        with log_path.open("wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "service.factory.trainer", str(spec_path),
                stdout=asyncio.subprocess.PIPE, stderr=stderr, env=child_env)
        return LocalRun(process, self.blobs, spec.output_dir, Path(local.output_dir), log_path,
                        self.replica)


def exit_reason(code: int) -> str:
    """Why a trainer that printed nothing died: a signal is almost always the kernel's OOM killer
    (SIGKILL) or an operator."""
    if code == -9:
        return ("the training process was killed (SIGKILL), most likely out of memory: train on "
                "fewer or shorter examples (a smaller seq_len), or give the factory more memory")
    if code < 0:
        return f"the training process was stopped by signal {-code}; create the job again"
    return f"the training process exited with code {code} without saying why; see trainer.log"
