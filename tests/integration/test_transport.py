"""PooledTransport over real loopback sockets: a real uvicorn server for the normal path, scripted
asyncio servers for the misbehaviour a real server will not produce on demand."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import orjson
import pytest

from service.gateway.transport import PooledTransport
from tests.support.redis_tls import self_signed_cert
from tests.support.servers import ThreadedServer, serve

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
TIMEOUTS = {"connect": 2.0, "read": 2.0, "write": 2.0, "pool": 2.0}


async def echo_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Echoes the body and names the client's port, so tests can count connections."""
    if scope["type"] != "http":
        return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    delay = float(dict(scope["headers"]).get(b"x-delay", b"0"))
    if delay:
        await asyncio.sleep(delay)
    payload = orjson.dumps({"method": scope["method"], "path": scope["path"],
                            "query": scope["query_string"].decode(), "port": scope["client"][1],
                            "body": body.decode()})
    await send({"type": "http.response.start", "status": 201,
                "headers": [(b"content-type", b"application/json"), (b"x-echo", b"yes"),
                            (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload if scope["method"] != "HEAD" else b""})


@pytest.fixture(scope="module")
def echo() -> Iterator[ThreadedServer]:
    with serve(echo_app, lifespan="off") as server:
        yield server


def request(url: str, body: bytes = b"{}", method: str = "POST",
            **timeouts: float | None) -> httpx.Request:
    headers = {"content-type": "application/json"}
    return httpx.Request(method, url, headers=headers, content=body,
                         extensions={"timeout": {**TIMEOUTS, **timeouts}})


async def send(transport: PooledTransport, req: httpx.Request) -> httpx.Response:
    response = await transport.handle_async_request(req)
    await response.aread()
    return response


@contextlib.asynccontextmanager
async def scripted(script: Script) -> AsyncIterator[str]:
    """A raw TCP server on a free port that plays `script` on every connection."""
    server = await asyncio.start_server(script, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head + await reader.readexactly(length)


OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


async def test_round_trip_status_headers_body_and_url(echo: ThreadedServer) -> None:
    transport = PooledTransport()
    try:
        response = await send(transport, request(f"{echo.url}/v1/classifications?x=1", b'{"a":1}'))
    finally:
        await transport.aclose()
    assert response.status_code == 201
    assert response.reason_phrase == "Created"
    assert response.headers["x-echo"] == "yes"
    assert response.http_version == "HTTP/1.1"
    echoed = response.json()
    assert echoed["method"] == "POST"
    assert echoed["path"] == "/v1/classifications"
    assert echoed["query"] == "x=1"
    assert echoed["body"] == '{"a":1}'


async def test_sequential_requests_reuse_one_connection(echo: ThreadedServer) -> None:
    transport = PooledTransport()
    try:
        ports = {(await send(transport, request(echo.url))).json()["port"] for _ in range(20)}
    finally:
        await transport.aclose()
    assert len(ports) == 1


async def test_concurrency_is_capped_by_max_connections(echo: ThreadedServer) -> None:
    transport = PooledTransport(limits=httpx.Limits(max_connections=2))
    slow = [request(echo.url) for _ in range(6)]
    for req in slow:
        req.headers["x-delay"] = "0.1"
    try:
        responses = await asyncio.gather(*(send(transport, req) for req in slow))
    finally:
        await transport.aclose()
    assert all(r.status_code == 201 for r in responses)
    assert len({r.json()["port"] for r in responses}) == 2


async def test_pool_timeout_when_every_connection_is_busy(echo: ThreadedServer) -> None:
    transport = PooledTransport(limits=httpx.Limits(max_connections=1))
    slow = request(echo.url)
    slow.headers["x-delay"] = "0.5"
    try:
        first = asyncio.ensure_future(send(transport, slow))
        await asyncio.sleep(0.05)
        with pytest.raises(httpx.PoolTimeout):
            await send(transport, request(echo.url, pool=0.05))
        assert (await first).status_code == 201
        # The slot came back: the next request goes through.
        assert (await send(transport, request(echo.url))).status_code == 201
    finally:
        await transport.aclose()


async def test_idle_connections_expire(echo: ThreadedServer) -> None:
    transport = PooledTransport(limits=httpx.Limits(keepalive_expiry=0.05))
    try:
        first = (await send(transport, request(echo.url))).json()["port"]
        await asyncio.sleep(0.15)
        second = (await send(transport, request(echo.url))).json()["port"]
    finally:
        await transport.aclose()
    assert first != second


async def test_streamed_body_is_sent_chunked(echo: ThreadedServer) -> None:
    async def parts() -> AsyncIterator[bytes]:
        yield b'{"a":'
        yield b"1}"

    req = httpx.Request("POST", echo.url, content=parts(), extensions={"timeout": TIMEOUTS})
    transport = PooledTransport()
    try:
        response = await send(transport, req)
    finally:
        await transport.aclose()
    assert response.json()["body"] == '{"a":1}'


async def test_head_request_completes_without_a_body(echo: ThreadedServer) -> None:
    transport = PooledTransport()
    try:
        response = await send(transport, request(echo.url, b"", method="HEAD"))
        after = await send(transport, request(echo.url))
    finally:
        await transport.aclose()
    assert response.status_code == 201
    assert response.content == b""
    assert after.status_code == 201


async def test_chunked_and_close_delimited_bodies() -> None:
    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                     b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n")
        await writer.drain()
        await read_request(reader)  # kept alive: the same connection serves a second request
        writer.write(OK)
        await writer.drain()
        writer.close()

    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nall of it")
        await writer.drain()
        writer.close()

    transport = PooledTransport()
    try:
        async with scripted(chunked) as url:
            assert (await send(transport, request(url))).content == b"abcdefg"
            assert (await send(transport, request(url))).content == b"{}"
        async with scripted(until_close) as url:
            assert (await send(transport, request(url))).content == b"all of it"
    finally:
        await transport.aclose()


async def test_connection_refused_is_a_connect_error() -> None:
    async def never(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise AssertionError("nothing may connect")

    async with scripted(never) as url:
        pass  # closed: nothing listens on that port any more
    transport = PooledTransport()
    try:
        with pytest.raises(httpx.ConnectError) as caught:
            await send(transport, request(url))
    finally:
        await transport.aclose()
    assert caught.value.request.url == httpx.URL(url)


async def test_read_timeout_and_the_connection_is_not_reused() -> None:
    connections = 0

    async def silent_then_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await read_request(reader)
        if connections == 1:
            await asyncio.sleep(1)  # never answers in time
            return
        writer.write(OK)
        await writer.drain()

    # One slot: had the timed-out connection kept it, the second request would time out in the pool.
    transport = PooledTransport(limits=httpx.Limits(max_connections=1))
    try:
        async with scripted(silent_then_ok) as url:
            with pytest.raises(httpx.ReadTimeout):
                await send(transport, request(url, read=0.1))
            assert (await send(transport, request(url))).status_code == 200
    finally:
        await transport.aclose()
    assert connections == 2


async def test_a_reused_connection_closed_by_the_server_is_retried_once() -> None:
    """The keep-alive race: the server closes an idle connection just as it is reused."""
    connections = 0

    async def one_answer_per_connection(reader: asyncio.StreamReader,
                                        writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await read_request(reader)
        writer.write(OK)  # says keep-alive...
        await writer.drain()
        await read_request(reader)  # ...but drops the next request unanswered
        writer.transport.abort()

    transport = PooledTransport(limits=httpx.Limits(max_connections=1))
    try:
        async with scripted(one_answer_per_connection) as url:
            assert (await send(transport, request(url))).status_code == 200
            assert (await send(transport, request(url))).status_code == 200
    finally:
        await transport.aclose()
    assert connections == 2


async def test_a_fresh_connection_closed_without_an_answer_is_a_read_error() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.transport.abort()

    transport = PooledTransport(limits=httpx.Limits(max_connections=1))
    try:
        async with scripted(hang_up) as url:
            for _ in range(3):  # each failure gives its connection's slot back
                with pytest.raises(httpx.ReadError):
                    await send(transport, request(url, pool=0.5))
    finally:
        await transport.aclose()


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part",  # then the server hangs up
    b"NOT HTTP AT ALL\r\n\r\n",
])
async def test_broken_answers_are_protocol_errors(answer: bytes) -> None:
    async def broken(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer)
        await writer.drain()
        writer.close()

    transport = PooledTransport()
    try:
        async with scripted(broken) as url:
            with pytest.raises(httpx.RemoteProtocolError):
                await send(transport, request(url))
    finally:
        await transport.aclose()


async def test_oversized_body_is_refused() -> None:
    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5000\r\n\r\n" + b"x" * 5000)
        await writer.drain()

    transport = PooledTransport(max_response_bytes=1000)
    try:
        async with scripted(big) as url:
            with pytest.raises(httpx.RemoteProtocolError, match="exceeds 1000 bytes"):
                await send(transport, request(url))
    finally:
        await transport.aclose()


async def test_interim_100_continue_is_skipped() -> None:
    async def interim(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" + OK)
        await writer.drain()

    transport = PooledTransport()
    try:
        async with scripted(interim) as url:
            response = await send(transport, request(url))
    finally:
        await transport.aclose()
    assert response.status_code == 200
    assert response.content == b"{}"


async def test_closed_transport_refuses_requests(echo: ThreadedServer) -> None:
    transport = PooledTransport()
    await send(transport, request(echo.url))
    await transport.aclose()
    with pytest.raises(httpx.ConnectError, match="closed"):
        await send(transport, request(echo.url))


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed_cert(tmp_path_factory.mktemp("tls"), "localhost", "DNS:localhost")


async def test_https_verifies_the_server(tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    with serve(echo_app, lifespan="off", ssl_certfile=str(cert), ssl_keyfile=str(key)) as server:
        url = f"https://localhost:{server.port}/v1/classifications"
        trusting = PooledTransport(ssl_context=ssl.create_default_context(cafile=str(cert)))
        default = PooledTransport()  # certifi's bundle does not know this certificate
        try:
            response = await send(trusting, request(url, b'{"tls":true}'))
            assert response.json()["body"] == '{"tls":true}'
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await send(default, request(url))
        finally:
            await trusting.aclose()
            await default.aclose()


# ------------------------------------------------------------------------------ pool fairness
async def test_a_wakeup_is_not_lost_when_the_woken_request_gives_up(echo: ThreadedServer) -> None:
    """A, B and C share one connection; B is handed A's connection and cancelled in the same
    instant: C must get the connection, not wait out its pool timeout."""
    transport = PooledTransport(limits=httpx.Limits(max_connections=1))
    slow = request(echo.url)
    slow.headers["x-delay"] = "0.2"
    try:
        a = asyncio.ensure_future(send(transport, slow))
        await asyncio.sleep(0.05)
        b = asyncio.ensure_future(send(transport, request(echo.url)))
        await asyncio.sleep(0.01)
        c = asyncio.ensure_future(send(transport, request(echo.url, pool=1.0)))
        await asyncio.sleep(0.01)
        release = transport._release

        def release_then_cancel_b(connection: Any) -> None:
            release(connection)  # hands the connection to B...
            b.cancel()  # ...which gives up before it runs

        transport._release = release_then_cancel_b  # type: ignore[method-assign]
        assert (await a).status_code == 201
        transport._release = release  # type: ignore[method-assign]
        with pytest.raises(asyncio.CancelledError):
            await b
        assert (await c).status_code == 201
    finally:
        await transport.aclose()


async def test_waiting_requests_are_served_first_come_first_served(echo: ThreadedServer) -> None:
    """A caller sending back to back cannot starve one that is waiting for the only connection."""
    transport = PooledTransport(limits=httpx.Limits(max_connections=1))
    stop = asyncio.Event()
    busy_count = 0

    async def busy() -> None:
        nonlocal busy_count
        while not stop.is_set():
            await send(transport, request(echo.url))
            busy_count += 1

    try:
        hog = asyncio.ensure_future(busy())
        await asyncio.sleep(0.05)
        waiting = await send(transport, request(echo.url, pool=1.0))
        stop.set()
        await hog
    finally:
        await transport.aclose()
    assert waiting.status_code == 201
    assert busy_count >= 1


async def test_idle_connections_of_another_origin_do_not_block(echo: ThreadedServer) -> None:
    transport = PooledTransport(limits=httpx.Limits(max_connections=1))
    try:
        assert (await send(transport, request(echo.url))).status_code == 201
        other = echo.url.replace("127.0.0.1", "localhost")
        assert (await send(transport, request(other, pool=1.0))).status_code == 201
    finally:
        await transport.aclose()


async def test_aclose_fails_waiting_requests_and_lets_running_ones_finish(
        echo: ThreadedServer) -> None:
    transport = PooledTransport(limits=httpx.Limits(max_connections=1))
    slow = request(echo.url)
    slow.headers["x-delay"] = "0.2"
    running = asyncio.ensure_future(send(transport, slow))
    await asyncio.sleep(0.05)
    waiting = asyncio.ensure_future(send(transport, request(echo.url)))
    await asyncio.sleep(0.01)
    await transport.aclose()
    with pytest.raises(httpx.ConnectError, match="closed"):
        await waiting
    assert (await running).status_code == 201


async def test_a_tls_peer_that_never_confirms_the_close_does_not_hold_the_slot(
        tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)

    async def answer_then_go_deaf(reader: asyncio.StreamReader,
                                  writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK)
        await writer.drain()
        cast(asyncio.Transport, writer.transport).pause_reading()  # never reads close_notify
        await asyncio.sleep(5)

    server = await asyncio.start_server(answer_then_go_deaf, "127.0.0.1", 0, ssl=server_tls)
    port = server.sockets[0].getsockname()[1]
    transport = PooledTransport(limits=httpx.Limits(max_connections=1, keepalive_expiry=0.05),
                                ssl_context=ssl.create_default_context(cafile=str(cert)))
    try:
        url = f"https://localhost:{port}/"
        assert (await send(transport, request(url))).status_code == 200
        await asyncio.sleep(0.1)  # the connection expires: closed, its slot free at once
        assert (await send(transport, request(url, pool=1.0))).status_code == 200
    finally:
        await transport.aclose()
        server.close()


# ------------------------------------------------------------------------- broken answers, more
async def test_a_close_delimited_body_cut_by_a_reset_is_an_error() -> None:
    async def reset_mid_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n{"results": [1,2')
        await writer.drain()
        await asyncio.sleep(0.05)
        # SO_LINGER 0: the close is a reset (RST), not an orderly FIN ending the body.
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                   struct.pack("ii", 1, 0))
        writer.transport.abort()

    transport = PooledTransport()
    try:
        async with scripted(reset_mid_body) as url:
            with pytest.raises(httpx.RemoteProtocolError):
                await send(transport, request(url))
    finally:
        await transport.aclose()


async def test_a_second_unasked_response_does_not_leak_into_the_first() -> None:
    connections = 0

    async def two_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await read_request(reader)
        writer.write(OK + b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 3\r\n\r\nbad")
        await writer.drain()
        with contextlib.suppress(Exception):
            await read_request(reader)
            writer.write(OK)
            await writer.drain()

    transport = PooledTransport()
    try:
        async with scripted(two_answers) as url:
            first = await send(transport, request(url))
            assert (first.status_code, first.content) == (200, b"{}")
            assert "content-length" in first.headers and first.headers["content-length"] == "2"
            assert (await send(transport, request(url))).status_code == 200
    finally:
        await transport.aclose()
    assert connections == 2  # the connection that carried the stray answer was not reused


async def test_a_protocol_switch_is_refused() -> None:
    async def upgrade(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n"
                     b"connection: upgrade\r\n\r\n")
        await writer.drain()

    transport = PooledTransport()
    try:
        async with scripted(upgrade) as url:
            with pytest.raises(httpx.RemoteProtocolError, match="switched protocols"):
                await send(transport, request(url))
    finally:
        await transport.aclose()
