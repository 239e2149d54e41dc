"""Faithful fakes of the inference servers that cannot run here (TEI is a Rust binary, vLLM needs
a GPU build), written from their published API: TEI's `docs/openapi.json` (`POST /predict`,
`GET /info`, `{"error", "error_type"}` bodies, 413 over `max_client_batch_size`) and vLLM's
classification API (`POST /classify`, `data[i] = {index, label, probs, num_classes}`, OpenAI-style
errors, 404 for a model it does not serve). They serve a deterministic "model": the
probabilities of each text come from its SHA-256, so a test knows every answer in advance.

Each fake records the requests it received and can be told to answer the next calls with a
status (TEI's 429 "overloaded", 424 "inference failed", a 5xx).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from tests.support.servers import ThreadedServer, serve


def probabilities(text: str, labels: Sequence[str]) -> list[float]:
    """The fake model: a softmax over logits drawn from the text's SHA-256, in label order."""
    digest = hashlib.sha256(text.encode()).digest()
    logits = [digest[i] / 32.0 for i in range(len(labels))]
    top = max(logits)
    exps = [math.exp(x - top) for x in logits]
    total = sum(exps)
    return [e / total for e in exps]


def expected(text: str, labels: Sequence[str]) -> dict[str, float]:
    return dict(zip(labels, probabilities(text, labels), strict=True))


@dataclass
class FakeServer:
    labels: tuple[str, ...]
    calls: list[Any] = field(default_factory=list)
    faults: list[int] = field(default_factory=list)
    server: ThreadedServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url

    def fault(self) -> int | None:
        return self.faults.pop(0) if self.faults else None


def tei_app(fake: FakeServer, *, max_client_batch_size: int = 32,
            served_model_name: str = "tei-model") -> FastAPI:
    app = FastAPI()
    id2label = {str(i): label for i, label in enumerate(fake.labels)}

    def error(status: int, message: str, error_type: str) -> JSONResponse:
        return JSONResponse({"error": message, "error_type": error_type}, status_code=status)

    @app.get("/info")
    async def info() -> dict[str, Any]:
        return {"model_id": served_model_name, "model_sha": None, "model_dtype": "float16",
                "served_model_name": served_model_name,
                "model_type": {"classifier": {"id2label": id2label,
                                              "label2id": {v: int(k) for k, v in id2label.items()}}},
                "max_concurrent_requests": 512, "max_input_length": 512,
                "max_batch_tokens": 16384, "max_batch_requests": None,
                "max_client_batch_size": max_client_batch_size, "auto_truncate": False,
                "tokenization_workers": 2, "version": "1.8.0", "sha": None, "docker_label": None}

    @app.post("/predict")
    async def predict(request: Request) -> Any:
        body = await request.json()
        fake.calls.append(body)
        status = fake.fault()
        if status == 429:
            return error(429, "Model is overloaded", "overloaded")
        if status == 424:
            return error(424, "Inference failed", "backend")
        if status is not None:
            return error(status, "injected", "backend")
        inputs = body.get("inputs") if isinstance(body, dict) else None
        if isinstance(inputs, str):
            batch, single = [[inputs]], True
        elif isinstance(inputs, list) and inputs and all(isinstance(i, str) for i in inputs):
            if len(inputs) > 2:
                return error(422, "invalid length 3", "validation")
            batch, single = [inputs], True  # a single string or a sentence pair
        elif isinstance(inputs, list) and inputs and all(isinstance(i, list) for i in inputs):
            batch, single = inputs, False
        elif isinstance(inputs, list) and not inputs:
            return error(400, "Batch is empty", "empty")
        else:
            return error(422, "Failed to deserialize the JSON body", "validation")
        if len(batch) > max_client_batch_size:
            return error(413, f"batch size {len(batch)} > maximum allowed batch size "
                              f"{max_client_batch_size}", "validation")
        out = []
        for sequence in batch:
            probs = expected(" ".join(sequence), fake.labels)
            ranked = sorted(probs.items(), key=lambda kv: -kv[1])
            out.append([{"label": k, "score": v} for k, v in ranked])
        return out[0] if single else out

    return app


def vllm_app(fake: FakeServer, *, served_model_name: str = "vllm-model") -> FastAPI:
    app = FastAPI()

    def error(status: int, message: str, kind: str) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind, "param": None,
                                       "code": status}}, status_code=status)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": served_model_name, "object": "model",
                                            "owned_by": "vllm", "max_model_len": 512}]}

    @app.post("/classify")
    async def classify(request: Request) -> Any:
        body = await request.json()
        fake.calls.append(body)
        status = fake.fault()
        if status is not None:
            return error(status, "injected", "BadRequestError" if status < 500 else
                         "InternalServerError")
        if body.get("model", served_model_name) != served_model_name:
            return error(404, f"The model `{body.get('model')}` does not exist.",
                         "NotFoundError")
        texts = body.get("input")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            return error(400, "input must be a string or a list of strings", "BadRequestError")
        data = []
        for index, text in enumerate(texts):
            probs = probabilities(text, fake.labels)
            data.append({"index": index, "label": fake.labels[probs.index(max(probs))],
                         "probs": probs, "num_classes": len(probs)})
        tokens = sum(len(t.split()) for t in texts)
        return {"id": f"classify-{len(fake.calls)}", "object": "list",
                "created": int(time.time()), "model": served_model_name, "data": data,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens,
                          "completion_tokens": 0, "prompt_tokens_details": None}}

    return app


@contextlib.contextmanager
def running_tei(labels: Sequence[str], **options: Any) -> Iterator[FakeServer]:
    fake = FakeServer(tuple(labels))
    with serve(tei_app(fake, **options)) as server:
        fake.server = server
        yield fake


@contextlib.contextmanager
def running_vllm(labels: Sequence[str], **options: Any) -> Iterator[FakeServer]:
    fake = FakeServer(tuple(labels))
    with serve(vllm_app(fake, **options)) as server:
        fake.server = server
        yield fake


def main() -> None:
    """Run one fake on a port, for the benches: `python -m tests.support.fake_inference tei
    --port 9000 --labels a,b,c`."""
    import argparse

    import uvicorn

    parser = argparse.ArgumentParser(description="Run a fake TEI or vLLM server.")
    parser.add_argument("kind", choices=["tei", "vllm"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--labels", default="negative,neutral,positive")
    parser.add_argument("--max-client-batch-size", type=int, default=32)
    args = parser.parse_args()
    fake = FakeServer(tuple(args.labels.split(",")))
    fake.calls = _Discard()
    app = (tei_app(fake, max_client_batch_size=args.max_client_batch_size) if args.kind == "tei"
           else vllm_app(fake))
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


class _Discard(list[Any]):
    """A calls list that keeps nothing: a bench sends more requests than are worth keeping."""

    def append(self, item: Any) -> None:
        pass


if __name__ == "__main__":
    main()
