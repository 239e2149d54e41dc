"""What an upstream's answer means to the gateway, before its body is read: the HTTP status's
verdict, and when the server asks to be called again.

Kept apart from the client (upstream.py), which acts on the verdict (retry, count against the
circuit, raise), so that the rule reads in one place:
- 2xx: an answer, to be decoded by the protocol;
- 429, 5xx and the protocol's own server-error statuses (TEI's 424): worth another attempt;
- any other 4xx: the request's fault, retrying the same body will not help;
- anything else (a 1xx or a redirect, which is not followed): a server that is not what the
  upstream's base URL says.
"""

from __future__ import annotations

import email.utils
import math
import time
from typing import Literal

Verdict = Literal["answer", "retry", "rejected", "unexpected"]


def verdict(status: int, server_errors: frozenset[int]) -> Verdict:
    """What `status` means (see the module docstring); `server_errors` are the protocol's 4xx
    statuses that mean the server failed."""
    if 200 <= status < 300:
        return "answer"
    if status == 429 or status >= 500 or status in server_errors:
        return "retry"
    if 400 <= status < 500:
        return "rejected"
    return "unexpected"


def parse_retry_after(value: str | None) -> float | None:
    """`Retry-After` as delta-seconds (Mistral sends these) or an HTTP date; None if absent/invalid."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)
