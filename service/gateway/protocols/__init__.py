"""Upstream protocols, by the name the tasks file uses (`protocol:` on an upstream).

Adding one: a module with a class that satisfies `base.UpstreamProtocol`, and a line below.
"""

from __future__ import annotations

from service.gateway.protocols.base import Result, Route, ServerInfo, UpstreamProtocol
from service.gateway.protocols.infinity import Infinity
from service.gateway.protocols.kserve_v2 import KServeV2
from service.gateway.protocols.mistral import Mistral
from service.gateway.protocols.tei import TEI
from service.gateway.protocols.vllm import VLLM

PROTOCOLS: dict[str, UpstreamProtocol] = {
    p.name: p for p in (Mistral(), TEI(), VLLM(), Infinity(), KServeV2())
}
NAMES = tuple(PROTOCOLS)


def get(name: str) -> UpstreamProtocol:
    """The protocol called `name`; KeyError names the known ones."""
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise KeyError(f"unknown protocol {name!r}; known: {', '.join(NAMES)}") from None


__all__ = ["NAMES", "PROTOCOLS", "Result", "Route", "ServerInfo", "UpstreamProtocol", "get"]
