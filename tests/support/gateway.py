"""A real gateway (uvicorn on a loopback port) in front of the fake upstream, for integration tests."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from service.gateway.app import create_app
from service.gateway.server import GatewayServer
from service.gateway.settings import Settings
from tests.support.fake_upstream import FakeUpstream, running_fake_upstream
from tests.support.redis_server import free_port
from tests.support.servers import ThreadedServer, serve

DEFAULT_TASKS: dict[str, dict[str, Any]] = {
    "sentiment": {"upstream": "fake", "model": "ft:classifier:test:sentiment", "kind": "text"},
    "intent": {"upstream": "fake", "model": "ft:classifier:test:intent", "kind": "chat"},
}


def write_tasks(path: Path, upstream_url: str, tasks: dict[str, dict[str, Any]],
                api_key_env: str | None = None, proxy: str | None = None) -> None:
    upstream: dict[str, Any] = {"base_url": upstream_url}
    if api_key_env:
        upstream["api_key_env"] = api_key_env
    if proxy:
        upstream["proxy"] = proxy
    path.write_text(yaml.safe_dump({"upstreams": {"fake": upstream}, "tasks": tasks}))


@dataclass
class GatewayStack:
    url: str
    upstream: FakeUpstream
    tasks_file: Path
    settings: Settings
    server: ThreadedServer

    def set_tasks(self, tasks: dict[str, dict[str, Any]]) -> None:
        write_tasks(self.tasks_file, str(self.upstream.url), tasks)



@contextlib.contextmanager
def gateway_stack(tmp_path: Path, *, redis_url: str = "", tasks: dict[str, dict[str, Any]] | None = None,
                  targets: dict[str, list[str]] | None = None, api_key_env: str | None = None,
                  proxy: str | None = None, gateway_server: bool = False,
                  **settings: Any) -> Iterator[GatewayStack]:
    """`gateway_server`: run the gateway's own server (connection limits, shutdown), as
    `classifier-gateway serve` does, instead of a plain uvicorn server."""
    with running_fake_upstream(targets) as upstream:
        tasks_file = tmp_path / "tasks.yaml"
        write_tasks(tasks_file, str(upstream.url), tasks if tasks is not None else DEFAULT_TASKS,
                    api_key_env, proxy)
        config: dict[str, Any] = {
            "tasks_file": tasks_file, "redis_url": redis_url,
            "cache_prefix": f"test:{uuid.uuid4().hex[:8]}", "tasks_poll_interval_s": 0.1,
            "retry_backoff_s": 0.01, "drain_timeout_s": 2.0,
        }
        config.update(settings)
        gw_settings = Settings(**config)
        app = create_app(gw_settings)
        if gateway_server:
            own = GatewayServer.for_app(app, gw_settings, app.state.lifecycle, port=free_port(),
                                        log_level="warning")
            server = ThreadedServer(None, server=own).start()
        else:
            server = ThreadedServer(app).start()
        try:
            yield GatewayStack(server.url, upstream, tasks_file, gw_settings, server)
        finally:
            server.stop()


@contextlib.contextmanager
def gateway_for(tmp_path: Path, redis_url: str, upstreams: dict[str, Any],
                tasks: dict[str, Any], **settings: Any) -> Iterator[str]:
    """A real gateway (its URL) on a tasks file of several upstreams, any protocols."""
    tasks_file = tmp_path / "tasks.yaml"
    tasks_file.write_text(yaml.safe_dump({"upstreams": upstreams, "tasks": tasks}))
    config: dict[str, Any] = {"tasks_file": tasks_file, "redis_url": redis_url,
                              "cache_prefix": f"test:{uuid.uuid4().hex[:8]}",
                              "retry_backoff_s": 0.01, "drain_timeout_s": 2.0, **settings}
    with serve(create_app(Settings(**config))) as server:
        yield server.url
