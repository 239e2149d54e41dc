"""The official `mistralai` SDK, unchanged, against the gateway's Mistral-compatible endpoints."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from mistralai.client import Mistral
from mistralai.client.errors import HTTPValidationError, SDKError

from tests.support.fake_upstream import expected_scores
from tests.support.gateway import gateway_stack
from tests.support.redis_server import RedisServer


async def test_official_sdk_classifies_through_the_gateway(tmp_path: Path,
                                                           redis_server: RedisServer) -> None:
    with gateway_stack(tmp_path, redis_url=redis_server.url, api_keys="client-key") as s:
        def run() -> None:
            client = Mistral(api_key="client-key", server_url=s.url)
            # `model` may be a task name...
            by_task = client.classifiers.classify(model="sentiment", inputs=["good", "bad"])
            assert by_task.model == "ft:classifier:test:sentiment"
            assert [r["sentiment"].scores for r in by_task.results] == [
                pytest.approx(expected_scores(t)["sentiment"]) for t in ["good", "bad"]]
            time.sleep(0.3)  # cache writes are off the response path
            # ... or the model id itself, as code written for Mistral's API sends it.
            by_model = client.classifiers.classify(model="ft:classifier:test:sentiment",
                                                   inputs="good")
            assert by_model.results[0]["sentiment"].scores == by_task.results[0]["sentiment"].scores

            chat = client.classifiers.classify_chat(model="intent", input=[  # type: ignore[arg-type]
                {"messages": [{"role": "user", "content": "book a table"},
                              {"role": "assistant", "content": "for how many?"}]},
            ])
            assert len(chat.results) == 1 and "sentiment" in chat.results[0]

            with pytest.raises(SDKError) as unknown:
                client.classifiers.classify(model="no-such-task", inputs=["x"])
            assert unknown.value.status_code == 404
            with pytest.raises(SDKError) as unauthorized:
                Mistral(api_key="wrong", server_url=s.url).classifiers.classify(
                    model="sentiment", inputs=["x"])
            assert unauthorized.value.status_code == 401
            with pytest.raises(HTTPValidationError):
                client.classifiers.classify(model="sentiment", inputs=[])

        await asyncio.to_thread(run)
    sent = [call.inputs for call in s.upstream.calls]
    assert sent[0] == ["good", "bad"]
    assert ["good"] not in sent  # the second call was answered from the cache
    assert s.upstream.calls[-1].endpoint == "chat/classifications"
