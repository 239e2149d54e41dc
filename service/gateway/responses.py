"""The gateway's JSON response: orjson, because the response path is hot and FastAPI's own
ORJSONResponse is deprecated."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)
