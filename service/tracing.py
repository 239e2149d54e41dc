"""OpenTelemetry tracing for both servers, behind one seam that costs nothing when off.

Why it looks like this:
- OpenTelemetry is an optional extra (`otel`), so nothing here imports it at module level: a
  server without the extra, or without an exporter endpoint, gets `None` from `open_tracing` and
  every hook is one `is None` test (`span()` then hands back a shared null context manager).
- Configuration is the standard `OTEL_*` variables, read by the SDK itself (sampler, exporter
  endpoint, headers, batch processor schedule, resource attributes). Tracing is on when an OTLP
  endpoint is set (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), and
  `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none` turn it off again: a server never starts
  sending spans to a default address nobody asked for.
- Each app gets its own tracer provider (not the global one), so that a gateway and a factory in
  one process (the tests) report as two services, and closing one app flushes only its spans.
- What goes into a span is chosen here and in the hooks, never copied wholesale: no header, no
  query string, no input text and no piece of any key (docs/observability.md lists every attribute).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Link, Span, SpanContext, Tracer
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: The `classifier.*` attributes (docs/observability.md); HTTP's come from the semantic conventions.
TASK = "classifier.task"
MODEL = "classifier.model"
ITEMS = "classifier.items"
CACHE_HITS = "classifier.cache.hits"
BATCH_SIZE = "classifier.batch.size"
UPSTREAM = "classifier.upstream"
PROTOCOL = "classifier.protocol"
SHARED = "classifier.single_flight.shared"
FALLBACK_FROM = "classifier.fallback_from"
CIRCUIT = "classifier.circuit.state"
JOB = "classifier.job"

Attributes = Mapping[str, str | int | float | bool]
_NULL: contextlib.nullcontext[None] = contextlib.nullcontext()
_NULL_SPAN: contextlib.nullcontext[Any] = contextlib.nullcontext()


def enabled_by(environ: Mapping[str, str]) -> bool:
    """Whether the `OTEL_*` variables ask for traces (see the module docstring)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return bool(environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


class Tracing:
    """One app's tracer: spans, links and W3C trace context in and out."""

    def __init__(self, provider: TracerProvider) -> None:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self.tracer: Tracer = provider.get_tracer("classifier-gateway")
        self._trace = trace
        self._propagator = TraceContextTextMapPropagator()

    def span(self, name: str, attributes: Attributes | None = None, *,
             kind: str = "internal", links: Sequence[Link] = (),
             parent: SpanContext | None = None) -> contextlib.AbstractContextManager[Span]:
        """A span made current for the `with` block; `parent` replaces the current one.

        Inside a span the sampler dropped, nothing: its children would be dropped too (the
        samplers are parent-based), so at 10 % sampling nine requests in ten cost one check."""
        context = None
        if parent is None:
            # Not `is_recording()`: a shadow comparison starts after its request's span ended.
            current = self._trace.get_current_span().get_span_context()
            if current.is_valid and not current.trace_flags.sampled:
                return _NULL_SPAN
        else:
            context = self._trace.set_span_in_context(self._trace.NonRecordingSpan(parent))
        return self.tracer.start_as_current_span(
            name, context=context, kind=_kind(kind), attributes=attributes, links=links,
            record_exception=False)

    def start(self, name: str, attributes: Attributes | None = None) -> Span:
        """A span that is not made current, ended by whoever holds it (a wait that ends in
        another task, as an item's time in the micro-batcher's queue)."""
        return self.tracer.start_span(name, attributes=attributes)

    def current(self) -> SpanContext | None:
        """The current span's context, to link to later; None outside a sampled span."""
        context = self._trace.get_current_span().get_span_context()
        return context if context.is_valid and context.trace_flags.sampled else None

    def exemplar(self) -> dict[str, str] | None:
        """`{"trace_id": ...}` of the current sampled span, for a histogram's exemplar (so that a
        Grafana panel links a slow bucket to its trace); None outside one."""
        context = self._trace.get_current_span().get_span_context()
        if context.is_valid and context.trace_flags.sampled:
            return {"trace_id": f"{context.trace_id:032x}"}
        return None

    def recording(self) -> bool:
        """Whether the current span is sampled: a child is then worth making."""
        return bool(self._trace.get_current_span().get_span_context().trace_flags.sampled)

    def link(self, context: SpanContext) -> Link:
        return self._trace.Link(context)

    def inject(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """`headers` plus `traceparent` (and `tracestate`) for the current span."""
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier)
        if not carrier:
            return headers
        return [*headers, *((k.encode(), v.encode()) for k, v in carrier.items())]

    def extract(self, headers: Iterable[tuple[bytes, bytes]]) -> Any:
        """The context a request's `traceparent`/`tracestate` carry (an empty one without)."""
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers
                   if k in (b"traceparent", b"tracestate")}
        return self._propagator.extract(carrier)

    def set(self, attributes: Attributes) -> None:
        """Attributes on the current span (a no-op outside one)."""
        self._trace.get_current_span().set_attributes(attributes)

    def event(self, name: str, attributes: Attributes | None = None) -> None:
        self._trace.get_current_span().add_event(name, attributes)

    def force_flush(self, timeout_s: float = 5.0) -> bool:
        return self.provider.force_flush(int(timeout_s * 1000))

    def shutdown(self) -> None:
        self.provider.shutdown()


