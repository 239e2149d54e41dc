"""Slow and stalled clients against the gateway's own server (issue 10, item 4).

Before: 250 connections stopped in the middle of their head or body stayed open indefinitely, and
nothing bounded how many were open. Now: 408 and close after GATEWAY_HEAD_TIMEOUT_S or
GATEWAY_BODY_TIMEOUT_S, a connection that sends nothing is closed, and at
GATEWAY_MAX_OPEN_CONNECTIONS the longest-waiting connection makes room for a new one, so clients
that do send their requests are served throughout.
"""

from __future__ import annotations

import asyncio
import select
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx

from tests.support.gateway import gateway_stack
from tests.support.shutdown_load import classify_request

SLOW = 20  # of each kind: stalled head, stalled body, silent
BOUND = 40
TIMEOUT_S = 0.5
# Generous: the timeouts are 0.5 s; the bound is only that nothing stays open indefinitely.
ALL_CLOSED_WITHIN_S = 10.0


async def stalled(port: int, kind: str) -> bytes:
    """Open a connection, send part of a request (or nothing), and return what the gateway
    answers before it closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = classify_request("slow")
    if kind == "head":
        writer.write(request[:40])  # in the middle of the headers
    elif kind == "body":
        writer.write(request[:-10])  # all headers, most of the body
    await writer.drain()
    try:
        return await reader.read()  # to EOF: the gateway must close
    finally:
        writer.close()


async def test_stalled_clients_are_timed_out_and_do_not_starve_others(tmp_path: Path) -> None:
    with gateway_stack(tmp_path, gateway_server=True, head_timeout_s=TIMEOUT_S,
                       body_timeout_s=TIMEOUT_S, max_open_connections=BOUND) as s:
        port = s.server.port
        slow = [asyncio.create_task(stalled(port, kind))
                for kind in ("head", "body") for _ in range(SLOW)]
        await asyncio.sleep(0.1)  # 40 connections, each with part of a request: at the bound
        slow += [asyncio.create_task(stalled(port, "silent")) for _ in range(SLOW)]
        await asyncio.sleep(0.1)  # 20 over the bound: the oldest waiters were evicted
        statuses = []
        for i in range(20):  # a new connection per request, while the stalled ones hold on
            async with httpx.AsyncClient(base_url=s.url, timeout=5) as client:
                r = await client.post("/classify", json={"task": "sentiment", "input": f"ok {i}"})
                statuses.append(r.status_code)
        answers = await asyncio.wait_for(asyncio.gather(*slow), ALL_CLOSED_WITHIN_S)
    assert statuses == [200] * 20
    heads, bodies, silent = answers[:SLOW], answers[SLOW:2 * SLOW], answers[2 * SLOW:]
    for answer in heads + bodies:
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert b"connection: close" in answer.lower() and b"request_timeout" in answer
    assert silent == [b""] * SLOW  # nothing was asked: closed without an answer


def drip_second_request(port: int) -> bytes:
    """One request on a keep-alive connection, then the next head a byte every TIMEOUT_S / 10, until
    the gateway answers; returns that answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=ALL_CLOSED_WITHIN_S) as sock:
        sock.sendall(classify_request("first"))
        first = b""
        while b"}]}" not in first:  # the end of the first response's body
            first += sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200"), first
        for byte in b"POST /classify HTTP/1.1\r\nhost: 127.0.0.1\r\n":  # never a whole head
            if select.select([sock], [], [], TIMEOUT_S / 10)[0]:
                break  # the gateway answered: stop before a write meets a closed socket
            sock.sendall(bytes([byte]))
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


async def test_a_keep_alive_connection_dripping_its_next_head_is_timed_out(tmp_path: Path) -> None:
    with gateway_stack(tmp_path, gateway_server=True, head_timeout_s=TIMEOUT_S) as s:
        answer = await asyncio.to_thread(drip_second_request, s.server.port)
    assert answer.startswith(b"HTTP/1.1 408 "), answer


HUGE = 80 * 1024 * 1024  # past the 64 MiB the front door reads and drops before answering


async def test_an_80_mb_body_gets_its_413_not_a_reset(tmp_path: Path) -> None:
    """Past 64 MiB the gateway answers 413 without reading the rest of the body and closes. It used
    to close at once, with the client still sending: the kernel reset the connection, dropping the
    413 on the way, and the client saw `Connection reset by peer`. Now it sends the 413, then FIN,
    and reads and drops the rest until the client has read its answer and closed."""
    body = b'{"task": "sentiment", "input": "' + b"x" * HUGE + b'"}'

    async def chunked() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 1 << 20):
            yield body[start:start + (1 << 20)]

    with gateway_stack(tmp_path, gateway_server=True) as s:
        for headers in ({}, {"connection": "close"}):
            for streamed in (False, True):
                async with httpx.AsyncClient(base_url=s.url, timeout=30) as client:
                    r = await client.post("/classify", content=chunked() if streamed else body,
                                          headers={**headers, "content-type": "application/json"})
                assert r.status_code == 413, (headers, streamed, r.text)
                assert r.json()["error"]["type"] == "payload_too_large"
                assert r.headers["connection"] == "close"
        async with httpx.AsyncClient(base_url=s.url, timeout=5) as client:  # and it still serves
            r = await client.post("/classify", json={"task": "sentiment", "input": "ok"})
        assert r.status_code == 200


def test_a_client_that_stops_sending_an_oversized_body_is_closed_after_its_body_timeout(
        tmp_path: Path) -> None:
    """The linger after a 413 is bounded by GATEWAY_BODY_TIMEOUT_S: a client that declares 100 MB,
    sends 1 MB and stops reads its 413 and the gateway's FIN at once, and the connection is gone
    once the timeout has passed."""
    with gateway_stack(tmp_path, gateway_server=True, body_timeout_s=TIMEOUT_S) as s, \
            socket.create_connection(("127.0.0.1", s.server.port), timeout=5) as sock:
        sock.sendall(b"POST /classify HTTP/1.1\r\nhost: 127.0.0.1\r\n"
                     b"content-type: application/json\r\ncontent-length: 100000000\r\n\r\n"
                     + b"x" * (1 << 20))
        answer = b""
        while chunk := sock.recv(65536):  # to the gateway's FIN, with the body unfinished
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 413 "), answer
        assert b"payload_too_large" in answer
        time.sleep(TIMEOUT_S * 4)
        try:  # the gateway has closed its end: what is sent now is refused
            for _ in range(20):
                sock.sendall(b"x" * 65536)
                time.sleep(0.05)
        except (BrokenPipeError, ConnectionResetError):
            pass
        else:
            raise AssertionError("the connection outlived its body timeout")
