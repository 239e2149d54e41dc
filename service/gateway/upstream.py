"""UpstreamClient: one pooled HTTP client per upstream, with retries and a circuit breaker.

What is said on the wire (paths, bodies, answers, error bodies, model metadata) belongs to the
upstream's protocol (`service.gateway.protocols`: Mistral's API, TEI, vLLM, Infinity, KServe v2);
this module keeps what every protocol shares: deadlines, retries, the breaker, batch splitting to
the server's limit, metrics and scrubbing. What a status means (success, retry, the request's
fault) and `Retry-After` are upstream_status.py's; what a server said about a model is kept by
server_info.py.

Transport: httpx's request/response types over `PooledTransport` (transport.py: asyncio + httptools,
a keep-alive pool), called directly rather than through `httpx.AsyncClient`. On the gateway's hot path
httpx's own pool and the client's per-request machinery (URL merging, cookies, auth and redirect
handling, none of which is wanted: the URL is fixed, there are no cookies and no redirects) cost far
more CPU than the exchange itself; `bench/upstream_transport.py` has the figures
(docs/performance.md). Everything except `_default_transport` is transport-agnostic: tests inject
`httpx.MockTransport`, and any `httpx.AsyncBaseTransport` can replace it in one place.

Failure policy, in one place:
- connection errors, 429 and 5xx are retried with exponential backoff and full jitter, never less than
  the upstream's `Retry-After`, at most `retry_attempts` attempts, and never past the caller's deadline:
  a retry that cannot start before the deadline fails at once with `UpstreamUnavailable`; retries
  of failures (and of a 429 without `Retry-After`) also need the retry budget (`retry_budget` of
  calls, resilience.py);
- 429 is backpressure, not failure: its `Retry-After` is waited (within the deadline), and it never
  counts against the circuit;
- running out of time during an attempt is `UpstreamTimeout`; any other 4xx is `UpstreamRejected`
  (retrying the same body will not help); a 2xx body that breaks the protocol's format, or holds
  a different number of results than inputs, is `UpstreamBadResponse`;
- a circuit breaker per upstream judges the failure rate of logical calls (each counted once, after
  its retries) over a sliding window; once open it fails calls fast (no connection, no queueing
  behind a dead peer) until `circuit_reset_s` has passed, then lets a single probe through (one
  attempt) and closes again on its success.
The upstream's key is sent as `Authorization: Bearer` and scrubbed from every message we build.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from typing import Any

import httpx
import orjson

from service.gateway.errors import (
    UpstreamBadResponse,
    UpstreamError,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from service.gateway.metrics import GatewayMetrics
from service.gateway.protocols import Result, Route, ServerInfo
from service.gateway.registry import UpstreamSpec
from service.gateway.resilience import CircuitBreaker, GateState, RetryBudget
from service.gateway.scrub import quote, scrub
from service.gateway.server_info import ServerInfoCache
from service.gateway.settings import Settings
from service.gateway.transport import PooledTransport
from service.gateway.upstream_status import parse_retry_after, verdict
from service.tracing import CIRCUIT, PROTOCOL, UPSTREAM, Tracing

log = logging.getLogger("service.gateway.upstream")

_MAX_MESSAGE_CHARS = 300


class _Retryable(Exception):
    """One failed attempt that another attempt may fix; carries what the final error needs."""

    def __init__(self, outcome: str, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.outcome = outcome
        self.reason = reason
        self.retry_after_s = retry_after_s


def _default_transport(settings: Settings, spec: UpstreamSpec) -> httpx.AsyncBaseTransport:
    # Idle connections are dropped after 4 s, before uvicorn's default 5 s keep-alive (the factory)
    # closes them from its side: reusing a connection the server is closing costs a failed attempt.
    limits = httpx.Limits(max_connections=settings.max_connections,
                          max_keepalive_connections=settings.max_connections, keepalive_expiry=4.0)
    if spec.proxy is not None:
        # Through a proxy (CONNECT tunnels for https, proxy auth): httpx's own transport. Its extra
        # CPU per call is small next to a proxied round trip to a remote API.
        return httpx.AsyncHTTPTransport(limits=limits, proxy=spec.proxy)
    return PooledTransport(limits=limits)


class UpstreamClient:
    """Sends classification batches to one upstream, in the upstream's protocol."""

    def __init__(self, spec: UpstreamSpec, settings: Settings, metrics: GatewayMetrics, *,
                 transport: httpx.AsyncBaseTransport | None = None,
                 rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 tracing: Tracing | None = None) -> None:
        self.spec = spec
        self.tracing = tracing
        self.settings = settings
        self.metrics = metrics
        self._rng = rng or random.Random()
        self._clock = clock
        self.wire = spec.wire
        self._root = self.wire.root(spec.base_url)
        self._urls: dict[Route, tuple[httpx.URL, str]] = {}
        self._info = ServerInfoCache(clock)
        # Requests go straight to the transport: httpx.AsyncClient's per-request work (URL merging,
        # cookie extraction, auth and redirect machinery) is a large share of the CPU per call, and
        # none of it is wanted here: the URL is fixed, there are no cookies and no redirects.
        self._transport = transport or _default_transport(settings, spec)
        self._headers = [(b"content-type", b"application/json"), (b"accept", b"application/json"),
                         (b"user-agent", b"classifier-gateway")]
        self._circuit_gauge = metrics.circuit_open.labels(spec.name)
        self._circuit_gauge.set(0)
        self.breaker = CircuitBreaker(
            failure_rate=settings.circuit_failure_rate, min_calls=settings.circuit_min_calls,
            window_calls=settings.circuit_window_calls, window_s=settings.circuit_window_s, reset_s=settings.circuit_reset_s, clock=clock,
            on_change=self._on_circuit_change)
        self.budget = RetryBudget(settings.retry_budget, clock=clock)
        self._last_failure = ""
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False

    @property
    def circuit_open(self) -> bool:
        """True while calls fail fast (open), or while only a probe may pass (half-open)."""
        return self.breaker.is_open

    def _url(self, route: Route) -> tuple[httpx.URL, str]:
        found = self._urls.get(route)
        if found is None:
            found = self._urls[route] = (httpx.URL(self._root + self.wire.path(route)),
                                         self.wire.endpoint(route))
        return found

    async def classify(self, route: Route, inputs: list[Any], *,
                       deadline: float) -> list[Result]:
        """One result per input in Mistral's shape (`{target: {"scores": {label: p}}}`).

        `deadline` is absolute, in `time.monotonic()` seconds. A batch larger than the server's
        limit (the upstream's `max_batch_size`, else what the server says, as TEI's
        `max_client_batch_size`) goes as several calls at once. Raises the UpstreamError
        subclasses of errors.py; never includes the key in a message."""
        if self._closed:
            raise UpstreamUnavailable(f"upstream {self.spec.name!r}: the client is closed "
                                      "(the gateway is shutting down or the upstream was reconfigured)",
                                      retry_after_s=1.0)
        budget = deadline - self._clock()
        self._inflight += 1
        self._idle.clear()
        try:
            info = await self._server_info(route, deadline)
            limit = self.spec.max_batch_size or (info.max_batch_size if info else None)
            if limit is None or len(inputs) <= limit:
                return await self._call(route, inputs, info, deadline, budget)
            parts = await asyncio.gather(
                *(self._call(route, inputs[i:i + limit], info, deadline, budget)
                  for i in range(0, len(inputs), limit)), return_exceptions=True)
            failed = next((p for p in parts if isinstance(p, BaseException)), None)
            if failed is not None:
                raise failed
            return [result for part in parts if isinstance(part, list) for result in part]
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()

    async def _call(self, route: Route, inputs: list[Any], info: ServerInfo | None,
                    deadline: float, budget: float) -> list[Result]:
        url, endpoint = self._url(route)
        body = self.wire.encode(route, inputs)

        def decode(payload: Any) -> list[Result] | str:
            results = self.wire.decode(route, payload, len(inputs), info)
            if isinstance(results, list) and len(results) != len(inputs):
                return f"it holds {len(results)} results for {len(inputs)} inputs"
            return results

        return await self._with_retries(endpoint, url, body, decode, deadline, budget)

    async def _server_info(self, route: Route, deadline: float) -> ServerInfo | None:
        """What the server says about the model (labels, batch limit), when the protocol can ask
        and the tasks file leaves something to ask for; kept by server_info.py (one request in
        flight per model). A failed answer matters only when the labels depend on it."""
        wire = self.wire
        path = wire.info_path(route)
        needs_labels = wire.labels_by_index and not route.labels
        if path is None or not (needs_labels or self.spec.max_batch_size is None):
            return None

        async def ask() -> ServerInfo | str:
            try:
                return await self._fetch_info(route, path, deadline)
            except UpstreamError as exc:
                return exc.message

        found = await self._info.get(route.model, ask)
        if isinstance(found, ServerInfo):
            if needs_labels and not found.labels:
                raise UpstreamBadResponse(
                    f"upstream {self.spec.name!r} ({wire.name}) does not say the labels of model "
                    f"{route.model!r}; list its classes in index order under the task's `labels`")
            return found
        if needs_labels:
            raise UpstreamBadResponse(
                f"upstream {self.spec.name!r} ({wire.name}): cannot read the labels of model "
                f"{route.model!r} from {path}: {found}; list them under the task's `labels`")
        log.warning("upstream %s: no model info from %s (%s); using the gateway's batch size",
                    self.spec.name, path, found)
        return None

    async def _fetch_info(self, route: Route, path: str, deadline: float) -> ServerInfo | str:
        remaining = deadline - self._clock()
        if remaining <= 0:
            raise self._timeout("info", remaining, 1)
        request = httpx.Request("GET", httpx.URL(self._root + path), headers=self._auth_headers(),
                                extensions={"timeout": {k: remaining + 1.0 for k in
                                                        ("connect", "read", "write", "pool")}})
        try:
            async with asyncio.timeout(remaining):
                response = await self._transport.handle_async_request(request)
                try:
                    await response.aread()
                finally:
                    await response.aclose()
        except TimeoutError:
            self._count("info", "timeout")
            raise self._timeout("info", remaining, 1) from None
        except Exception as exc:  # a boundary: any transport failure is "could not ask"
            self._count("info", "connect_error")
            return f"connection failed ({type(exc).__name__})"
        self._count("info", str(response.status_code))
        if response.status_code != 200:
            return f"{response.status_code}: {self._message(response)}"
        try:
            payload = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            return "the answer is not JSON"
        return self.wire.read_info(route, payload)

    def _auth_headers(self) -> list[tuple[bytes, bytes]]:
        key = self.spec.api_key()
        if key:
            return [*self._headers, (b"authorization", f"Bearer {key}".encode())]
        return self._headers

    async def _with_retries(self, endpoint: str, url: httpx.URL, body: bytes,
                            decode: Callable[[Any], list[Result] | str], deadline: float,
                            budget: float) -> list[Result]:
        """One logical call: attempts until success, a verdict that retrying cannot change, the
        last attempt, the deadline, an open circuit or a spent retry budget. The breaker hears
        the call's outcome once, at the end."""
        breaker = self.breaker
        admission = breaker.acquire()
        if not admission.allowed:
            if self.tracing is not None:
                self.tracing.event("circuit open", {UPSTREAM: self.spec.name})
            self._count(endpoint, "circuit_open")
            raise UpstreamUnavailable(
                f"upstream {self.spec.name!r} is failing "
                f"({self._last_failure or 'repeated errors'}); the circuit breaker stops calls "
                f"to it for {admission.wait_s:.1f} s more, then probes it again",
                retry_after_s=admission.wait_s)
        probe = admission.probe
        self.budget.record_call()
        attempts = 1 if probe else self.settings.retry_attempts  # a probe's verdict comes fast
        attempt = 0
        failed = False  # an attempt failed for a reason that is the upstream's (not 429)
        verdict: bool | None = None  # None: nothing to tell the breaker (cancelled, or 429 only)
        try:
            while True:
                attempt += 1
                if deadline - self._clock() <= 0:  # no time for an attempt
                    verdict = False if failed else None
                    raise self._timeout(endpoint, budget, attempt)
                if attempt > 1:
                    self.metrics.upstream_retries.inc()
                try:
                    results = await self._attempt(endpoint, url, body, decode, deadline, budget,
                                                  attempt)
                except _Retryable as failure:
                    self._last_failure = failure.reason
                    backpressure = failure.outcome == "429"
                    failed = failed or not backpressure
                    delay = self._backoff(attempt, failure.retry_after_s)
                    retry_after = failure.retry_after_s or max(delay, 1.0)
                    why = None
                    if attempt >= attempts:
                        why = (f"after {attempt} attempt{'s' if attempt > 1 else ''}"
                               + (" (a probe of the circuit gets one)" if probe else ""))
                    elif self._clock() + delay >= deadline:
                        why = f"and a retry in {delay:.2f} s would pass the request's deadline"
                    elif breaker.is_open:
                        retry_after = max(breaker.retry_after(), retry_after)
                        why = ("and the circuit breaker has opened meanwhile: calls fail fast for "
                               f"{breaker.retry_after():.1f} s")
                    elif (not backpressure or failure.retry_after_s is None) and \
                            not self.budget.try_spend():
                        # A 429 that says when to come back is waited out, free; one that does
                        # not is paced by our backoff alone, so it is charged like a failure.
                        self.metrics.child(self.metrics.upstream_retries_throttled,
                                           self.spec.name).inc()
                        why = ("and the retry budget is spent (retries may be GATEWAY_RETRY_BUDGET "
                               f"= {self.settings.retry_budget:g} of calls)")
                    if why is not None:
                        verdict = False if failed else None
                        raise UpstreamUnavailable(
                            f"upstream {self.spec.name!r} is unavailable: {failure.reason}, {why}; "
                            "retry later", retry_after_s=retry_after) from None
                    log.info("upstream %s: %s; retry %d of %d in %.3f s", self.spec.name,
                             failure.reason, attempt, attempts - 1, delay)
                    await asyncio.sleep(delay)
                except UpstreamTimeout:
                    self._last_failure = "timed out"
                    verdict = False
                    raise
                except UpstreamBadResponse as exc:
                    self._last_failure = exc.message
                    verdict = False
                    raise
                except UpstreamRejected:
                    verdict = True  # it answered: alive, just unhappy with this request
                    raise
                else:
                    verdict = True
                    return results
        finally:
            if verdict is None:
                breaker.release(probe=probe)
            else:
                breaker.record(verdict, probe=probe)

    def _backoff(self, attempt: int, retry_after_s: float | None) -> float:
        """Full jitter (uniform in [0, min(cap, base * 2^(n-1))]), but never before Retry-After."""
        ceiling = min(self.settings.retry_backoff_max_s,
                      self.settings.retry_backoff_s * 2 ** (attempt - 1))
        delay = self._rng.uniform(0.0, ceiling)
        return max(delay, retry_after_s) if retry_after_s is not None else delay

    async def _attempt(self, endpoint: str, url: httpx.URL, body: bytes,
                       decode: Callable[[Any], list[Result] | str], deadline: float, budget: float,
                       attempt: int) -> list[Result]:
        tracing = self.tracing
        if tracing is None or not tracing.recording():  # off, or this batch was not sampled
            return await self._attempt_untraced(endpoint, url, body, decode, deadline, budget,
                                                attempt)
        # A client span per attempt (retries are siblings); no URL query, userinfo or header.
        attributes: dict[str, str | int] = {
            "http.request.method": "POST", "server.address": url.host,
            "server.port": url.port or (443 if url.scheme == "https" else 80),
            "url.full": f"{url.scheme}://{url.host}{f':{url.port}' if url.port else ''}{url.path}",
            UPSTREAM: self.spec.name, PROTOCOL: self.wire.name,
            CIRCUIT: "half_open" if self.breaker.is_open else "closed",
        }
        if attempt > 1:
            attributes["http.request.resend_count"] = attempt - 1
        with tracing.span(f"POST {url.path}", attributes, kind="client") as current:
            try:
                return await self._attempt_untraced(endpoint, url, body, decode, deadline,
                                                    budget, attempt)
            except _Retryable as failure:
                current.set_attribute("error.type", failure.outcome)
                raise
            except Exception as exc:
                current.set_attribute("error.type", type(exc).__name__)
                raise

    async def _attempt_untraced(self, endpoint: str, url: httpx.URL, body: bytes,
                                decode: Callable[[Any], list[Result] | str], deadline: float,
                                budget: float, attempt: int) -> list[Result]:
        remaining = max(deadline - self._clock(), 0.001)
        headers = self._auth_headers()
        if self.tracing is not None:
            headers = self.tracing.inject(headers)
        # The deadline is enforced by asyncio.timeout around the whole exchange (httpx's timeouts
        # are per socket operation); the transport's own timeouts sit just behind it, except the
        # connect timeout, which is shorter so that a dead host leaves time for another attempt.
        backstop = remaining + 1.0
        connect = self.settings.connect_timeout_s
        timeout = {"connect": connect if connect < remaining else backstop, "read": backstop,
                   "write": backstop, "pool": backstop}
        request = httpx.Request("POST", url, headers=headers, content=body,
                                extensions={"timeout": timeout})
        started = time.perf_counter()
        deadline_guard = asyncio.timeout(remaining)
        try:
            async with deadline_guard:
                response = await self._transport.handle_async_request(request)
                try:
                    await response.aread()
                finally:
                    await response.aclose()
        except Exception as exc:  # a boundary: whatever the transport raises is a failed exchange
            self.metrics.child(self.metrics.upstream_duration, self.spec.name, endpoint).observe(
                time.perf_counter() - started)
            if deadline_guard.expired():
                self._count(endpoint, "timeout")
                raise self._timeout(endpoint, budget, attempt) from None
            # Any transport error before the deadline (refused, reset, dropped, connect timeout) is
            # worth another attempt. Transports disagree on names (httpx-aiohttp called a dropped
            # connection a ConnectTimeout), so the type is only reported, not acted upon.
            if not isinstance(exc, httpx.TransportError | OSError):
                # No traceback: its frames hold the request's headers, the key among them.
                log.warning("upstream %s: unexpected %s from the transport (%s), treated as a "
                            "connection failure", self.spec.name, type(exc).__name__,
                            self._scrub(str(exc)))
            self._count(endpoint, "connect_error")
            reason = f"connection failed ({type(exc).__name__}: {self._scrub(str(exc)) or 'no detail'})"
            raise _Retryable("connect_error", reason) from None
        self.metrics.child(self.metrics.upstream_duration, self.spec.name, endpoint).observe(
            time.perf_counter() - started,
            self.tracing.exemplar() if self.tracing is not None else None)
        status = response.status_code
        if self.tracing is not None:
            self.tracing.set({"http.response.status_code": status})
        self._count(endpoint, str(status))
        kind = verdict(status, self.wire.server_errors)
        if kind == "answer":
            try:
                payload = orjson.loads(response.content)
            except orjson.JSONDecodeError:
                raise UpstreamBadResponse(
                    f"upstream {self.spec.name!r} answered {status} with a body that is not JSON "
                    f"({self._snippet(response.content)}); check that its base URL points at a "
                    f"server of its protocol, {self.wire.name}") from None
            checked = decode(payload)
            if isinstance(checked, str):
                raise UpstreamBadResponse(
                    f"upstream {self.spec.name!r} answered {status} with a body that is not a "
                    f"{self.wire.name} classification response: {self._scrub(checked)}")
            return checked
        if kind == "retry":
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            what = "rate limited" if status == 429 else "server error"
            reason = f"{status} {what}: {self._message(response)}"
            raise _Retryable(str(status), reason, retry_after)
        if kind == "rejected":
            raise UpstreamRejected(
                f"upstream {self.spec.name!r} rejected the request with {status}: "
                f"{self._message(response)}", upstream_status=status)
        raise UpstreamBadResponse(
            f"upstream {self.spec.name!r} answered with unexpected status {status}; "
            "check its base URL (redirects are not followed)")

    def _timeout(self, endpoint: str, budget: float, attempt: int) -> UpstreamTimeout:
        tries = f" (attempt {attempt} of {self.settings.retry_attempts})" if attempt > 1 else ""
        return UpstreamTimeout(
            f"upstream {self.spec.name!r} did not answer {endpoint} within the {budget:.2f} s "
            f"left of the request's deadline when the batch was sent{tries}; raise the task's "
            "timeout_s or check the upstream")

    def _count(self, endpoint: str, status: str) -> None:
        self.metrics.child(self.metrics.upstream_requests, self.spec.name, endpoint, status).inc()

    def _on_circuit_change(self, state: GateState) -> None:
        self._circuit_gauge.set(0 if state == "closed" else 1)
        if state == "open":
            calls, failures = self.breaker.window()
            log.warning("upstream %s: circuit open (%d of the last %d calls failed, or a probe "
                        "failed; last: %s); failing fast for %.1f s", self.spec.name,
                        failures, calls,
                        self._last_failure or "?", self.breaker.reset_s)
        elif state == "closed":
            log.info("upstream %s: circuit closed, the upstream answers again", self.spec.name)

    def _message(self, response: httpx.Response) -> str:
        """The upstream's own explanation (as its protocol words it), scrubbed."""
        try:
            payload = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            payload = None
        text = self.wire.error_text(payload)
        if text is None:
            return self._snippet(response.content) or (response.reason_phrase or "no message")
        return quote(text, self.spec.secrets(), _MAX_MESSAGE_CHARS)

    def _snippet(self, content: bytes) -> str:
        """The start of a foreign body, scrubbed before it is cut (scrub.py says why)."""
        return quote(content, self.spec.secrets(), _MAX_MESSAGE_CHARS)

    def _scrub(self, text: str) -> str:
        return scrub(text, self.spec.secrets())

    @property
    def closed(self) -> bool:
        return self._closed

    async def wait_idle(self) -> None:
        await self._idle.wait()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._transport.aclose()


