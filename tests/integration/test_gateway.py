"""The gateway end to end in one process: real uvicorn, real Redis, the fake upstream on a real port.

Every assertion about batching, caching and single flight is made on the upstream side: the fake
records each request it receives.
"""

from __future__ import annotations

import asyncio
import base64
import math
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.fake_upstream import (
    Drop,
    Slow,
    Status,
    WrongCount,
    expected_scores,
    running_fake_upstream,
)
from tests.support.forward_proxy import running_forward_proxy
from tests.support.gateway import DEFAULT_TASKS, GatewayStack, gateway_stack, write_tasks
from tests.support.redis_server import RedisServer


def texts(n: int, tag: str = "t") -> list[str]:
    return [f"{tag} text number {i}" for i in range(n)]


def upstream_items(stack: GatewayStack) -> list[Any]:
    return [item for call in stack.upstream.calls for item in call.inputs]


@pytest.fixture
def stack(tmp_path: Path, redis_server: RedisServer) -> Any:
    with gateway_stack(tmp_path, redis_url=redis_server.url) as s:
        yield s


@pytest.fixture(params=["link", "redis-py"])
def any_client_stack(request: pytest.FixtureRequest, tmp_path: Path,
                     redis_server: RedisServer) -> Any:
    """A gateway on either client for a standalone Redis (GATEWAY_REDIS_CLIENT)."""
    with gateway_stack(tmp_path, redis_url=redis_server.url, redis_client=request.param) as s:
        yield s


async def post(stack: GatewayStack, path: str, body: Any, **kw: Any) -> httpx.Response:
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as client:
        return await client.post(path, json=body, **kw)


# --------------------------------------------------------------------------- results and shapes
async def test_text_results_in_input_order_with_labels(stack: GatewayStack) -> None:
    inputs = texts(7)
    r = await post(stack, "/classify", {"task": "sentiment", "input": inputs})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["task"] == "sentiment" and body["model"] == "ft:classifier:test:sentiment"
    assert len(body["id"]) == 32
    assert r.headers["x-cache"] == "miss"
    for text, result in zip(inputs, body["results"], strict=True):
        scores = expected_scores(text)["sentiment"]
        assert result["sentiment"]["scores"] == pytest.approx(scores)
        assert result["sentiment"]["label"] == max(scores, key=scores.__getitem__)
    assert upstream_items(stack) == inputs
    assert stack.upstream.calls[0].model == "ft:classifier:test:sentiment"


async def test_single_string_input(stack: GatewayStack) -> None:
    r = await post(stack, "/classify", {"task": "sentiment", "input": "just one"})
    assert r.status_code == 200
    assert len(r.json()["results"]) == 1
    assert stack.upstream.calls[0].endpoint == "classifications"


async def test_chat_results_in_order(stack: GatewayStack) -> None:
    convs = [{"messages": [{"role": "user", "content": f"hello {i}"},
                           {"role": "assistant", "content": "hi", "prefix": False}]}
             for i in range(3)]
    r = await post(stack, "/classify-chat", {"task": "intent", "input": convs})
    assert r.status_code == 200, r.text
    sent = upstream_items(stack)
    assert stack.upstream.calls[0].endpoint == "chat/classifications"
    assert [c["messages"][0]["content"] for c in sent] == ["hello 0", "hello 1", "hello 2"]
    for conv, result in zip(sent, r.json()["results"], strict=True):
        assert result["sentiment"]["scores"] == pytest.approx(expected_scores(conv)["sentiment"])


async def test_multi_label_target_gets_labels_by_threshold(tmp_path: Path) -> None:
    tasks = {"topics": {"upstream": "fake", "model": "m", "kind": "text", "threshold": 0.2,
                        "multi_label_targets": ["topic"]}}
    targets = {"topic": ["a", "b", "c", "d"], "tone": ["calm", "angry"]}
    with gateway_stack(tmp_path, tasks=tasks, targets=targets) as s:
        r = await post(s, "/classify", {"task": "topics", "input": ["x", "y"]})
    assert r.status_code == 200, r.text
    for text, result in zip(["x", "y"], r.json()["results"], strict=True):
        scores = expected_scores(text, targets)
        want = sorted((k for k, v in scores["topic"].items() if v >= 0.2),
                      key=lambda k: -scores["topic"][k])
        assert result["topic"]["labels"] == want and "label" not in result["topic"]
        assert result["tone"]["label"] == max(scores["tone"], key=scores["tone"].__getitem__)


