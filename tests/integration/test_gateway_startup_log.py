"""The gateway's start-up log says which result cache it uses: `serve` runs uncached unless told,
where the demo picks up a local Redis, and a user comparing the two had no way to tell."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from service.gateway.app import create_app
from service.gateway.settings import Settings
from tests.support.redis_server import RedisServer
from tests.support.servers import serve


def startup_lines(caplog: pytest.LogCaptureFixture, settings: Settings) -> list[str]:
    with caplog.at_level(logging.INFO, logger="service.gateway"), serve(create_app(settings)):
        pass
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("result cache:")]


def test_without_redis_the_log_says_there_is_no_cache(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    lines = startup_lines(caplog, Settings(tasks_file=tmp_path / "tasks.yaml", redis_url=""))
    assert lines == ["result cache: none (GATEWAY_REDIS_URL or --redis-url is empty): every "
                     "request goes to its upstream"]


def test_with_redis_the_log_names_it(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                     redis_server: RedisServer) -> None:
    lines = startup_lines(caplog, Settings(tasks_file=tmp_path / "tasks.yaml",
                                           redis_url=redis_server.url, cache_ttl_s=60))
    assert len(lines) == 1
    assert lines[0].startswith("result cache: Redis at ") and "TTL 60s" in lines[0]
    assert str(redis_server.port) in lines[0]
