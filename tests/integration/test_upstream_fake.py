"""The fake upstream itself: Mistral's shape, deterministic scores, recorded calls and every fault."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator

import httpx
import pytest

from tests.support.fake_upstream import (
    Drop,
    FakeUpstream,
    Slow,
    Status,
    WrongCount,
    expected_result,
    expected_scores,
    running_fake_upstream,
)
from tests.support.servers import serve


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    with running_fake_upstream() as fake:
        yield fake


@pytest.fixture
def client(fake: FakeUpstream) -> Iterator[httpx.Client]:
    fake.reset()
    fake.delay_s = 0.0
    assert fake.url is not None
    with httpx.Client(base_url=fake.url, timeout=10) as client:
        yield client


def test_expected_scores_are_deterministic_softmax_and_key_order_free() -> None:
    a = expected_scores({"messages": [{"role": "user", "content": "hi"}]})
    b = expected_scores({"messages": [{"content": "hi", "role": "user"}]})
    assert a == b
    assert set(a) == {"sentiment"}
    assert math.isclose(sum(a["sentiment"].values()), 1.0)
    assert expected_scores("good") != expected_scores("bad")
    multi = expected_scores("x", {"food": ["a", "b"], "country": ["ch", "fr", "it"]})
    assert set(multi["country"]) == {"ch", "fr", "it"}
    assert all(math.isclose(sum(s.values()), 1.0) for s in multi.values())


def test_text_classification_in_mistral_shape(fake: FakeUpstream, client: httpx.Client) -> None:
    response = client.post("/v1/classifications", json={"model": "ft:any", "input": ["b", "a"]},
                           headers={"Authorization": "Bearer k1"})
    assert response.status_code == 200
    body = response.json()
    assert re.fullmatch(r"[0-9a-f]{32}", body["id"])
    assert body["model"] == "ft:any"
    assert body["results"] == [expected_result(t) for t in ("b", "a")]
    assert [(c.endpoint, c.model, c.inputs, c.authorization) for c in fake.calls] == [
        ("classifications", "ft:any", ["b", "a"], "Bearer k1")]


def test_single_string_and_chat_inputs_are_recorded_as_lists(fake: FakeUpstream,
                                                             client: httpx.Client) -> None:
    assert client.post("/v1/classifications", json={"model": "m", "input": "one"}).status_code == 200
    conv = {"messages": [{"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "yo", "prefix": False}]}
    response = client.post("/v1/chat/classifications", json={"model": "m", "input": conv})
    assert response.status_code == 200
    assert response.json()["results"] == [expected_result(conv)]
    assert [c.inputs for c in fake.calls] == [["one"], [conv]]
    assert [c.endpoint for c in fake.calls] == ["classifications", "chat/classifications"]
    assert fake.calls[0].authorization is None


@pytest.mark.parametrize("body", [{"model": "m", "inputs": ["x"]}, {"model": "m"}, {"input": "x"},
                                  {"model": "m", "input": [{"messages": []}]}])
def test_bad_bodies_get_422_detail(client: httpx.Client, body: dict[str, object]) -> None:
    path = "/v1/chat/classifications" if isinstance(body.get("input"), list) else "/v1/classifications"
    response = client.post(path, json=body)
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert detail and all(d["loc"][0] == "body" for d in detail)


def test_status_fault_with_retry_after_then_normal(fake: FakeUpstream, client: httpx.Client) -> None:
    fake.inject(Status(429, retry_after=0.5), Status(503, body={"message": "down"}))
    first = client.post("/v1/classifications", json={"model": "m", "input": "x"})
    assert first.status_code == 429
    assert first.headers["retry-after"] == "0.5"
    assert first.json()["type"] == "rate_limit_error"
    second = client.post("/v1/classifications", json={"model": "m", "input": "x"})
    assert (second.status_code, second.json()) == (503, {"message": "down"})
    assert client.post("/v1/classifications", json={"model": "m", "input": "x"}).status_code == 200
    assert len(fake.calls) == 3
    assert fake.pending_faults() == 0


def test_wrong_count_fault(fake: FakeUpstream, client: httpx.Client) -> None:
    fake.inject(WrongCount(), WrongCount(2))
    body = {"model": "m", "input": ["a", "b", "c"]}
    assert len(client.post("/v1/classifications", json=body).json()["results"]) == 2
    assert len(client.post("/v1/classifications", json=body).json()["results"]) == 5


def test_slow_fault_and_delay(fake: FakeUpstream, client: httpx.Client) -> None:
    fake.inject(Slow(5.0))
    with pytest.raises(httpx.ReadTimeout):
        client.post("/v1/classifications", json={"model": "m", "input": "x"}, timeout=0.2)
    fake.delay_s = 5.0
    with pytest.raises(httpx.ReadTimeout):
        client.post("/v1/classifications", json={"model": "m", "input": "x"}, timeout=0.2)
    fake.delay_s = 0.0
    assert client.post("/v1/classifications", json={"model": "m", "input": "x"}).status_code == 200


def test_drop_closes_without_response(fake: FakeUpstream, client: httpx.Client) -> None:
    fake.inject(Drop())
    with pytest.raises(httpx.RemoteProtocolError):
        client.post("/v1/classifications", json={"model": "m", "input": "x"})
    assert client.post("/v1/classifications", json={"model": "m", "input": "x"}).status_code == 200
    assert len(fake.calls) == 2


def test_api_key_and_unknown_paths() -> None:
    fake = FakeUpstream({"t": ["y", "n"]}, api_key="s3cret")
    with serve(fake.app) as server, httpx.Client(base_url=server.url) as client:
        assert client.post("/v1/classifications", json={"model": "m", "input": "x"}).status_code == 401
        ok = client.post("/v1/classifications", json={"model": "m", "input": "x"},
                         headers={"Authorization": "Bearer s3cret"})
        assert ok.json()["results"] == [expected_result("x", {"t": ["y", "n"]})]
        assert client.post("/v1/moderations", json={}).status_code == 404
        assert client.get("/v1/classifications").status_code == 405
    assert len(fake.calls) == 2
