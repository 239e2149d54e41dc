"""A flaky, dead, recovering or rate-limiting upstream behind a real gateway (issue 10, item 1).

Before: with 30% of upstream calls answering 500 at random, 65% of requests failed (the breaker
counted every failed attempt and opened after 5 in a row), and a 429 fed the breaker too. The
bounds below are the issue's targets; bench/faults.py measures the same things at larger scale.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

import httpx

from tests.support.fake_upstream import Status
from tests.support.gateway import GatewayStack, gateway_stack
from tests.support.waits import stretched

CONCURRENCY = 8


async def load(stack: GatewayStack, count: int, tag: str) -> list[httpx.Response]:
    """`count` single-text requests, `CONCURRENCY` at a time, every text new (no cache)."""
    queue = list(range(count))
    answers: list[httpx.Response] = []

    async def worker(client: httpx.AsyncClient) -> None:
        while queue:
            i = queue.pop()
            answers.append(await client.post("/classify", json={"task": "sentiment",
                                                                "input": f"{tag} {i}"}))

    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as client:
        await asyncio.gather(*(worker(client) for _ in range(CONCURRENCY)))
    return answers


async def metric(stack: GatewayStack, needle: str) -> float:
    async with httpx.AsyncClient(base_url=stack.url) as client:
        text = (await client.get("/metrics")).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(needle))


async def test_30_percent_random_5xx_costs_under_1_percent_and_never_opens(tmp_path: Path) -> None:
    with gateway_stack(tmp_path) as s:  # the defaults: 5 attempts, budget 0.5, rate 0.5 of >= 5
        s.upstream.fault_rate = 0.3
        answers = await load(s, 300, "flaky")
        fast_fails = await metric(s, 'gateway_upstream_requests_total{endpoint="classifications"'
                                     ',status="circuit_open"')
    ok = sum(r.status_code == 200 for r in answers)
    assert ok / len(answers) >= 0.99, {r.status_code for r in answers}
    assert fast_fails == 0  # the circuit never opened


async def test_a_dead_upstream_opens_within_1_s_fails_fast_and_recovers(tmp_path: Path) -> None:
    reset_s = 1.0
    with gateway_stack(tmp_path, circuit_reset_s=reset_s) as s:
        await load(s, CONCURRENCY, "warm")  # connections and first-request costs out of the way
        s.upstream.fault_rate = 1.0
        started = time.monotonic()
        opened_at = None
        async with httpx.AsyncClient(base_url=s.url, timeout=30) as client:
            while opened_at is None and time.monotonic() - started < 5:
                await load(s, CONCURRENCY, "dead")
                if (await client.get("/readyz")).json()["circuits_open"] == ["fake"]:
                    opened_at = time.monotonic()
            # Within 1 s on an idle machine; a loaded one (a CI run at load 8 took 1.3 s)
            # stretches it as every wait in the suite is (tests/support/waits.py).
            assert opened_at is not None and opened_at - started < stretched(1.0)
            latencies = []
            for i in range(20):  # misses while open: 503 + Retry-After, without the upstream
                sent = time.monotonic()
                r = await client.post("/classify", json={"task": "sentiment", "input": f"ff {i}"})
                latencies.append(time.monotonic() - sent)
                assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, r.text
            assert statistics.median(latencies) < stretched(0.05)
            s.upstream.fault_rate = 0.0  # the upstream is back
            back = time.monotonic()
            while True:
                r = await client.post("/classify", json={"task": "sentiment", "input": "back?"})
                if r.status_code == 200:
                    break
                assert time.monotonic() - back < reset_s + 2.0, r.text
                await asyncio.sleep(0.05)


async def test_a_dead_upstream_gets_at_most_its_retry_budget_more(tmp_path: Path) -> None:
    # The circuit is kept shut (min_calls out of reach) to see the budget alone: 200 calls with 5
    # attempts each would be 1,000 attempts; the budget allows 0.5 x calls plus a floor of 10/s
    # over its 10 s window (Finagle's), 100 retries, within the few seconds this takes.
    with gateway_stack(tmp_path, circuit_min_calls=1_000_000, batching=False) as s:
        s.upstream.fault_rate = 1.0
        answers = await load(s, 200, "budget")
        throttled = await metric(s, "gateway_upstream_retries_throttled_total")
    assert {r.status_code for r in answers} == {503}
    assert len(s.upstream.calls) <= 200 * 1.5 + 100
    assert throttled > 0


async def test_429_is_backpressure_waited_out_and_never_opens_the_circuit(tmp_path: Path) -> None:
    with gateway_stack(tmp_path, circuit_min_calls=2, batching=False) as s:
        s.upstream.inject(*[Status(429, retry_after=0.3)] * 12)
        answers = await load(s, 8, "busy")
        async with httpx.AsyncClient(base_url=s.url) as client:
            circuits = (await client.get("/readyz")).json()["circuits_open"]
    assert [r.status_code for r in answers] == [200] * 8  # each waited its Retry-After, then got in
    assert circuits == []
