"""Process settings of the factory: the only place that reads `FACTORY_*` environment variables."""

from __future__ import annotations

import socket
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class FactorySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FACTORY_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8100, ge=0, le=65535)
    data_dir: Path = Field(
        default=Path("factory-data"),
        description="SQLite metadata, uploaded files and trained models; relative to the "
                    "working directory unless absolute.",
    )
    database_url: SecretStr | None = Field(
        default=None,
        description="The metadata database: unset, the SQLite file factory.sqlite3 in the data "
                    "directory; postgresql://user:password@host/db (the `cluster` extra) shares "
                    "it between replicas.",
    )
    storage_url: str | None = Field(
        default=None,
        description="Where uploaded files and models live: unset, the data directory; "
                    "s3://bucket/prefix (the `cluster` extra) for any S3-compatible store, with "
                    "credentials and endpoint from the AWS_* variables.",
    )
    replica_id: str | None = Field(
        default=None, min_length=1,
        description="This replica's name, recorded on the jobs it runs: at start it fails only "
                    "the jobs its own earlier run left VALIDATING or RUNNING. Default: the host "
                    "name (a pod's name).",
    )
    api_key: SecretStr | None = Field(
        default=None, description="When set, every /v1 call needs `Authorization: Bearer <key>`."
    )
    log_level: str = "info"

    # Limits: Mistral's are 512 MB per file; classification requests are bounded so that one
    # caller cannot hold the event loop for long.
    max_upload_bytes: int = Field(default=512 * 1024 * 1024, ge=1)
    max_classify_items: int = Field(default=1024, ge=1)
    max_input_chars: int = Field(default=100_000, ge=1)

    # Models and jobs.
    model_cache_size: int = Field(default=8, ge=1, description="Models kept loaded (LRU).")
    model_cache_bytes: int = Field(
        default=2 * 1024 * 1024 * 1024, ge=1,
        description="Bytes of model files kept loaded (LRU, with model_cache_size): the least "
                    "recently used models are evicted beyond it (the last one loaded always "
                    "stays).",
    )
    disk_cache_bytes: int = Field(
        default=10 * 1024 * 1024 * 1024, ge=1,
        description="Bytes of model files a replica keeps on its disk, fetched from an object "
                    "store (FACTORY_STORAGE_URL=s3://...): the least recently used are removed "
                    "beyond it (the model in use always stays). No effect on a local store.",
    )
    gc_min_age_s: int = Field(
        default=3600, ge=60,
        description="Blobs that no record names are removed at start (and by `factory gc`) "
                    "once older than this: younger ones may be another replica's upload or "
                    "model between its two writes.",
    )
    max_concurrent_jobs: int = Field(default=1, ge=1, description="Jobs training at once.")
    max_reported_errors: int = Field(default=20, ge=1, description="Errors shown in a job.")
    checkpoints: int = Field(default=10, ge=1, description="Checkpoints recorded per job.")
    device: str | None = Field(
        default=None, pattern=r"^(cpu|cuda(:[0-9]+)?)$",
        description="Where base models that can use an accelerator (local-minilm) train: cpu, "
                    "cuda or cuda:N. Unset: CUDA when PyTorch sees a GPU, else CPU.")
    executor: str = Field(
        default="local", pattern=r"^(local|ray)$",
        description="Where trainings run: local (a child process of the replica that took the "
                    "job) or ray (a Ray actor on the cluster FACTORY_RAY_ADDRESS names; the "
                    "`cluster` extra).")
    ray_address: str | None = Field(
        default=None,
        description="The Ray cluster of FACTORY_EXECUTOR=ray: ray://head:10001 (Ray Client, "
                    "from outside the cluster) or host:6379 (a Ray node on this machine).")
    ray_num_cpus: float = Field(
        default=1.0, gt=0,
        description="CPUs a Ray training asks for (and 1 GPU more when the device is cuda).")
    ray_gpu_autoscaling: bool = Field(
        default=False,
        description="Set when the Ray cluster's autoscaler starts GPU workers on demand (KubeRay "
                    "with a gpu group of minReplicas 0): a cuda job then waits for one instead "
                    "of being refused while no GPU worker is up.")
    lease_s: float = Field(
        default=15.0, ge=1.0, le=300.0,
        description="A supervising replica's lease on a job it works on, renewed every third "
                    "of it; another replica takes a job whose lease lapsed: within lease_s * "
                    "4/3 (20 s by default) of its supervisor's death.")
    inline_batch_items: int = Field(
        default=16, ge=0,
        description="Batches up to this size are scored on the event loop (sub-millisecond); "
                    "larger ones in a worker thread.",
    )

    @property
    def replica(self) -> str:
        return self.replica_id or socket.gethostname()

    @property
    def resolved_data_dir(self) -> Path:
        return self.data_dir.expanduser().resolve()
