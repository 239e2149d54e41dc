"""A Mistral-compatible classification upstream that misbehaves on demand.

Real peers are preferred everywhere in this project; this fake exists because a real upstream cannot be
told to answer 429, 500, slowly, with the wrong number of results, or to drop the connection at the
moment a test needs it. It serves `POST /v1/classifications` and `POST /v1/chat/classifications` in
Mistral's exact shape, validates request bodies with the shared wire models (422 with FastAPI's
`{"detail": [...]}` on a bad body), serves any model id, and records every request it receives.

Scores are a deterministic function of the input (`expected_scores`), so a test can check that each
result went back to the input it belongs to, in order.

Usage, either way:

    fake = FakeUpstream()
    with serve(fake.app) as server:            # tests.support.servers.serve: uvicorn in a thread
        ... server.url ...

    with running_fake_upstream() as fake:      # the same, with `fake.url` set
        fake.inject(Status(503), Status(429, retry_after=0.1))
        ... two failing answers, then normal ones ...
        assert len(fake.calls) == 3

Faults queue up: each incoming request pops one (if any), so `inject(Status(500), Status(500))` fails
exactly the next two requests. `Drop()` closes the TCP connection without any HTTP response; it needs
the app served directly by uvicorn (as `serve` and `running_fake_upstream` do), because it reaches the
connection's transport through uvicorn's `send` callable, which no ASGI interface exposes.

`python -m tests.support.fake_upstream --port 8199` runs it as a process (for benches and e2e tests);
`POST /_faults {"fault_rate": 0.3, "status": 500, "retry_after": null}` sets its random faults from
outside (`fault_rate` and `random_fault` in-process), and answers how many calls it has seen.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import hashlib
import json
import math
import random
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from pydantic import BaseModel, ValidationError

from service.wire import ChatClassificationRequest, ClassificationRequest

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DEFAULT_TARGETS: dict[str, list[str]] = {"sentiment": ["negative", "neutral", "positive"]}
ROUTES: dict[str, type[BaseModel]] = {
    "/v1/classifications": ClassificationRequest,
    "/v1/chat/classifications": ChatClassificationRequest,
}


# --------------------------------------------------------------------------------------------- faults
@dataclass(frozen=True)
class Status:
    """Answer with this status instead of results. `body=None` gives Mistral's error shape."""

    code: int
    retry_after: float | None = None
    body: dict[str, Any] | None = None


@dataclass(frozen=True)
class Slow:
    """Wait this long (on top of `delay_s`) before answering normally."""

    seconds: float


@dataclass(frozen=True)
class WrongCount:
    """Answer normally but with `len(inputs) + delta` results (never fewer than zero)."""

    delta: int = -1


@dataclass(frozen=True)
class Drop:
    """Close the connection without sending any HTTP response."""


@dataclass(frozen=True)
class Echo:
    """Answer `code` with a body that echoes the request's Authorization header after `pad` dots,
    as a debugging proxy in front of an upstream may: text/plain, or, with `json`, inside Mistral's
    `message`. `pad` places the key across whatever cut the gateway makes."""

    code: int
    pad: int = 0
    json: bool = False


Fault = Status | Slow | WrongCount | Drop | Echo


@dataclass
class Call:
    endpoint: str  # "classifications" | "chat/classifications"
    model: str
    inputs: list[Any]  # always a list, even if one string / conversation was sent
    authorization: str | None
    fault: Fault | None = field(default=None, compare=False)


