"""One trace end to end: a client's `traceparent` -> the gateway's spans -> the factory's spans,
received by a real OTLP/HTTP receiver (tests/support/otlp_receiver.py) and checked on the wire:
parents, span links, attributes, and that no input text and no piece of any key went out."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from service.commands.demo_runner import TASKS, train_task
from service.gateway.app import create_app
from service.gateway.batcher import LaneKey, MicroBatcher
from service.gateway.metrics import GatewayMetrics
from service.gateway.protocols import Result, Route
from service.gateway.settings import Settings
from service.tracing import Tracing, enabled_by, open_tracing
from tests.support.factory import running_factory
from tests.support.fake_upstream import running_fake_upstream
from tests.support.gateway import gateway_for, gateway_stack
from tests.support.otlp_receiver import OtlpReceiver, ReceivedSpan, running_receiver
from tests.support.redis_server import RedisServer
from tests.support.servers import serve

# Random, so that no slice of a key is an ordinary word of a span (as "client" is).
GATEWAY_KEY = f"gw-{uuid.uuid4().hex}"
FACTORY_KEY = f"fk-{uuid.uuid4().hex}"
TEXTS = ["zebra parcel arrived crushed and late", "marvellous quokka service, thank you"]
CLIENT_TRACE = uuid.uuid4().hex
CLIENT_SPAN = uuid.uuid4().hex[:16]
SERVER, CLIENT = 2, 3  # the OTLP SpanKind values


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with running_receiver() as found:
        yield found


def wait_for(receiver: OtlpReceiver, done: Any, timeout_s: float = 20.0) -> list[ReceivedSpan]:
    deadline = time.monotonic() + timeout_s
    while True:
        spans = receiver.snapshot()
        if done(spans) or time.monotonic() > deadline:
            return spans
        time.sleep(0.05)


def pieces(secret: str, size: int = 8) -> set[bytes]:
    """Every `size`-character slice of a key's random part: no piece of it may appear."""
    secret = secret.split("-", 1)[1]
    return {secret[i:i + size].encode() for i in range(len(secret) - size + 1)}


