"""Debian's Chromium, headless, driven over the DevTools protocol on a pipe.

`--remote-debugging-pipe` makes Chromium read commands from its fd 3 and write replies and events to
its fd 4, each message JSON ended by a NUL byte: no WebSocket client, no driver to download. The
browser resolves no host name (`--host-resolver-rules`), so a page that needs the internet fails
here as it would on a machine without it, and every request it makes is recorded.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import queue
import shutil
import subprocess
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio",
    "--host-resolver-rules=MAP * ~NOTFOUND",
)


def chromium_binary() -> str:
    """Chromium is a requirement of the tests that use it: missing, they fail rather than skip."""
    for name in ("chromium", "chromium-browser"):
        binary = shutil.which(name)
        if binary is not None:
            return binary
    pytest.fail("chromium is not installed: `apt-get install chromium fonts-dejavu-core` "
                "(the CI script .ci/run installs them)")


class Chromium:
    """One headless browser with one tab (`session`), `width` x `height` CSS pixels."""

    def __init__(self, profile: Path, *, width: int = 1280, height: int = 2000,
                 timeout: float = 60.0) -> None:
        self.timeout = timeout
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # fd 3 and fd 4 of the browser are the two pipes; bash places them, then becomes Chromium.
        self.process = subprocess.Popen(
            ["bash", "-c", f'exec "$@" 3<&{to_browser_r} 4>&{from_browser_w}', "chromium",
             chromium_binary(), *FLAGS, "--remote-debugging-pipe", f"--user-data-dir={profile}",
             f"--window-size={width},{height}", "about:blank"],
            pass_fds=(to_browser_r, from_browser_w),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._next_id = 0
        self._replies: dict[int, dict[str, Any]] = {}
        self._messages: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.requests: list[str] = []  # every URL the tab asked for, in order
        threading.Thread(target=self._read, daemon=True).start()
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session: str = self.send("Target.attachToTarget",
                                      {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Network", "DOM"):
            self.send(f"{domain}.enable", session=self.session)
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
                  session=self.session)

    def _read(self) -> None:
        buffer = b""
        with open(self._from_browser, "rb", buffering=0) as pipe:
            while chunk := pipe.read(1 << 16):
                buffer += chunk
                *messages, buffer = buffer.split(b"\0")
                for message in messages:
                    self._messages.put(json.loads(message))
        self._messages.put(None)

    def _take(self, deadline: float) -> None:
        try:
            message = self._messages.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise TimeoutError("chromium sent nothing in time") from None
        if message is None:
            raise RuntimeError(f"chromium closed its pipe (exit status {self.process.poll()})")
        if "id" in message:
            self._replies[message["id"]] = message
        elif message.get("method") == "Network.requestWillBeSent":
            self.requests.append(message["params"]["request"]["url"])

    def send(self, method: str, params: dict[str, Any] | None = None, *,
             session: str | None = None) -> dict[str, Any]:
        """Send one command and wait for its reply; an error reply raises."""
        self._next_id += 1
        command: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            command["sessionId"] = session
        os.write(self._to_browser, json.dumps(command).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while self._next_id not in self._replies:
            self._take(deadline)
        reply = self._replies.pop(self._next_id)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        result: dict[str, Any] = reply["result"]
        return result

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the tab (promises awaited)."""
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True}, session=self.session)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str) -> None:
        self.send("Page.navigate", {"url": url}, session=self.session)

    def wait_for(self, expression: str, timeout: float) -> Any:
        """Poll a JavaScript expression until it is truthy; its last value if time runs out."""
        deadline = time.monotonic() + timeout
        while not (value := self.evaluate(expression)) and time.monotonic() < deadline:
            time.sleep(0.2)
        return value

    def call_on(self, node_id: int, function: str) -> Any:
        """Call `function` (JavaScript, `this` is the node) on a node found by `DOM.getDocument`."""
        remote = self.send("DOM.resolveNode", {"nodeId": node_id}, session=self.session)
        result = self.send("Runtime.callFunctionOn",
                           {"objectId": remote["object"]["objectId"], "functionDeclaration": function,
                            "returnByValue": True}, session=self.session)
        return result["result"].get("value")

    def document(self) -> dict[str, Any]:
        """The whole DOM, shadow roots included (the closed ones that scripts cannot reach too)."""
        root: dict[str, Any] = self.send("DOM.getDocument", {"depth": -1, "pierce": True},
                                         session=self.session)["root"]
        return root

    def screenshot(self, path: Path) -> None:
        image = self.send("Page.captureScreenshot", {"format": "png"}, session=self.session)
        path.write_bytes(base64.b64decode(image["data"]))

    def close(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(OSError, RuntimeError, TimeoutError):
                self.send("Browser.close")
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        os.close(self._to_browser)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()


def walk(node: dict[str, Any]) -> list[dict[str, Any]]:
    """A DOM node from `Chromium.document` and everything under it, shadow roots included."""
    nodes = [node]
    for child in (*node.get("shadowRoots", ()), *node.get("children", ()),
                  *([node["contentDocument"]] if "contentDocument" in node else ())):
        nodes += walk(child)
    return nodes


def classes(node: dict[str, Any]) -> list[str]:
    """The class names of a DOM node from `Chromium.document`."""
    attributes: list[str] = node.get("attributes", [])
    named = dict(zip(attributes[::2], attributes[1::2], strict=True))
    return named.get("class", "").split()
