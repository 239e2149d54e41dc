"""Process settings of the gateway: the only place that reads `GATEWAY_*` environment variables.

Everything about *what* to classify (upstreams, tasks, models) lives in the tasks file instead, so that
it can change at run time without a restart; this module holds what is fixed for a process's life.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GATEWAY_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    tasks_file: Path = Path("tasks.yaml")
    tasks_poll_interval_s: float = Field(
        default=2.0, gt=0, description="How often the tasks file is checked for changes."
    )
    log_level: str = "info"

    # Redis result cache. Empty URL = no cache.
    redis_url: str = ""
    redis_socket_timeout_s: float = Field(default=0.1, gt=0)
    redis_backoff_s: float = Field(
        default=5.0, ge=0, description="How long Redis is skipped after an error."
    )
    redis_client: Literal["link", "redis-py"] = Field(
        default="link", description="Client for a standalone Redis: the gateway's own pipelined "
        "link, or redis-py (Sentinel and Cluster always use redis-py).")
    cache_ttl_s: int = Field(default=3600, ge=1, description="Default TTL of a cached result.")
    feedback_redis_url: str = Field(
        default="", description="Redis for what the replicas share beyond the cache (shadow "
        "and drift counts, feedback, the review queue, the prediction log, keys and quotas); "
        "default: GATEWAY_REDIS_URL (empty for both: this process's memory).")
    # At most this many items wait for a shadow model's answer; beyond it comparisons are
    # dropped (counted), so a slow shadow never holds memory or sockets the callers need.
    shadow_max_pending: int = Field(default=256, ge=1)
    # The sampled prediction log (predictions.py): entries kept per task, entries that may wait
    # for Redis (beyond it they are dropped and counted), and the key of the inputs' hashes.
    predictions_max_per_task: int = Field(default=100_000, ge=1)
    predictions_max_queue: int = Field(default=10_000, ge=1)
    predictions_hash_key: SecretStr = SecretStr("")
    # Responses of tasks with `feedback: true` are remembered this long for POST /feedback by id.
    feedback_window_s: int = Field(default=86_400, ge=1)
    # Feedback and review streams are trimmed (approximately, oldest first) beyond this per task.
    feedback_max_per_task: int = Field(default=100_000, ge=1)
    cache_prefix: str = "cgw:v1"

    def shared_redis(self) -> tuple[str, str]:
        """The URL of the Redis for what outlives a request (shadow counts, feedback, the review
        queue, the prediction log, keys and quotas, the drift counts) and the setting it came
        from, so that an error about it names the variable to fix: GATEWAY_FEEDBACK_REDIS_URL
        when set, else GATEWAY_REDIS_URL (both empty: "", no Redis)."""
        if self.feedback_redis_url:
            return self.feedback_redis_url, "GATEWAY_FEEDBACK_REDIS_URL"
        return self.redis_url, "GATEWAY_REDIS_URL"

    # Client authentication: comma-separated keys, or the path of a file with one key per line.
    api_keys: SecretStr = SecretStr("")
    # Tenants (tenants.py, quotas.py): the admin API's key (never accepted as a client key); keys
    # and quotas live in GATEWAY_FEEDBACK_REDIS_URL's Redis (else GATEWAY_REDIS_URL's).
    admin_key: SecretStr = SecretStr("")
    quota_on_redis_error: Literal["allow", "deny"] = Field(
        default="allow", description="What a quota check does when Redis cannot answer.")
    quota_charge_cache_hits: bool = Field(
        default=True, description="Whether items answered from the cache count against quotas.")
    tenants_timeout_s: float = Field(
        default=0.5, gt=0, description="Deadline of a key lookup or quota check in Redis.")
    key_cache_ttl_s: float = Field(
        default=0.5, gt=0, le=3600, description="How long a replica trusts a key lookup while its "
        "subscription to key changes works (at most 0.5 s while it does not).")
    admin_timeout_s: float = Field(
        default=5.0, gt=0, description="Deadline of an admin API call in Redis (keys, quotas): "
        "off the hot path, so a busy Redis slows it rather than failing it.")

    # Micro-batching.
    max_batch_items: int = Field(default=32, ge=1)
    max_wait_ms: float = Field(default=5.0, ge=0)
    max_concurrent_batches: int = Field(default=4, ge=1)
    max_queue_items: int = Field(default=2048, ge=1)
    batching: bool = True

    # Request limits.
    max_body_bytes: int = Field(default=1_048_576, ge=1)
    max_items: int = Field(default=128, ge=1)
    max_item_chars: int = Field(default=32_768, ge=1)
    # Tasks one call may name in `tasks` (fan-out): each is a classification of every item, so
    # this bounds the work one request can start (max_items x max_fanout items upstream).
    max_fanout: int = Field(default=8, ge=1)

    # Upstream calls.
    timeout_s: float = Field(default=10.0, gt=0, description="Default per-request deadline.")
    connect_timeout_s: float = Field(default=2.0, gt=0)
    max_connections: int = Field(default=64, ge=1)
    # Retries and the breaker (resilience.py has the reasoning). 5 attempts (gRPC's most): with 30%
    # of attempts failing at random, 0.3^5 = 0.24% of calls fail; the retry budget, not this
    # number, bounds the extra load on a failing upstream.
    retry_attempts: int = Field(default=5, ge=1, description="Upstream attempts, first included.")
    retry_backoff_s: float = Field(default=0.05, ge=0)
    retry_backoff_max_s: float = Field(default=2.0, ge=0)
    # Retries at most this fraction of calls (+10/s): a failing upstream gets at most 1.5x its load.
    # 30% random failures need 0.43 retries per call at 5 attempts, so 0.5 leaves them room.
    retry_budget: float = Field(default=0.5, ge=0)
    circuit_failure_rate: float = Field(default=0.5, gt=0, le=1)
    circuit_min_calls: int = Field(default=5, ge=1)
    circuit_window_calls: int = Field(default=10, ge=1)
    circuit_window_s: float = Field(default=10.0, gt=0)
    circuit_reset_s: float = Field(default=5.0, gt=0)

    # Client connections (connections.py): slow or stalled clients are closed, 408 where a request
    # is half read. A head is a few hundred bytes: 10 s is generous for any client on a working
    # network. 30 s reads GATEWAY_MAX_BODY_BYTES (1 MiB) at 35 kB/s, a poor mobile link.
    head_timeout_s: float = Field(default=10.0, gt=0, description="Time to send a request head.")
    body_timeout_s: float = Field(default=30.0, gt=0, description="Time to send a request body.")
    # Each connection is a file descriptor: keep this under `ulimit -n` less the upstream pools
    # (GATEWAY_MAX_CONNECTIONS each) and Redis; at the bound the longest-waiting client is evicted.
    max_open_connections: int = Field(default=1024, ge=1)

    # Shutdown: after SIGTERM, keep serving (not ready) for shutdown_delay_s so load balancers stop
    # sending, then give in-flight requests up to drain_timeout_s to finish.
    shutdown_delay_s: float = Field(default=1.0, ge=0)
    drain_timeout_s: float = Field(default=20.0, ge=0)

    @field_validator("cache_prefix")
    @classmethod
    def _no_spaces(cls, value: str) -> str:
        if not value or any(c.isspace() for c in value):
            raise ValueError("cache_prefix must be a non-empty string without spaces")
        return value

    def client_keys(self) -> list[str]:
        """The configured client keys; `api_keys` may name a file holding one key per line."""
        raw = self.api_keys.get_secret_value().strip()
        if not raw:
            return []
        path = Path(raw)
        if "," not in raw and path.is_file():
            lines = path.read_text().splitlines()
            return [line.strip() for line in lines if line.strip() and not line.startswith("#")]
        return [key.strip() for key in raw.split(",") if key.strip()]
