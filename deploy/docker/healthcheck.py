#!/usr/bin/env python3
"""Docker HEALTHCHECK for the one image that runs either the gateway or the factory.

A HEALTHCHECK cannot know which command the container was started with, so this reads PID 1's
command line: `... factory` probes FACTORY_PORT, anything else GATEWAY_PORT. It probes /healthz
(alive), not /readyz: a container with no tasks loaded yet is alive and must not be restarted.
Standard library only, so it needs nothing beyond the image's Python.
"""

from __future__ import annotations

import os
import sys
import urllib.request
from pathlib import Path


def target_port(cmdline: list[str], env: dict[str, str]) -> int:
    if "factory" in cmdline:
        return int(env.get("FACTORY_PORT", "8100"))
    return int(env.get("GATEWAY_PORT", "8000"))


def read_cmdline() -> list[str]:
    try:
        raw = Path("/proc/1/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def main() -> int:
    port = target_port(read_cmdline(), dict(os.environ))
    url = f"http://127.0.0.1:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            ok = 200 <= int(response.status) < 300
    except OSError as exc:
        print(f"healthcheck: {url}: {exc}", file=sys.stderr)
        return 1
    if not ok:
        print(f"healthcheck: {url} answered {response.status}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