# --------------------------------------------------------------------------- cache
async def test_repeated_inputs_never_reach_the_upstream(any_client_stack: GatewayStack) -> None:
    stack = any_client_stack
    first = await post(stack, "/classify", {"task": "sentiment", "input": texts(5)})
    assert first.headers["x-cache"] == "miss"
    await asyncio.sleep(0.2)  # the cache write is off the response path
    again = await post(stack, "/classify", {"task": "sentiment", "input": texts(5)})
    assert again.headers["x-cache"] == "hit"
    assert again.json()["results"] == first.json()["results"]
    assert len(stack.upstream.calls) == 1
    mixed = await post(stack, "/classify", {"task": "sentiment", "input": [*texts(5), "new one"]})
    assert mixed.headers["x-cache"] == "partial"
    assert stack.upstream.calls[-1].inputs == ["new one"]


async def test_duplicates_within_one_request_are_sent_once(stack: GatewayStack) -> None:
    r = await post(stack, "/classify", {"task": "sentiment", "input": ["a", "b", "a", "a"]})
    assert r.status_code == 200
    assert upstream_items(stack) == ["a", "b"]
    results = r.json()["results"]
    assert results[0] == results[2] == results[3] != results[1]


async def test_no_cache_header_skips_the_read(stack: GatewayStack) -> None:
    await post(stack, "/classify", {"task": "sentiment", "input": "fresh"})
    await asyncio.sleep(0.2)
    r = await post(stack, "/classify", {"task": "sentiment", "input": "fresh"},
                   headers={"Cache-Control": "no-cache"})
    assert r.headers["x-cache"] == "miss"
    assert len(stack.upstream.calls) == 2


async def test_key_order_of_a_conversation_does_not_matter(stack: GatewayStack) -> None:
    a = {"messages": [{"role": "user", "content": "same"}]}
    b = {"messages": [{"content": "same", "role": "user"}]}
    await post(stack, "/classify-chat", {"task": "intent", "input": a})
    await asyncio.sleep(0.2)
    r = await post(stack, "/classify-chat", {"task": "intent", "input": b})
    assert r.headers["x-cache"] == "hit"
    assert len(stack.upstream.calls) == 1


async def test_redis_killed_mid_test_requests_still_succeed(tmp_path: Path,
                                                            own_redis: RedisServer) -> None:
    with gateway_stack(tmp_path, redis_url=own_redis.url, redis_backoff_s=0.5) as s:
        assert (await post(s, "/classify", {"task": "sentiment", "input": "a"})).status_code == 200
        own_redis.kill()
        for i in range(3):
            r = await post(s, "/classify", {"task": "sentiment", "input": f"after {i}"})
            assert r.status_code == 200, r.text
            assert r.headers["x-cache"] == "miss"
        async with httpx.AsyncClient(base_url=s.url) as client:
            ready = await client.get("/readyz")
            metrics = (await client.get("/metrics")).text
        assert ready.status_code == 200 and ready.json()["cache"] == "degraded"
        assert 'gateway_cache_lookups_total{result="error",task="sentiment"}' in metrics


# --------------------------------------------------------------------------- batching
async def test_concurrent_single_item_requests_are_batched(tmp_path: Path) -> None:
    n, max_batch, slots = 64, 32, 4
    with gateway_stack(tmp_path, max_batch_items=max_batch, max_concurrent_batches=slots,
                       max_wait_ms=20) as s:
        s.upstream.delay_s = 0.3
        async with httpx.AsyncClient(base_url=s.url, timeout=10,
                                     limits=httpx.Limits(max_connections=n)) as client:
            rs = await asyncio.gather(*[
                client.post("/classify", json={"task": "sentiment", "input": f"item {i}"})
                for i in range(n)
            ])
    assert all(r.status_code == 200 for r in rs)
    for i, r in enumerate(rs):
        assert r.json()["results"][0]["sentiment"]["scores"] == pytest.approx(
            expected_scores(f"item {i}")["sentiment"])
    calls = len(s.upstream.calls)
    assert calls <= math.ceil(n / max_batch) + slots, calls
    assert sorted(upstream_items(s)) == sorted(f"item {i}" for i in range(n))
    assert max(len(c.inputs) for c in s.upstream.calls) <= max_batch


