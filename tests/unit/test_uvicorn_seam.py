"""The parts of uvicorn's internals that `service/gateway/connections.py` builds on.

`GatewayHttpProtocol` subclasses uvicorn's `HttpToolsProtocol`, which is not public API, while
pyproject asks only for uvicorn>=0.30. These tests name each internal it overrides or reads, so
that a uvicorn release that moves one fails here, by name, rather than as a gateway that no longer
times out slow clients (the behaviour itself is tested in tests/integration/test_gateway_connections.py).
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import pytest
import uvicorn
from uvicorn.protocols.http import httptools_impl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from service.gateway.connections import GatewayHttpProtocol

WHERE = (f"uvicorn {uvicorn.__version__} changed its httptools protocol: re-read "
         "service/gateway/connections.py against uvicorn/protocols/http/httptools_impl.py")

#: Hooks GatewayHttpProtocol overrides, with the parameters uvicorn (or httptools) calls them with.
HOOKS = {
    "connection_made": ["self", "transport"],
    "connection_lost": ["self", "exc"],
    "data_received": ["self", "data"],
    "shutdown": ["self"],
    "on_message_begin": ["self"],
    "on_headers_complete": ["self"],
    "on_message_complete": ["self"],
    "on_response_complete": ["self"],
}
#: What it reads or sets on the protocol, and on the request cycle.
PROTOCOL_ATTRIBUTES = ("app", "loop", "connections", "transport", "cycle", "timeout_keep_alive",
                       "timeout_keep_alive_task")
CYCLE_ATTRIBUTES = ("keep_alive", "response_started", "response_complete", "disconnected",
                    "message_event")


async def _app(scope: Any, receive: Any, send: Any) -> None:
    """Never called: the protocol is only built."""


@pytest.mark.parametrize("hook", sorted(HOOKS))
def test_every_overridden_hook_is_still_uvicorns(hook: str) -> None:
    assert hook in vars(GatewayHttpProtocol), f"{hook} is no longer overridden: update HOOKS"
    original = getattr(HttpToolsProtocol, hook, None)
    assert callable(original), f"{WHERE}: HttpToolsProtocol.{hook} is gone"
    assert list(inspect.signature(original).parameters) == HOOKS[hook], (
        f"{WHERE}: HttpToolsProtocol.{hook} takes other arguments now")


def test_the_attributes_it_reads_are_set_by_uvicorn() -> None:
    loop = asyncio.new_event_loop()
    try:
        config = uvicorn.Config(_app, log_config=None)
        protocol = HttpToolsProtocol(config, ServerState(), {}, _loop=loop)
    finally:
        loop.close()
    missing = [name for name in PROTOCOL_ATTRIBUTES if not hasattr(protocol, name)]
    assert not missing, f"{WHERE}: a new HttpToolsProtocol has no {', '.join(missing)}"
    assert callable(getattr(protocol, "timeout_keep_alive_handler", None)), (
        f"{WHERE}: HttpToolsProtocol.timeout_keep_alive_handler is gone (connections.py re-arms "
        "the keep-alive timer with it)")


def test_the_request_cycle_keeps_the_state_it_reads() -> None:
    source = inspect.getsource(RequestResponseCycle.__init__)
    missing = [name for name in CYCLE_ATTRIBUTES if f"self.{name} =" not in source]
    assert not missing, f"{WHERE}: RequestResponseCycle no longer sets {', '.join(missing)}"


def test_status_lines_are_where_it_takes_them_from() -> None:
    assert httptools_impl.STATUS_LINE[408].startswith(b"HTTP/1.1 408"), WHERE
