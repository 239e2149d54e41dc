"""`bearer_token`: what the front door accepts as a client key before looking it up. Anything
malformed or oversized is None, so that the caller answers one 401 that echoes nothing."""

from __future__ import annotations

import pytest

from service.gateway.tenants import MAX_AUTHORIZATION_BYTES, bearer_token


@pytest.mark.parametrize(("header", "token"), [
    (b"Bearer cgw_abc-DEF_123", b"cgw_abc-DEF_123"),
    (b"bearer  static-key!#$%&'*+.^`|~  ", b"static-key!#$%&'*+.^`|~"),  # visible ASCII, trimmed
    (b"BEARER k", b"k"),
])
def test_a_bearer_token_of_visible_ascii_is_taken(header: bytes, token: bytes) -> None:
    assert bearer_token(header) == token


@pytest.mark.parametrize("header", [
    None,
    b"",
    b"Bearer",
    b"Bearer ",
    b"Bearer    ",
    b"Basic dXNlcjpwYXNz",
    b"Bearer two words",
    b"Bearer tab\there",
    b"Bearer nul\x00",
    b"Bearer del\x7f",
    "Bearer caf\u00e9".encode(),
    b"Bearer " + b"k" * MAX_AUTHORIZATION_BYTES,
])
def test_anything_else_is_none(header: bytes | None) -> None:
    assert bearer_token(header) is None
