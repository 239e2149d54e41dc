"""Load through a SIGTERM: clients that open a new connection per request, counting lost requests.

A request is *lost* when its connection was established but no complete HTTP response came back
(reset, closed early, or nothing within `ANSWER_TIMEOUT_S`). A connection refused is not lost: the
client knows nothing was sent and may retry elsewhere. Any status counts as answered (503
`shutting_down` included): the client was told.

Every other client pauses before it sends its request, as a client that connects, then builds its
request, does: the connection that uvicorn used to close at once during shutdown.

Used by tests/e2e/test_gateway_shutdown.py (a few SIGTERMs) and bench/faults.py (20).
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from dataclasses import dataclass, field

ANSWER_TIMEOUT_S = 15.0
SEND_PAUSE_S = 0.02


@dataclass
class Tally:
    answered: int = 0
    refused: int = 0
    lost: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)

    def add(self, other: Tally) -> None:
        self.answered += other.answered
        self.refused += other.refused
        self.lost += other.lost
        for status, count in other.statuses.items():
            self.statuses[status] = self.statuses.get(status, 0) + count
        self.reasons += other.reasons[:10]


def classify_request(text: str) -> bytes:
    body = b'{"task": "sentiment", "input": "' + text.encode() + b'"}'
    return (b"POST /classify HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


async def one_request(port: int, request: bytes, pause_s: float, tally: Tally) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        tally.refused += 1
        return
    try:
        async with asyncio.timeout(ANSWER_TIMEOUT_S):
            if pause_s:
                await asyncio.sleep(pause_s)
            writer.write(request)
            await writer.drain()
            status_line = await reader.readline()
            status = int(status_line.split()[1])
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
        tally.answered += 1
        tally.statuses[status] = tally.statuses.get(status, 0) + 1
    except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError, IndexError) as exc:
        tally.lost += 1
        tally.reasons.append(f"{type(exc).__name__}: {exc}")
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def load_until_exit(port: int, process: subprocess.Popen[bytes], *, clients: int = 16,
                          sigterm_after_s: float = 0.5, tag: str = "") -> Tally:
    """Run `clients` loops of one-request connections against the gateway on `port`, send SIGTERM
    after `sigterm_after_s`, and keep going until the process has exited."""
    tally = Tally()
    sequence = 0

    async def client(index: int) -> None:
        nonlocal sequence
        pause = SEND_PAUSE_S if index % 2 else 0.0
        while process.poll() is None:
            sequence += 1
            refused = tally.refused
            await one_request(port, classify_request(f"{tag} load {sequence}"), pause, tally)
            if tally.refused > refused:
                await asyncio.sleep(0.005)  # the port is closed: do not spin until the exit

    async def terminate() -> None:
        await asyncio.sleep(sigterm_after_s)
        process.terminate()
        await asyncio.to_thread(process.wait)

    await asyncio.gather(terminate(), *(client(i) for i in range(clients)))
    return tally