class UpstreamPool:
    """One UpstreamClient per upstream spec; a changed spec (after a reload) gets a new client.

    The replaced client is closed once its in-flight calls are done, so a reload never cuts a request
    short."""

    def __init__(self, settings: Settings, metrics: GatewayMetrics, *,
                 transport_factory: Callable[[], httpx.AsyncBaseTransport] | None = None,
                 tracing: Tracing | None = None) -> None:
        self.settings = settings
        self.tracing = tracing
        self.metrics = metrics
        self._transport_factory = transport_factory
        self._clients: dict[str, UpstreamClient] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        self._retired: list[UpstreamClient] = []  # closed by aclose() if still open then

    def get(self, spec: UpstreamSpec) -> UpstreamClient:
        client = self._clients.get(spec.name)
        if client is not None and client.spec == spec:
            return client
        transport = self._transport_factory() if self._transport_factory else None
        fresh = UpstreamClient(spec, self.settings, self.metrics, transport=transport,
                               tracing=self.tracing)
        self._clients[spec.name] = fresh
        if client is not None:
            self._retire(client)
        return fresh

    def _retire(self, client: UpstreamClient) -> None:
        self._retired.append(client)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return

        async def close_when_idle() -> None:
            await client.wait_idle()
            await client.aclose()
            with contextlib.suppress(ValueError):
                self._retired.remove(client)

        task = loop.create_task(close_when_idle(), name=f"retire-upstream-{client.spec.name}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def open_circuits(self) -> list[str]:
        """Names of upstreams whose circuit is open (for /readyz)."""
        return sorted(name for name, client in self._clients.items() if client.circuit_open)

    async def aclose(self) -> None:
        for task in list(self._retiring):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        clients = [*self._clients.values(), *self._retired]
        self._clients.clear()
        self._retired.clear()
        for client in clients:
            try:
                await client.aclose()
            except Exception:  # closing one must not leave the others open
                log.exception("closing the client of upstream %s failed", client.spec.name)


__all__ = ["CircuitBreaker", "UpstreamClient", "UpstreamError", "UpstreamPool", "parse_retry_after"]
