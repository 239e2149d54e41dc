"""`classifier-gateway demo`: the whole product on one machine, from a fresh checkout.

It starts the factory and the gateway as two processes (they talk only HTTP, as in production),
trains two demo tasks from the datasets shipped in `service/factory/demo/` (a text `sentiment` task
and a chat `intent` task), registers them in a tasks file, checks that one classification answers
through the gateway, and prints ready `curl` lines. Trained models are reused across runs: the
factory keeps them in its data directory, and the demo finds the job that trained each dataset.
Redis is used when one answers (GATEWAY_REDIS_URL, else redis://127.0.0.1:6379), and the demo says
which; without it the gateway runs uncached.

It lives with the commands, not with the factory: it is the command line's work (it starts both
servers as a user would, and raises the command line's `UserError`), and the server side never
imports the command line. The datasets stay with the factory's demo data.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from service.commands.errors import UserError

DATASETS = Path(__file__).resolve().parents[1] / "factory" / "demo"
PACKAGE_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379"


class DemoError(UserError):
    """A problem the user can fix; the command line prints it as one line and exits 1, as it does
    for every other command's `UserError`."""


@dataclass(frozen=True)
class DemoTask:
    name: str
    kind: str
    dataset: str
    suffix: str
    example: dict[str, Any]


BASE_MODEL = "local-ngram"  # what every demo task is fine-tuned from

TASKS = (
    DemoTask("sentiment", "text", "sentiment.jsonl", "demo-sentiment",
             {"task": "sentiment", "input": "I love this product!"}),
    DemoTask("intent", "chat", "intent.jsonl", "demo-intent",
             {"task": "intent", "input": {"messages": [
                 {"role": "user", "content": "Hi, where is my order?"}]}}),
)


@dataclass
class DemoOptions:
    data_dir: Path
    port: int
    factory_port: int
    redis_url: str | None  # None: probe GATEWAY_REDIS_URL or the default
    host: str = "127.0.0.1"
    once: bool = False  # set up, answer one classification, stop (for tests and CI)


