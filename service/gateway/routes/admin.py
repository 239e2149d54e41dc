"""The admin API: client keys and tenant quotas (tenants.py keeps them in Redis).

Every route here is guarded by GATEWAY_ADMIN_KEY in the front door (middleware.py), before the body
is read; a client key gets the same 401 as no key. The secret of a key is in exactly two answers:
the 201 of its creation and the answer of its rotation.
"""

from __future__ import annotations

from collections.abc import Awaitable
from datetime import date, datetime, timedelta
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Path, Query
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field
from redis.exceptions import RedisError

from service.gateway.errors import GatewayError, NotFound
from service.gateway.responses import JSONResponse
from service.gateway.routes.openapi import ADMIN_ERRORS, ErrorResponse, error_responses
from service.gateway.runtime import RuntimeDep
from service.gateway.tenants import (
    TENANT_PATTERN,
    USAGE_FIELDS,
    KeyRecord,
    Quotas,
    TenantStore,
    UsageRecorder,
    now,
)

router = APIRouter(prefix="/admin", tags=["admin"], responses={
    **error_responses(*ADMIN_ERRORS),
    400: {"description": "The body is not JSON.", "model": ErrorResponse}})
T = TypeVar("T")

KeyId = Annotated[str, Path(pattern=r"^[0-9a-f]{16}$", description="A key's id.")]
Tenant = Annotated[str, Path(pattern=TENANT_PATTERN)]


class TenantsUnavailable(GatewayError):
    status_code = 503
    error_type = "tenants_unavailable"


