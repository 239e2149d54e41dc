"""`create_app(settings)`: the gateway as an ASGI app; the lifespan builds and closes every client."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable
from functools import partial

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from starlette.types import ASGIApp

from service.gateway.batcher import MicroBatcher
from service.gateway.cache import ResultCache
from service.gateway.classifier import Classifier, cache_writer
from service.gateway.drift import LabelDrift, minute_counts
from service.gateway.errors import install_error_handlers
from service.gateway.feedback import FeedbackBook
from service.gateway.metrics import GatewayMetrics
from service.gateway.middleware import GatewayMiddleware
from service.gateway.predictions import PredictionLog
from service.gateway.quotas import QuotaChecker
from service.gateway.redis_clients import link, open_redis
from service.gateway.redis_url import parse_redis_url
from service.gateway.registry import RegistryWatcher
from service.gateway.routes import admin, health, hot, stages, tasks
from service.gateway.routes import feedback as feedback_routes
from service.gateway.runtime import Lifecycle, Runtime
from service.gateway.settings import Settings
from service.gateway.shadow import ShadowRunner
from service.gateway.store import shadow_store
from service.gateway.tenants import Authenticator, TenantStore, UsageRecorder
from service.gateway.upstream import UpstreamPool
from service.tracing import Tracing, TracingMiddleware, open_tracing

log = logging.getLogger("service.gateway")
BATCH_DRAIN_S = 5.0


class GatewayApp(FastAPI):
    """FastAPI with the gateway's front door outside its whole middleware stack.

    `add_middleware` would put the front door inside FastAPI's own layers (server-error, telemetry
    and body-limit middleware), each a coroutine per request and per `send` on a path whose budget is
    about a millisecond. The front door renders its own errors, so nothing is lost by going first;
    every other path still goes through the full stack."""

    front_door: Callable[[ASGIApp], ASGIApp] | None = None

    def build_middleware_stack(self) -> ASGIApp:
        stack = super().build_middleware_stack()
        return stack if self.front_door is None else self.front_door(stack)


def build_batcher(settings: Settings, metrics: GatewayMetrics,
                  cache: ResultCache | None, tracing: Tracing | None = None) -> MicroBatcher:
    if settings.batching:
        max_items, wait_s, slots = (settings.max_batch_items, settings.max_wait_ms / 1000,
                                    settings.max_concurrent_batches)
    else:  # one upstream call per item, as many at once as the connection pool allows
        max_items, wait_s, slots = 1, 0.0, settings.max_connections
    return MicroBatcher(
        max_batch_items=max_items, max_wait_s=wait_s, max_concurrent_batches=slots,
        max_queue_items=settings.max_queue_items, metrics=metrics,
        on_results=cache_writer(cache) if cache is not None else None, tracing=tracing,
    )


def create_app(settings: Settings | None = None, *,
               metrics_registry: CollectorRegistry | None = None) -> GatewayApp:
    settings = settings or Settings()
    metrics = GatewayMetrics(metrics_registry or CollectorRegistry())
    lifecycle = Lifecycle()
    keys = Authenticator(settings.client_keys(), settings.admin_key.get_secret_value())
    # None unless the `otel` extra is installed and OTEL_* variables ask for traces.
    tracing = open_tracing("classifier-gateway")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not keys.enabled:
            log.warning("no client keys configured (GATEWAY_API_KEYS): the gateway is open to "
                        "anyone who can reach it")
        watcher = RegistryWatcher(
            settings.tasks_file, settings.tasks_poll_interval_s,
            on_reload=lambda result: metrics.registry_reloads.labels(result).inc(),
        )
        watcher.reload()
        await watcher.start()
        cache = None
        if settings.redis_url:
            cache = ResultCache.from_url(
                settings.redis_url, prefix=settings.cache_prefix,
                socket_timeout_s=settings.redis_socket_timeout_s,
                backoff_s=settings.redis_backoff_s, metrics=metrics, client=settings.redis_client,
            )
            # Connect (and, for a cluster, load the slot map) now, not on the first request's
            # short budget. A Redis that is down only degrades the cache: start anyway.
            if not await cache.ping():
                log.warning("Redis at %s is not answering; serving without the cache until it "
                            "does", cache.description)
            log.info("result cache: Redis at %s, TTL %ds unless a task sets cache_ttl_s",
                     cache.description, settings.cache_ttl_s)
        else:
            # Said at start-up, because it is the first thing to check when latency is high:
            # `serve` runs uncached unless told, where the demo picks up a local Redis.
            log.info("result cache: none (GATEWAY_REDIS_URL or --redis-url is empty): every "
                     "request goes to its upstream")
        upstreams = UpstreamPool(settings, metrics, tracing=tracing)
        batcher = build_batcher(settings, metrics, cache, tracing)
        classifier = Classifier(
            batcher=batcher, upstreams=upstreams,
            upstream_specs=lambda: watcher.current.upstreams, cache=cache, metrics=metrics,
            cache_prefix=settings.cache_prefix, default_ttl_s=settings.cache_ttl_s,
            default_timeout_s=settings.timeout_s, tracing=tracing,
        )
        # Shadow counts, feedback and the review queue: off the hot path, so a generous timeout.
        # Every client of that Redis names the setting its URL came from in its errors.
        shared_url, shared_setting = settings.shared_redis()
        backend = open_redis(shared_url, max(settings.redis_socket_timeout_s, 1.0),
                             setting=shared_setting)
        store = shadow_store(backend, settings.cache_prefix)
        feedback = FeedbackBook(backend, settings.cache_prefix, metrics,
                                window_s=settings.feedback_window_s,
                                max_per_task=settings.feedback_max_per_task, tracing=tracing)
        # Keys and quotas: their own client, with the hot path's deadline (tenants_timeout_s).
        tenants_backend = open_redis(shared_url, settings.tenants_timeout_s,
                                     setting=shared_setting)
        # The admin API: its own client, with a deadline for writes a person waits on. On the
        # hot path's 0.5 s, a key issued while Redis was busy failed with a 503 (CI, 2 cores).
        admin_backend = open_redis(shared_url, settings.admin_timeout_s,
                                   setting=shared_setting)
        tenants = admin_tenants = quotas = quota_link = None
        if admin_backend is not None:
            admin_tenants = TenantStore(admin_backend, settings.cache_prefix,
                                        timeout_s=settings.admin_timeout_s)
        shared_link = None
        if tenants_backend is not None:
            if shared_url == settings.redis_url and cache is not None:
                # Keys in the cache's Redis: a charge rides the cache's connection, in one write
                # with the lookup that follows it (quotas.Charge).
                shared_link = cache.link
            if shared_link is None and tenants_backend.kind == "standalone" and \
                    settings.redis_client == "link":
                quota_link = link(parse_redis_url(shared_url, shared_setting),
                                  settings.tenants_timeout_s, setting=shared_setting)
            tenants = TenantStore(tenants_backend, settings.cache_prefix,
                                  timeout_s=settings.tenants_timeout_s,
                                  cache_ttl_s=settings.key_cache_ttl_s, setting=shared_setting,
                                  on_error=lambda kind: metrics.child(
                                      metrics.key_store_errors, kind).inc())
            tenants.listen()  # admin writes on any replica drop this one's cached lookups
            quotas = QuotaChecker(tenants_backend, settings.cache_prefix, metrics,
                                  on_redis_error=settings.quota_on_redis_error,
                                  timeout_s=settings.tenants_timeout_s,
                                  link=shared_link or quota_link)
            keys.store = tenants
            keys.usage = UsageRecorder(tenants)
            keys.usage.start()
        elif settings.admin_key.get_secret_value():
            log.warning("GATEWAY_ADMIN_KEY is set but there is no Redis "
                        "(GATEWAY_FEEDBACK_REDIS_URL or GATEWAY_REDIS_URL): keys cannot be "
                        "issued, only GATEWAY_API_KEYS work")
        shadow = ShadowRunner(classifier, store, metrics, max_pending=settings.shadow_max_pending)
        classifier.shadow = shadow
        # Label and cascade counts: in the shared Redis, so that every replica reports them alike.
        drift = classifier.predictions = LabelDrift(
            metrics, counts=minute_counts(backend, settings.cache_prefix))
        predictions = PredictionLog(
            backend, settings.cache_prefix, metrics,
            max_per_task=settings.predictions_max_per_task,
            max_queue=settings.predictions_max_queue,
            hash_key=settings.predictions_hash_key.get_secret_value().encode())
        app.state.runtime = Runtime(settings, metrics, watcher, upstreams, batcher, cache,
                                    classifier, lifecycle, store=store, feedback=feedback,
                                    tenants=tenants, admin_tenants=admin_tenants,
                                    quotas=quotas, usage=keys.usage,
                                    drift=drift, predictions=predictions)
        loop = asyncio.get_running_loop()
        sighup = False
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
            loop.add_signal_handler(signal.SIGHUP, watcher.reload)  # main thread only
            sighup = True
        try:
            yield
        finally:
            lifecycle.draining = True
            if sighup:
                loop.remove_signal_handler(signal.SIGHUP)
            await watcher.stop()
            await shadow.aclose()
            await feedback.aclose()
            await predictions.aclose()
            await drift.counts.aclose()  # its last second of counts
            # uvicorn has already given in-flight requests drain_timeout_s; what is left here are
            # batches already sent, so a short bound keeps the whole shutdown inside a pod's grace
            # period (preStop + shutdown delay + drain + this).
            await batcher.drain(min(settings.drain_timeout_s, BATCH_DRAIN_S))
            if cache is not None:
                await cache.aclose()
            await store.aclose()
            if keys.usage is not None:
                await keys.usage.aclose()
                keys.usage = None
            if tenants is not None:
                await tenants.aclose()
            for backend_ in (tenants_backend, admin_backend):
                if backend_ is not None:
                    await backend_.aclose()
            if quota_link is not None:
                await quota_link.aclose()
            await upstreams.aclose()
            if tracing is not None:
                tracing.shutdown()  # exports the spans still buffered

    app = GatewayApp(
        title="Classifier Gateway",
        summary="Task-named classification with caching and micro-batching, over Mistral's "
                "classification API.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.lifecycle = lifecycle
    install_error_handlers(app)
    hot.install(app)
    for module in (tasks, feedback_routes, health, admin, stages):
        app.include_router(module.router)
    front_door = partial(GatewayMiddleware, keys=keys, max_body_bytes=settings.max_body_bytes,
                         metrics=metrics, handlers=hot.handlers(),
                         exemplar=tracing.exemplar if tracing is not None else None)
    if tracing is None:
        app.front_door = front_door
    else:  # the server span wraps the front door, so that it covers refusals too
        app.front_door = lambda inner: TracingMiddleware(front_door(inner), tracing)
    return app