async def test_single_flight_across_requests(tmp_path: Path) -> None:
    with gateway_stack(tmp_path) as s:
        s.upstream.delay_s = 0.3
        async with httpx.AsyncClient(base_url=s.url, timeout=10) as client:
            rs = await asyncio.gather(*[
                client.post("/classify", json={"task": "sentiment", "input": ["shared", f"own {i}"]})
                for i in range(5)
            ])
    assert all(r.status_code == 200 for r in rs)
    assert upstream_items(s).count("shared") == 1
    assert len({str(r.json()["results"][0]) for r in rs}) == 1


async def test_single_flight_does_not_lend_a_shorter_deadline(tmp_path: Path) -> None:
    """Two tasks on one model share in-flight items; the impatient one's timeout must not fail
    the patient one, whose item is sent again under its own deadline."""
    model = "ft:classifier:test:sentiment"
    tasks = {"impatient": {"upstream": "fake", "model": model, "kind": "text", "timeout_s": 0.3},
             "patient": {"upstream": "fake", "model": model, "kind": "text", "timeout_s": 5}}
    with gateway_stack(tmp_path, tasks=tasks) as s:
        s.upstream.delay_s = 0.6
        async with httpx.AsyncClient(base_url=s.url, timeout=10) as client:
            impatient = asyncio.create_task(
                client.post("/classify", json={"task": "impatient", "input": "shared"}))
            await asyncio.sleep(0.1)  # in flight by now: the patient request joins it
            patient = await client.post("/classify", json={"task": "patient", "input": "shared"})
            assert (await impatient).status_code == 504
    assert patient.status_code == 200, patient.text
    assert patient.json()["results"][0]["sentiment"]["scores"] == pytest.approx(
        expected_scores("shared")["sentiment"])
    assert upstream_items(s) == ["shared", "shared"]


async def test_full_queue_answers_429_with_retry_after(tmp_path: Path) -> None:
    with gateway_stack(tmp_path, max_concurrent_batches=1, max_queue_items=2) as s:
        s.upstream.delay_s = 0.5
        async with httpx.AsyncClient(base_url=s.url, timeout=10) as client:
            busy = asyncio.create_task(
                client.post("/classify", json={"task": "sentiment", "input": "busy"}))
            await asyncio.sleep(0.15)
            r = await client.post("/classify", json={"task": "sentiment", "input": texts(3)})
            assert (await busy).status_code == 200
    assert r.status_code == 429
    assert r.headers["retry-after"] == "1"
    assert r.json()["error"]["type"] == "queue_full"


async def test_items_of_a_caller_that_went_away_are_not_sent(tmp_path: Path) -> None:
    with gateway_stack(tmp_path, max_concurrent_batches=1) as s:
        s.upstream.delay_s = 0.6
        async with httpx.AsyncClient(base_url=s.url, timeout=10) as client:
            busy = asyncio.create_task(
                client.post("/classify", json={"task": "sentiment", "input": "busy"}))
            await asyncio.sleep(0.15)
            with pytest.raises(httpx.ReadTimeout):
                await client.post("/classify", json={"task": "sentiment", "input": "abandoned"},
                                  timeout=0.2)
            assert (await busy).status_code == 200
            await asyncio.sleep(0.3)
    assert "abandoned" not in upstream_items(s)


# --------------------------------------------------------------------------- upstream trouble
async def test_retry_then_success(tmp_path: Path) -> None:
    with gateway_stack(tmp_path, retry_attempts=4) as s:
        # The first drop hits the kept-alive connection: the transport sends the request again
        # once on a new connection (the keep-alive race), where the second drop is a failed
        # attempt of the client's own.
        s.upstream.inject(Status(500), Status(429, retry_after=0.05), Drop(), Drop())
        r = await post(s, "/classify", {"task": "sentiment", "input": "x"})
        assert r.status_code == 200, r.text
        assert len(s.upstream.calls) >= 3  # a dropped connection may not be recorded
        async with httpx.AsyncClient(base_url=s.url) as client:
            metrics = (await client.get("/metrics")).text
    assert "gateway_upstream_retries_total 3.0" in metrics


