"""Draws the waterfall of one real trace as an SVG for docs/observability.md: no Jaeger runs here,
so the trace is captured by the tests' OTLP/HTTP receiver (tests/support/otlp_receiver.py).

A client sends one request with a `traceparent` through a gateway (with Redis) to a factory that
has trained the demo's sentiment model; every span of that trace, from both services, becomes one
row: indented by depth, a bar from its start to its end, its name, service and duration.

    python -m bench.trace_waterfall --out docs/assets/trace-waterfall.svg
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid
from html import escape
from pathlib import Path

import httpx
import yaml

from tests.support.otlp_receiver import ReceivedSpan, running_receiver
from tests.support.redis_server import start_redis

ROW, LEFT, WIDTH, BAR = 22, 300, 900, 520
COLOURS = {"classifier-gateway": "#3f6fd8", "classifier-factory": "#d8803f"}


def capture() -> list[ReceivedSpan]:
    """The spans of one request's trace, gateway and factory."""
    from service.commands.demo_runner import TASKS, train_task
    from service.gateway.app import create_app
    from service.gateway.settings import Settings
    from tests.support.factory import running_factory
    from tests.support.servers import serve

    trace_id = uuid.uuid4().hex
    with running_receiver() as receiver, tempfile.TemporaryDirectory() as tmp:
        os.environ.update({"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                           "OTEL_BSP_SCHEDULE_DELAY": "50"})
        (Path(tmp) / "redis").mkdir()
        redis = start_redis(Path(tmp) / "redis")
        try:
            with running_factory(Path(tmp) / "factory") as factory:
                with httpx.Client(base_url=factory.url, timeout=120) as client:
                    model = train_task(client, TASKS[0])
                tasks = Path(tmp) / "tasks.yaml"
                tasks.write_text(yaml.safe_dump({
                    "upstreams": {"local": {"base_url": factory.url}},
                    "tasks": {"sentiment": {"upstream": "local", "model": model}}}))
                with serve(create_app(Settings(tasks_file=tasks, redis_url=redis.url))) as gw:
                    texts = ["The parcel came on time", "Broken on arrival", "It is blue"]
                    httpx.post(f"{gw.url}/classify", json={"task": "sentiment", "input": texts},
                               headers={"traceparent": f"00-{trace_id}-{'1' * 16}-01"},
                               timeout=30).raise_for_status()
                    deadline = time.monotonic() + 20
                    while time.monotonic() < deadline and not any(
                            s.name == "factory.model" and s.trace_id == trace_id
                            for s in receiver.snapshot()):
                        time.sleep(0.05)
        finally:
            redis.stop()
        return [s for s in receiver.snapshot() if s.trace_id == trace_id]


def ordered(spans: list[ReceivedSpan]) -> list[tuple[int, ReceivedSpan]]:
    """(depth, span), each span after its parent, siblings by start time."""
    children: dict[str, list[ReceivedSpan]] = {}
    ids = {s.span_id for s in spans}
    for s in spans:
        children.setdefault(s.parent_id if s.parent_id in ids else "", []).append(s)
    out: list[tuple[int, ReceivedSpan]] = []

    def walk(parent: str, depth: int) -> None:
        for s in sorted(children.get(parent, []), key=lambda x: x.start_ns):
            out.append((depth, s))
            walk(s.span_id, depth + 1)

    walk("", 0)
    return out


def svg(spans: list[ReceivedSpan]) -> str:
    rows = ordered(spans)
    start = min(s.start_ns for s in spans)
    total = max(s.end_ns for s in spans) - start
    height = ROW * (len(rows) + 2)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
             f'font-family="sans-serif" font-size="12">',
             f'<rect width="{WIDTH}" height="{height}" fill="white"/>',
             f'<text x="8" y="15" font-weight="bold">one POST /classify, {total / 1e6:.2f} ms: '
             'gateway (blue) and factory (orange), from the test receiver</text>']
    for i, (depth, s) in enumerate(rows):
        y = ROW * (i + 1) + 6
        x = LEFT + (s.start_ns - start) / total * BAR
        w = max((s.end_ns - s.start_ns) / total * BAR, 1.5)
        colour = COLOURS.get(s.service, "#888888")
        link = " (linked)" if s.links else ""
        parts.append(f'<text x="{8 + 12 * depth}" y="{y + 13}">{escape(s.name)}{link}</text>')
        parts.append(f'<rect x="{x:.1f}" y="{y + 3}" width="{w:.1f}" height="13" '
                     f'fill="{colour}" rx="2"/>')
        parts.append(f'<text x="{x + w + 4:.1f}" y="{y + 13}" fill="#444">'
                     f'{(s.end_ns - s.start_ns) / 1e6:.2f} ms</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("docs/assets/trace-waterfall.svg"))
    args = parser.parse_args()
    spans = capture()
    if not spans:
        raise SystemExit("no span of the trace arrived")
    args.out.write_text(svg(spans))
    print(f"{len(spans)} spans -> {args.out}")


if __name__ == "__main__":
    main()
