"""No piece of a key anywhere: an upstream (or a proxy in front of it) that echoes our
Authorization header, with the key placed across every cut the gateway makes when it quotes a body.

Issue 10, item 2: the body used to be cut to 300 characters before the key was replaced, so a key
crossing the cut kept its first characters in the 502 body and in the log.
"""

from __future__ import annotations

import logging
import secrets
from pathlib import Path

import httpx
import pytest

from service.gateway.scrub import MIN_PIECE, quote, scrub
from tests.support.fake_upstream import Echo
from tests.support.gateway import gateway_stack

CUT = 300  # upstream.py's _MAX_MESSAGE_CHARS
PREFIX = len("you sent Authorization: Bearer ")


def pieces(key: str) -> list[str]:
    return [key[i:i + MIN_PIECE] for i in range(len(key) - MIN_PIECE + 1)]


def leaks(text: str, keys: list[str]) -> list[str]:
    return [piece for key in keys for piece in pieces(key) if piece in text]


def test_quote_scrubs_before_it_cuts_at_every_offset() -> None:
    key = "sk-" + secrets.token_hex(16)
    for start in range(CUT - len(key) - 2, CUT + 2):
        text = "x" * start + key + " and more"
        quoted = quote(text, [key], CUT)
        assert len(quoted) <= CUT
        assert not leaks(quoted, [key]), (start, quoted[-60:])
        assert not leaks(quote(text.encode(), [key], CUT), [key])


def test_scrub_masks_pieces_of_a_key_and_leaves_other_text() -> None:
    key = "sk-" + secrets.token_hex(16)
    text = f"error: key {key[:12]}... is invalid; full {key}; tail {key[-9:]}"
    cleaned = scrub(text, [key])
    assert not leaks(cleaned, [key])
    assert cleaned.startswith("error: key ***... is invalid; full ***; tail ***")
    assert scrub("short abc1 secret", ["abc1"]) == "short *** secret"


async def test_no_piece_of_any_key_crosses_a_boundary(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    upstream_key = "sk-" + secrets.token_hex(16)
    client_key = "ck-" + secrets.token_hex(16)
    keys = [upstream_key, client_key]
    monkeypatch.setenv("TEST_ECHO_KEY", upstream_key)
    caplog.set_level(logging.DEBUG)
    # The key starts anywhere from wholly before the cut to just past it, in a text body and in
    # a JSON `message`, on a 4xx (502 upstream_rejected) and a 5xx (503 after its one attempt).
    starts = range(CUT - PREFIX - len(upstream_key) - 1, CUT - PREFIX + 2)
    faults = [Echo(code, start, as_json) for code in (400, 500) for as_json in (False, True)
              for start in starts]
    with gateway_stack(tmp_path, api_key_env="TEST_ECHO_KEY", api_keys=client_key,
                       retry_attempts=1, circuit_min_calls=10_000) as s:
        s.upstream.inject(*faults)
        seen: list[str] = []
        async with httpx.AsyncClient(base_url=s.url, timeout=10,
                                     headers={"Authorization": f"Bearer {client_key}"}) as client:
            for i, fault in enumerate(faults):
                r = await client.post("/classify", json={"task": "sentiment", "input": f"t{i}"})
                assert r.status_code == (502 if fault.code == 400 else 503), r.text
                assert "you sent Authorization" in r.text  # the body is quoted, scrubbed
                seen += [r.text, *(f"{k}: {v}" for k, v in r.headers.items())]
            for path in ("/tasks", "/metrics", "/readyz"):
                r = await client.get(path)
                seen += [r.text, *(f"{k}: {v}" for k, v in r.headers.items())]
    assert s.upstream.calls[0].authorization == f"Bearer {upstream_key}"
    seen += [record.getMessage() for record in caplog.records]
    seen += [caplog.text]
    found = [(text[:80], leaks(text, keys)) for text in seen if leaks(text, keys)]
    assert not found, found
