"""The tasks file mounted from a ConfigMap hot-reloads, as the Kubernetes manifests rely on.

The kubelet never edits a mounted ConfigMap file in place: it writes the new content into a fresh
timestamped directory, swaps the `..data` symlink to it in one rename, and deletes the old
directory; `tasks.yaml` itself is a symlink to `..data/tasks.yaml`. This lays out a volume exactly
so, runs a real gateway on it, and swaps the content the kubelet's way.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from service.gateway.app import create_app
from service.gateway.settings import Settings
from tests.support.fake_upstream import FakeUpstream, running_fake_upstream
from tests.support.servers import serve


class ConfigMapVolume:
    """A directory laid out like the kubelet's atomic writer lays out a ConfigMap volume."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.generation = 0
        root.mkdir(parents=True)

    def publish(self, files: dict[str, str]) -> None:
        self.generation += 1
        payload = self.root / f"..2026_11_23_00_00_{self.generation:02d}.000000001"
        payload.mkdir()
        for name, text in files.items():
            (payload / name).write_text(text)
        old = os.readlink(self.root / "..data") if (self.root / "..data").is_symlink() else None
        tmp_link = self.root / "..data_tmp"
        os.symlink(payload.name, tmp_link)
        os.replace(tmp_link, self.root / "..data")  # the atomic swap
        for name in files:
            link = self.root / name
            if not link.is_symlink():
                os.symlink(f"..data/{name}", link)
        if old is not None:
            for child in (self.root / old).iterdir():
                child.unlink()
            (self.root / old).rmdir()


def tasks_text(upstream: FakeUpstream, **tasks: str) -> str:
    return yaml.safe_dump({
        "upstreams": {"local": {"base_url": str(upstream.url)}},
        "tasks": {name: {"upstream": "local", "model": model} for name, model in tasks.items()},
    })


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    with running_fake_upstream() as fake:
        yield fake


def wait_for_tasks(url: str, predicate: Any, timeout_s: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        body: dict[str, Any] = httpx.get(f"{url}/tasks").json()
        if predicate(body):
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"the gateway never reloaded; /tasks says {body}")
        time.sleep(0.05)


def test_a_configmap_update_is_picked_up_without_a_restart(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    volume = ConfigMapVolume(tmp_path / "etc-classifier-gateway")
    volume.publish({"tasks.yaml": tasks_text(upstream, sentiment="ft:classifier:local-ngram:v1")})
    settings = Settings(tasks_file=volume.root / "tasks.yaml", tasks_poll_interval_s=0.05)
    with serve(create_app(settings)) as server:
        names = [t["name"] for t in httpx.get(f"{server.url}/tasks").json()["tasks"]]
        assert names == ["sentiment"]

        volume.publish({"tasks.yaml": tasks_text(upstream, sentiment="ft:classifier:local-ngram:v2",
                                                 spam="ft:classifier:local-ngram:spam")})
        body = wait_for_tasks(server.url, lambda b: len(b["tasks"]) == 2)
        models = {t["name"]: t["model"] for t in body["tasks"]}
        assert models == {"sentiment": "ft:classifier:local-ngram:v2",
                          "spam": "ft:classifier:local-ngram:spam"}
        response = httpx.post(f"{server.url}/classify", json={"task": "spam", "input": "win now"})
        assert response.status_code == 200, response.text
        assert response.json()["model"] == "ft:classifier:local-ngram:spam"


def test_a_bad_configmap_update_keeps_the_last_good_tasks(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    volume = ConfigMapVolume(tmp_path / "etc-classifier-gateway")
    volume.publish({"tasks.yaml": tasks_text(upstream, sentiment="ft:classifier:local-ngram:v1")})
    settings = Settings(tasks_file=volume.root / "tasks.yaml", tasks_poll_interval_s=0.05)
    with serve(create_app(settings)) as server:
        bad = tasks_text(upstream, sentiment="ft:classifier:local-ngram:v1").replace(
            "model:", "modle:")
        volume.publish({"tasks.yaml": bad})
        body = wait_for_tasks(server.url, lambda b: b.get("last_reload_error"))
        assert "modle" in body["last_reload_error"]
        assert [t["model"] for t in body["tasks"]] == ["ft:classifier:local-ngram:v1"]
        assert httpx.get(f"{server.url}/readyz").status_code == 200
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'gateway_registry_reloads_total{result="error"} 1.0' in metrics
