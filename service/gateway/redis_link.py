"""RedisLink: one pipelined connection to a standalone Redis, for the gateway's hot path.

Why not redis-py here: a cache lookup at concurrency 1 spent most of its time in redis-py's machinery
(connection pool, Retry, execute_command, Pipeline), not on the wire. An asyncio.Protocol feeding a
`hiredis.Reader` does the same round trip for about half the CPU.

Why one connection: Redis answers the commands of a connection in the order it received them, so
any number of tasks can share one socket. A call appends a waiter to a FIFO and writes its commands
at once; each complete reply goes to the oldest waiter. No pool, no lock, no per-call task, and under
load the writes of concurrent calls share TCP segments by themselves.

Why a late reply closes the connection: every reply queued behind it is late too, and a reply that
comes after its caller gave up would be read by the next caller unless the link kept its place in
the FIFO. Closing is the simplest state that is certainly right; the next call reconnects.

Standalone Redis only (redis://, rediss://, unix://). Sentinel and Cluster stay on redis-py.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from typing import Any, cast

import hiredis

from service.gateway.redis_url import RedisURL, parse_redis_url

__all__ = ["Arg", "Command", "RedisLink", "RedisLinkError"]

Arg = str | bytes | int | float
Command = tuple[Arg, ...]

SUPPORTED_URLS = ("redis://[[user]:password@]host[:port][/db], rediss://... (TLS), "
                  "unix:///path/to/redis.sock[?db=N][&password=...]")
# A timer may fire this much before its time (uvloop works in milliseconds); treat it as due rather
# than re-arm it for a sliver.
_TIMER_SLACK_S = 0.001


class RedisLinkError(ConnectionError):
    """Redis refused the link's settings (password, db, certificate), or the link is closed:
    trying again as is will not help, the configuration must change."""


class _Waiter:
    """One `execute` call: its future, how many replies it waits for, and by when."""

    __slots__ = ("deadline", "expected", "future", "replies")

    def __init__(self, future: asyncio.Future[list[Any]], expected: int, deadline: float) -> None:
        self.future = future
        self.expected = expected
        self.deadline = deadline
        self.replies: list[Any] = []


class _Connection(asyncio.Protocol):
    """One socket and its FIFO of waiters. Once broken it stays broken; the link opens a new one.

    Keeping the FIFO per socket (not per link) means a late `connection_lost` from an old socket
    can never fail the callers of its successor.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout_s: float, description: str) -> None:
        self.loop = loop
        self.timeout_s = timeout_s
        self.description = description
        self.reader = hiredis.Reader()
        self.waiters: deque[_Waiter] = deque()
        # Set once the handshake has passed; until then calls park their bytes in `unsent`, so
        # that no command can run before AUTH and SELECT (on the wrong db, say).
        self.transport: asyncio.Transport | None = None
        self.unsent: list[bytes] = []
        self.raw_transport: asyncio.Transport | None = None
        self.connecting: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0
        # Bytes held until the end of the event-loop turn (send(soon=True)), written as one.
        self.outbox: list[bytes] = []
        self.broken = False
        self.lost: asyncio.Future[None] = loop.create_future()

    # -- the hot path ----------------------------------------------------------------------------

    def send(self, data: bytes, expected: int, timeout_s: float | None = None,
             *, soon: bool = False) -> asyncio.Future[list[Any]]:
        """Queue a waiter and write `data` now, or at the end of this event-loop turn (`soon`),
        together with everything else sent until then: one write, one reply read."""
        loop = self.loop
        future: asyncio.Future[list[Any]] = loop.create_future()
        deadline = loop.time() + (self.timeout_s if timeout_s is None else timeout_s)
        self.waiters.append(_Waiter(future, expected, deadline))
        outbox = self.outbox
        if outbox or soon:
            # Behind bytes held for the end of the turn: the FIFO's order is the write order.
            outbox.append(data)
            if len(outbox) == 1:
                loop.call_soon(self._flush_outbox)
        else:
            transport = self.transport
            if transport is not None:
                transport.write(data)
            else:
                self.unsent.append(data)
        if self.timer is None:
            # One timer for the whole FIFO, set for its earliest deadline (see _check_deadline).
            self.timer_at = deadline
            self.timer = loop.call_at(deadline, self._check_deadline)
        elif deadline < self.timer_at:  # a shorter deadline behind a longer one
            self.timer.cancel()
            self.timer_at = deadline
            self.timer = loop.call_at(deadline, self._check_deadline)
        return future

    def _flush_outbox(self) -> None:
        outbox = self.outbox
        if not outbox:  # the connection failed meanwhile: its waiters are failed already
            return
        data = b"".join(outbox)
        outbox.clear()
        transport = self.transport
        if transport is not None:
            transport.write(data)
        else:
            self.unsent.append(data)

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        waiters = self.waiters
        try:
            reply = reader.gets()
            while reply is not False:
                waiter = waiters[0]
                if waiter.expected == 1:
                    waiters.popleft()
                    if not waiter.future.done():  # done = its caller was cancelled: drop it
                        waiter.future.set_result([reply])
                else:
                    replies = waiter.replies
                    replies.append(reply)
                    if len(replies) == waiter.expected:
                        waiters.popleft()
                        if not waiter.future.done():
                            waiter.future.set_result(replies)
                reply = reader.gets()
        except (hiredis.ProtocolError, IndexError) as exc:  # IndexError: a reply nobody asked for
            self.fail(ConnectionError,
                      f"Redis at {self.description} sent a reply the link cannot match to a "
                      f"command ({type(exc).__name__}: {exc}); connection closed", exc)

    def _check_deadline(self) -> None:
        """Fail the connection when a waiter's deadline has passed. Deadlines mostly grow with
        the queue, but a call may bring a deadline of its own (a quota check's, on the cache's
        connection): the timer is always set for the earliest one."""
        self.timer = None
        if self.broken or not self.waiters:
            return
        now = self.loop.time()
        deadline = min(waiter.deadline for waiter in self.waiters)
        if deadline - now <= _TIMER_SLACK_S:
            self.fail(TimeoutError, f"Redis at {self.description} did not answer within "
                      f"its deadline ({self.timeout_s}s, or the call's own); connection closed")
        else:  # the waiter this timer was set for has its reply; watch the next one
            self.timer_at = deadline
            self.timer = self.loop.call_at(deadline, self._check_deadline)

    # -- connection life -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.raw_transport = cast(asyncio.Transport, transport)
        if self.broken:  # timed out while the connect was finishing
            self.raw_transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
        self.fail(ConnectionError, f"lost the connection to Redis at {self.description}{reason}",
                  exc)
        if not self.lost.done():
            self.lost.set_result(None)

    def handshake(self, data: bytes, expected: int) -> asyncio.Future[list[Any]]:
        """AUTH/SELECT go first in the FIFO, ahead of the calls parked during the connect."""
        if self.broken or self.raw_transport is None:
            raise ConnectionError(f"lost the connection to Redis at {self.description}")
        future: asyncio.Future[list[Any]] = self.loop.create_future()
        deadline = self.waiters[0].deadline if self.waiters else self.loop.time() + self.timeout_s
        self.waiters.appendleft(_Waiter(future, expected, deadline))
        if self.timer is None:
            self.timer_at = deadline
            self.timer = self.loop.call_at(deadline, self._check_deadline)
        self.raw_transport.write(data)
        return future

    def go_live(self) -> None:
        self.connecting = None
        if self.broken or self.raw_transport is None:
            return
        if self.unsent:
            self.raw_transport.write(b"".join(self.unsent))
            self.unsent.clear()
        self.transport = self.raw_transport

    def fail(self, kind: type[Exception], message: str, cause: BaseException | None = None,
             ) -> None:
        """Close the socket and fail every waiter, each with an exception of its own (one instance
        raised in many tasks would collect all their tracebacks)."""
        if self.broken:
            return
        self.broken = True
        self.transport = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.raw_transport is not None:
            self.raw_transport.abort()  # whatever is still buffered is for callers failed below
        task = self.connecting
        if task is not None and not task.done() and task is not asyncio.current_task(self.loop):
            task.cancel()
        waiters, self.waiters = self.waiters, deque()
        self.unsent.clear()
        self.outbox.clear()
        for waiter in waiters:
            if not waiter.future.done():
                error = kind(message)
                error.__cause__ = cause
                waiter.future.set_exception(error)


