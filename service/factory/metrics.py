"""Every Prometheus series the factory exports, created against an injected registry.

The names are a contract with the deployment's alert rules: keep them.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

TERMINAL_STATUSES = ("SUCCESS", "FAILED", "FAILED_VALIDATION", "CANCELLED")
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class FactoryMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.jobs = Counter(
            "factory_jobs", "Fine-tuning jobs that reached a terminal status.", ["status"],
            registry=registry,
        )
        for status in TERMINAL_STATUSES:
            self.jobs.labels(status=status)
        self.jobs_running = Gauge(
            "factory_jobs_running", "Jobs training right now.", registry=registry,
        )
        self.jobs_queued = Gauge(
            "factory_jobs_queued", "Jobs waiting for a training slot.", registry=registry,
        )
        self.classify_items = Counter(
            "factory_classify_items", "Inputs classified, by endpoint.", ["endpoint"],
            registry=registry,
        )
        self.classify_duration = Histogram(
            "factory_classify_duration_seconds", "Time to classify one request (all its inputs).",
            ["endpoint"], buckets=DURATION_BUCKETS, registry=registry,
        )
        self.models_loaded = Gauge(
            "factory_models_loaded", "Fine-tuned models held in memory (LRU).", registry=registry,
        )
