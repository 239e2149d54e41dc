"""Infinity (michaelfeil/infinity): `POST /classify` with `{"model", "input": [...],
"raw_scores": false}`; the answer's `data` holds one list of `{"label", "score"}` per input, every
class named. Errors are OpenAI-style, `{"error": {"message", ...}}`, or FastAPI's `detail`.
Infinity serves several models on one port, chosen by `model` (its `--served-model-name`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import orjson

from service.gateway.protocols.base import (
    Defaults,
    Result,
    Route,
    ServerInfo,
    first_message,
    render_text,
    results_from_pairs,
)
from service.gateway.protocols.mistral import Mistral


class Infinity(Defaults):
    name: ClassVar[str] = "infinity"

    def path(self, route: Route) -> str:
        return "/classify"

    def endpoint(self, route: Route) -> str:
        return "classify"

    def encode(self, route: Route, inputs: Sequence[Any]) -> bytes:
        return orjson.dumps({"model": route.model, "input": [render_text(i) for i in inputs],
                             "raw_scores": False})

    def decode(self, route: Route, payload: Any, count: int,
               info: ServerInfo | None) -> list[Result] | str:
        data = payload.get("data") if isinstance(payload, dict) else None
        if not isinstance(data, list):
            return "the body has no 'data' list (Infinity's classify answer)"
        return results_from_pairs(data, route.target, "data")

    def error_text(self, payload: Any) -> str | None:
        return first_message(payload, "error", "message") or Mistral().error_text(payload)
