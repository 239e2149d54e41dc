"""The gateway in front of the real factory (not a fake upstream): both on real uvicorn ports,
the tasks file written by the demo's own code, the demo datasets trained for real."""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from mistralai.client import Mistral

from service.commands.demo_runner import TASKS, train_task, write_tasks_file
from service.gateway.app import create_app
from service.gateway.settings import Settings
from tests.support.factory import running_factory
from tests.support.redis_server import RedisServer
from tests.support.servers import serve


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory,
          redis_server: RedisServer) -> Iterator[dict[str, Any]]:
    directory = tmp_path_factory.mktemp("stack")
    with running_factory(directory / "factory") as factory:
        with httpx.Client(base_url=factory.url, timeout=60) as client:
            models = {task.name: train_task(client, task) for task in TASKS}
        tasks_file = directory / "tasks.yaml"
        write_tasks_file(tasks_file, factory.url, models)
        settings = Settings(tasks_file=tasks_file, redis_url=redis_server.url,
                            cache_prefix=f"test:{uuid.uuid4().hex[:8]}")
        with serve(create_app(settings)) as gateway:
            yield {"gateway": gateway.url, "factory": factory.url, "models": models,
                   "directory": directory}


def test_text_task_through_the_gateway(stack: dict[str, Any]) -> None:
    inputs = ["I love this product!", "The delivery was awful, never again.",
              "The jacket arrived on Tuesday."]
    r = httpx.post(f"{stack['gateway']}/classify", json={"task": "sentiment", "input": inputs})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == stack["models"]["sentiment"]
    assert [res["sentiment"]["label"] for res in body["results"]] == [
        "positive", "negative", "neutral"]
    for res in body["results"]:
        assert math.isclose(sum(res["sentiment"]["scores"].values()), 1.0, abs_tol=1e-4)
    again = httpx.post(f"{stack['gateway']}/classify", json={"task": "sentiment",
                                                             "input": inputs})
    assert again.headers["x-cache"] == "hit"
    assert again.json()["results"] == body["results"]


def test_chat_task_through_the_gateway(stack: dict[str, Any]) -> None:
    conversations = [
        {"messages": [{"role": "user", "content": "Hello!"},
                      {"role": "assistant", "content": "Hi, how can I help?"},
                      {"role": "user", "content": "I want my money back for the phone"}]},
        {"messages": [{"role": "user", "content": "Can you cancel my order please?"}]},
    ]
    r = httpx.post(f"{stack['gateway']}/classify-chat", json={"task": "intent",
                                                               "input": conversations})
    assert r.status_code == 200, r.text
    assert [res["intent"]["label"] for res in r.json()["results"]] == ["refund", "cancel_order"]


def test_mistral_compatible_route_through_the_gateway(stack: dict[str, Any]) -> None:
    direct = httpx.post(f"{stack['factory']}/v1/classifications", json={
        "model": stack["models"]["sentiment"], "input": ["Fantastic camera"]}).json()
    via = httpx.post(f"{stack['gateway']}/v1/classifications", json={
        "model": "sentiment", "input": ["Fantastic camera"]})
    assert via.status_code == 200, via.text
    assert via.json()["results"][0]["sentiment"]["scores"] == \
        direct["results"][0]["sentiment"]["scores"]


def factory_requests(factory_url: str) -> float:
    """Classification requests the factory has served, from its own metrics."""
    text = httpx.get(f"{factory_url}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith('factory_classify_duration_seconds_count{endpoint="classifications"'))


async def test_concurrent_requests_reach_the_factory_in_batches(stack: dict[str, Any]) -> None:
    tasks_file = stack["directory"] / "batching-tasks.yaml"
    write_tasks_file(tasks_file, stack["factory"], stack["models"])
    settings = Settings(tasks_file=tasks_file, max_concurrent_batches=1, max_wait_ms=20)
    n = 48
    with serve(create_app(settings)) as gateway:
        before = factory_requests(stack["factory"])
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30,
                                     limits=httpx.Limits(max_connections=n)) as client:
            responses = await asyncio.gather(*[
                client.post("/classify", json={"task": "sentiment",
                                               "input": f"review number {i}: I love it"})
                for i in range(n)])
        calls = factory_requests(stack["factory"]) - before
    assert all(r.status_code == 200 for r in responses)
    assert all(r.json()["results"][0]["sentiment"]["label"] == "positive" for r in responses)
    assert calls < n / 2, f"{calls} factory calls for {n} single-item requests"


def test_official_sdk_through_the_gateway_to_the_factory(stack: dict[str, Any]) -> None:
    client = Mistral(api_key="unused", server_url=stack["gateway"])
    result = client.classifiers.classify(model="sentiment", inputs=["Terrible, it broke at once"])
    assert result.model == stack["models"]["sentiment"]
    scores = result.results[0]["sentiment"].scores
    assert max(scores, key=scores.__getitem__) == "negative"