class NewKey(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant: str = Field(pattern=TENANT_PATTERN, description="The tenant the key belongs to.")
    name: str = Field(min_length=1, max_length=200)
    tasks: list[str] | None = Field(default=None, max_length=1000,
                                    description="The tasks it may call; all when unset.")
    quotas: Quotas = Field(default_factory=Quotas)
    expires_at: AwareDatetime | None = Field(default=None, description="With a time zone.")


class KeyChanges(BaseModel):
    """Only the fields sent change; `null` clears `tasks` (all tasks) or `expires_at`."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, min_length=1, max_length=200)
    tasks: list[str] | None = Field(default=None, max_length=1000)
    quotas: Quotas | None = None
    expires_at: AwareDatetime | None = None


class Rotation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grace_s: int = Field(default=3600, ge=0, le=30 * 86_400,
                         description="How long the old secret keeps working.")


class TenantQuotas(BaseModel):
    model_config = ConfigDict(extra="forbid")

    quotas: Quotas


class KeyView(BaseModel):
    id: str
    tenant: str
    name: str
    tasks: list[str] | None
    quotas: Quotas
    expires_at: datetime | None
    created: datetime
    last_used: datetime | None
    revoked: bool


class CreatedKey(KeyView):
    key: str = Field(description="The secret: shown this once, never again.")


def _store(runtime: RuntimeDep) -> TenantStore:
    if runtime.admin_tenants is None:
        raise TenantsUnavailable("Keys live in Redis and this gateway has none: set "
                                 "GATEWAY_REDIS_URL (or GATEWAY_FEEDBACK_REDIS_URL).")
    return runtime.admin_tenants


async def _redis(call: Awaitable[T]) -> T:
    try:
        return await call
    except (RedisError, OSError, TimeoutError):
        raise TenantsUnavailable("Redis, where keys are kept, did not answer; retry.",
                                 retry_after_s=1.0) from None


async def _view(store: TenantStore, record: KeyRecord) -> dict[str, Any]:
    return record.public(await _redis(store.last_used(record.id)))


async def _record(store: TenantStore, key_id: str) -> KeyRecord:
    record = await _redis(store.get(key_id))
    if record is None:
        raise NotFound(f"No key with id {key_id!r}.")
    return record


@router.post("/keys", status_code=201, response_model=CreatedKey,
             summary="Issue a key; its secret is in this answer only")
async def create_key(body: NewKey, runtime: RuntimeDep) -> JSONResponse:
    store = _store(runtime)
    record, secret = await _redis(store.create(body.tenant, body.name, body.tasks, body.quotas,
                                               body.expires_at))
    view = CreatedKey(**record.public(None), key=secret)
    return JSONResponse(view.model_dump(mode="json"), status_code=201)


@router.get("/keys", response_model=list[KeyView], summary="Every key, or a tenant's")
async def list_keys(runtime: RuntimeDep, tenant: Annotated[
        str | None, Query(pattern=TENANT_PATTERN)] = None) -> list[dict[str, Any]]:
    store = _store(runtime)
    return [await _view(store, r) for r in await _redis(store.list(tenant))]


@router.get("/keys/{key_id}", response_model=KeyView, summary="One key (never its secret)")
async def show_key(key_id: KeyId, runtime: RuntimeDep) -> dict[str, Any]:
    store = _store(runtime)
    return await _view(store, await _record(store, key_id))


@router.patch("/keys/{key_id}", response_model=KeyView,
              summary="Change a key's name, tasks, quotas or expiry")
async def update_key(key_id: KeyId, body: KeyChanges, runtime: RuntimeDep) -> dict[str, Any]:
    store = _store(runtime)
    record = await _record(store, key_id)
    changes = body.model_dump(exclude_unset=True, exclude={"quotas"})
    if changes.get("name", "") is None:
        del changes["name"]
    updated = record.model_copy(update=changes)
    if body.quotas is not None:
        updated = updated.model_copy(update={"quotas": body.quotas})
    await _redis(store.save(updated))
    return await _view(store, updated)


@router.delete("/keys/{key_id}", response_model=KeyView,
               summary="Revoke a key: refused by every replica within 1 s")
async def revoke_key(key_id: KeyId, runtime: RuntimeDep) -> dict[str, Any]:
    store = _store(runtime)
    record = (await _record(store, key_id)).model_copy(update={"revoked": True})
    await _redis(store.save(record))
    return await _view(store, record)


@router.post("/keys/{key_id}/rotate", response_model=CreatedKey,
             summary="A new secret under the same id; the old one works for a grace period")
async def rotate_key(key_id: KeyId, body: Rotation, runtime: RuntimeDep) -> dict[str, Any]:
    store = _store(runtime)
    record = await _record(store, key_id)
    if record.revoked:
        raise NotFound(f"Key {key_id!r} is revoked; issue a new one.")
    updated, secret = await _redis(store.rotate(record, body.grace_s))
    return {**(await _view(store, updated)), "key": secret}


@router.put("/tenants/{tenant}", response_model=TenantQuotas,
            summary="Set a tenant's quotas, shared by all of its keys")
async def put_tenant(tenant: Tenant, body: TenantQuotas, runtime: RuntimeDep) -> TenantQuotas:
    await _redis(_store(runtime).put_tenant(tenant, body.quotas))
    return body


@router.get("/tenants/{tenant}", response_model=TenantQuotas, summary="A tenant's quotas")
async def get_tenant(tenant: Tenant, runtime: RuntimeDep) -> TenantQuotas:
    return TenantQuotas(quotas=await _redis(_store(runtime).get_tenant(tenant)))


Since = Annotated[date | None, Query(description="The first UTC day reported (default: 30 days "
                                                  "ago; at most 400 days are reported).")]


class KeyUsage(BaseModel):
    id: str
    tenant: str
    name: str
    days: dict[str, dict[str, int]] = Field(description="UTC day -> requests, items, cache_hits, "
                                            "4xx (but 429), 5xx, 429.")
    total: dict[str, int]


class TenantUsage(BaseModel):
    tenant: str | None
    since: date
    keys: list[KeyUsage]
    total: dict[str, int]


def _usage(runtime: RuntimeDep) -> UsageRecorder:
    if runtime.usage is None:
        raise TenantsUnavailable("Usage lives in Redis and this gateway has none: set "
                                 "GATEWAY_REDIS_URL (or GATEWAY_FEEDBACK_REDIS_URL).")
    return runtime.usage


def _since(since: date | None) -> date:
    return since if since is not None else now().date() - timedelta(days=30)


def _total(days: dict[str, dict[str, int]]) -> dict[str, int]:
    return {f: sum(day.get(f, 0) for day in days.values()) for f in USAGE_FIELDS}


async def _key_usage(usage: UsageRecorder, records: list[KeyRecord],
                     since: date) -> list[KeyUsage]:
    await _redis(usage.flush())  # this replica's last second too
    report = await _redis(usage.report([r.id for r in records], since))
    return [KeyUsage(id=r.id, tenant=r.tenant, name=r.name, days=report.get(r.id, {}),
                     total=_total(report.get(r.id, {}))) for r in records]


@router.get("/keys/{key_id}/usage", response_model=KeyUsage,
            summary="A key's requests, items, cache hits, 4xx, 5xx and 429s per UTC day")
async def key_usage(key_id: KeyId, runtime: RuntimeDep, since: Since = None) -> KeyUsage:
    store, usage = _store(runtime), _usage(runtime)
    (found,) = await _key_usage(usage, [await _record(store, key_id)], _since(since))
    return found


@router.get("/usage", response_model=TenantUsage, summary="Usage of every key, or a tenant's")
async def tenant_usage(runtime: RuntimeDep, since: Since = None, tenant: Annotated[
        str | None, Query(pattern=TENANT_PATTERN)] = None) -> TenantUsage:
    store, usage = _store(runtime), _usage(runtime)
    first = _since(since)
    keys = await _key_usage(usage, await _redis(store.list(tenant)), first)
    total = {f: sum(k.total[f] for k in keys) for f in USAGE_FIELDS}
    return TenantUsage(tenant=tenant, since=first, keys=keys, total=total)