def _say(message: str) -> None:
    """Print for the person watching; after SIGHUP the terminal is gone, and a failed print must
    not keep the demo from stopping its servers."""
    with contextlib.suppress(OSError, ValueError):
        print(message, flush=True)


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _wait_http(url: str, process: subprocess.Popen[bytes], what: str,
               timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise DemoError(f"the {what} exited with code {process.returncode} during start-up; "
                            "its log is above")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise DemoError(f"the {what} did not answer {url} within {timeout_s:.0f}s")


def _redis(url: str | None) -> tuple[str, str]:
    """(url to use or "", what to tell the user). Asks with the gateway's own client for that URL
    (redis_clients.py), so the demo's "Redis answers" means the gateway's cache will reach it."""
    import redis

    from service.gateway import redis_clients
    from service.gateway.redis_url import parse_redis_url

    candidate = url if url is not None else os.environ.get("GATEWAY_REDIS_URL") or DEFAULT_REDIS_URL
    if not candidate:
        return "", "Redis: disabled (empty URL): the gateway runs without a result cache"
    try:
        asyncio.run(redis_clients.ping(parse_redis_url(candidate), 0.5))
    except (redis.RedisError, OSError, ValueError) as exc:
        return "", (f"Redis: none reachable at {_redacted(candidate)} ({type(exc).__name__}): "
                    "the gateway runs without a result cache (start redis-server or set "
                    "GATEWAY_REDIS_URL to use one)")
    return candidate, f"Redis: using {_redacted(candidate)} as the result cache"


def _redacted(url: str) -> str:
    """Never print a password from a Redis URL."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.split('@', 1)[1]}"


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent(parent: int) -> Callable[[], None]:
    """In the child, before it runs: ask Linux to send it SIGTERM when the demo dies, however it
    dies (SIGKILL and crashes included, which no handler of the demo sees). Elsewhere a no-op."""

    def arrange() -> None:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != parent:  # the demo died before the request took effect
                os.kill(os.getpid(), signal.SIGTERM)

    return arrange


def _spawn(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(PACKAGE_ROOT), full_env.get("PYTHONPATH")) if p)
    # A session of their own: Ctrl-C in the terminal (and SIGHUP when it closes) reaches only the
    # demo, which then stops each child once (a second SIGINT during uvicorn's shutdown prints
    # tracebacks). That makes the demo responsible for stopping them, on every way it ends.
    return subprocess.Popen([sys.executable, "-m", "service.cli", *args], env=full_env,
                            start_new_session=True, preexec_fn=_die_with_parent(os.getpid()))


#: The signals that end the demo (besides SIGINT, which Python raises as KeyboardInterrupt):
#: SIGTERM from a supervisor or `kill`, SIGHUP when its terminal closes.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _stopped_by_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP raise KeyboardInterrupt, as Ctrl-C does, from the demo's first line
    on: whatever it is doing then (starting a server, training), the unwinding stops the
    servers already started."""
    previous = {sig: signal.signal(sig, _interrupt) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop(process: subprocess.Popen[bytes] | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


def train_task(client: httpx.Client, task: DemoTask) -> str:
    """The fine-tuned model for `task`: the one an earlier run trained from the same data, or a
    new one (Mistral's example job, at Mistral's default learning rate)."""
    data = (DATASETS / task.dataset).read_bytes()
    r = client.post("/v1/files", files={"file": (task.dataset, data)},
                    data={"purpose": "fine-tune"})
    r.raise_for_status()
    file_id = r.json()["id"]  # the same name and content give the same file
    jobs = [job for job in client.get("/v1/fine_tuning/jobs", params={
        "suffix": task.suffix, "page_size": 1000}).json()["data"]
        if job["training_files"] == [file_id]]
    models = {m["id"] for m in client.get("/v1/models").json()["data"]}
    for job in jobs:
        if job["status"] == "SUCCESS" and job["fine_tuned_model"] in models:
            _say(f"  {task.name}: reusing {job['fine_tuned_model']}")
            return str(job["fine_tuned_model"])
    active = [job for job in jobs if job["status"] in ("QUEUED", "VALIDATING", "VALIDATED",
                                                        "RUNNING")]
    if active:  # an earlier run queued it and stopped before it finished
        job_id = active[0]["id"]
        if active[0]["status"] == "VALIDATED":
            client.post(f"/v1/fine_tuning/jobs/{job_id}/start")
    else:
        r = client.post("/v1/fine_tuning/jobs", json={
            "model": BASE_MODEL, "job_type": "classifier", "suffix": task.suffix,
            "training_files": [{"file_id": file_id, "weight": 1}], "auto_start": True,
            "hyperparameters": {"training_steps": 100, "learning_rate": 1e-4},
        })
        r.raise_for_status()
        job_id = r.json()["id"]
    started = time.monotonic()
    while True:
        job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        if job["status"] == "SUCCESS":
            _say(f"  {task.name}: trained {job['fine_tuned_model']} "
                 f"in {time.monotonic() - started:.1f}s")
            return str(job["fine_tuned_model"])
        if job["status"] in ("FAILED", "FAILED_VALIDATION", "CANCELLED"):
            raise DemoError(f"training the {task.name} demo task ended {job['status']}: "
                            f"{job.get('error')}")
        time.sleep(0.1)


def write_tasks_file(path: Path, factory_url: str, models: dict[str, str],
                     factory_key_env: str | None = None) -> None:
    """The gateway's tasks file: upstream `local` is the factory (with the name of the variable
    holding its key, when it has one; never the key itself)."""
    tasks = {task.name: {"upstream": "local", "model": models[task.name], "kind": task.kind,
                         "cache_ttl_s": 3600} for task in TASKS}
    local: dict[str, str] = {"base_url": factory_url}
    if factory_key_env:
        local["api_key_env"] = factory_key_env
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# Written by `classifier-gateway demo`; edit freely, the gateway reloads it.\n"
                    + yaml.safe_dump({"upstreams": {"local": local}, "tasks": tasks},
                                     sort_keys=False))


def _gateway_key() -> str | None:
    """One client key of the gateway, when GATEWAY_API_KEYS sets some (comma-separated, or a file
    with one per line), for the demo's own check; it is never printed."""
    raw = os.environ.get("GATEWAY_API_KEYS", "").strip()
    if not raw:
        return None
    path = Path(raw)
    if "," not in raw and path.is_file():
        keys = [k.strip() for k in path.read_text().splitlines()
                if k.strip() and not k.startswith("#")]
    else:
        keys = [k.strip() for k in raw.split(",") if k.strip()]
    return keys[0] if keys else None


def curl_lines(gateway_url: str, with_key: bool = False) -> list[str]:
    auth = ' -H "Authorization: Bearer $GATEWAY_API_KEY"' if with_key else ""
    lines = []
    for task in TASKS:
        route = "/classify" if task.kind == "text" else "/classify-chat"
        body = json.dumps(task.example)
        lines.append(f"curl -s {gateway_url}{route} -H 'Content-Type: application/json'{auth} "
                     f"-d '{body}'")
    return lines


@contextlib.contextmanager
def _processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """The demo's servers, stopped however the block ends; a second Ctrl-C (or SIGTERM, SIGHUP)
    while they stop is ignored, so that it cannot leave one of them running."""
    running: list[subprocess.Popen[bytes]] = []
    try:
        yield running
    except KeyboardInterrupt:
        if running:
            _say("Stopping ...")
        raise
    finally:
        previous = {sig: signal.signal(sig, signal.SIG_IGN)
                    for sig in (signal.SIGINT, *STOP_SIGNALS)}
        try:
            for process in reversed(running):
                _stop(process)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def run_demo(options: DemoOptions) -> int:
    """Set up, serve until told to stop; 0 when stopped while serving (Ctrl-C, SIGTERM, SIGHUP),
    KeyboardInterrupt (130) when stopped before it was ready. The servers stop either way."""
    with _stopped_by_signals():
        return _run_demo(options)


def _run_demo(options: DemoOptions) -> int:
    for port, what, flag in ((options.factory_port, "factory", "--factory-port"),
                             (options.port, "gateway", "--port")):
        if not _port_free(options.host, port):
            raise DemoError(f"port {port} for the {what} is in use: stop what holds it, or pick "
                            f"another with `classifier-gateway demo {flag} <port>`")
    data_dir = options.data_dir.resolve()
    factory_url = f"http://{options.host}:{options.factory_port}"
    gateway_url = f"http://{options.host}:{options.port}"
    redis_url, redis_note = _redis(options.redis_url)
    started = time.monotonic()
    with _processes() as running:
        _say(f"Starting the factory on {factory_url} (data in {data_dir}) ...")
        factory = _spawn(["factory", "--host", options.host, "--port", str(options.factory_port),
                          "--data-dir", str(data_dir), "--log-level", "warning"])
        running.append(factory)
        _wait_http(f"{factory_url}/healthz", factory, "factory")
        _say("Training the demo tasks (training_steps 100; reused when already trained) ...")
        factory_key = os.environ.get("FACTORY_API_KEY") or None
        headers = {"Authorization": f"Bearer {factory_key}"} if factory_key else {}
        with httpx.Client(base_url=factory_url, timeout=60, headers=headers) as client:
            models = {task.name: train_task(client, task) for task in TASKS}
        tasks_file = data_dir / "demo-tasks.yaml"
        write_tasks_file(tasks_file, factory_url, models,
                         "FACTORY_API_KEY" if factory_key else None)
        _say(f"Tasks file: {tasks_file}")
        _say(redis_note)
        gateway = _spawn(["serve", "--host", options.host, "--port", str(options.port),
                          "--tasks", str(tasks_file), "--redis-url", redis_url,
                          "--log-level", "warning"])
        running.append(gateway)
        _wait_http(f"{gateway_url}/readyz", gateway, "gateway")
        gateway_key = _gateway_key()
        r = httpx.post(f"{gateway_url}/classify", json=TASKS[0].example, timeout=10,
                       headers={"Authorization": f"Bearer {gateway_key}"} if gateway_key else {})
        if r.status_code != 200:
            raise DemoError(f"the gateway answered {r.status_code} to a demo classification: "
                            f"{r.text[:300]}")
        _say(f"Ready in {time.monotonic() - started:.1f}s. Gateway {gateway_url}, "
             f"factory {factory_url}.")
        _say(f"First answer: {r.text}")
        _say("Try:")
        if gateway_key:
            _say("  (GATEWAY_API_KEYS is set: export GATEWAY_API_KEY=<one of them> first, the "
                 "variable classifier-gateway classify reads too)")
        for line in curl_lines(gateway_url, with_key=bool(gateway_key)):
            _say(f"  {line}")
        if options.once:
            return 0
        try:
            # Inside the try: a Ctrl-C right after the prompt must still stop cleanly.
            _say("Press Ctrl-C to stop both.")
            while all(p.poll() is None for p in running):
                time.sleep(0.5)
        except KeyboardInterrupt:
            _say("Stopping ...")
            return 0
        dead = next(p for p in running if p.poll() is not None)
        what = "factory" if dead is factory else "gateway"
        raise DemoError(f"the {what} exited with code {dead.returncode}; its log is above")
