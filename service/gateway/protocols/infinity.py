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
    Result,
    Route,
    ServerInfo,
    first_message,
    render_text,
    scores_from_pairs,
)


class Infinity:
    name: ClassVar[str] = "infinity"
    labels_by_index: ClassVar[bool] = False
    labels_from_server: ClassVar[bool] = False
    server_errors: ClassVar[frozenset[int]] = frozenset()

    def root(self, base_url: str) -> str:
        return base_url

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
        results: list[Result] = []
        for i, entry in enumerate(data):
            scores = scores_from_pairs(entry, f"data[{i}]")
            if isinstance(scores, str):
                return scores
            results.append({route.target: {"scores": scores}})
        return results

    def error_text(self, payload: Any) -> str | None:
        from service.gateway.protocols.mistral import Mistral

        return first_message(payload, "error", "message") or Mistral().error_text(payload)

    def info_path(self, route: Route) -> str | None:
        return None

    def read_info(self, route: Route, payload: Any) -> ServerInfo | str:
        return ServerInfo()
