"""Hugging Face text-embeddings-inference (TEI), a sequence-classification model:
`POST /predict` with `{"inputs": [["text"], ...], "truncate": true}`; the answer is one list of
`{"label", "score"}` per input, every class named (TEI reads `id2label` from the model's config).

Each input goes as a one-element list, the batch form of TEI's `PredictInput`: a bare list of two
strings would be read as one sentence *pair*. `truncate: true` because the gateway's other
upstreams accept long texts (the factory chunks them) and TEI refuses a text over the model's
`max_input_length` otherwise (413). `GET /info` gives `max_client_batch_size` (TEI answers a
larger batch with 413; default 32), which the client uses as this upstream's batch limit, and
`model_type.classifier.id2label`. Errors are `{"error", "error_type"}`; 424 is a failed
inference, 429 "model is overloaded".
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


class TEI(Defaults):
    name: ClassVar[str] = "tei"
    labels_from_server: ClassVar[bool] = True
    server_errors: ClassVar[frozenset[int]] = frozenset({424})

    def path(self, route: Route) -> str:
        return "/predict"

    def endpoint(self, route: Route) -> str:
        return "predict"

    def encode(self, route: Route, inputs: Sequence[Any]) -> bytes:
        return orjson.dumps({"inputs": [[render_text(item)] for item in inputs],
                             "truncate": True, "raw_scores": False})

    def decode(self, route: Route, payload: Any, count: int,
               info: ServerInfo | None) -> list[Result] | str:
        if not isinstance(payload, list):
            return "the body is not a list of predictions (TEI's batch answer)"
        return results_from_pairs(payload, route.target, "")

    def error_text(self, payload: Any) -> str | None:
        return first_message(payload, "error", "message")

    def info_path(self, route: Route) -> str | None:
        return "/info"

    def read_info(self, route: Route, payload: Any) -> ServerInfo | str:
        if not isinstance(payload, dict):
            return "/info is not a JSON object"
        limit = payload.get("max_client_batch_size")
        model_type = payload.get("model_type")
        classifier = model_type.get("classifier") if isinstance(model_type, dict) else None
        if not isinstance(classifier, dict):
            kind = ", ".join(model_type) if isinstance(model_type, dict) else "unknown"
            return (f"the server serves a {kind} model, not a sequence classifier; start TEI "
                    "with a model whose config has an `id2label` (a *ForSequenceClassification)")
        id2label = classifier.get("id2label")
        labels: tuple[str, ...] = ()
        if isinstance(id2label, dict):
            try:
                labels = tuple(str(id2label[k]) for k in sorted(id2label, key=int))
            except ValueError:
                labels = ()
        return ServerInfo(labels=labels,
                          max_batch_size=limit if isinstance(limit, int) and limit > 0 else None)
