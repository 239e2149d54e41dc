"""The Open Inference Protocol v2 (KServe, Triton, MLServer): `POST /v2/models/{model}/infer`
with one BYTES input tensor of the texts, `{"inputs": [{"name": "text", "shape": [n],
"datatype": "BYTES", "data": [...]}]}`; the answer's `outputs` hold a tensor of class
probabilities, shape `[n, classes]`, data flattened in row-major order (the nested form is
accepted too). With several outputs, the one named `probabilities` is read, else the first.

Classes come by index, so the labels are the task's `labels`, else the model metadata
(`GET /v2/models/{model}`): the output tensor's `parameters.labels` (or the metadata's own
`parameters.labels`), a list or a comma-separated string, where the server publishes tensor
parameters (MLServer's model settings can; KServe's Python server drops them, so tasks on the
factory's KServe export list their labels, as `models export` prints). Errors are
`{"error": "..."}`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar
from urllib.parse import quote

import orjson

from service.gateway.protocols.base import (
    Defaults,
    Result,
    Route,
    ServerInfo,
    first_message,
    is_number,
    render_text,
    scores_from_probs,
)

INPUT_NAME = "text"
OUTPUT_NAME = "probabilities"


def _labels(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    return ()


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list) or not data or not isinstance(data[0], list):
        return data if isinstance(data, list) else []
    return [x for row in data for x in _flatten(row)]


def _pick(outputs: list[Any]) -> Any:
    named = [o for o in outputs if isinstance(o, dict) and o.get("name") == OUTPUT_NAME]
    return named[0] if named else outputs[0]


class KServeV2(Defaults):
    name: ClassVar[str] = "kserve-v2"
    labels_by_index: ClassVar[bool] = True
    labels_from_server: ClassVar[bool] = True

    def path(self, route: Route) -> str:
        return f"/v2/models/{quote(route.model, safe='')}/infer"

    def endpoint(self, route: Route) -> str:
        return "infer"

    def encode(self, route: Route, inputs: Sequence[Any]) -> bytes:
        texts = [render_text(i) for i in inputs]
        return orjson.dumps({"inputs": [{"name": INPUT_NAME, "shape": [len(texts)],
                                         "datatype": "BYTES", "data": texts}]})

    def decode(self, route: Route, payload: Any, count: int,
               info: ServerInfo | None) -> list[Result] | str:
        outputs = payload.get("outputs") if isinstance(payload, dict) else None
        if not isinstance(outputs, list) or not outputs:
            return "the body has no 'outputs' list (an inference response of protocol v2)"
        output = _pick(outputs)
        if not isinstance(output, dict):
            return "outputs[0] is not a tensor object"
        shape, data = output.get("shape"), _flatten(output.get("data"))
        if (not isinstance(shape, list) or len(shape) != 2
                or not all(isinstance(d, int) for d in shape)):
            return (f"output {output.get('name')!r} has shape {shape!r}; expected "
                    "[inputs, classes] probabilities")
        rows, classes = shape
        if rows * classes != len(data) or not all(is_number(x) for x in data):
            return (f"output {output.get('name')!r} has {len(data)} numbers for shape "
                    f"{shape}")
        labels = route.labels or (info.labels if info is not None else ())
        if not labels:
            return ("the task names no `labels` and the model metadata gives none; list the "
                    "model's classes in index order under the task's `labels`")
        results: list[Result] = []
        for i in range(rows):
            scores = scores_from_probs(data[i * classes:(i + 1) * classes], labels,
                                       f"outputs.{output.get('name')}[{i}]")
            if isinstance(scores, str):
                return scores
            results.append({route.target: {"scores": scores}})
        return results

    def error_text(self, payload: Any) -> str | None:
        return first_message(payload, "error", "detail", "message")

    def info_path(self, route: Route) -> str | None:
        return f"/v2/models/{quote(route.model, safe='')}"

    def read_info(self, route: Route, payload: Any) -> ServerInfo | str:
        if not isinstance(payload, dict):
            return "the model metadata is not a JSON object"
        labels: tuple[str, ...] = ()
        outputs = payload.get("outputs")
        if isinstance(outputs, list) and outputs:
            chosen = _pick(outputs)
            if isinstance(chosen, dict) and isinstance(chosen.get("parameters"), dict):
                labels = _labels(chosen["parameters"].get("labels"))
        if not labels and isinstance(payload.get("parameters"), dict):
            labels = _labels(payload["parameters"].get("labels"))
        return ServerInfo(labels=labels)
