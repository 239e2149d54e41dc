"""The gateway sees a changed tasks file at once: a watch on its directory (inotify, through
watchfiles) reports the change, and polling stays on as the fallback for filesystems that raise no
events. Each test isolates one of the two: a poll interval of an hour leaves only the watch, a
watcher built without the watch leaves only polling.

Before the watch, a task registered by `classifier-gateway finetune` was unknown to the gateway for
up to `GATEWAY_TASKS_POLL_INTERVAL_S` (2 s), so `finetune ...; classify ...` in a script got 404.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from service.commands.tasksfile import write_atomically
from service.gateway.app import create_app
from service.gateway.registry import RegistryWatcher
from service.gateway.routes.openapi import TaskList
from service.gateway.settings import Settings
from tests.integration.test_deploy_configmap_reload import ConfigMapVolume, tasks_text
from tests.support.fake_upstream import FakeUpstream, running_fake_upstream
from tests.support.servers import serve

AN_HOUR = 3600.0  # as good as never: only the watch can notice a change within a test


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    with running_fake_upstream() as fake:
        yield fake


def tasks_yaml(**models: str) -> str:
    return yaml.safe_dump({"upstreams": {"u": {"base_url": "http://127.0.0.1:9"}},
                           "tasks": {name: {"upstream": "u", "model": model}
                                     for name, model in models.items()}})


def served_models(url: str) -> dict[str, str]:
    return {t["name"]: t["model"] for t in httpx.get(f"{url}/tasks").json()["tasks"]}


def eventually(condition: Callable[[], Any], what: str, timeout_s: float = 30.0) -> None:
    """Wait for `condition`; the bound only keeps a broken build from hanging, it is not what the
    test measures (with an hour's poll interval, only an event can make it true at all)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(what)
        time.sleep(0.02)


def test_a_file_replaced_by_a_rename_is_served_without_waiting_for_a_poll(tmp_path: Path) -> None:
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(tasks_yaml(news="ft:classifier:local-ngram:v1"))
    settings = Settings(tasks_file=tasks, tasks_poll_interval_s=AN_HOUR, redis_url="")
    with serve(create_app(settings)) as server:
        listing = httpx.get(f"{server.url}/tasks").json()
        TaskList.model_validate(listing)  # the documented schema (GET /openapi.json) holds
        assert listing["tasks_file"] == str(tasks) and listing["tasks_file_watched"] is True
        assert listing["tasks_poll_interval_s"] == AN_HOUR
        write_atomically(tasks, tasks_yaml(news="ft:classifier:local-ngram:v2",
                                           sport="ft:classifier:local-ngram:s1"))
        eventually(lambda: served_models(server.url) == {
            "news": "ft:classifier:local-ngram:v2", "sport": "ft:classifier:local-ngram:s1"},
            f"the watch never reported the new file: {served_models(server.url)}")


def test_a_file_that_appears_after_start_up_is_served(tmp_path: Path) -> None:
    tasks = tmp_path / "tasks.yaml"
    settings = Settings(tasks_file=tasks, tasks_poll_interval_s=AN_HOUR, redis_url="")
    with serve(create_app(settings)) as server:
        assert httpx.get(f"{server.url}/readyz").status_code == 503
        write_atomically(tasks, tasks_yaml(news="ft:classifier:local-ngram:v1"))
        eventually(lambda: httpx.get(f"{server.url}/readyz").status_code == 200,
                   "the gateway never loaded the file that appeared")
        assert served_models(server.url) == {"news": "ft:classifier:local-ngram:v1"}


def test_a_configmap_symlink_swap_is_seen_by_the_watch(tmp_path: Path,
                                                       upstream: FakeUpstream) -> None:
    volume = ConfigMapVolume(tmp_path / "etc-classifier-gateway")
    volume.publish({"tasks.yaml": tasks_text(upstream, sentiment="ft:classifier:local-ngram:v1")})
    settings = Settings(tasks_file=volume.root / "tasks.yaml", tasks_poll_interval_s=AN_HOUR,
                        redis_url="")
    with serve(create_app(settings)) as server:
        volume.publish({"tasks.yaml": tasks_text(upstream, sentiment="ft:classifier:local-ngram:v2")})
        eventually(lambda: served_models(server.url) == {
            "sentiment": "ft:classifier:local-ngram:v2"},
            f"the watch missed the ..data swap: {served_models(server.url)}")


async def test_polling_alone_still_sees_changes(tmp_path: Path) -> None:
    """The fallback: with no watch (a filesystem without events), polling finds the change."""
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(tasks_yaml(news="ft:classifier:local-ngram:v1"))
    watcher = RegistryWatcher(tasks, poll_interval_s=0.05, watch=False)
    assert watcher.reload()
    await watcher.start()
    try:
        assert not watcher.watching
        write_atomically(tasks, tasks_yaml(news="ft:classifier:local-ngram:v2"))
        for _ in range(600):
            if watcher.current.tasks["news"].model.endswith(":v2"):
                break
            await asyncio.sleep(0.05)
        assert watcher.current.tasks["news"].model == "ft:classifier:local-ngram:v2"
    finally:
        await watcher.stop()


async def test_a_directory_that_cannot_be_watched_falls_back_to_polling(tmp_path: Path) -> None:
    """The watch needs the directory; where it is missing at start-up the gateway says so and
    polls, and serves the file once the directory and the file appear."""
    tasks = tmp_path / "not-yet" / "tasks.yaml"
    watcher = RegistryWatcher(tasks, poll_interval_s=0.05)
    watcher.reload()
    await watcher.start()
    try:
        for _ in range(100):
            if not watcher.watching:
                break
            await asyncio.sleep(0.01)
        assert not watcher.watching
        os.mkdir(tasks.parent)
        tasks.write_text(tasks_yaml(news="ft:classifier:local-ngram:v1"))
        for _ in range(600):
            if watcher.loaded:
                break
            await asyncio.sleep(0.05)
        assert list(watcher.current.tasks) == ["news"]
    finally:
        await watcher.stop()
