"""A bounded schemathesis run against a real gateway (issue 10, item 5): for every operation of the
OpenAPI document, `EXAMPLES` generated requests (fixed seed), each checked for no 5xx, a documented
status code, a documented content type and headers, and a body that matches its documented schema.

Half the classification bodies name a real task or model, so that the 200 path is checked too, not
only the 4xx ones; `sentiment` answers text and `intent` chat.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.support.gateway import DEFAULT_TASKS, gateway_stack
from tests.support.redis_server import RedisServer

EXAMPLES = 10  # per operation (13 operations): about 13 s on 2 busy cores
KEY = "ck-" + secrets.token_hex(8)
REAL = {"task": ["sentiment", "intent"], "model": [task["model"] for task in DEFAULT_TASKS.values()]}


@pytest.fixture(scope="module")
def gateway_schema(tmp_path_factory: pytest.TempPathFactory,
                   redis_server: RedisServer) -> Iterator[Any]:
    # With Redis: the cache, shadow counts and feedback answer as in production.
    with gateway_stack(tmp_path_factory.mktemp("schemathesis"), redis_url=redis_server.url,
                       api_keys=KEY) as stack:
        yield schemathesis.openapi.from_url(f"{stack.url}/openapi.json",
                                            headers={"Authorization": f"Bearer {KEY}"})


schema = schemathesis.pytest.from_fixture("gateway_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES, derandomize=True, deadline=None,
          suppress_health_check=list(HealthCheck))
def test_every_answer_is_documented(case: Any) -> None:
    body = case.body
    if isinstance(body, dict):
        for field, names in REAL.items():
            if isinstance(body.get(field), str) and len(str(body)) % 2 == 0:
                body[field] = names[len(str(body)) % 4 // 2]
        if isinstance(body.get("tasks"), list) and body["tasks"] and len(str(body)) % 2 == 0:
            # Fan-out, often on the route's real task (or, from two names on, a mix: a 400).
            own = "intent" if case.path == "/classify-chat" else "sentiment"
            body["tasks"] = [own] if len(body["tasks"]) == 1 else ["sentiment", "intent"]
            body.pop("task", None)
    case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"}, checks=[
        not_a_server_error, status_code_conformance, content_type_conformance,
        response_headers_conformance, response_schema_conformance])


ADMIN_KEY = "admin-" + secrets.token_hex(16)


@pytest.fixture(scope="module")
def admin_stack(tmp_path_factory: pytest.TempPathFactory,
                redis_server: RedisServer) -> Iterator[Any]:
    with gateway_stack(tmp_path_factory.mktemp("schemathesis-admin"),
                       redis_url=redis_server.url, api_keys=KEY, admin_key=ADMIN_KEY) as stack:
        yield stack


@pytest.fixture(scope="module")
def admin_schema(admin_stack: Any) -> Any:
    # The document is a client's to read (GATEWAY_ADMIN_KEY opens /admin/ only).
    return schemathesis.openapi.from_url(f"{admin_stack.url}/openapi.json",
                                         headers={"Authorization": f"Bearer {KEY}"}
                                         ).include(path_regex="^/admin/")


admin = schemathesis.pytest.from_fixture("admin_schema")


@admin.parametrize()
@settings(max_examples=EXAMPLES, derandomize=True, deadline=None,
          suppress_health_check=list(HealthCheck))
def test_every_admin_answer_is_documented(case: Any) -> None:
    """The admin API with its key: bodies out of range, unknown ids, bad tenants."""
    case.call_and_validate(headers={"Authorization": f"Bearer {ADMIN_KEY}"}, checks=[
        not_a_server_error, status_code_conformance, content_type_conformance,
        response_headers_conformance, response_schema_conformance])


def test_admin_routes_refuse_missing_wrong_and_client_keys(admin_stack: Any) -> None:
    document = httpx.get(f"{admin_stack.url}/openapi.json",
                         headers={"Authorization": f"Bearer {KEY}"}).json()
    operations = [(method, path.replace("{key_id}", "0123456789abcdef").replace(
        "{tenant}", "acme")) for path, item in document["paths"].items()
        if path.startswith("/admin/") for method in item]
    assert len(operations) >= 9
    bodies = set()
    for method, path in operations:
        for header in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {KEY}"},
                       {"Authorization": "Basic " + "x" * 5000}):
            answer = httpx.request(method, f"{admin_stack.url}{path}", headers=header,
                                   json={})
            assert answer.status_code == 401, (method, path, header.keys(), answer.text)
            bodies.add(answer.text)
    assert len(bodies) == 1 and KEY not in bodies.pop()
