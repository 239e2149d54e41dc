"""Mistral's classification API: `POST /v1/classifications` and `/v1/chat/classifications`,
`{"model", "input": [...]}` in, `{"results": [{target: {"scores": {label: p}}}]}` out. The
factory speaks it too. Its answers are already the gateway's result shape, so decoding is a check.

The check is a hand-written walk rather than pydantic: it runs once per upstream response on the
hot path and costs a fraction of `ClassificationResponse.model_validate`
(tests/unit/test_upstream.py measures both).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import orjson

from service.gateway.protocols.base import Result, Route, ServerInfo, is_number

ENDPOINTS = {"text": "classifications", "chat": "chat/classifications"}


def check_results(payload: Any) -> list[Result] | str:
    """The `results` list of a classification response, or what is wrong with it."""
    if not isinstance(payload, dict):
        return "the body is not a JSON object"
    results = payload.get("results")
    if not isinstance(results, list):
        return "the body has no 'results' list"
    for i, entry in enumerate(results):
        if not isinstance(entry, dict) or not entry:
            return f"results[{i}] is not an object of targets"
        for target, value in entry.items():
            scores = value.get("scores") if isinstance(value, dict) else None
            if not isinstance(scores, dict):
                return f"results[{i}].{target} has no 'scores' object"
            for label, score in scores.items():
                if not is_number(score):
                    return f"results[{i}].{target}.scores.{label} is not a number"
    return results


def describe_detail(item: Any) -> str:
    """One entry of FastAPI's 422 `detail` list, as `field: message`."""
    if isinstance(item, dict):
        loc = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
        return f"{loc or 'body'}: {item.get('msg', 'invalid')}"
    return str(item)


class Mistral:
    name: ClassVar[str] = "mistral"
    labels_by_index: ClassVar[bool] = False
    labels_from_server: ClassVar[bool] = False
    server_errors: ClassVar[frozenset[int]] = frozenset()

    def root(self, base_url: str) -> str:
        # Operators write Mistral's base URL either way: https://api.mistral.ai or .../v1.
        return base_url.removesuffix("/v1")

    def path(self, route: Route) -> str:
        return f"/v1/{ENDPOINTS[route.kind]}"

    def endpoint(self, route: Route) -> str:
        return ENDPOINTS[route.kind]

    def encode(self, route: Route, inputs: Sequence[Any]) -> bytes:
        return orjson.dumps({"model": route.model, "input": inputs})

    def decode(self, route: Route, payload: Any, count: int,
               info: ServerInfo | None) -> list[Result] | str:
        return check_results(payload)

    def error_text(self, payload: Any) -> str | None:
        # Mistral: `message`; FastAPI (the factory): `detail`, a string or a list of errors.
        if not isinstance(payload, dict):
            return None
        for field in ("message", "detail", "error"):
            value = payload.get(field)
            if isinstance(value, dict):
                value = value.get("message")
            if isinstance(value, str) and value:
                return value
            if isinstance(value, list) and value:
                return "; ".join(describe_detail(item) for item in value[:5])
        return None

    def info_path(self, route: Route) -> str | None:
        return None

    def read_info(self, route: Route, payload: Any) -> ServerInfo | str:
        return ServerInfo()

    def answer_scope(self, base_url: str, route: Route) -> str:
        """The base URL alone: Mistral's answers carry their own targets and labels, so the
        route's do not change them; and it is the scope cache keys had before other protocols
        existed, so entries cached then stay valid."""
        return base_url
