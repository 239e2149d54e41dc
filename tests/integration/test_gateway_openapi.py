"""The API docs describe the hot routes' bodies (parsed outside FastAPI's machinery) and every status
any route can answer; a body over the limit always gets the 413 the docs promise."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx

from tests.support.gateway import gateway_stack


async def test_openapi_documents_every_classification_body(tmp_path: Path) -> None:
    with gateway_stack(tmp_path) as s:
        async with httpx.AsyncClient(base_url=s.url) as client:
            doc = (await client.get("/openapi.json")).json()
    schemas = doc["components"]["schemas"]
    for path, model in [("/classify", "ClassifyRequest"), ("/classify-chat", "ClassifyChatRequest"),
                        ("/v1/classifications", "ClassificationRequest"),
                        ("/v1/chat/classifications", "ChatClassificationRequest")]:
        body = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{model}"}
        assert model in schemas
    for model in ("ClassifyRequest", "ClassifyChatRequest"):  # one task, or several (fan-out)
        assert schemas[model]["required"] == ["input"]
        assert schemas[model]["oneOf"] == [{"required": ["task"]}, {"required": ["tasks"]}]
        assert schemas[model]["properties"]["tasks"]["type"] == "array"
    assert "Conversation" in schemas and "Message" in schemas  # nested models are resolvable
    params = doc["paths"]["/classify"]["post"]["parameters"]
    assert params[0]["name"] == "Cache-Control"


async def test_openapi_documents_every_status_with_its_schema(tmp_path: Path) -> None:
    with gateway_stack(tmp_path) as s:
        async with httpx.AsyncClient(base_url=s.url) as client:
            doc = (await client.get("/openapi.json")).json()
    ref = "#/components/schemas/{}".format
    for path in ("/classify", "/classify-chat", "/v1/classifications", "/v1/chat/classifications"):
        responses = doc["paths"][path]["post"]["responses"]
        assert sorted(responses) == ["200", "400", "401", "403", "404", "408", "413", "422",
                                     "429", "502", "503", "504"], path
        for status, entry in responses.items():
            schema = entry["content"]["application/json"]["schema"]
            if status == "422":
                assert schema == {"$ref": ref("ValidationErrorResponse")}
            elif status != "200":
                assert schema == {"$ref": ref("ErrorResponse")}, (path, status)
        assert "Retry-After" in responses["503"]["headers"]
        assert "Retry-After" in responses["429"]["headers"]
        for answer in ("200", "429"):  # the quota's IETF headers (docs/tenants.md)
            assert {"RateLimit", "RateLimit-Policy"} <= set(responses[answer]["headers"])
    for path in ("/classify", "/classify-chat"):
        assert doc["paths"][path]["post"]["responses"]["200"]["content"]["application/json"][
            "schema"]["anyOf"] == [{"$ref": ref("ClassifyResponse")},
                                   {"$ref": ref("ClassifyTasksResponse")}]
    per_task = doc["components"]["schemas"]["ClassifyTasksResponse"]["properties"]["tasks"]
    assert per_task["additionalProperties"]["anyOf"] == [{"$ref": ref("ClassifyResponse")},
                                                         {"$ref": ref("ErrorResponse")}]
    metrics = doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]
    assert sorted(doc["paths"]["/tasks/{name}"]["get"]["responses"]) == ["200", "401", "404", "422"]
    assert sorted(doc["paths"]["/readyz"]["get"]["responses"]) == ["200", "503"]
    admin = {path for path in doc["paths"] if path.startswith("/admin/")}
    assert admin == {"/admin/keys", "/admin/keys/{key_id}", "/admin/keys/{key_id}/rotate",
                     "/admin/keys/{key_id}/usage", "/admin/usage", "/admin/tenants/{tenant}",
                     "/admin/tasks/{name}/cascade/{stage}"}
    assert sorted(doc["paths"]["/admin/tasks/{name}/cascade/{stage}"]["post"]["responses"]) == [
        "200", "400", "401", "404", "413", "422", "502", "503", "504"]
    assert sorted(doc["paths"]["/admin/keys"]["post"]["responses"]) == [
        "201", "400", "401", "404", "422", "503"]


BIG = 8 * 1024 * 1024


async def chunks(body: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(body), 65536):
        yield body[start:start + 65536]


async def test_an_8_mb_body_always_gets_its_413(tmp_path: Path) -> None:
    """With `Connection: close` the gateway used to answer and close while the client was still
    sending: the client got a reset instead of the 413 (every time). Each way of sending, 3 times."""
    body = b'{"task": "sentiment", "input": "' + b"x" * BIG + b'"}'
    with gateway_stack(tmp_path, api_keys="k1") as s:
        for headers in ({"connection": "close"}, {}):
            for streamed in (False, True):
                for _ in range(3):
                    async with httpx.AsyncClient(base_url=s.url, timeout=30) as client:
                        r = await client.post(
                            "/classify", content=chunks(body) if streamed else body,
                            headers={**headers, "authorization": "Bearer k1",
                                     "content-type": "application/json"})
                    assert r.status_code == 413, r.text
                    assert r.json()["error"]["type"] == "payload_too_large"
        async with httpx.AsyncClient(base_url=s.url, timeout=30) as client:  # no key: 401, too
            r = await client.post("/classify", content=body, headers={"connection": "close"})
        assert r.status_code == 401