def _kind(kind: str) -> Any:
    from opentelemetry.trace import SpanKind

    return {"server": SpanKind.SERVER, "client": SpanKind.CLIENT,
            "internal": SpanKind.INTERNAL}[kind]


def open_tracing(service_name: str,
                 environ: Mapping[str, str] | None = None) -> Tracing | None:
    """The app's tracing, or None when the extra is absent or the variables leave it off.

    `OTEL_SERVICE_NAME` names the service when set, else `service_name`; the sampler
    (`OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`; parent-based always-on by default), the
    exporter (`OTEL_EXPORTER_OTLP_*`) and the batch processor (`OTEL_BSP_*`) read their own."""
    environ = os.environ if environ is None else environ
    if not enabled_by(environ):
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        return None
    resource = Resource.create({SERVICE_NAME: environ.get("OTEL_SERVICE_NAME") or service_name})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return Tracing(provider)


def span(tracing: Tracing | None, name: str, attributes: Attributes | None = None, *,
         kind: str = "internal", links: Sequence[Link] = (),
         parent: SpanContext | None = None) -> contextlib.AbstractContextManager[Any]:
    """`tracing.span(...)`, or a shared null context when tracing is off (the no-op path)."""
    if tracing is None:
        return _NULL
    return tracing.span(name, attributes, kind=kind, links=links, parent=parent)


class TracingMiddleware:
    """A server span per HTTP request (the HTTP semantic conventions), continuing the caller's
    `traceparent`. Pure ASGI, outermost, so that the span covers the whole answer.

    Recorded: method, route (the route's template when the router found one, else the path of
    a fixed route), scheme, server and client address, protocol version, status, and the task
    the handler put in `scope["state"]`. Never a header, the query string or the body."""

    def __init__(self, app: ASGIApp, tracing: Tracing, *, task_key: str = "task_label") -> None:
        self.app = app
        self.tracing = tracing
        self.task_key = task_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from opentelemetry import context as otel_context
        from opentelemetry.trace import SpanKind, Status, StatusCode

        tracing = self.tracing
        method: str = scope["method"]
        path: str = scope["path"]
        server = scope.get("server") or ("", 0)
        client = scope.get("client") or ("", 0)
        attributes: dict[str, str | int] = {
            "http.request.method": method, "url.path": path,
            "url.scheme": scope.get("scheme", "http"),
            "network.protocol.version": scope.get("http_version", "1.1"),
            "server.address": server[0] or "", "server.port": server[1] or 0,
            "client.address": client[0] or "",
        }
        token = otel_context.attach(tracing.extract(scope["headers"]))
        status = 500
        try:
            with tracing.tracer.start_as_current_span(
                    f"{method} {path}", kind=SpanKind.SERVER, attributes=attributes,
                    record_exception=False) as current:

                async def send_wrapper(message: Message) -> None:
                    nonlocal status
                    if message["type"] == "http.response.start":
                        status = message["status"]
                    await send(message)

                try:
                    await self.app(scope, receive, send_wrapper)
                finally:
                    route = scope.get("route")
                    template = getattr(route, "path", None) or path
                    current.update_name(f"{method} {template}")
                    current.set_attribute("http.route", template)
                    current.set_attribute("http.response.status_code", status)
                    task = (scope.get("state") or {}).get(self.task_key)
                    if isinstance(task, str) and task:
                        current.set_attribute(TASK, task)
                    if status >= 500:
                        current.set_attribute("error.type", str(status))
                        current.set_status(Status(StatusCode.ERROR))
        finally:
            otel_context.detach(token)


def iter_links(tracing: Tracing, contexts: Iterable[SpanContext]) -> Iterator[Link]:
    """One link per distinct span context, in order."""
    seen: set[tuple[int, int]] = set()
    for context in contexts:
        key = (context.trace_id, context.span_id)
        if key not in seen:
            seen.add(key)
            yield tracing.link(context)