async def test_an_upstream_behind_a_proxy_with_credentials(tmp_path: Path) -> None:
    with running_forward_proxy() as proxy:
        proxy_url = f"http://gw:pr0xy-s3cret@127.0.0.1:{proxy.port}"
        with gateway_stack(tmp_path, proxy=proxy_url) as s:
            r = await post(s, "/classify", {"task": "sentiment", "input": ["via the proxy"]})
            async with httpx.AsyncClient(base_url=s.url) as client:
                shown = (await client.get("/tasks/sentiment")).json()
            upstream_host = str(s.upstream.url).removeprefix("http://").rstrip("/")
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["sentiment"]["scores"] == pytest.approx(
        expected_scores("via the proxy")["sentiment"])
    assert upstream_host in proxy.targets  # the gateway went through the proxy...
    assert proxy.proxy_authorization[0] == "Basic " + base64.b64encode(b"gw:pr0xy-s3cret").decode()
    assert shown["upstream"]["proxy"] == f"http://***@127.0.0.1:{proxy.port}"  # ...and never shows
    assert "pr0xy-s3cret" not in str(shown)


async def test_upstream_rejection_is_502_without_retry(tmp_path: Path) -> None:
    with gateway_stack(tmp_path) as s:
        s.upstream.inject(Status(400))
        r = await post(s, "/classify", {"task": "sentiment", "input": "x"})
        assert len(s.upstream.calls) == 1
    assert r.status_code == 502
    assert r.json()["error"]["type"] == "upstream_rejected"


async def test_wrong_result_count_is_a_clear_502(tmp_path: Path) -> None:
    with gateway_stack(tmp_path) as s:
        s.upstream.inject(WrongCount(-1))
        r = await post(s, "/classify", {"task": "sentiment", "input": ["a", "b"]})
    assert r.status_code == 502
    assert "1 results for 2 inputs" in r.json()["error"]["message"]


async def test_upstream_overloaded_after_retries_is_503_with_retry_after(tmp_path: Path) -> None:
    with gateway_stack(tmp_path, retry_attempts=2) as s:
        s.upstream.inject(Status(429, retry_after=0.01), Status(429, retry_after=0.01))
        r = await post(s, "/classify", {"task": "sentiment", "input": "x"})
    assert r.status_code == 503
    assert "retry-after" in r.headers


async def test_timeout_is_504_naming_the_deadline(tmp_path: Path) -> None:
    tasks = {"sentiment": {**DEFAULT_TASKS["sentiment"], "timeout_s": 0.3}}
    with gateway_stack(tmp_path, tasks=tasks) as s:
        s.upstream.inject(Slow(3.0))
        started = time.monotonic()
        r = await post(s, "/classify", {"task": "sentiment", "input": "x"})
        elapsed = time.monotonic() - started
    assert r.status_code == 504, r.text
    # Whichever notices first (the upstream call or the waiting request) names the deadline.
    assert re.search(r"0\.[0-9]+ s (left of the request's )?deadline",
                     r.json()["error"]["message"]), r.text
    assert elapsed < 2.5  # did not wait for the slow upstream


async def test_circuit_opens_then_recovers(tmp_path: Path) -> None:
    with gateway_stack(tmp_path, retry_attempts=1, circuit_min_calls=2,
                       circuit_reset_s=0.5) as s:
        s.upstream.inject(Status(500), Status(500))
        for i in range(2):
            r = await post(s, "/classify", {"task": "sentiment", "input": f"f{i}"})
            assert r.status_code == 503
        calls = len(s.upstream.calls)
        r = await post(s, "/classify", {"task": "sentiment", "input": "while open"})
        assert r.status_code == 503 and "retry-after" in r.headers
        assert len(s.upstream.calls) == calls  # failed fast, never reached the upstream
        async with httpx.AsyncClient(base_url=s.url) as client:
            assert 'gateway_circuit_open{upstream="fake"} 1.0' in (await client.get("/metrics")).text
            assert (await client.get("/readyz")).json()["circuits_open"] == ["fake"]
        await asyncio.sleep(0.6)
        r = await post(s, "/classify", {"task": "sentiment", "input": "after reset"})
        assert r.status_code == 200
        r = await post(s, "/classify", {"task": "sentiment", "input": "closed again"})
        assert r.status_code == 200