# --------------------------------------------------------------------------------------------- scores
def canonical_json(item: Any) -> str:
    """Key order and whitespace never change the scores of an item."""
    return json.dumps(item, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def expected_scores(item: Any, targets: dict[str, list[str]] | None = None) -> dict[str, dict[str, float]]:
    """The scores the fake gives `item` (a string, or a conversation dict exactly as sent upstream):
    for each target, a softmax over its labels of logits derived from sha256 of the canonical JSON."""
    canon = canonical_json(item)
    out: dict[str, dict[str, float]] = {}
    for target, labels in (targets or DEFAULT_TARGETS).items():
        logits = []
        for label in labels:
            digest = hashlib.sha256(f"{target}\x00{label}\x00{canon}".encode()).digest()
            logits.append(int.from_bytes(digest[:8], "big") / 2**64 * 8.0 - 4.0)
        top = max(logits)
        exps = [math.exp(v - top) for v in logits]
        total = sum(exps)
        out[target] = {label: e / total for label, e in zip(labels, exps, strict=True)}
    return out


def expected_result(item: Any, targets: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """One entry of `results` as the fake sends it: `{target: {"scores": {...}}}`."""
    return {t: {"scores": s} for t, s in expected_scores(item, targets).items()}


def _default_error_body(code: int) -> dict[str, Any]:
    if code == 429:
        return {"object": "error", "message": "Requests rate limit exceeded",
                "type": "rate_limit_error", "param": None, "code": None}
    if code >= 500:
        return {"object": "error", "message": "Service unavailable, please retry",
                "type": "server_error", "param": None, "code": None}
    if code == 401:
        return {"object": "error", "message": "Unauthorized", "type": "authentication_error",
                "param": None, "code": None}
    return {"object": "error", "message": f"Request rejected with status {code}",
            "type": "invalid_request_error", "param": None, "code": None}


# ----------------------------------------------------------------------------------------------- fake
class FakeUpstream:
    """The fake's state (calls, faults, delay) and its ASGI app, `self.app`.

    `api_key`, when set, makes the fake answer 401 to any request without `Bearer <api_key>` (the
    request is still recorded)."""

    def __init__(self, targets: dict[str, list[str]] | None = None, *, api_key: str | None = None,
                 delay_s: float = 0.0) -> None:
        self.targets = dict(targets or DEFAULT_TARGETS)
        self.api_key = api_key
        self.delay_s = delay_s
        self.calls: list[Call] = []
        self.url: str | None = None  # set by start() / running_fake_upstream
        self._lock = threading.Lock()
        self._faults: collections.deque[Fault] = collections.deque()
        # Random faults, for load under a flaky upstream: with no queued fault, a request gets
        # `random_fault` with probability `fault_rate` (seeded: the same run, the same faults).
        self.fault_rate = 0.0
        self.random_fault: Fault = Status(500)
        self._rng = random.Random(10)
        self._server: Any = None
        # An object with an async __call__, not a bound method: uvicorn takes a bound method for an
        # ASGI2 app.
        self.app = _ASGIApp(self._handle)

    # --- control, from the test's thread
    def inject(self, *faults: Fault) -> None:
        with self._lock:
            self._faults.extend(faults)

    def pending_faults(self) -> int:
        with self._lock:
            return len(self._faults)

    def reset(self) -> None:
        """Forget recorded calls and queued faults (delay and targets stay)."""
        with self._lock:
            self.calls.clear()
            self._faults.clear()

    def call_count(self) -> int:
        with self._lock:
            return len(self.calls)

    def start(self) -> FakeUpstream:
        from tests.support.servers import ThreadedServer

        self._server = ThreadedServer(self.app).start()
        self.url = self._server.url
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    # --- the ASGI app
    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        body = await _read_body(receive)
        path: str = scope["path"]
        if path == "/_faults":  # the random faults, set from another process (bench/faults.py)
            settings = orjson.loads(body or b"{}")
            with self._lock:
                self.fault_rate = float(settings.get("fault_rate", self.fault_rate))
                self.random_fault = Status(int(settings.get("status", 500)),
                                           settings.get("retry_after"))
            await _respond(send, 200, {"fault_rate": self.fault_rate, "calls": len(self.calls)})
            return
        model_type = ROUTES.get(path)
        if model_type is None:
            await _respond(send, 404, {"detail": "Not Found"})
            return
        if scope["method"] != "POST":
            await _respond(send, 405, {"detail": "Method Not Allowed"})
            return
        authorization = _header(scope, b"authorization")
        endpoint = path.removeprefix("/v1/")
        raw: Any = None
        with contextlib.suppress(ValueError):
            raw = orjson.loads(body)
        fault = self._record(endpoint, raw, authorization)

        if isinstance(fault, Drop):
            await _drop(send)
            return
        pause = self.delay_s + (fault.seconds if isinstance(fault, Slow) else 0.0)
        if pause > 0 and await _client_left_during(receive, pause):
            return  # nobody to answer; and a server shutdown need not wait for the full pause
        if isinstance(fault, Echo):
            text = "." * fault.pad + f"you sent Authorization: {authorization}"
            if fault.json:
                await _respond(send, fault.code, {"object": "error", "message": text})
            else:
                await _respond_text(send, fault.code, text)
            return
        if isinstance(fault, Status):
            headers = [] if fault.retry_after is None else [(b"retry-after", _fmt(fault.retry_after))]
            await _respond(send, fault.code, fault.body or _default_error_body(fault.code), headers)
            return
        if self.api_key is not None and authorization != f"Bearer {self.api_key}":
            await _respond(send, 401, {"detail": "Unauthorized"})
            return
        try:
            request = model_type.model_validate_json(body)
        except ValidationError as exc:
            detail = [{"loc": ["body", *err["loc"]], "msg": err["msg"], "type": err["type"]}
                      for err in exc.errors(include_url=False, include_context=False)]
            await _respond(send, 422, {"detail": detail})
            return
        assert isinstance(request, ClassificationRequest | ChatClassificationRequest)
        items = raw["input"] if isinstance(raw["input"], list) else [raw["input"]]
        results = [self._result(item) for item in items]
        if isinstance(fault, WrongCount):
            if fault.delta < 0:
                results = results[: max(0, len(results) + fault.delta)]
            else:
                results += [self._result(f"extra-{i}") for i in range(fault.delta)]
        await _respond(send, 200, {"id": uuid.uuid4().hex, "model": request.model,
                                   "results": results})

    def _result(self, item: Any) -> dict[str, Any]:
        return expected_result(item, self.targets)

    def _record(self, endpoint: str, raw: Any, authorization: str | None) -> Fault | None:
        model = ""
        inputs: list[Any] = []
        if isinstance(raw, dict):
            model = raw["model"] if isinstance(raw.get("model"), str) else ""
            value = raw.get("input")
            inputs = list(value) if isinstance(value, list) else ([] if value is None else [value])
        with self._lock:
            fault = self._faults.popleft() if self._faults else None
            if fault is None and self.fault_rate and self._rng.random() < self.fault_rate:
                fault = self.random_fault
            self.calls.append(Call(endpoint, model, inputs, authorization, fault))
        return fault


# ---------------------------------------------------------------------------------------- asgi helpers
class _ASGIApp:
    def __init__(self, handler: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self._handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._handler(scope, receive, send)


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def _client_left_during(receive: Receive, seconds: float) -> bool:
    """Sleep `seconds`, or less if the client disconnects first (then return True)."""
    loop = asyncio.get_running_loop()
    until = loop.time() + seconds
    while (left := until - loop.time()) > 0:
        waiter = asyncio.ensure_future(receive())
        try:
            done, _ = await asyncio.wait({waiter}, timeout=left)
        finally:
            if not waiter.done():
                waiter.cancel()
        if done and waiter.result()["type"] == "http.disconnect":
            return True
    return False


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            decoded: str = value.decode("latin-1")
            return decoded
    return None


def _fmt(seconds: float) -> bytes:
    return (str(int(seconds)) if float(seconds).is_integer() else repr(float(seconds))).encode()


async def _respond(send: Send, status: int, payload: Any,
                   headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = orjson.dumps(payload)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


async def _respond_text(send: Send, status: int, text: str) -> None:
    body = text.encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _drop(send: Send) -> None:
    cycle = getattr(send, "__self__", None)
    transport = getattr(cycle, "transport", None)
    abort = getattr(transport, "abort", None)  # asyncio's or uvloop's TCPTransport
    if not callable(abort):
        raise RuntimeError("Drop() needs the fake app served directly by uvicorn "
                           "(tests.support.servers.serve or running_fake_upstream)")
    abort()
    # Let uvicorn see connection_lost, so it does not try to answer 500 on the dead connection.
    for _ in range(3):
        await asyncio.sleep(0)


@contextlib.contextmanager
def running_fake_upstream(targets: dict[str, list[str]] | None = None, *, api_key: str | None = None,
                          delay_s: float = 0.0) -> Iterator[FakeUpstream]:
    """A FakeUpstream served by uvicorn on a free loopback port; `fake.url` is its base URL."""
    fake = FakeUpstream(targets, api_key=api_key, delay_s=delay_s).start()
    try:
        yield fake
    finally:
        fake.stop()


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="Run the fake Mistral-compatible upstream.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay-s", type=float, default=0.0)
    args = parser.parse_args()
    fake = FakeUpstream(delay_s=args.delay_s)
    uvicorn.run(fake.app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
