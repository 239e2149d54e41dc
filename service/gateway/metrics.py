"""Every Prometheus series the gateway exports, created against an injected registry.

Names and labels are a contract (docs/metrics.md lists them, the alerts and the dashboard select on
them). Label values come only from the task registry (an unknown task is `unknown`), so a caller
cannot blow up cardinality by inventing task names.
"""

from __future__ import annotations

from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

M = TypeVar("M", bound=MetricWrapperBase)

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
UNKNOWN = "unknown"


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._children: dict[tuple[MetricWrapperBase, tuple[str, ...]], Any] = {}
        self.requests = Counter(
            "gateway_requests", "Requests answered, by route, task and HTTP status.",
            ["route", "task", "status"], registry=registry,
        )
        self.request_duration = Histogram(
            "gateway_request_duration_seconds", "Time from request to response.",
            ["route", "task"], buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.upstream_requests = Counter(
            "gateway_upstream_requests", "Upstream HTTP attempts, by outcome (status code, "
            "'timeout', 'connect_error' or 'circuit_open').",
            ["upstream", "endpoint", "status"], registry=registry,
        )
        self.upstream_duration = Histogram(
            "gateway_upstream_duration_seconds", "Duration of one upstream HTTP attempt.",
            ["upstream", "endpoint"], buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.batch_size = Histogram(
            "gateway_batch_size", "Items per upstream batch.",
            ["upstream", "endpoint"], buckets=BATCH_BUCKETS, registry=registry,
        )
        self.batch_wait = Histogram(
            "gateway_batch_wait_seconds", "Time an item waited in the batcher before being sent.",
            buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.queue_depth = Gauge(
            "gateway_queue_depth", "Items queued in the batcher, waiting for a free batch slot.",
            registry=registry,
        )
        self.cache_lookups = Counter(
            "gateway_cache_lookups", "Cache lookups per item: hit, miss, or error (Redis down).",
            ["task", "result"], registry=registry,
        )
        self.upstream_retries = Counter(
            "gateway_upstream_retries", "Upstream attempts that were retries.", registry=registry,
        )
        self.upstream_retries_throttled = Counter(
            "gateway_upstream_retries_throttled", "Retries not made because the upstream's retry "
            "budget (GATEWAY_RETRY_BUDGET) was spent.", ["upstream"], registry=registry,
        )
        self.circuit_open = Gauge(
            "gateway_circuit_open", "1 while the upstream's circuit breaker is open.",
            ["upstream"], registry=registry,
        )
        self.inflight_requests = Gauge(
            "gateway_inflight_requests", "Requests being handled right now.", registry=registry,
        )
        self.cache_errors = Counter(
            "gateway_cache_errors", "Redis operations that failed or timed out (the gateway then "
            "serves without the cache).", ["operation"], registry=registry,
        )
        self.fallbacks = Counter(
            "gateway_fallbacks", "Requests (or the part of one the cache did not answer) sent to "
            "a task's fallback because the model before it failed; `upstream` is the fallback's, "
            "`result` whether it answered (ok) or failed too (error).",
            ["task", "upstream", "result"], registry=registry,
        )
        self.model_items = Counter(
            "gateway_model_items", "Items answered, by task and by the model that answered (the "
            "task's, its canary's or a fallback's; only models the tasks file names).",
            ["task", "model"], registry=registry,
        )
        self.cascade_items = Counter(
            "gateway_cascade_items", "Items answered by each stage of a task's cascade (`stage` "
            "1 is the first, cheapest model); the later stages' share is the escalation.",
            ["task", "stage"], registry=registry,
        )
        self.predicted_labels = Counter(
            "gateway_predicted_labels", "Answered items by their top label, per target: the "
            "model's own labels only (the task's `labels`, else those of its first answer), any "
            "other label as `other` (drift.py).", ["task", "target", "label"], registry=registry,
        )
        self.predictions_logged = Counter(
            "gateway_predictions_logged", "Sampled predictions written to the task's log "
            "(predictions.py).", ["task"], registry=registry,
        )
        self.predictions_dropped = Counter(
            "gateway_predictions_dropped", "Sampled predictions not logged: queue_full (Redis "
            "slow or down, the queue at GATEWAY_PREDICTIONS_MAX_QUEUE) or error (Redis failed).",
            ["task", "reason"], registry=registry,
        )
        self.shadow_comparisons = Counter(
            "gateway_shadow_comparisons", "Items compared with a task's shadow model, per target: "
            "whether the top labels agree.", ["task", "target", "agreement"], registry=registry,
        )
        self.shadow_dropped = Counter(
            "gateway_shadow_dropped", "Shadow comparisons given up: queue_full (shed under load), "
            "timeout, error, target_missing (the shadow did not answer a target).",
            ["task", "reason"], registry=registry,
        )
        self.feedback_items = Counter(
            "gateway_feedback_items", "Corrected labels acknowledged by POST /feedback.",
            ["task"], registry=registry,
        )
        self.review_items = Counter(
            "gateway_review_items", "Answers queued for review: low_margin (the model was unsure) "
            "or control (the random control share).", ["task", "reason"], registry=registry,
        )
        self.review_dropped = Counter(
            "gateway_review_dropped", "Answers picked for review but not queued (Redis failed).",
            ["task"], registry=registry,
        )
        self.tenant_items = Counter(
            "gateway_tenant_items", "Items admitted for classification, by tenant and task "
            "(never by key: tenants are few and configured).", ["tenant", "task"],
            registry=registry,
        )
        self.quota_rejections = Counter(
            "gateway_quota_rejections", "Requests refused with 429 by a quota, by tenant and "
            "quota (`key.items_per_minute`, `tenant.requests_per_second`, ..., or `redis_error` "
            "under GATEWAY_QUOTA_ON_REDIS_ERROR=deny).", ["tenant", "quota"], registry=registry,
        )
        self.quota_redis_errors = Counter(
            "gateway_quota_redis_errors", "Quota checks Redis could not answer, by what "
            "GATEWAY_QUOTA_ON_REDIS_ERROR decided (allow or deny).", ["decision"],
            registry=registry,
        )
        self.key_store_errors = Counter(
            "gateway_key_store_errors", "Client-key lookups Redis did not answer: `outage` "
            "(unreachable or timed out: the last identity known for the key is served) or "
            "`refused` (Redis answered with an auth, ACL or type error: the request gets 503, "
            "never a stale identity).", ["kind"], registry=registry,
        )
        self.registry_reloads = Counter(
            "gateway_registry_reloads", "Tasks file reloads, by result.", ["result"],
            registry=registry,
        )

    def child(self, metric: M, *values: str) -> M:
        """`metric.labels(*values)`, remembered: prometheus_client checks and locks on every
        `labels()` call, several times per request on the hot path. Label values come from the
        registry and from status codes, so the memo stays small."""
        key = (metric, values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found
