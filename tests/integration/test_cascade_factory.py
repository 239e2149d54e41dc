"""A cascade in front of the real factory: two local-ngram models trained for real (a small one on
40 examples, a bigger one on 400), so that their scores differ; each item's answer must be the one
its named model gives when asked directly, and the first model's own margins decide which items
escalate."""

from __future__ import annotations

import statistics
import uuid
from pathlib import Path

import httpx
import yaml

from service.gateway.app import create_app
from service.gateway.settings import Settings
from tests.integration.test_cascade import cached
from tests.support.factory import FactoryClient, jsonl, running_factory, sentiment_rows
from tests.support.redis_server import RedisServer
from tests.support.servers import serve


def margin(scores: dict[str, float]) -> float:
    top, second = sorted(scores.values(), reverse=True)[:2]
    return top - second


async def test_a_cascade_of_two_trained_models(tmp_path: Path, redis_server: RedisServer) -> None:
    texts = [row["text"] for row in sentiment_rows(40, seed=3)]
    with running_factory(tmp_path / "factory") as factory:
        client = FactoryClient(factory.url)
        try:
            small = client.train(jsonl(sentiment_rows(40, seed=1)))["fine_tuned_model"]
            large = client.train(jsonl(sentiment_rows(400, seed=2)))["fine_tuned_model"]
            direct = {model: [result["sentiment"]["scores"] for result in client.http.post(
                "/v1/classifications", json={"model": model, "input": texts}).json()["results"]]
                for model in (small, large)}
        finally:
            client.close()
        min_margin = statistics.median(margin(scores) for scores in direct[small])
        sure = [margin(scores) >= min_margin for scores in direct[small]]
        assert 0 < sum(sure) < len(texts)
        tasks_file = tmp_path / "tasks.yaml"
        tasks_file.write_text(yaml.safe_dump({
            "upstreams": {"local": {"base_url": factory.url}},
            "tasks": {"sentiment": {"upstream": "local", "cascade": [
                {"model": small, "min_margin": min_margin}, {"model": large}]}}}))
        prefix = f"test:{uuid.uuid4().hex[:8]}"
        settings = Settings(tasks_file=tasks_file, redis_url=redis_server.url,
                            cache_prefix=prefix)
        with serve(create_app(settings)) as gateway:
            async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as http:
                r = await http.post("/classify", json={"task": "sentiment", "input": texts})
                await cached(redis_server.url, prefix, len(texts) + len(texts) - sum(sure))
                again = await http.post("/classify", json={"task": "sentiment", "input": texts})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["models"] == [small if ok else large for ok in sure]
    for i, (model, result) in enumerate(zip(body["models"], body["results"], strict=True)):
        assert result["sentiment"]["scores"] == direct[model][i]
    assert again.headers["x-cache"] == "hit"  # each stage's answers, cached under its model
    assert again.json()["models"] == body["models"]
