"""What an upstream server said about a model (its labels, its batch limit), kept for a while.

A second idea next to the upstream client's (upstream.py: one call, its retries and its breaker):
asking is rare and slow, answering from memory is the rule. Per model, an answer is kept for
`INFO_TTL_S` (labels and limits change only when the server is redeployed), a failure to ask for
`INFO_RETRY_S` (so a server without the endpoint is not asked on every request, yet one that comes
back is asked again soon), and at most one request is in flight: concurrent callers share it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from service.gateway.protocols import ServerInfo

#: How long what a server said about a model is kept, and how long a failed attempt to ask is
#: remembered before the next request asks again.
INFO_TTL_S = 300.0
INFO_RETRY_S = 5.0

#: What the server said, or why it could not be asked (a sentence for the error or the log).
Answer = ServerInfo | str


class ServerInfoCache:
    """Answers per model, each with its expiry; `get` asks through `fetch` when there is none."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._answers: dict[str, tuple[float, Answer]] = {}
        self._pending: dict[str, asyncio.Future[Answer]] = {}

    async def get(self, model: str, fetch: Callable[[], Awaitable[Answer]]) -> Answer:
        """The kept answer for `model`, or `fetch()`'s, shared with every caller that asks while it
        runs. `fetch` returns a failure as a sentence rather than raising it."""
        cached = self._answers.get(model)
        if cached is None or cached[0] <= self._clock():
            pending = self._pending.get(model)
            if pending is None:
                pending = asyncio.get_running_loop().create_future()
                self._pending[model] = pending
                try:
                    found = await fetch()
                finally:
                    del self._pending[model]
                ttl = INFO_TTL_S if isinstance(found, ServerInfo) else INFO_RETRY_S
                cached = self._answers[model] = (self._clock() + ttl, found)
                pending.set_result(found)
            else:
                cached = (0.0, await asyncio.shield(pending))
        return cached[1]
