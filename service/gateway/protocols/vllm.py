"""vLLM's classification API (`vllm serve` with a *ForSequenceClassification model):
`POST /classify` with `{"model", "input": [...]}`; the answer's `data` holds, per input,
`{"index", "label", "probs", "num_classes"}`, where `label` names only the top class and `probs`
is by class index. So the task must list its `labels` in index order (the model config's
`id2label`); vLLM has no endpoint that tells them, and a task without them is refused at load.
Errors are `{"error": {"message", "type", "code"}}` (older releases: `{"object": "error",
"message"}`).
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
    scores_from_probs,
)


class VLLM(Defaults):
    name: ClassVar[str] = "vllm"
    labels_by_index: ClassVar[bool] = True

    def root(self, base_url: str) -> str:
        return base_url.removesuffix("/v1")

    def path(self, route: Route) -> str:
        return "/classify"

    def endpoint(self, route: Route) -> str:
        return "classify"

    def encode(self, route: Route, inputs: Sequence[Any]) -> bytes:
        return orjson.dumps({"model": route.model, "input": [render_text(i) for i in inputs]})

    def decode(self, route: Route, payload: Any, count: int,
               info: ServerInfo | None) -> list[Result] | str:
        data = payload.get("data") if isinstance(payload, dict) else None
        if not isinstance(data, list):
            return "the body has no 'data' list (vLLM's classify answer)"
        rows: list[Any] = [None] * len(data)
        for position, entry in enumerate(data):
            index = entry.get("index", position) if isinstance(entry, dict) else None
            if not isinstance(index, int) or not 0 <= index < len(data) or rows[index] is not None:
                return f"data[{position}] has a missing, repeated or out-of-range 'index'"
            rows[index] = entry.get("probs")
        results: list[Result] = []
        for i, probs in enumerate(rows):
            scores = scores_from_probs(probs, route.labels, f"data[{i}].probs")
            if isinstance(scores, str):
                return scores
            results.append({route.target: {"scores": scores}})
        return results

    def error_text(self, payload: Any) -> str | None:
        return first_message(payload, "error", "message", "detail")