async def test_upstream_key_is_sent_and_never_echoed(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "sk-upstream-secret-123"
    monkeypatch.setenv("TEST_UPSTREAM_KEY", secret)
    with gateway_stack(tmp_path, api_key_env="TEST_UPSTREAM_KEY") as s:
        ok = await post(s, "/classify", {"task": "sentiment", "input": "x"})
        s.upstream.inject(Status(401))
        bad = await post(s, "/classify", {"task": "sentiment", "input": "y"})
        async with httpx.AsyncClient(base_url=s.url) as client:
            listing = (await client.get("/tasks")).text
            metrics = (await client.get("/metrics")).text
    assert ok.status_code == 200
    assert s.upstream.calls[0].authorization == f"Bearer {secret}"
    assert bad.status_code == 502
    for text in (bad.text, listing, metrics):
        assert secret not in text
    assert "TEST_UPSTREAM_KEY" in listing


# --------------------------------------------------------------------------- validation and limits
@pytest.mark.parametrize(("body", "status", "needle"), [
    ({"task": "nope", "input": "x"}, 404, "known tasks: intent, sentiment"),
    ({"task": "intent", "input": "x"}, 400, "/classify-chat"),
    ({"task": "sentiment"}, 422, "`input` is missing"),
    ({"task": "sentiment", "input": 5}, 422,
     "`input` must be a string or a list of strings, not a number (5)"),
    ({"task": "sentiment", "input": []}, 422, "input is empty"),
    ({"task": "sentiment", "input": ["ok", ""]}, 422, "input[1] is an empty string"),
    ({"task": "sentiment", "input": ["x"] * 129}, 413, "limit is 128"),
    ({"task": "sentiment", "input": "y" * 40_000}, 413, "limit is 32768"),
])
async def test_bad_input_gets_a_clear_4xx(stack: GatewayStack, body: Any, status: int,
                                          needle: str) -> None:
    r = await post(stack, "/classify", body)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]
    assert stack.upstream.calls == []


async def test_every_422_carries_the_detail_list(stack: GatewayStack) -> None:
    for body in ({"task": "sentiment"}, {"task": "sentiment", "input": []},
                 {"task": "sentiment", "input": ["ok", ""]}):
        r = await post(stack, "/classify", body)
        assert r.status_code == 422
        assert r.json()["detail"][0]["loc"][:2] == ["body", "input"], r.text


async def test_body_too_large_is_413(tmp_path: Path) -> None:
    with gateway_stack(tmp_path, max_body_bytes=1000) as s:
        r = await post(s, "/classify", {"task": "sentiment", "input": "z" * 2000})
    assert r.status_code == 413
    assert "1000 bytes" in r.json()["error"]["message"]


async def test_chat_with_bad_role_is_422(stack: GatewayStack) -> None:
    r = await post(stack, "/classify-chat",
                   {"task": "intent", "input": {"messages": [{"role": "robot", "content": "x"}]}})
    assert r.status_code == 422
    assert r.json()["error"]["message"] == (
        "`input.messages[0].role` must be 'system', 'user', 'assistant' or 'tool', not 'robot'")


