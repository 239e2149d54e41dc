"""The API docs still describe the hot routes' bodies, which are parsed outside FastAPI's machinery."""

from __future__ import annotations

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
    assert schemas["ClassifyRequest"]["required"] == ["task", "input"]
    assert "Conversation" in schemas and "Message" in schemas  # nested models are resolvable
    params = doc["paths"]["/classify"]["post"]["parameters"]
    assert params[0]["name"] == "Cache-Control"
