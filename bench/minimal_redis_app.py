"""The cache-hit baseline: the least a FastAPI endpoint can do per request with Redis (parse the same
JSON body, one GET, return the value). Run by bench/cache_hits.py under the same uvicorn settings as
the gateway."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

import orjson
from fastapi import FastAPI
from pydantic import BaseModel
from redis.asyncio import Redis
from starlette.responses import Response


class Body(BaseModel):
    task: str
    input: str | list[str]


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.redis = Redis.from_url(os.environ["BENCH_REDIS_URL"])
    yield
    await app.state.redis.aclose()


app = FastAPI(lifespan=lifespan)


@app.post("/classify")
async def classify(body: Body) -> Response:
    value = await app.state.redis.get("bench:value")
    return Response(orjson.dumps({"results": [orjson.loads(value)]}),
                    media_type="application/json")


@app.get("/readyz")
async def readyz() -> Response:
    return Response(b"{}", media_type="application/json")