@pytest.mark.parametrize(("route", "body", "message"), [
    ("/classify", {"task": "sentiment", "input": ["ok", 3]},
     "`input[1]` must be a string, not a number (3)"),
    ("/classify-chat", {"task": "intent", "input": "hello"},
     '`input` must be a conversation ({"messages": [...]}) or a list of conversations, not a '
     "string ('hello')"),
    ("/classify-chat", {"task": "intent", "input": [{"messages": [{"role": "user", "content": 5}]}]},
     "`input[0].messages[0].content` must be a string or a list of objects, not a number (5)"),
    ("/classify", {"task": "sentiment", "input": "x", "modle": "m"}, "`modle` is not a field here"),
    ("/v1/classifications", {"input": "x"}, "`model` is missing"),
])
async def test_a_422_says_in_plain_words_which_field_which_item_and_what_was_expected(
        stack: GatewayStack, route: str, body: Any, message: str) -> None:
    """Not pydantic's `input.str: Input should be a valid string; input.list[str].1: ...` or
    `input.Conversation.messages.0.role`; the `detail` list keeps pydantic's entries."""
    r = await post(stack, route, body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["message"] == message
    assert r.json()["detail"]


# --------------------------------------------------------------------------- auth
async def test_client_keys(tmp_path: Path) -> None:
    with gateway_stack(tmp_path, api_keys="alpha-key,beta-key") as s:
        async with httpx.AsyncClient(base_url=s.url) as client:
            body = {"task": "sentiment", "input": "x"}
            none = await client.post("/classify", json=body)
            wrong = await client.post("/classify", json=body,
                                      headers={"Authorization": "Bearer alpha"})
            right = await client.post("/classify", json=body,
                                      headers={"Authorization": "Bearer beta-key"})
            tasks = await client.get("/tasks")
            health = await client.get("/healthz")
            metrics = await client.get("/metrics")
    assert none.status_code == wrong.status_code == tasks.status_code == 401
    assert "alpha" not in wrong.text and "beta" not in wrong.text
    assert right.status_code == 200
    assert health.status_code == 200 and metrics.status_code == 200


async def test_client_keys_from_a_file(tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("# comment\nfile-key-1\n\nfile-key-2\n")
    with gateway_stack(tmp_path, api_keys=str(keys)) as s:
        ok = await post(s, "/classify", {"task": "sentiment", "input": "x"},
                        headers={"Authorization": "Bearer file-key-2"})
        bad = await post(s, "/classify", {"task": "sentiment", "input": "x"})
    assert ok.status_code == 200 and bad.status_code == 401


# --------------------------------------------------------------------------- registry
async def test_tasks_listing_and_hot_reload(tmp_path: Path) -> None:
    with gateway_stack(tmp_path) as s:
        async with httpx.AsyncClient(base_url=s.url) as client:
            listing = (await client.get("/tasks")).json()
            assert [t["name"] for t in listing["tasks"]] == ["intent", "sentiment"]
            one = (await client.get("/tasks/sentiment")).json()
            assert one["model"] == "ft:classifier:test:sentiment" and one["kind"] == "text"
            assert (await client.get("/tasks/none")).status_code == 404

            s.set_tasks({**DEFAULT_TASKS, "spam": {"upstream": "fake", "model": "ft:spam"}})
            for _ in range(50):
                await asyncio.sleep(0.05)
                r = await client.post("/classify", json={"task": "spam", "input": "buy now"})
                if r.status_code == 200:
                    break
            assert r.status_code == 200, r.text
            assert s.upstream.calls[-1].model == "ft:spam"

            # write_text truncates, then writes: the watcher may read the empty file first and
            # report that (a write in progress), then the broken one; wait for the last word.
            s.tasks_file.write_text("tasks: {broken: {kind: nope}}\n")
            for _ in range(50):
                await asyncio.sleep(0.05)
                listing = (await client.get("/tasks")).json()
                if "tasks.broken" in (listing["last_reload_error"] or ""):
                    break
            assert "tasks.broken" in listing["last_reload_error"]
            assert (await client.post("/classify", json={"task": "spam", "input": "again"})
                    ).status_code == 200


# --------------------------------------------------------------------------- metrics and health
async def test_metrics_carry_the_documented_series(stack: GatewayStack) -> None:
    await post(stack, "/classify", {"task": "sentiment", "input": ["m1", "m2"]})
    await post(stack, "/classify", {"task": "made-up-task", "input": "x"})
    await asyncio.sleep(0.1)
    async with httpx.AsyncClient(base_url=stack.url) as client:
        text = (await client.get("/metrics")).text
        ready = await client.get("/readyz")
    for series in (
        'gateway_requests_total{route="/classify",status="200",task="sentiment"} 1.0',
        'gateway_requests_total{route="/classify",status="404",task="unknown"} 1.0',
        'gateway_request_duration_seconds_count{route="/classify",task="sentiment"} 1.0',
        'gateway_upstream_requests_total{endpoint="classifications",status="200",upstream="fake"} 1.0',
        'gateway_upstream_duration_seconds_count{endpoint="classifications",upstream="fake"} 1.0',
        'gateway_batch_size_bucket{endpoint="classifications",le="2.0",upstream="fake"} 1.0',
        "gateway_batch_wait_seconds_count 2.0",
        "gateway_queue_depth 0.0",
        'gateway_cache_lookups_total{result="miss",task="sentiment"} 2.0',
        "gateway_upstream_retries_total 0.0",
        "gateway_inflight_requests 0.0",
    ):
        assert series in text, series
    assert "made-up-task" not in text
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


async def test_a_failed_batch_fails_the_request_at_once_and_drops_its_queued_items(
        tmp_path: Path) -> None:
    with gateway_stack(tmp_path, max_batch_items=2, max_concurrent_batches=1) as s:
        s.upstream.inject(Status(400))  # the first batch is rejected; later ones would succeed
        s.upstream.delay_s = 0.3
        started = time.monotonic()
        r = await post(s, "/classify", {"task": "sentiment", "input": texts(6)})
        elapsed = time.monotonic() - started
        await asyncio.sleep(0.5)
    assert r.status_code == 502, r.text
    assert elapsed < 0.55  # one upstream call's time, not three
    assert len(s.upstream.calls) == 1  # the other two batches were never sent


async def test_items_queued_during_a_reload_go_to_the_upstream_configured_when_they_leave(
        tmp_path: Path) -> None:
    with running_fake_upstream() as second, \
            gateway_stack(tmp_path, max_concurrent_batches=1) as s:
        s.upstream.delay_s = 0.6
        tasks = {**DEFAULT_TASKS, "other": {"upstream": "fake", "model": "ft:other"}}
        s.set_tasks(tasks)
        async with httpx.AsyncClient(base_url=s.url, timeout=10) as client:
            busy = asyncio.create_task(
                client.post("/classify", json={"task": "sentiment", "input": "in flight"}))
            await asyncio.sleep(0.15)
            queued = asyncio.create_task(
                client.post("/classify", json={"task": "sentiment", "input": "queued"}))
            await asyncio.sleep(0.05)
            write_tasks(s.tasks_file, str(second.url), tasks)  # re-point upstream "fake"
            await asyncio.sleep(0.3)  # polled every 0.1 s
            # Another model on the re-pointed upstream gets the new client; the old one retires.
            other = await client.post("/classify", json={"task": "other", "input": "x"})
            results = [await busy, await queued]
    assert other.status_code == 200
    assert [r.status_code for r in results] == [200, 200], [r.text for r in results]
    assert [c.inputs for c in s.upstream.calls] == [["in flight"]]
    assert sorted(c.inputs[0] for c in second.calls) == ["queued", "x"]


async def test_a_client_gone_while_sending_its_body_is_counted_499(stack: GatewayStack) -> None:
    host, port = stack.url.removeprefix("http://").split(":")
    _reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n{\"task\": \"sentiment\"")
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    async with httpx.AsyncClient(base_url=stack.url) as client:
        for _ in range(50):
            text = (await client.get("/metrics")).text
            if 'status="499"' in text:
                break
            await asyncio.sleep(0.05)
    assert 'gateway_requests_total{route="/classify",status="499",task="unknown"} 1.0' in text
    assert stack.upstream.calls == []


@pytest.mark.parametrize("message", [
    {"role": "user", "content": [{"type": "text", "text": "hi", "n": 2**70}]},
    {"role": "user", "content": "hi", "extra": [1, -(2**80)]},  # extra keys are sent on too
])
async def test_an_integer_beyond_64_bits_anywhere_in_a_conversation_is_a_422(
        stack: GatewayStack, message: dict[str, Any]) -> None:
    body = {"model": "ft:classifier:test:intent", "input": [{"messages": [message]}]}
    r = await post(stack, "/v1/chat/classifications", body)
    assert r.status_code == 422, r.text
    assert "keep integers within 64 bits" in r.text
    assert stack.upstream.calls == []