class RedisLink:
    """A lean client for the gateway's hot path: `execute` pipelines commands on one shared
    connection and returns raw hiredis replies. Build it from a parsed `RedisURL` (the gateway
    does, in redis_clients.py) or with `from_url`; close with `aclose`.

    Use it from one event loop. Every call is bounded by `timeout_s`, connect included.
    """

    def __init__(self, url: RedisURL, *, timeout_s: float,
                 setting: str = "GATEWAY_REDIS_URL") -> None:
        """A link to the standalone Redis of `url` (parsed by redis_url.py, as for every client;
        redis_clients.link builds it for the gateway); does not connect."""
        if url.kind != "standalone":
            raise ValueError(f"unsupported Redis URL scheme {url.scheme!r} in {setting}; the fast "
                             f"link speaks to a standalone Redis: {SUPPORTED_URLS}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self._url = url
        self._timeout_s = timeout_s
        self._setting = setting
        self._conn: _Connection | None = None
        self._closed = False
        self._ssl_context: ssl.SSLContext | None = None
        self._handshake: list[Command] = []
        if url.password is not None:
            self._handshake.append(("AUTH", url.username, url.password)
                                   if url.username else ("AUTH", url.password))
        if url.db:
            self._handshake.append(("SELECT", url.db))
        # Always a handshake, PING if nothing else: a Redis at its client limit sends an error
        # and closes as it accepts, and that reply must meet the handshake, not a caller's MGET.
        self._handshake = self._handshake or [("PING",)]

    @classmethod
    def from_url(cls, url: str, *, timeout_s: float,
                 setting: str = "GATEWAY_REDIS_URL") -> RedisLink:
        """A link to the Redis at `url`, parsed here; does not connect (the first `execute` does).

        `setting` names where the URL came from, for error messages that say what to fix. URL
        syntax and percent-decoding follow redis-py's `Redis.from_url`, except that a db that is
        not a number is an error here rather than silently db 0.
        """
        return cls(parse_redis_url(url, setting), timeout_s=timeout_s, setting=setting)

    def __repr__(self) -> str:
        return f"RedisLink({self.description!r})"

    @property
    def description(self) -> str:
        """Where Redis is, for logs: scheme and host:port/db or the socket path, never a secret."""
        return self._url.description

    async def execute(self, *commands: Command) -> list[Any]:
        """Send `commands` in one write and return their replies in order.

        Replies are as hiredis parses them (bytes, int, list, None). An error reply comes back in
        its place as a `hiredis.ReplyError` instance rather than being raised, so that one failed
        command does not hide the replies of the others. Raises TimeoutError when Redis does not
        answer within `timeout_s`, ConnectionError when it cannot be reached or the connection
        drops, RedisLinkError (a ConnectionError) when it rejects the URL's settings or the link
        is closed.

        Every command must get exactly one reply (no SUBSCRIBE, MONITOR or CLIENT REPLY OFF: the
        FIFO would fall out of step), and a blocking command (BLPOP ...) holds up every call queued
        behind it on the shared connection, so keep its own timeout well under `timeout_s`.
        """
        if not commands:
            return []
        conn = self._conn
        if conn is None or conn.broken:
            conn = self._open()
        if len(commands) == 1:
            data = _pack(commands[0])
        else:
            data = b"".join([_pack(command) for command in commands])
        return await conn.send(data, len(commands))

    def submit(self, *commands: Command, timeout_s: float | None = None
               ) -> asyncio.Future[list[Any]]:
        """`execute` without awaiting, for a call that should share one write with the calls
        made after it in the same event-loop turn: the commands are held until the end of the
        turn, and whatever else is sent on this link meanwhile follows them in the same write (a
        quota check and the cache lookup after it: one write, one read, instead of two round
        trips). Returns the future of their replies; raises RedisLinkError when the link is
        closed.

        `timeout_s`: this call's deadline, when it is not the link's; a call that passes its
        deadline closes the connection, and so fails the calls sharing it (see the module
        docstring)."""
        if not commands:
            raise ValueError("submit needs at least one command")
        return self.submit_packed(b"".join([_pack(command) for command in commands]),
                                  len(commands), timeout_s=timeout_s)

    def submit_packed(self, data: bytes, count: int, *, timeout_s: float | None = None
                      ) -> asyncio.Future[list[Any]]:
        """`submit` for `count` commands already encoded in RESP (a template filled in per
        call: packing a 30-argument EVALSHA took 12-29 us on a loaded 2-core machine, a template
        under 1 us)."""
        conn = self._conn
        if conn is None or conn.broken:
            conn = self._open()
        return conn.send(data, count, timeout_s, soon=True)

    @property
    def timeout_s(self) -> float:
        """The deadline of a call that does not bring its own."""
        return self._timeout_s

    async def aclose(self) -> None:
        """Close the connection; calls still waiting fail with RedisLinkError. Idempotent."""
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is None:
            return
        task = conn.connecting
        conn.fail(RedisLinkError, f"the Redis link to {self.description} was closed")
        if task is not None:
            await asyncio.wait({task})
        if conn.raw_transport is not None:
            await asyncio.wait({conn.lost}, timeout=self._timeout_s)

    # -- internals -------------------------------------------------------------------------------

    def _open(self) -> _Connection:
        if self._closed:
            raise RedisLinkError(f"the Redis link to {self.description} is closed")
        loop = asyncio.get_running_loop()
        conn = _Connection(loop, self._timeout_s, self.description)
        conn.connecting = loop.create_task(self._connect(conn))
        self._conn = conn
        return conn

    async def _connect(self, conn: _Connection) -> None:
        """Runs once per connection; never raises: its outcome reaches callers via their waiters.

        The calls that started it are bounded by their own deadlines (conn's timer), which cancel
        this task when they pass, so it needs no timeout of its own."""
        url = self._url
        try:
            loop = conn.loop
            if url.unix_path is not None:
                await loop.create_unix_connection(lambda: conn, url.unix_path)
            else:
                context = self._tls_context() if url.tls else None
                host, port = url.hosts[0]
                await loop.create_connection(
                    lambda: conn, host, port, ssl=context,
                    server_hostname=host if context is not None else None)
            replies = await conn.handshake(
                b"".join([_pack(command) for command in self._handshake]), len(self._handshake))
            problem = self._rejection(replies)
            if problem is not None:
                conn.fail(*problem)
                return
        except asyncio.CancelledError:
            raise  # conn.fail cancelled us and has already told the callers why
        except RedisLinkError as exc:
            conn.fail(RedisLinkError, str(exc), exc.__cause__)
            return
        except ssl.SSLCertVerificationError as exc:
            conn.fail(RedisLinkError,
                      f"the TLS certificate of Redis at {self.description} failed verification "
                      f"({exc.verify_message}); in {self._setting} set ssl_ca_certs to the CA "
                      "that signed it (or ssl_cert_reqs=none to skip verification)", exc)
            return
        except Exception as exc:
            conn.fail(ConnectionError, f"cannot connect to Redis at {self.description} "
                                       f"({type(exc).__name__}: {exc})", exc)
            return
        conn.go_live()

    def _tls_context(self) -> ssl.SSLContext:
        """Built on the first connect, then reused: loading CA files costs milliseconds."""
        if self._ssl_context is None:
            try:
                self._ssl_context = self._url.tls_context()
            except (OSError, ssl.SSLError) as exc:
                raise RedisLinkError(f"cannot load the TLS files named in {self._setting} "
                                     f"(ssl_ca_certs, ssl_certfile, ssl_keyfile): {exc}") from exc
        return self._ssl_context

    def _rejection(self, replies: list[Any]) -> tuple[type[ConnectionError], str] | None:
        """What went wrong when Redis refused the handshake, and whether it is the settings'
        fault (RedisLinkError: fix the URL) or Redis's own state (ConnectionError: it passes,
        e.g. "max number of clients reached"). Never echoes the password."""
        url, setting = self._url, self._setting
        for command, reply in zip(self._handshake, replies, strict=True):
            if not isinstance(reply, hiredis.ReplyError):
                continue
            text = str(reply)
            if url.password:
                text = text.replace(url.password, "***")
            if "without any password configured" in text:
                return RedisLinkError, (
                    f"Redis at {self.description} has no password set, but {setting} carries "
                    f"one: remove it from the URL ({text})")
            if text.startswith("WRONGPASS") or "invalid password" in text or \
                    "invalid username-password" in text:
                who = f"user name {url.username!r} or the password" if url.username \
                    else "the password"
                return RedisLinkError, (
                    f"Redis at {self.description} rejected {who} in {setting} ({text})")
            if text.startswith("NOAUTH"):
                return RedisLinkError, (
                    f"Redis at {self.description} requires a password: put it in {setting} "
                    f"(redis://:PASSWORD@host:port/db) ({text})")
            if command[0] == "SELECT" and ("out of range" in text or "invalid DB" in text):
                return RedisLinkError, (
                    f"Redis at {self.description} has no db {url.db} (see its `databases` "
                    f"setting, 16 by default): fix the db in {setting} ({text})")
            return ConnectionError, f"Redis at {self.description} refused the connection ({text})"
        return None


def _pack(command: Command) -> bytes:
    # cast: hiredis's stub types the argument as a 1-tuple and leaves the result untyped.
    return cast(bytes, hiredis.pack_command(cast(Any, command)))