def test_tracing_is_off_without_an_endpoint_and_when_disabled() -> None:
    assert open_tracing("x", {}) is None
    assert not enabled_by({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://h:4318",
                           "OTEL_SDK_DISABLED": "true"})
    assert not enabled_by({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://h:4318",
                           "OTEL_TRACES_EXPORTER": "none"})
    assert enabled_by({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://h:4318/v1/traces"})


def test_one_trace_from_the_client_through_the_gateway_into_the_factory(
        tmp_path: Path, redis_server: RedisServer, receiver: OtlpReceiver,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    monkeypatch.setenv("OBS_FACTORY_KEY", FACTORY_KEY)
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    sentiment = next(task for task in TASKS if task.name == "sentiment")
    with running_factory(tmp_path / "factory", api_key=FACTORY_KEY) as factory:
        with httpx.Client(base_url=factory.url, timeout=120,
                          headers={"Authorization": f"Bearer {FACTORY_KEY}"}) as client:
            model = train_task(client, sentiment)
        tasks_file = tmp_path / "tasks.yaml"
        tasks_file.write_text(yaml.safe_dump({
            "upstreams": {"local": {"base_url": factory.url, "api_key_env": "OBS_FACTORY_KEY"}},
            "tasks": {"sentiment": {"upstream": "local", "model": model, "kind": "text"}}}))
        settings = Settings(tasks_file=tasks_file, redis_url=redis_server.url,
                            cache_prefix=f"test:{uuid.uuid4().hex[:8]}",
                            api_keys=GATEWAY_KEY)
        with serve(create_app(settings)) as gateway:
            r = httpx.post(f"{gateway.url}/classify", timeout=30,
                           json={"task": "sentiment", "input": TEXTS},
                           headers={"Authorization": f"Bearer {GATEWAY_KEY}",
                                    "traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01",
                                    "tracestate": "client=1"})
            assert r.status_code == 200, r.text

            def complete(spans: list[ReceivedSpan]) -> bool:
                names = {s.name for s in spans if s.trace_id == CLIENT_TRACE}
                return {"POST /classify", "factory.model", "POST /v1/classifications"} <= names \
                    and sum(s.kind == SERVER for s in spans if s.trace_id == CLIENT_TRACE) >= 2

            spans = wait_for(receiver, complete)
    mine = [s for s in spans if s.trace_id == CLIENT_TRACE]
    by_id = {s.span_id: s for s in mine}

    def only(name: str, service: str) -> ReceivedSpan:
        found = [s for s in mine if s.name == name and s.service == service]
        assert len(found) == 1, (name, service, [(s.service, s.name) for s in mine])
        return found[0]

    def parent(span: ReceivedSpan) -> ReceivedSpan:
        return by_id[span.parent_id]

    # The gateway's server span continues the client's trace, under the client's span.
    server = only("POST /classify", "classifier-gateway")
    assert server.kind == SERVER and server.parent_id == CLIENT_SPAN
    assert server.attributes["http.request.method"] == "POST"
    assert server.attributes["http.route"] == "/classify"
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["classifier.task"] == "sentiment"
    assert server.attributes["classifier.model"] == model
    assert server.attributes["classifier.items"] == 2
    assert server.attributes["classifier.cache.hits"] == 0
    lookup = only("gateway.cache.lookup", "classifier-gateway")
    assert parent(lookup) is server and lookup.attributes["classifier.cache.hits"] == 0
    flight = only("gateway.single_flight", "classifier-gateway")
    assert parent(flight) is server and flight.attributes["classifier.items"] == 2
    wait = only("gateway.batcher.wait", "classifier-gateway")
    assert parent(wait) is flight
    batch = only("gateway.upstream.batch", "classifier-gateway")
    assert parent(batch) is flight and batch.attributes["classifier.batch.size"] == 2
    assert (CLIENT_TRACE, flight.span_id) in batch.links
    attempt = only("POST /v1/classifications", "classifier-gateway")
    assert attempt.kind == CLIENT and parent(attempt) is batch
    assert attempt.attributes["classifier.upstream"] == "local"
    assert attempt.attributes["classifier.protocol"] == "mistral"
    assert attempt.attributes["http.response.status_code"] == 200
    # The factory continues the trace the gateway injected into the upstream request.
    f_server = only("POST /v1/classifications", "classifier-factory")
    assert f_server.kind == SERVER and parent(f_server) is attempt
    assert f_server.attributes["http.route"] == "/v1/classifications"
    classify = only("factory.classify", "classifier-factory")
    assert parent(classify) is f_server
    for step in ("factory.load", "factory.tokenise", "factory.model"):
        assert parent(only(step, "classifier-factory")) is classify
    # The training job is a trace of its own, its phases as events.
    job = next(s for s in spans if s.name == "factory.job")
    assert job.service == "classifier-factory" and job.trace_id != CLIENT_TRACE
    assert job.attributes["classifier.job.status"] == "SUCCESS"
    assert "phase training" in job.events, job.events  # (no validation file: no evaluation)
    # Nothing secret went out: not an input, not a piece of either key, in any byte sent.
    wire = b"".join(receiver.raw)
    for text in TEXTS:
        assert text.encode() not in wire
        assert b"quokka" not in wire and b"zebra" not in wire
    for key in (GATEWAY_KEY, FACTORY_KEY):
        assert not [p for p in pieces(key) if p in wire], key


class _Sender:
    async def classify(self, route: Route, inputs: list[Any], *,
                       deadline: float) -> list[Result]:
        await asyncio.sleep(0.01)
        return [{"t": {"scores": {"a": 1.0}}} for _ in inputs]


async def test_a_batch_links_to_every_request_whose_items_it_carries(
        receiver: OtlpReceiver) -> None:
    provider = TracerProvider(resource=Resource.create({"service.name": "batcher-test"}))
    provider.add_span_processor(BatchSpanProcessor(
        OTLPSpanExporter(endpoint=f"{receiver.endpoint}/v1/traces"), schedule_delay_millis=50))
    tracing = Tracing(provider)
    from prometheus_client import CollectorRegistry

    batcher = MicroBatcher(max_batch_items=8, max_wait_s=0.05, max_concurrent_batches=1,
                           max_queue_items=100, metrics=GatewayMetrics(CollectorRegistry()),
                           tracing=tracing)
    lane = LaneKey("up", "/v1/classifications", Route("text", "m"))
    sender = _Sender()

    async def request(n: int) -> str:
        with tracing.span(f"request {n}") as current:
            pending = batcher.submit(lane, sender, [(f"k{n}", f"item {n}")], ttl_s=0,
                                     deadline=time.monotonic() + 5)
            await asyncio.gather(*(item.future for item in pending))
            return f"{current.get_span_context().span_id:016x}"

    # The first request takes the only slot; the next three queue and leave as one batch.
    first = asyncio.ensure_future(request(0))
    await asyncio.sleep(0)
    ids = await asyncio.gather(first, *(request(n) for n in (1, 2, 3)))
    tracing.force_flush()
    tracing.shutdown()
    spans = wait_for(receiver, lambda s: sum(x.name == "gateway.upstream.batch" for x in s) >= 2)
    batches = sorted((s for s in spans if s.name == "gateway.upstream.batch"),
                     key=lambda s: s.start_ns)
    assert [s.attributes["classifier.batch.size"] for s in batches] == [1, 3]
    requests = {s.span_id: s for s in spans if s.name.startswith("request ")}
    assert {span_id for _, span_id in batches[1].links} == set(ids[1:])
    assert batches[1].parent_id == ids[1]  # a child of the first request it carries
    assert all(span_id in requests for _, span_id in batches[1].links)
    waits = [s for s in spans if s.name == "gateway.batcher.wait"]
    assert len(waits) == 4 and {s.parent_id for s in waits} == set(ids)


def test_a_request_the_caller_did_not_sample_leaves_no_span_nor_exemplar(
        tmp_path: Path, receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    dropped, kept = uuid.uuid4().hex, uuid.uuid4().hex
    with gateway_stack(tmp_path) as stack:
        for trace_id, flags in ((dropped, "00"), (kept, "01")):
            r = httpx.post(f"{stack.url}/classify", json={"task": "sentiment", "input": ["x"]},
                           headers={"traceparent": f"00-{trace_id}-{CLIENT_SPAN}-{flags}"})
            assert r.status_code == 200, r.text
        spans = wait_for(receiver, lambda s: any(x.name == "POST /v1/classifications"
                                                 and x.trace_id == kept for x in s))
        # The latency histograms carry the sampled request's trace id as an exemplar, in the
        # OpenMetrics exposition Prometheus asks for (and only there).
        exposition = httpx.get(f"{stack.url}/metrics",
                               headers={"accept": "application/openmetrics-text"})
        assert exposition.headers["content-type"].startswith("application/openmetrics-text")
        exemplars = [line for line in exposition.text.splitlines() if " # {" in line]
        assert any(line.startswith("gateway_request_duration_seconds_bucket")
                   and f'trace_id="{kept}"' in line for line in exemplars), exemplars
        assert any(line.startswith("gateway_upstream_duration_seconds_bucket")
                   and f'trace_id="{kept}"' in line for line in exemplars), exemplars
        assert dropped not in exposition.text
        assert " # {" not in httpx.get(f"{stack.url}/metrics").text
    assert {s.trace_id for s in spans} == {kept}
    assert {"POST /classify", "gateway.single_flight", "gateway.upstream.batch",
            "POST /v1/classifications"} <= {s.name for s in spans}


def test_fallback_canary_shadow_and_review_have_their_spans(
        tmp_path: Path, redis_server: RedisServer, receiver: OtlpReceiver,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    with running_fake_upstream() as fake:
        upstreams = {"dead": {"base_url": "http://127.0.0.1:9"}, "fake": {"base_url": str(fake.url)}}
        tasks = {
            # The model's upstream refuses connections: retried, then the fallback answers.
            "falls": {"upstream": "dead", "model": "ft:a", "kind": "text",
                      "fallbacks": [{"upstream": "fake", "model": "ft:b"}]},
            "rolls": {"upstream": "fake", "model": "ft:c", "kind": "text",
                      "canary": {"model": "ft:d", "weight": 1.0}, "review": {"max_margin": 1.0}},
            # (a shadow sees only the items the task's own model answered, none of a full canary)
            "shadows": {"upstream": "fake", "model": "ft:c", "kind": "text",
                        "shadow": {"model": "ft:e", "sample": 1.0}},
        }
        with gateway_for(tmp_path, redis_server.url, upstreams, tasks, retry_attempts=2) as url:
            ids = {}
            for task in tasks:
                trace_id = uuid.uuid4().hex
                r = httpx.post(f"{url}/classify", json={"task": task, "input": ["hello"]},
                               headers={"traceparent": f"00-{trace_id}-{CLIENT_SPAN}-01"})
                assert r.status_code == 200, r.text
                ids[task] = trace_id
            names = {"gateway.fallback", "gateway.canary", "gateway.shadow", "gateway.review"}
            spans = wait_for(receiver, lambda s: names <= {x.name for x in s})
    by_id = {s.span_id: s for s in spans}

    def chain(span: ReceivedSpan) -> list[str]:
        out = []
        while span.parent_id in by_id:
            span = by_id[span.parent_id]
            out.append(span.name)
        return out

    falls = [s for s in spans if s.trace_id == ids["falls"]]
    fallback = next(s for s in falls if s.name == "gateway.fallback")
    assert fallback.attributes["classifier.fallback_from"] == "ft:a"
    assert fallback.attributes["classifier.upstream"] == "fake"
    assert chain(fallback) == ["POST /classify"]
    failed = [s for s in falls if s.kind == CLIENT and "error.type" in s.attributes]
    assert len(failed) == 2 and {s.attributes.get("http.request.resend_count") for s in failed} \
        == {None, 1}  # the first attempt and its retry, siblings under one batch
    answered = [s for s in falls if s.kind == CLIENT and "error.type" not in s.attributes]
    assert len(answered) == 1 and "gateway.fallback" in chain(answered[0])
    rolls = {s.name: s for s in spans if s.trace_id in (ids["rolls"], ids["shadows"])}
    for name in ("gateway.canary", "gateway.shadow", "gateway.review"):
        assert chain(rolls[name])[-1] == "POST /classify", name
    assert rolls["gateway.canary"].attributes["classifier.model"] == "ft:d"
    assert rolls["gateway.shadow"].attributes["classifier.model"] == "ft:e"


def test_a_jobs_evaluation_event_carries_its_numbers_only() -> None:
    from service.factory.jobs import _numbers

    evaluation = {"loss": 0.4, "accuracy": 0.9, "early": True, "note": "text",
                  "targets": {"sentiment": {"accuracy": 0.8, "macro_f1": 0.7, "examples": 40}}}
    assert _numbers(evaluation) == {"loss": 0.4, "accuracy": 0.9,
                                    "targets.sentiment.accuracy": 0.8,
                                    "targets.sentiment.macro_f1": 0.7,
                                    "targets.sentiment.examples": 40}
